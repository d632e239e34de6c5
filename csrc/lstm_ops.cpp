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
std::atomic<bool>& persistent_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}
}  // namespace

bool cuda_persistent_enabled() { return persistent_flag().load(std::memory_order_relaxed); }
void set_cuda_persistent_enabled(bool enabled) { persistent_flag().store(enabled); }
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
}
