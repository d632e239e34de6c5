"""The fused op `handlstm_cuda.lstm`: gradients, parity with nn.LSTM and the reference, errors.

Shape vocabulary: T time, N batch, I input, H hidden, G = 4H, P projection size.
"""

import os
import re
import shutil

import numpy as np
import pytest
import torch

import handlstm_cuda as hl
from handlstm_cuda import reference
from conftest import device_params, make_args, packed_batch_sizes

# (T, N, I, H, P): the awkward ones first. H=33 is not a multiple of 8 (the CPU SIMD width) or
# 32 (a warp), so the vector loops' scalar tails and partial warps are exercised.
SHAPES = [
    pytest.param((3, 2, 4, 5, 0), id="T3-N2-I4-H5"),
    pytest.param((1, 2, 3, 4, 0), id="T1"),
    pytest.param((3, 1, 2, 3, 0), id="N1"),
    pytest.param((2, 2, 3, 1, 0), id="H1"),
    pytest.param((2, 2, 3, 33, 0), id="H33"),
    pytest.param((4, 3, 9, 2, 0), id="I9-H2"),
    pytest.param((3, 2, 4, 5, 3), id="proj-P3"),
]


def _call(args, *, given_state=True, **kw):
    x, h0, c0, w_ih, w_hh, b, w_hr = args
    if not given_state:
        h0 = c0 = None
    return hl.lstm(x, h0, c0, w_ih, w_hh, b, weight_hr=w_hr, **kw)


def _diff_inputs(args, given_state=True):
    x, h0, c0, w_ih, w_hh, b, w_hr = args
    cand = [x, h0, c0, w_ih, w_hh, b, w_hr] if given_state else [x, w_ih, w_hh, b, w_hr]
    return [t for t in cand if t is not None]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("given_state", [True, False], ids=["h0c0", "zero-state"])
def test_gradcheck_float64(device, shape, bias, given_state):
    T, N, I, H, P = shape
    args = make_args(T, N, I, H, P, bias=bias, device=device)
    x, h0, c0, w_ih, w_hh, b, w_hr = args

    def f(*inputs):
        it = iter(inputs)
        full = [next(it) if (t is not None and (given_state or k not in (1, 2))) else None
                for k, t in enumerate(args)]
        if not given_state:
            full[1] = full[2] = None
        return _call(tuple(full), given_state=given_state)

    assert torch.autograd.gradcheck(f, _diff_inputs(args, given_state), fast_mode=(H > 8))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("P", [0, 2], ids=["noproj", "proj"])
def test_gradcheck_packed(device, reverse, P):
    lengths = [4, 4, 2, 1]
    args = make_args(4, 4, 3, 3, P, device=device)
    bs = packed_batch_sizes(lengths)

    def f(*inputs):
        full = list(inputs) + [None] * (7 - len(inputs))
        return _call(tuple(full), batch_sizes=bs, reverse=reverse)

    assert torch.autograd.gradcheck(f, _diff_inputs(args))


def _nn_lstm_like(args, dtype, device):
    x, h0, c0, w_ih, w_hh, b, w_hr = args
    H = w_ih.shape[0] // 4
    P = 0 if w_hr is None else w_hr.shape[0]
    m = torch.nn.LSTM(x.shape[2], H, bias=b is not None, proj_size=P, dtype=dtype, device=device)
    with torch.no_grad():
        m.weight_ih_l0.copy_(w_ih)
        m.weight_hh_l0.copy_(w_hh)
        if b is not None:
            # nn.LSTM adds its two biases; splitting ours into (b, 0) gives the same sum.
            m.bias_ih_l0.copy_(b)
            m.bias_hh_l0.zero_()
        if w_hr is not None:
            m.weight_hr_l0.copy_(w_hr)
    return m


def _ours_and_nn(args, dtype, device, seed=11):
    """(values, grads) of our op and of nn.LSTM with the same weights, for the same random
    output gradients; values are (output, h_n, c_n), grads follow _diff_inputs order (the bias
    gradient taken from nn.LSTM's bias_ih, after checking bias_hh got the same)."""
    x, h0, c0, w_ih, w_hh, b, w_hr = args
    m = _nn_lstm_like(args, dtype, device)
    ours = _call(args)
    x2 = x.detach().clone().requires_grad_()
    h02 = h0.detach().clone().unsqueeze(0).requires_grad_()
    c02 = c0.detach().clone().unsqueeze(0).requires_grad_()
    out2, (h_n2, c_n2) = m(x2, (h02, c02))
    theirs = (out2, h_n2[0], c_n2[0])
    gen = torch.Generator().manual_seed(seed)
    g = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t) for t in ours]
    our_grads = torch.autograd.grad(ours, _diff_inputs(args), g)
    nn_inputs = [x2, h02, c02, m.weight_ih_l0, m.weight_hh_l0]
    nn_inputs += [m.bias_ih_l0, m.bias_hh_l0] if b is not None else []
    nn_inputs += [m.weight_hr_l0] if w_hr is not None else []
    nn_grads = list(torch.autograd.grad(theirs, nn_inputs, g))
    nn_grads[1], nn_grads[2] = nn_grads[1][0], nn_grads[2][0]
    if b is not None:
        # nn.LSTM's two biases receive the same gradient (up to its own summation order).
        torch.testing.assert_close(nn_grads[5], nn_grads[6])
        del nn_grads[6]
    return list(ours) + list(our_grads), list(theirs) + nn_grads


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(5, 3, 4, 7, 0), (1, 1, 1, 1, 0), (6, 4, 3, 33, 0),
                                   (4, 2, 5, 8, 3), (62, 8, 12, 64, 0)],
                         ids=["small", "T1N1H1", "H33", "proj", "seed-like"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_parity_with_nn_lstm(device, dtype, shape, bias):
    """Output, h_n, c_n and the gradient of every input and parameter equal nn.LSTM's.

    float64: both sides compute the same sums in a different order; 1e-10 leaves five orders
    of magnitude above the ~1e-15 rounding seen. float32: the recurrence amplifies rounding
    (gradients reach O(100) on the seed-like shape), so a fixed tolerance against nn.LSTM
    would be arbitrary. Instead both are measured against float64 and our error must stay
    within 2x nn.LSTM's own float32 error (plus 1e-6 relative, for entries both get exact)."""
    if device == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    T, N, I, H, P = shape
    args = make_args(T, N, I, H, P, bias=bias, dtype=dtype, device=device)
    ours, theirs = _ours_and_nn(args, dtype, device)
    assert len(ours) == len(theirs)
    if dtype == torch.float64:
        for a, e in zip(ours, theirs):
            torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)
        return
    args64 = tuple(None if t is None else t.detach().double().requires_grad_() for t in args)
    exact, _ = _ours_and_nn(args64, torch.float64, device)
    for k, (a, n, e) in enumerate(zip(ours, theirs, exact)):
        err_ours = (a.double() - e).abs().max().item()
        err_nn = (n.double() - e).abs().max().item()
        scale = e.abs().max().item()
        assert err_ours <= 2 * err_nn + 1e-6 * scale, (k, err_ours, err_nn, scale)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("case", [
    dict(shape=(5, 3, 4, 7, 0)),
    dict(shape=(5, 3, 4, 7, 0), reverse=True),
    dict(shape=(6, 5, 3, 9, 4), lengths=[6, 5, 5, 2, 1]),
    dict(shape=(6, 5, 3, 9, 4), lengths=[6, 5, 5, 2, 1], reverse=True),
    dict(shape=(6, 5, 3, 16, 0), lengths=[6, 6, 3, 3, 1], reverse=True),
    dict(shape=(3, 4, 3, 5, 0), lengths=[3, 1, 1, 1]),
], ids=["plain", "reverse", "packed-proj", "packed-proj-reverse", "packed-H16-reverse",
        "packed-short"])
def test_parity_with_reference_float64(device, case):
    T, N, I, H, P = case["shape"]
    args = make_args(T, N, I, H, P, device=device, seed=3)
    kw = dict(reverse=case.get("reverse", False))
    if "lengths" in case:
        kw["batch_sizes"] = packed_batch_sizes(case["lengths"])
    x, h0, c0, w_ih, w_hh, b, w_hr = args
    ours = _call(args, **kw)
    ref = reference.lstm(x, h0, c0, w_ih, w_hh, b, weight_hr=w_hr, **kw)
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)
    g = [torch.randn_like(t) for t in ours]
    for a, e in zip(torch.autograd.grad(ours, _diff_inputs(args), g),
                    torch.autograd.grad(ref, _diff_inputs(args), g)):
        torch.testing.assert_close(a, e, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("device,dtype", [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.cuda),
    pytest.param("cuda", torch.float16, id="cuda-f16", marks=pytest.mark.cuda),
])
def test_low_precision_error_relative_to_baseline(device, dtype):
    """Our low-precision error against float64 stays within a small factor of the error of the
    same math done with plain torch ops in that precision (the reference run in `dtype`)."""
    args64 = make_args(20, 8, 12, 32, device=device, requires_grad=False, seed=5)
    exact = reference.lstm(*args64[:6])
    low = [None if t is None else t.to(dtype) for t in args64]
    ours = hl.lstm(*low[:6])
    base = reference.lstm(*low[:6])
    for o, b, e in zip(ours, base, exact):
        assert o.dtype == dtype
        err_ours = (o.double() - e).abs().max().item()
        err_base = (b.double() - e).abs().max().item()
        assert err_ours <= 2.0 * err_base + 1e-3, (err_ours, err_base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_every_cpu_path_matches_reference(cpu_path, dtype):
    """H = 37: one 16-lane and one 8-lane block plus a scalar tail on every SIMD path."""
    args = make_args(5, 4, 3, 37, 0, dtype=dtype, seed=9)
    x, h0, c0, w_ih, w_hh, b, w_hr = args
    ours = _call(args)
    args64 = [None if t is None else t.detach().double().requires_grad_() for t in args]
    ref = reference.lstm(*args64[:6])
    g = [torch.randn(t.shape, dtype=torch.float64) for t in ours]
    ours_g = torch.autograd.grad(ours, _diff_inputs(args), [t.to(dtype) for t in g])
    ref_g = torch.autograd.grad(ref, _diff_inputs(tuple(args64)), g)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    for a, e in zip(list(ours) + list(ours_g), list(ref) + list(ref_g)):
        torch.testing.assert_close(a.double(), e, **tol)


_LANES = 16  # H of the gate-math tests: whole AVX-512 and AVX2 vectors, no scalar tail


def _cell_of_gate(x, gate, bias_g=0.0):
    """c_1 of one step with p_gate = x elementwise and every other pre-activation 0, except
    p_g = bias_g (h_0 = c_0 = 0, so c_1 = i g).

    x is laid out (M, H = 16) with weight_ih's gate block the identity, so every vector lane
    of the CPU pointwise kernels sees values (H = 1 would leave everything to their scalar
    tails). gate 2 (g) gives c = tanh(x) / 2 (i = 1/2); gate 0 (i) with bias_g = 30 (g = 1
    exactly) gives c = sigmoid(x)."""
    H = _LANES
    x = torch.cat([x, x[-1:].expand((-x.numel()) % H)])
    M = x.numel() // H
    w_ih = torch.zeros(4 * H, H)
    w_ih[gate * H:(gate + 1) * H] = torch.eye(H)
    bias = torch.zeros(4 * H)
    bias[2 * H:3 * H] = bias_g
    zeros = torch.zeros(M, H)
    _, _, c = hl.lstm(x.view(1, M, H), zeros, zeros, w_ih, torch.zeros(4 * H, H), bias)
    return c.reshape(-1)


def test_cpu_float_gate_math_matches_float64(cpu_path):
    """The CPU float SIMD paths build tanh (and on AVX2, exp) themselves; check them across the
    whole range, on every lane."""
    x = torch.cat([torch.linspace(-12, 12, 20001), torch.logspace(-30, 1, 400),
                   -torch.logspace(-30, 1, 400)])
    n = x.numel()
    exact = torch.tanh(x.double())
    rel = (2 * _cell_of_gate(x, 2)[:n].double() - exact).abs() / exact.abs().clamp_min(1e-38)
    assert rel.max().item() < 4 * 2.0**-23

    exact = torch.sigmoid(x.double())
    rel = (_cell_of_gate(x, 0, bias_g=30.0)[:n].double() - exact).abs() / exact.abs()
    assert rel.max().item() < 4 * 2.0**-23


def test_cpu_float_gate_math_saturates_exactly_and_keeps_nan(cpu_path):
    """Beyond the exp clamp range the gates saturate to exact 0 / 1 / +-1, 0 maps to exact 0 and
    1/2, and NaN stays NaN (the clamp inside the CPU exp would drop it if it were not restored)."""
    x = torch.tensor([-1e30, -100.0, -88.9, 88.9, 100.0, 1e30, 0.0])
    # NaN gets a row of its own: the identity product would spread it over its row (NaN * 0).
    x = torch.cat([x, x[-1:].expand(_LANES - x.numel()), torch.full((_LANES,), float("nan"))])
    c = _cell_of_gate(x, 2)
    assert (2 * c[:6]).tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]
    assert c[6].item() == 0.0
    assert torch.isnan(c[_LANES:]).all()
    c = _cell_of_gate(x, 0, bias_g=30.0)
    assert c[:6].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert c[6].item() == 0.5
    assert torch.isnan(c[_LANES:]).all()


def test_zero_length_sequence_returns_initial_state():
    args = make_args(0, 3, 4, 5)
    out, h_n, c_n = _call(args)
    assert out.shape == (0, 3, 5)
    torch.testing.assert_close(h_n, args[1])
    torch.testing.assert_close(c_n, args[2])


def _toolkit_present():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return os.path.exists(os.path.join(home, "bin", "nvcc")) or shutil.which("nvcc") is not None


def test_build_has_cuda_kernels_when_torch_has_cuda():
    """A silently CPU-only build of a CUDA torch must fail here (HANDLSTM_FORCE_CPU opts out)."""
    expect = (torch.version.cuda is not None and _toolkit_present()
              and os.environ.get("HANDLSTM_FORCE_CPU", "0") != "1")
    assert hl.has_cuda_kernels() == expect


# ---- bad input: a clear error naming the argument, from Python and from the C++ op ----------

def _bad_cases():
    def mod(k, fn):
        def apply(a):
            a = list(a)
            a[k] = fn(a[k])
            return a
        return apply

    IDX = dict(input=0, h0=1, c0=2, weight_ih=3, weight_hh=4, bias=5, weight_hr=6)
    return [
        ("input-2d", mod(IDX["input"], lambda t: t[0]), r"input must be 3-D"),
        ("input-int", mod(IDX["input"], lambda t: t.long()),
         r"input must be float32, float64, float16 or bfloat16, got Long"),
        ("h0-batch", mod(IDX["h0"], lambda t: t[:2]),
         r"h0 must have shape \(N, Hout\) = \(3, 5\), got \(2, 5\)"),
        ("h0-3d", mod(IDX["h0"], lambda t: t.unsqueeze(0)), r"h0 must be 2-D"),
        ("c0-hidden", mod(IDX["c0"], lambda t: t[:, :4]),
         r"c0 must have shape \(N, H\) = \(3, 5\), got \(3, 4\)"),
        ("h0-int", mod(IDX["h0"], lambda t: t.long()),
         r"h0 must have the dtype of input \(Double\), got Long"),
        ("c0-float32", mod(IDX["c0"], lambda t: t.float()),
         r"c0 must have the dtype of input \(Double\), got Float"),
        ("weight_ih-cols", mod(IDX["weight_ih"], lambda t: t[:, :3]),
         r"weight_ih must have shape \(4H, I\) = \(20, 4\), got \(20, 3\)"),
        ("weight_ih-rows", mod(IDX["weight_ih"], lambda t: t[:19]),
         r"weight_ih must have 4H rows"),
        ("weight_hh", mod(IDX["weight_hh"], lambda t: torch.cat([t, t[:, :1]], 1)),
         r"weight_hh must have shape \(4H, Hout\) = \(20, 5\), got \(20, 6\)"),
        ("bias", mod(IDX["bias"], lambda t: t[:-1]),
         r"bias must have shape \(4H,\) = \(20,\), got \(19,\)"),
        ("bias-2d", mod(IDX["bias"], lambda t: t.view(4, 5)), r"bias must be 1-D"),
    ]


@pytest.mark.parametrize("name,mutate,pattern", _bad_cases(), ids=[c[0] for c in _bad_cases()])
@pytest.mark.parametrize("entry", ["lstm", "op"])
def test_bad_input_is_a_clear_error(name, mutate, pattern, entry):
    args = mutate(make_args(4, 3, 4, 5, 0, requires_grad=False))
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        if entry == "lstm":
            hl.lstm(*args[:6], weight_hr=args[6])
        else:
            torch.ops.handlstm.lstm_forward(*args, None, False)


def test_bad_weight_hr():
    args = list(make_args(4, 3, 4, 5, 2, requires_grad=False))
    args[6] = args[6][:, :4]
    with pytest.raises(RuntimeError, match=r"weight_hr must have shape \(P, H\) = \(2, 5\), "
                                           r"got \(2, 4\)"):
        hl.lstm(*args[:6], weight_hr=args[6])


@pytest.mark.parametrize("bs,pattern", [
    (torch.tensor([3, 2, 3, 1]), r"batch_sizes must be non-increasing"),
    (torch.tensor([3, 2, 1]), r"batch_sizes must have shape \(T,\) = \(4,\), got \(3,\)"),
    (torch.tensor([3.0, 2, 1, 1]), r"batch_sizes must be a 1-D int64 CPU tensor"),
    (torch.tensor([5, 2, 1, 1]), r"batch_sizes\[0\] = 5 is outside \[0, N\] = \[0, 3\]"),
], ids=["increasing", "length", "float", "too-large"])
def test_bad_batch_sizes(bs, pattern):
    args = make_args(4, 3, 4, 5, requires_grad=False)
    with pytest.raises(RuntimeError, match=pattern):
        hl.lstm(*args[:6], batch_sizes=bs)


@pytest.mark.parametrize("entry", ["lstm", "op"])
def test_a_shape_error_says_where_the_sizes_came_from(entry):
    """A weight_ih one column short is as likely an input one feature long: the message gives
    the sizes read off input and weight_ih, and input's shape."""
    args = list(make_args(6, 3, 4, 7, requires_grad=False))
    args[3] = torch.randn(28, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=re.escape(
            "weight_ih must have shape (4H, I) = (28, 4), got (28, 5) (T, N, I = 6, 3, 4 from "
            "input of shape (6, 3, 4); H = 7 from weight_ih's 28 rows; Hout = 7 = H)")):
        if entry == "lstm":
            hl.lstm(*args[:6])
        else:
            torch.ops.handlstm.lstm_forward(*args, None, False)


@pytest.mark.parametrize("k,name,optional", [(0, "input", False), (1, "h0", True),
                                             (2, "c0", True), (3, "weight_ih", False),
                                             (4, "weight_hh", False), (5, "bias", True)])
@pytest.mark.parametrize("value", [[[1.0]], np.zeros((2, 2)), 3.0],
                         ids=["list", "ndarray", "float"])
def test_a_non_tensor_argument_is_a_type_error_naming_it(k, name, optional, value):
    args = list(make_args(4, 3, 4, 5, requires_grad=False))[:6]
    args[k] = value
    kind = "a tensor or None" if optional else "a tensor"
    with pytest.raises(TypeError, match=re.escape(
            f"lstm: {name} must be {kind}, got {type(value).__name__}")):
        hl.lstm(*args)


@pytest.mark.parametrize("entry", ["lstm", "op"])
@pytest.mark.parametrize("meta", ["input", "weights"])
def test_meta_tensors_mixed_with_cpu_ones_are_an_error(entry, meta):
    """Meta tensors take the fake kernel, which checks devices as the real kernels do (it once
    returned meta outputs for a meta input with CPU weights)."""
    args = list(make_args(4, 3, 4, 5, requires_grad=False))
    if meta == "input":
        args[0] = args[0].to("meta")
        where, other = "meta", "cpu"
    else:
        args[3:6] = [t.to("meta") for t in args[3:6]]
        where, other = "cpu", "meta"
    with pytest.raises(RuntimeError, match=re.escape(
            f"must be on input's device ({where}), got {other}")):
        if entry == "lstm":
            hl.lstm(*args[:6])
        else:
            torch.ops.handlstm.lstm_forward(*args, None, False)


def test_meta_tensors_alone_give_meta_results_of_the_right_shapes():
    args = [t.to("meta") for t in make_args(4, 3, 6, 5, requires_grad=False)[:6]]
    out, h_n, c_n = hl.lstm(*args)
    assert (out.device.type, out.shape, h_n.shape, c_n.shape) == (
        "meta", (4, 3, 5), (3, 5), (3, 5))


@pytest.mark.cuda
def test_mixed_devices_are_an_error():
    args = list(make_args(4, 3, 4, 5, device="cuda", requires_grad=False))
    args[1] = args[1].cpu()
    with pytest.raises(RuntimeError, match=re.escape("h0 must be on input's device (cuda:0)")):
        hl.lstm(*args[:6])


def test_cuda_kernels_are_off_by_default_until_verified():
    """Until the CUDA kernels have run on a GPU, a fresh process keeps them off (the suite
    itself turns them on in conftest.py so that the CUDA tests exercise them)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "HANDLSTM_CUDA_KERNELS"}
    code = "import handlstm_cuda as h; print(h.cuda_kernels_enabled())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "False"
    env["HANDLSTM_CUDA_KERNELS"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("case", [
    dict(),
    dict(reverse=True),
    dict(P=3, lengths=True),
    dict(P=3, lengths=True, reverse=True),
    dict(lengths=True, reverse=True),
], ids=["plain", "reverse", "packed-proj", "packed-proj-reverse", "packed-reverse"])
def test_cpu_row_blocks_match_reference(case):
    """The CPU time loop runs blocks of rows on separate threads (see csrc/lstm_cpu.cpp); with
    N = 600 and 3 threads there are three blocks of 200 rows, packed lengths cross the block
    boundaries, and every block must still equal the float64 reference."""
    T, N, I, H = 7, 600, 3, 9
    P = case.get("P", 0)
    args = make_args(T, N, I, H, P, seed=7)
    kw = dict(reverse=case.get("reverse", False))
    if case.get("lengths"):
        kw["batch_sizes"] = packed_batch_sizes([1 + (k * 5) % T for k in range(N)])
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        ours = _call(args, **kw)
        g = [torch.randn_like(t) for t in ours]
        ours_grads = torch.autograd.grad(ours, _diff_inputs(args), g)
    finally:
        torch.set_num_threads(threads)
    x, h0, c0, w_ih, w_hh, b, w_hr = args
    ref = reference.lstm(x, h0, c0, w_ih, w_hh, b, weight_hr=w_hr, **kw)
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)
    for a, e in zip(ours_grads, torch.autograd.grad(ref, _diff_inputs(args), g)):
        torch.testing.assert_close(a, e, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("shape", [(20, 13, 5, 33, 0), (20, 13, 5, 33, 5), (8, 40, 2, 70, 17),
                                   (2, 1, 1, 1, 0), (7, 9, 5, 33, 4), (8, 8, 5, 33, 4)],
                         ids=["N13-H33", "N13-H33-P5", "N40-H70-P17", "all-one",
                              "63-rows-unpacked", "64-rows-packed"])
def test_cpu_float_step_gemms_at_awkward_sizes(cpu_path, shape):
    """Float32 on the AVX-512 / AVX2 paths multiplies by weights packed once per call
    (csrc/cpu/gemm_cpu.h) once the loop's steps take kMinPackedStepRows = 64 rows in all (63
    and 64 here; below, BLAS on the weights as they are), the input projection and dx too
    once T N reaches kMinPackedRows = 256 (below, as in the all-one case, BLAS), and sums the
    weight gradients with the same tiles; the scalar path calls BLAS.
    Row counts off the 8- and 6-row tiles, column counts off the 32- and 16-column panels
    (G = 132, 280; P = 5, 17 below one vector), and one block (N = 13) or two (N = 40, 3
    threads: blocks of at least 16 rows) must all equal the float64 reference; and since
    those kernels sum in a fixed order, the results of 1 and 3 threads are bitwise equal."""
    T, N, I, H, P = shape
    args = make_args(T, N, I, H, P, dtype=torch.float32, seed=11)
    results = []
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 3):
            torch.set_num_threads(n_threads)
            outs = _call(args)
            g = [torch.ones_like(t) * 0.5 for t in outs]
            results.append(list(outs) + list(torch.autograd.grad(outs, _diff_inputs(args), g)))
    finally:
        torch.set_num_threads(threads)
    def reference_results(dtype):
        leaves = tuple(None if t is None else t.detach().to(dtype).requires_grad_()
                       for t in args)
        outs = list(reference.lstm(*leaves[:6], weight_hr=leaves[6]))
        return outs + list(torch.autograd.grad(outs, _diff_inputs(leaves),
                                               [torch.ones_like(t) * 0.5 for t in outs]))

    # Float32 error over 20 steps of backpropagation grows with the values; the bar is the
    # float32 reference (plain PyTorch ops): at most 4x its error against float64.
    exact, baseline = reference_results(torch.float64), reference_results(torch.float32)
    for a, e, b in zip(results[0], exact, baseline):
        err = (a.double() - e).abs().max().item()
        base_err = (b.double() - e).abs().max().item()
        assert err <= max(4 * base_err, 1e-6 * max(1.0, e.abs().max().item())), (err, base_err)
    if cpu_path != "scalar":
        for k, (a, b) in enumerate(zip(*results)):
            assert torch.equal(a, b), k


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("P", [0, 2], ids=["noproj", "proj"])
def test_backward_output_mask_skips_only_what_is_masked(device, P):
    """lstm_backward's output_mask (grad_input, grad_weight_ih, grad_weight_hh, grad_bias,
    grad_weight_hr): a masked gradient comes back as (0,), every other one is bitwise what the
    full backward gives, and grad_h0 / grad_c0 are always there."""
    args = [t for t in make_args(4, 3, 5, 6, P, device=device, requires_grad=False)]
    x, h0, c0, w_ih, w_hh, b, w_hr = args
    saved = torch.ops.handlstm.lstm_forward(x, h0, c0, w_ih, w_hh, b, w_hr, None, False)
    gout = torch.randn_like(saved[0])

    def backward(mask):
        return torch.ops.handlstm.lstm_backward(gout, None, None, x, h0, c0, w_ih, w_hh, w_hr,
                                                *saved[:1], *saved[3:], None, False, mask)

    full = backward([True] * 5)
    positions = [0, 3, 4, 5, 6]  # where each mask entry's gradient sits in the result
    for k in range(5):
        mask = [j != k for j in range(5)]
        part = backward(mask)
        for j, pos in enumerate(positions):
            if j == k or (pos == 6 and not P):
                assert part[pos].shape == (0,)
            else:
                assert torch.equal(part[pos], full[pos])
        assert torch.equal(part[1], full[1]) and torch.equal(part[2], full[2])


def test_unrequested_gradients_are_not_computed_by_lstm():
    """An input that does not require grad (the usual first layer) and frozen weights get no
    gradient; the others equal those of a backward where everything requires grad."""
    args = make_args(4, 3, 5, 6)
    full = torch.autograd.grad(hl.lstm(*args[:6])[0].sum(), args[:6])
    leaves = [t.detach().requires_grad_(k not in (0, 3)) for k, t in enumerate(args[:6])]
    out = hl.lstm(*leaves)[0]
    out.sum().backward()
    assert leaves[0].grad is None and leaves[3].grad is None
    for k in (1, 2, 4, 5):
        assert torch.equal(leaves[k].grad, full[k])


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_calls_without_autograd_match_the_recorded_path(device, mode, monkeypatch):
    """With nothing to differentiate, lstm() calls the op without LSTMFunction (whose per-call
    cost was most of an LSTMCell step): the same results, bitwise, as a call that records a
    graph, packed and reverse included, and under autocast in the autocast dtype."""
    args = make_args(5, 3, 4, 6, 2, dtype=torch.float32, device=device, seed=23)
    kw = dict(batch_sizes=packed_batch_sizes([5, 3, 1]), reverse=True)
    recorded = [t.detach() for t in _call(args, **kw)]
    calls = []
    monkeypatch.setattr(hl._ops.LSTMFunction, "apply",
                        lambda *a: calls.append(1) or pytest.fail("LSTMFunction.apply called"))
    with getattr(torch, mode)():
        direct = _call(args, **kw)
    assert not calls
    for a, b in zip(direct, recorded):
        assert not a.requires_grad and torch.equal(a, b)
    if device == "cpu":
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            cast = _call(args, **kw)
        assert all(t.dtype == torch.bfloat16 for t in cast)
        monkeypatch.undo()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            recorded_cast = _call(args, **kw)
        for a, b in zip(cast, recorded_cast):
            assert torch.equal(a, b.detach())


def test_no_grad_under_a_torch_func_transform_still_goes_through_the_function():
    """vmap's clear error lives on LSTMFunction; under no_grad it must still be met."""
    x = torch.randn(3, 2, 1, 4)
    h = torch.zeros(1, 5)
    w_ih, w_hh = torch.randn(20, 4), torch.randn(20, 5)
    with torch.no_grad(), pytest.raises(RuntimeError, match="vmap over LSTMFunction"):
        torch.func.vmap(lambda x: hl.lstm(x, h, h, w_ih, w_hh)[0])(x)
