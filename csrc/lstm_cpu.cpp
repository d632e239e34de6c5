// CPU backend: the fused pointwise hooks (cell_forward_cpu / cell_backward_cpu) and the
// backend entries registered for the CPU dispatch key. GEMMs run in the shared driver through
// ATen's BLAS.
#include <ATen/OpMathType.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <limits>
#include <type_traits>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/cell_cpu.h"
#include "lstm.h"

namespace handlstm {
namespace {

// The widest SIMD path this CPU runs; tests may pick a narrower one (set_cpu_pointwise_path).
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detect_isa() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

std::atomic<Isa>& active_isa() {
  static std::atomic<Isa> isa{detect_isa()};
  return isa;
}

template <typename T>
void forward_rows_best(const cpu::ForwardRows<T>& p, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    switch (active_isa().load(std::memory_order_relaxed)) {
      case Isa::kAvx512: return cpu::forward_rows_avx512(p, begin, end);
      case Isa::kAvx2: return cpu::forward_rows_avx2(p, begin, end);
      case Isa::kScalar: break;
    }
  }
  cpu::forward_rows<T, at::opmath_type<T>, cpu::NoVec>(p, begin, end);
}

template <typename T>
void backward_rows_best(const cpu::BackwardRows<T>& p, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    switch (active_isa().load(std::memory_order_relaxed)) {
      case Isa::kAvx512: return cpu::backward_rows_avx512(p, begin, end);
      case Isa::kAvx2: return cpu::backward_rows_avx2(p, begin, end);
      case Isa::kScalar: break;
    }
  }
  cpu::backward_rows<T, at::opmath_type<T>, cpu::NoVec>(p, begin, end);
}

// Rows per parallel chunk of a step's pointwise pass (the per-step hooks below, which serve
// what the CPU time loop leaves to the generic loop, and the single row block of the time
// loop): ~4k gate elements per chunk, enough work to pay for a thread hand-off.
int64_t grain_rows(int64_t H) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, 4 * H)); }

template <typename scalar_t>
void cell_forward_cpu_typed(const CellForwardArgs& a) {
  const cpu::ForwardRows<scalar_t> p{a.gates.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(a.c_prev),
                                     a.c0.const_data_ptr<scalar_t>(), a.c_out.data_ptr<scalar_t>(),
                                     a.m_out.data_ptr<scalar_t>(), a.c0.size(1), a.n_prev};
  at::parallel_for(0, a.n, grain_rows(p.H), [&](int64_t begin, int64_t end) {
    forward_rows_best<scalar_t>(p, begin, end);
  });
}

template <typename scalar_t>
void cell_backward_cpu_typed(const CellBackwardArgs& a) {
  const cpu::BackwardRows<scalar_t> p{
      a.gates.const_data_ptr<scalar_t>(), a.c.const_data_ptr<scalar_t>(),
      ptr_or_null<scalar_t>(a.c_prev),    a.c0.const_data_ptr<scalar_t>(),
      a.dm.const_data_ptr<scalar_t>(),    ptr_or_null<scalar_t>(a.grad_out),
      a.dc.data_ptr<scalar_t>(),          a.dgates.data_ptr<scalar_t>(),
      a.c0.size(1),                       a.n_prev};
  at::parallel_for(0, a.n, grain_rows(p.H), [&](int64_t begin, int64_t end) {
    backward_rows_best<scalar_t>(p, begin, end);
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

// ---- The CPU time loops -------------------------------------------------------------------
//
// Batch rows never interact in an LSTM, so the CPU can split the rows into blocks and run the
// whole time loop of each block on its own thread with no synchronisation per step; every
// block runs with raw pointers and the BLAS that libtorch links, so no ATen dispatch per step.
// Blocks form only for large batches (kMinBlockRows); otherwise there is one block whose
// GEMMs BLAS threads itself and whose pointwise passes spread over the threads (inside a block
// of several, at::parallel_for runs them inline). Results do not depend on the block boundaries except
// through the BLAS kernel chosen for a block's row count, which can round differently.

// The BLAS that libtorch links (MKL on x86 wheels, OpenBLAS elsewhere) exports the Fortran
// GEMMs. They are declared weak so that the extension still loads on a torch without them;
// the loops then leave the work to the driver's generic ATen loop. (MKL's packed GEMM was
// tried for the recurrent weight and measured slower here at the seed's sizes.)
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

bool have_blas() { return sgemm_ != nullptr && dgemm_ != nullptr; }

// Row-major C (M x Nc) = A (M x K) * op(B) + beta * C, where op(B) = B^T for B stored (Nc x K)
// (trans_b) or B for B stored (K x Nc). Expressed as the column-major product C^T = op(B)^T A^T.
template <typename T>
void gemm_rowmajor(bool trans_b, int64_t M, int64_t Nc, int64_t K, const T* A, int64_t lda,
                   const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || Nc == 0) return;
  const char ta = trans_b ? 'T' : 'N', tb = 'N';
  const int m = int(Nc), n = int(M), k = int(K), la = int(ldb), lb = int(lda), lc = int(ldc);
  const T one = 1;
  if (K == 0) {  // BLAS leaves C untouched for k = 0 only when beta = 1
    for (int64_t r = 0; r < M; ++r)
      for (int64_t j = 0; j < Nc; ++j) C[r * ldc + j] = beta == T(0) ? T(0) : beta * C[r * ldc + j];
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&ta, &tb, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
  } else {
    dgemm_(&ta, &tb, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
  }
}

// Rows of a block active at processing step s, and how many of them continue step s - 1.
struct BlockStep {
  int64_t n;       // active rows of the block, a prefix [r0, r0 + n)
  int64_t n_cont;  // of those, rows that were active at the previous processed step
};

BlockStep block_step(const Schedule& sch, int64_t s, int64_t r0, int64_t len) {
  auto local = [&](int64_t rows) { return std::clamp<int64_t>(rows - r0, 0, len); };
  const int64_t n = local(sch.rows(s));
  return {n, s > 0 ? std::min(n, local(sch.rows(s - 1))) : 0};
}

// The int32 BLAS interface bounds every dimension and leading dimension.
bool blas_sizes_ok(const LoopArgs& a) {
  const int64_t big = std::max({a.N, 4 * a.H, a.Hout});
  return big < std::numeric_limits<int>::max();
}

template <typename T>
void forward_block(const LoopArgs& a, int64_t r0, int64_t r1) {
  const Schedule& sch = *a.sch;
  const int64_t N = a.N, H = a.H, G = 4 * H, Hout = a.Hout;
  T* gates = a.gates.data_ptr<T>();
  T* cells = a.cells.data_ptr<T>();
  T* out = a.output.data_ptr<T>();
  T* m = a.proj ? a.proj_in.data_ptr<T>() : out;
  const T* h0 = a.h0.const_data_ptr<T>();
  const T* w_hh = a.w_hh.const_data_ptr<T>();
  const T* w_hr = a.proj ? a.w_hr.const_data_ptr<T>() : nullptr;
  int64_t t_prev = -1;
  for (int64_t s = 0; s < sch.T; t_prev = sch.time(s), ++s) {
    const int64_t t = sch.time(s);
    const auto [n, n_cont] = block_step(sch, s, r0, r1 - r0);
    if (n == 0) continue;
    T* g_t = gates + (t * N + r0) * G;
    if (n_cont > 0) {
      gemm_rowmajor<T>(true, n_cont, G, Hout, out + (t_prev * N + r0) * Hout, Hout, w_hh, Hout,
                       T(1), g_t, G);
    }
    gemm_rowmajor<T>(true, n - n_cont, G, Hout, h0 + (r0 + n_cont) * Hout, Hout, w_hh, Hout,
                     T(1), g_t + n_cont * G, G);

    const cpu::ForwardRows<T> p{gates + t * N * G,
                                t_prev >= 0 ? cells + t_prev * N * H : nullptr,
                                a.c0.const_data_ptr<T>(), cells + t * N * H,
                                m + t * N * H, H, r0 + n_cont};
    at::parallel_for(r0, r0 + n, grain_rows(H),
                     [&](int64_t b, int64_t e) { forward_rows_best<T>(p, b, e); });
    if (a.proj) {
      gemm_rowmajor<T>(true, n, Hout, H, m + (t * N + r0) * H, H, w_hr, H, T(0),
                       out + (t * N + r0) * Hout, Hout);
    }
  }
}

template <typename T>
void backward_block(const LoopArgs& a, int64_t r0, int64_t r1) {
  const Schedule& sch = *a.sch;
  const int64_t N = a.N, H = a.H, G = 4 * H, Hout = a.Hout;
  const T* gates = a.gates.const_data_ptr<T>();
  const T* cells = a.cells.const_data_ptr<T>();
  const T* gout = a.grad_output.defined() ? a.grad_output.const_data_ptr<T>() : nullptr;
  const T* w_hh = a.w_hh.const_data_ptr<T>();
  const T* w_hr = a.proj ? a.w_hr.const_data_ptr<T>() : nullptr;
  T* dh = a.dh.data_ptr<T>();
  T* dc = a.dc.data_ptr<T>();
  T* dgates = a.dgates.data_ptr<T>();
  T* dhs = a.proj ? a.dhs.data_ptr<T>() : nullptr;
  T* dm = a.proj ? a.dm_buf.data_ptr<T>() : dh;
  for (int64_t s = sch.T - 1; s >= 0; --s) {
    const int64_t t = sch.time(s);
    const int64_t t_prev = s > 0 ? sch.time(s - 1) : -1;
    const auto [n, n_cont] = block_step(sch, s, r0, r1 - r0);
    if (n == 0) continue;
    const T* go_t = nullptr;
    if (a.proj) {
      // dh_t (total) = recurrent part + output gradient; dW_hr needs it, dm = dh_t W_hr.
      T* dh_rows = dh + r0 * Hout;
      T* dhs_rows = dhs + (t * N + r0) * Hout;
      for (int64_t k = 0; k < n * Hout; ++k) {
        if (gout) dh_rows[k] += gout[(t * N + r0) * Hout + k];
        dhs_rows[k] = dh_rows[k];
      }
      gemm_rowmajor<T>(false, n, H, Hout, dh_rows, Hout, w_hr, H, T(0), dm + r0 * H, H);
    } else if (gout) {
      go_t = gout + t * N * H;
    }
    const cpu::BackwardRows<T> p{gates + t * N * G, cells + t * N * H,
                                 t_prev >= 0 ? cells + t_prev * N * H : nullptr,
                                 a.c0.const_data_ptr<T>(), dm, go_t, dc, dgates + t * N * G, H,
                                 r0 + n_cont};
    at::parallel_for(r0, r0 + n, grain_rows(H),
                     [&](int64_t b, int64_t e) { backward_rows_best<T>(p, b, e); });
    gemm_rowmajor<T>(false, n, Hout, G, dgates + (t * N + r0) * G, G, w_hh, Hout, T(0),
                     dh + r0 * Hout, Hout);
  }
}

// Rows per block: at least this many. Smaller blocks make each step's GEMM less efficient
// than letting BLAS thread one GEMM over all rows: on the project's 2-core machines 32-row
// blocks were 20% slower than one block at N = 64, and blocks gave no gain up to N = 1024.
constexpr int64_t kMinBlockRows = 256;

template <void (*Block32)(const LoopArgs&, int64_t, int64_t),
          void (*Block64)(const LoopArgs&, int64_t, int64_t)>
bool run_blocks(const LoopArgs& a) {
  const auto dt = a.gates.scalar_type();
  if ((dt != at::kFloat && dt != at::kDouble) || !have_blas() || !blas_sizes_ok(a)) return false;
  const int64_t blocks = std::clamp<int64_t>(a.N / kMinBlockRows, 1, at::get_num_threads());
  const int64_t per = (a.N + blocks - 1) / blocks;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * per, r1 = std::min(a.N, r0 + per);
      if (r0 < r1) (dt == at::kFloat ? Block32 : Block64)(a, r0, r1);
    }
  });
  return true;
}

bool forward_loop_cpu(const LoopArgs& a) {
  return run_blocks<forward_block<float>, forward_block<double>>(a);
}

bool backward_loop_cpu(const LoopArgs& a) {
  return run_blocks<backward_block<float>, backward_block<double>>(a);
}

constexpr CellKernels kCpuKernels{cell_forward_cpu, cell_backward_cpu, forward_loop_cpu,
                                  backward_loop_cpu};

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
    const std::optional<at::Tensor>& batch_sizes, bool reverse, GradMask mask) {
  check_cpu(input);
  return lstm_backward_impl(grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh,
                            weight_hr, output, gates, cells, proj_in, batch_sizes, reverse, mask,
                            kCpuKernels);
}

}  // namespace

// Which pointwise path the CPU backend takes: "avx512", "avx2" or "scalar".
const char* cpu_pointwise_path() {
  static const char* names[] = {"scalar", "avx2", "avx512"};
  return names[static_cast<int>(active_isa().load())];
}

// Picks a pointwise path no wider than the CPU supports (for tests of every path).
void set_cpu_pointwise_path(const std::string& name) {
  const Isa want = name == "avx512" ? Isa::kAvx512 : name == "avx2" ? Isa::kAvx2 : Isa::kScalar;
  TORCH_CHECK(name == "avx512" || name == "avx2" || name == "scalar",
              "set_cpu_pointwise_path: expected 'avx512', 'avx2' or 'scalar', got '", name, "'");
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(detect_isa()),
              "set_cpu_pointwise_path: this CPU cannot run '", name, "'");
  active_isa().store(want);
}

TORCH_LIBRARY_IMPL(handlstm, CPU, m) {
  m.impl("lstm_forward", &lstm_forward_cpu);
  m.impl("lstm_backward", &lstm_backward_cpu);
}

}  // namespace handlstm
