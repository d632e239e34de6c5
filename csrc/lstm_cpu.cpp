// CPU backend: the fused pointwise hooks (cell_forward_cpu / cell_backward_cpu), the CPU's own
// time loops (row blocks on threads) and GEMM hooks (float32 on cpu/gemm_cpu.h's kernels,
// else BLAS), and the backend entries registered for the CPU dispatch key.
#include <ATen/OpMathType.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/cell_cpu.h"
#include "cpu/gemm_cpu.h"
#include "cpu/gemm_cpu_bf16.h"
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
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
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
// Batch rows never interact in an LSTM, so the CPU splits the rows into blocks, one per thread
// (at least kMinBlockRows rows each), and runs the whole time loop of each block on its own
// thread with no synchronisation per step, on raw pointers: no ATen dispatch per step. A batch
// too small for two blocks runs as one block whose step GEMMs and pointwise passes split their
// columns and rows among the threads (inside a block of several, at::parallel_for runs them
// inline). Float32 on an AVX2/AVX-512 CPU multiplies by weights packed once per call
// (cpu/gemm_cpu.h), whose sums do not depend on the blocks; otherwise the loop calls the BLAS
// that libtorch links, whose kernel choice for a block's row count can round differently.

// The BLAS that libtorch links (MKL on x86 wheels, OpenBLAS elsewhere) exports the Fortran
// GEMMs. They are declared weak so that the extension still loads on a torch without them;
// the loops then leave the work to the driver's generic ATen loop.
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

// ---- The packed float32 GEMMs (cpu/gemm_cpu.h) ----------------------------------------

// The float32 GEMM kernels of one ISA unit and its vector lanes.
struct GemmKernels {
  int64_t lanes;
  decltype(&cpu::gemm_packed_avx2) packed;
  decltype(&cpu::gemm_at_b_avx2) at_b;
};

// Those of the active ISA, or null on a CPU without AVX2 (the callers then use BLAS).
const GemmKernels* gemm_kernels() {
  static constexpr GemmKernels avx512{cpu::kLanesAvx512, cpu::gemm_packed_avx512,
                                      cpu::gemm_at_b_avx512};
  static constexpr GemmKernels avx2{cpu::kLanesAvx2, cpu::gemm_packed_avx2, cpu::gemm_at_b_avx2};
  switch (active_isa().load(std::memory_order_relaxed)) {
    case Isa::kAvx512: return &avx512;
    case Isa::kAvx2: return &avx2;
    case Isa::kScalar: break;
  }
  return nullptr;
}

// A weight packed for the active ISA's kernel: B (K x Nc) in column panels.
struct PackedB {
  at::Tensor panels;  // float32, cpu::packed_size(K, Nc, lanes) elements
  int64_t K = 0, Nc = 0, lanes = 0;
  decltype(&cpu::gemm_packed_avx2) kernel = nullptr;

  int64_t panel_count() const {
    const int64_t NR = cpu::panel_width(Nc, lanes);
    return (Nc + NR - 1) / NR;
  }
};

// Rows of A below which mm_cpu leaves a product to BLAS: a weight element costs about as much
// to pack (a fresh buffer's page faults included) as 50 to 100 of its multiply-adds. The step
// weights are packed from far fewer rows (kMinPackedStepRows): at N = 1 each step is a
// matrix-vector product, for which MKL's generic kernels took twice as long as the packed loop
// including its packing, over 100 steps.
constexpr int64_t kMinPackedRows = 256;

// Packs b (K x Nc, any strides, float32) for the active ISA; kernel stays null on a CPU without
// AVX2 (the callers then use BLAS).
PackedB pack_b(const at::Tensor& b) {
  PackedB pb;
  const GemmKernels* gk = gemm_kernels();
  if (gk == nullptr) return pb;
  pb.K = b.size(0);
  pb.Nc = b.size(1);
  pb.lanes = gk->lanes;
  pb.kernel = gk->packed;
  pb.panels = at::empty({cpu::packed_size(pb.K, pb.Nc, pb.lanes)}, b.options());
  const float* src = b.const_data_ptr<float>();
  float* dst = pb.panels.mutable_data_ptr<float>();
  const int64_t NR = cpu::panel_width(pb.Nc, pb.lanes);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, pb.K * NR));
  at::parallel_for(0, pb.panel_count(), grain, [&](int64_t p0, int64_t p1) {
    cpu::pack_panels(src, b.stride(0), b.stride(1), pb.K, pb.Nc, pb.lanes, dst, p0, p1);
  });
  return pb;
}

// Runs kernel(m0, m1, p0, p1) over rows [0, M) and column panels [0, panels) of a product of
// M x K by K x Nc. Outside a row block the work is split among the threads, one contiguous
// range each: of rows when every thread gets two chunks of 8 rows at least, else of column
// panels. Below 128k multiply-adds in all a thread hand-off costs more than it saves; inside a
// block (or with one thread) it is one call.
template <typename Kernel>
void split_packed(int64_t M, int64_t K, int64_t Nc, int64_t panels, const Kernel& kernel) {
  if (M == 0) return;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (threads == 1 || M * K * Nc < 2 * 65536) return kernel(0, M, 0, panels);
  constexpr int64_t kTile = 8;
  const int64_t tiles = (M + kTile - 1) / kTile;
  if (tiles >= 2 * threads || panels == 1) {
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      kernel(t0 * kTile, std::min(M, t1 * kTile), 0, panels);
    });
  } else {
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) { kernel(0, M, p0, p1); });
  }
}

// C (M x Nc, row stride ldc) = (accumulate ? C : 0) + A (M x K, row stride lda) B.
void run_packed(const PackedB& pb, int64_t M, const float* A, int64_t lda, float* C,
                int64_t ldc, bool accumulate) {
  const float* bp = pb.panels.const_data_ptr<float>();
  split_packed(M, pb.K, pb.Nc, pb.panel_count(),
               [&](int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
                 pb.kernel(m0, m1, p0, p1, pb.Nc, pb.K, A, lda, bp, C, ldc, accumulate);
               });
}

// ---- The bfloat16 step GEMM (cpu/gemm_cpu_bf16.cpp) -----------------------------------------

// Whether this CPU multiplies bfloat16 pairs (AVX-512 BF16) and the AVX-512 path is active
// (tests narrow the path; the narrower paths never use it).
bool cpu_has_bf16_dot() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has && active_isa().load(std::memory_order_relaxed) == Isa::kAvx512;
#else
  return false;
#endif
}

// A bfloat16 weight B (K x Nc) packed for cpu::gemm_packed_bf16; K = 0 when unused.
struct PackedBf16 {
  at::Tensor panels;  // int16 holding bfloat16 bits, cpu::packed_size_bf16(K, Nc) elements
  int64_t K = 0, Nc = 0;
};

// Packs b (K x Nc, any strides, bfloat16).
PackedBf16 pack_b_bf16(const at::Tensor& b) {
  PackedBf16 pb{at::empty({cpu::packed_size_bf16(b.size(0), b.size(1))},
                          b.options().dtype(at::kShort)),
                b.size(0), b.size(1)};
  const auto* src = reinterpret_cast<const uint16_t*>(b.const_data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(pb.panels.mutable_data_ptr<int16_t>());
  const int64_t panels = (pb.Nc + cpu::kBf16PanelWidth - 1) / cpu::kBf16PanelWidth;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    cpu::pack_panels_bf16(src, b.stride(0), b.stride(1), pb.K, pb.Nc, dst, p0, p1);
  });
  return pb;
}

// C (M x Nc, float32, row stride ldc) = (accumulate ? C : 0) + A B for bfloat16 rows A (row
// stride lda, each padded to an even length with a zero).
void run_packed_bf16(const PackedBf16& pb, int64_t M, const at::BFloat16* A, int64_t lda,
                     float* C, int64_t ldc, bool accumulate) {
  const auto* bp = reinterpret_cast<const uint16_t*>(pb.panels.const_data_ptr<int16_t>());
  const auto* a = reinterpret_cast<const uint16_t*>(A);
  split_packed(M, pb.K, pb.Nc, (pb.Nc + cpu::kBf16PanelWidth - 1) / cpu::kBf16PanelWidth,
               [&](int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
                 cpu::gemm_packed_bf16(m0, m1, p0, p1, pb.Nc, pb.K, a, lda, bp, C, ldc,
                                       accumulate);
               });
}

// One weight of the time loop and how a step multiplies by it: C (M x Nc) = (accumulate ? C :
// 0) + A (M x K) op(W), with op(W) = W^T for W stored (Nc x K) (trans) or W stored (K x Nc).
// Float32 on an AVX2 or AVX-512 CPU runs the packed kernels on op(W) packed once per call;
// everything else calls BLAS with W itself.
template <typename T>
struct StepWeight {
  at::Tensor owner;  // holds w (a float32 copy of a half-type weight lives only here)
  const T* w;
  int64_t ld;
  bool trans;
  int64_t K, Nc;
  PackedB packed;  // kernel null: the BLAS route

  void operator()(int64_t M, const T* A, int64_t lda, T* C, int64_t ldc, bool accumulate) const {
    if (M == 0) return;
    if constexpr (std::is_same_v<T, float>) {
      if (packed.kernel != nullptr) return run_packed(packed, M, A, lda, C, ldc, accumulate);
    }
    gemm_rowmajor<T>(trans, M, Nc, K, A, lda, w, ld, accumulate ? T(1) : T(0), C, ldc);
  }
};

// Rows through a loop's step GEMMs in all (every step's active rows) below which its weights
// are not packed: each step then calls BLAS on the weight as it is. Packing costs about as
// much as 50 to 100 rows of multiply-adds (see kMinPackedRows), and BLAS's one-row products
// take about twice as long per row as the packed kernel, so packing pays from a few tens of
// rows (T = 100 at N = 1 packs), not for a step or two of a few rows: for an LSTMCell step
// (one row) packing W_hh was most of the call.
constexpr int64_t kMinPackedStepRows = 64;

int64_t step_rows(const Schedule& sch) {
  int64_t rows = 0;
  for (const int64_t n : sch.active) rows += n;
  return rows;
}

// The step weight for w (Nc x K when trans, else K x Nc, contiguous, of type T), packed when
// `pack` and the CPU runs a packed kernel for T.
template <typename T>
StepWeight<T> step_weight(const at::Tensor& w, bool trans, bool pack) {
  StepWeight<T> sw{w, w.const_data_ptr<T>(), w.size(1), trans,
                   trans ? w.size(1) : w.size(0), trans ? w.size(0) : w.size(1), {}};
  if constexpr (std::is_same_v<T, float>) {
    if (pack) sw.packed = pack_b(trans ? w.t() : w);
  }
  return sw;
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

// The weights one direction of the loop multiplies by: the forward by W_hh^T and W_hr^T,
// the backward by W_hh and W_hr.
template <typename T>
struct LoopWeights {
  StepWeight<T> hh, hr;
  PackedBf16 hh16;  // bfloat16 calls on an AVX-512 BF16 CPU: op(W_hh) for the dot products
};

// The weights as T (converted from the op's dtype when that differs: float32 steps of a
// half-type call).
template <typename T>
LoopWeights<T> loop_weights(const LoopArgs& a, bool forward) {
  const auto as_t = [](const at::Tensor& w) { return w.to(c10::CppTypeToScalarType<T>::value); };
  LoopWeights<T> lw{};
  const bool pack = step_rows(*a.sch) >= kMinPackedStepRows;
  if (a.w_hh.scalar_type() == at::kBFloat16 && cpu_has_bf16_dot()) {
    lw.hh16 = pack_b_bf16(forward ? a.w_hh.t() : a.w_hh);  // lw.hh stays unused
  } else {
    lw.hh = step_weight<T>(as_t(a.w_hh), forward, pack);
  }
  if (a.proj) lw.hr = step_weight<T>(as_t(a.w_hr), forward, pack);
  return lw;
}

template <typename T>
void forward_block(const LoopArgs& a, const LoopWeights<T>& lw, int64_t r0, int64_t r1) {
  const Schedule& sch = *a.sch;
  const int64_t N = a.N, H = a.H, G = 4 * H, Hout = a.Hout;
  T* gates = a.gates.data_ptr<T>();
  T* cells = a.cells.data_ptr<T>();
  T* out = a.output.data_ptr<T>();
  T* m = a.proj ? a.proj_in.data_ptr<T>() : out;
  const T* h0 = a.h0.const_data_ptr<T>();
  int64_t t_prev = -1;
  for (int64_t s = 0; s < sch.T; t_prev = sch.time(s), ++s) {
    const int64_t t = sch.time(s);
    const auto [n, n_cont] = block_step(sch, s, r0, r1 - r0);
    if (n == 0) continue;
    T* g_t = gates + (t * N + r0) * G;
    if (n_cont > 0) lw.hh(n_cont, out + (t_prev * N + r0) * Hout, Hout, g_t, G, true);
    lw.hh(n - n_cont, h0 + (r0 + n_cont) * Hout, Hout, g_t + n_cont * G, G, true);

    const cpu::ForwardRows<T> p{gates + t * N * G,
                                t_prev >= 0 ? cells + t_prev * N * H : nullptr,
                                a.c0.const_data_ptr<T>(), cells + t * N * H,
                                m + t * N * H, H, r0 + n_cont};
    at::parallel_for(r0, r0 + n, grain_rows(H),
                     [&](int64_t b, int64_t e) { forward_rows_best<T>(p, b, e); });
    if (a.proj) lw.hr(n, m + (t * N + r0) * H, H, out + (t * N + r0) * Hout, Hout, false);
  }
}

template <typename T>
void backward_block(const LoopArgs& a, const LoopWeights<T>& lw, int64_t r0, int64_t r1) {
  const Schedule& sch = *a.sch;
  const int64_t N = a.N, H = a.H, G = 4 * H, Hout = a.Hout;
  const T* gates = a.gates.const_data_ptr<T>();
  const T* cells = a.cells.const_data_ptr<T>();
  const T* gout = a.grad_output.defined() ? a.grad_output.const_data_ptr<T>() : nullptr;
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
      lw.hr(n, dh_rows, Hout, dm + r0 * H, H, false);
    } else if (gout) {
      go_t = gout + t * N * H;
    }
    const cpu::BackwardRows<T> p{gates + t * N * G, cells + t * N * H,
                                 t_prev >= 0 ? cells + t_prev * N * H : nullptr,
                                 a.c0.const_data_ptr<T>(), dm, go_t, dc, dgates + t * N * G, H,
                                 r0 + n_cont};
    at::parallel_for(r0, r0 + n, grain_rows(H),
                     [&](int64_t b, int64_t e) { backward_rows_best<T>(p, b, e); });
    lw.hh(n, dgates + (t * N + r0) * G, G, dh + r0 * Hout, Hout, false);
  }
}

// ---- The half-type blocks (bfloat16, float16) ----------------------------------------------
//
// Storage stays in the op's dtype: the gate slab (the input projection in, the activated gates
// out), cells, output, proj_in, dgates and dhs, which the driver's GEMMs and the backward read.
// Each block runs its steps in float32 scratch instead: the step GEMMs on float32 copies of
// W_hh (and W_hr), packed like the float32 loop's; the pointwise passes on the float32 SIMD
// paths; the carried state (h and c forward, dh and dc backward) kept in float32 from one step
// to the next and rounded to the dtype only where it is stored. So a half-type call runs at
// the float32 loop's speed instead of several ATen calls per step, and it rounds less than
// those did: neither a step GEMM's sum nor a carried state is rounded before it is used. The
// backward reads the saved (rounded) gates and cells, as every path of the op does. One
// exception: on a CPU with AVX-512 BF16, bfloat16's W_hh GEMMs multiply bfloat16 pairs
// (cpu/gemm_cpu_bf16.cpp, twice float32's rate), reading h, and in the backward the gate
// gradients, rounded to bfloat16 as they are stored.

// dst[k] = float(src[k]) / dst[k] = T(src[k]) (round to nearest even), k < count: the SIMD
// units' conversions where the CPU runs them, else c10's.
template <typename T>
void to_float(const T* src, float* dst, int64_t count) {
  switch (active_isa().load(std::memory_order_relaxed)) {
    case Isa::kAvx512: return cpu::to_float_avx512(src, dst, count);
    case Isa::kAvx2: return cpu::to_float_avx2(src, dst, count);
    case Isa::kScalar: break;
  }
  for (int64_t k = 0; k < count; ++k) dst[k] = static_cast<float>(src[k]);
}
template <typename T>
void from_float(const float* src, T* dst, int64_t count) {
  switch (active_isa().load(std::memory_order_relaxed)) {
    case Isa::kAvx512: return cpu::from_float_avx512(src, dst, count);
    case Isa::kAvx2: return cpu::from_float_avx2(src, dst, count);
    case Isa::kScalar: break;
  }
  for (int64_t k = 0; k < count; ++k) dst[k] = static_cast<T>(src[k]);
}

// Float32 scratch of one block: consecutive (rows x width) slices handed out in order.
class Scratch {
 public:
  explicit Scratch(int64_t floats) : buf_(static_cast<size_t>(floats)) {}
  float* take(int64_t rows, int64_t width) {
    float* p = buf_.data() + used_;
    used_ += rows * width;
    return p;
  }

 private:
  std::vector<float> buf_;
  int64_t used_ = 0;
};

template <typename T>
void forward_block_half(const LoopArgs& a, const LoopWeights<float>& lw, int64_t r0,
                        int64_t r1) {
  const Schedule& sch = *a.sch;
  const int64_t N = a.N, H = a.H, G = 4 * H, Hout = a.Hout, R = r1 - r0;
  T* gates = a.gates.data_ptr<T>();
  T* cells = a.cells.data_ptr<T>();
  T* out = a.output.data_ptr<T>();
  T* m_store = a.proj ? a.proj_in.data_ptr<T>() : out;

  // With bfloat16 dot products (lw.hh16), the step GEMM reads h and h0 as bfloat16 rows of
  // Kp values (Hout, padded to even with a zero): h rounded as the output stores it.
  const bool dot16 = lw.hh16.K > 0;
  const int64_t Kp = Hout + Hout % 2;
  Scratch sc(R * (G + 3 * H + (a.proj ? 2 : 1) * Hout + (dot16 ? Kp : 0)));
  float* g = sc.take(R, G);        // this step's gate rows
  float* c = sc.take(R, H);        // c of each row's latest step (the carry), written in place
  float* c0 = sc.take(R, H);
  float* m = sc.take(R, H);        // o * tanh(c)
  float* h0 = sc.take(R, Hout);
  float* h = a.proj ? sc.take(R, Hout) : m;  // h of each row's latest step (the carry)
  // Two bfloat16 (R x Kp) in the floats of one (R x Kp) slice; zeroed, so the pads stay zero.
  auto* hb = dot16 ? reinterpret_cast<at::BFloat16*>(sc.take(R, Kp)) : nullptr;
  at::BFloat16* h0b = dot16 ? hb + R * Kp : nullptr;
  const auto rows_to_bf16 = [&](const float* src, at::BFloat16* dst, int64_t rows) {
    for (int64_t r = 0; r < rows; ++r) from_float(src + r * Hout, dst + r * Kp, Hout);
  };
  to_float(a.c0.const_data_ptr<T>() + r0 * H, c0, R * H);
  to_float(a.h0.const_data_ptr<T>() + r0 * Hout, h0, R * Hout);
  if (dot16) rows_to_bf16(h0, h0b, R);

  for (int64_t s = 0; s < sch.T; ++s) {
    const int64_t t = sch.time(s);
    const auto [n, n_cont] = block_step(sch, s, r0, R);
    if (n == 0) continue;
    const int64_t row0 = t * N + r0;
    to_float(gates + row0 * G, g, n * G);
    // Rows [0, n_cont) continue from h; the GEMM reads all of h before the pointwise pass
    // overwrites m (which is h without projection).
    if (dot16) {
      rows_to_bf16(h, hb, n_cont);
      run_packed_bf16(lw.hh16, n_cont, hb, Kp, g, G, true);
      run_packed_bf16(lw.hh16, n - n_cont, h0b + n_cont * Kp, Kp, g + n_cont * G, G, true);
    } else {
      if (n_cont > 0) lw.hh(n_cont, h, Hout, g, G, true);
      lw.hh(n - n_cont, h0 + n_cont * Hout, Hout, g + n_cont * G, G, true);
    }

    const cpu::ForwardRows<float> p{g, c, c0, c, m, H, n_cont};
    at::parallel_for(0, n, grain_rows(H),
                     [&](int64_t b, int64_t e) { forward_rows_best<float>(p, b, e); });
    from_float(g, gates + row0 * G, n * G);
    from_float(c, cells + row0 * H, n * H);
    from_float(m, m_store + row0 * H, n * H);
    if (a.proj) {
      lw.hr(n, m, H, h, Hout, false);
      from_float(h, out + row0 * Hout, n * Hout);
    }
  }
}

template <typename T>
void backward_block_half(const LoopArgs& a, const LoopWeights<float>& lw, int64_t r0,
                         int64_t r1) {
  const Schedule& sch = *a.sch;
  const int64_t N = a.N, H = a.H, G = 4 * H, Hout = a.Hout, R = r1 - r0;
  const T* gates = a.gates.const_data_ptr<T>();
  const T* cells = a.cells.const_data_ptr<T>();
  const T* gout = a.grad_output.defined() ? a.grad_output.const_data_ptr<T>() : nullptr;
  T* dgates = a.dgates.data_ptr<T>();
  T* dhs = a.proj ? a.dhs.data_ptr<T>() : nullptr;

  Scratch sc(R * (2 * G + 5 * H + 2 * Hout));
  float* g = sc.take(R, G);      // this step's activated gates
  float* dg = sc.take(R, G);     // this step's pre-activation gradients
  float* c = sc.take(R, H);      // c_t
  float* cp = sc.take(R, H);     // c_{t-1} of the rows that continue a step
  float* c0 = sc.take(R, H);
  float* dc = sc.take(R, H);     // carry: dL/dc
  float* dm = sc.take(R, H);     // with projection: dh W_hr
  float* dh = sc.take(R, Hout);  // carry: dL/dh (recurrent part)
  float* go = sc.take(R, Hout);  // this step's dL/doutput
  to_float(a.c0.const_data_ptr<T>() + r0 * H, c0, R * H);
  to_float(a.dc.const_data_ptr<T>() + r0 * H, dc, R * H);
  to_float(a.dh.const_data_ptr<T>() + r0 * Hout, dh, R * Hout);

  for (int64_t s = sch.T - 1; s >= 0; --s) {
    const int64_t t = sch.time(s);
    const int64_t t_prev = s > 0 ? sch.time(s - 1) : -1;
    const auto [n, n_cont] = block_step(sch, s, r0, R);
    if (n == 0) continue;
    const int64_t row0 = t * N + r0;
    to_float(gates + row0 * G, g, n * G);
    to_float(cells + row0 * H, c, n * H);
    if (n_cont > 0) to_float(cells + (t_prev * N + r0) * H, cp, n_cont * H);
    if (gout) to_float(gout + row0 * Hout, go, n * Hout);
    const float* dm_t = dh;
    const float* go_t = gout ? go : nullptr;
    if (a.proj) {
      // dh_t (total) = recurrent part + output gradient; dW_hr needs it, dm = dh_t W_hr.
      if (gout) {
        for (int64_t k = 0; k < n * Hout; ++k) dh[k] += go[k];
      }
      from_float(dh, dhs + row0 * Hout, n * Hout);
      lw.hr(n, dh, Hout, dm, H, false);
      dm_t = dm;
      go_t = nullptr;
    }
    const cpu::BackwardRows<float> p{g, c, cp, c0, dm_t, go_t, dc, dg, H, n_cont};
    at::parallel_for(0, n, grain_rows(H),
                     [&](int64_t b, int64_t e) { backward_rows_best<float>(p, b, e); });
    from_float(dg, dgates + row0 * G, n * G);
    if (lw.hh16.K > 0) {
      // bfloat16 dot products read the stored (rounded) gradients, as the weight gradients do.
      run_packed_bf16(lw.hh16, n, reinterpret_cast<const at::BFloat16*>(dgates + row0 * G), G,
                      dh, Hout, false);
    } else {
      lw.hh(n, dg, G, dh, Hout, false);
    }
  }
  // The carries end as the gradients of h0 and c0 (rows never active keep what came in).
  from_float(dh, a.dh.data_ptr<T>() + r0 * Hout, R * Hout);
  from_float(dc, a.dc.data_ptr<T>() + r0 * H, R * H);
}

// Rows per block: at least this many, so that each step's GEMM keeps its row tiles full. With
// two threads at the seed's sizes (N = 64, H = 64), two blocks of 32 rows beat one block whose
// GEMMs and pointwise passes are split among the threads at every step by 8-15% (packed
// kernels); with BLAS the two were even.
constexpr int64_t kMinBlockRows = 16;

// T is the op's dtype; float32 and float64 step in it, the half types in float32 (above).
template <typename T, bool kForward>
void run_blocks_typed(const LoopArgs& a) {
  constexpr bool kHalfType = std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>;
  using StepT = std::conditional_t<kHalfType, float, T>;
  const LoopWeights<StepT> lw = loop_weights<StepT>(a, kForward);
  const int64_t blocks = std::clamp<int64_t>(a.N / kMinBlockRows, 1, at::get_num_threads());
  const int64_t per = (a.N + blocks - 1) / blocks;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * per, r1 = std::min(a.N, r0 + per);
      if (r0 >= r1) continue;
      if constexpr (kHalfType && kForward) {
        forward_block_half<T>(a, lw, r0, r1);
      } else if constexpr (kHalfType) {
        backward_block_half<T>(a, lw, r0, r1);
      } else if constexpr (kForward) {
        forward_block<T>(a, lw, r0, r1);
      } else {
        backward_block<T>(a, lw, r0, r1);
      }
    }
  });
}

template <bool kForward>
bool run_blocks(const LoopArgs& a) {
  if (!have_blas() || !blas_sizes_ok(a)) return false;
  switch (a.gates.scalar_type()) {
    case at::kFloat: run_blocks_typed<float, kForward>(a); return true;
    case at::kDouble: run_blocks_typed<double, kForward>(a); return true;
    case at::kBFloat16: run_blocks_typed<at::BFloat16, kForward>(a); return true;
    case at::kHalf: run_blocks_typed<at::Half, kForward>(a); return true;
    default: return false;
  }
}

bool forward_loop_cpu(const LoopArgs& a) { return run_blocks<true>(a); }

bool backward_loop_cpu(const LoopArgs& a) { return run_blocks<false>(a); }

// a^T b for float32 a (K, M), b (K, Nc) on an AVX2/AVX-512 CPU (cpu::gemm_at_b): rows of the
// result split among the threads in chunks of 8, each element one sum in k order, so these
// weight gradients do not depend on the thread count. Undefined for everything else (BLAS
// then).
at::Tensor at_b_cpu_f32(const at::Tensor& a, const at::Tensor& b) {
  const GemmKernels* gk = gemm_kernels();
  if (a.scalar_type() != at::kFloat || gk == nullptr || a.stride(1) != 1 || b.stride(1) != 1) {
    return {};
  }
  const int64_t K = a.size(0), M = a.size(1), Nc = b.size(1);
  // gemm_at_b keeps the tiles of C in registers for one pass over a block of K and reloads
  // them for the next; a C beyond 4 MiB (H = 1024: 16 MiB for dW_hh) makes those reloads
  // the bottleneck, where BLAS's deeper blocking wins.
  if (M * Nc > (int64_t{1} << 20)) return {};
  if (K == 0) return at::zeros({M, Nc}, a.options());
  auto out = at::empty({M, Nc}, a.options());
  const auto kernel = gk->at_b;
  const float* ap = a.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  constexpr int64_t kTile = 8;
  const int64_t tiles = (M + kTile - 1) / kTile;
  // ~256k multiply-adds per chunk of tiles.
  const int64_t grain = std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(1, kTile * K * Nc));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    kernel(t0 * kTile, std::min(M, t1 * kTile), Nc, K, ap, a.stride(0), bp, b.stride(0), op, Nc,
           false);
  });
  return out;
}

// ---- Float16 GEMMs outside the time loop ----------------------------------------------------
//
// ATen's CPU float16 GEMM is a dot-product loop (on this project's AMD EPYC it was half the time
// of a seed-sized float16 forward), so the input projection, dx and the weight gradients of a
// float16 call convert their operands to float32 and run the float32 kernels, rounding each
// result to float16 once, as ATen does. bfloat16 keeps ATen's GEMMs: oneDNN's bfloat16 kernels
// (dot products of bfloat16 pairs where the CPU has them) beat a conversion to float32.

// c = a b (+ bias) as mm_cpu below, for float16 a, b, bias and c: rows of a converted to float32
// in chunks, each chunk's product rounded into c.
bool mm_cpu_f16(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, const at::Tensor* bias) {
  if (a.stride(1) != 1 || !c.is_contiguous()) return false;
  const PackedB pb = pack_b(b.to(at::kFloat));
  if (pb.kernel == nullptr) return false;
  const int64_t M = a.size(0), K = pb.K, Nc = pb.Nc, lda = a.stride(0);
  const at::Tensor bias_f = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = pb.panels.const_data_ptr<float>();
  const at::Half* ap = a.const_data_ptr<at::Half>();
  at::Half* cp = c.mutable_data_ptr<at::Half>();
  constexpr int64_t kChunk = 64;  // rows
  at::parallel_for(0, (M + kChunk - 1) / kChunk, 1, [&](int64_t k0, int64_t k1) {
    std::vector<float> af(kChunk * K), cf(kChunk * Nc);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r0 = k * kChunk, rows = std::min(kChunk, M - r0);
      for (int64_t r = 0; r < rows; ++r) to_float(ap + (r0 + r) * lda, af.data() + r * K, K);
      if (bias) {
        for (int64_t r = 0; r < rows; ++r) {
          std::copy_n(bias_f.const_data_ptr<float>(), Nc, cf.data() + r * Nc);
        }
      }
      pb.kernel(0, rows, 0, pb.panel_count(), Nc, K, af.data(), K, bp, cf.data(), Nc,
                bias != nullptr);
      from_float(cf.data(), cp + r0 * Nc, rows * Nc);
    }
  });
  return true;
}

// a^T b as at_b_cpu below, for float16 a and b: both converted to float32, the float32 result
// returned (the driver adds it into its float16 gradient, rounding once).
at::Tensor at_b_cpu_f16(const at::Tensor& a, const at::Tensor& b) {
  if (gemm_kernels() == nullptr) return {};
  const auto af = a.to(at::kFloat), bf = b.to(at::kFloat);
  auto r = at_b_cpu_f32(af, bf);
  return r.defined() ? r : at::mm(af.t(), bf);
}

// The CellKernels at_b hook: float32 and float16 here, the rest left to ATen.
at::Tensor at_b_cpu(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kHalf ? at_b_cpu_f16(a, b) : at_b_cpu_f32(a, b);
}

// c = a b (+ bias on every row) for float32 a (M, K) with unit column stride, b (K, Nc) of
// any strides and c (M, Nc) contiguous, on an AVX2/AVX-512 CPU: the input projection (b =
// W_ih^T) and dx (b = W_ih) through the packed kernels. False, with c untouched, otherwise.
bool mm_cpu(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, const at::Tensor* bias) {
  if (a.scalar_type() == at::kHalf) return mm_cpu_f16(c, a, b, bias);
  if (a.scalar_type() != at::kFloat || a.stride(1) != 1 || !c.is_contiguous()) return false;
  const int64_t M = a.size(0);
  if (M < kMinPackedRows) return false;
  const PackedB pb = pack_b(b);
  if (pb.kernel == nullptr) return false;
  if (bias) c.copy_(bias->view({1, -1}).expand_as(c));
  run_packed(pb, M, a.const_data_ptr<float>(), a.stride(0), c.mutable_data_ptr<float>(),
             c.stride(0), bias != nullptr);
  return true;
}

constexpr CellKernels kCpuKernels{cell_forward_cpu, cell_backward_cpu, forward_loop_cpu,
                                  backward_loop_cpu, at_b_cpu, mm_cpu};

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

// Whether bfloat16 calls multiply bfloat16 pairs in their step GEMMs (AVX-512 BF16).
bool cpu_bf16_dot_products() { return cpu_has_bf16_dot(); }

// Picks a pointwise path no wider than the CPU supports (for tests of every path).
void set_cpu_pointwise_path(const std::string& name) {
  const Isa want = name == "avx512" ? Isa::kAvx512 : name == "avx2" ? Isa::kAvx2 : Isa::kScalar;
  TORCH_CHECK(name == "avx512" || name == "avx2" || name == "scalar",
              "set_cpu_pointwise_path: expected 'avx512', 'avx2' or 'scalar', got '", name, "'");
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(detect_isa()),
              "set_cpu_pointwise_path: this CPU cannot run '", name, "'");
  active_isa().store(want);
}

// src (contiguous, CPU) converted by the half-type loop's conversions on the active path:
// float32 to `dtype` (bfloat16 or float16), or a half type to float32 (tests compare them
// with torch's .to() bit for bit).
at::Tensor cpu_convert_for_tests(const at::Tensor& src, at::ScalarType dtype) {
  TORCH_CHECK(src.device().is_cpu() && src.is_contiguous(),
              "cpu_convert_for_tests: expected a contiguous CPU tensor");
  const bool half_in = src.scalar_type() == at::kBFloat16 || src.scalar_type() == at::kHalf;
  const bool half_out = dtype == at::kBFloat16 || dtype == at::kHalf;
  TORCH_CHECK((half_in && dtype == at::kFloat) || (src.scalar_type() == at::kFloat && half_out),
              "cpu_convert_for_tests: expected float32 to a half type or back, got ",
              src.scalar_type(), " to ", dtype);
  auto out = at::empty(src.sizes(), src.options().dtype(dtype));
  AT_DISPATCH_REDUCED_FLOATING_TYPES(half_in ? src.scalar_type() : dtype, "cpu_convert_for_tests",
                                     [&] {
    if (half_in) {
      to_float(src.const_data_ptr<scalar_t>(), out.mutable_data_ptr<float>(), src.numel());
    } else {
      from_float(src.const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(), src.numel());
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(handlstm, CPU, m) {
  m.impl("lstm_forward", &lstm_forward_cpu);
  m.impl("lstm_backward", &lstm_backward_cpu);
}

}  // namespace handlstm
