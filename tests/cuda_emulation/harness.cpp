// Runs one CUDA kernel of the extension, compiled from its own source for the CPU
// (emulation.h), on inputs read from a folder, and writes its outputs there. Driven by
// tests/test_cuda_emulation.py, which builds this file under AddressSanitizer and under
// ThreadSanitizer and compares the outputs with the float64 oracle.
//
//   harness key=value ...   with every key below (shape vocabulary in csrc/gate_math.h):
//     design     single (persistent, W_hh whole in each block), cooperative (persistent, W_hh
//                split by hidden unit) or pointwise (the generic loop's kernels, one step)
//     direction  forward or backward;  dtype  float64, float32, bfloat16 or float16
//     T, N, H    steps, batch rows (pointwise: rows of c0), hidden size
//     R          rows per block (single): 1, 2, 4 or 8; the cooperative design takes
//                rows_tile(N), as its launch code does
//     U          hidden units per block (cooperative)
//     n, n_prev  pointwise: the step's active rows, and the rows continuing the step before
//     blocks     pointwise: the grid (its kernels loop over n H elements with a grid stride)
//     reverse, grad_output   0 or 1 (grad_output: whether the backward gets dL/doutput)
//     dir        the folder
// Keys a design does not use are ignored.
//
// Files in DIR, raw arrays of DTYPE in row-major order:
//   single, cooperative
//     forward   reads  gates (T, N, 4H) pre-activations from the input, h0, c0 (N, H), w_hh
//                      (4H, H); writes gates.out (activated), cells.out, output.out (T, N, H)
//     backward  reads  gates (T, N, 4H) activated, cells (T, N, H), c0, w_hh, dh, dc (N, H)
//                      and, with grad_output, grad_output (T, N, H)
//               writes dgates.out (T, N, 4H), dh.out, dc.out (N, H)
//   pointwise (no c_prev file when n_prev = 0)
//     forward   reads  gates (n, 4H) pre-activations, c_prev (n_prev, H), c0 (N, H)
//               writes gates.out (activated), c.out, m.out (n, H)
//     backward  reads  gates (n, 4H) activated, c (n, H), c_prev, c0, dm (n, H), dc (n, H) and,
//                      with grad_output, grad_output (n, H)
//               writes dgates.out (n, 4H), dc.out (n, H)
// Every buffer is allocated at its exact size, and outputs start as NaN bytes, so a write out of
// bounds is an AddressSanitizer report and an element never written is a NaN in the result.
#include "emulation.h"

#include "lstm_cuda_cell_kernels.cuh"
#include "lstm_cuda_cooperative_kernels.cuh"
#include "lstm_cuda_persistent_kernels.cuh"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using handlstm::persistent::kThreads;

// An H100's or H200's shared memory per block (opt-in maximum): the launch code declines what
// needs more, so a case that does is not one the GPU would run.
constexpr int64_t kMaxSmemPerBlock = 232448;

void check_smem(int64_t bytes) {
  if (bytes > kMaxSmemPerBlock) {
    throw std::runtime_error("the case needs " + std::to_string(bytes) + " bytes of shared "
                             "memory per block, more than a GPU block has (" +
                             std::to_string(kMaxSmemPerBlock) + "): its launch code would decline");
  }
}

struct Args {
  std::string design, direction, dtype, dir;
  int64_t T, N, H, U, n, n_prev, blocks;
  int R;
  bool reverse, grad_output;
};

// DIR/name: `count` elements of T.
template <typename T>
std::vector<T> read_input(const Args& a, const std::string& name, int64_t count) {
  const std::string path = a.dir + "/" + name;
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error("cannot open " + path);
  const auto bytes = static_cast<size_t>(in.tellg());
  if (bytes != size_t(count) * sizeof(T)) {
    throw std::runtime_error(path + ": expected " + std::to_string(count * sizeof(T)) +
                             " bytes, found " + std::to_string(bytes));
  }
  std::vector<T> v(count);
  in.seekg(0);
  in.read(reinterpret_cast<char*>(v.data()), std::streamsize(bytes));
  return v;
}

// dL/doutput when the run has it (grad_output=1), else an empty vector.
template <typename T>
std::vector<T> read_grad_output(const Args& a, int64_t count) {
  return a.grad_output ? read_input<T>(a, "grad_output", count) : std::vector<T>();
}

// DIR/name.out
template <typename T>
void write_output(const Args& a, const std::string& name, const std::vector<T>& v) {
  const std::string path = a.dir + "/" + name + ".out";
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

// The generic loop's pointwise kernels for one step.
template <typename scalar_t>
void run_pointwise(const Args& a) {
  const int64_t N = a.N, H = a.H, G = 4 * H, n = a.n, n_prev = a.n_prev;
  const auto in = [&](const char* name, int64_t count) {
    return read_input<scalar_t>(a, name, count);
  };
  std::vector<scalar_t> gates = in("gates", n * G);
  const std::vector<scalar_t> c0 = in("c0", N * H);
  std::vector<scalar_t> c_prev;
  if (n_prev > 0) c_prev = in("c_prev", n_prev * H);
  const scalar_t* cp = n_prev > 0 ? c_prev.data() : nullptr;
  const auto grid = unsigned(a.blocks);
  if (a.direction == "forward") {
    std::vector<scalar_t> c = nan_array<scalar_t>(n * H), m = nan_array<scalar_t>(n * H);
    cuda_emulation::launch(grid, handlstm::cuda_cell::kThreads, 0, false, [&] {
      handlstm::cuda_cell::cell_forward_kernel<scalar_t>(gates.data(), cp, c0.data(), c.data(),
                                                         m.data(), n, H, n_prev);
    });
    write_output(a, "gates", gates);
    write_output(a, "c", c);
    write_output(a, "m", m);
  } else if (a.direction == "backward") {
    const std::vector<scalar_t> c = in("c", n * H), dm = in("dm", n * H);
    const std::vector<scalar_t> grad_output = read_grad_output<scalar_t>(a, n * H);
    const scalar_t* go = a.grad_output ? grad_output.data() : nullptr;
    std::vector<scalar_t> dc = in("dc", n * H), dgates = nan_array<scalar_t>(n * G);
    cuda_emulation::launch(grid, handlstm::cuda_cell::kThreads, 0, false, [&] {
      handlstm::cuda_cell::cell_backward_kernel<scalar_t>(gates.data(), c.data(), cp, c0.data(),
                                                          dm.data(), go, dc.data(),
                                                          dgates.data(), n, H, n_prev);
    });
    write_output(a, "dgates", dgates);
    write_output(a, "dc", dc);
  } else {
    throw std::runtime_error("unknown direction " + a.direction);
  }
}

template <typename scalar_t, int R>
void run(const Args& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = a.T, N = a.N, H = a.H, G = 4 * H, U = a.U;
  const auto in = [&](const char* name, int64_t count) {
    return read_input<scalar_t>(a, name, count);
  };
  const bool single = a.design == "single", forward = a.direction == "forward";
  if (!single && a.design != "cooperative") throw std::runtime_error("unknown design " + a.design);
  // Grid and shared memory as the launch code computes them (lstm_cuda_persistent.cu,
  // lstm_cuda_cooperative.cu): a block per R rows, or a block per U hidden units.
  namespace kern = handlstm::persistent;
  const int64_t blocks = single ? (N + R - 1) / R : (H + U - 1) / U;
  const int64_t smem = single    ? kern::persistent_smem_bytes<scalar_t>(H, R)
                       : forward ? kern::smem_layout<scalar_t, true>(N, H, U, R).total
                                 : kern::smem_layout<scalar_t, false>(N, H, U, R).total;
  check_smem(smem);
  const std::vector<scalar_t> w_hh = in("w_hh", G * H), c0 = in("c0", N * H);

  if (forward) {
    std::vector<scalar_t> gates = in("gates", T * N * G);
    const std::vector<scalar_t> h0 = in("h0", N * H);
    std::vector<scalar_t> cells = nan_array<scalar_t>(T * N * H);
    std::vector<scalar_t> output = nan_array<scalar_t>(T * N * H);
    if (single) {
      cuda_emulation::launch(unsigned(blocks), kThreads, size_t(smem), false, [&] {
        kern::persistent_forward_kernel<scalar_t, R>(
            gates.data(), cells.data(), output.data(), h0.data(), c0.data(), w_hh.data(), T, N,
            H, a.reverse);
      });
    } else {
      cuda_emulation::launch(unsigned(blocks), kThreads, size_t(smem), true, [&] {
        kern::cooperative_forward_kernel<scalar_t, R>(
            gates.data(), cells.data(), output.data(), h0.data(), c0.data(), w_hh.data(), T, N,
            H, U, a.reverse);
      });
    }
    write_output(a, "gates", gates);
    write_output(a, "cells", cells);
    write_output(a, "output", output);
  } else if (a.direction == "backward") {
    const std::vector<scalar_t> gates = in("gates", T * N * G), cells = in("cells", T * N * H);
    const std::vector<scalar_t> grad_output = read_grad_output<scalar_t>(a, T * N * H);
    const scalar_t* go = a.grad_output ? grad_output.data() : nullptr;
    std::vector<scalar_t> dh = in("dh", N * H), dc = in("dc", N * H);
    std::vector<scalar_t> dgates = nan_array<scalar_t>(T * N * G);
    if (single) {
      cuda_emulation::launch(unsigned(blocks), kThreads, size_t(smem), false, [&] {
        kern::persistent_backward_kernel<scalar_t, R>(
            gates.data(), cells.data(), c0.data(), go, dgates.data(), dh.data(), dc.data(),
            w_hh.data(), T, N, H, a.reverse);
      });
    } else {
      // The launch code's scratch: (2, blocks, N, H) partial sums, uninitialised.
      std::vector<acc_t> partial = nan_array<acc_t>(size_t(2 * blocks * N * H));
      cuda_emulation::launch(unsigned(blocks), kThreads, size_t(smem), true, [&] {
        kern::cooperative_backward_kernel<scalar_t, R>(
            gates.data(), cells.data(), c0.data(), go, dgates.data(), dh.data(), dc.data(),
            w_hh.data(), partial.data(), T, N, H, U, a.reverse);
      });
    }
    write_output(a, "dgates", dgates);
    write_output(a, "dh", dh);
    write_output(a, "dc", dc);
  } else {
    throw std::runtime_error("unknown direction " + a.direction);
  }
}

template <typename scalar_t>
void run_dtype(const Args& a) {
  if (a.design == "pointwise") return run_pointwise<scalar_t>(a);
  const int R = a.design == "cooperative" ? handlstm::persistent::rows_tile(a.N) : a.R;
  switch (R) {
    case 1: return run<scalar_t, 1>(a);
    case 2: return run<scalar_t, 2>(a);
    case 4: return run<scalar_t, 4>(a);
    case 8: return run<scalar_t, 8>(a);
    default: throw std::runtime_error("R must be 1, 2, 4 or 8, got " + std::to_string(R));
  }
}

}  // namespace

// key=value arguments; every key named in `keys` must be there.
std::map<std::string, std::string> parse_args(int argc, char** argv,
                                              const std::vector<std::string>& keys) {
  std::map<std::string, std::string> kv;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto eq = arg.find('=');
    if (eq == std::string::npos) throw std::runtime_error("expected key=value, got " + arg);
    kv[arg.substr(0, eq)] = arg.substr(eq + 1);
  }
  for (const auto& k : keys) {
    if (!kv.count(k)) throw std::runtime_error("missing argument " + k + "=");
  }
  return kv;
}

int main(int argc, char** argv) {
  try {
    auto kv = parse_args(argc, argv, {"design", "direction", "dtype", "T", "N", "H", "R", "U",
                                      "n", "n_prev", "blocks", "reverse", "grad_output", "dir"});
    const auto num = [&](const char* k) { return std::stoll(kv[k]); };
    Args a{kv["design"], kv["direction"], kv["dtype"], kv["dir"], num("T"), num("N"), num("H"),
           num("U"), num("n"), num("n_prev"), num("blocks"), int(num("R")), kv["reverse"] == "1",
           kv["grad_output"] == "1"};
    if (a.dtype == "float64") {
      run_dtype<double>(a);
    } else if (a.dtype == "float32") {
      run_dtype<float>(a);
    } else if (a.dtype == "bfloat16") {
      run_dtype<c10::BFloat16>(a);
    } else if (a.dtype == "float16") {
      run_dtype<c10::Half>(a);
    } else {
      throw std::runtime_error("unknown dtype " + a.dtype);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "harness: %s\n", e.what());
    return 1;
  }
  return 0;
}
