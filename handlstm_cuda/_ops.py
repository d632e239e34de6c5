"""The fused LSTM op for Python: fake kernels, the differentiable wrapper, and `lstm()`.

Shape vocabulary: T time, N batch, I input, H hidden, G = 4H gates in nn.LSTM's order
i, f, g, o, P projection size, Hout = P when projecting, else H.

The C++ ops `torch.ops.handlstm.lstm_forward` / `lstm_backward` (csrc/lstm_ops.cpp) do the
work; `LSTMFunction` is the `torch.autograd.Function` that ties them together, so the backward
of `lstm()` runs our hand-derived backward kernels (docs/derivation.md).
"""

import torch

from . import _ext  # noqa: F401  (registers torch.ops.handlstm)
from . import reference

__all__ = ["lstm", "LSTMFunction"]

_ops = torch.ops.handlstm


@torch.library.register_fake("handlstm::lstm_forward")
def _lstm_forward_fake(input, h0, c0, weight_ih, weight_hh, bias, weight_hr, batch_sizes, reverse):
    T, N, _ = input.shape
    H = weight_ih.shape[0] // 4
    Hout = weight_hr.shape[0] if weight_hr is not None else H
    proj_in = input.new_empty((T, N, H) if weight_hr is not None else (0,))
    return (
        input.new_empty((T, N, Hout)),
        input.new_empty((N, Hout)),
        input.new_empty((N, H)),
        input.new_empty((T, N, 4 * H)),
        input.new_empty((T, N, H)),
        proj_in,
    )


@torch.library.register_fake("handlstm::lstm_backward")
def _lstm_backward_fake(grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh,
                        weight_hr, output, gates, cells, proj_in, batch_sizes, reverse):
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        torch.empty_like(h0, memory_format=torch.contiguous_format),
        torch.empty_like(c0, memory_format=torch.contiguous_format),
        torch.empty_like(weight_ih, memory_format=torch.contiguous_format),
        torch.empty_like(weight_hh, memory_format=torch.contiguous_format),
        input.new_empty((weight_ih.shape[0],)),
        input.new_empty(tuple(weight_hr.shape) if weight_hr is not None else (0,)),
    )


def _reference_grads(inputs, grads):
    """Gradients through the differentiable reference, with a graph (double backward)."""
    input, h0, c0, weight_ih, weight_hh, bias, weight_hr, batch_sizes, reverse = inputs
    with torch.enable_grad():
        outs = reference.lstm(input, h0, c0, weight_ih, weight_hh, bias, weight_hr=weight_hr,
                              batch_sizes=batch_sizes, reverse=reverse)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
        wrt = [t for t in inputs[:7] if isinstance(t, torch.Tensor) and t.requires_grad]
        found = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                    create_graph=True, allow_unused=True)
    it = iter(found)
    return tuple(next(it) if isinstance(t, torch.Tensor) and t.requires_grad else None
                 for t in inputs[:7])


class LSTMFunction(torch.autograd.Function):
    """Differentiable wrapper of the fused op.

    forward returns (output, h_n, c_n, gates, cells, proj_in); the last three are saved
    activations, marked non-differentiable. backward runs `handlstm::lstm_backward`. When a
    graph of the gradient is requested (create_graph=True, e.g. double backward or
    torch.func.grad), backward instead differentiates the pure-PyTorch reference, so second
    derivatives are exact rather than silently missing.
    """

    @staticmethod
    def forward(input, h0, c0, weight_ih, weight_hh, bias, weight_hr, batch_sizes, reverse):
        return _ops.lstm_forward(input, h0, c0, weight_ih, weight_hh, bias, weight_hr,
                                 batch_sizes, reverse)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, h0, c0, weight_ih, weight_hh, bias, weight_hr, batch_sizes, reverse = inputs
        out, _, _, gates, cells, proj_in = output
        ctx.mark_non_differentiable(gates, cells, proj_in)
        ctx.save_for_backward(input, h0, c0, weight_ih, weight_hh, bias, weight_hr, batch_sizes,
                              out, gates, cells, proj_in)
        ctx.reverse = reverse

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n, *_unused):
        (input, h0, c0, weight_ih, weight_hh, bias, weight_hr, batch_sizes,
         out, gates, cells, proj_in) = ctx.saved_tensors
        if torch.is_grad_enabled():
            inputs = (input, h0, c0, weight_ih, weight_hh, bias, weight_hr, batch_sizes,
                      ctx.reverse)
            return _reference_grads(inputs, (grad_output, grad_h_n, grad_c_n)) + (None, None)
        (d_input, d_h0, d_c0, d_w_ih, d_w_hh, d_bias, d_w_hr) = _ops.lstm_backward(
            grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh, weight_hr,
            out, gates, cells, proj_in, batch_sizes, ctx.reverse)
        return (d_input, d_h0, d_c0, d_w_ih, d_w_hh, d_bias if bias is not None else None,
                d_w_hr if weight_hr is not None else None, None, None)


def lstm(input, h0, c0, weight_ih, weight_hh, bias=None, *, weight_hr=None, batch_sizes=None,
         reverse=False):
    """One LSTM layer in one direction on the fused kernels.

    Args:
        input: (T, N, I).
        h0: (N, Hout) initial hidden state; c0: (N, H) initial cell state.
        weight_ih: (4H, I); weight_hh: (4H, Hout), gate blocks in the order i, f, g, o.
        bias: (4H,), nn.LSTM's ``bias_ih + bias_hh``, or None.
        weight_hr: (P, H) projection (nn.LSTM's ``proj_size``) or None.
        batch_sizes: optional int64 CPU tensor (T,), non-increasing: only rows
            [0, batch_sizes[t]) are active at step t (a PackedSequence's sorted layout).
            Inactive positions of ``output`` are zero and inactive rows keep their state.
        reverse: process t = T-1 .. 0 (outputs stay at their time index); with batch_sizes,
            each row starts at its own last valid step from h0/c0.

    Returns:
        output (T, N, Hout), h_n (N, Hout), c_n (N, H).

    Every tensor argument except batch_sizes is differentiable. All tensors must share one
    dtype (float32, float64, bfloat16, float16) and device; errors name the argument.
    """
    if not isinstance(reverse, bool):
        raise TypeError(f"lstm: reverse must be a bool, got {type(reverse).__name__}")
    output, h_n, c_n, _, _, _ = LSTMFunction.apply(input, h0, c0, weight_ih, weight_hh, bias,
                                                   weight_hr, batch_sizes, reverse)
    return output, h_n, c_n
