// Gate math of one LSTM cell element, shared by the CPU and the CUDA kernels.
//
// Shape vocabulary used across csrc/: T time, N batch, I input, H hidden, G = 4H gates in
// nn.LSTM's order i, f, g, o, P projection size, Hout = P when projecting, else H.
//
// Every function here works on one (n, j) element: the four pre-activations p_i, p_f, p_g, p_o
// of hidden unit j of batch row n. They are templated on the accumulation type `acc_t`
// (float for float/half/bfloat16 storage, double for double), so the same arithmetic runs in
// the CPU tests and on the GPU. Nothing here may use float-only intrinsics (expf, tanhf):
// they would silently narrow the double instantiation and break gradcheck.
//
// The derivation behind cell_backward is docs/derivation.md.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HANDLSTM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HANDLSTM_HOST_DEVICE inline
#endif

namespace handlstm {
// Compiled inside an ISA unit of the CPU backend (cell_cpu_avx2.cpp, cell_cpu_avx512.cpp,
// which define CPU_CAPABILITY), everything here lives in a namespace of that ISA: otherwise an
// out-of-line copy built for AVX-512 (as a -O0 build emits) could be the one the linker hands
// to the generic code, which runs on any CPU.
#ifdef CPU_CAPABILITY
inline namespace CPU_CAPABILITY {
#endif

// The two transcendental functions, chosen by type. The primary template serves float and
// double on host and device (overloaded ::exp / ::tanh, never the float-only spellings); the
// CPU backend specialises it for SIMD vector types (csrc/cpu/cell_cpu_avx2.cpp).
template <typename acc_t>
struct GateMath {
  static HANDLSTM_HOST_DEVICE acc_t exp(acc_t x) { return ::exp(x); }
  static HANDLSTM_HOST_DEVICE acc_t tanh(acc_t x) { return ::tanh(x); }
};

template <typename acc_t>
HANDLSTM_HOST_DEVICE acc_t sigmoid(acc_t x) {
  // e^-x overflows to +inf for very negative x, which still gives the right limit 0; no NaN
  // arises for any non-NaN x.
  return acc_t(1) / (acc_t(1) + GateMath<acc_t>::exp(acc_t(0) - x));
}

template <typename acc_t>
HANDLSTM_HOST_DEVICE acc_t tanh_act(acc_t x) {
  return GateMath<acc_t>::tanh(x);
}

// sigma'(p) written through the saved output s = sigma(p).
template <typename acc_t>
HANDLSTM_HOST_DEVICE acc_t sigmoid_grad_from_output(acc_t s) {
  return s * (acc_t(1) - s);
}

// tanh'(p) written through the saved output t = tanh(p).
template <typename acc_t>
HANDLSTM_HOST_DEVICE acc_t tanh_grad_from_output(acc_t t) {
  return acc_t(1) - t * t;
}

// Activated gates of one element; the forward saves them so the backward never recomputes
// an exponential.
template <typename acc_t>
struct Gates {
  acc_t i, f, g, o;
};

// Forward of one element: pre-activations and c_{t-1} -> activated gates, c_t and
// m_t = o * tanh(c_t) (m_t is h_t when there is no projection).
template <typename acc_t>
HANDLSTM_HOST_DEVICE Gates<acc_t> cell_forward(acc_t p_i, acc_t p_f, acc_t p_g, acc_t p_o,
                                               acc_t c_prev, acc_t* c, acc_t* m) {
  Gates<acc_t> a;
  a.i = sigmoid(p_i);
  a.f = sigmoid(p_f);
  a.g = tanh_act(p_g);
  a.o = sigmoid(p_o);
  *c = a.f * c_prev + a.i * a.g;
  *m = a.o * tanh_act(*c);
  return a;
}

// Backward of one element (see docs/derivation.md, "One step").
//   a:      activated gates saved by cell_forward
//   c:      c_t;  c_prev: c_{t-1}
//   dm:     dL/dm_t (the gradient reaching o * tanh(c_t) at this step)
//   dc:     dL/dc_t arriving from step t+1
// Returns the pre-activation gradients and writes dL/dc_{t-1} to *dc_prev.
template <typename acc_t>
HANDLSTM_HOST_DEVICE Gates<acc_t> cell_backward(const Gates<acc_t>& a, acc_t c, acc_t c_prev,
                                                acc_t dm, acc_t dc, acc_t* dc_prev) {
  const acc_t tanh_c = tanh_act(c);
  const acc_t dc_total = dc + dm * a.o * tanh_grad_from_output(tanh_c);
  Gates<acc_t> dp;
  dp.i = dc_total * a.g * sigmoid_grad_from_output(a.i);
  dp.f = dc_total * c_prev * sigmoid_grad_from_output(a.f);
  dp.g = dc_total * a.i * tanh_grad_from_output(a.g);
  dp.o = dm * tanh_c * sigmoid_grad_from_output(a.o);
  *dc_prev = dc_total * a.f;
  return dp;
}

// The four gates of unit j in a gate row laid out as nn.LSTM's: blocks i, f, g, o of `stride`
// elements (H in a (.., 4H) tensor). store_gates rounds each value to scalar_t and writes it
// as dst_t: into a tensor (dst_t = scalar_t), or into an acc_t copy that must hold what the
// tensor holds (the persistent CUDA loops' shared memory).
template <typename acc_t, typename scalar_t>
HANDLSTM_HOST_DEVICE Gates<acc_t> load_gates(const scalar_t* row, int64_t stride, int64_t j) {
  return {acc_t(row[j]), acc_t(row[stride + j]), acc_t(row[2 * stride + j]),
          acc_t(row[3 * stride + j])};
}

template <typename scalar_t, typename dst_t, typename acc_t>
HANDLSTM_HOST_DEVICE void store_gates(dst_t* row, int64_t stride, int64_t j,
                                      const Gates<acc_t>& a) {
  row[j] = static_cast<dst_t>(static_cast<scalar_t>(a.i));
  row[stride + j] = static_cast<dst_t>(static_cast<scalar_t>(a.f));
  row[2 * stride + j] = static_cast<dst_t>(static_cast<scalar_t>(a.g));
  row[3 * stride + j] = static_cast<dst_t>(static_cast<scalar_t>(a.o));
}

// Row `row` of c_{t-1} for one step: rows below n_prev continue the previous step (c_prev,
// (n_prev, H)); the others start at this step from c0 (N, H). Used by both backends' kernels.
template <typename scalar_t>
HANDLSTM_HOST_DEVICE const scalar_t* c_prev_row(const scalar_t* c_prev, const scalar_t* c0,
                                                int64_t row, int64_t H, int64_t n_prev) {
  return row < n_prev ? c_prev + row * H : c0 + row * H;
}

#ifdef CPU_CAPABILITY
}  // namespace CPU_CAPABILITY
#endif
}  // namespace handlstm
