// Op schemas (declared once, here) and the Python module of the extension.
//
// Backends register implementations in their own files: lstm_cpu.cpp (CPU) and, when the
// extension is built with CUDA, lstm_cuda.cu (CUDA). Python adds fake (meta) kernels and the
// autograd formula in handlstm_cuda/_ops.py.
#include <torch/extension.h>
#include <torch/library.h>

#include <atomic>

#include "lstm.h"

namespace handlstm {
const char* cpu_pointwise_path();
void set_cpu_pointwise_path(const std::string& name);
at::Tensor cpu_convert_for_tests(const at::Tensor& src, at::ScalarType dtype);
bool cpu_bf16_dot_products();

namespace {
std::atomic<bool> cooperative_only_flag{false};
std::atomic<int> last_loop[2] = {0, 0};  // backward, forward

const char* loop_name(CudaLoop loop) {
  switch (loop) {
    case CudaLoop::kGeneric: return "generic";
    case CudaLoop::kSingleBlock: return "single-block";
    case CudaLoop::kCooperative: return "cooperative";
    case CudaLoop::kGraph: return "graph";
    default: return "none";
  }
}
}  // namespace

void record_cuda_loop(bool forward, CudaLoop loop) {
  last_loop[forward].store(static_cast<int>(loop), std::memory_order_relaxed);
}
CudaLoop last_cuda_loop(bool forward) {
  return static_cast<CudaLoop>(last_loop[forward].load(std::memory_order_relaxed));
}

bool cuda_persistent_cooperative_only() {
  return cooperative_only_flag.load(std::memory_order_relaxed);
}
void set_cuda_persistent_cooperative_only(bool only) { cooperative_only_flag.store(only); }
}  // namespace handlstm

TORCH_LIBRARY(handlstm, m) {
  // Returns (output (T, N, Hout), h_n (N, Hout), c_n (N, H), gates (T, N, 4H) activated,
  // cells (T, N, H), proj_in (T, N, H) when projecting else (0,)). The last three are what the
  // backward needs.
  m.def(
      "lstm_forward(Tensor input, Tensor h0, Tensor c0, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias, Tensor? weight_hr, Tensor? batch_sizes, bool reverse) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Returns (grad_input, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, grad_bias (4H,),
  // grad_weight_hr (P, H) when projecting else (0,)). output_mask says which of grad_input,
  // grad_weight_ih, grad_weight_hh, grad_bias and grad_weight_hr to compute; the others come
  // back as (0,).
  m.def(
      "lstm_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor input, "
      "Tensor h0, Tensor c0, Tensor weight_ih, Tensor weight_hh, Tensor? weight_hr, "
      "Tensor output, Tensor gates, Tensor cells, Tensor proj_in, Tensor? batch_sizes, "
      "bool reverse, bool[5] output_mask=[True, True, True, True, True]) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace {
// A floating dtype from its torch name ("float32", ...), or an error naming the function.
at::ScalarType scalar_type_named(const std::string& name, const char* fn) {
  if (name == "float32") return at::kFloat;
  if (name == "float64") return at::kDouble;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  TORCH_CHECK(false, fn, ": dtype must be one of float32, float64, bfloat16, float16, got '",
              name, "'");
  return at::ScalarType::Undefined;  // not reached
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "handlstm_cuda native kernels; the ops live in torch.ops.handlstm";
  m.def(
      "has_cuda_kernels",
      [] {
#ifdef HANDLSTM_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether this build registered CUDA kernels.");
  m.def("cpu_pointwise_path", [] { return std::string(handlstm::cpu_pointwise_path()); },
        "The CPU pointwise path in use: 'avx512', 'avx2' or 'scalar' (chosen at load time).");
  m.def("_set_cpu_pointwise_path", &handlstm::set_cpu_pointwise_path,
        "Use a narrower CPU pointwise path (tests run every path the CPU has).");
  m.def("_cpu_bf16_dot", &handlstm::cpu_bf16_dot_products,
        "Whether bfloat16 CPU calls multiply bfloat16 pairs in their step GEMMs (AVX-512 BF16 "
        "and the AVX-512 path active).");
  m.def("_cpu_convert", &handlstm::cpu_convert_for_tests,
        "Float32 to bfloat16/float16 or back by the CPU half-type loop's conversions on the "
        "active path (tests).");
  m.def("_cuda_loop_mode", [] { return static_cast<int>(handlstm::cuda_loop_mode()); },
        "Which time loop CUDA calls take: 0 generic, 1 persistent, 2 auto (by crossovers), "
        "3 graph (the generic loop replayed from a CUDA graph).");
  m.def(
      "_set_cuda_loop_mode",
      [](int mode) {
        TORCH_CHECK(mode >= 0 && mode <= 3,
                    "_set_cuda_loop_mode: mode must be 0 (generic), 1 (persistent), 2 (auto) or "
                    "3 (graph), got ", mode);
        handlstm::set_cuda_loop_mode(static_cast<handlstm::CudaLoopMode>(mode));
      },
      "Set the CUDA time loop mode (see _cuda_loop_mode; no effect in a CPU-only build).");
  m.def(
      "_set_cuda_crossovers",
      [](std::string device,
         const std::vector<
             std::tuple<std::string, bool, int64_t, int64_t, int64_t, bool, bool>>& points) {
        std::vector<handlstm::Crossover> table;
        for (const auto& [dtype, forward, N, H, T, persistent, graph] : points) {
          TORCH_CHECK(!(persistent && graph), "_set_cuda_crossovers: point ", table.size(),
                      ": persistent_wins and graph_wins cannot both be true");
          const auto winner = persistent ? handlstm::CudaLoopMode::kPersistent
                              : graph    ? handlstm::CudaLoopMode::kGraph
                                         : handlstm::CudaLoopMode::kGeneric;
          table.push_back({scalar_type_named(dtype, "_set_cuda_crossovers"), forward, N, H, T,
                           winner});
        }
        handlstm::set_cuda_crossovers(std::move(device), std::move(table));
      },
      "Replace the crossover table: the GPU model's name and (dtype, forward, N, H, T, "
      "persistent_wins, graph_wins) per measured point.");
  m.def("_cuda_crossover_count", &handlstm::cuda_crossover_count,
        "Points in the crossover table.");
  m.def(
      "_cuda_crossover_choice",
      [](const std::string& device, const std::string& dtype, bool forward, int64_t N, int64_t H,
         int64_t T) {
        const at::ScalarType st = scalar_type_named(dtype, "_cuda_crossover_choice");
        switch (handlstm::crossover_choice(device, st, forward, N, H, T)) {
          case handlstm::CudaLoopMode::kPersistent: return std::string("persistent");
          case handlstm::CudaLoopMode::kGraph: return std::string("graph");
          default: return std::string("generic");
        }
      },
      "The loop the auto mode would prefer for such a call on that GPU: 'persistent', 'graph' "
      "or 'generic'.");
  m.def("_cuda_persistent_cooperative_only", &handlstm::cuda_persistent_cooperative_only,
        "Whether the persistent loops try the multi-block cooperative design first.");
  m.def("_set_cuda_persistent_cooperative_only",
        &handlstm::set_cuda_persistent_cooperative_only,
        "Tests: run the cooperative design wherever it can, even where one block would do.");
  m.def(
      "_cuda_last_loops",
      [] {
        return std::make_pair(
            std::string(handlstm::loop_name(handlstm::last_cuda_loop(true))),
            std::string(handlstm::loop_name(handlstm::last_cuda_loop(false))));
      },
      "(forward, backward) time loop of the latest call on the fused CUDA kernels: 'generic', "
      "'single-block', 'cooperative', 'graph' (replayed from a cached CUDA graph), or 'none' "
      "before any.");
  m.def(
      "_clear_cuda_graphs",
      [] {
#ifdef HANDLSTM_WITH_CUDA
        handlstm::clear_cuda_graphs();
#endif
      },
      "Drop the graph mode's cached CUDA graphs and their buffers.");
  m.def(
      "_cuda_graph_cache",
      []() -> std::pair<size_t, size_t> {
#ifdef HANDLSTM_WITH_CUDA
        return {handlstm::cuda_graph_count(), handlstm::cuda_graph_capacity()};
#else
        return {0, 0};
#endif
      },
      "(signatures the graph mode holds a CUDA graph for, the most it keeps: past that the "
      "least recently used is dropped).");
#ifdef HANDLSTM_WITH_CUDA
  m.def(
      "_cuda_cooperative_probe_ms",
      [](int64_t N, int64_t H, int64_t T, const std::string& dtype, bool barrier, bool matvec) {
        const at::ScalarType st = scalar_type_named(dtype, "_cuda_cooperative_probe_ms");
        return handlstm::cooperative_probe_ms(N, H, T, st, barrier, matvec);
      },
      py::arg("N"), py::arg("H"), py::arg("T"), py::arg("dtype"), py::arg("barrier"),
      py::arg("matvec"),
      "Benchmark: milliseconds of T steps of the cooperative forward's grid barrier and/or "
      "on-chip matvec alone on the current CUDA device; negative if its grid cannot launch.");
#endif
}
