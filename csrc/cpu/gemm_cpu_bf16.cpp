// The bfloat16 step GEMM of the CPU time loop, on AVX-512 BF16's dot product of bfloat16 pairs
// (vdpbf16ps: per float32 lane, acc += a0 b0 + a1 b1 from two bfloat16 pairs, products exact,
// denormal inputs and results flushed to zero). It does twice the multiply-adds per
// instruction of a float32 FMA, which is what oneDNN's bfloat16 LSTM uses and the float32
// kernels of gemm_cpu.h cannot match.
//
// Compiled for AVX-512 BF16 through the target pragma, independent of the build's flags; it
// includes only the intrinsics header and our own GEMM headers (whose helpers have internal
// linkage), so nothing compiled here can be handed to other code.
// lstm_cpu.cpp calls it only on a CPU that reports avx512bf16 (see cpu_has_bf16_dot).
//
// Layout. B (K x Nc) is packed as ceil(Nc / 32) panels of 32 columns. A panel holds ceil(K / 2)
// pair rows; pair row i holds, for each column j, the 32-bit word (B[2i][j], B[2i+1][j]) (low
// half first), zero-padded past K and Nc. A tile of MR rows x 32 columns of C lives in 2 MR
// registers while i runs over the pairs: per pair, two panel loads and MR broadcasts of the
// pair (A[r][2i], A[r][2i+1]) feed 2 MR dot products. Rows of A must hold an even number of
// readable bfloat16 (the caller pads an odd K with a zero).
//
// Accumulation order: every element of C is one sum over the pairs in increasing order (plus
// C itself first when accumulating), independent of the tile and of the thread that computes
// it.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#elif defined(__clang__)
#pragma clang attribute push(                                                               \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))),              \
    apply_to = function)
#endif

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "gemm_cpu.h"  // for_row_tiles (its kernels need CPU_CAPABILITY, not defined here)
#include "gemm_cpu_bf16.h"

namespace handlstm {
namespace cpu {
namespace {

constexpr int64_t kNR = kBf16PanelWidth;  // 32 columns: two 16-lane vectors

__mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF)
         : n <= 0 ? static_cast<__mmask16>(0)
                  : static_cast<__mmask16>((1u << n) - 1);
}

// C[r, j] = (accumulate ? C[r, j] : 0) + sum_i dot(A pair i of row r, B pair row i, column j)
// for r < MR, j < width (<= 32); B is one packed panel.
template <int MR>
void tile(const uint16_t* A, int64_t lda, const uint16_t* B, int64_t pairs, float* C,
          int64_t ldc, int64_t width, bool accumulate) {
  const __mmask16 m[2] = {lanes(width), lanes(width - 16)};
  __m512 acc[2][MR];
  for (int v = 0; v < 2; ++v) {
    for (int r = 0; r < MR; ++r) {
      acc[v][r] = accumulate ? _mm512_maskz_loadu_ps(m[v], C + r * ldc + v * 16)
                             : _mm512_setzero_ps();
    }
  }
  for (int64_t i = 0; i < pairs; ++i) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + i * 2 * kNR);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(B + i * 2 * kNR + kNR);
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * i, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      acc[0][r] = _mm512_dpbf16_ps(acc[0][r], a, b0);
      acc[1][r] = _mm512_dpbf16_ps(acc[1][r], a, b1);
    }
  }
  for (int v = 0; v < 2; ++v) {
    for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(C + r * ldc + v * 16, m[v], acc[v][r]);
  }
}

}  // namespace

void pack_panels_bf16(const uint16_t* b, int64_t stride_k, int64_t stride_c, int64_t K,
                      int64_t Nc, uint16_t* out, int64_t p0, int64_t p1) {
  const int64_t pairs = (K + 1) / 2;
  for (int64_t p = p0; p < p1; ++p) {
    uint16_t* dst = out + p * pairs * 2 * kNR;
    for (int64_t i = 0; i < pairs; ++i) {
      for (int64_t j = 0; j < kNR; ++j) {
        const int64_t c = p * kNR + j;
        for (int64_t e = 0; e < 2; ++e) {
          const int64_t k = 2 * i + e;
          dst[(i * kNR + j) * 2 + e] = k < K && c < Nc ? b[k * stride_k + c * stride_c] : 0;
        }
      }
    }
  }
}

void gemm_packed_bf16(int64_t m0, int64_t m1, int64_t p0, int64_t p1, int64_t Nc, int64_t K,
                      const uint16_t* A, int64_t lda, const uint16_t* Bp, float* C, int64_t ldc,
                      bool accumulate) {
  const int64_t pairs = (K + 1) / 2;
  for (int64_t p = p0; p < p1; ++p) {
    const uint16_t* B = Bp + p * pairs * 2 * kNR;
    const int64_t c0 = p * kNR;
    const int64_t width = Nc - c0 < kNR ? Nc - c0 : kNR;
    for_row_tiles<8>(m0, m1, [&](int64_t r, auto rows) {
      tile<decltype(rows)::value>(A + r * lda, lda, B, pairs, C + r * ldc + c0, ldc, width,
                                  accumulate);
    });
  }
}

}  // namespace cpu
}  // namespace handlstm

#if defined(__clang__)
#pragma clang attribute pop
#endif
