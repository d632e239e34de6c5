"""The fused LSTM op for Python: fake kernels, the differentiable wrapper, and `lstm()`.

Shape vocabulary: T time, N batch, I input, H hidden, G = 4H gates in nn.LSTM's order
i, f, g, o, P projection size, Hout = P when projecting, else H.

The C++ ops `torch.ops.handlstm.lstm_forward` / `lstm_backward` (csrc/lstm_ops.cpp) do the
work; `LSTMFunction` is the `torch.autograd.Function` that ties them together, so the backward
of `lstm()` runs our hand-derived backward kernels (docs/derivation.md).

Registrations made here, and why (docs/works-with.md lists the tests):
  * fake kernels for both ops, so torch.compile / torch.export trace them as opaque nodes;
  * LSTMFunction's setup_context and backward are also registered as the autograd formula of
    `handlstm::lstm_forward` (torch.library.register_autograd), so the bare op is
    differentiable too and `torch.library.opcheck` passes with inputs that require grad.
    `lstm()` keeps calling LSTMFunction; inside its forward grad mode is off, so the op's own
    formula records nothing and each call has exactly one backward node;
  * `handlstm::lstm_backward` gets an autograd formula that refuses to be differentiated
    (see `_lstm_backward_not_differentiable`): second derivatives come from LSTMFunction's
    create_graph path, never from a silently incomplete graph;
  * autocast kernels for both ops on CPU and CUDA that cast like autocast's lower-precision
    policy (floating tensors except float64, to the autocast dtype in force), and the same
    cast in `lstm()` ahead of LSTMFunction so that autograd records it and gradients reach
    float32 parameters as float32.
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


def _reference_grads(inputs, grads, needs_input_grad):
    """Gradients through the differentiable reference, with a graph (double backward).

    inputs: the op's nine arguments; grads: the gradients of (output, h_n, c_n), None where
    undefined; needs_input_grad: one bool per argument.
    """
    input, h0, c0, weight_ih, weight_hh, bias, weight_hr, batch_sizes, reverse = inputs
    wanted = [k for k in range(7) if needs_input_grad[k]]
    result = [None] * 9
    pairs = [(o, g) for o, g in zip(("output", "h_n", "c_n"), grads) if g is not None]
    if not wanted or not pairs:
        return tuple(result)
    with torch.enable_grad():
        outs = dict(zip(("output", "h_n", "c_n"),
                        reference.lstm(input, h0, c0, weight_ih, weight_hh, bias,
                                       weight_hr=weight_hr, batch_sizes=batch_sizes,
                                       reverse=reverse)))
        found = torch.autograd.grad([outs[name] for name, _ in pairs],
                                    [inputs[k] for k in wanted], [g for _, g in pairs],
                                    create_graph=True, allow_unused=True)
    for k, g in zip(wanted, found):
        result[k] = g
    return tuple(result)


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
            return _reference_grads(inputs, (grad_output, grad_h_n, grad_c_n),
                                    ctx.needs_input_grad)
        (d_input, d_h0, d_c0, d_w_ih, d_w_hh, d_bias, d_w_hr) = _ops.lstm_backward(
            grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh, weight_hr,
            out, gates, cells, proj_in, batch_sizes, ctx.reverse)
        return (d_input, d_h0, d_c0, d_w_ih, d_w_hh, d_bias if bias is not None else None,
                d_w_hr if weight_hr is not None else None, None, None)



torch.library.register_autograd("handlstm::lstm_forward", LSTMFunction.backward,
                                setup_context=LSTMFunction.setup_context)


def _lstm_backward_not_differentiable(ctx, *grads):
    # lstm_backward takes the saved activations (output, gates, cells, proj_in) as independent
    # inputs, but its hand-written formula holds only when they are the forward's own results.
    # A derivative of it alone would be incomplete, so refuse instead of returning wrong numbers.
    raise RuntimeError(
        "handlstm::lstm_backward cannot be differentiated on its own. For second derivatives "
        "differentiate handlstm_cuda.lstm (or torch.ops.handlstm.lstm_forward) with "
        "create_graph=True; its backward then runs through the differentiable reference.")


torch.library.register_autograd("handlstm::lstm_backward", _lstm_backward_not_differentiable,
                                setup_context=lambda ctx, inputs, output: None)

# Device types with autocast kernels: those the op has backends for.
_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_cast(args, device_type):
    """Cast as autocast's lower-precision policy does: each floating tensor on device_type,
    except float64, to the autocast dtype in force; everything else as it is."""
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        a.to(dtype) if (isinstance(a, torch.Tensor) and a.is_floating_point()
                        and a.dtype != torch.float64 and a.device.type == device_type) else a
        for a in args)


_autocast_lib = torch.library.Library("handlstm", "IMPL")


def _register_autocast(name, device_type):
    op = getattr(_ops, name).default

    # torch.library.register_autocast takes one fixed dtype; this follows the dtype of the
    # autocast region instead (float16 or bfloat16 on CUDA).
    def kernel(*args):
        cast = _autocast_cast(args, device_type)
        with torch.autocast(device_type, enabled=False):
            return op(*cast)

    key = "Autocast" + {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    _autocast_lib.impl(name, kernel, key)


for _name in ("lstm_forward", "lstm_backward"):
    for _device_type in _AUTOCAST_DEVICES:
        _register_autocast(_name, _device_type)

def _zero_states(input, weight_ih, weight_hr, h0, c0):
    if not isinstance(input, torch.Tensor) or input.dim() != 3:
        raise ValueError("lstm: input must be a 3-D tensor (T, N, I) when h0 or c0 is None, got "
                         f"{getattr(input, 'shape', type(input).__name__)}")
    N, H = input.shape[1], weight_ih.shape[0] // 4
    Hout = weight_hr.shape[0] if weight_hr is not None else H
    if h0 is None:
        h0 = input.new_zeros((N, Hout))
    if c0 is None:
        c0 = input.new_zeros((N, H))
    return h0, c0


def lstm(input, h0, c0, weight_ih, weight_hh, bias=None, *, weight_hr=None, batch_sizes=None,
         reverse=False):
    """One LSTM layer in one direction on the fused kernels.

    Args:
        input: (T, N, I).
        h0: (N, Hout) initial hidden state; c0: (N, H) initial cell state; None means
            zeros of input's dtype and device.
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

    Every tensor argument except batch_sizes is differentiable, twice (create_graph=True).
    All tensors must share one dtype (float32, float64, bfloat16, float16) and device; errors
    name the argument. Under torch.autocast (CPU or CUDA), float32/16 tensors are first cast to
    the autocast dtype, as autocast casts its lower-precision ops; outputs are in that dtype.
    """
    if not isinstance(reverse, bool):
        raise TypeError(f"lstm: reverse must be a bool, got {type(reverse).__name__}")
    if h0 is None or c0 is None:
        h0, c0 = _zero_states(input, weight_ih, weight_hr, h0, c0)
    args = (input, h0, c0, weight_ih, weight_hh, bias, weight_hr)
    device_type = input.device.type if isinstance(input, torch.Tensor) else None
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        # Cast here, outside LSTMFunction, so autograd records the casts and float32 leaves
        # get float32 gradients. The op's autocast kernel then finds nothing left to cast.
        args = _autocast_cast(args, device_type)
    output, h_n, c_n, _, _, _ = LSTMFunction.apply(*args, batch_sizes, reverse)
    return output, h_n, c_n
