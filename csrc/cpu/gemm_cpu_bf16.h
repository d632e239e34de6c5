// The bfloat16 step GEMM on AVX-512 BF16 dot products (gemm_cpu_bf16.cpp, which describes the
// packed layout). bfloat16 values travel as their uint16_t bit patterns, so this header needs
// nothing from c10. Call only on a CPU that reports avx512bf16.
#pragma once

#include <cstdint>

namespace handlstm {
namespace cpu {

// Columns per packed panel.
constexpr int64_t kBf16PanelWidth = 32;

// uint16_t elements of B (K x Nc) packed (internal linkage, as in gemm_cpu.h).
static inline int64_t packed_size_bf16(int64_t K, int64_t Nc) {
  return (Nc + kBf16PanelWidth - 1) / kBf16PanelWidth * ((K + 1) / 2) * 2 * kBf16PanelWidth;
}

// Packs panels [p0, p1) of B (K x Nc, element (k, c) at b[k * stride_k + c * stride_c]).
void pack_panels_bf16(const uint16_t* b, int64_t stride_k, int64_t stride_c, int64_t K,
                      int64_t Nc, uint16_t* out, int64_t p0, int64_t p1);

// C (row stride ldc, float32) = (accumulate ? C : 0) + A B for rows [m0, m1) and panels
// [p0, p1); A (row stride lda) holds bfloat16 rows of K values, padded to an even count with
// a zero when K is odd.
void gemm_packed_bf16(int64_t m0, int64_t m1, int64_t p0, int64_t p1, int64_t Nc, int64_t K,
                      const uint16_t* A, int64_t lda, const uint16_t* Bp, float* C, int64_t ldc,
                      bool accumulate);

}  // namespace cpu
}  // namespace handlstm
