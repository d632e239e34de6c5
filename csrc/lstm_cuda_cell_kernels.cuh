// The fused pointwise kernels of the generic CUDA loop, one step each (launched from
// lstm_cuda.cu): one thread per (row, hidden unit) element, a grid-stride loop over n * H with
// 64-bit indices, so no element count or grid dimension limit applies. Free of CUDA runtime
// calls, so that tests/test_cuda_emulation.py can also run them on the CPU.
//
// Rows [0, n) are the step's active rows; c_{t-1} of a row below n_prev comes from the previous
// step (c_prev), of any other row from c0 (see c_prev_row in gate_math.h).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "gate_math.h"

namespace handlstm {
namespace cuda_cell {

// Threads per block of both kernels.
constexpr int kThreads = 256;

// gates (n, 4H) in: pre-activations, out: activated; c_prev (n_prev, H); c0 (N, H);
// c, m (n, H).
template <typename scalar_t>
__global__ void cell_forward_kernel(scalar_t* __restrict__ gates,
                                    const scalar_t* __restrict__ c_prev,
                                    const scalar_t* __restrict__ c0, scalar_t* __restrict__ c,
                                    scalar_t* __restrict__ m, int64_t n, int64_t H,
                                    int64_t n_prev) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t count = n * H;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < count;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = k / H;
    const int64_t j = k - row * H;
    scalar_t* g = gates + row * 4 * H;
    const acc_t cp = c_prev_row(c_prev, c0, row, H, n_prev)[j];
    acc_t cv, mv;
    const auto a = cell_forward<acc_t>(g[j], g[H + j], g[2 * H + j], g[3 * H + j], cp, &cv, &mv);
    store_gates<scalar_t>(g, H, j, a);
    c[k] = cv;
    m[k] = mv;
  }
}

// gates (n, 4H) activated; c (n, H); c_prev (n_prev, H); c0 (N, H); dm, grad_out (n, H),
// grad_out may be null; dc (n, H) in dL/dc_t, out dL/dc_{t-1}; dgates (n, 4H).
template <typename scalar_t>
__global__ void cell_backward_kernel(const scalar_t* __restrict__ gates,
                                     const scalar_t* __restrict__ c,
                                     const scalar_t* __restrict__ c_prev,
                                     const scalar_t* __restrict__ c0,
                                     const scalar_t* __restrict__ dm,
                                     const scalar_t* __restrict__ grad_out,
                                     scalar_t* __restrict__ dc, scalar_t* __restrict__ dgates,
                                     int64_t n, int64_t H, int64_t n_prev) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t count = n * H;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < count;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = k / H;
    const int64_t j = k - row * H;
    const Gates<acc_t> a = load_gates<acc_t>(gates + row * 4 * H, H, j);
    acc_t dmv = dm[k];
    if (grad_out != nullptr) dmv += acc_t(grad_out[k]);
    acc_t dcp;
    const auto dp = cell_backward<acc_t>(a, c[k], c_prev_row(c_prev, c0, row, H, n_prev)[j], dmv,
                                         dc[k], &dcp);
    store_gates<scalar_t>(dgates + row * 4 * H, H, j, dp);
    dc[k] = dcp;
  }
}

}  // namespace cuda_cell
}  // namespace handlstm
