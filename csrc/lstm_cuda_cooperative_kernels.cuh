// Device code of the cooperative persistent loops (driven by lstm_cuda_cooperative.cu, whose
// header comment gives the design): W_hh split across blocks by hidden unit, a grid barrier per
// step. Free of CUDA runtime calls for the same reason as lstm_cuda_persistent_kernels.cuh: the
// CPU emulation in tests/cuda_emulation/ compiles these kernels too.
#pragma once

#include <algorithm>
#include <cstdint>

#ifndef HANDLSTM_CUDA_EMULATION
#include <cooperative_groups.h>
#endif

#include "gate_math.h"
#include "lstm_cuda_persistent_kernels.cuh"

namespace handlstm {
namespace persistent {

namespace cg = cooperative_groups;
constexpr int kWarps = kThreads / 32;

// A load that bypasses L1 (ld.global.cg): for data other blocks wrote during this launch, seen
// after the grid barrier. c10::Half and c10::BFloat16 go through their bits.
template <typename T>
__device__ __forceinline__ T load_l2(const T* p) {
  if constexpr (sizeof(T) == 2) {
    return T(__ldcg(reinterpret_cast<const unsigned short*>(p)), T::from_bits());
  } else {
    return __ldcg(p);
  }
}

__host__ __device__ __forceinline__ int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

__host__ __device__ __forceinline__ int64_t round_up(int64_t n, int64_t m) {
  return (n + m - 1) / m * m;
}

// Byte offsets into one block's dynamic shared memory. Both directions hold the block's 4U gate
// rows of W_hh (row q U + u is gate q of unit u, zero for units past H) and then:
//   forward   h (Np, H): h_{t-1} of every row;  pre (Np, 4U): this step's pre-activations;
//             c (N, U): the block's c_{t-1}
//   backward  dp (Np, 4U): this step's gate gradients;  dh, dc (N, U): the block's carries;
//             red (kThreads): the partial sums' reduction
// with Np = N rounded up to the rows tile R (the padding rows stay zero).
struct SmemLayout {
  int64_t a, b, c, d, total;
};

template <typename scalar_t, bool kForward>
__host__ __device__ __forceinline__ SmemLayout smem_layout(int64_t N, int64_t H, int64_t U, int R) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Np = round_up(N, R), acc = sizeof(acc_t);
  SmemLayout l{};
  l.a = align16(4 * U * H * int64_t(sizeof(scalar_t)));
  if (kForward) {
    l.b = l.a + align16(Np * H * acc);
    l.c = l.b + align16(Np * 4 * U * acc);
    l.d = l.c;
    l.total = l.c + align16(N * U * acc);
  } else {
    l.b = l.a + align16(Np * 4 * U * acc);
    l.c = l.b + align16(N * U * acc);
    l.d = l.c + align16(N * U * acc);
    l.total = l.d + align16(kThreads * acc);
  }
  return l;
}

// The block's 4U gate rows of W_hh into shared memory (zero rows past H).
template <typename scalar_t>
__device__ void load_gate_rows(scalar_t* w, const scalar_t* w_hh, int64_t H, int64_t U,
                               int64_t j0, int64_t units) {
  for (int64_t e = threadIdx.x; e < 4 * U * H; e += kThreads) {
    const int64_t row = e / H, k = e - row * H, q = row / U, u = row - q * U;
    w[e] = u < units ? w_hh[(q * H + j0 + u) * H + k] : scalar_t(0);
  }
}

// Columns [j0, j0 + units) of an (N, H) state into the block's (N, U) copy.
template <typename scalar_t, typename acc_t>
__device__ void load_own_units(acc_t* dst, const scalar_t* src, int64_t N, int64_t H, int64_t U,
                               int64_t j0, int64_t units) {
  for (int64_t e = threadIdx.x; e < N * U; e += kThreads) {
    const int64_t n = e / U, u = e - n * U;
    dst[e] = u < units ? acc_t(src[n * H + j0 + u]) : acc_t(0);
  }
}

template <typename acc_t, int R>
__device__ __forceinline__ void warp_sum(acc_t (&acc)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
  }
}

// pre[n, q U + u] = gates_t[n, q H + j0 + u] + sum_k h[n, k] W_hh[q H + j0 + u, k], rounded to
// scalar_t, for every row n and the block's units: a warp per (row tile, gate row), the lanes
// splitting k, a shuffle tree adding the lanes' sums. gates_t may be null (then 0 is added).
template <typename scalar_t, int R>
__device__ __forceinline__ void block_preactivations(
    at::opmath_type<scalar_t>* pre, const scalar_t* w, const at::opmath_type<scalar_t>* h,
    const scalar_t* gates_t, int64_t N, int64_t H, int64_t U, int64_t j0, int64_t units) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t items = round_up(N, R) / R * 4 * units;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t item = warp; item < items; item += kWarps) {
    const int64_t tile = item / (4 * units), gr = item - tile * 4 * units;
    const int64_t q = gr / units, u = gr - q * units;
    const scalar_t* wr = w + (q * U + u) * H;
    const acc_t* hr = h + tile * R * H;
    acc_t acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = acc_t(0);
    for (int64_t k = lane; k < H; k += 32) {
      const acc_t wv = acc_t(wr[k]);
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] += hr[r * H + k] * wv;
    }
    warp_sum(acc);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t n = tile * R + r;
      if (lane == r && n < N) {
        const acc_t x = gates_t ? acc_t(gates_t[n * 4 * H + q * H + j0 + u]) : acc_t(0);
        pre[n * 4 * U + q * U + u] = stored<scalar_t>(x + acc[r]);
      }
    }
  }
}

template <typename scalar_t, int R>
__global__ void __launch_bounds__(kThreads, 1)
    cooperative_forward_kernel(scalar_t* __restrict__ gates, scalar_t* __restrict__ cells,
                               scalar_t* __restrict__ output, const scalar_t* __restrict__ h0,
                               const scalar_t* __restrict__ c0,
                               const scalar_t* __restrict__ w_hh, int64_t T, int64_t N,
                               int64_t H, int64_t U, bool reverse) {
  using acc_t = at::opmath_type<scalar_t>;
  unsigned char* const smem = dynamic_smem();
  const SmemLayout lay = smem_layout<scalar_t, true>(N, H, U, R);
  scalar_t* w = reinterpret_cast<scalar_t*>(smem);
  acc_t* h = reinterpret_cast<acc_t*>(smem + lay.a);
  acc_t* pre = reinterpret_cast<acc_t*>(smem + lay.b);
  acc_t* c = reinterpret_cast<acc_t*>(smem + lay.c);
  const cg::grid_group grid = cg::this_grid();
  const int64_t G = 4 * H, j0 = int64_t(blockIdx.x) * U, units = min(U, H - j0);
  const int64_t Np = round_up(N, R);

  load_gate_rows(w, w_hh, H, U, j0, units);
  load_own_units(c, c0, N, H, U, j0, units);
  for (int64_t e = N * H + threadIdx.x; e < Np * H; e += kThreads) h[e] = acc_t(0);

  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    // h_{t-1}: h0, or the previous step's output, whose slices all blocks wrote before the
    // barrier that ended that step.
    const scalar_t* h_src = s == 0 ? h0 : output + (reverse ? t + 1 : t - 1) * N * H;
    for (int64_t e = threadIdx.x; e < N * H; e += kThreads) h[e] = acc_t(load_l2(h_src + e));
    __syncthreads();
    block_preactivations<scalar_t, R>(pre, w, h, gates + t * N * G, N, H, U, j0, units);
    __syncthreads();
    // The fused pointwise pass for the block's units.
    for (int64_t e = threadIdx.x; e < N * units; e += kThreads) {
      const int64_t n = e / units, u = e - n * units, j = j0 + u;
      const acc_t* p = pre + n * 4 * U;
      acc_t cv, mv;
      const Gates<acc_t> a =
          cell_forward<acc_t>(p[u], p[U + u], p[2 * U + u], p[3 * U + u], c[n * U + u], &cv, &mv);
      store_gates<scalar_t>(gates + (t * N + n) * G, H, j, a);
      const int64_t at = (t * N + n) * H + j;
      cells[at] = static_cast<scalar_t>(cv);
      output[at] = static_cast<scalar_t>(mv);
      c[n * U + u] = stored<scalar_t>(cv);
    }
    if (s + 1 < T) grid.sync();
  }
}

// dh[n, u] = sum over blocks b (in order) of partial[b, n, j0 + u], rounded to scalar_t. Several
// threads share one element (the partials are L2 reads, so they are issued side by side), then
// one of them adds their sums in thread order.
template <typename scalar_t, typename acc_t>
__device__ void gather_partials(acc_t* dh, acc_t* red, const acc_t* partial, int64_t blocks,
                                int64_t N, int64_t H, int64_t U, int64_t j0, int64_t units) {
  const int64_t elems = N * units;
  const int S = elems >= kThreads ? 1 : int(kThreads / elems);
  const int per_pass = kThreads / S;
  const int slot = threadIdx.x / S, part = threadIdx.x - slot * S;
  for (int64_t base = 0; base < elems; base += per_pass) {
    const int64_t e = base + slot;
    const bool mine = slot < per_pass && e < elems;
    const int64_t n = mine ? e / units : 0, u = mine ? e - n * units : 0;
    acc_t sum = 0;
    if (mine) {
#pragma unroll 4
      for (int64_t b = part; b < blocks; b += S) sum += load_l2(partial + (b * N + n) * H + j0 + u);
    }
    red[threadIdx.x] = sum;
    __syncthreads();
    if (mine && part == 0) {
      acc_t total = 0;
      for (int p = 0; p < S; ++p) total += red[threadIdx.x + p];
      dh[n * U + u] = stored<scalar_t>(total);
    }
    __syncthreads();
  }
}

// partial (2, blocks, N, H) in acc_t: scratch, double-buffered by step parity.
template <typename scalar_t, int R>
__global__ void __launch_bounds__(kThreads, 1)
    cooperative_backward_kernel(const scalar_t* __restrict__ gates,
                                const scalar_t* __restrict__ cells,
                                const scalar_t* __restrict__ c0,
                                const scalar_t* __restrict__ grad_output,
                                scalar_t* __restrict__ dgates, scalar_t* __restrict__ dh_io,
                                scalar_t* __restrict__ dc_io,
                                const scalar_t* __restrict__ w_hh,
                                at::opmath_type<scalar_t>* __restrict__ partial, int64_t T,
                                int64_t N, int64_t H, int64_t U, bool reverse) {
  using acc_t = at::opmath_type<scalar_t>;
  unsigned char* const smem = dynamic_smem();
  const SmemLayout lay = smem_layout<scalar_t, false>(N, H, U, R);
  scalar_t* w = reinterpret_cast<scalar_t*>(smem);
  acc_t* dp = reinterpret_cast<acc_t*>(smem + lay.a);
  acc_t* dh = reinterpret_cast<acc_t*>(smem + lay.b);
  acc_t* dc = reinterpret_cast<acc_t*>(smem + lay.c);
  acc_t* red = reinterpret_cast<acc_t*>(smem + lay.d);
  const cg::grid_group grid = cg::this_grid();
  const int64_t blocks = gridDim.x;
  const int64_t G = 4 * H, j0 = int64_t(blockIdx.x) * U, units = min(U, H - j0);
  const int64_t Np = round_up(N, R), slice = N * H;

  load_gate_rows(w, w_hh, H, U, j0, units);
  load_own_units(dh, dh_io, N, H, U, j0, units);
  load_own_units(dc, dc_io, N, H, U, j0, units);
  for (int64_t e = threadIdx.x; e < Np * 4 * U; e += kThreads) dp[e] = acc_t(0);
  __syncthreads();

  for (int64_t s = T - 1; s >= 0; --s) {
    const int64_t t = reverse ? T - 1 - s : s;
    const int64_t t_prev = s > 0 ? (reverse ? T - s : s - 1) : -1;
    // dh_t from the partials the step after this one wrote (dL/dh_n before the last step).
    if (s + 1 < T) {
      gather_partials<scalar_t>(dh, red, partial + ((s + 1) & 1) * blocks * slice, blocks, N, H,
                                U, j0, units);
    }
    // The fused pointwise backward for the block's units (see Note [Backward through time]).
    for (int64_t e = threadIdx.x; e < N * units; e += kThreads) {
      const int64_t n = e / units, u = e - n * units, j = j0 + u;
      const Gates<acc_t> a = load_gates<acc_t>(gates + (t * N + n) * G, H, j);
      const int64_t at = (t * N + n) * H + j;
      const acc_t c_prev = t_prev >= 0 ? acc_t(cells[(t_prev * N + n) * H + j])
                                       : acc_t(c0[n * H + j]);
      acc_t dm = dh[n * U + u];
      if (grad_output != nullptr) dm += acc_t(grad_output[at]);
      acc_t dcp;
      const Gates<acc_t> d = cell_backward<acc_t>(a, acc_t(cells[at]), c_prev, dm, dc[n * U + u],
                                                  &dcp);
      store_gates<scalar_t>(dgates + (t * N + n) * G, H, j, d);
      store_gates<scalar_t>(dp + n * 4 * U, U, u, d);
      dc[n * U + u] = stored<scalar_t>(dcp);
    }
    __syncthreads();
    // This block's share of dh_{t-1}: partial[n, k] = sum over its gate rows g of
    // dp[n, g] W_hh[g, k], a thread per k.
    acc_t* mine = partial + (s & 1) * blocks * slice + int64_t(blockIdx.x) * slice;
    for (int64_t k = threadIdx.x; k < H; k += kThreads) {
      for (int64_t n0 = 0; n0 < Np; n0 += R) {
        acc_t acc[R];
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] = acc_t(0);
        for (int q = 0; q < 4; ++q) {
          for (int64_t u = 0; u < units; ++u) {
            const int64_t g = q * U + u;
            const acc_t wv = acc_t(w[g * H + k]);
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r] += dp[(n0 + r) * 4 * U + g] * wv;
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (n0 + r < N) mine[(n0 + r) * H + k] = acc[r];
        }
      }
    }
    grid.sync();
  }
  gather_partials<scalar_t>(dh, red, partial, blocks, N, H, U, j0, units);
  for (int64_t e = threadIdx.x; e < N * units; e += kThreads) {
    const int64_t n = e / units, u = e - n * units;
    dh_io[n * H + j0 + u] = static_cast<scalar_t>(dh[n * U + u]);
    dc_io[n * H + j0 + u] = static_cast<scalar_t>(dc[n * U + u]);
  }
}

// The two costs of a cooperative forward step, apart, for the benchmark's record of where the
// time goes (cooperative_probe_ms): T steps of the grid barrier alone, of the on-chip
// pre-activation matvec alone (the forward's own code, on made-up values), or of both, on the
// grid and shared memory the forward of these sizes would use.
template <typename scalar_t, int R>
__global__ void __launch_bounds__(kThreads, 1)
    cooperative_probe_kernel(at::opmath_type<scalar_t>* __restrict__ sink, int64_t T,
                             int64_t N, int64_t H, int64_t U, bool barrier, bool matvec) {
  using acc_t = at::opmath_type<scalar_t>;
  unsigned char* const smem = dynamic_smem();
  const SmemLayout lay = smem_layout<scalar_t, true>(N, H, U, R);
  scalar_t* w = reinterpret_cast<scalar_t*>(smem);
  acc_t* h = reinterpret_cast<acc_t*>(smem + lay.a);
  acc_t* pre = reinterpret_cast<acc_t*>(smem + lay.b);
  const cg::grid_group grid = cg::this_grid();
  const int64_t j0 = int64_t(blockIdx.x) * U, units = min(U, H - j0);
  for (int64_t e = threadIdx.x; e < 4 * U * H; e += kThreads) w[e] = scalar_t(0.001f);
  for (int64_t e = threadIdx.x; e < round_up(N, R) * H; e += kThreads) h[e] = acc_t(0.5f);
  for (int64_t e = threadIdx.x; e < round_up(N, R) * 4 * U; e += kThreads) pre[e] = acc_t(0);
  __syncthreads();
  for (int64_t s = 0; s < T; ++s) {
    if (matvec) block_preactivations<scalar_t, R>(pre, w, h, nullptr, N, H, U, j0, units);
    __syncthreads();
    if (barrier) grid.sync();
  }
  if (threadIdx.x == 0) sink[blockIdx.x] = pre[0];
}

}  // namespace persistent
}  // namespace handlstm
