// Device-neutral driver of the fused LSTM: validation, allocation, the generic time loop (one
// call of the backend's fused pointwise hook per step) and every GEMM, each of which a
// backend's optional hooks may take over. See lstm.h for the contract and docs/derivation.md
// for the math ("Note [Backward through time]" below summarises it).
//
// Indices: tensors are addressed through ATen views (64-bit sizes and strides); the pointwise
// hooks use 64-bit offsets themselves, so no 32-bit limit applies anywhere in this op.
#include "lstm.h"

#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <sstream>
#include <string>

namespace handlstm {
namespace {

struct Dims {
  int64_t T, N, I, H, G, Hout;
  bool proj;
};

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream s;
  s << "(";
  for (size_t k = 0; k < sizes.size(); ++k) s << (k ? ", " : "") << sizes[k];
  s << (sizes.size() == 1 ? ",)" : ")");
  return s.str();
}

void check_rank(const char* op, const at::Tensor& t, const char* name, int64_t dim,
                const char* shape) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D with shape ", shape,
              ", got a ", t.dim(), "-D tensor of shape ", shape_str(t.sizes()));
}

// Where the symbols' values came from, for shape errors: the mistake may lie there instead (an
// input of the wrong size shows up as a weight of the wrong size).
std::string dims_note(const Dims& d, const at::Tensor& input) {
  std::ostringstream s;
  s << "T, N, I = " << d.T << ", " << d.N << ", " << d.I << " from input of shape "
    << shape_str(input.sizes()) << "; H = " << d.H << " from weight_ih's " << d.G
    << " rows; Hout = " << d.Hout << (d.proj ? " = P from weight_hr's rows" : " = H");
  return s.str();
}

void check_shape(const char* op, const at::Tensor& t, const char* name, const char* symbolic,
                 at::IntArrayRef expected, const Dims& d, const at::Tensor& input) {
  // (TORCH_CHECK builds its message only when the check fails.)
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", symbolic, " = ",
              shape_str(expected), ", got ", shape_str(t.sizes()), " (", dims_note(d, input),
              ")");
}

// Same dtype and device as `input`: the op never casts or moves a tensor behind the caller's
// back.
void check_like_input(const char* op, const at::Tensor& t, const char* name,
                      const at::Tensor& input) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", name,
              " must have the dtype of input (", input.scalar_type(), "), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " must be on input's device (",
              input.device(), "), got ", t.device());
}

const at::Tensor* opt(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? &*t : nullptr;
}

Dims check_args(const char* op, const at::Tensor& input, const at::Tensor& h0,
                const at::Tensor& c0, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                const at::Tensor* bias, const at::Tensor* weight_hr,
                const at::Tensor* batch_sizes) {
  TORCH_CHECK(input.defined(), op, ": input is undefined");
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              op, ": input must be float32, float64, float16 or bfloat16, got ", dt);
  check_rank(op, input, "input", 3, "(T, N, I)");
  struct Named {
    const at::Tensor* t;
    const char* name;
    int64_t dim;
    const char* shape;
  };
  const Named others[] = {{&h0, "h0", 2, "(N, Hout)"},
                          {&c0, "c0", 2, "(N, H)"},
                          {&weight_ih, "weight_ih", 2, "(4H, I)"},
                          {&weight_hh, "weight_hh", 2, "(4H, Hout)"},
                          {bias, "bias", 1, "(4H,)"},
                          {weight_hr, "weight_hr", 2, "(P, H)"}};
  for (const auto& a : others) {
    if (a.t == nullptr) continue;
    TORCH_CHECK(a.t->defined(), op, ": ", a.name, " is undefined");
    check_like_input(op, *a.t, a.name, input);
    check_rank(op, *a.t, a.name, a.dim, a.shape);
  }

  Dims d;
  d.T = input.size(0);
  d.N = input.size(1);
  d.I = input.size(2);
  d.G = weight_ih.size(0);
  TORCH_CHECK(d.G > 0 && d.G % 4 == 0, op,
              ": weight_ih must have 4H rows (a positive multiple of 4, gates i, f, g, o), got ",
              d.G);
  d.H = d.G / 4;
  d.proj = weight_hr != nullptr;
  d.Hout = d.proj ? weight_hr->size(0) : d.H;
  if (d.proj) {
    TORCH_CHECK(weight_hr->size(0) > 0, op, ": weight_hr must have P > 0 rows, got shape ",
                shape_str(weight_hr->sizes()));
    check_shape(op, *weight_hr, "weight_hr", "(P, H)", {d.Hout, d.H}, d, input);
  }
  check_shape(op, weight_ih, "weight_ih", "(4H, I)", {d.G, d.I}, d, input);
  check_shape(op, weight_hh, "weight_hh", "(4H, Hout)", {d.G, d.Hout}, d, input);
  if (bias) check_shape(op, *bias, "bias", "(4H,)", {d.G}, d, input);
  check_shape(op, h0, "h0", "(N, Hout)", {d.N, d.Hout}, d, input);
  check_shape(op, c0, "c0", "(N, H)", {d.N, d.H}, d, input);

  if (batch_sizes) {
    const auto& bs = *batch_sizes;
    TORCH_CHECK(bs.scalar_type() == at::kLong && bs.device().is_cpu() && bs.dim() == 1, op,
                ": batch_sizes must be a 1-D int64 CPU tensor, got a ", bs.dim(), "-D ",
                bs.scalar_type(), " tensor on ", bs.device());
    TORCH_CHECK(bs.size(0) == d.T, op, ": batch_sizes must have shape (T,) = (", d.T,
                ",), got ", shape_str(bs.sizes()));
    const auto bsc = bs.contiguous();
    const int64_t* v = bsc.data_ptr<int64_t>();
    for (int64_t t = 0; t < d.T; ++t) {
      TORCH_CHECK(v[t] >= 0 && v[t] <= d.N, op, ": batch_sizes[", t, "] = ", v[t],
                  " is outside [0, N] = [0, ", d.N, "]");
      TORCH_CHECK(t == 0 || v[t] <= v[t - 1], op,
                  ": batch_sizes must be non-increasing (sorted, as in a PackedSequence), got ",
                  v[t - 1], " then ", v[t], " at t = ", t);
    }
  }
  return d;
}

Schedule make_schedule(const Dims& d, const at::Tensor* batch_sizes, bool reverse) {
  Schedule sch{d.T, reverse, std::vector<int64_t>(d.T, d.N)};
  if (batch_sizes) {
    const auto bsc = batch_sizes->contiguous();
    std::copy_n(bsc.data_ptr<int64_t>(), d.T, sch.active.begin());
  }
  return sch;
}

at::Tensor rows(const at::Tensor& t, int64_t begin, int64_t end) {
  return t.narrow(0, begin, end - begin);
}

// The kernels address raw memory: every operand dense and row-major, starting on a 64-byte
// boundary (the CPU allocator's alignment; CUDA's is coarser). The alignment matters for
// reproducibility, not safety: BLAS kernels pick code paths by the operands' alignment and
// round differently on each (MKL on AMD EPYC gives other bits for an h0 that starts 4 bytes
// off), so without it a caller's view at an odd offset, such as the second layer's slice of
// nn.LSTM's stacked h0, would not give the numbers of a fresh copy of the same values.
at::Tensor dense(const at::Tensor& t) {
  if (t.is_contiguous() && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 64 == 0) return t;
  return t.clone(at::MemoryFormat::Contiguous);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
contiguous_operands(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                    const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                    const std::optional<at::Tensor>& weight_hr) {
  return {dense(input),     dense(h0),        dense(c0),
          dense(weight_ih), dense(weight_hh), opt(weight_hr) ? dense(*weight_hr) : at::Tensor()};
}

// Packed input leaves inactive positions untouched by the loop; they must read as zero.
at::Tensor alloc(bool packed, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return packed ? at::zeros(sizes, opts) : at::empty(sizes, opts);
}

// The generic time loops: ATen GEMMs on row slices and the backend's pointwise hook per step.
// Rows that continue the previous processed step read its output and c; rows that start at
// this step (reverse direction over packed input) read h0/c0.
void forward_steps_generic(const LoopArgs& a, const CellKernels& kernels) {
  const Schedule& sch = *a.sch;
  const auto w_hh_t = a.w_hh.t();
  int64_t t_prev = -1, n_prev = 0;
  for (int64_t s = 0; s < sch.T; ++s) {
    const int64_t t = sch.time(s);
    const int64_t n = sch.rows(s);
    const int64_t n_cont = std::min(n, n_prev);
    if (n > 0) {
      auto g_t = rows(a.gates[t], 0, n);
      if (n_cont > 0) rows(g_t, 0, n_cont).addmm_(rows(a.output[t_prev], 0, n_cont), w_hh_t);
      if (n > n_cont) rows(g_t, n_cont, n).addmm_(rows(a.h0, n_cont, n), w_hh_t);

      auto m_t = rows(a.proj ? a.proj_in[t] : a.output[t], 0, n);
      kernels.forward({g_t, t_prev >= 0 ? rows(a.cells[t_prev], 0, n_cont) : at::Tensor(),
                       a.c0, rows(a.cells[t], 0, n), m_t, n, n_cont});
      if (a.proj) {
        auto h_t = rows(a.output[t], 0, n);
        at::mm_out(h_t, m_t, a.w_hr.t());
      }
    }
    t_prev = t;
    n_prev = n;
  }
}

void backward_steps_generic(const LoopArgs& a, const CellKernels& kernels) {
  const Schedule& sch = *a.sch;
  for (int64_t s = sch.T - 1; s >= 0; --s) {
    const int64_t t = sch.time(s);
    const int64_t n = sch.rows(s);
    if (n == 0) continue;
    const int64_t t_prev = s > 0 ? sch.time(s - 1) : -1;
    const int64_t n_cont = s > 0 ? std::min(n, sch.rows(s - 1)) : 0;

    auto dh_n = rows(a.dh, 0, n);
    at::Tensor dm, go;
    if (a.proj) {
      if (a.grad_output.defined()) dh_n.add_(rows(a.grad_output[t], 0, n));
      rows(a.dhs[t], 0, n).copy_(dh_n);
      dm = rows(a.dm_buf, 0, n);
      at::mm_out(dm, dh_n, a.w_hr);
    } else {
      dm = dh_n;
      if (a.grad_output.defined()) go = rows(a.grad_output[t], 0, n);
    }
    auto dg_t = rows(a.dgates[t], 0, n);
    kernels.backward({rows(a.gates[t], 0, n), rows(a.cells[t], 0, n),
                      t_prev >= 0 ? rows(a.cells[t_prev], 0, n_cont) : at::Tensor(), a.c0, dm,
                      go, rows(a.dc, 0, n), dg_t, n, n_cont});
    at::mm_out(dh_n, dg_t, a.w_hh);
  }
}

// Products whose row-major result has fewer columns than this run transposed on the CPU.
// Column-major BLAS (MKL, OpenBLAS) lays its vector lanes along the columns of our row-major
// result; with I = 12 columns most lanes idle. MKL on AMD EPYC (1 thread, T*N = 3,968,
// G = 256) took 2.1x as long for dW_ih and 1.5x for dx with I = 12 (6x and 4x with I = 4) as
// for the transposed products; at I = 24 the two were even and from I = 32 on the plain
// product was faster. CUDA keeps the plain product (cuBLAS tiles both dimensions).
constexpr int64_t kFewColumns = 24;

bool few_columns(const at::Tensor& like, int64_t cols) {
  return like.is_cpu() && cols < kFewColumns;
}

// a (M, K) @ b (K, Nc), contiguous, through the transposed product when Nc is small.
at::Tensor mm_rowmajor(const at::Tensor& a, const at::Tensor& b) {
  if (few_columns(a, b.size(1)) && a.size(0) > b.size(1)) {
    return at::mm(b.t(), a.t()).t().contiguous();
  }
  return at::mm(a, b);
}

// Rows of the (T*N)-long reductions behind the weight gradients summed by one GEMM call in
// float32. One GEMM over all T*N rows adds every term into one float32 result: MKL on AMD
// EPYC lost 1.2e-5 (relative to the largest entry) on dW_ih at T*N = 131,072 and I = 4, an
// error that grows like sqrt(T*N). Float32 GEMMs over blocks of this many rows, their results
// summed in float64, lose about 1e-6 there; below one block nothing changes. Float64 has
// precision to spare, and float16/bfloat16 GEMMs accumulate in float over the whole sum
// already, where partial results rounded to the half type would only lose more. The blocks
// and their order depend on the shapes alone, so results stay deterministic.
constexpr int64_t kGradRowsPerGemm = 4096;

// a^T b for a (K, M) and b (K, Nc): the reduction over K of one block of rows, by the
// backend's own kernel where it has one (transposed when b has few columns, as in
// mm_rowmajor), else by ATen.
at::Tensor at_b(const at::Tensor& a, const at::Tensor& b, const CellKernels& kernels) {
  if (kernels.at_b) {
    const bool swap = few_columns(b, b.size(1)) && a.size(1) > b.size(1);
    auto r = swap ? kernels.at_b(b, a) : kernels.at_b(a, b);
    if (r.defined()) return swap ? r.t().contiguous() : r;
  }
  return mm_rowmajor(a.t(), b);
}

// out (M, Ncol) += a^T b over the rows of a (K, M) and b (K, Ncol), in a's dtype. An undefined
// out counts as zeros: its first contribution becomes it, with no zero fill and no addition
// (0 + x is x), which for a short call were most of the weight gradients' time.
void add_at_b(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
              const CellKernels& kernels) {
  const int64_t K = a.size(0);
  const auto dtype = a.scalar_type();
  if (dtype != at::kFloat || K <= kGradRowsPerGemm) {
    if (few_columns(b, b.size(1)) || kernels.at_b) {
      auto r = at_b(a, b, kernels);
      if (!out.defined()) {
        out = r.scalar_type() == dtype ? r : r.to(dtype);  // (float16's comes in float32)
      } else {
        out.add_(r);
      }
    } else if (!out.defined()) {
      out = at::mm(a.t(), b);
    } else {
      out.addmm_(a.t(), b);
    }
    return;
  }
  auto sum = out.defined() ? out.to(at::kDouble)
                          : at::zeros({a.size(1), b.size(1)}, a.options().dtype(at::kDouble));
  for (int64_t k0 = 0; k0 < K; k0 += kGradRowsPerGemm) {
    const int64_t k = std::min(kGradRowsPerGemm, K - k0);
    sum.add_(at_b(a.narrow(0, k0, k), b.narrow(0, k0, k), kernels));
  }
  if (out.defined()) {
    out.copy_(sum);
  } else {
    out = sum.to(dtype);
  }
}

}  // namespace

ForwardResult lstm_forward_impl(const at::Tensor& input_, const at::Tensor& h0_,
                                const at::Tensor& c0_, const at::Tensor& weight_ih_,
                                const at::Tensor& weight_hh_,
                                const std::optional<at::Tensor>& bias_,
                                const std::optional<at::Tensor>& weight_hr_,
                                const std::optional<at::Tensor>& batch_sizes_, bool reverse,
                                const CellKernels& kernels) {
  const char* op = "handlstm.lstm_forward";
  // The op is a leaf for autograd (LSTMFunction differentiates it): its internal views and
  // GEMMs need no autograd bookkeeping, which otherwise dominates the per-step cost.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Dims d = check_args(op, input_, h0_, c0_, weight_ih_, weight_hh_, opt(bias_),
                            opt(weight_hr_), opt(batch_sizes_));
  const bool packed = opt(batch_sizes_) != nullptr;
  const Schedule sch = make_schedule(d, opt(batch_sizes_), reverse);

  const auto [x, h0, c0, w_ih, w_hh, w_hr] =
      contiguous_operands(input_, h0_, c0_, weight_ih_, weight_hh_, weight_hr_);

  const auto opts = x.options();
  auto gates = alloc(packed, {d.T, d.N, d.G}, opts);
  auto output = alloc(packed, {d.T, d.N, d.Hout}, opts);
  auto cells = alloc(packed, {d.T, d.N, d.H}, opts);
  auto proj_in = d.proj ? alloc(packed, {d.T, d.N, d.H}, opts) : at::empty({0}, opts);

  // Phase 1: the input projection of all T steps as one GEMM, bias folded in.
  if (d.T * d.N > 0) {
    auto gates2d = gates.view({d.T * d.N, d.G});
    const auto x2d = x.view({d.T * d.N, d.I});
    const auto bias = opt(bias_) ? dense(*bias_) : at::Tensor();
    if (!(kernels.mm && kernels.mm(gates2d, x2d, w_ih.t(), bias.defined() ? &bias : nullptr))) {
      if (bias.defined()) {
        at::addmm_out(gates2d, bias, x2d, w_ih.t());
      } else {
        at::mm_out(gates2d, x2d, w_ih.t());
      }
    }
  }

  // Phase 2: the time loop, the backend's own when it has one.
  const LoopArgs la{&sch, d.N, d.H, d.Hout, d.proj, gates, cells, output, proj_in, h0, c0,
                    w_hh, w_hr};
  if (!(kernels.forward_loop && kernels.forward_loop(la))) forward_steps_generic(la, kernels);

  // Phase 3: final states. A row's final state is at the last processed step where it was
  // active; rows never active keep h0/c0.
  auto h_n = h0.clone();
  auto c_n = c0.clone();
  int64_t covered = 0;
  for (int64_t s = d.T - 1; s >= 0 && covered < d.N; --s) {
    const int64_t n = sch.rows(s);
    if (n > covered) {
      const int64_t t = sch.time(s);
      rows(h_n, covered, n).copy_(rows(output[t], covered, n));
      rows(c_n, covered, n).copy_(rows(cells[t], covered, n));
      covered = n;
    }
  }

  // The gate slab holds x W_ih^T + b at inactive positions; clear it so every output of the
  // op is fully defined.
  if (packed) {
    for (int64_t t = 0; t < d.T; ++t) {
      if (sch.active[t] < d.N) rows(gates[t], sch.active[t], d.N).zero_();
    }
  }
  return {output, h_n, c_n, gates, cells, proj_in};
}

// Note [Backward through time]
// Walking the forward's processing order backwards, each step
//   1. adds dL/doutput_t to the running dh of its active rows,
//   2. maps dh through the projection (dm = dh W_hr) when projecting,
//   3. runs the fused pointwise backward: dp (pre-activation grads) and dc_{t-1} = dc_total * f,
//   4. computes dh_{t-1} = dp W_hh for the active rows (one GEMM).
// Inactive rows carry dh and dc unchanged, exactly as their state was carried forward. After
// the loop, dx is one GEMM over all steps, dW_ih, dW_hh and dW_hr GEMMs over all steps in
// blocks of rows (add_at_b) and the bias gradient a sum over (T, N): no atomics anywhere, so
// results are bitwise reproducible.
BackwardResult lstm_backward_impl(
    const std::optional<at::Tensor>& grad_output_, const std::optional<at::Tensor>& grad_h_n_,
    const std::optional<at::Tensor>& grad_c_n_, const at::Tensor& input_, const at::Tensor& h0_,
    const at::Tensor& c0_, const at::Tensor& weight_ih_, const at::Tensor& weight_hh_,
    const std::optional<at::Tensor>& weight_hr_, const at::Tensor& output_,
    const at::Tensor& gates_, const at::Tensor& cells_, const at::Tensor& proj_in_,
    const std::optional<at::Tensor>& batch_sizes_, bool reverse, GradMask mask,
    const CellKernels& kernels) {
  const char* op = "handlstm.lstm_backward";
  // The op is a leaf for autograd (LSTMFunction differentiates it): its internal views and
  // GEMMs need no autograd bookkeeping, which otherwise dominates the per-step cost.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Dims d = check_args(op, input_, h0_, c0_, weight_ih_, weight_hh_, nullptr,
                            opt(weight_hr_), opt(batch_sizes_));
  const bool packed = opt(batch_sizes_) != nullptr;
  const Schedule sch = make_schedule(d, opt(batch_sizes_), reverse);

  struct Saved {
    const at::Tensor* t;
    const char* name;
    const char* symbolic;
    std::vector<int64_t> shape;
  };
  const Saved saved[] = {{&output_, "output", "(T, N, Hout)", {d.T, d.N, d.Hout}},
                         {&gates_, "gates", "(T, N, 4H)", {d.T, d.N, d.G}},
                         {&cells_, "cells", "(T, N, H)", {d.T, d.N, d.H}},
                         {&proj_in_, "proj_in", "(T, N, H) or (0,)",
                          d.proj ? std::vector<int64_t>{d.T, d.N, d.H} : std::vector<int64_t>{0}},
                         {opt(grad_output_), "grad_output", "(T, N, Hout)", {d.T, d.N, d.Hout}},
                         {opt(grad_h_n_), "grad_h_n", "(N, Hout)", {d.N, d.Hout}},
                         {opt(grad_c_n_), "grad_c_n", "(N, H)", {d.N, d.H}}};
  for (const auto& a : saved) {
    if (a.t == nullptr) continue;
    check_like_input(op, *a.t, a.name, input_);
    check_shape(op, *a.t, a.name, a.symbolic, a.shape, d, input_);
  }

  const auto [x, h0, c0, w_ih, w_hh, w_hr] =
      contiguous_operands(input_, h0_, c0_, weight_ih_, weight_hh_, weight_hr_);
  const auto output = dense(output_);
  const auto gates = dense(gates_);
  const auto cells = dense(cells_);
  const auto proj_in = dense(proj_in_);
  const auto gout = opt(grad_output_) ? dense(*grad_output_) : at::Tensor();

  const auto opts = x.options();
  auto dh = opt(grad_h_n_) ? grad_h_n_->contiguous().clone() : at::zeros({d.N, d.Hout}, opts);
  auto dc = opt(grad_c_n_) ? grad_c_n_->contiguous().clone() : at::zeros({d.N, d.H}, opts);
  auto dgates = alloc(packed, {d.T, d.N, d.G}, opts);
  auto dm_buf = d.proj ? at::empty({d.N, d.H}, opts) : at::Tensor();
  auto dhs = d.proj ? alloc(packed, {d.T, d.N, d.Hout}, opts) : at::Tensor();

  const LoopArgs la{&sch, d.N, d.H, d.Hout, d.proj, gates, cells, output, proj_in, h0, c0,
                    w_hh, w_hr, gout, dh, dc, dgates, dhs, dm_buf};
  if (!(kernels.backward_loop && kernels.backward_loop(la))) backward_steps_generic(la, kernels);

  // Input, weight and bias gradients as GEMMs over all steps (blocks of rows, see add_at_b)
  // and one reduction; an unrequested one is not computed and comes back as (0,).
  const auto none = [&] { return at::empty({0}, opts); };
  const auto dg2d = dgates.view({d.T * d.N, d.G});
  auto grad_input = none();
  if (mask[0]) {
    auto gi2d = at::empty({d.T * d.N, d.I}, opts);
    if (!(kernels.mm && kernels.mm(gi2d, dg2d, w_ih, nullptr))) gi2d = mm_rowmajor(dg2d, w_ih);
    grad_input = gi2d.view({d.T, d.N, d.I});
  }
  // The weight gradients start undefined (zeros to add_at_b) and are zeros if nothing adds in.
  const auto or_zeros = [&](at::Tensor& g, int64_t rows_, int64_t cols) {
    if (!g.defined()) g = at::zeros({rows_, cols}, opts);
  };
  auto grad_w_ih = mask[1] ? at::Tensor() : none();
  if (mask[1]) {
    add_at_b(grad_w_ih, dg2d, x.view({d.T * d.N, d.I}), kernels);
    or_zeros(grad_w_ih, d.G, d.I);
  }
  auto grad_bias = mask[3] ? dgates.sum(at::IntArrayRef{0, 1}) : none();

  // dW_hh = sum_t dp_t^T h_{t-1}. h_{t-1} is the previous processed step's output, except for
  // the first step and for rows that start mid-sequence, which read h0.
  auto grad_w_hh = mask[2] ? at::Tensor() : none();
  if (mask[2]) {
    if (d.T > 1) {
      const auto later = reverse ? dgates.narrow(0, 0, d.T - 1) : dgates.narrow(0, 1, d.T - 1);
      const auto earlier = reverse ? output.narrow(0, 1, d.T - 1) : output.narrow(0, 0, d.T - 1);
      add_at_b(grad_w_hh, later.reshape({-1, d.G}), earlier.reshape({-1, d.Hout}), kernels);
    }
    for (int64_t s = 0; s < d.T; ++s) {
      const int64_t n = sch.rows(s);
      const int64_t n_cont = s > 0 ? std::min(n, sch.rows(s - 1)) : 0;
      if (n > n_cont) {
        add_at_b(grad_w_hh, rows(dgates[sch.time(s)], n_cont, n), rows(h0, n_cont, n), kernels);
      }
    }
    or_zeros(grad_w_hh, d.G, d.Hout);
  }
  auto grad_w_hr = d.proj && mask[4] ? at::Tensor() : none();
  if (d.proj && mask[4]) {
    add_at_b(grad_w_hr, dhs.view({d.T * d.N, d.Hout}), proj_in.view({d.T * d.N, d.H}),
             kernels);
    or_zeros(grad_w_hr, d.Hout, d.H);
  }
  return {grad_input, dh, dc, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

}  // namespace handlstm
