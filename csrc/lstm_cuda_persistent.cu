// Persistent CUDA time loops: one launch runs every step of the forward (or the backward)
// recurrence, with the recurrent weight held in shared memory across steps.
//
// STATUS: compiled in CI, never run on a GPU. Off unless the CUDA loop mode asks for it
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

#include "gate_math.h"
#include "lstm_cuda_persistent.cuh"

namespace handlstm {
namespace {

constexpr int kPersistentThreads = persistent::kThreads;
using persistent::stored;

// Shared memory of one block: the weight (H x G for the forward, transposed so that the
// threads of a warp read consecutive gate columns; G x H as stored for the backward), padded
// to 16 bytes, then the block's state in acc_t.
template <typename scalar_t>
__host__ __device__ __forceinline__ int64_t weight_smem_bytes(int64_t H) {
  return (4 * H * H * int64_t(sizeof(scalar_t)) + 15) / 16 * 16;
}

template <typename scalar_t>
int64_t persistent_smem_bytes(int64_t H, int R) {
  using acc_t = at::opmath_type<scalar_t>;
  return weight_smem_bytes<scalar_t>(H) + (2 * R * H + R * 4 * H) * int64_t(sizeof(acc_t));
}

// Forward: block b owns rows [b R, b R + R) of the batch.
//   gates   in: x W_ih^T + b for every step; out: the activated gates i, f, g, o
//   cells, output: c_t and h_t of every step;  h0, c0: the initial state
template <typename scalar_t, int R>
__global__ void __launch_bounds__(kPersistentThreads)
    persistent_forward_kernel(scalar_t* __restrict__ gates, scalar_t* __restrict__ cells,
                              scalar_t* __restrict__ output, const scalar_t* __restrict__ h0,
                              const scalar_t* __restrict__ c0,
                              const scalar_t* __restrict__ w_hh, int64_t T, int64_t N,
                              int64_t H, bool reverse) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t G = 4 * H;
  scalar_t* wT = reinterpret_cast<scalar_t*>(smem);  // (H, G): wT[k G + g] = W_hh[g, k]
  acc_t* h = reinterpret_cast<acc_t*>(smem + weight_smem_bytes<scalar_t>(H));
  acc_t* c = h + R * H;    // (R, H)
  acc_t* pre = c + R * H;  // (R, G) pre-activations of the current step
  const int64_t row0 = int64_t(blockIdx.x) * R;
  const int rows = int(min(int64_t(R), N - row0));

  for (int64_t e = threadIdx.x; e < G * H; e += blockDim.x) {
    const int64_t g = e / H, k = e - g * H;
    wT[k * G + g] = w_hh[e];
  }
  for (int64_t e = threadIdx.x; e < R * H; e += blockDim.x) {
    const int64_t r = e / H;
    h[e] = r < rows ? acc_t(h0[row0 * H + e]) : acc_t(0);
    c[e] = r < rows ? acc_t(c0[row0 * H + e]) : acc_t(0);
  }
  __syncthreads();

  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    scalar_t* g_t = gates + (t * N + row0) * G;
    // Phase A: pre[r, g] = gates[t, r, g] + sum_k h[r, k] W_hh[g, k].
    for (int64_t g = threadIdx.x; g < G; g += blockDim.x) {
      acc_t acc[R];
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = r < rows ? acc_t(g_t[r * G + g]) : acc_t(0);
      for (int64_t k = 0; k < H; ++k) {
        const acc_t w = acc_t(wT[k * G + g]);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] += h[r * H + k] * w;
      }
#pragma unroll
      for (int r = 0; r < R; ++r) pre[r * G + g] = stored<scalar_t>(acc[r]);
    }
    __syncthreads();
    // Phase B: the fused pointwise pass of the step for every (row, unit).
    for (int64_t e = threadIdx.x; e < int64_t(rows) * H; e += blockDim.x) {
      const int64_t r = e / H, j = e - r * H;
      const acc_t* p = pre + r * G;
      acc_t cv, mv;
      const Gates<acc_t> a = cell_forward<acc_t>(p[j], p[H + j], p[2 * H + j], p[3 * H + j],
                                                 c[e], &cv, &mv);
      store_gates<scalar_t>(g_t + r * G, H, j, a);
      const int64_t at = (t * N + row0) * H + e;
      cells[at] = static_cast<scalar_t>(cv);
      output[at] = static_cast<scalar_t>(mv);
      c[e] = stored<scalar_t>(cv);
      h[e] = stored<scalar_t>(mv);
    }
    __syncthreads();
  }
}

// Backward: block b owns the same rows, walking the steps backwards.
//   gates, cells: saved by the forward;  c0: the initial cell state
//   grad_output: dL/doutput (may be null);  dgates out: pre-activation gradients of every step
//   dh, dc in: dL/dh_n, dL/dc_n;  out: dL/dh0, dL/dc0
template <typename scalar_t, int R>
__global__ void __launch_bounds__(kPersistentThreads)
    persistent_backward_kernel(const scalar_t* __restrict__ gates,
                               const scalar_t* __restrict__ cells,
                               const scalar_t* __restrict__ c0,
                               const scalar_t* __restrict__ grad_output,
                               scalar_t* __restrict__ dgates, scalar_t* __restrict__ dh_io,
                               scalar_t* __restrict__ dc_io, const scalar_t* __restrict__ w_hh,
                               int64_t T, int64_t N, int64_t H, bool reverse) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t G = 4 * H;
  scalar_t* w = reinterpret_cast<scalar_t*>(smem);  // (G, H) as stored
  acc_t* dh = reinterpret_cast<acc_t*>(smem + weight_smem_bytes<scalar_t>(H));
  acc_t* dc = dh + R * H;  // (R, H)
  acc_t* dg = dc + R * H;  // (R, G) pre-activation gradients of the current step
  const int64_t row0 = int64_t(blockIdx.x) * R;
  const int rows = int(min(int64_t(R), N - row0));

  for (int64_t e = threadIdx.x; e < G * H; e += blockDim.x) w[e] = w_hh[e];
  for (int64_t e = threadIdx.x; e < R * H; e += blockDim.x) {
    const int64_t r = e / H;
    dh[e] = r < rows ? acc_t(dh_io[row0 * H + e]) : acc_t(0);
    dc[e] = r < rows ? acc_t(dc_io[row0 * H + e]) : acc_t(0);
  }
  __syncthreads();

  for (int64_t s = T - 1; s >= 0; --s) {
    const int64_t t = reverse ? T - 1 - s : s;
    const int64_t t_prev = s > 0 ? (reverse ? T - s : s - 1) : -1;
    // Phase B: the fused pointwise backward of the step (see Note [Backward through time]).
    for (int64_t e = threadIdx.x; e < int64_t(rows) * H; e += blockDim.x) {
      const int64_t r = e / H, j = e - r * H;
      const Gates<acc_t> a = load_gates<acc_t>(gates + (t * N + row0 + r) * G, H, j);
      const int64_t at = (t * N + row0) * H + e;
      const acc_t c_t = acc_t(cells[at]);
      const acc_t c_prev =
          t_prev >= 0 ? acc_t(cells[(t_prev * N + row0) * H + e]) : acc_t(c0[row0 * H + e]);
      acc_t dm = dh[e];
      if (grad_output != nullptr) dm += acc_t(grad_output[at]);
      acc_t dcp;
      const Gates<acc_t> dp = cell_backward<acc_t>(a, c_t, c_prev, dm, dc[e], &dcp);
      store_gates<scalar_t>(dgates + (t * N + row0 + r) * G, H, j, dp);
      store_gates<scalar_t>(dg + r * G, H, j, dp);
      dc[e] = stored<scalar_t>(dcp);
    }
    __syncthreads();
    // Phase A: dh_{t-1}[r, j] = sum_g dp[r, g] W_hh[g, j].
    for (int64_t e = threadIdx.x; e < int64_t(rows) * H; e += blockDim.x) {
      const int64_t r = e / H, j = e - r * H;
      const acc_t* dgs = dg + r * G;
      acc_t acc = 0;
      for (int64_t g = 0; g < G; ++g) acc += dgs[g] * acc_t(w[g * H + j]);
      dh[e] = stored<scalar_t>(acc);
    }
    __syncthreads();
  }
  for (int64_t e = threadIdx.x; e < int64_t(rows) * H; e += blockDim.x) {
    dh_io[row0 * H + e] = static_cast<scalar_t>(dh[e]);
    dc_io[row0 * H + e] = static_cast<scalar_t>(dc[e]);
  }
}

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
