// AVX2+FMA instantiation of the CPU pointwise kernels (see cell_cpu.h).
//
// This file is compiled for AVX2 through the target pragma below, independent of the build's
// flags, and includes nothing but ATen's vector header and our own headers, so no code built
// for AVX2 can be shared with (and run by) the rest of the extension. ATen's vector types live
// in the namespace named by CPU_CAPABILITY, which keeps them apart from any other build of the
// same header. Their exp and tanh call SLEEF, which libtorch_cpu exports.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma")
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

template <typename acc_t>
struct GateMath<at::vec::Vectorized<acc_t>> {
  using V = at::vec::Vectorized<acc_t>;
  static V exp(V x) { return x.exp(); }
  static V tanh(V x) { return x.tanh(); }
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
