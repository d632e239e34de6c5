// Row-range pointwise kernels of the CPU backend, on raw pointers.
//
// The same template serves three translation units: cell_cpu_avx512.cpp and cell_cpu_avx2.cpp
// instantiate it with 16- and 8-wide SIMD vector types (each compiled for its ISA whatever the
// build's flags), lstm_cpu.cpp with no vector type (plain C++). lstm_cpu.cpp picks one at run
// time after checking the CPU, so the extension still loads and runs on any x86-64 machine.
//
// Layout (shape vocabulary in ../gate_math.h): for active rows [begin, end) of one step,
//   gates (n, 4H) row-major with gate blocks i, f, g, o;  c_prev (n_prev, H); c0 (N, H);
//   c (n, H); m (n, H); dm, grad_out, dc (n, H); dgates (n, 4H).
// Rows below n_prev read c_{t-1} from c_prev, the others from c0. Offsets are int64_t.
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../gate_math.h"

namespace handlstm {
namespace cpu {

template <typename scalar_t>
struct ForwardRows {
  scalar_t* gates;
  const scalar_t* c_prev;
  const scalar_t* c0;
  scalar_t* c;
  scalar_t* m;
  int64_t H;
  int64_t n_prev;
};

template <typename scalar_t>
struct BackwardRows {
  const scalar_t* gates;
  const scalar_t* c;
  const scalar_t* c_prev;
  const scalar_t* c0;
  const scalar_t* dm;
  const scalar_t* grad_out;  // may be null
  scalar_t* dc;
  scalar_t* dgates;
  int64_t H;
  int64_t n_prev;
};

// Marks the plain-C++ instantiation: no vector loop, only the scalar one.
struct NoVec {};

// acc_t is the accumulation type: float for float/half/bfloat16, double for double. Vec, when
// not NoVec, is a SIMD vector of acc_t with load/store/size() (at::vec::Vectorized).
template <typename scalar_t, typename acc_t, typename Vec>
void forward_rows(const ForwardRows<scalar_t>& p, int64_t begin, int64_t end) {
  const int64_t H = p.H;
  for (int64_t row = begin; row < end; ++row) {
    scalar_t* g = p.gates + row * 4 * H;
    const scalar_t* cp = c_prev_row(p.c_prev, p.c0, row, H, p.n_prev);
    scalar_t* c = p.c + row * H;
    scalar_t* m = p.m + row * H;
    int64_t j = 0;
    if constexpr (!std::is_same_v<Vec, NoVec>) {
      static_assert(std::is_same_v<scalar_t, acc_t>, "the SIMD path runs on float and double");
      for (; j + Vec::size() <= H; j += Vec::size()) {
        Vec cv, mv;
        const auto a = cell_forward<Vec>(Vec::loadu(g + j), Vec::loadu(g + H + j),
                                         Vec::loadu(g + 2 * H + j), Vec::loadu(g + 3 * H + j),
                                         Vec::loadu(cp + j), &cv, &mv);
        a.i.store(g + j);
        a.f.store(g + H + j);
        a.g.store(g + 2 * H + j);
        a.o.store(g + 3 * H + j);
        cv.store(c + j);
        mv.store(m + j);
      }
    }
    for (; j < H; ++j) {
      acc_t cv, mv;
      const auto a = cell_forward<acc_t>(g[j], g[H + j], g[2 * H + j], g[3 * H + j], cp[j], &cv,
                                         &mv);
      store_gates<scalar_t>(g, H, j, a);
      c[j] = cv;
      m[j] = mv;
    }
  }
}

template <typename scalar_t, typename acc_t, typename Vec>
void backward_rows(const BackwardRows<scalar_t>& p, int64_t begin, int64_t end) {
  const int64_t H = p.H;
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* g = p.gates + row * 4 * H;
    const scalar_t* cp = c_prev_row(p.c_prev, p.c0, row, H, p.n_prev);
    const scalar_t* c = p.c + row * H;
    const scalar_t* dm = p.dm + row * H;
    const scalar_t* go = p.grad_out ? p.grad_out + row * H : nullptr;
    scalar_t* dc = p.dc + row * H;
    scalar_t* dg = p.dgates + row * 4 * H;
    int64_t j = 0;
    if constexpr (!std::is_same_v<Vec, NoVec>) {
      static_assert(std::is_same_v<scalar_t, acc_t>, "the SIMD path runs on float and double");
      for (; j + Vec::size() <= H; j += Vec::size()) {
        const Gates<Vec> a{Vec::loadu(g + j), Vec::loadu(g + H + j), Vec::loadu(g + 2 * H + j),
                           Vec::loadu(g + 3 * H + j)};
        Vec dmv = Vec::loadu(dm + j);
        if (go) dmv = dmv + Vec::loadu(go + j);
        Vec dcp;
        const auto dp = cell_backward<Vec>(a, Vec::loadu(c + j), Vec::loadu(cp + j), dmv,
                                           Vec::loadu(dc + j), &dcp);
        dp.i.store(dg + j);
        dp.f.store(dg + H + j);
        dp.g.store(dg + 2 * H + j);
        dp.o.store(dg + 3 * H + j);
        dcp.store(dc + j);
      }
    }
    for (; j < H; ++j) {
      const Gates<acc_t> a = load_gates<acc_t>(g, H, j);
      acc_t dmv = dm[j];
      if (go) dmv += acc_t(go[j]);
      acc_t dcp;
      const auto dp = cell_backward<acc_t>(a, c[j], cp[j], dmv, dc[j], &dcp);
      store_gates<scalar_t>(dg, H, j, dp);
      dc[j] = dcp;
    }
  }
}

// The SIMD instantiations: cell_cpu_avx2.cpp (call only when the CPU has AVX2 and FMA) and
// cell_cpu_avx512.cpp (AVX-512 F/BW/VL/DQ).
void forward_rows_avx2(const ForwardRows<float>& p, int64_t begin, int64_t end);
void forward_rows_avx2(const ForwardRows<double>& p, int64_t begin, int64_t end);
void backward_rows_avx2(const BackwardRows<float>& p, int64_t begin, int64_t end);
void backward_rows_avx2(const BackwardRows<double>& p, int64_t begin, int64_t end);
void forward_rows_avx512(const ForwardRows<float>& p, int64_t begin, int64_t end);
void forward_rows_avx512(const ForwardRows<double>& p, int64_t begin, int64_t end);
void backward_rows_avx512(const BackwardRows<float>& p, int64_t begin, int64_t end);
void backward_rows_avx512(const BackwardRows<double>& p, int64_t begin, int64_t end);

// Half types to and from float32 (the half-type time loop's scratch), rounding to nearest
// even as c10's conversions do; same units and conditions as above (the AVX2 unit also needs
// F16C, which every AVX2 CPU has and lstm_cpu.cpp checks).
void to_float_avx2(const c10::BFloat16* src, float* dst, int64_t count);
void to_float_avx2(const c10::Half* src, float* dst, int64_t count);
void from_float_avx2(const float* src, c10::BFloat16* dst, int64_t count);
void from_float_avx2(const float* src, c10::Half* dst, int64_t count);
void to_float_avx512(const c10::BFloat16* src, float* dst, int64_t count);
void to_float_avx512(const c10::Half* src, float* dst, int64_t count);
void from_float_avx512(const float* src, c10::BFloat16* dst, int64_t count);
void from_float_avx512(const float* src, c10::Half* dst, int64_t count);

}  // namespace cpu
}  // namespace handlstm
