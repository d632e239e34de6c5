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

// float: the inline Cephes-style exp of the AVX2 unit (see cell_cpu_avx2.cpp for the scheme,
// its range clamp and its NaN handling) on 16 lanes; SLEEF's out-of-line expf took 11% of a
// float32 forward at the seed's sizes.
template <>
struct GateMath<at::vec::Vectorized<float>> {
  using V = at::vec::Vectorized<float>;

  static V exp(V xv) {
    const __m512 x_in = xv;
    __m512 x = _mm512_min_ps(_mm512_max_ps(x_in, _mm512_set1_ps(-87.336544f)),
                             _mm512_set1_ps(88.8f));
    const __m512 n = _mm512_roundscale_ps(
        _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    const __m512i e = _mm512_slli_epi32(
        _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    const __m512 r = _mm512_mul_ps(y, _mm512_castsi512_ps(e));
    const __mmask16 nan = _mm512_cmp_ps_mask(x_in, x_in, _CMP_UNORD_Q);
    return V(_mm512_mask_blend_ps(nan, r, x_in));
  }

  static V tanh(V x) { return tanh_from_exp(x); }
};

}  // namespace handlstm

HANDLSTM_DEFINE_ROW_KERNELS(avx512)

namespace handlstm::cpu {

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
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V zero() { return _mm512_setzero_ps(); }
};

void gemm_packed_avx512(int64_t m0, int64_t m1, int64_t p0, int64_t p1, int64_t Nc, int64_t K,
                        const float* A, int64_t lda, const float* Bp, float* C, int64_t ldc,
                        bool accumulate) {
  gemm_packed<Avx512Ops>(m0, m1, p0, p1, Nc, K, A, lda, Bp, C, ldc, accumulate);
}

void gemm_at_b_avx512(int64_t m0, int64_t m1, int64_t Nc, int64_t K, const float* a, int64_t lda,
                    const float* b, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_at_b<Avx512Ops>(m0, m1, Nc, K, a, lda, b, ldb, C, ldc, accumulate);
}

}  // namespace handlstm::cpu

#if defined(__clang__)
#pragma clang attribute pop
#endif
