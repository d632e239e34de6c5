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

namespace {
std::atomic<bool> persistent_flag{false};
std::atomic<bool> cooperative_only_flag{false};
std::atomic<int> last_loop[2] = {0, 0};  // backward, forward

const char* loop_name(CudaLoop loop) {
  switch (loop) {
    case CudaLoop::kGeneric: return "generic";
    case CudaLoop::kSingleBlock: return "single-block";
    case CudaLoop::kCooperative: return "cooperative";
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

bool cuda_persistent_enabled() { return persistent_flag.load(std::memory_order_relaxed); }
void set_cuda_persistent_enabled(bool enabled) { persistent_flag.store(enabled); }
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
  m.def("cuda_persistent_enabled", &handlstm::cuda_persistent_enabled,
        "Whether CUDA calls in scope take the persistent time loops (not yet run on a GPU).");
  m.def("_set_cuda_persistent_enabled", &handlstm::set_cuda_persistent_enabled,
        "Turn the persistent CUDA time loops on or off (no effect in a CPU-only build).");
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
      "(forward, backward) time loop of the latest CUDA call: 'generic', 'single-block', "
      "'cooperative', or 'none' before any.");
#ifdef HANDLSTM_WITH_CUDA
  m.def(
      "_cuda_cooperative_probe_ms",
      [](int64_t N, int64_t H, int64_t T, const std::string& dtype, bool barrier, bool matvec) {
        const at::ScalarType st = dtype == "float32"    ? at::kFloat
                                  : dtype == "float64"  ? at::kDouble
                                  : dtype == "bfloat16" ? at::kBFloat16
                                  : dtype == "float16"  ? at::kHalf
                                                        : at::ScalarType::Undefined;
        TORCH_CHECK(st != at::ScalarType::Undefined,
                    "_cuda_cooperative_probe_ms: dtype must be one of float32, float64, "
                    "bfloat16, float16, got '", dtype, "'");
        return handlstm::cooperative_probe_ms(N, H, T, st, barrier, matvec);
      },
      py::arg("N"), py::arg("H"), py::arg("T"), py::arg("dtype"), py::arg("barrier"),
      py::arg("matvec"),
      "Benchmark: milliseconds of T steps of the cooperative forward's grid barrier and/or "
      "on-chip matvec alone on the current CUDA device; negative if its grid cannot launch.");
#endif
}
