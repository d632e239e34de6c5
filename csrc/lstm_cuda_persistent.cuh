// What the launch code of the two persistent CUDA designs shares: the single-block loops
// (lstm_cuda_persistent.cu, W_hh whole in one block) and the cooperative loops
// (lstm_cuda_cooperative.cu, W_hh split across blocks with a grid-wide barrier per step).
// Their device code is in lstm_cuda_persistent_kernels.cuh and lstm_cuda_cooperative_kernels.cuh.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <type_traits>

#include "lstm.h"
#include "lstm_cuda_persistent_kernels.cuh"

namespace handlstm {
namespace persistent {

// Whether the arguments are of the shape both designs serve: no projection, no packed batch
// (every row active at every step), something to do.
inline bool plain_shape(const LoopArgs& a) {
  if (a.proj || a.N == 0 || a.sch->T == 0) return false;
  for (const int64_t n : a.sch->active) {
    if (n != a.N) return false;
  }
  return true;
}

// f(std::integral_constant<int, R>{}) for a rows tile R from rows_tile: the kernels take R as a
// template argument (their per-thread accumulators).
template <typename F>
void with_rows_tile(int R, F&& f) {
  switch (R) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// Lets `kernel` take the device's whole opt-in shared memory per block as dynamic shared memory
// (needed above the 48 KiB default). The same value on every call: setting each call's own size
// instead would let two host threads launching one kernel with different sizes lower the limit
// between the other's setting and its launch, which would then fail.
template <typename Kernel>
void allow_all_dynamic_smem(Kernel kernel) {
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const size_t limit = prop->sharedMemPerBlockOptin - attr.sharedSizeBytes;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(limit)));
}

}  // namespace persistent

// The cooperative loops (lstm_cuda_cooperative.cu): false when out of their scope or when the
// GPU cannot hold all their blocks at once. The single-block loops call them when W_hh does not
// fit one block, and first whenever cuda_persistent_cooperative_only() is set (tests).
bool cooperative_forward_loop(const LoopArgs& a);
bool cooperative_backward_loop(const LoopArgs& a);

}  // namespace handlstm
