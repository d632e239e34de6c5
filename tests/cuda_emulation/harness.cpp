// Runs one persistent CUDA kernel, compiled from its own source for the CPU (emulation.h), on
// inputs read from a folder, and writes its outputs there. Driven by
// tests/test_cuda_emulation.py, which builds this file under AddressSanitizer and under
// ThreadSanitizer and compares the outputs with the float64 oracle.
//
//   harness DESIGN DIRECTION DTYPE T N H R U REVERSE GRAD_OUTPUT DIR
//     DESIGN     single (W_hh whole in each block) or cooperative (W_hh split by hidden unit)
//     DIRECTION  forward or backward
//     DTYPE      float64, float32, bfloat16 or float16
//     R          rows per block (single) or the rows tile (cooperative): 1, 2, 4 or 8
//     U          hidden units per block (cooperative; ignored by single)
//     REVERSE, GRAD_OUTPUT   0 or 1 (GRAD_OUTPUT: whether the backward gets dL/doutput)
//
// Files in DIR, raw arrays of DTYPE in row-major order (shape vocabulary in csrc/gate_math.h):
//   forward   reads  gates (T, N, 4H) pre-activations from the input, h0, c0 (N, H), w_hh (4H, H)
//             writes gates.out (activated), cells.out, output.out (T, N, H)
//   backward  reads  gates (T, N, 4H) activated, cells (T, N, H), c0, w_hh, dh, dc (N, H) and,
//                    with GRAD_OUTPUT, grad_output (T, N, H)
//             writes dgates.out (T, N, 4H), dh.out, dc.out (N, H)
// Every buffer is allocated at its exact size, and outputs start as NaN bytes, so a write out of
// bounds is an AddressSanitizer report and an element never written is a NaN in the result.
#include "emulation.h"

#include "lstm_cuda_cooperative_kernels.cuh"
#include "lstm_cuda_persistent_kernels.cuh"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using handlstm::persistent::kThreads;

template <typename T>
std::vector<T> read_array(const std::string& path, size_t count) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error("cannot open " + path);
  const auto bytes = static_cast<size_t>(in.tellg());
  if (bytes != count * sizeof(T)) {
    throw std::runtime_error(path + ": expected " + std::to_string(count * sizeof(T)) +
                             " bytes, found " + std::to_string(bytes));
  }
  std::vector<T> v(count);
  in.seekg(0);
  in.read(reinterpret_cast<char*>(v.data()), std::streamsize(bytes));
  return v;
}

template <typename T>
void write_array(const std::string& path, const std::vector<T>& v) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(v.data()), std::streamsize(v.size() * sizeof(T)));
  if (!out) throw std::runtime_error("cannot write " + path);
}

// An output buffer of exactly `count` elements, every byte 0xFF (a NaN in each float type).
template <typename T>
std::vector<T> nan_array(size_t count) {
  std::vector<T> v(count);
  std::memset(static_cast<void*>(v.data()), 0xFF, count * sizeof(T));
  return v;
}

struct Args {
  std::string design, direction, dir;
  int64_t T, N, H, U;
  int R;
  bool reverse, grad_output;
};

template <typename scalar_t, int R>
void run(const Args& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = a.T, N = a.N, H = a.H, G = 4 * H, U = a.U;
  const auto in = [&](const char* name, int64_t count) {
    return read_array<scalar_t>(a.dir + "/" + name, size_t(count));
  };
  const auto out = [&](const char* name, const std::vector<scalar_t>& v) {
    write_array(a.dir + "/" + name + std::string(".out"), v);
  };
  const bool single = a.design == "single";
  if (!single && a.design != "cooperative") throw std::runtime_error("unknown design " + a.design);
  // Grid and shared memory as the launch code computes them (lstm_cuda_persistent.cu,
  // lstm_cuda_cooperative.cu): a block per R rows, or a block per U hidden units.
  const int64_t blocks = single ? (N + R - 1) / R : (H + U - 1) / U;
  const std::vector<scalar_t> w_hh = in("w_hh", G * H), c0 = in("c0", N * H);

  if (a.direction == "forward") {
    std::vector<scalar_t> gates = in("gates", T * N * G);
    const std::vector<scalar_t> h0 = in("h0", N * H);
    std::vector<scalar_t> cells = nan_array<scalar_t>(T * N * H);
    std::vector<scalar_t> output = nan_array<scalar_t>(T * N * H);
    if (single) {
      const int64_t smem = handlstm::persistent::persistent_smem_bytes<scalar_t>(H, R);
      cuda_emulation::launch(unsigned(blocks), kThreads, size_t(smem), false, [&] {
        handlstm::persistent::persistent_forward_kernel<scalar_t, R>(
            gates.data(), cells.data(), output.data(), h0.data(), c0.data(), w_hh.data(), T, N,
            H, a.reverse);
      });
    } else {
      const int64_t smem = handlstm::persistent::smem_layout<scalar_t, true>(N, H, U, R).total;
      cuda_emulation::launch(unsigned(blocks), kThreads, size_t(smem), true, [&] {
        handlstm::persistent::cooperative_forward_kernel<scalar_t, R>(
            gates.data(), cells.data(), output.data(), h0.data(), c0.data(), w_hh.data(), T, N,
            H, U, a.reverse);
      });
    }
    out("gates", gates);
    out("cells", cells);
    out("output", output);
  } else if (a.direction == "backward") {
    const std::vector<scalar_t> gates = in("gates", T * N * G), cells = in("cells", T * N * H);
    std::vector<scalar_t> grad_output;
    if (a.grad_output) grad_output = in("grad_output", T * N * H);
    const scalar_t* go = a.grad_output ? grad_output.data() : nullptr;
    std::vector<scalar_t> dh = in("dh", N * H), dc = in("dc", N * H);
    std::vector<scalar_t> dgates = nan_array<scalar_t>(T * N * G);
    if (single) {
      const int64_t smem = handlstm::persistent::persistent_smem_bytes<scalar_t>(H, R);
      cuda_emulation::launch(unsigned(blocks), kThreads, size_t(smem), false, [&] {
        handlstm::persistent::persistent_backward_kernel<scalar_t, R>(
            gates.data(), cells.data(), c0.data(), go, dgates.data(), dh.data(), dc.data(),
            w_hh.data(), T, N, H, a.reverse);
      });
    } else {
      const int64_t smem = handlstm::persistent::smem_layout<scalar_t, false>(N, H, U, R).total;
      // The launch code's scratch: (2, blocks, N, H) partial sums, uninitialised.
      std::vector<acc_t> partial = nan_array<acc_t>(size_t(2 * blocks * N * H));
      cuda_emulation::launch(unsigned(blocks), kThreads, size_t(smem), true, [&] {
        handlstm::persistent::cooperative_backward_kernel<scalar_t, R>(
            gates.data(), cells.data(), c0.data(), go, dgates.data(), dh.data(), dc.data(),
            w_hh.data(), partial.data(), T, N, H, U, a.reverse);
      });
    }
    out("dgates", dgates);
    out("dh", dh);
    out("dc", dc);
  } else {
    throw std::runtime_error("unknown direction " + a.direction);
  }
}

template <typename scalar_t>
void run_dtype(const Args& a) {
  switch (a.R) {
    case 1: return run<scalar_t, 1>(a);
    case 2: return run<scalar_t, 2>(a);
    case 4: return run<scalar_t, 4>(a);
    case 8: return run<scalar_t, 8>(a);
    default: throw std::runtime_error("R must be 1, 2, 4 or 8, got " + std::to_string(a.R));
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 12) {
    std::fprintf(stderr, "usage: %s DESIGN DIRECTION DTYPE T N H R U REVERSE GRAD_OUTPUT DIR\n",
                 argv[0]);
    return 2;
  }
  try {
    Args a{argv[1], argv[2], argv[11], std::stoll(argv[4]), std::stoll(argv[5]),
           std::stoll(argv[6]), std::stoll(argv[8]), std::stoi(argv[7]),
           std::string(argv[9]) == "1", std::string(argv[10]) == "1"};
    const std::string dtype = argv[3];
    if (dtype == "float64") {
      run_dtype<double>(a);
    } else if (dtype == "float32") {
      run_dtype<float>(a);
    } else if (dtype == "bfloat16") {
      run_dtype<c10::BFloat16>(a);
    } else if (dtype == "float16") {
      run_dtype<c10::Half>(a);
    } else {
      throw std::runtime_error("unknown dtype " + dtype);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "harness: %s\n", e.what());
    return 1;
  }
  return 0;
}
