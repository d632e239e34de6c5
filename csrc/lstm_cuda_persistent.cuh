// What the two persistent CUDA designs share: the single-block loops
// (lstm_cuda_persistent.cu, W_hh whole in one block) and the cooperative loops
// (lstm_cuda_cooperative.cu, W_hh split across blocks with a grid-wide barrier per step).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>

#include <cstdint>

#include "gate_math.h"
#include "lstm.h"

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

// The four gates of unit j in a gate row laid out as nn.LSTM's (i, f, g, o blocks of `stride`).
// store_gates rounds each value to scalar_t and writes it as dst_t: into a tensor (dst_t =
// scalar_t), or into a shared-memory copy in acc_t that must hold what the tensor holds.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ Gates<acc_t> load_gates(const scalar_t* row, int64_t stride,
                                                   int64_t j) {
  return {acc_t(row[j]), acc_t(row[stride + j]), acc_t(row[2 * stride + j]),
          acc_t(row[3 * stride + j])};
}

template <typename scalar_t, typename dst_t, typename acc_t>
__device__ __forceinline__ void store_gates(dst_t* row, int64_t stride, int64_t j,
                                            const Gates<acc_t>& a) {
  row[j] = static_cast<dst_t>(static_cast<scalar_t>(a.i));
  row[stride + j] = static_cast<dst_t>(static_cast<scalar_t>(a.f));
  row[2 * stride + j] = static_cast<dst_t>(static_cast<scalar_t>(a.g));
  row[3 * stride + j] = static_cast<dst_t>(static_cast<scalar_t>(a.o));
}

// Whether the arguments are of the shape both designs serve: no projection, no packed batch
// (every row active at every step), something to do.
inline bool plain_shape(const LoopArgs& a) {
  if (a.proj || a.N == 0 || a.sch->T == 0) return false;
  for (const int64_t n : a.sch->active) {
    if (n != a.N) return false;
  }
  return true;
}

// Batch rows held in a thread's accumulators: the next power of two of N, at most 8.
inline int rows_tile(int64_t N) { return N <= 1 ? 1 : N <= 2 ? 2 : N <= 4 ? 4 : 8; }

}  // namespace persistent

// The cooperative loops (lstm_cuda_cooperative.cu): false when out of their scope or when the
// GPU cannot hold all their blocks at once. The single-block loops call them when W_hh does not
// fit one block, and first whenever cuda_persistent_cooperative_only() is set (tests).
bool cooperative_forward_loop(const LoopArgs& a);
bool cooperative_backward_loop(const LoopArgs& a);

}  // namespace handlstm
