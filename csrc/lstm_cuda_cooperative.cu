// Cooperative persistent CUDA time loops: one launch runs every step of the forward (or the
// backward) recurrence when W_hh is too large for one block's shared memory, by splitting it
// across blocks and putting a grid-wide barrier between steps.
//
// STATUS: compiled in CI, never run on a GPU (its kernels, lstm_cuda_cooperative_kernels.cuh,
// do run on the CPU in tests/test_cuda_emulation.py). Reached only when the CUDA loop mode asks
// for a persistent loop (see CudaLoopMode in lstm.h), for calls whose W_hh does not fit the
// single-block loops (lstm_cuda_persistent.cu), or for every call in scope while
// cuda_persistent_cooperative_only is set (the tests' way to run this design at small sizes).
//
// Why: at a small batch (N <= 8) and H = 256 or 512, each step is a few hundred kilo-MACs, far
// too little to fill a GPU per launch; the generic loop's two launches per step (cuBLAS GEMM,
// pointwise kernel) cost more than the arithmetic. Here the recurrent weight stays in shared
// memory for the whole sequence, spread over about one block per multiprocessor, and a step
// costs one grid barrier plus reading h_{t-1} (N x H) from L2.
//
// The split: block b owns the hidden units [b U, b U + U) (U = ceil(H / SMs)) and the four gate
// rows of W_hh that feed them (i, f, g, o of those units: 4U rows of H). Per step:
//   forward   every block reads all of h_{t-1} (written by all blocks in the step before, into
//             `output`), computes its 4U x N pre-activations, runs the fused pointwise pass for
//             its units (c_t stays in the block), writes its slice of h_t; grid barrier.
//   backward  every block runs the pointwise backward for its units, then multiplies its
//             4U x N gate gradients by its 4U rows of W_hh: a partial dh_{t-1} (N x H) from its
//             gate rows, written to a scratch slice of its own; grid barrier; each block sums
//             the partials of its own units over all blocks in a fixed order (strided groups
//             of blocks, then the groups in order).
// The scratch is double-buffered by step parity: a block can be one step ahead of another
// (between two barriers) but never two.
//
// CUDA cores, not tensor cores, for the recurrent products: a block's share of a step is small
// (4U gate rows x H x N: 16 x 512 x 8 = 65k multiply-adds at H = 512, N = 8 on 132
// multiprocessors, 256 per thread), and the step's time is expected to go to the grid barrier
// and to reading h_{t-1} from L2, not to the arithmetic. Tensor-core fragments (mma.sync in
// bfloat16/float16; float32 would need TF32, which is only for when the caller allows it)
// would shorten the part that is not the bottleneck. The benchmark times the barrier and the
// matvec apart (cooperative_probe_ms below), so the first GPU run shows whether this holds.
//
// Co-residency: a grid barrier needs every block resident at once. The launch is cooperative
// (cudaLaunchCooperativeKernel, which refuses a grid that cannot be co-resident); before it,
// the occupancy calculator must say the grid fits, else the call takes the generic loop, as it
// also does when the launch is refused anyway or the device has no cooperative launch.
//
// Semantics as the single-block loops: the activated gates, c_t, h_t and dh are rounded to the
// tensor dtype at every step, as the generic loop stores them; sums run in float (double for
// double) in a fixed order (warp shuffles, partials gathered in a fixed order), so results are
// deterministic. No float atomics. Indices are 64-bit and T is a loop inside the kernel.
//
// Shapes (vocabulary in gate_math.h): gates (T, N, G), cells and output (T, N, H), h0 and c0
// (N, H), w_hh (G, H), grad_output (T, N, H), dgates (T, N, G), dh and dc (N, H).
#include <ATen/Dispatch.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <algorithm>
#include <type_traits>

#include "lstm_cuda_cooperative_kernels.cuh"
#include "lstm_cuda_persistent.cuh"

namespace handlstm {
namespace {

// The kernels and their shared-memory layout: lstm_cuda_cooperative_kernels.cuh.
using persistent::cooperative_backward_kernel;
using persistent::cooperative_forward_kernel;
using persistent::cooperative_probe_kernel;
using persistent::kThreads;
using persistent::smem_layout;

// The split of the hidden units: U per block (about one block per multiprocessor), and the
// blocks that takes.
struct UnitSplit {
  int64_t U, blocks;
};

UnitSplit split_units(int64_t H) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t U = (H + sms - 1) / sms;
  return {U, (H + U - 1) / U};
}

// Checks that the grid can be co-resident, then launches it cooperatively on the caller's
// stream. False (nothing launched) when it cannot be.
template <typename Kernel>
bool launch_cooperative(Kernel kernel, int64_t blocks, int64_t smem, void** args) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  if (!prop->cooperativeLaunch || smem > int64_t(prop->sharedMemPerBlockOptin)) return false;
  persistent::allow_all_dynamic_smem(kernel);
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                               static_cast<size_t>(smem)));
  if (int64_t(per_sm) * prop->multiProcessorCount < blocks) return false;
  const cudaError_t err = cudaLaunchCooperativeKernel(
      reinterpret_cast<const void*>(kernel), dim3(static_cast<unsigned int>(blocks)),
      dim3(kThreads), args, static_cast<size_t>(smem), at::cuda::getCurrentCUDAStream());
  if (err == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();  // clear it: the generic loop takes the call
    return false;
  }
  C10_CUDA_CHECK(err);
  return true;
}

template <typename scalar_t, int R>
bool run_forward(const LoopArgs& a, int64_t U, int64_t blocks) {
  const int64_t smem = smem_layout<scalar_t, true>(a.N, a.H, U, R).total;
  scalar_t* gates = a.gates.data_ptr<scalar_t>();
  scalar_t* cells = a.cells.data_ptr<scalar_t>();
  scalar_t* output = a.output.data_ptr<scalar_t>();
  const scalar_t* h0 = a.h0.const_data_ptr<scalar_t>();
  const scalar_t* c0 = a.c0.const_data_ptr<scalar_t>();
  const scalar_t* w_hh = a.w_hh.const_data_ptr<scalar_t>();
  int64_t T = a.sch->T, N = a.N, H = a.H;
  bool reverse = a.sch->reverse;
  void* args[] = {&gates, &cells, &output, &h0, &c0, &w_hh, &T, &N, &H, &U, &reverse};
  return launch_cooperative(cooperative_forward_kernel<scalar_t, R>, blocks, smem, args);
}

template <typename scalar_t, int R>
bool run_backward(const LoopArgs& a, int64_t U, int64_t blocks) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t smem = smem_layout<scalar_t, false>(a.N, a.H, U, R).total;
  // The backward's own shared memory grows slowly with N, but its scratch (2 x blocks x N x H)
  // and the partials each step moves through L2 grow fast: it serves only what the forward
  // of the same sizes serves (whose h tile of N x H caps N: about 90 at H = 512 in float32),
  // so both directions take the same loop and the scratch stays within tens of MB.
  const int64_t fwd_smem = smem_layout<scalar_t, true>(a.N, a.H, U, R).total;
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  if (std::max(smem, fwd_smem) > int64_t(prop->sharedMemPerBlockOptin)) return false;
  at::Tensor scratch = at::empty({2 * blocks * a.N * a.H},
                                 a.gates.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const scalar_t* gates = a.gates.const_data_ptr<scalar_t>();
  const scalar_t* cells = a.cells.const_data_ptr<scalar_t>();
  const scalar_t* c0 = a.c0.const_data_ptr<scalar_t>();
  const scalar_t* grad_output = ptr_or_null<scalar_t>(a.grad_output);
  scalar_t* dgates = a.dgates.data_ptr<scalar_t>();
  scalar_t* dh = a.dh.data_ptr<scalar_t>();
  scalar_t* dc = a.dc.data_ptr<scalar_t>();
  const scalar_t* w_hh = a.w_hh.const_data_ptr<scalar_t>();
  acc_t* partial = scratch.data_ptr<acc_t>();
  int64_t T = a.sch->T, N = a.N, H = a.H;
  bool reverse = a.sch->reverse;
  void* args[] = {&gates, &cells, &c0, &grad_output, &dgates, &dh, &dc, &w_hh, &partial,
                  &T, &N, &H, &U, &reverse};
  // The scratch goes back to the caching allocator when this returns; the stream order keeps
  // it from being reused before the kernel has finished.
  return launch_cooperative(cooperative_backward_kernel<scalar_t, R>, blocks, smem, args);
}

template <bool kForward>
bool run_cooperative(const LoopArgs& a) {
  if (!persistent::plain_shape(a)) return false;  // (the mode was checked by the caller)
  const UnitSplit split = split_units(a.H);
  bool ran = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.gates.scalar_type(),
                                  "cooperative_loop", [&] {
    persistent::with_rows_tile(persistent::rows_tile(a.N), [&](auto rows) {
      constexpr int kR = decltype(rows)::value;
      ran = kForward ? run_forward<scalar_t, kR>(a, split.U, split.blocks)
                     : run_backward<scalar_t, kR>(a, split.U, split.blocks);
    });
  });
  return ran;
}

// A CUDA event with timing, destroyed on every way out (c10's CUDAEvent header draws GCC 12
// warnings in this unit's host pass).
struct TimingEvent {
  cudaEvent_t event{};
  TimingEvent() { C10_CUDA_CHECK(cudaEventCreate(&event)); }
  ~TimingEvent() { (void)cudaEventDestroy(event); }
  TimingEvent(const TimingEvent&) = delete;
  TimingEvent& operator=(const TimingEvent&) = delete;
};

// Checks what the forward of these sizes would check, then times one probe launch.
template <typename scalar_t, int R>
double probe_ms(int64_t N, int64_t H, int64_t T, bool barrier, bool matvec) {
  using acc_t = at::opmath_type<scalar_t>;
  const UnitSplit split = split_units(H);
  int64_t U = split.U;  // a launch argument, so an lvalue
  const int64_t blocks = split.blocks;
  const int64_t smem = smem_layout<scalar_t, true>(N, H, U, R).total;
  at::Tensor sink = at::empty(
      {blocks}, at::TensorOptions().device(at::kCUDA, c10::cuda::current_device())
                    .dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* sink_ptr = sink.data_ptr<acc_t>();
  void* args[] = {&sink_ptr, &T, &N, &H, &U, &barrier, &matvec};
  const auto stream = at::cuda::getCurrentCUDAStream();
  TimingEvent begin, end;
  C10_CUDA_CHECK(cudaEventRecord(begin.event, stream));
  const bool ran = launch_cooperative(cooperative_probe_kernel<scalar_t, R>, blocks, smem, args);
  C10_CUDA_CHECK(cudaEventRecord(end.event, stream));
  C10_CUDA_CHECK(cudaEventSynchronize(end.event));
  float ms = 0;
  C10_CUDA_CHECK(cudaEventElapsedTime(&ms, begin.event, end.event));
  return ran ? double(ms) : -1.0;
}

}  // namespace

double cooperative_probe_ms(int64_t N, int64_t H, int64_t T, at::ScalarType dtype,
                            bool barrier, bool matvec) {
  TORCH_CHECK(N > 0 && H > 0 && T > 0, "cooperative_probe_ms: N, H and T must be positive, got ",
              N, ", ", H, ", ", T);
  double ms = -1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "cooperative_probe", [&] {
    persistent::with_rows_tile(persistent::rows_tile(N), [&](auto rows) {
      ms = probe_ms<scalar_t, decltype(rows)::value>(N, H, T, barrier, matvec);
    });
  });
  return ms;
}

bool cooperative_forward_loop(const LoopArgs& a) { return run_cooperative<true>(a); }

bool cooperative_backward_loop(const LoopArgs& a) { return run_cooperative<false>(a); }

}  // namespace handlstm
