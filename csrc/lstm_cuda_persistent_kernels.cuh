// Device code of the single-block persistent loops (driven by lstm_cuda_persistent.cu), and the
// device pieces both persistent designs share. Kept apart from the launch code, and free of
// CUDA runtime calls, so that tests/cuda_emulation/ can compile these very kernels for the CPU
// (HANDLSTM_CUDA_EMULATION, with its own stand-ins for the CUDA built-ins) and run them there
// under AddressSanitizer and ThreadSanitizer on machines without a GPU.
//
// Shapes (vocabulary in gate_math.h): gates (T, N, G), cells and output (T, N, H), h0 and c0
// (N, H), w_hh (G, H), grad_output (T, N, H), dgates (T, N, G), dh and dc (N, H).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "gate_math.h"

namespace handlstm {
namespace persistent {

constexpr int kThreads = 256;

// The value a tensor of scalar_t would hold: what the generic loop reads back from memory.
// Both designs round the gates, c_t, h_t and dh to the tensor dtype at every step, so that they
// follow the generic loop's rounding points element for element.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t stored(acc_t v) {
  return static_cast<acc_t>(static_cast<scalar_t>(v));
}

// Batch rows held in a thread's accumulators: the next power of two of N, at most 8. The
// cooperative loops take R = rows_tile(N); the single-block loops a tile of the rows per block.
inline int rows_tile(int64_t N) { return N <= 1 ? 1 : N <= 2 ? 2 : N <= 4 ? 4 : 8; }

#ifndef HANDLSTM_CUDA_EMULATION
// The block's dynamic shared memory (the emulation supplies its own, one buffer per block).
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char smem[];
  return smem;
}
#endif

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
__global__ void __launch_bounds__(kThreads)
    persistent_forward_kernel(scalar_t* __restrict__ gates, scalar_t* __restrict__ cells,
                              scalar_t* __restrict__ output, const scalar_t* __restrict__ h0,
                              const scalar_t* __restrict__ c0,
                              const scalar_t* __restrict__ w_hh, int64_t T, int64_t N,
                              int64_t H, bool reverse) {
  using acc_t = at::opmath_type<scalar_t>;
  unsigned char* const smem = dynamic_smem();
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
__global__ void __launch_bounds__(kThreads)
    persistent_backward_kernel(const scalar_t* __restrict__ gates,
                               const scalar_t* __restrict__ cells,
                               const scalar_t* __restrict__ c0,
                               const scalar_t* __restrict__ grad_output,
                               scalar_t* __restrict__ dgates, scalar_t* __restrict__ dh_io,
                               scalar_t* __restrict__ dc_io, const scalar_t* __restrict__ w_hh,
                               int64_t T, int64_t N, int64_t H, bool reverse) {
  using acc_t = at::opmath_type<scalar_t>;
  unsigned char* const smem = dynamic_smem();
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

}  // namespace persistent
}  // namespace handlstm
