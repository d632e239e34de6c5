// CUDA backend: the launchers of the fused pointwise kernels (cell_forward_kernel /
// cell_backward_kernel, in lstm_cuda_cell_kernels.cuh) and the backend entries registered for
// the CUDA dispatch key. GEMMs run in the shared driver through ATen, i.e. cuBLAS with ATen's
// handle on the caller's current stream. The persistent time loops (lstm_cuda_persistent.cu,
// lstm_cuda_cooperative.cu) replace the per-step loop when enabled and in their scope; in the
// "graph" mode the entries below hand the whole call to run_graphed (lstm_cuda_graph.cpp),
// which replays it from a CUDA graph.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>

#include "lstm.h"
#include "lstm_cuda_cell_kernels.cuh"

namespace handlstm {
namespace {

using cuda_cell::cell_backward_kernel;
using cuda_cell::cell_forward_kernel;
using cuda_cell::kThreads;

// Blocks for `count` elements: enough to fill the GPU several times over, then the grid-stride
// loop covers the rest.
unsigned int blocks_for(int64_t count) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = (count + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(wanted, sms * 32)));
}

void launch_cell_forward(const CellForwardArgs& a) {
  const int64_t H = a.c0.size(1);
  if (a.n * H == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.gates.scalar_type(),
                                  "cell_forward_cuda", [&] {
    cell_forward_kernel<scalar_t><<<blocks_for(a.n * H), kThreads, 0, stream>>>(
        a.gates.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(a.c_prev),
        a.c0.const_data_ptr<scalar_t>(), a.c_out.data_ptr<scalar_t>(),
        a.m_out.data_ptr<scalar_t>(), a.n, H, a.n_prev);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_cell_backward(const CellBackwardArgs& a) {
  const int64_t H = a.c0.size(1);
  if (a.n * H == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.gates.scalar_type(),
                                  "cell_backward_cuda", [&] {
    cell_backward_kernel<scalar_t><<<blocks_for(a.n * H), kThreads, 0, stream>>>(
        a.gates.const_data_ptr<scalar_t>(), a.c.const_data_ptr<scalar_t>(),
        ptr_or_null<scalar_t>(a.c_prev), a.c0.const_data_ptr<scalar_t>(),
        a.dm.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(a.grad_out),
        a.dc.data_ptr<scalar_t>(), a.dgates.data_ptr<scalar_t>(), a.n, H, a.n_prev);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

const char* current_cuda_device_name() { return at::cuda::getCurrentDeviceProperties()->name; }

namespace {

// Whether a call goes to run_graphed: in the graph mode, or in the auto mode where the
// crossovers say so for its shape (read off input (T, N, I) and c0 (N, H); a call of other
// ranks is left to the driver, which refuses it by name). Empty calls, with nothing to
// capture, never do; nor packed ones whose batch_sizes is not a (T,) int64 CPU tensor (the
// driver refuses those by name too).
bool graph_wanted(bool forward, const at::Tensor& input, const at::Tensor& c0,
                  const std::optional<at::Tensor>& batch_sizes) {
  if (input.dim() != 3 || c0.dim() != 2 || input.numel() == 0) return false;
  if (batch_sizes) {
    const auto& bs = *batch_sizes;
    if (!bs.device().is_cpu() || bs.scalar_type() != at::kLong || bs.dim() != 1 ||
        bs.size(0) != input.size(0)) {
      return false;
    }
  }
  return wanted_cuda_loop(current_cuda_device_name, input.scalar_type(), forward, input.size(1),
                          c0.size(1), input.size(0)) == CudaLoopMode::kGraph;
}

// The flags of a call's graph signature: `flags`, then whether it is packed and, if so, its
// batch_sizes, which fix the work of every step (the driver reads them on the host, so a
// graph captured for one packing replays only for the same packing).
std::vector<int64_t> with_packing(std::vector<int64_t> flags,
                                  const std::optional<at::Tensor>& batch_sizes) {
  flags.push_back(batch_sizes.has_value());
  if (batch_sizes) {
    const auto bs = batch_sizes->contiguous();
    const int64_t* v = bs.const_data_ptr<int64_t>();
    flags.insert(flags.end(), v, v + bs.numel());
  }
  return flags;
}

// Optional tensor arguments in and out of run_graphed's lists.
at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t ? *t : at::Tensor(); }
std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

constexpr CellKernels kCudaKernels{launch_cell_forward, launch_cell_backward,
                                   persistent_forward_loop, persistent_backward_loop};

// What run_graphed runs, eagerly and in its captures: the generic loop alone, whatever the loop
// mode or the crossover table say by then (another thread may change them), so that no
// persistent kernel ends up in a graph cached for the generic loop. Records the loop as the
// persistent hooks do when they decline.
bool generic_forward_loop(const LoopArgs&) {
  record_cuda_loop(/*forward=*/true, CudaLoop::kGeneric);
  return false;
}
bool generic_backward_loop(const LoopArgs&) {
  record_cuda_loop(/*forward=*/false, CudaLoop::kGeneric);
  return false;
}
constexpr CellKernels kGraphedKernels{launch_cell_forward, launch_cell_backward,
                                      generic_forward_loop, generic_backward_loop};

ForwardResult lstm_forward_cuda(const at::Tensor& input, const at::Tensor& h0,
                                const at::Tensor& c0, const at::Tensor& weight_ih,
                                const at::Tensor& weight_hh,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& weight_hr,
                                const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  TORCH_CHECK(input.is_cuda(), "handlstm: the CUDA kernel got input on ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  if (graph_wanted(/*forward=*/true, input, c0, batch_sizes)) {
    const auto out = run_graphed(
        /*forward=*/true, with_packing({reverse}, batch_sizes),
        {input, h0, c0, weight_ih, weight_hh, or_undefined(bias), or_undefined(weight_hr)},
        [reverse, &batch_sizes](const TensorList& a) {
          const auto r = lstm_forward_impl(a[0], a[1], a[2], a[3], a[4], maybe(a[5]),
                                           maybe(a[6]), batch_sizes, reverse, kGraphedKernels);
          return TensorList{std::get<0>(r), std::get<1>(r), std::get<2>(r),
                            std::get<3>(r), std::get<4>(r), std::get<5>(r)};
        });
    if (out) return {(*out)[0], (*out)[1], (*out)[2], (*out)[3], (*out)[4], (*out)[5]};
  }
  return lstm_forward_impl(input, h0, c0, weight_ih, weight_hh, bias, weight_hr, batch_sizes,
                           reverse, kCudaKernels);
}

BackwardResult lstm_backward_cuda(
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& weight_hr, const at::Tensor& output,
    const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& proj_in,
    const std::optional<at::Tensor>& batch_sizes, bool reverse, GradMask mask) {
  TORCH_CHECK(input.is_cuda(), "handlstm: the CUDA kernel got input on ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  if (graph_wanted(/*forward=*/false, input, c0, batch_sizes)) {
    const auto out = run_graphed(
        /*forward=*/false,
        with_packing({reverse, mask[0], mask[1], mask[2], mask[3], mask[4]}, batch_sizes),
        {or_undefined(grad_output), or_undefined(grad_h_n), or_undefined(grad_c_n), input, h0, c0,
         weight_ih, weight_hh, or_undefined(weight_hr), output, gates, cells, proj_in},
        [reverse, mask, &batch_sizes](const TensorList& a) {
          const auto r = lstm_backward_impl(maybe(a[0]), maybe(a[1]), maybe(a[2]), a[3], a[4],
                                            a[5], a[6], a[7], maybe(a[8]), a[9], a[10], a[11],
                                            a[12], batch_sizes, reverse, mask, kGraphedKernels);
          return TensorList{std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r),
                            std::get<4>(r), std::get<5>(r), std::get<6>(r)};
        });
    if (out) {
      const auto& o = *out;
      return {o[0], o[1], o[2], o[3], o[4], o[5], o[6]};
    }
  }
  return lstm_backward_impl(grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh,
                            weight_hr, output, gates, cells, proj_in, batch_sizes, reverse, mask,
                            kCudaKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(handlstm, CUDA, m) {
  m.impl("lstm_forward", &lstm_forward_cuda);
  m.impl("lstm_backward", &lstm_backward_cuda);
}

}  // namespace handlstm
