// AVX2+FMA(+F16C) instantiation of the CPU pointwise kernels (see cell_cpu.h).
//
// This file is compiled for AVX2 through the target pragma below, independent of the build's
// flags, and includes nothing but ATen's vector header and our own headers, so no code built
// for AVX2 can be shared with (and run by) the rest of the extension. ATen's vector types live
// in the namespace named by CPU_CAPABILITY, which keeps them apart from any other build of the
// same header. SLEEF (exported by libtorch_cpu) serves double; float uses the exp below.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma,f16c")
#pragma GCC diagnostic ignored "-Wpsabi"
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif
#include "isa_unit_prelude.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2

#include "cell_cpu_simd.h"
#include "gemm_cpu.h"

namespace handlstm {
namespace cpu {

// The raw 8-lane operations that the shared templates (cephes_exp in cell_cpu_simd.h, the
// GEMMs in gemm_cpu.h) are written in.
struct Avx2Ops {
  using V = __m256;
  static constexpr int64_t L = 8;
  static constexpr int kRegs = 16;
  // Lanes [0, n) on, for the masked load and store of a partial vector.
  static __m256i lanes(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load_part(const float* p, int64_t n) { return _mm256_maskload_ps(p, lanes(n)); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store_part(float* p, V v, int64_t n) { _mm256_maskstore_ps(p, lanes(n), v); }
  static V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V zero() { return _mm256_setzero_ps(); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fnma(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V floor(V x) { return _mm256_floor_ps(x); }
  // 2^n for integral n in [-127, 128] (128 gives +inf), through the exponent bits.
  static V pow2(V n) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  // x where x is NaN, r elsewhere.
  static V keep_nan(V r, V x) { return _mm256_blendv_ps(r, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)); }
};

// Half types to and from float32, 8 lanes at a time (cell_cpu.h); the tail through c10's
// scalar conversions, which round the same way (to nearest even; a NaN stays a NaN).
void to_float_avx2(const c10::BFloat16* src, float* dst, int64_t count) {
  int64_t k = 0;
  for (; k + 8 <= count; k += 8) {
    const __m256i w =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k)));
    _mm256_storeu_ps(dst + k, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  for (; k < count; ++k) dst[k] = static_cast<float>(src[k]);
}

void from_float_avx2(const float* src, c10::BFloat16* dst, int64_t count) {
  int64_t k = 0;
  const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
  for (; k + 8 <= count; k += 8) {
    const __m256 v = _mm256_loadu_ps(src + k);
    const __m256i b = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), one);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(bias, odd)), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    // 8 values below 2^16 in 32-bit lanes -> 8 uint16 (packus works per 128-bit half).
    const __m128i packed =
        _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), packed);
  }
  for (; k < count; ++k) dst[k] = static_cast<c10::BFloat16>(src[k]);
}

void to_float_avx2(const c10::Half* src, float* dst, int64_t count) {
  int64_t k = 0;
  for (; k + 8 <= count; k += 8) {
    _mm256_storeu_ps(dst + k,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
  }
  for (; k < count; ++k) dst[k] = static_cast<float>(src[k]);
}

void from_float_avx2(const float* src, c10::Half* dst, int64_t count) {
  int64_t k = 0;
  for (; k + 8 <= count; k += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + k),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; k < count; ++k) dst[k] = static_cast<c10::Half>(src[k]);
}

}  // namespace cpu

// float: exp is five of the gate math's transcendentals per element (three sigmoids, and the
// two tanh built on it), and SLEEF's vector expf, an out-of-line call with full special-case
// handling, was the top hot spot; cephes_exp (cell_cpu_simd.h) is inline.
template <>
struct GateMath<at::vec::Vectorized<float>> {
  using V = at::vec::Vectorized<float>;
  static V exp(V x) { return V(cephes_exp<cpu::Avx2Ops>(x)); }
  static V tanh(V x) { return tanh_from_exp(x); }
};

}  // namespace handlstm

HANDLSTM_DEFINE_ROW_KERNELS(avx2)
HANDLSTM_DEFINE_GEMM_KERNELS(avx2, Avx2Ops)

#if defined(__clang__)
#pragma clang attribute pop
#endif
