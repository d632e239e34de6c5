// The "graph" CUDA time loop (set_cuda_time_loop("graph")): the generic per-step loop, a cuBLAS
// GEMM and a fused pointwise kernel per step with the host-side dispatch of each, captured once
// per call signature in a CUDA graph and then replayed as one launch. It pays where the host
// cannot issue the steps as fast as the GPU runs them (small batches, a few microseconds of GPU
// work per step). The persistent loops attack the same cost with one kernel for all steps; this
// path also serves what they leave to the generic loop (projection, packed batches, large H,
// wide batches).
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
// cuBLAS and cuBLASLt workspaces ATen keeps per (handle, stream); they are made before the
// capture, from ordinary memory rather than the graph's pool. A capture stream has its first
// caller's priority (graph kernels keep the priority they were captured with; the priority is
// in the key), and is reused by later entries, never destroyed. The copies in, the replay and
// the copies out are queued on the caller's current stream. A use from another stream first
// waits for the previous use (an event), since both would write the same buffers, and an
// entry is destroyed only once its queued work is done. A call made while the caller's
// stream is itself being captured (the user's own CUDA graph) is left to the eager loop:
// captures cannot nest.
//
// The key holds what the captured cuBLAS calls depend on besides the tensors: the float32
// matmul precision (TF32 or not, and the thread's NoTF32Guard), reduced-precision reductions
// and accumulation, the preferred BLAS backend. Under torch.use_deterministic_algorithms(True)
// calls run eagerly, so that cuBLAS's determinism checks still apply.
//
// The graph bakes in the addresses of those cuBLAS workspaces; torch can free them all
// (torch.compile's CUDA graph trees do), so a replay on the capturing thread first checks
// that they are still the same, and a graph whose workspaces went is dropped.
//
// A capture that fails (nothing in the generic loop should fail to capture, but memory can run
// out) is warned about once. If the capture itself ended cleanly, that signature runs eagerly
// from then on. If it did not end (an invalidated capture), some torch versions leave its
// allocations routed to its pool: that routing is ended and the pool given back here (the
// capture has a pool of its own for this), the graph object is kept rather than destroyed,
// and the graph loop runs eagerly for the rest of the process. A replay that fails (e.g. out
// of memory for the copies out) drops its entry, and its signature runs eagerly from then on.

// torch's CUDAEvent.h aligns a member to std::hardware_destructive_interference_size, about
// which GCC 12+ warns wherever the type is laid out (the value may differ between compilers);
// nothing of ours depends on it. Off for this whole file, since Entry holds a CUDAEvent.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic ignored "-Winterference-size"
#endif
#include <ATen/core/CachingHostAllocator.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <list>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
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
// Bytes of the cached copies of inputs and outputs, all entries together and per call. (Not
// counted: each graph's pool of temporaries, such as the backward's per-step gradients, and a
// cuBLAS workspace per capture stream; the caps bound the copies, the bulk of it.)
constexpr int64_t kMaxGraphBytes = int64_t{1} << 30;
constexpr int64_t kMaxCallBytes = int64_t{256} << 20;

using Key = std::vector<int64_t>;

// A capture stream: its device and priority (graph kernel nodes keep the priority of the stream
// they were captured on, so an entry's stream has its first caller's, which is in the key).
struct StreamKind {
  c10::DeviceIndex device;
  int priority;
  bool operator==(const StreamKind& o) const {
    return device == o.device && priority == o.priority;
  }
};

// Capture streams not in use by a live entry; created on demand, never destroyed.
std::mutex streams_mutex;
std::vector<std::pair<StreamKind, cudaStream_t>>& free_streams() {
  static auto* s = new std::vector<std::pair<StreamKind, cudaStream_t>>;
  return *s;
}

int priority_of(const at::cuda::CUDAStream& s) {
  int priority = 0;
  C10_CUDA_CHECK(cudaStreamGetPriority(s.stream(), &priority));
  return priority;
}

// A capture stream held by one entry for its lifetime.
struct StreamLease {
  explicit StreamLease(StreamKind k) : kind(k) {
    {
      const std::lock_guard<std::mutex> lock(streams_mutex);
      auto& pool = free_streams();
      for (auto it = pool.begin(); it != pool.end(); ++it) {
        if (it->first == k) {
          raw = it->second;
          pool.erase(it);
          return;
        }
      }
    }
    const c10::cuda::CUDAGuard guard(k.device);
    C10_CUDA_CHECK(cudaStreamCreateWithPriority(&raw, cudaStreamNonBlocking, k.priority));
  }
  ~StreamLease() {
    const std::lock_guard<std::mutex> lock(streams_mutex);
    free_streams().emplace_back(kind, raw);
  }
  StreamLease(const StreamLease&) = delete;
  StreamLease& operator=(const StreamLease&) = delete;

  at::cuda::CUDAStream stream() const {
    return at::cuda::getStreamFromExternal(raw, kind.device);
  }

  StreamKind kind;
  cudaStream_t raw = nullptr;
};

struct Entry {
  explicit Entry(StreamKind k) : lease(k) {}
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
  // The cuBLASLt workspace of (capturing thread's handle, capture stream) at capture; the
  // graph writes to it, and to the cuBLAS workspace made with it.
  void* workspace = nullptr;
  std::thread::id thread;
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
  std::set<Key> failed;                       // captures failed cleanly: served eagerly
  bool broken = false;                        // a capture failed uncleanly: no more captures
};

// Never destroyed: graphs and their pools must not be torn down after the CUDA runtime and the
// caching allocator at process exit.
Cache& cache() {
  static Cache* c = new Cache;
  return *c;
}

Key signature(bool forward, const std::vector<int64_t>& flags, const TensorList& inputs,
              int priority) {
  auto& ctx = at::globalContext();
  // What cuBLAS reads: the float32 matmul precision (read through float32Precision: the legacy
  // TF32 getters throw once the new fp32_precision API has been used, while this reflects
  // both; "none" and "ieee" behave alike), the thread's NoTF32Guard, the reduced-precision
  // reductions and accumulation, the backend.
  const auto fp32 = ctx.float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL);
  const int64_t fp32_mode = fp32 == at::Float32Precision::TF32   ? 1
                            : fp32 == at::Float32Precision::BF16 ? 2
                                                                 : 0;
  Key k{forward,
        priority,
        fp32_mode,
        at::NoTF32Guard::should_disable_tf32(),
        static_cast<int64_t>(ctx.allowFP16ReductionCuBLAS()),
        static_cast<int64_t>(ctx.allowBF16ReductionCuBLAS()),
        ctx.allowFP16AccumulationCuBLAS(),
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

// How a capture ended.
enum class Captured { kOk, kFailedCleanly, kFailedUncleanly };

// Captures `run` on copies of `inputs` into `e`, setting `why` when it failed. Throws only
// before the capture began (e.g. out of memory for the copies).
Captured capture(const std::shared_ptr<Entry>& e, const TensorList& inputs,
                 const std::function<TensorList(const TensorList&)>& run, std::string& why) {
  const auto caller = at::cuda::getCurrentCUDAStream();
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
  // A first replay from another stream must wait for the copies.
  e->done.record(caller);
  const auto side = e->lease.stream();
  const c10::cuda::CUDAStreamGuard on_side(side);
  // cuBLAS's and cuBLASLt's workspaces for this stream (ATen keeps one per handle and stream),
  // made now from ordinary memory rather than inside the capture from the graph's pool. The
  // graph bakes their addresses in: replay() checks that they are still the same.
  (void)at::cuda::getCurrentCUDABlasHandle();
  e->workspace = at::cuda::getCUDABlasLtWorkspace();
  e->thread = std::this_thread::get_id();
  e->graph = std::make_unique<at::cuda::CUDAGraph>();
  // An explicit pool, so that an unfinished capture's routing can be ended here (below).
  const auto pool = at::cuda::graph_pool_handle();
  bool began = false, ran = false;
  try {
    // Thread-local: other threads may go on using CUDA meanwhile.
    e->graph->capture_begin(pool, cudaStreamCaptureModeThreadLocal);
    began = true;
    e->out = run(e->in);  // e.g. out of memory: the capture itself stays valid
    ran = true;
  } catch (const std::exception& ex) {
    why = first_line(ex.what());
  }
  // capture_end after a capture_begin that threw only if the stream did start capturing
  // (torch 2.14's capture_end would otherwise unbalance its count of captures underway).
  bool capturing = began;
  if (!began) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(side.stream(), &status) == cudaSuccess) {
      capturing = status != cudaStreamCaptureStatusNone;
    } else {
      (void)cudaGetLastError();  // that query's own error, not the caller's
    }
  }
  bool end_ok = false;  // capture_end returned: the graph is instantiated
  if (capturing) {
    try {
      e->graph->capture_end();
      end_ok = true;
    } catch (const std::exception& ex) {
      if (ran) why = first_line(ex.what());
    }
  }
  // Whether torch's bookkeeping of the capture is complete: pool() refuses a graph whose
  // capture has not ended. It may have ended and still failed after that (capture_end throws
  // when instantiating the graph runs out of memory): a clean failure, nothing to replay.
  bool ended = false;
  try {
    (void)e->graph->pool();
    ended = true;
  } catch (const std::exception&) {
  }
  if (ran && ended && end_ok) return Captured::kOk;
  e->out.clear();
  if (ended) return Captured::kFailedCleanly;
  // Not ended: some torch versions check cudaStreamEndCapture before they stop routing the
  // capture's allocations to its pool. Stop it here (where torch already did, this throws and
  // is ignored), then give the pool back: the graph object, kept by the caller, never will.
  // Not under cudaMallocAsync, whose end of routing is process-wide, not per pool.
  const auto device = side.device_index();
  auto ignoring = [](const auto& f) {
    try {
      f();
    } catch (const std::exception&) {
    }
  };
  if (c10::cuda::CUDACachingAllocator::get()->name() != "cudaMallocAsync") {
    ignoring([&] { c10::cuda::CUDACachingAllocator::endAllocateToPool(device, pool); });
    ignoring([&] { c10::cuda::CUDACachingAllocator::releasePool(device, pool); });
  }
  ignoring([&] { at::getHostAllocator(at::kCUDA)->end_allocate_to_pool(pool); });
  ignoring([&] { at::getHostAllocator(at::kCUDA)->release_pool(pool); });
  return Captured::kFailedUncleanly;
}

// Whether the workspaces the graph writes are still the ones it was captured with. torch can
// free every stream's cuBLAS workspaces (torch._C._cuda_clearCublasWorkspaces(), which
// torch.compile's CUDA graph trees call); asking for them again makes new ones. Only the
// capturing thread can tell (the workspaces belong to its cuBLAS handle); other threads'
// replays are not checked.
bool workspaces_intact(const Entry& e) {
  if (std::this_thread::get_id() != e.thread) return true;
  try {
    const c10::cuda::CUDAStreamGuard on_side(e.lease.stream());
    const auto device = e.lease.kind.device;
    // Asking for them makes whichever is missing: a workspace made now (more memory in use
    // afterwards, or a new cuBLASLt address) means one had been freed. (A false alarm, from
    // another thread allocating meanwhile, only costs a capture.)
    const auto before =
        c10::cuda::CUDACachingAllocator::getDeviceStats(device).allocated_bytes[0].current;
    (void)at::cuda::getCurrentCUDABlasHandle();
    void* lt = at::cuda::getCUDABlasLtWorkspace();
    const auto after =
        c10::cuda::CUDACachingAllocator::getDeviceStats(device).allocated_bytes[0].current;
    return lt == e.workspace && after == before;
  } catch (const std::exception&) {  // e.g. out of memory for a new workspace
    return false;
  }
}

// Copies the inputs in, replays, returns copies of the outputs. May throw (e.g. out of memory
// for the copies out); `done` then still marks all that was queued, so that the entry is not
// destroyed under a replay in flight.
TensorList replay(Entry& e, const TensorList& inputs) {
  const std::lock_guard<std::mutex> lock(e.use);
  const auto stream = at::cuda::getCurrentCUDAStream();
  e.done.block(stream);  // the previous use, if it was queued on another stream
  struct RecordDone {
    Entry& e;
    const at::cuda::CUDAStream& stream;
    ~RecordDone() {
      try {
        e.done.record(stream);
      } catch (const std::exception&) {  // a CUDA error already on its way to the caller
      }
    }
  } record_done{e, stream};
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (inputs[i].defined()) e.in[i].copy_(inputs[i]);
  }
  e.graph->replay();
  TensorList out;
  out.reserve(e.out.size());
  for (const auto& t : e.out) out.push_back(t.defined() ? t.clone() : at::Tensor());
  return out;
}

// Takes `hit` out of the cache (unless another thread already did); `failed`: its signature
// runs eagerly from now on, else it may be captured again from its next call on.
void drop_entry(Cache& c, const std::shared_ptr<Entry>& hit, bool failed) {
  const std::lock_guard<std::mutex> lock(c.mutex);
  const auto it = std::find(c.entries.begin(), c.entries.end(), hit);
  if (it != c.entries.end()) {
    c.bytes -= hit->bytes;
    c.entries.erase(it);
  }
  if (failed) {
    c.failed.insert(hit->key);
  } else {
    c.seen_once.insert(hit->key);
  }
}

}  // namespace

std::optional<TensorList> run_graphed(bool forward, std::vector<int64_t> flags,
                                      const TensorList& inputs,
                                      const std::function<TensorList(const TensorList&)>& run) {
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    return std::nullopt;
  }
  // Deterministic mode: the eager loop, whose cuBLAS calls make the checks and alerts that a
  // replay would skip.
  if (at::globalContext().deterministicAlgorithms()) return std::nullopt;
  // As in the driver: the copies in and out are not part of any autograd graph.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto caller = at::cuda::getCurrentCUDAStream();
  const StreamKind kind{caller.device_index(), priority_of(caller)};
  Key key = signature(forward, flags, inputs, kind.priority);
  Cache& c = cache();
  std::shared_ptr<Entry> hit;
  bool capture_now = false;
  {
    const std::lock_guard<std::mutex> lock(c.mutex);
    if (c.broken || c.failed.count(key)) return std::nullopt;
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
  if (hit && !workspaces_intact(*hit)) {
    // Its cuBLAS scratch is gone: drop it (capturing again from the next call on).
    drop_entry(c, hit, /*failed=*/false);
    hit.reset();  // outside the lock: this may wait for its queued work
    return run(inputs);
  }
  if (hit) {
    try {
      TensorList out = replay(*hit, inputs);
      record_cuda_loop(forward, CudaLoop::kGraph);
      return out;
    } catch (const std::exception& ex) {
      // Not kept for the next call to fail the same way: the eager loop from now on (an
      // error that is not the graph's, say a sticky CUDA error, will fail it too).
      TORCH_WARN("handlstm: replaying a cached CUDA graph of the ",
                 forward ? "forward" : "backward", " failed, so this call signature runs "
                 "the eager generic loop from now on. Cause: ", first_line(ex.what()));
      drop_entry(c, hit, /*failed=*/true);
      hit.reset();
      return run(inputs);
    }
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
  Captured result;
  try {
    fresh = std::make_shared<Entry>(kind);  // makes a capture stream if none is free
    fresh->key = key;
    fresh->bytes = bytes;
    result = capture(fresh, inputs, run, why);
  } catch (const std::exception& ex) {  // before the capture began: nothing left behind
    TORCH_WARN("handlstm: preparing a CUDA graph of the ", forward ? "forward" : "backward",
               " failed; this call signature runs the eager generic loop until seen twice "
               "more. Cause: ", first_line(ex.what()));
    return out;
  }
  if (result == Captured::kFailedUncleanly) {
    // Kept, never destroyed: an unfinished capture may still be registered with the caching
    // allocator, pointing at this graph object.
    (void)fresh->graph.release();
  }
  std::vector<std::shared_ptr<Entry>> evicted;
  {
    const std::lock_guard<std::mutex> lock(c.mutex);
    if (result == Captured::kFailedUncleanly) {
      c.broken = true;
    } else if (result == Captured::kFailedCleanly) {
      c.failed.insert(key);
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
  fresh.reset();
  if (result != Captured::kOk) {
    TORCH_WARN("handlstm: capturing the ", forward ? "forward" : "backward",
               " in a CUDA graph failed, so ",
               result == Captured::kFailedCleanly
                   ? "this call signature runs the eager generic loop from now on"
                   : "the graph time loop runs the eager generic loop from now on in this "
                     "process (torch may keep some of the failed capture's memory; should "
                     "CUDA random-number ops fail after this, restart the process)",
               ". Cause: ", why.empty() ? std::string("unknown") : why);
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
    c.failed.clear();
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
