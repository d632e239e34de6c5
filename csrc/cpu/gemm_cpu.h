// The float32 GEMMs of the CPU time loop and of the weight gradients, register-tiled.
//
// Every step of the loop multiplies a few rows (the batch, or one thread's block of it) by the
// same weight: h_{t-1} W_hh^T in the forward, dp_t W_hh in the backward (and the projection's
// m_t W_hr^T and dh_t W_hr). A BLAS call packs its operand again at every step; here the
// weight is packed once per call into column panels and each step runs gemm_packed over them.
// The weight gradients sum outer products over all T N rows (dW_hh = sum dp_t^T h_{t-1});
// gemm_at_b reads both operands in place. Measured on one AMD EPYC core (AVX-512), where MKL
// runs its generic kernels: the forward's 62 steps of 64 x 64 x 256 ran at the speed of
// MKL's, and the backward's weight gradients, half of whose MKL time went to packing, in 60%
// of it. The real gain is threads: row blocks of the time loop run these kernels with no
// BLAS threading inside (see lstm_cpu.cpp).
//
// Layout. B (K x Nc) is stored as ceil(Nc / NR) panels of K x NR floats, row k of a panel
// holding columns [p NR, p NR + NR) of row k of B, zero-padded past Nc. NR is two SIMD vectors
// (32 floats for AVX-512, 16 for AVX2). A tile of MR rows x NR columns of C lives in 2 MR
// vector registers while k runs over K: per k, two loads of the panel row and MR broadcasts
// of A feed 2 MR fused multiply-adds.
//
// Accumulation order: every element of C is one sum over k = 0..K-1 in increasing order
// (plus C itself first when accumulating), independent of the tile and of the thread that
// computes it, so results do not depend on block boundaries or the thread count.
//
// The kernel templates need an ISA unit's raw vector operations: only cell_cpu_avx2.cpp and
// cell_cpu_avx512.cpp instantiate them; everyone else calls the declared entry points. The
// plain helpers (panel_width, packed_size, pack_panels, for_row_tiles) have internal linkage,
// so the linker can never hand the generic code a copy compiled for an ISA unit's instruction
// set.
#pragma once

#include <cstdint>
#include <type_traits>

namespace handlstm {
namespace cpu {

// Column panels are two vectors wide (NR = 2 L), or one (NR = L) when all of B's columns fit
// in one vector: a narrow B (dx = dp W_ih with I = 12) would leave most of a two-vector tile
// idle.
static inline int64_t panel_width(int64_t Nc, int64_t L) { return Nc <= L ? L : 2 * L; }

static inline int64_t packed_size(int64_t K, int64_t Nc, int64_t L) {
  const int64_t NR = panel_width(Nc, L);
  return (Nc + NR - 1) / NR * NR * K;
}

// Packs panels [p0, p1) of B (K x Nc), whose element (k, c) is b[k * stride_k + c * stride_c],
// into `out`, which holds packed_size(K, Nc, L) floats: panel p (columns [p NR, p NR + NR))
// is K rows of NR floats, zero-padded past Nc. Strides let one routine pack W (K = rows) and
// W^T. Each panel is filled in blocks of 16 rows of K, within which the loop runs along
// whichever of k and c is B's unit stride, so both W and W^T are read in whole cache lines.
static inline void pack_panels(const float* b, int64_t stride_k, int64_t stride_c, int64_t K,
                        int64_t Nc, int64_t L, float* out, int64_t p0, int64_t p1) {
  const int64_t NR = panel_width(Nc, L);
  constexpr int64_t kBlock = 16;
  for (int64_t p = p0; p < p1; ++p) {
    float* dst = out + p * K * NR;
    const int64_t c0 = p * NR;
    const int64_t width = Nc - c0 < NR ? Nc - c0 : NR;
    for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
      const int64_t k1 = K - k0 < kBlock ? K : k0 + kBlock;
      if (stride_c == 1) {
        for (int64_t k = k0; k < k1; ++k) {
          for (int64_t j = 0; j < NR; ++j) {
            dst[k * NR + j] = j < width ? b[k * stride_k + c0 + j] : 0.0f;
          }
        }
      } else {
        for (int64_t j = 0; j < NR; ++j) {
          for (int64_t k = k0; k < k1; ++k) {
            dst[k * NR + j] = j < width ? b[k * stride_k + (c0 + j) * stride_c] : 0.0f;
          }
        }
      }
    }
  }
}

// Calls tile(r, rows) over rows [m0, m1): tiles of MR rows, then one of 4 (when MR > 4), then
// of 2 and 1 (a one-row tile alone would spend three loads on every two multiply-adds). `rows`
// is a std::integral_constant<int, R>, so the tile can take R as a template argument. Shared
// by the float32 kernels below and the bfloat16 ones (gemm_cpu_bf16.cpp).
template <int MR, typename Tile>
static inline void for_row_tiles(int64_t m0, int64_t m1, const Tile& tile) {
  int64_t r = m0;
  for (; r + MR <= m1; r += MR) tile(r, std::integral_constant<int, MR>{});
  if constexpr (MR > 4) {
    if (r + 4 <= m1) {
      tile(r, std::integral_constant<int, 4>{});
      r += 4;
    }
  }
  for (; r + 2 <= m1; r += 2) tile(r, std::integral_constant<int, 2>{});
  if (r < m1) tile(r, std::integral_constant<int, 1>{});
}

#ifdef CPU_CAPABILITY  // the kernels: only in the ISA units, which define it before vec.h

// `Ops` is an ISA unit's table of raw vector operations (Avx512Ops, Avx2Ops): V, its lane
// count L, and load / load_part / store / store_part / fma / broadcast / zero. Raw intrinsic
// types, not at::vec::Vectorized: GCC keeps arrays of raw vectors in registers, while an
// array of Vectorized objects went through the stack at every multiply-add (2.5x slower).

// One MR x (NV L) tile: C[r, j] = (accumulate ? C[r, j] : 0) + sum_k A(r, k) B(k, j) for
// r < MR, j < width (width <= NV L), with A(r, k) = A[r sa + k sk] and row k of B at B + k ldb.
// kFullB: B's rows hold NV L readable floats (a packed panel, zero-padded; or a full-width
// column range of a plain matrix); otherwise only `width` of them may be read.
template <typename Ops, int MR, int NV, bool kFullB>
inline void gemm_tile(const float* A, int64_t sa, int64_t sk, const float* B, int64_t ldb,
                      int64_t K, float* C, int64_t ldc, int64_t width, bool accumulate) {
  using V = typename Ops::V;
  constexpr int64_t L = Ops::L;
  int64_t w[NV];  // valid lanes of each vector column
  for (int v = 0; v < NV; ++v) {
    const int64_t left = width - v * L;
    w[v] = left >= L ? L : (left > 0 ? left : 0);
  }
  V acc[NV][MR];
  for (int v = 0; v < NV; ++v) {
    for (int r = 0; r < MR; ++r) {
      float* c = C + r * ldc + v * L;
      acc[v][r] = !accumulate || w[v] == 0 ? Ops::zero()
                  : w[v] == L              ? Ops::load(c)
                                           : Ops::load_part(c, w[v]);
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    V bv[NV];
    for (int v = 0; v < NV; ++v) {
      if constexpr (kFullB) {
        bv[v] = Ops::load(b + v * L);
      } else {
        bv[v] = w[v] == L ? Ops::load(b + v * L)
                : w[v] > 0 ? Ops::load_part(b + v * L, w[v])
                           : Ops::zero();
      }
    }
    const float* a = A + k * sk;
    for (int r = 0; r < MR; ++r) {
      const V av = Ops::broadcast(a + r * sa);
      for (int v = 0; v < NV; ++v) acc[v][r] = Ops::fma(av, bv[v], acc[v][r]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    for (int r = 0; r < MR; ++r) {
      float* c = C + r * ldc + v * L;
      if (w[v] == L) {
        Ops::store(c, acc[v][r]);
      } else if (w[v] > 0) {
        Ops::store_part(c, acc[v][r], w[v]);
      }
    }
  }
}

// Rows [m0, m1) of one column panel in row tiles (for_row_tiles).
template <typename Ops, int MR, int NV, bool kFullB>
inline void gemm_rows(int64_t m0, int64_t m1, const float* A, int64_t sa, int64_t sk,
                      const float* B, int64_t ldb, int64_t K, float* C, int64_t ldc,
                      int64_t width, bool accumulate) {
  for_row_tiles<MR>(m0, m1, [&](int64_t r, auto rows) {
    gemm_tile<Ops, decltype(rows)::value, NV, kFullB>(A + r * sa, sa, sk, B, ldb, K,
                                                      C + r * ldc, ldc, width, accumulate);
  });
}

// The row tile of each panel width: the most rows whose NV MR accumulators, NV panel vectors
// and a broadcast fit the ISA's registers (Ops::kRegs: 32 for AVX-512, 16 for AVX2).
template <typename Ops, int NV>
constexpr int row_tile() {
  return NV == 2 ? (Ops::kRegs == 32 ? 8 : 6) : (Ops::kRegs == 32 ? 16 : 12);
}

// Floats of A per row block of gemm_packed (128 KiB): a block of rows stays in L2 while every
// panel of B runs over it, so B streams from memory once per block, not once per row tile.
constexpr int64_t kPackedBlockFloats = 32768;

// C (M x Nc, row stride ldc) = (accumulate ? C : 0) + A (M x K, row stride lda) B, B packed
// by pack_panels; only rows [m0, m1) and panels [p0, p1) (columns [p0 NR, p1 NR) within
// [0, Nc), NR = panel_width(Nc, L)), so that callers can split rows or columns among threads.
template <typename Ops>
void gemm_packed(int64_t m0, int64_t m1, int64_t p0, int64_t p1, int64_t Nc, int64_t K,
                 const float* A, int64_t lda, const float* Bp, float* C, int64_t ldc,
                 bool accumulate) {
  constexpr int64_t L = Ops::L;
  int64_t mc = kPackedBlockFloats / (K > 0 ? K : 1);
  mc = mc < 16 ? 16 : (mc > 512 ? 512 : mc - mc % 16);
  for (int64_t b0 = m0; b0 < m1; b0 += mc) {
    const int64_t b1 = m1 - b0 < mc ? m1 : b0 + mc;
    if (panel_width(Nc, L) == L) {  // one panel
      if (p0 < p1) {
        gemm_rows<Ops, row_tile<Ops, 1>(), 1, true>(b0, b1, A, lda, 1, Bp, L, K, C, ldc, Nc,
                                                    accumulate);
      }
      continue;
    }
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c0 = p * 2 * L;
      const int64_t width = Nc - c0 < 2 * L ? Nc - c0 : 2 * L;
      gemm_rows<Ops, row_tile<Ops, 2>(), 2, true>(b0, b1, A, lda, 1, Bp + c0 * K, 2 * L, K,
                                                  C + c0, ldc, width, accumulate);
    }
  }
}

// Floats of b per pass of gemm_at_b: a pass's rows of b (kc x Nc, 256 KiB) stay in L2 while
// every row tile runs over all of them, and each tile's slice of a (kc x MR) comes in once.
constexpr int64_t kAtBPassFloats = 65536;

// The weight-gradient GEMM: rows [m0, m1) of C (M x Nc, row stride ldc) = (accumulate ? C : 0)
// + a^T b, for a (K x M, row stride lda) and b (K x Nc, row stride ldb) both row-major, i.e.
// the sum over K = T N rows of outer products. No packing: a's column of a tile is MR
// consecutive floats of one row, and b's rows are read in place. Every element is one sum over
// k = 0..K-1 in increasing order, whatever m0, m1 and the passes.
template <typename Ops>
void gemm_at_b(int64_t m0, int64_t m1, int64_t Nc, int64_t K, const float* a, int64_t lda,
               const float* b, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  constexpr int64_t NR = 2 * Ops::L;
  constexpr int MR = row_tile<Ops, 2>();
  if (K == 0 && !accumulate) {  // an empty sum: no pass below would write C
    for (int64_t r = m0; r < m1; ++r) {
      for (int64_t c = 0; c < Nc; ++c) C[r * ldc + c] = 0.0f;
    }
    return;
  }
  int64_t kc = kAtBPassFloats / (Nc > 0 ? Nc : 1);
  kc = kc < 16 ? 16 : (kc > 1024 ? 1024 : kc);
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t kn = K - k0 < kc ? K - k0 : kc;
    const bool acc = accumulate || k0 > 0;
    const float* ak = a + k0 * lda;
    const float* bk = b + k0 * ldb;
    for (int64_t r0 = m0; r0 < m1; r0 += MR) {
      const int64_t r1 = m1 - r0 < MR ? m1 : r0 + MR;
      for (int64_t c0 = 0; c0 < Nc; c0 += NR) {
        const int64_t width = Nc - c0 < NR ? Nc - c0 : NR;
        if (width == NR) {
          gemm_rows<Ops, MR, 2, true>(r0, r1, ak, 1, lda, bk + c0, ldb, kn, C + c0, ldc, width,
                                      acc);
        } else {
          gemm_rows<Ops, MR, 2, false>(r0, r1, ak, 1, lda, bk + c0, ldb, kn, C + c0, ldc, width,
                                       acc);
        }
      }
    }
  }
}

// The entry points of one ISA unit, declared below: HANDLSTM_DEFINE_GEMM_KERNELS(avx2, Avx2Ops).
#define HANDLSTM_DEFINE_GEMM_KERNELS(SUFFIX, OPS)                                               \
  namespace handlstm::cpu {                                                                     \
  void gemm_packed_##SUFFIX(int64_t m0, int64_t m1, int64_t p0, int64_t p1, int64_t Nc,        \
                            int64_t K, const float* A, int64_t lda, const float* Bp, float* C,  \
                            int64_t ldc, bool accumulate) {                                     \
    gemm_packed<OPS>(m0, m1, p0, p1, Nc, K, A, lda, Bp, C, ldc, accumulate);                    \
  }                                                                                             \
  void gemm_at_b_##SUFFIX(int64_t m0, int64_t m1, int64_t Nc, int64_t K, const float* a,       \
                          int64_t lda, const float* b, int64_t ldb, float* C, int64_t ldc,      \
                          bool accumulate) {                                                    \
    gemm_at_b<OPS>(m0, m1, Nc, K, a, lda, b, ldb, C, ldc, accumulate);                          \
  }                                                                                             \
  }

#endif  // CPU_CAPABILITY

// The instantiations of the ISA units (call each only on a CPU that has its ISA), and their
// vector lanes L.
void gemm_packed_avx512(int64_t m0, int64_t m1, int64_t p0, int64_t p1, int64_t Nc, int64_t K,
                        const float* A, int64_t lda, const float* Bp, float* C, int64_t ldc,
                        bool accumulate);
void gemm_packed_avx2(int64_t m0, int64_t m1, int64_t p0, int64_t p1, int64_t Nc, int64_t K,
                      const float* A, int64_t lda, const float* Bp, float* C, int64_t ldc,
                      bool accumulate);
void gemm_at_b_avx512(int64_t m0, int64_t m1, int64_t Nc, int64_t K, const float* a, int64_t lda,
                      const float* b, int64_t ldb, float* C, int64_t ldc, bool accumulate);
void gemm_at_b_avx2(int64_t m0, int64_t m1, int64_t Nc, int64_t K, const float* a, int64_t lda,
                    const float* b, int64_t ldb, float* C, int64_t ldc, bool accumulate);
constexpr int64_t kLanesAvx512 = 16;
constexpr int64_t kLanesAvx2 = 8;

}  // namespace cpu
}  // namespace handlstm
