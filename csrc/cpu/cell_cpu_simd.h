// SIMD pieces shared by the ISA-specific units of the CPU pointwise kernels
// (cell_cpu_avx2.cpp, cell_cpu_avx512.cpp). Each unit defines CPU_CAPABILITY and its ISA
// macros, includes ATen's vector header, then this file; ATen's Vectorized<T> is then that
// unit's vector width, in a namespace of its own.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "cell_cpu.h"

namespace handlstm {

// double keeps SLEEF's exp and tanh (accurate to 1 ulp; the double path serves gradcheck).
template <>
struct GateMath<at::vec::Vectorized<double>> {
  using V = at::vec::Vectorized<double>;
  static V exp(V x) { return x.exp(); }
  static V tanh(V x) { return x.tanh(); }
};

// exp for float vectors of an ISA unit's raw operations `Ops` (Avx2Ops, Avx512Ops), inline,
// the classic Cephes scheme:
//   exp(x) = 2^n e^r,  n = floor(x log2 e + 1/2),  r = x - n ln 2 (ln 2 split in two for
//   exactness), e^r by a degree-6 polynomial on |r| <= ln(2)/2; about 1 ulp on the clamped
//   range.
// x is clamped to [-87.336, 88.8]: the bottom gives FLT_MIN (no denormal exponent arithmetic);
// at the top 2^n overflows to +inf from x = 88.38 on, a little before e^x itself does
// (88.72), so there the sigmoid's 1 / (1 + e^-x) gives exactly 0 instead of a value below
// 3e-39. NaN is restored after the clamp, which would otherwise drop it.
template <typename Ops>
typename Ops::V cephes_exp(typename Ops::V x_in) {
  using V = typename Ops::V;
  V x = Ops::min(Ops::max(x_in, Ops::set1(-87.336544f)), Ops::set1(88.8f));
  const V n = Ops::floor(Ops::fma(x, Ops::set1(1.44269504088896341f), Ops::set1(0.5f)));
  x = Ops::fnma(n, Ops::set1(0.693359375f), x);
  x = Ops::fnma(n, Ops::set1(-2.12194440e-4f), x);
  V y = Ops::set1(1.9875691500e-4f);
  y = Ops::fma(y, x, Ops::set1(1.3981999507e-3f));
  y = Ops::fma(y, x, Ops::set1(8.3334519073e-3f));
  y = Ops::fma(y, x, Ops::set1(4.1665795894e-2f));
  y = Ops::fma(y, x, Ops::set1(1.6666665459e-1f));
  y = Ops::fma(y, x, Ops::set1(5.0000001201e-1f));
  y = Ops::fma(y, Ops::mul(x, x), Ops::add(x, Ops::set1(1.0f)));
  return Ops::keep_nan(Ops::mul(y, Ops::pow2(n)), x_in);
}

// tanh for float vectors, built on the unit's GateMath<Vectorized<float>>::exp (SLEEF's vector
// tanhf measured ~8x slower than its expf, and tanh is two of the five transcendentals of an
// element):
//   |x| >= 0.25: 1 - 2 / (e^{2|x|} + 1)   (result >= 0.24, so the subtraction loses < 1 ulp)
//   |x| <  0.25: odd Taylor polynomial to x^9 (truncation < 1e-8 relative)
// and the sign is copied back from x (a bitwise OR, below). e^{2|x|} overflowing to inf gives
// exactly 1; NaN stays NaN. Checked against float64 in tests/test_op.py.
template <typename V>
V tanh_from_exp(V x) {
  const V a = x.abs();
  const V one(1.0f), two(2.0f);
  const V large = one - two / (GateMath<V>::exp(a * two) + one);
  const V a2 = a * a;
  V poly(62.0f / 2835.0f);
  poly = at::vec::fmadd(poly, a2, V(-17.0f / 315.0f));
  poly = at::vec::fmadd(poly, a2, V(2.0f / 15.0f));
  poly = at::vec::fmadd(poly, a2, V(-1.0f / 3.0f));
  poly = at::vec::fmadd(poly, a2, one);
  const V small = a * poly;
  // Both branches are >= 0, so OR-ing in x's sign bit copies the sign (NaN stays NaN). Not
  // Vectorized::copysign: that is an out-of-line SLEEF call, around which every live vector
  // register is spilled.
  return V::blendv(large, small, a < V(0.25f)) | (x & V(-0.0f));
}

}  // namespace handlstm

// The four row kernels of one ISA, named with its suffix (declared in cell_cpu.h).
#define HANDLSTM_DEFINE_ROW_KERNELS(SUFFIX)                                                    \
  namespace handlstm::cpu {                                                                     \
  void forward_rows_##SUFFIX(const ForwardRows<float>& p, int64_t begin, int64_t end) {        \
    forward_rows<float, float, at::vec::Vectorized<float>>(p, begin, end);                      \
  }                                                                                             \
  void forward_rows_##SUFFIX(const ForwardRows<double>& p, int64_t begin, int64_t end) {       \
    forward_rows<double, double, at::vec::Vectorized<double>>(p, begin, end);                   \
  }                                                                                             \
  void backward_rows_##SUFFIX(const BackwardRows<float>& p, int64_t begin, int64_t end) {      \
    backward_rows<float, float, at::vec::Vectorized<float>>(p, begin, end);                     \
  }                                                                                             \
  void backward_rows_##SUFFIX(const BackwardRows<double>& p, int64_t begin, int64_t end) {     \
    backward_rows<double, double, at::vec::Vectorized<double>>(p, begin, end);                  \
  }                                                                                             \
  }
