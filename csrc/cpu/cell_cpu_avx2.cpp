// AVX2+FMA instantiation of the CPU pointwise kernels (see cell_cpu.h).
//
// This file is compiled for AVX2 through the target pragma below, independent of the build's
// flags, and includes nothing but ATen's vector header and our own headers, so no code built
// for AVX2 can be shared with (and run by) the rest of the extension. ATen's vector types live
// in the namespace named by CPU_CAPABILITY, which keeps them apart from any other build of the
// same header. SLEEF (exported by libtorch_cpu) serves double; float uses the exp below.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma")
#pragma GCC diagnostic ignored "-Wpsabi"
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#endif
#include "isa_unit_prelude.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2

#include "cell_cpu_simd.h"
#include "gemm_cpu.h"

namespace handlstm {

// float: exp is five of the gate math's transcendentals per element (three sigmoids, and the
// two tanh built on it below), and SLEEF's vector expf, an out-of-line call with full special-
// case handling, was the top hot spot. So exp is inline here, the classic Cephes scheme:
//   exp(x) = 2^n e^r,  n = round(x log2 e),  r = x - n ln 2 (ln 2 split in two for exactness),
//   e^r by a degree-6 polynomial on |r| <= ln(2)/2; about 1 ulp on the clamped range.
// x is clamped to [-87.336, 88.8]: the bottom gives FLT_MIN (no denormal exponent arithmetic),
// the top makes 2^n overflow to +inf exactly where it should for the sigmoid's 1 / (1 + e^-x)
// to saturate to 0. NaN is restored after the clamp, which would otherwise drop it.
template <>
struct GateMath<at::vec::Vectorized<float>> {
  using V = at::vec::Vectorized<float>;

  static V exp(V xv) {
    const __m256 x_in = xv;
    __m256 x = _mm256_min_ps(_mm256_max_ps(x_in, _mm256_set1_ps(-87.336544f)),
                             _mm256_set1_ps(88.8f));
    const __m256 n = _mm256_floor_ps(
        _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 r = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    return V(_mm256_blendv_ps(r, x_in, _mm256_cmp_ps(x_in, x_in, _CMP_UNORD_Q)));
  }

  static V tanh(V x) { return tanh_from_exp(x); }
};

}  // namespace handlstm

HANDLSTM_DEFINE_ROW_KERNELS(avx2)

namespace handlstm::cpu {

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
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V zero() { return _mm256_setzero_ps(); }
};

void gemm_packed_avx2(int64_t m0, int64_t m1, int64_t p0, int64_t p1, int64_t Nc, int64_t K,
                        const float* A, int64_t lda, const float* Bp, float* C, int64_t ldc,
                        bool accumulate) {
  gemm_packed<Avx2Ops>(m0, m1, p0, p1, Nc, K, A, lda, Bp, C, ldc, accumulate);
}

void gemm_at_b_avx2(int64_t m0, int64_t m1, int64_t Nc, int64_t K, const float* a, int64_t lda,
                    const float* b, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_at_b<Avx2Ops>(m0, m1, Nc, K, a, lda, b, ldb, C, ldc, accumulate);
}

}  // namespace handlstm::cpu

#if defined(__clang__)
#pragma clang attribute pop
#endif
