// AVX-512 instantiation of the CPU pointwise kernels (see cell_cpu.h and cell_cpu_avx2.cpp,
// which this file mirrors): 16 float lanes instead of 8. Compiled for AVX-512 through the
// target pragma, independent of the build's flags; lstm_cpu.cpp calls it only after checking
// the CPU at run time. float exp is inline (below), tanh is built on it as in the AVX2 unit;
// double keeps SLEEF's (exported by libtorch_cpu).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12 reports the deliberately undefined pass-through operand inside its own AVX-512
// intrinsics (_mm512_undefined_ps) as maybe uninitialised; nothing of ours is.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#elif defined(__clang__)
#pragma clang attribute push(                                                   \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))), \
    apply_to = function)
#endif
// The AVX-512 macros SLEEF's and ATen's headers test (see isa_unit_prelude.h).
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#include "isa_unit_prelude.h"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512

#include "cell_cpu_simd.h"
#include "gemm_cpu.h"

namespace handlstm {
namespace cpu {

// The raw 16-lane operations that the shared templates (cephes_exp in cell_cpu_simd.h, the
// GEMMs in gemm_cpu.h) are written in.
struct Avx512Ops {
  using V = __m512;
  static constexpr int64_t L = 16;
  static constexpr int kRegs = 32;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load_part(const float* p, int64_t n) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store_part(float* p, V v, int64_t n) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
  }
  static V broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V zero() { return _mm512_setzero_ps(); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fnma(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V floor(V x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  }
  // 2^n for integral n in [-127, 128] (128 gives +inf), through the exponent bits.
  static V pow2(V n) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  // x where x is NaN, r elsewhere.
  static V keep_nan(V r, V x) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, x);
  }
};

// Half types to and from float32, 16 lanes at a time (cell_cpu.h); the tail through c10's
// scalar conversions, which round the same way (to nearest even; a NaN stays a NaN).
void to_float_avx512(const c10::BFloat16* src, float* dst, int64_t count) {
  int64_t k = 0;
  for (; k + 16 <= count; k += 16) {
    const __m512i w =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k)));
    _mm512_storeu_ps(dst + k, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
  for (; k < count; ++k) dst[k] = static_cast<float>(src[k]);
}

void from_float_avx512(const float* src, c10::BFloat16* dst, int64_t count) {
  int64_t k = 0;
  const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
  for (; k + 16 <= count; k += 16) {
    const __m512 v = _mm512_loadu_ps(src + k);
    const __m512i b = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), one);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(bias, odd)), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r,
                                _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), _mm512_cvtepi32_epi16(r));
  }
  for (; k < count; ++k) dst[k] = static_cast<c10::BFloat16>(src[k]);
}

void to_float_avx512(const c10::Half* src, float* dst, int64_t count) {
  int64_t k = 0;
  for (; k + 16 <= count; k += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k));
    _mm512_storeu_ps(dst + k, _mm512_cvtph_ps(h));
  }
  for (; k < count; ++k) dst[k] = static_cast<float>(src[k]);
}

void from_float_avx512(const float* src, c10::Half* dst, int64_t count) {
  int64_t k = 0;
  for (; k + 16 <= count; k += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + k),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; k < count; ++k) dst[k] = static_cast<c10::Half>(src[k]);
}

}  // namespace cpu

// float: exp is cephes_exp on 16 lanes; SLEEF's out-of-line expf took 11% of a float32
// forward at the seed's sizes.
template <>
struct GateMath<at::vec::Vectorized<float>> {
  using V = at::vec::Vectorized<float>;
  static V exp(V x) { return V(cephes_exp<cpu::Avx512Ops>(x)); }
  static V tanh(V x) { return tanh_from_exp(x); }
};

}  // namespace handlstm

HANDLSTM_DEFINE_ROW_KERNELS(avx512)
HANDLSTM_DEFINE_GEMM_KERNELS(avx512, Avx512Ops)

#if defined(__clang__)
#pragma clang attribute pop
#endif
