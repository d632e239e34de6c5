// Checks of the emulation itself (emulation.h), driven by tests/test_cuda_emulation.py under
// ThreadSanitizer: that it reports what a GPU would not order, and only that.
//
//   self_check shuffle_values   a warp's __shfl_xor_sync returns lane ^ mask's value; exit 1 if not
//   self_check shuffle_fence    lane 0 writes shared memory, the warp shuffles, lane 1 reads it:
//                               a shuffle orders no memory on a GPU, so TSan must report a race
//   self_check syncthreads      the same with __syncthreads() instead: ordered, no report
//   self_check grid_sync        block 0 writes global memory, grid.sync(), block 1 reads: ordered
#include "emulation.h"

#include <cstdio>
#include <string>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s MODE\n", argv[0]);
    return 2;
  }
  const std::string mode = argv[1];
  std::atomic<int> wrong{0};
  int global = 0, seen = -1;
  if (mode == "shuffle_values") {
    cuda_emulation::launch(1, 64, 0, false, [&] {
      const int lane = int(threadIdx.x % 32);
      for (int mask = 1; mask < 32; mask <<= 1) {
        if (__shfl_xor_sync(0xffffffffu, lane * 1.5, mask) != (lane ^ mask) * 1.5) ++wrong;
      }
    });
  } else if (mode == "shuffle_fence" || mode == "syncthreads") {
    const bool barrier = mode == "syncthreads";
    cuda_emulation::launch(1, 32, sizeof(int), false, [&] {
      int* smem = reinterpret_cast<int*>(handlstm::persistent::dynamic_smem());
      if (threadIdx.x == 0) smem[0] = 7;
      if (barrier) {
        __syncthreads();
      } else {
        (void)__shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
      }
      if (threadIdx.x == 1 && smem[0] != 7) ++wrong;
    });
  } else if (mode == "grid_sync") {
    cuda_emulation::launch(2, 32, 0, true, [&] {
      if (blockIdx.x == 0 && threadIdx.x == 0) global = 5;
      cooperative_groups::this_grid().sync();
      if (blockIdx.x == 1 && threadIdx.x == 0) seen = global;
    });
    if (seen != 5) ++wrong;
  } else {
    std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
    return 2;
  }
  return wrong.load() == 0 ? 0 : 1;
}
