// Persistent CUDA time loops: one launch runs every step of the forward (or the backward)
// recurrence, with the recurrent weight held in shared memory across steps.
//
// STATUS: compiled in CI, never run on a GPU (its kernels, lstm_cuda_persistent_kernels.cuh, do
// run on the CPU in tests/test_cuda_emulation.py). Off unless the CUDA loop mode asks for it
// (set_cuda_time_loop("persistent" or "auto"), HANDLSTM_CUDA_LOOP, or the shorthand
// HANDLSTM_CUDA_PERSISTENT=1); benchmarks/gpu_check.sh runs its tests. The hooks
// at the bottom are the entry of both persistent designs: this one and the cooperative loops.
//
// Why: the generic CUDA loop (lstm_driver.cpp) launches one cuBLAS GEMM and one pointwise
// kernel per step, a few microseconds of launch latency each, which dominates at small batch
// and hidden sizes (the seed's T = 62, N = 64, H = 64). Here each block owns R batch rows for
// the whole sequence (rows never interact in an LSTM), so the blocks never wait for each other:
// no grid-wide synchronisation, only two __syncthreads() per step inside a block.
//
// Scope, checked by persistent_eligible(): no projection, no packed batch (every row active at
// every step), and W_hh (G x H) plus the block's state fitting in one block's shared memory
// (computed per call, with fewer rows per block where 8 do not fit; on an H200's 227 KiB per
// block, H up to about 115 in float32 and 160 in bfloat16/float16 with 8 rows per block, 120
// and 170 with one). Larger weights go to the
// cooperative loops (lstm_cuda_cooperative.cu: W_hh split across blocks, a grid-wide barrier
// per step); what neither serves takes the generic loop.
//
// Semantics match the generic loop element for element: the activated gates, c_t and h_t are
// stored in the tensor dtype at every step and read back rounded, exactly as the generic loop
// reads them from memory; sums run in float (double for double). The recurrent products sum
// over k in increasing order in one thread, so results are deterministic, but not bitwise
// equal to cuBLAS's.
//
// Shapes (vocabulary in gate_math.h): gates (T, N, G), cells and output (T, N, H), h0 and c0
// (N, H), w_hh (G, H), grad_output (T, N, H), dgates (T, N, G), dh and dc (N, H). All indices
// are 64-bit; T is a loop inside the kernel, N / R the grid, so no launch dimension limits T
// or T x N.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "lstm_cuda_persistent.cuh"
#include "lstm_cuda_persistent_kernels.cuh"

namespace handlstm {
namespace {

// The kernels and their shared-memory sizes: lstm_cuda_persistent_kernels.cuh.
constexpr int kPersistentThreads = persistent::kThreads;
using persistent::persistent_backward_kernel;
using persistent::persistent_forward_kernel;
using persistent::persistent_smem_bytes;

// Rows per block: enough blocks to occupy the GPU's multiprocessors, at most 8 per block (the
// phase-A accumulators of a thread).
int rows_per_block(int64_t N) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = (N + sms - 1) / sms;
  return persistent::rows_tile(want);
}

// Whether the single-block loop serves these arguments (see the scope at the top), and the
// rows per block and shared memory it would use: rows_per_block's tile, halved while the
// block's state does not fit beside W_hh (more, smaller blocks; with no synchronisation
// between blocks, a grid larger than the GPU just runs in waves).
bool persistent_eligible(const LoopArgs& a, int* R, int64_t* smem) {
  if (!persistent::plain_shape(a)) return false;
  const int64_t limit = int64_t(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  for (int r = rows_per_block(a.N); r >= 1; r /= 2) {
    if ((a.N + r - 1) / r > int64_t(std::numeric_limits<int>::max())) return false;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.gates.scalar_type(),
                                    "persistent_smem", [&] {
      *smem = persistent_smem_bytes<scalar_t>(a.H, r);
    });
    if (*smem <= limit) {
      *R = r;
      return true;
    }
  }
  return false;
}

// One launch of a persistent kernel: a block per R rows, `smem` bytes of dynamic shared memory
// (above the 48 KiB default, so allowed explicitly), the caller's stream, a check after it.
template <int R, typename Kernel, typename... Args>
void launch_persistent(Kernel kernel, const LoopArgs& a, int64_t smem, Args... args) {
  persistent::allow_all_dynamic_smem(kernel);
  const auto grid = static_cast<unsigned int>((a.N + R - 1) / R);
  kernel<<<grid, kPersistentThreads, smem, at::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int R>
void launch_persistent_forward(const LoopArgs& a, int64_t smem) {
  launch_persistent<R>(
      persistent_forward_kernel<scalar_t, R>, a, smem, a.gates.data_ptr<scalar_t>(),
      a.cells.data_ptr<scalar_t>(), a.output.data_ptr<scalar_t>(),
      a.h0.const_data_ptr<scalar_t>(), a.c0.const_data_ptr<scalar_t>(),
      a.w_hh.const_data_ptr<scalar_t>(), a.sch->T, a.N, a.H, a.sch->reverse);
}

template <typename scalar_t, int R>
void launch_persistent_backward(const LoopArgs& a, int64_t smem) {
  launch_persistent<R>(
      persistent_backward_kernel<scalar_t, R>, a, smem, a.gates.const_data_ptr<scalar_t>(),
      a.cells.const_data_ptr<scalar_t>(), a.c0.const_data_ptr<scalar_t>(),
      ptr_or_null<scalar_t>(a.grad_output), a.dgates.data_ptr<scalar_t>(),
      a.dh.data_ptr<scalar_t>(), a.dc.data_ptr<scalar_t>(), a.w_hh.const_data_ptr<scalar_t>(),
      a.sch->T, a.N, a.H, a.sch->reverse);
}

// The single-block loop if it serves the call (true when it ran).
template <bool kForward>
bool run_single_block(const LoopArgs& a) {
  int R = 0;
  int64_t smem = 0;
  if (!persistent_eligible(a, &R, &smem)) return false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.gates.scalar_type(),
                                  "persistent_loop", [&] {
    persistent::with_rows_tile(R, [&](auto rows) {
      constexpr int kR = decltype(rows)::value;
      if constexpr (kForward) {
        launch_persistent_forward<scalar_t, kR>(a, smem);
      } else {
        launch_persistent_backward<scalar_t, kR>(a, smem);
      }
    });
  });
  return true;
}

// Whether the loop mode asks for a persistent loop for this call (see CudaLoopMode).
bool persistent_wanted(const LoopArgs& a, bool forward) {
  return wanted_cuda_loop(current_cuda_device_name, a.gates.scalar_type(), forward, a.N, a.H,
                          a.sch->T) == CudaLoopMode::kPersistent;
}

// When the mode wants a persistent loop: the single-block loop where it serves the call, else
// the cooperative one (which may decline too, leaving the call to the generic loop); with
// cooperative_only set, the cooperative loop is tried first. Records which one ran.
template <bool kForward>
bool run_persistent(const LoopArgs& a) {
  const auto cooperative = [&] {
    return kForward ? cooperative_forward_loop(a) : cooperative_backward_loop(a);
  };
  CudaLoop ran = CudaLoop::kGeneric;
  if (persistent_wanted(a, kForward)) {
    const bool first = cuda_persistent_cooperative_only();
    if (first && cooperative()) {
      ran = CudaLoop::kCooperative;
    } else if (run_single_block<kForward>(a)) {
      ran = CudaLoop::kSingleBlock;
    } else if (!first && cooperative()) {
      ran = CudaLoop::kCooperative;
    }
  }
  record_cuda_loop(kForward, ran);
  return ran != CudaLoop::kGeneric;
}

}  // namespace

bool persistent_forward_loop(const LoopArgs& a) { return run_persistent<true>(a); }

bool persistent_backward_loop(const LoopArgs& a) { return run_persistent<false>(a); }

}  // namespace handlstm
