// Cooperative persistent CUDA time loops: one launch runs every step of the forward (or the
// backward) recurrence when W_hh is too large for one block's shared memory, by splitting it
// across blocks and putting a grid-wide barrier between steps.
//
// STATUS: compiled in CI, never run on a GPU. Reached only when the CUDA loop mode asks for a
// persistent loop (see CudaLoopMode in lstm.h), for calls whose W_hh does not fit the
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
#include <cooperative_groups.h>

#include <algorithm>
#include <type_traits>

#include "gate_math.h"
#include "lstm_cuda_persistent.cuh"

namespace handlstm {
namespace {

namespace cg = cooperative_groups;
using persistent::kThreads;
using persistent::stored;
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
  extern __shared__ __align__(16) unsigned char smem[];
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
  extern __shared__ __align__(16) unsigned char smem[];
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
  extern __shared__ __align__(16) unsigned char smem[];
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
