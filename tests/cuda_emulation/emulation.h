// Stand-ins for the CUDA built-ins the extension's kernels use, so that the kernels' own source
// (csrc/lstm_cuda_cell_kernels.cuh, csrc/lstm_cuda_persistent_kernels.cuh,
// csrc/lstm_cuda_cooperative_kernels.cuh) compiles as plain C++ and runs on a CPU: every CUDA
// thread is an OS thread, and every block has a shared-memory buffer of exactly the launch's
// dynamic size.
//
// What a run here checks: the index arithmetic and the results against the float64 oracle;
// under AddressSanitizer, every access against the bounds of the global buffers and of the
// block's shared-memory buffer as a whole (not of the regions a kernel carves out of it);
// under ThreadSanitizer, that every pair of threads touching one address is ordered by a
// barrier (__syncthreads, grid.sync()): a missing or misplaced barrier is a data race it
// reports. A warp shuffle exchanges its values without ordering any memory, as on a GPU, so
// relying on one as a fence is also reported. Shared memory starts as 0xFF bytes (NaN in every
// float type), so a read of something never written shows up in the results. A barrier that
// some threads never reach (a hang on a GPU) aborts here with its name after a timeout.
//
// What it cannot check: timing, occupancy and co-residency, shared-memory limits (the harness
// checks those), the GPU's memory model (a stale L1 line after the grid barrier, which the
// kernels avoid with __ldcg), warp-synchronous assumptions beyond the shuffles, and the launch
// code in the .cu files (the harness launches the kernels with the grid and shared memory the
// launch code would compute).
#pragma once

#define HANDLSTM_CUDA_EMULATION 1

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

// Under ThreadSanitizer, the synchronisation a warp shuffle uses here to meet its lanes must not
// count as ordering memory between them (a GPU's shuffle does not).
#if defined(__SANITIZE_THREAD__)
extern "C" void AnnotateIgnoreSyncBegin(const char* file, int line);
extern "C" void AnnotateIgnoreSyncEnd(const char* file, int line);
#define CUDA_EMULATION_UNORDERED(stmt)         \
  do {                                         \
    AnnotateIgnoreSyncBegin(__FILE__, __LINE__); \
    stmt;                                      \
    AnnotateIgnoreSyncEnd(__FILE__, __LINE__);   \
  } while (0)
#else
#define CUDA_EMULATION_UNORDERED(stmt) stmt
#endif

namespace cuda_emulation {

struct Dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

// A barrier for `count` threads. A GPU hangs when some threads of a barrier never reach it;
// here the first waiter to see no progress for `kTimeout` aborts the process, naming it. The
// mutex orders the threads' memory (what __syncthreads and grid.sync() promise), unless the
// caller tells ThreadSanitizer to ignore it (the shuffles); the counters are atomics so that
// they stay race-free for it either way.
class Barrier {
 public:
  Barrier(int count, const char* what) : count_(count), what_(what) {}

  void wait() {
    static constexpr auto kTimeout = std::chrono::seconds(120);
    constexpr auto relaxed = std::memory_order_relaxed;
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_.load(relaxed);
    if (arrived_.fetch_add(1, relaxed) + 1 == count_) {
      arrived_.store(0, relaxed);
      generation_.store(generation + 1, relaxed);
      released_.notify_all();
      return;
    }
    if (!released_.wait_for(lock, kTimeout,
                            [&] { return generation_.load(relaxed) != generation; })) {
      std::fprintf(stderr, "cuda_emulation: %s barrier: %d of %d threads arrived, no progress "
                   "for %lld s (a barrier some threads skip)\n", what_, arrived_.load(relaxed),
                   count_, static_cast<long long>(kTimeout.count()));
      std::abort();
    }
  }

 private:
  const int count_;
  const char* const what_;
  std::mutex mutex_;
  std::condition_variable released_;
  std::atomic<int> arrived_{0};
  std::atomic<uint64_t> generation_{0};
};

// One warp's exchange slots for the shuffles: relaxed atomics, which order nothing else.
struct Warp {
  Barrier barrier{32, "warp shuffle"};
  std::atomic<uint64_t> slots[32];
};

struct Block {
  explicit Block(unsigned int threads, size_t smem_bytes)
      : barrier(int(threads), "__syncthreads"), warps(threads / 32),
        smem(new unsigned char[smem_bytes]) {
    std::memset(smem.get(), 0xFF, smem_bytes);
  }
  Barrier barrier;
  std::vector<Warp> warps;
  std::unique_ptr<unsigned char[]> smem;
};

struct ThreadState {
  Dim3 thread_idx, block_idx, block_dim, grid_dim;
  Block* block = nullptr;
  Barrier* grid_barrier = nullptr;  // cooperative launches only
};

inline ThreadState& this_thread() {
  static thread_local ThreadState state;
  return state;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emulation: %s\n", what);
  std::abort();
}

// Runs kernel() as `grid` blocks of `threads` threads (each an OS thread), with `smem_bytes` of
// dynamic shared memory per block. A cooperative launch runs all its blocks at once and gets
// the grid barrier; grid.sync() elsewhere is an error, as on a GPU. Other launches run in waves
// of at most kWaveBlocks blocks at once, as a GPU runs a grid larger than it can hold (their
// blocks must not wait for each other), which keeps the thread count bounded.
constexpr unsigned int kWaveBlocks = 8;

template <typename Kernel>
void launch(unsigned int grid, unsigned int threads, size_t smem_bytes, bool cooperative,
            Kernel kernel) {
  if (threads % 32 != 0) fail("launch: threads per block must be a multiple of 32 here");
  Barrier grid_barrier(int(grid * threads), "grid.sync()");
  const unsigned int wave = cooperative ? grid : std::min(grid, kWaveBlocks);
  for (unsigned int first = 0; first < grid; first += wave) {
    const unsigned int last = std::min(grid, first + wave);
    std::vector<std::unique_ptr<Block>> blocks;
    for (unsigned int b = first; b < last; ++b) {
      blocks.emplace_back(new Block(threads, smem_bytes));
    }
    std::vector<std::thread> workers;
    workers.reserve(size_t(last - first) * threads);
    for (unsigned int b = first; b < last; ++b) {
      for (unsigned int t = 0; t < threads; ++t) {
        workers.emplace_back([&, b, t] {
          ThreadState& s = this_thread();
          s.thread_idx.x = t;
          s.block_idx.x = b;
          s.block_dim.x = threads;
          s.grid_dim.x = grid;
          s.block = blocks[b - first].get();
          s.grid_barrier = cooperative ? &grid_barrier : nullptr;
          kernel();
        });
      }
    }
    for (auto& w : workers) w.join();
  }
}

inline void syncthreads() { this_thread().block->barrier.wait(); }

template <typename T>
T shfl_xor(unsigned int mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  if (mask != 0xffffffffu) fail("__shfl_xor_sync: only full-warp masks are emulated");
  ThreadState& s = this_thread();
  const unsigned int lane = s.thread_idx.x % 32;
  Warp& warp = s.block->warps[s.thread_idx.x / 32];
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  warp.slots[lane].store(bits, std::memory_order_relaxed);
  CUDA_EMULATION_UNORDERED(warp.barrier.wait());
  bits = warp.slots[(lane ^ unsigned(lane_mask)) % 32].load(std::memory_order_relaxed);
  // Nobody overwrites a slot before every lane has read it.
  CUDA_EMULATION_UNORDERED(warp.barrier.wait());
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace cuda_emulation

#define threadIdx (::cuda_emulation::this_thread().thread_idx)
#define blockIdx (::cuda_emulation::this_thread().block_idx)
#define blockDim (::cuda_emulation::this_thread().block_dim)
#define gridDim (::cuda_emulation::this_thread().grid_dim)
#define __syncthreads() ::cuda_emulation::syncthreads()

template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask) {
  return ::cuda_emulation::shfl_xor(mask, value, lane_mask);
}

// An L2 load is a plain load here (the emulation has no caches).
template <typename T>
T __ldcg(const T* p) {
  return *p;
}

// CUDA's device-side min/max overloads.
using std::max;
using std::min;

namespace cooperative_groups {
struct grid_group {
  void sync() const {
    ::cuda_emulation::Barrier* b = ::cuda_emulation::this_thread().grid_barrier;
    if (b == nullptr) ::cuda_emulation::fail("grid.sync() in a launch that is not cooperative");
    b->wait();
  }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

namespace handlstm {
namespace persistent {
inline unsigned char* dynamic_smem() { return ::cuda_emulation::this_thread().block->smem.get(); }
}  // namespace persistent
}  // namespace handlstm
