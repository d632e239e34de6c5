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
// A signature is captured the second time it is seen (a shape met once is not worth a
// capture), and at most kMaxGraphs are kept, holding at most kMaxGraphBytes of copies, least
// recently used dropped first. A call whose copies alone would exceed kMaxCallBytes is never
// captured: at that size the GPU, not the host, sets the pace.
//
// Streams: each live entry has a capture stream of its own, so that no two graphs share the
// cuBLAS workspace ATen keeps per (handle, stream); it is warmed up by one eager run before the
// capture, so that workspace and any other lazy state come from ordinary memory, not from the
// graph's pool. Capture streams are reused by later entries, never destroyed. The copies in,
// the replay and the copies out are queued on the caller's current stream. A use from another
// stream first waits for the previous use (an event), since both would write the same buffers,
// and an entry is destroyed only once its queued work is done. A call made while the caller's
// stream is itself being captured (the user's own CUDA graph) is left to the eager loop:
// captures cannot nest.
//
// The key holds what the captured cuBLAS calls depend on besides the tensors: TF32, the
// float32 matmul precision, reduced-precision reductions and the preferred BLAS backend.
//
// A capture that fails (nothing in the generic loop should fail to capture, but memory can run
// out) turns the graph loop off for the process, with one warning: torch's bookkeeping of an
// unfinished capture cannot be undone in every torch version, so the failed graph object is
// kept rather than destroyed, and no other capture is attempted.

// torch's CUDAEvent.h aligns a member to std::hardware_destructive_interference_size, about
// which GCC 12+ warns wherever the type is laid out (the value may differ between compilers);
// nothing of ours depends on it. Off for this whole file, since Entry holds a CUDAEvent.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic ignored "-Winterference-size"
#endif
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>

#include <list>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>

#include "lstm.h"

namespace handlstm {
namespace {

// Signatures kept; past this the least recently used entry is dropped. Each entry holds copies
// of its call's inputs and outputs. 32 covers the 4 * num_layers signatures of a bidirectional
// stack of up to 8 layers (forward and backward of each layer and direction).
constexpr size_t kMaxGraphs = 32;
// Signatures seen once and not yet captured are remembered up to this many (then forgotten).
constexpr size_t kMaxSeenOnce = 1024;
// Bytes of the cached copies of inputs and outputs, all entries together and per call.
constexpr int64_t kMaxGraphBytes = int64_t{1} << 30;
constexpr int64_t kMaxCallBytes = int64_t{256} << 20;

using Key = std::vector<int64_t>;

// Capture streams not in use by a live entry, per device; created on demand, never destroyed.
std::mutex streams_mutex;
std::vector<std::pair<c10::DeviceIndex, cudaStream_t>>& free_streams() {
  static auto* s = new std::vector<std::pair<c10::DeviceIndex, cudaStream_t>>;
  return *s;
}

// A capture stream held by one entry for its lifetime.
struct StreamLease {
  explicit StreamLease(c10::DeviceIndex d) : device(d) {
    {
      const std::lock_guard<std::mutex> lock(streams_mutex);
      auto& pool = free_streams();
      for (auto it = pool.begin(); it != pool.end(); ++it) {
        if (it->first == d) {
          raw = it->second;
          pool.erase(it);
          return;
        }
      }
    }
    const c10::cuda::CUDAGuard guard(d);
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&raw, cudaStreamNonBlocking));
  }
  ~StreamLease() {
    const std::lock_guard<std::mutex> lock(streams_mutex);
    free_streams().emplace_back(device, raw);
  }
  StreamLease(const StreamLease&) = delete;
  StreamLease& operator=(const StreamLease&) = delete;

  at::cuda::CUDAStream stream() const { return at::cuda::getStreamFromExternal(raw, device); }

  c10::DeviceIndex device;
  cudaStream_t raw = nullptr;
};

struct Entry {
  explicit Entry(c10::DeviceIndex d) : lease(d) {}
  // Whoever drops the last reference waits for the work queued on the buffers first: a replay
  // from another stream may still be reading them. (Never throws: a destructor.)
  ~Entry() {
    try {
      done.synchronize();
    } catch (const std::exception& e) {
      TORCH_WARN("handlstm: waiting for a cached CUDA graph's last use failed: ", e.what());
    }
  }

  StreamLease lease;  // first: given back last, after the graph is gone
  Key key;
  int64_t bytes = 0;  // of `in` and `out`
  std::unique_ptr<at::cuda::CUDAGraph> graph;
  TensorList in;             // what the graph reads: the caller's inputs are copied here
  TensorList out;            // what the graph writes: copied out on every call
  at::cuda::CUDAEvent done;  // recorded after the latest use of the buffers
  std::mutex use;            // one host thread at a time queues a use
};

struct Cache {
  std::mutex mutex;
  std::list<std::shared_ptr<Entry>> entries;  // most recently used first
  int64_t bytes = 0;                          // of all entries' copies
  std::set<Key> seen_once;                    // seen, not yet captured
  bool broken = false;                        // a capture failed: no more captures
};

// Never destroyed: graphs and their pools must not be torn down after the CUDA runtime and the
// caching allocator at process exit.
Cache& cache() {
  static Cache* c = new Cache;
  return *c;
}

Key signature(bool forward, const std::vector<int64_t>& flags, const TensorList& inputs) {
  auto& ctx = at::globalContext();
  Key k{forward,
        ctx.allowTF32CuBLAS(),
        static_cast<int64_t>(ctx.float32MatmulPrecision()),
        static_cast<int64_t>(ctx.allowFP16ReductionCuBLAS()),
        static_cast<int64_t>(ctx.allowBF16ReductionCuBLAS()),
        static_cast<int64_t>(ctx.blasPreferredBackend()),
        static_cast<int64_t>(flags.size())};
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

// Captures `run` on copies of `inputs`. Returns nullptr and sets `why` when the capture failed;
// throws only before the capture began (e.g. out of memory for the copies).
std::shared_ptr<Entry> capture(Key key, const TensorList& inputs,
                               const std::function<TensorList(const TensorList&)>& run,
                               std::string& why) {
  const auto caller = at::cuda::getCurrentCUDAStream();
  auto e = std::make_shared<Entry>(caller.device_index());
  e->key = std::move(key);
  {
    // The buffers are plain tensors, outside any autograd graph, even when the call came
    // under torch.inference_mode() (later calls outside it copy into them). InferenceMode(false)
    // turns grad mode on, hence the guards after it.
    const c10::InferenceMode normal_tensors(false);
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const c10::AutoGradMode no_grad(false);
    for (const auto& t : inputs) {
      e->in.push_back(t.defined() ? t.detach().clone(at::MemoryFormat::Contiguous)
                                  : at::Tensor());
    }
  }
  const auto side = e->lease.stream();
  at::cuda::CUDAEvent copied;
  copied.record(caller);
  copied.block(side);
  const c10::cuda::CUDAStreamGuard on_side(side);
  // Warm-up: cuBLAS's workspace for this stream, and anything else made on first use, from
  // ordinary memory rather than the graph's pool.
  run(e->in);
  // A first replay from another stream must wait for the copies and the warm-up.
  e->done.record(side);
  e->graph = std::make_unique<at::cuda::CUDAGraph>();
  bool began = false, ok = false;
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
  if (!ok) {
    // Kept, not destroyed: the allocator may still hold this graph's capture filter.
    (void)e->graph.release();
    e->out.clear();
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
  bool capture_now = false;
  {
    const std::lock_guard<std::mutex> lock(c.mutex);
    if (c.broken) return std::nullopt;
    for (auto it = c.entries.begin(); it != c.entries.end(); ++it) {
      if ((*it)->key == key) {
        hit = *it;
        c.entries.splice(c.entries.begin(), c.entries, it);
        break;
      }
    }
    if (!hit) {
      capture_now = c.seen_once.erase(key) > 0;
      if (!capture_now) {
        if (c.seen_once.size() >= kMaxSeenOnce) c.seen_once.clear();
        c.seen_once.insert(key);
      }
    }
  }
  if (hit) {
    TensorList out = replay(*hit, inputs);
    record_cuda_loop(forward, CudaLoop::kGraph);
    return out;
  }
  // A miss runs eagerly: the answer (and, the second time, before capturing).
  TensorList out = run(inputs);
  if (!capture_now) return out;
  int64_t bytes = 0;
  for (const TensorList* list : {&inputs, static_cast<const TensorList*>(&out)}) {
    for (const auto& t : *list) bytes += t.defined() ? static_cast<int64_t>(t.nbytes()) : 0;
  }
  if (bytes > kMaxCallBytes) return out;
  std::string why;
  std::shared_ptr<Entry> fresh;
  try {
    fresh = capture(key, inputs, run, why);
  } catch (const std::exception& ex) {  // before the capture began: nothing left behind
    TORCH_WARN("handlstm: preparing a CUDA graph of the ", forward ? "forward" : "backward",
               " failed; this call signature runs the eager generic loop until seen twice "
               "more. Cause: ", first_line(ex.what()));
    return out;
  }
  const bool failed = fresh == nullptr;
  if (fresh) fresh->bytes = bytes;
  std::vector<std::shared_ptr<Entry>> evicted;
  {
    const std::lock_guard<std::mutex> lock(c.mutex);
    if (failed) {
      c.broken = true;
    } else {
      bool known = false;  // another thread may have captured the same signature meanwhile
      for (const auto& e : c.entries) known = known || e->key == key;
      if (!known) {
        c.bytes += bytes;
        c.entries.push_front(std::move(fresh));
        while (c.entries.size() > kMaxGraphs || c.bytes > kMaxGraphBytes) {
          c.bytes -= c.entries.back()->bytes;
          evicted.push_back(std::move(c.entries.back()));
          c.entries.pop_back();
        }
      }
    }
  }
  evicted.clear();  // outside the lock: this may wait for their queued work
  if (failed) {
    TORCH_WARN("handlstm: capturing the ", forward ? "forward" : "backward",
               " in a CUDA graph failed, so the graph time loop runs the eager generic loop "
               "from now on in this process. Cause: ", why.empty() ? std::string("unknown") : why);
  }
  return out;
}

void clear_cuda_graphs() {
  std::list<std::shared_ptr<Entry>> dropped;
  {
    Cache& c = cache();
    const std::lock_guard<std::mutex> lock(c.mutex);
    dropped.swap(c.entries);
    c.bytes = 0;
    c.seen_once.clear();
  }
  // Destroyed here, outside the lock, each once its queued work is done.
}

size_t cuda_graph_count() {
  Cache& c = cache();
  const std::lock_guard<std::mutex> lock(c.mutex);
  return c.entries.size();
}

size_t cuda_graph_capacity() { return kMaxGraphs; }

}  // namespace handlstm
