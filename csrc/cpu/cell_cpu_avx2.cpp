// AVX2+FMA instantiation of the CPU pointwise kernels (see cell_cpu.h).
//
// This file is compiled for AVX2 through the target pragma below, independent of the build's
// flags, and includes nothing but ATen's vector header and our own headers, so no code built
// for AVX2 can be shared with (and run by) the rest of the extension. ATen's vector types live
// in the namespace named by CPU_CAPABILITY, which keeps them apart from any other build of the
// same header. Their exp and tanh call SLEEF, which libtorch_cpu exports.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma")
// ATen's headers pass AVX vectors by value; the ABI note GCC prints for that is irrelevant here
// because no such function crosses this file's boundary.
#pragma GCC diagnostic ignored "-Wpsabi"
// ATen's vector headers carry `#pragma unroll` hints that only other compilers read.
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#endif
// The target pragma does not define the ISA macros that SLEEF's and ATen's headers test, so
// state them for this file alone.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2

#include <ATen/cpu/vec/vec.h>

#include "cell_cpu.h"

namespace handlstm {

template <>
struct GateMath<at::vec::Vectorized<double>> {
  using V = at::vec::Vectorized<double>;
  static V exp(V x) { return x.exp(); }
  static V tanh(V x) { return x.tanh(); }
};

// float: SLEEF's vector tanhf and expm1f measured ~5-8x slower than its expf here, and tanh is
// two of the five transcendentals per element. So tanh is built on expf:
//   |x| >= 0.25: 1 - 2 / (e^{2|x|} + 1)   (result >= 0.24, so the subtraction loses < 1 ulp)
//   |x| <  0.25: odd Taylor polynomial to x^9 (truncation < 1e-8 relative)
// and the sign is copied back from x. e^{2|x|} overflowing to inf gives exactly 1; NaN stays
// NaN (the comparison is false for NaN, so it takes the exp branch). Checked against float64
// tanh in tests/test_gate_math.py.
template <>
struct GateMath<at::vec::Vectorized<float>> {
  using V = at::vec::Vectorized<float>;
  static V exp(V x) { return x.exp(); }
  static V tanh(V x) {
    const V a = x.abs();
    const V one(1.0f), two(2.0f);
    const V large = one - two / ((a * two).exp() + one);
    const V a2 = a * a;
    V poly(62.0f / 2835.0f);
    poly = at::vec::fmadd(poly, a2, V(-17.0f / 315.0f));
    poly = at::vec::fmadd(poly, a2, V(2.0f / 15.0f));
    poly = at::vec::fmadd(poly, a2, V(-1.0f / 3.0f));
    poly = at::vec::fmadd(poly, a2, one);
    const V small = a * poly;
    return V::blendv(large, small, a < V(0.25f)).copysign(x);
  }
};

namespace cpu {

void forward_rows_avx2(const ForwardRows<float>& p, int64_t begin, int64_t end) {
  forward_rows<float, float, at::vec::Vectorized<float>>(p, begin, end);
}
void forward_rows_avx2(const ForwardRows<double>& p, int64_t begin, int64_t end) {
  forward_rows<double, double, at::vec::Vectorized<double>>(p, begin, end);
}
void backward_rows_avx2(const BackwardRows<float>& p, int64_t begin, int64_t end) {
  backward_rows<float, float, at::vec::Vectorized<float>>(p, begin, end);
}
void backward_rows_avx2(const BackwardRows<double>& p, int64_t begin, int64_t end) {
  backward_rows<double, double, at::vec::Vectorized<double>>(p, begin, end);
}

}  // namespace cpu
}  // namespace handlstm

#if defined(__clang__)
#pragma clang attribute pop
#endif
