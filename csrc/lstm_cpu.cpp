// CPU backend: the fused pointwise hooks (cell_forward_cpu / cell_backward_cpu) and the
// backend entries registered for the CPU dispatch key. GEMMs run in the shared driver through
// ATen's BLAS.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/cell_cpu.h"
#include "lstm.h"

namespace handlstm {
namespace {

bool cpu_has_avx2() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// Rows per parallel chunk: ~4k gate elements (~10 us of SIMD work), enough to pay for a
// thread hand-off, small enough that the seed's 64 x 64 step splits across cores.
int64_t grain_rows(int64_t H) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, 4 * H)); }

template <typename scalar_t>
const scalar_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.const_data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
void cell_forward_cpu_typed(const CellForwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const cpu::ForwardRows<scalar_t> p{a.gates.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(a.c_prev),
                                     a.c0.const_data_ptr<scalar_t>(), a.c_out.data_ptr<scalar_t>(),
                                     a.m_out.data_ptr<scalar_t>(), a.c0.size(1), a.n_prev};
  at::parallel_for(0, a.n, grain_rows(p.H), [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (cpu_has_avx2()) return cpu::forward_rows_avx2(p, begin, end);
    }
    cpu::forward_rows<scalar_t, acc_t, cpu::NoVec>(p, begin, end);
  });
}

template <typename scalar_t>
void cell_backward_cpu_typed(const CellBackwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const cpu::BackwardRows<scalar_t> p{
      a.gates.const_data_ptr<scalar_t>(), a.c.const_data_ptr<scalar_t>(),
      ptr_or_null<scalar_t>(a.c_prev),    a.c0.const_data_ptr<scalar_t>(),
      a.dm.const_data_ptr<scalar_t>(),    ptr_or_null<scalar_t>(a.grad_out),
      a.dc.data_ptr<scalar_t>(),          a.dgates.data_ptr<scalar_t>(),
      a.c0.size(1),                       a.n_prev};
  at::parallel_for(0, a.n, grain_rows(p.H), [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (cpu_has_avx2()) return cpu::backward_rows_avx2(p, begin, end);
    }
    cpu::backward_rows<scalar_t, acc_t, cpu::NoVec>(p, begin, end);
  });
}

void cell_forward_cpu(const CellForwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.gates.scalar_type(),
                                  "cell_forward_cpu", [&] { cell_forward_cpu_typed<scalar_t>(a); });
}

void cell_backward_cpu(const CellBackwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.gates.scalar_type(),
                                  "cell_backward_cpu",
                                  [&] { cell_backward_cpu_typed<scalar_t>(a); });
}

constexpr CellKernels kCpuKernels{cell_forward_cpu, cell_backward_cpu};

void check_cpu(const at::Tensor& input) {
  TORCH_CHECK(input.device().is_cpu(), "handlstm: the CPU kernel got input on ", input.device());
}

ForwardResult lstm_forward_cpu(const at::Tensor& input, const at::Tensor& h0,
                               const at::Tensor& c0, const at::Tensor& weight_ih,
                               const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& weight_hr,
                               const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  check_cpu(input);
  return lstm_forward_impl(input, h0, c0, weight_ih, weight_hh, bias, weight_hr, batch_sizes,
                           reverse, kCpuKernels);
}

BackwardResult lstm_backward_cpu(
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& weight_hr, const at::Tensor& output,
    const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& proj_in,
    const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  check_cpu(input);
  return lstm_backward_impl(grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh,
                            weight_hr, output, gates, cells, proj_in, batch_sizes, reverse,
                            kCpuKernels);
}

}  // namespace

// Which pointwise path the CPU backend takes on this machine ("avx2" or "scalar").
const char* cpu_pointwise_path() { return cpu_has_avx2() ? "avx2" : "scalar"; }

TORCH_LIBRARY_IMPL(handlstm, CPU, m) {
  m.impl("lstm_forward", &lstm_forward_cpu);
  m.impl("lstm_backward", &lstm_backward_cpu);
}

}  // namespace handlstm
