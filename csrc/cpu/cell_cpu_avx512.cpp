// AVX-512 instantiation of the CPU pointwise kernels (see cell_cpu.h and cell_cpu_avx2.cpp,
// which this file mirrors): 16 float lanes instead of 8. Compiled for AVX-512 through the
// target pragma, independent of the build's flags; lstm_cpu.cpp calls it only after checking
// the CPU at run time. exp is SLEEF's 16-lane expf (exported by libtorch_cpu), tanh is built
// on it as in the AVX2 unit.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#pragma GCC diagnostic ignored "-Wpsabi"
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

namespace handlstm {

template <>
struct GateMath<at::vec::Vectorized<float>> {
  using V = at::vec::Vectorized<float>;
  static V exp(V x) { return x.exp(); }
  static V tanh(V x) { return tanh_from_exp(x); }
};

}  // namespace handlstm

HANDLSTM_DEFINE_ROW_KERNELS(avx512)

#if defined(__clang__)
#pragma clang attribute pop
#endif
