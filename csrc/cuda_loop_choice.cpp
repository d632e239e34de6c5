// Which time loop a CUDA call takes: the mode (generic, persistent, auto, graph) and, for auto,
// the table of measured crossovers it reads. Host code only, built in CPU-only builds too, so that
// the Python switches and the table's lookup (tested on the CPU) exist everywhere.
//
// The table comes from benchmarks/persistent.py, which times our generic, persistent and graph
// loops side by side on a GPU and writes, per measured point, whether the persistent loops or
// the graph loop won over the generic one (handlstm_cuda loads it; see load_cuda_crossovers
// in handlstm_cuda/_ops.py). A call is matched to the nearest measured point of its dtype and
// direction, in octaves of N and H (T weighs a quarter as much); among equally near points a
// loop other than the generic one only if all of them chose it; beyond kMaxOctaves from every
// point, or on a GPU model the table was not measured on, the generic loop serves it. What
// this chooses is only a preference: the persistent hooks still decline calls out of their
// scope, and the graph loop calls made inside the caller's own capture.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "lstm.h"

namespace handlstm {
namespace {

// Farther than this from every measured point (e.g. 4x in N or in H), a call is not guessed at.
constexpr double kMaxOctaves = 2.0;

struct Table {
  std::string device;
  std::vector<Crossover> points;
};

std::atomic<int> loop_mode{static_cast<int>(CudaLoopMode::kGeneric)};
std::mutex table_mutex;
std::shared_ptr<const Table> table = std::make_shared<Table>();

std::shared_ptr<const Table> current_table() {
  const std::lock_guard<std::mutex> lock(table_mutex);
  return table;
}

double octaves(int64_t a, int64_t b) {
  return std::abs(std::log2(double(a)) - std::log2(double(b)));
}

}  // namespace

CudaLoopMode cuda_loop_mode() {
  return static_cast<CudaLoopMode>(loop_mode.load(std::memory_order_relaxed));
}

void set_cuda_loop_mode(CudaLoopMode mode) { loop_mode.store(static_cast<int>(mode)); }

void set_cuda_crossovers(std::string device, std::vector<Crossover> points) {
  for (size_t i = 0; i < points.size(); ++i) {
    const Crossover& p = points[i];
    TORCH_CHECK(p.N > 0 && p.H > 0 && p.T > 0, "set_cuda_crossovers: point ", i,
                ": N, H and T must be positive, got N=", p.N, " H=", p.H, " T=", p.T);
    TORCH_CHECK(p.winner == CudaLoopMode::kGeneric || p.winner == CudaLoopMode::kPersistent ||
                    p.winner == CudaLoopMode::kGraph,
                "set_cuda_crossovers: point ", i, ": the winner must be a loop, not a mode");
  }
  auto next = std::make_shared<Table>(Table{std::move(device), std::move(points)});
  const std::lock_guard<std::mutex> lock(table_mutex);
  table = std::move(next);
}

size_t cuda_crossover_count() { return current_table()->points.size(); }

CudaLoopMode crossover_choice(const std::string& device, at::ScalarType dtype, bool forward,
                              int64_t N, int64_t H, int64_t T) {
  const auto t = current_table();
  if (t->device != device || N <= 0 || H <= 0 || T <= 0) return CudaLoopMode::kGeneric;
  // The nearest points (equal within rounding); their winner only if all of them agree. `best`
  // is the least distance met so far, so that which points count as nearest does not depend
  // on the order of the table (log2 can put two equally near points 1e-16 apart either way).
  constexpr double kSlack = 1e-9;
  double best = kMaxOctaves;
  bool any = false, agree = true;
  CudaLoopMode winner = CudaLoopMode::kGeneric;
  for (const Crossover& p : t->points) {
    if (p.dtype != dtype || p.forward != forward) continue;
    const double d = octaves(N, p.N) + octaves(H, p.H) + 0.25 * octaves(T, p.T);
    if (d > best + kSlack) continue;  // farther than the nearest so far (or than the limit)
    if (!any || d < best - kSlack) {  // the first within the limit, or strictly nearer
      any = true;
      agree = true;
      winner = p.winner;
    } else {  // as near as the nearest so far
      agree = agree && p.winner == winner;
    }
    best = std::min(best, d);
  }
  return any && agree ? winner : CudaLoopMode::kGeneric;
}

CudaLoopMode wanted_cuda_loop(const char* (*device_name)(), at::ScalarType dtype, bool forward,
                              int64_t N, int64_t H, int64_t T) {
  const CudaLoopMode mode = cuda_loop_mode();
  if (mode != CudaLoopMode::kAuto) return mode;
  return crossover_choice(device_name(), dtype, forward, N, H, T);
}

}  // namespace handlstm
