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

// tanh for float vectors, built on the unit's GateMath<Vectorized<float>>::exp (SLEEF's vector
// tanhf measured ~8x slower than its expf, and tanh is two of the five transcendentals of an
// element):
//   |x| >= 0.25: 1 - 2 / (e^{2|x|} + 1)   (result >= 0.24, so the subtraction loses < 1 ulp)
//   |x| <  0.25: odd Taylor polynomial to x^9 (truncation < 1e-8 relative)
// and the sign is copied back from x. e^{2|x|} overflowing to inf gives exactly 1; NaN stays
// NaN. Checked against float64 in tests/test_op.py.
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
  return V::blendv(large, small, a < V(0.25f)).copysign(x);
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
