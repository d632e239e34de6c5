// The device-neutral LSTM driver and the hooks each backend supplies.
//
// The op (`handlstm::lstm_forward` / `lstm_backward`, schemas in lstm_ops.cpp) is served by a
// backend entry (`lstm_forward_cpu` / `lstm_forward_cuda`, ...) that puts a device guard in
// place and calls the driver here with its CellKernels. The driver owns validation,
// allocation, the order of the work and, by default, the time loop and every GEMM (through
// ATen: CPU BLAS, or cuBLAS on the caller's stream). A backend must implement one fused
// pointwise pass per step and direction; it may also take over the whole time loop and the
// GEMMs (CellKernels' optional hooks), as the CPU does with its own kernels and CUDA with its
// persistent loops.
//
// Shapes (vocabulary in gate_math.h): input (T, N, I), h0 (N, Hout), c0 (N, H),
// weight_ih (4H, I), weight_hh (4H, Hout), bias (4H,), weight_hr (P, H),
// batch_sizes (T,) int64 on the CPU.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace handlstm {

// One forward step over the active rows [0, n) of one time step. Rows [0, n_prev) continue the
// previous step and read c_{t-1} from c_prev (n_prev, H); rows [n_prev, n) start here and read
// c0. All tensors are contiguous.
//   gates   (n, 4H)  in: pre-activations;   out: activated gates i, f, g, o
//   c_prev  (n_prev, H), c0 (N, H)
//   c_out   (n, H)   c_t
//   m_out   (n, H)   o * tanh(c_t)  (h_t without projection)
struct CellForwardArgs {
  at::Tensor gates;
  at::Tensor c_prev;
  at::Tensor c0;
  at::Tensor c_out;
  at::Tensor m_out;
  int64_t n;
  int64_t n_prev;
};

// One backward step over the active rows [0, n); c_prev/c0/n_prev as in CellForwardArgs.
//   gates    (n, 4H) activated gates of this step;  c (n, H) c_t
//   dm       (n, H)  dL/dm_t (without projection: the recurrent dL/dh_t)
//   grad_out (n, H)  dL/doutput_t added to dm when defined (only without projection)
//   dc       (n, H)  in: dL/dc_t;  out: dL/dc_{t-1}
//   dgates   (n, 4H) out: pre-activation gradients
struct CellBackwardArgs {
  at::Tensor gates;
  at::Tensor c;
  at::Tensor c_prev;
  at::Tensor c0;
  at::Tensor dm;
  at::Tensor grad_out;
  at::Tensor dc;
  at::Tensor dgates;
  int64_t n;
  int64_t n_prev;
};

// Processing order of the time loop and the number of active rows of each step.
struct Schedule {
  int64_t T;
  bool reverse;
  std::vector<int64_t> active;  // per time index t; rows [0, active[t]) are active

  int64_t time(int64_t s) const { return reverse ? T - 1 - s : s; }
  int64_t rows(int64_t s) const { return active[time(s)]; }
};

// Everything a whole time loop touches (all contiguous; shapes as in lstm_forward_impl):
// forward reads h0, c0, w_hh, w_hr and gates (pre-activations of the input projection) and
// fills gates (activated), cells, output and proj_in; backward reads those plus grad_output
// (may be undefined) and fills dgates and dhs (with projection), carrying dh (N, Hout) and
// dc (N, H) from the final state back to the initial one. dm_buf (N, H) is scratch.
struct LoopArgs {
  const Schedule* sch;
  int64_t N, H, Hout;
  bool proj;
  at::Tensor gates, cells, output, proj_in, h0, c0, w_hh, w_hr;
  at::Tensor grad_output, dh, dc, dgates, dhs, dm_buf;
};

// Raw pointer of an optional operand of a pointwise hook: null when undefined or empty.
template <typename scalar_t>
const scalar_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.const_data_ptr<scalar_t>() : nullptr;
}

struct CellKernels {
  void (*forward)(const CellForwardArgs&);
  void (*backward)(const CellBackwardArgs&);
  // Optional whole-loop replacements. A backend may run the time loop itself (the CPU runs
  // independent row blocks in parallel with no per-step dispatch); returning false leaves the
  // arguments to the driver's generic loop, which calls `forward` / `backward` per step.
  bool (*forward_loop)(const LoopArgs&) = nullptr;
  bool (*backward_loop)(const LoopArgs&) = nullptr;
  // Optional: a^T b (M, Nc) for a (K, M) and b (K, Nc) with unit column stride, the sums over
  // T*N rows behind the weight gradients. An undefined result leaves the product to ATen.
  at::Tensor (*at_b)(const at::Tensor& a, const at::Tensor& b) = nullptr;
  // Optional: c = a b (+ *bias on every row when bias is not null) for a (M, K) with unit
  // column stride, b (K, Nc) of any strides (W_ih^T for the input projection, W_ih for dx) and
  // c (M, Nc) contiguous. Returning false, with c untouched, leaves the product to ATen.
  bool (*mm)(at::Tensor& c, const at::Tensor& a, const at::Tensor& b,
             const at::Tensor* bias) = nullptr;
};

// (output, h_n, c_n, gates, cells, proj_in); proj_in is m (T, N, H) with projection, else empty.
using ForwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Which of (grad_input, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr) the backward
// computes; the others come back as (0,) tensors. grad_h0 and grad_c0 are always computed:
// they are the carries of the time loop itself.
using GradMask = std::array<bool, 5>;

// (grad_input, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr)
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor>;

// The persistent CUDA time loops (lstm_cuda_persistent.cu, lstm_cuda_cooperative.cu; CUDA
// builds only): CellKernels forward_loop / backward_loop hooks that return false when the mode
// below does not want them or the arguments are out of their scope. cooperative_only (tests)
// makes them try the multi-block cooperative design before the single-block one; it lives in
// lstm_ops.cpp, so CPU-only builds keep the Python switch.
bool cuda_persistent_cooperative_only();
void set_cuda_persistent_cooperative_only(bool only);

// Which time loop CUDA calls take (cuda_loop_choice.cpp):
//   kGeneric     the per-step loop (a cuBLAS GEMM and a fused pointwise kernel per step); the
//                default, since the persistent loops have not yet run on a GPU
//   kPersistent  a persistent design wherever one can run
//   kAuto        the persistent loops, or the graph loop, where measured crossovers
//                (set_cuda_crossovers) say it wins for the call's dtype, direction and nearest
//                measured shape on this GPU model, else the generic loop
//   kGraph       the generic loop, captured once per call signature in a CUDA graph and
//                replayed (run_graphed below), packed calls once per packing too; calls
//                made while the caller's stream is capturing run it eagerly
enum class CudaLoopMode : int { kGeneric = 0, kPersistent = 1, kAuto = 2, kGraph = 3 };
CudaLoopMode cuda_loop_mode();
void set_cuda_loop_mode(CudaLoopMode mode);

// One measured point: which loop won there (kGeneric, or kPersistent / kGraph where one beat
// the generic loop), for the forward (forward = true: from forward-only timings) or the
// backward (from forward+backward timings).
struct Crossover {
  at::ScalarType dtype;
  bool forward;
  int64_t N, H, T;
  CudaLoopMode winner;
};
// Replaces the table; `device` is the GPU model it was measured on (cudaDeviceProp::name).
void set_cuda_crossovers(std::string device, std::vector<Crossover> points);
size_t cuda_crossover_count();
// The table's choice for a call on `device`: the winner of its nearest measured points of the
// same dtype and direction when they all agree, else kGeneric.
CudaLoopMode crossover_choice(const std::string& device, at::ScalarType dtype, bool forward,
                              int64_t N, int64_t H, int64_t T);
// The loop the mode asks for such a call: kGeneric, kPersistent or kGraph (for kAuto, the
// table's choice on the current device, whose name `device_name` gives; it is only asked then).
CudaLoopMode wanted_cuda_loop(const char* (*device_name)(), at::ScalarType dtype, bool forward,
                              int64_t N, int64_t H, int64_t T);
// The current CUDA device's model name, for wanted_cuda_loop (lstm_cuda.cu; CUDA builds only).
const char* current_cuda_device_name();

bool persistent_forward_loop(const LoopArgs& a);
bool persistent_backward_loop(const LoopArgs& a);

// Which time loop the latest CUDA forward / backward of this process ran: the tests check that
// a persistent design really served a call (a silent fallback would pass any numeric test), and
// the benchmark reports it. Recorded by the hooks above, kept in lstm_ops.cpp.
// Milliseconds of T steps of the cooperative forward's grid barrier and/or its on-chip matvec
// alone, at the grid and shared memory that forward would use for (N, H, dtype); negative when
// that grid cannot be co-resident. The benchmark records them beside the forward's own time.
double cooperative_probe_ms(int64_t N, int64_t H, int64_t T, at::ScalarType dtype, bool barrier,
                            bool matvec);

enum class CudaLoop : int { kNone = 0, kGeneric, kSingleBlock, kCooperative, kGraph };
void record_cuda_loop(bool forward, CudaLoop loop);
CudaLoop last_cuda_loop(bool forward);

// The graph time loop (lstm_cuda_graph.cpp; CUDA builds only). `run` is one eager call of the
// op on `inputs` (undefined tensors allowed), returning its outputs. run_graphed serves a call
// from a CUDA graph of `run` cached for the call's signature: the tensors' definedness, dtypes,
// devices and sizes, `flags` (the op's other arguments, a packed call's batch_sizes among
// them) and the cuBLAS settings. The first two
// calls of a signature run eagerly, the second then captures the graph; later ones copy the
// inputs into the graph's own buffers, replay it on the caller's stream and return copies of
// its outputs. Returns nullopt, leaving the call to the caller, when the caller's stream is
// capturing (a graph cannot be captured inside another) or a capture has failed before.
using TensorList = std::vector<at::Tensor>;
std::optional<TensorList> run_graphed(bool forward, std::vector<int64_t> flags,
                                      const TensorList& inputs,
                                      const std::function<TensorList(const TensorList&)>& run);
// Drops every cached graph and its buffers (after the work already queued on them finishes).
void clear_cuda_graphs();
size_t cuda_graph_count();
size_t cuda_graph_capacity();  // signatures kept at most

ForwardResult lstm_forward_impl(const at::Tensor& input, const at::Tensor& h0,
                                const at::Tensor& c0, const at::Tensor& weight_ih,
                                const at::Tensor& weight_hh,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& weight_hr,
                                const std::optional<at::Tensor>& batch_sizes, bool reverse,
                                const CellKernels& kernels);

BackwardResult lstm_backward_impl(
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& weight_hr, const at::Tensor& output,
    const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& proj_in,
    const std::optional<at::Tensor>& batch_sizes, bool reverse, GradMask mask,
    const CellKernels& kernels);

}  // namespace handlstm
