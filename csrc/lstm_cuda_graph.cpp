// The "graph" CUDA time loop (set_cuda_time_loop("graph")): the generic per-step loop, a cuBLAS
// GEMM and a fused pointwise kernel per step with the host-side dispatch of each, captured once
// per call signature in a CUDA graph and then replayed as one launch. It pays where the host
// cannot issue the steps as fast as the GPU runs them (small batches, a few microseconds of GPU
// work per step). The persistent loops attack the same cost with one kernel for all steps; this
// path also serves what they leave to the generic loop (projection, large H, wide batches).
//
// A graph reads and writes fixed addresses, so each cached entry owns its buffers: its inputs,
// into which every call copies the caller's tensors, and the outputs its capture allocated (in
// the graph's private memory pool), which every call copies out, so that no returned tensor is
// overwritten by a later replay. That is a few memory-bound copies against 2T launches saved.
//
// Streams: the capture runs on a side stream from the pool (no graph can be captured on the
// legacy default stream); the copies in, the replay and the copies out are queued on the
// caller's current stream. A use from another stream first waits for the previous use (an
// event), since both would write the same buffers, and an entry is dropped only once its queued
// work is done. A call made while the caller's stream is itself being captured (the user's own
// CUDA graph) is left to the eager loop: captures cannot nest.
//
// A capture that fails (an operation inside that cannot be captured) is warned about once and
// its signature served eagerly from then on.
// torch's CUDAEvent.h uses std::hardware_destructive_interference_size, about which GCC 12+
// warns (the value may differ between compilers); nothing of ours depends on it.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winterference-size"
#endif
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/core/InferenceMode.h>
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic pop
#endif

#include <list>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>

#include "lstm.h"

namespace handlstm {
namespace {

// Signatures kept; past this the least recently used entry is dropped. Each entry holds buffers
// as large as its call's inputs and outputs.
constexpr size_t kMaxGraphs = 8;

using Key = std::vector<int64_t>;

struct Entry {
  // Whoever drops the last reference waits for the work queued on the buffers first: a replay
  // from another stream may still be reading them.
  ~Entry() { done.synchronize(); }

  Key key;
  std::unique_ptr<at::cuda::CUDAGraph> graph;
  TensorList in;              // what the graph reads: the caller's inputs are copied here
  TensorList out;             // what the graph writes: copied out on every call
  at::cuda::CUDAEvent done;   // recorded after the latest use's copies out
  std::mutex use;             // one host thread at a time queues a use
};

struct Cache {
  std::mutex mutex;
  std::list<std::shared_ptr<Entry>> entries;  // most recently used first
  std::set<Key> failed;                       // signatures whose capture failed
};

// Never destroyed: graphs and their pools must not be torn down after the CUDA runtime and the
// caching allocator at process exit.
Cache& cache() {
  static Cache* c = new Cache;
  return *c;
}

Key signature(bool forward, const std::vector<int64_t>& flags, const TensorList& inputs) {
  Key k{forward, static_cast<int64_t>(flags.size())};
  k.insert(k.end(), flags.begin(), flags.end());
  for (const auto& t : inputs) {
    if (!t.defined()) {
      k.push_back(-1);
      continue;
    }
    k.push_back(static_cast<int64_t>(t.scalar_type()));
    k.push_back(static_cast<int64_t>(t.device().type()));
    k.push_back(t.device().index());
    k.push_back(t.dim());
    k.insert(k.end(), t.sizes().begin(), t.sizes().end());
  }
  return k;
}

// An error's message without the C++ backtrace that may follow it.
std::string first_line(const std::string& what) { return what.substr(0, what.find('\n')); }

// Captures `run` on copies of `inputs`; nullptr (and `why`) when the capture failed.
std::shared_ptr<Entry> capture(Key key, const TensorList& inputs,
                               const std::function<TensorList(const TensorList&)>& run,
                               std::string& why) {
  // The graph's buffers are ordinary tensors even when the first call came under
  // torch.inference_mode(): later calls outside it copy into them.
  const c10::InferenceMode normal_tensors(false);
  auto e = std::make_shared<Entry>();
  e->key = std::move(key);
  const auto caller = at::cuda::getCurrentCUDAStream();
  for (const auto& t : inputs) {
    e->in.push_back(t.defined() ? t.clone(at::MemoryFormat::Contiguous) : at::Tensor());
  }
  const auto side = at::cuda::getStreamFromPool(/*isHighPriority=*/false, caller.device_index());
  at::cuda::CUDAEvent copied;
  copied.record(caller);
  copied.block(side);
  e->graph = std::make_unique<at::cuda::CUDAGraph>();
  bool began = false, ok = false;
  {
    const c10::cuda::CUDAStreamGuard on_side(side);
    try {
      // Thread-local: other threads may go on using CUDA meanwhile.
      e->graph->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
      began = true;
      e->out = run(e->in);
      ok = true;
    } catch (const std::exception& ex) {
      why = first_line(ex.what());
    }
    if (began) {
      try {
        e->graph->capture_end();
      } catch (const std::exception& ex) {
        if (ok) why = first_line(ex.what());
        ok = false;
      }
    }
  }
  if (!ok) {
    (void)cudaGetLastError();  // a failed capture's error is not the caller's
    return nullptr;
  }
  return e;
}

TensorList replay(Entry& e, const TensorList& inputs) {
  const std::lock_guard<std::mutex> lock(e.use);
  const auto stream = at::cuda::getCurrentCUDAStream();
  e.done.block(stream);  // the previous use, if it was queued on another stream
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (inputs[i].defined()) e.in[i].copy_(inputs[i]);
  }
  e.graph->replay();
  TensorList out;
  out.reserve(e.out.size());
  for (const auto& t : e.out) out.push_back(t.defined() ? t.clone() : at::Tensor());
  e.done.record(stream);
  return out;
}

}  // namespace

std::optional<TensorList> run_graphed(bool forward, std::vector<int64_t> flags,
                                      const TensorList& inputs,
                                      const std::function<TensorList(const TensorList&)>& run) {
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    return std::nullopt;
  }
  // As in the driver: the copies in and out are not part of any autograd graph.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  Key key = signature(forward, flags, inputs);
  Cache& c = cache();
  std::shared_ptr<Entry> hit;
  {
    const std::lock_guard<std::mutex> lock(c.mutex);
    if (c.failed.count(key)) return std::nullopt;
    for (auto it = c.entries.begin(); it != c.entries.end(); ++it) {
      if ((*it)->key == key) {
        hit = *it;
        c.entries.splice(c.entries.begin(), c.entries, it);
        break;
      }
    }
  }
  if (hit) {
    TensorList out = replay(*hit, inputs);
    record_cuda_loop(forward, CudaLoop::kGraph);
    return out;
  }
  // First call of this signature: eagerly (the answer, and the warm-up before capturing).
  TensorList out = run(inputs);
  std::string why;
  std::shared_ptr<Entry> fresh;
  try {
    fresh = capture(key, inputs, run, why);
  } catch (const std::exception& ex) {  // e.g. no memory for the graph's copies of the inputs
    why = first_line(ex.what());
  }
  const bool captured = fresh != nullptr;
  std::shared_ptr<Entry> evicted;
  {
    const std::lock_guard<std::mutex> lock(c.mutex);
    if (!captured) {
      c.failed.insert(key);
    } else {
      bool known = false;  // another thread may have captured the same signature meanwhile
      for (const auto& e : c.entries) known = known || e->key == key;
      if (!known) {
        c.entries.push_front(std::move(fresh));
        if (c.entries.size() > kMaxGraphs) {
          evicted = c.entries.back();
          c.entries.pop_back();
        }
      }
    }
  }
  evicted.reset();  // outside the lock: this may wait for its queued work
  if (!captured) {
    TORCH_WARN("handlstm: capturing the ", forward ? "forward" : "backward",
               " in a CUDA graph failed; this call signature runs the eager generic loop from now "
               "on. Cause: ", why.empty() ? std::string("unknown") : why);
  }
  return out;
}

void clear_cuda_graphs() {
  std::list<std::shared_ptr<Entry>> dropped;
  {
    Cache& c = cache();
    const std::lock_guard<std::mutex> lock(c.mutex);
    dropped.swap(c.entries);
    c.failed.clear();
  }
  // Destroyed here, outside the lock, each once its queued work is done.
}

size_t cuda_graph_count() {
  Cache& c = cache();
  const std::lock_guard<std::mutex> lock(c.mutex);
  return c.entries.size();
}

}  // namespace handlstm
