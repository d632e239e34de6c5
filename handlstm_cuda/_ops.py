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

import contextlib
import inspect
import json
import os
import warnings

import torch

from . import _ext  # noqa: F401  (registers torch.ops.handlstm)
from . import reference

__all__ = ["lstm", "LSTMFunction"]

_ops = torch.ops.handlstm


def _check_like_input(op, input, named):
    """The kernels' dtype and device checks (csrc/lstm_driver.cpp), for the fake kernels: a
    meta or fake tensor mixed with tensors of another device is refused, as on real devices,
    instead of producing outputs on input's device."""
    for name, t in named:
        if t is None:
            continue
        if t.dtype != input.dtype:
            raise RuntimeError(f"{op}: {name} must have the dtype of input ({input.dtype}), "
                               f"got {t.dtype}")
        if t.device != input.device:
            raise RuntimeError(f"{op}: {name} must be on input's device ({input.device}), got "
                               f"{t.device}")


@torch.library.register_fake("handlstm::lstm_forward")
def _lstm_forward_fake(input, h0, c0, weight_ih, weight_hh, bias, weight_hr, batch_sizes, reverse):
    _check_like_input("handlstm.lstm_forward", input, (
        ("h0", h0), ("c0", c0), ("weight_ih", weight_ih), ("weight_hh", weight_hh),
        ("bias", bias), ("weight_hr", weight_hr)))
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
                        weight_hr, output, gates, cells, proj_in, batch_sizes, reverse,
                        output_mask=(True,) * 5):
    def grad(wanted, like):
        if not wanted or like is None:
            return input.new_empty((0,))
        return torch.empty_like(like, memory_format=torch.contiguous_format)

    _check_like_input("handlstm.lstm_backward", input, (
        ("grad_output", grad_output), ("grad_h_n", grad_h_n), ("grad_c_n", grad_c_n),
        ("h0", h0), ("c0", c0), ("weight_ih", weight_ih), ("weight_hh", weight_hh),
        ("weight_hr", weight_hr), ("output", output), ("gates", gates), ("cells", cells),
        ("proj_in", proj_in)))
    want_input, want_w_ih, want_w_hh, want_bias, want_w_hr = output_mask
    return (
        grad(want_input, input),
        torch.empty_like(h0, memory_format=torch.contiguous_format),
        torch.empty_like(c0, memory_format=torch.contiguous_format),
        grad(want_w_ih, weight_ih),
        grad(want_w_hh, weight_hh),
        input.new_empty((weight_ih.shape[0],) if want_bias else (0,)),
        grad(want_w_hr, weight_hr),
    )


def _tracked(t):
    """Whether autograd records ops on t here. A tensor captured by a torch.func transform that
    has since returned (a vjp_fn called later) still reports requires_grad, but is not tracked."""
    if t is None or not t.requires_grad:
        return False
    with torch.enable_grad():
        return t.view_as(t).requires_grad


def _reference_grads(inputs, grads, needs_input_grad):
    """Gradients through the differentiable reference, with a graph (double backward).

    inputs: the op's nine arguments; grads: the gradients of (output, h_n, c_n), None where
    undefined; needs_input_grad: one bool per argument.
    """
    wanted = [k for k in range(7) if needs_input_grad[k]]
    result = [None] * 9
    pairs = [(o, g) for o, g in zip(("output", "h_n", "c_n"), grads) if g is not None]
    if not wanted or not pairs:
        return tuple(result)
    # A wanted input that is not tracked here only needs its first derivative: differentiate
    # a detached leaf in its place.
    leaves = list(inputs)
    for k in wanted:
        if not _tracked(leaves[k]):
            leaves[k] = leaves[k].detach().requires_grad_()
    input, h0, c0, weight_ih, weight_hh, bias, weight_hr, batch_sizes, reverse = leaves
    with torch.enable_grad():
        outs = dict(zip(("output", "h_n", "c_n"),
                        reference.lstm(input, h0, c0, weight_ih, weight_hh, bias,
                                       weight_hr=weight_hr, batch_sizes=batch_sizes,
                                       reverse=reverse)))
        found = torch.autograd.grad([outs[name] for name, _ in pairs],
                                    [leaves[k] for k in wanted], [g for _, g in pairs],
                                    create_graph=True, allow_unused=True)
    for k, g in zip(wanted, found):
        result[k] = g
    return tuple(result)


# Device types with an autocast rule: those the op has kernels for.
_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_active(device_type):
    return device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type)


def _autocast_cast(args, device_type):
    """Cast as autocast's lower-precision policy does: each floating tensor on device_type,
    except float64, to the autocast dtype in force; everything else as it is."""
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        a.to(dtype) if (isinstance(a, torch.Tensor) and a.is_floating_point()
                        and a.dtype != torch.float64 and a.device.type == device_type) else a
        for a in args)


def _autocast_off(device_type):
    """A context with autocast disabled for device_type when it was on; otherwise a no-op."""
    if _autocast_active(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class LSTMFunction(torch.autograd.Function):
    """Differentiable wrapper of the fused op.

    forward returns (output, h_n, c_n, gates, cells, proj_in); the last three are saved
    activations, marked non-differentiable. backward runs `handlstm::lstm_backward`. When a
    graph of the gradient is requested (create_graph=True, as in double backward or nested
    torch.func transforms) and can be recorded, backward instead differentiates the pure-PyTorch
    reference, so second derivatives are exact rather than silently missing.

    Both directions run in the dtypes they are given, autocast or not: a cast made inside a
    Function would be invisible to autograd and leave the saved tensors in the wrong dtype.
    `lstm()` applies autocast's cast before calling it.
    """

    @staticmethod
    def forward(input, h0, c0, weight_ih, weight_hh, bias, weight_hr, batch_sizes, reverse):
        with _autocast_off(input.device.type):
            return _ops.lstm_forward(input, h0, c0, weight_ih, weight_hh, bias, weight_hr,
                                     batch_sizes, reverse)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, h0, c0, weight_ih, weight_hh, bias, weight_hr, batch_sizes, reverse = inputs
        out, _, _, gates, cells, proj_in = output
        ctx.mark_non_differentiable(gates, cells, proj_in)
        # Unused outputs (h_n, c_n, and always the saved activations) arrive as None rather than
        # as freshly zero-filled tensors; the backward op takes None for "no gradient".
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(input, h0, c0, weight_ih, weight_hh, bias, weight_hr, batch_sizes,
                              out, gates, cells, proj_in)
        ctx.reverse = reverse

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n, *_unused):
        (input, h0, c0, weight_ih, weight_hh, bias, weight_hr, batch_sizes,
         out, gates, cells, proj_in) = ctx.saved_tensors
        with _autocast_off(input.device.type):
            # A graph of the gradient can only be recorded when grad mode is on (create_graph)
            # and something here is tracked; otherwise the fused kernel gives the same numbers.
            differentiable = (grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih,
                              weight_hh, bias, weight_hr)
            if torch.is_grad_enabled() and any(_tracked(t) for t in differentiable):
                inputs = (input, h0, c0, weight_ih, weight_hh, bias, weight_hr, batch_sizes,
                          ctx.reverse)
                return _reference_grads(inputs, (grad_output, grad_h_n, grad_c_n),
                                        ctx.needs_input_grad)
            # Gradients nobody asked for (an input that does not require grad, frozen weights)
            # are not computed: the first layer's dx alone is a GEMM over all steps.
            need = ctx.needs_input_grad
            mask = [need[0], need[3], need[4], need[5] and bias is not None,
                    need[6] and weight_hr is not None]
            (d_input, d_h0, d_c0, d_w_ih, d_w_hh, d_bias, d_w_hr) = _ops.lstm_backward(
                grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh, weight_hr,
                out, gates, cells, proj_in, batch_sizes, ctx.reverse, mask)
        grads = (d_input, d_h0, d_c0, d_w_ih, d_w_hh, d_bias, d_w_hr)
        wanted = (mask[0], True, True, mask[1], mask[2], mask[3], mask[4])
        return tuple(g if w else None for g, w in zip(grads, wanted)) + (None, None)


# Function.apply binds its arguments to forward's signature on every call (a Function with
# setup_context), and inspect.signature would rebuild that signature each time: about 20 us of
# a small call. Given once here, inspect takes it as it is.
LSTMFunction.forward.__signature__ = inspect.signature(LSTMFunction.forward)


# The same formula makes the bare op differentiable (and satisfies opcheck's autograd test).
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


_autocast_lib = torch.library.Library("handlstm", "IMPL")


def _register_autocast(name, device_type):
    op = getattr(_ops, name).default

    # Like torch.library.register_autocast, except that it follows the dtype of the autocast
    # region (float16 or bfloat16) instead of one fixed at registration. Autocast sits above
    # autograd in the dispatcher, so these casts are recorded and gradients reach float32
    # tensors as float32.
    def kernel(*args):
        cast = _autocast_cast(args, device_type)
        with torch.autocast(device_type, enabled=False):
            return op(*cast)

    _autocast_lib.impl(name, kernel, "Autocast" + device_type.upper())


for _name in ("lstm_forward", "lstm_backward"):
    for _device_type in _AUTOCAST_DEVICES:
        _register_autocast(_name, _device_type)


# The CUDA kernels compile in CI but have not yet run on a GPU, so they stay off by default:
# CUDA tensors take the differentiable reference unless HANDLSTM_CUDA_KERNELS=1 (read at
# import) or set_cuda_kernels_enabled(True). Remove this switch once benchmarks/gpu_check.sh
# has passed on a GPU and its results are committed under benchmarks/results/.
_cuda_kernels_enabled = os.environ.get("HANDLSTM_CUDA_KERNELS", "0") == "1"
_warned_cuda_fallback = False


# Which time loop CUDA calls take (csrc/cuda_loop_choice.cpp): "generic" (a cuBLAS GEMM and a
# fused pointwise kernel per step), "persistent" (one launch for all steps, the recurrent
# weight in shared memory of one block or split across blocks, wherever the call is in scope:
# no projection, no packed batch), "auto" (the persistent loops or the graph loop where
# measured crossovers say it wins) or "graph" (the generic loop captured in a CUDA graph per
# call signature and replayed, csrc/lstm_cuda_graph.cpp). None of these has run on a GPU
# either, so the default is "generic"; HANDLSTM_CUDA_LOOP (or the shorthand
# HANDLSTM_CUDA_PERSISTENT=1) is read at import. They only take effect where the fused CUDA
# kernels run at all (see above).
CUDA_TIME_LOOPS = ("generic", "persistent", "auto", "graph")

# Measured crossovers shipped with the package (written by benchmarks/persistent.py on a GPU),
# read by the "auto" mode; absent until a GPU run has produced them.
_DEFAULT_CROSSOVERS = os.path.join(os.path.dirname(__file__), "cuda_crossovers.json")


def cuda_time_loop():
    """The time loop CUDA calls take: 'generic', 'persistent', 'auto' or 'graph'."""
    return CUDA_TIME_LOOPS[_ext._C._cuda_loop_mode()]


def set_cuda_time_loop(mode):
    """Choose the CUDA time loop for this process: 'generic', 'persistent' (wherever one of the
    persistent designs can run), 'auto' (the persistent or the graph loop where the crossover
    table says it wins, else the generic one; see load_cuda_crossovers) or 'graph'.

    'graph' serves each call from a CUDA graph of the generic loop, captured the second time a
    call signature (shapes, dtypes, device, which optional tensors are given, the direction,
    the cuBLAS settings such as TF32, the stream's priority) is seen and replayed after that,
    so the host issues one launch per call instead of a few per step. Each cached graph keeps
    copies of its call's inputs and outputs: up to 32 signatures and 1 GiB of copies, the
    least recently used dropped first; a call whose copies would exceed 256 MiB is not
    captured, since the GPU, not the host, sets the pace there; clear_cuda_graphs() frees
    them. Packed sequences, calls made while the caller's stream is itself being captured, and
    calls under torch.use_deterministic_algorithms(True) run the generic loop eagerly. Should
    a capture ever fail, a warning says so and that signature (or, if torch could not finish
    the capture, the whole graph loop) runs the generic loop eagerly from then on."""
    if mode not in CUDA_TIME_LOOPS:
        raise ValueError(f"set_cuda_time_loop: mode must be one of {CUDA_TIME_LOOPS}, got {mode!r}")
    _ext._C._set_cuda_loop_mode(CUDA_TIME_LOOPS.index(mode))


def clear_cuda_graphs():
    """Drop the CUDA graphs (and their copies of inputs and outputs) that the 'graph' time loop
    has cached, after the work queued on them; each signature is captured again the second
    time it is next seen."""
    _ext._C._clear_cuda_graphs()


def cuda_persistent_enabled():
    """Whether CUDA calls in the persistent loops' scope run them unconditionally (the
    'persistent' time loop)."""
    return cuda_time_loop() == "persistent"


def set_cuda_persistent_enabled(enabled):
    """Shorthand: set_cuda_time_loop('persistent' if enabled else 'generic')."""
    set_cuda_time_loop("persistent" if enabled else "generic")


_CROSSOVER_DTYPES = ("float32", "float64", "bfloat16", "float16")


def load_cuda_crossovers(path):
    """Load a crossover table for the 'auto' time loop, replacing the current one; returns its
    number of points. `path` is a JSON file as benchmarks/persistent.py writes it:

        {"device": "NVIDIA H200",            # the GPU model (torch.cuda.get_device_name())
         "points": [{"dtype": "float32", "forward": true, "N": 8, "H": 256, "T": 100,
                     "persistent_wins": true, "graph_wins": false}, ...]}

    `forward` entries come from forward-only timings and steer the forward loop; the others,
    from forward+backward timings, steer the backward loop. `persistent_wins` says the
    persistent loops beat the generic one at that point, `graph_wins` (optional, default false)
    that the graph loop did; at most one of them is true. A call follows the nearest point of
    its dtype and direction (in octaves of N and H, T a quarter as much; among equally near
    points, a loop other than the generic one only if all of them chose it); one farther than
    two octaves from every point, or on another GPU model, takes the generic loop. None clears
    the table. A malformed file is a ValueError naming the file, the point and the field, and
    leaves the table in force unchanged.
    """
    if path is None:
        _ext._C._set_cuda_crossovers("", [])
        return 0
    where = f"load_cuda_crossovers({str(path)!r})"
    with open(path) as f:
        try:
            table = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a JSON object with 'device' and 'points', got "
                         f"{type(table).__name__}")
    if not isinstance(table.get("device"), str):
        raise ValueError(f"{where}: 'device' must be a string (the GPU model's name), got "
                         f"{table.get('device')!r}")
    points = table.get("points")
    if not isinstance(points, list):
        raise ValueError(f"{where}: 'points' must be a list, got {type(points).__name__}")
    rows = []
    for i, p in enumerate(points):
        if not isinstance(p, dict):
            raise ValueError(f"{where}: point {i} must be an object, got {type(p).__name__}")
        missing = [k for k in ("dtype", "forward", "N", "H", "T", "persistent_wins")
                   if k not in p]
        if missing:
            raise ValueError(f"{where}: point {i} lacks {', '.join(missing)}")
        dtype, forward, wins = p["dtype"], p["forward"], p["persistent_wins"]
        graph = p.get("graph_wins", False)
        N, H, T = p["N"], p["H"], p["T"]  # noqa: N806 -- the shape vocabulary
        if dtype not in _CROSSOVER_DTYPES:
            raise ValueError(f"{where}: point {i}: dtype must be one of {_CROSSOVER_DTYPES}, "
                             f"got {dtype!r}")
        if not (isinstance(forward, bool) and isinstance(wins, bool)
                and isinstance(graph, bool)):
            raise ValueError(f"{where}: point {i}: forward, persistent_wins and graph_wins must "
                             f"be true or false, got {forward!r}, {wins!r}, {graph!r}")
        if wins and graph:
            raise ValueError(f"{where}: point {i}: persistent_wins and graph_wins cannot both "
                             "be true")
        for name, v in (("N", N), ("H", H), ("T", T)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 2 ** 62:
                raise ValueError(f"{where}: point {i}: {name} must be a positive integer "
                                 f"below 2**62, got {v!r}")
        rows.append((dtype, forward, N, H, T, wins, graph))
    _ext._C._set_cuda_crossovers(table["device"], rows)
    return len(rows)


def _init_cuda_time_loop():
    """The shipped crossover table and the environment's mode, read at import. Neither may make
    the package unusable: a bad table or value is a warning, and the table stays empty."""
    if os.path.exists(_DEFAULT_CROSSOVERS):
        try:
            load_cuda_crossovers(_DEFAULT_CROSSOVERS)
        except (OSError, ValueError, RuntimeError) as e:
            warnings.warn(f"handlstm_cuda: the shipped crossover table is unusable, so the "
                          f"'auto' CUDA time loop is the generic loop everywhere: {e}",
                          stacklevel=2)
    # HANDLSTM_CUDA_LOOP wins over the older shorthand HANDLSTM_CUDA_PERSISTENT=1.
    mode = os.environ.get("HANDLSTM_CUDA_LOOP") or None
    if mode is None and os.environ.get("HANDLSTM_CUDA_PERSISTENT", "0") == "1":
        mode = "persistent"
    if mode is not None:
        if mode not in CUDA_TIME_LOOPS:
            warnings.warn(f"handlstm_cuda: HANDLSTM_CUDA_LOOP={mode!r} is not one of "
                          f"{CUDA_TIME_LOOPS}; keeping {cuda_time_loop()!r}", stacklevel=2)
        else:
            set_cuda_time_loop(mode)


_init_cuda_time_loop()


def cuda_kernels_enabled():
    """Whether `lstm` runs our CUDA kernels for CUDA tensors (else the reference path)."""
    return _cuda_kernels_enabled


def set_cuda_kernels_enabled(enabled):
    """Turn the not-yet-GPU-verified CUDA kernels on or off for this process."""
    global _cuda_kernels_enabled
    _cuda_kernels_enabled = bool(enabled)


def _cuda_fallback_warning():
    global _warned_cuda_fallback
    if not _warned_cuda_fallback and not torch.compiler.is_compiling():
        _warned_cuda_fallback = True
        warnings.warn(
            "handlstm_cuda: the CUDA kernels have not been verified on a GPU yet, so CUDA "
            "tensors run the pure-PyTorch reference (correct, slower). Set "
            "HANDLSTM_CUDA_KERNELS=1 to use the fused CUDA kernels.", stacklevel=3)


def _check_tensor_args(named):
    """TypeError naming the first argument that is neither a tensor nor (where allowed) None:
    the op itself would only say that some argument has the wrong type."""
    for name, value, optional in named:
        if value is None and optional:
            continue
        if not isinstance(value, torch.Tensor):
            kind = "a tensor or None" if optional else "a tensor"
            raise TypeError(f"lstm: {name} must be {kind}, got {type(value).__name__}")


def _zero_states(input, weight_ih, weight_hr, h0, c0):
    if input.dim() != 3:
        raise ValueError(f"lstm: input must be 3-D with shape (T, N, I), got a {input.dim()}-D "
                         f"tensor of shape {tuple(input.shape)}")
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
    _check_tensor_args((("input", input, False), ("h0", h0, True), ("c0", c0, True),
                        ("weight_ih", weight_ih, False), ("weight_hh", weight_hh, False),
                        ("bias", bias, True), ("weight_hr", weight_hr, True),
                        ("batch_sizes", batch_sizes, True)))
    if h0 is None or c0 is None:
        h0, c0 = _zero_states(input, weight_ih, weight_hr, h0, c0)
    args = (input, h0, c0, weight_ih, weight_hh, bias, weight_hr)
    if _autocast_active(input.device.type):
        # Cast here, outside LSTMFunction, so that autograd records the casts and float32
        # leaves get float32 gradients.
        args = _autocast_cast(args, input.device.type)
    if input.is_cuda and not _cuda_kernels_enabled:
        _cuda_fallback_warning()
        return reference.lstm(*args[:6], weight_hr=args[6], batch_sizes=batch_sizes,
                              reverse=reverse)
    if _records_autograd():
        output, h_n, c_n, _, _, _ = LSTMFunction.apply(*_distinct(args), batch_sizes, reverse)
    else:
        # Nothing to differentiate: the op itself, without autograd.Function's per-call cost
        # (about 35 us, most of an LSTMCell step), autocast off as LSTMFunction.forward has it.
        with _autocast_off(input.device.type):
            output, h_n, c_n, _, _, _ = _ops.lstm_forward(*args, batch_sizes, reverse)
    return output, h_n, c_n


def _records_autograd():
    """Whether lstm() goes through LSTMFunction: always with grad mode on, under torch.compile
    and torch.export (which trace LSTMFunction whole), and under torch.func transforms (whose
    errors and rules live on the Function); otherwise (no_grad, inference_mode) the bare op
    gives the same results."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return True
    transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return transforms_active is None or transforms_active()


def _distinct(args):
    """args with every repeat of a tensor object (lstm(x, h, h, ...)) replaced by a view of it.
    Autograd adds up the gradients of the aliases either way, but torch.compile's fullgraph
    mode refuses an autograd.Function given one tensor twice."""
    # `is`, not id(): under torch.compile id() would guard on the objects themselves, so that
    # every new input tensor would recompile.
    out = list(args)
    for i, t in enumerate(args):
        if t is not None and any(t is u for u in args[:i]):
            out[i] = t.view_as(t)
    return out
