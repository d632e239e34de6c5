"""Robustness at the edges: malformed states, empty work, extreme values, odd memory layouts,
T = 1 with batch_first, partial losses, long sequences and steady memory.

Shape vocabulary: T time, N batch, I input, H hidden, G = 4H, P projection size, L layers,
D directions. docs/guarantees.md states the guarantees these tests hold the code to; the
property-based comparison with the reference is tests/test_fuzz.py.

Tolerances, where values are not compared bitwise: relative to the larger of 1 and the
reference's largest magnitude, 1e-10 in float64 and 1e-5 in float32 (both implementations
sum in different orders; see tests/test_modules.py for the reasoning).
"""

import os
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import handlstm_cuda as hl
from conftest import device_params, make_args
from handlstm_cuda import reference

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]

# nn.LSTM's float32 CPU path notes once that oneDNN lacks projections; not our concern here.
pytestmark = [pytest.mark.filterwarnings("ignore:LSTM with projections is not supported"),
              pytest.mark.usefixtures("one_thread")]



def assert_close(ours, ref, dtype, what=""):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    err = (ours - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def make_pair(*args, dtype=torch.float64, device="cpu", **kwargs):
    """(nn.LSTM, ours) with ours loaded from nn's state_dict."""
    ref = nn.LSTM(*args, **kwargs, dtype=dtype, device=device)
    ours = hl.LSTM(*args, **kwargs, dtype=dtype, device=device)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def loss_weights(outputs, seed=0):
    """One random weight per element of every output: the gradient grads_of feeds in."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outputs]


def grads_of(outputs, inputs, seed=0):
    """Gradients of a loss that weights every element of every output differently; None for
    an input the outputs do not depend on."""
    return torch.autograd.grad(outputs, inputs, loss_weights(outputs, seed), allow_unused=True)


# --------------------------------------------------------------------------------------------
# 1. Malformed hidden states: a clear error naming the argument, expected and actual
# --------------------------------------------------------------------------------------------

def _r(*shape, device="cpu", dtype=torch.float32):
    return torch.randn(*shape, device=device, dtype=dtype)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("L,bidirectional,h_first,c_first,bad,want,got", [
    (2, False, 2, 1, 1, (2, 3, 4), (1, 3, 4)),
    (2, False, 1, 2, 0, (2, 3, 4), (1, 3, 4)),
    (2, False, 1, 1, 0, (2, 3, 4), (1, 3, 4)),
    (1, True, 2, 3, 1, (2, 3, 4), (3, 3, 4)),
    (1, False, 2, 2, 0, (1, 3, 4), (2, 3, 4)),
], ids=["c0-short", "h0-short", "both-short", "bi-c0-long", "both-long"])
def test_state_first_dimension_mismatch_is_an_error(device, L, bidirectional, h_first, c_first,
                                                    bad, want, got):
    """h0 and c0 whose first dimension differs from each other or from L * D."""
    m = hl.LSTM(5, 4, L, bidirectional=bidirectional, device=device)
    hx = (_r(h_first, 3, 4, device=device), _r(c_first, 3, 4, device=device))
    message = f"Expected hidden[{bad}] size {want}, got {list(got)}"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        m(_r(7, 3, 5, device=device), hx)


@pytest.mark.parametrize("device", device_params())
def test_batch_first_state_error_hints_the_layout(device):
    """hx given as (N, L, H) by mistake with batch_first=True: nn.LSTM's message, plus a hint
    that batch_first never applies to hx (regression: the message alone did not say why)."""
    m = hl.LSTM(5, 4, batch_first=True, device=device)
    hx = (_r(3, 1, 4, device=device), _r(3, 1, 4, device=device))
    with pytest.raises(RuntimeError, match=re.escape(
            "Expected hidden[0] size (1, 3, 4), got [3, 1, 4]; hx is (num_layers * "
            "num_directions, N, H) even with batch_first=True")):
        m(_r(3, 7, 5, device=device), hx)


@pytest.mark.parametrize("device", device_params())
def test_batch_first_state_of_equal_layouts_is_accepted(device):
    """With N = L * D the two layouts have one shape; nothing to detect, and no false alarm."""
    torch.manual_seed(0)
    ref, ours = make_pair(5, 4, batch_first=True, device=device)
    x, hx = _r(1, 7, 5, device=device, dtype=torch.float64), (
        _r(1, 1, 4, device=device, dtype=torch.float64),
        _r(1, 1, 4, device=device, dtype=torch.float64))
    assert_close(ours(x, hx)[0], ref(x, hx)[0], torch.float64)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("which", [0, 1], ids=["h0", "c0"])
@pytest.mark.parametrize("state_dtype", [torch.int64, torch.int32, torch.float64],
                         ids=["int64", "int32", "float64"])
def test_state_dtype_mismatch_is_named_by_the_module(device, which, state_dtype):
    """Regression: an integer (or other-dtype) state reached the op and was reported as the
    op's `h0`, not as the module's hx."""
    m = hl.LSTM(5, 4, device=device)
    hx = [_r(1, 3, 4, device=device), _r(1, 3, 4, device=device)]
    hx[which] = hx[which].to(state_dtype)
    with pytest.raises(RuntimeError, match=re.escape(
            f"Expected hidden[{which}] dtype torch.float32 (the input's), got {state_dtype}")):
        m(_r(7, 3, 5, device=device), tuple(hx))


@pytest.mark.parametrize("device", device_params())
def test_integer_state_of_packed_input_is_an_error(device):
    m = hl.LSTM(5, 4, device=device)
    packed = nn.utils.rnn.pack_sequence([_r(3, 5, device=device), _r(2, 5, device=device)])
    hx = (torch.zeros(1, 2, 4, dtype=torch.long, device=device), _r(1, 2, 4, device=device))
    with pytest.raises(RuntimeError, match=re.escape("Expected hidden[0] dtype torch.float32")):
        m(packed, hx)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_lstm_cell_integer_state_is_an_error(device, batched):
    cell = hl.LSTMCell(3, 3, device=device)
    lead = (2,) if batched else ()
    hx = (torch.zeros(*lead, 3, dtype=torch.int64, device=device), _r(*lead, 3, device=device))
    with pytest.raises(RuntimeError, match=re.escape(
            "LSTMCell: Expected hx[0] dtype torch.float32 (the input's), got torch.int64")):
        cell(_r(*lead, 3, device=device), hx)


def test_lstm_cell_under_cpu_autocast_rejects_integer_state():
    """Regression: under CPU autocast LSTMCell cast both states to the weights' dtype, so an
    integer state ran silently."""
    cell = hl.LSTMCell(3, 3)
    hx = (torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match=re.escape("Expected hx[0] dtype")):
            cell(torch.randn(2, 3), hx)


@pytest.mark.parametrize("device", device_params())
def test_lstm_cell_lone_tensor_hx_error_names_shapes(device):
    """LSTMCell(3, 3) with input (3,) and one (2, 3, 3) tensor as hx. nn.LSTMCell unpacks the
    tensor along its first dimension and crashes in ATen; ours names the expected and actual
    shapes (regression: the message gave only the type)."""
    cell = hl.LSTMCell(3, 3, device=device)
    with pytest.raises(TypeError, match=re.escape(
            "LSTMCell: hx must be a tuple (h_0, c_0) of two tensors of shapes (3,) and (3,), "
            "got a Tensor of shape (2, 3, 3)")):
        cell(_r(3, device=device), _r(2, 3, 3, device=device))


@pytest.mark.parametrize("device", device_params())
def test_lstm_lone_tensor_hx_error_names_shapes(device):
    m = hl.LSTM(5, 4, 2, device=device)
    with pytest.raises(TypeError, match=re.escape(
            "LSTM: hx must be a tuple (h_0, c_0) of two tensors of shapes (2, 3, 4) and "
            "(2, 3, 4), got a Tensor of shape (2, 2, 3, 4)")):
        m(_r(7, 3, 5, device=device), _r(2, 2, 3, 4, device=device))


@pytest.mark.parametrize("device", device_params())
def test_lstm_cell_unbatched_input_with_batched_states_is_an_error(device):
    """Input (3,) with states (3, 3): nn.LSTMCell crashes in ATen; ours names both shapes."""
    cell = hl.LSTMCell(3, 3, device=device)
    with pytest.raises(RuntimeError, match=re.escape(
            "LSTMCell: for unbatched 1-D input, hx[0] and hx[1] should also be 1-D, of shape "
            "(3,), but got (2-D, 2-D) tensors of shapes (3, 3) and (3, 3)")):
        cell(_r(3, device=device), (_r(3, 3, device=device), _r(3, 3, device=device)))


@pytest.mark.parametrize("device", device_params())
def test_lstm_unbatched_input_with_batched_states_is_an_error(device):
    """Input (T, I) with 2-D states (3, 3) where (L * D, H) = (1, 3) is expected: nn.LSTM's
    message word for word (tests/test_modules.py holds the module to it)."""
    m = hl.LSTM(5, 3, device=device)
    with pytest.raises(RuntimeError, match=re.escape(
            "Expected hidden[0] size (1, 1, 3), got [3, 1, 3]")):
        m(_r(7, 5, device=device), (_r(3, 3, device=device), _r(3, 3, device=device)))


def test_lstm_unbatched_state_error_reports_the_callers_shape():
    m = hl.LSTM(5, 3)
    with pytest.raises(RuntimeError, match=re.escape(
            "for unbatched input hx[0] must have shape (1, 3), got (3, 3)")):
        m(_r(7, 5), (_r(3, 3), _r(3, 3)))


# --------------------------------------------------------------------------------------------
# 2. Empty work: empty outputs of the right shapes, h_n = h0 when T = 0, no empty launches
# --------------------------------------------------------------------------------------------

def _check_grad_shapes(grads, inputs):
    """Every gradient present, finite, and of its input's shape and dtype."""
    for g, t in zip(grads, inputs):
        assert g is not None and g.shape == t.shape and g.dtype == t.dtype
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("given", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("kwargs", [dict(), dict(num_layers=2, bidirectional=True, proj_size=2)],
                         ids=["plain", "L2-bi-P2"])
def test_empty_time_returns_initial_state(device, given, kwargs):
    """Input (0, 10, 5): T = 0. nn.LSTM refuses it; ours returns output (0, 10, D*Hout),
    h_n = h0 and c_n = c0 (zeros without hx), and gradients of the right shapes."""
    m = hl.LSTM(5, 4, dtype=torch.float64, device=device, **kwargs)
    LD = m.num_layers * (2 if m.bidirectional else 1)
    Hout = m.proj_size or m.hidden_size
    x = torch.randn(0, 10, 5, dtype=torch.float64, device=device, requires_grad=True)
    h0 = torch.randn(LD, 10, Hout, dtype=torch.float64, device=device, requires_grad=True)
    c0 = torch.randn(LD, 10, 4, dtype=torch.float64, device=device, requires_grad=True)
    out, (h_n, c_n) = m(x, (h0, c0) if given else None)
    D = 2 if m.bidirectional else 1
    assert out.shape == (0, 10, D * Hout)
    assert h_n.shape == (LD, 10, Hout) and c_n.shape == (LD, 10, 4)
    if given:
        assert torch.equal(h_n, h0) and torch.equal(c_n, c0)
    else:
        assert not h_n.any() and not c_n.any()

    params = list(m.parameters())
    inputs = [x] + ([h0, c0] if given else []) + params
    grads = grads_of((out, h_n, c_n), inputs)
    _check_grad_shapes(grads, inputs)
    for g in grads[len(inputs) - len(params):]:
        assert not g.any(), "no step ran, so no parameter can have a gradient"
    if given:
        # h_n = h0 and c_n = c0: the gradients pass straight through.
        _, w_h, w_c = loss_weights((out, h_n, c_n))
        assert torch.equal(grads[1], w_h) and torch.equal(grads[2], w_c)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("given", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("shape,batch_first", [((5, 0, 3), False), ((0, 10, 3), True),
                                               ((0, 0, 3), False)],
                         ids=["T5-N0", "batch-first-N0-T10", "T0-N0"])
def test_empty_batch_returns_empty_results(device, given, shape, batch_first):
    """N = 0, with and without h0 (1, 0, H): empty outputs, empty states, zero parameter
    gradients of the right shapes."""
    m = hl.LSTM(3, 4, batch_first=batch_first, dtype=torch.float64, device=device)
    x = torch.zeros(shape, dtype=torch.float64, device=device, requires_grad=True)
    T, N = (shape[1], shape[0]) if batch_first else (shape[0], shape[1])
    h0 = torch.zeros(1, N, 4, dtype=torch.float64, device=device, requires_grad=True)
    c0 = torch.zeros(1, N, 4, dtype=torch.float64, device=device, requires_grad=True)
    out, (h_n, c_n) = m(x, (h0, c0) if given else None)
    assert out.shape == ((N, T, 4) if batch_first else (T, N, 4))
    assert h_n.shape == c_n.shape == (1, N, 4)
    params = list(m.parameters())
    inputs = [x] + ([h0, c0] if given else []) + params
    grads = grads_of((out, h_n, c_n), inputs)
    _check_grad_shapes(grads, inputs)
    for g in grads[-len(params):]:
        assert not g.any()


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("T,N", [(0, 3), (4, 0), (0, 0)], ids=["T0", "N0", "T0-N0"])
@pytest.mark.parametrize("P", [0, 2], ids=["noproj", "proj"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_empty_work_in_the_op(device, T, N, P, reverse):
    args = make_args(T, N, 3, 4, P, device=device)
    x, h0, c0, w_ih, w_hh, b, w_hr = args
    out, h_n, c_n = hl.lstm(x, h0, c0, w_ih, w_hh, b, weight_hr=w_hr, reverse=reverse)
    assert out.shape == (T, N, P or 4) and h_n.shape == (N, P or 4) and c_n.shape == (N, 4)
    if T == 0:
        assert torch.equal(h_n, h0) and torch.equal(c_n, c0)
    inputs = [t for t in args if t is not None]
    grads = grads_of((out, h_n, c_n), inputs)
    _check_grad_shapes(grads, inputs)
    for g in grads[3:]:
        assert not g.any()


@pytest.mark.parametrize("device", device_params())
def test_lstm_cell_empty_batch(device):
    cell = hl.LSTMCell(3, 4, dtype=torch.float64, device=device)
    x = torch.zeros(0, 3, dtype=torch.float64, device=device, requires_grad=True)
    for hx in (None, (torch.zeros(0, 4, dtype=torch.float64, device=device),) * 2):
        h1, c1 = cell(x, hx)
        assert h1.shape == c1.shape == (0, 4)
        (gx,) = grads_of((h1, c1), [x])
        assert gx.shape == (0, 3)


@pytest.mark.cuda
def test_empty_work_launches_no_kernel():
    """An empty grid is an invalid launch on CUDA: with T = 0 or N = 0 the pointwise kernels
    must not be launched at all (the driver skips empty steps, the launchers empty counts)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for T, N in ((0, 3), (4, 0), (0, 0)):
            args = make_args(T, N, 3, 4, device="cuda")
            out, h_n, c_n = hl.lstm(*args[:6])
            grads_of((out, h_n, c_n), [t for t in args if t is not None])
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert not [n for n in names if "cell_forward_kernel" in n or "cell_backward_kernel" in n]


# --------------------------------------------------------------------------------------------
# 3. Extreme values: saturation without NaN, and no row ever contaminates another
# --------------------------------------------------------------------------------------------

def _extreme_values(kind, dtype):
    if kind == "1e30":
        return [1e30, -1e30]
    if kind == "3e38":
        return [3e38, -3e38]
    tiny = torch.finfo(dtype).tiny  # smallest normal; everything below is denormal
    return [tiny / 2, -tiny / 4, tiny * 2.0**-20]


ROW_CASE_N = 4


def _row_case(device, dtype, I, seed=0):
    """(x, h0, c0, w_ih, w_hh, b) with T=4, N=4, H=6; weights of either sign up to 0.9."""
    g = torch.Generator().manual_seed(seed)
    T, N, H = 4, ROW_CASE_N, 6

    def r(*shape, scale=1.0):
        return ((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * scale).to(
            dtype=dtype, device=device)

    return [r(T, N, I), r(N, H), r(N, H), r(4 * H, I, scale=0.9), r(4 * H, H, scale=0.9),
            r(4 * H, scale=0.5)]


def _values_and_grads(args, rows=None):
    """Outputs (output, h_n, c_n), the per-row gradients (d input, d h0, d c0) and the
    parameter gradients (d w_ih, d w_hh, d b), for a loss weighting every output. With
    `rows`, args hold only those rows of the full batch and the loss weights are theirs."""
    leaves = [t.detach().clone().requires_grad_() for t in args]
    outs = hl.lstm(*leaves)
    T, N, H = args[0].shape[0], ROW_CASE_N, args[1].shape[1]
    weights = loss_weights([torch.empty(T, N, H), torch.empty(N, H), torch.empty(N, H)])
    if rows is not None:
        weights = [weights[0][:, rows], weights[1][rows], weights[2][rows]]
    weights = [w.to(outs[0]) for w in weights]
    return list(outs) + list(torch.autograd.grad(outs, leaves, weights))


def _rows(results, keep):
    """The entries of `results` (from _values_and_grads) that belong to batch rows `keep`."""
    out, h_n, c_n, dx, dh0, dc0 = results[:6]
    return [out[:, keep], h_n[keep], c_n[keep], dx[:, keep], dh0[keep], dc0[keep]]


def _with_row(x, row, values):
    x = x.clone()
    T, _, I = x.shape
    v = torch.tensor(values, dtype=torch.float64).repeat(T * I)[:T * I]
    x[:, row] = v.view(T, I).to(x)
    return x


EXTREME_KINDS = ["1e30", "3e38", "denormal"]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", EXTREME_KINDS)
@pytest.mark.parametrize("I", [1, 5], ids=["I1", "I5"])
def test_extreme_row_saturates_and_stays_in_its_row(device, dtype, kind, I):
    """One row of ±1e30, ±3e38 or denormals among normal rows: that row saturates without NaN
    (values and every gradient finite), every other row is bitwise what it is with a normal
    row in its place and equals, to rounding, its result when run alone; all of it matches
    the float64 reference. Float32 with I > 1 and ±3e38 can overflow inside the input GEMM:
    that case is test_float32_overflow_in_input_gemm_stays_in_its_row."""
    if dtype == torch.float32 and kind == "3e38" and I > 1:
        pytest.skip("float32 input GEMM may overflow; covered by the overflow test")
    args = _row_case(device, dtype, I)
    x = args[0]
    x_ext = _with_row(x, 1, _extreme_values(kind, dtype))
    ext = _values_and_grads([x_ext] + args[1:])
    base = _values_and_grads(args)

    others = [0, 2, 3]
    for a, b in zip(_rows(ext, others), _rows(base, others)):
        assert torch.equal(a, b)
    for t in ext:
        assert torch.isfinite(t).all()

    if kind != "denormal":
        # Every pre-activation of the row is huge: the saved gates are exactly 0 or 1
        # (sigmoid) and exactly -1 or 1 (tanh).
        gates = torch.ops.handlstm.lstm_forward(x_ext, *args[1:], None, None, False)[3]
        H = gates.shape[2] // 4
        row = gates[:, 1].double().cpu()
        sig = torch.cat([row[:, :2 * H], row[:, 3 * H:]], 1)
        assert ((sig == 0) | (sig == 1)).all()
        assert (row[:, 2 * H:3 * H].abs() == 1).all()

    # The float64 reference on the same values, and nn.LSTM.
    ref = reference.lstm(*[t.double() for t in [x_ext] + args[1:]])
    for ours, theirs, name in zip(ext[:3], ref, ("output", "h_n", "c_n")):
        assert_close(ours, theirs, dtype, name)
    m = nn.LSTM(I, 6, dtype=torch.float64, device=device)
    with torch.no_grad():
        m.weight_ih_l0.copy_(args[3])
        m.weight_hh_l0.copy_(args[4])
        m.bias_ih_l0.copy_(args[5])
        m.bias_hh_l0.zero_()
        out_nn, _ = m(x_ext.double(), (args[1].double()[None], args[2].double()[None]))
    assert_close(ext[0], out_nn, dtype, "output vs nn.LSTM")

    # Each other row run alone (N = 1): equal to rounding (BLAS picks kernels by shape, so
    # bitwise equality across batch sizes is not promised).
    for k in others:
        alone = _values_and_grads([x_ext[:, k:k + 1], args[1][k:k + 1], args[2][k:k + 1]]
                                  + args[3:], rows=[k])
        for a, b in zip(_rows(alone, [0]), _rows(ext, [k])):
            assert_close(a, b, dtype, f"row {k} alone")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["one-step", "all-steps"])
def test_nan_row_stays_in_its_row(device, dtype, where):
    """NaN input in one row: that row is NaN from the first NaN step on (its earlier steps are
    untouched); every other row's values and per-row gradients are bitwise what they are
    without it. Parameter gradients sum over rows, so they are NaN, as in nn.LSTM."""
    args = _row_case(device, dtype, 3)
    x = args[0]
    x_nan = x.clone()
    if where == "one-step":
        x_nan[1, 1, 0] = float("nan")
    else:
        x_nan[:, 1] = float("nan")
    res = _values_and_grads([x_nan] + args[1:])
    base = _values_and_grads(args)
    for a, b in zip(_rows(res, [0, 2, 3]), _rows(base, [0, 2, 3])):
        assert torch.equal(a, b)
    first = 1 if where == "one-step" else 0
    out, h_n, c_n = res[:3]
    assert torch.equal(out[:first, 1], base[0][:first, 1])
    assert out[first:, 1].isnan().all() and h_n[1].isnan().all() and c_n[1].isnan().all()
    for g in res[6:]:
        assert g.isnan().any()
    ref = reference.lstm(*[t.double() for t in [x_nan] + args[1:]])
    assert torch.equal(out.isnan().cpu(), ref[0].isnan().cpu())


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [float("inf"), float("-inf")], ids=["inf", "-inf"])
@pytest.mark.parametrize("where", ["one-element", "all-steps"])
def test_infinite_row_stays_in_its_row(device, dtype, value, where):
    """An infinite input element gives ±inf pre-activations, which saturate (one element per
    step), or NaN where +inf meets -inf in the GEMM (a whole row of them). Either way the row's
    outputs are NaN or in [-1, 1], no other row changes by a bit, and d weight_ih is NaN
    (0 * inf), as in nn.LSTM."""
    args = _row_case(device, dtype, 3)
    x_inf = args[0].clone()
    if where == "one-element":
        x_inf[1, 1, 0] = value
    else:
        x_inf[:, 1] = value
    res = _values_and_grads([x_inf] + args[1:])
    base = _values_and_grads(args)
    for a, b in zip(_rows(res, [0, 2, 3]), _rows(base, [0, 2, 3])):
        assert torch.equal(a, b)
    row = res[0][:, 1]
    assert (row.isnan() | (row.abs() <= 1)).all()
    if where == "one-element":
        assert torch.isfinite(row).all()
    assert res[6].isnan().any()


@pytest.mark.parametrize("device", device_params())
def test_float32_overflow_in_input_gemm_stays_in_its_row(device):
    """Row of alternating ±3e38 with 16 weights of 0.9 per gate: exactly, every pre-activation
    is 0 (so sigmoid 0.5), but float32 partial sums overflow, and the result is ±inf (which
    saturates) or NaN (+inf + -inf) depending on the GEMM's summation order. nn.LSTM does the
    same float32 GEMM. Guaranteed: the row's outputs are NaN or within [-1, 1], and no other
    row changes by a single bit."""
    I, H = 16, 8
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, ROW_CASE_N, I, generator=g).to(device)
    h0, c0 = (torch.randn(ROW_CASE_N, H, generator=g).to(device) for _ in range(2))
    w_ih = torch.full((4 * H, I), 0.9, device=device)
    w_hh = (torch.randn(4 * H, H, generator=g) * 0.3).to(device)
    b = torch.zeros(4 * H, device=device)
    args = [x, h0, c0, w_ih, w_hh, b]
    x_ext = _with_row(x, 1, [3e38, -3e38])
    res = _values_and_grads([x_ext] + args[1:])
    base = _values_and_grads(args)
    for a, b_ in zip(_rows(res, [0, 2, 3]), _rows(base, [0, 2, 3])):
        assert torch.equal(a, b_)
    row = res[0][:, 1]
    assert (row.isnan() | (row.abs() <= 1)).all()


# --------------------------------------------------------------------------------------------
# 4. Non-contiguous and odd layouts: the same numbers as contiguous copies
# --------------------------------------------------------------------------------------------

def _layout(kind, T, N, I, H, L, dtype, device):
    """(x, h0, c0) built with the named odd layout, plus the leaves the views come from."""
    def r(*shape):
        return torch.randn(*shape, dtype=dtype, device=device, requires_grad=True)

    if kind == "input-transposed":
        base = r(N, T, I)
        return base.transpose(0, 1), r(L, N, H), r(L, N, H)
    if kind == "input-channels-last-like":
        base = r(I, T, N)  # feature dimension outermost in memory
        return base.permute(1, 2, 0), r(L, N, H), r(L, N, H)
    if kind == "h0-sliced":
        big = r(L, N + 5, H)
        return r(T, N, I), big[:, 2:N + 2], r(L, N, H)
    if kind == "states-chunked":
        stacked = r(2 * L, N, H)  # c0 is contiguous but starts mid-storage
        h0, c0 = torch.chunk(stacked, 2)
        return r(T, N, I), h0, c0
    if kind == "states-chunked-last-dim":
        h0, c0 = torch.chunk(r(L, N, 2 * H), 2, dim=2)
        return r(T, N, I), h0, c0
    if kind == "h0-expanded":
        one = r(L, 1, H)
        return r(T, N, I), one.expand(L, N, H), r(L, N, H)
    raise AssertionError(kind)


LAYOUTS = ["input-transposed", "input-channels-last-like", "h0-sliced", "states-chunked",
           "states-chunked-last-dim", "h0-expanded"]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_odd_layouts_equal_contiguous_copies(device, dtype, kind):
    torch.manual_seed(1)
    T, N, I, H, L = 5, 3, 4, 6, 2
    m = hl.LSTM(I, H, L, dtype=dtype, device=device)
    x, h0, c0 = _layout(kind, T, N, I, H, L, dtype, device)
    assert any(not t.is_contiguous() or t.storage_offset() for t in (x, h0, c0))
    copies = [t.detach().contiguous().requires_grad_() for t in (x, h0, c0)]
    params = list(m.parameters())
    results = []
    for inputs in ((x, h0, c0), copies):
        out, (h_n, c_n) = m(inputs[0], tuple(inputs[1:]))
        results.append([out, h_n, c_n] + list(grads_of((out, h_n, c_n), list(inputs) + params)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", device_params())
def test_odd_layouts_in_the_op(device):
    """Every argument of the op non-contiguous at once, weights included; gradients are taken
    with respect to the odd views themselves."""
    x, h0, c0, w_ih, w_hh, b, w_hr = make_args(4, 3, 5, 6, 2, device=device)
    odd = [x.transpose(0, 1).contiguous().transpose(0, 1),
           torch.cat([h0, h0], 1)[:, ::2],
           c0[:1].expand(3, 6),  # stride 0 along N: every row starts from c0[0]
           w_ih.t().contiguous().t(),
           w_hh.t().contiguous().t(),
           torch.stack([b, b], 1)[:, 0],
           w_hr.t().contiguous().t()]
    assert not any(t.is_contiguous() for t in odd)
    same = [t.detach().contiguous().requires_grad_() for t in odd]
    results = []
    for inputs in (odd, same):
        outs = hl.lstm(*inputs[:6], weight_hr=inputs[6])
        results.append(list(outs) + list(grads_of(outs, inputs)))
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P", [0, 2], ids=["noproj", "proj"])
def test_operands_at_odd_offsets_equal_aligned_copies(device, dtype, P):
    """Regression: BLAS kernels round differently by their operands' alignment (MKL on AMD
    EPYC gave other bits for an h0 that started 4 bytes into its storage), so a contiguous
    view at an odd offset, such as layer 1 of a stacked h0, differed from a fresh copy. Every
    argument of the op here is a contiguous view starting 1 to 15 elements into its storage."""
    args = [t.detach() for t in make_args(5, 3, 4, 6, P, dtype=dtype, device=device)
            if t is not None]
    copies = [t.clone().requires_grad_() for t in args]
    for offset in range(1, 16):
        views = []
        for t in args:
            storage = torch.zeros(offset + t.numel(), dtype=dtype, device=device)
            storage[offset:] = t.reshape(-1)
            views.append(storage[offset:].view(t.shape).requires_grad_())
        assert all(v.is_contiguous() and v.storage_offset() == offset for v in views)
        results = []
        for inputs in (views, copies):
            outs = hl.lstm(*inputs[:6], weight_hr=inputs[6] if P else None)
            results.append(list(outs) + list(grads_of(outs, inputs)))
        for a, b in zip(*results):
            assert torch.equal(a, b), f"storage offset {offset}"


# --------------------------------------------------------------------------------------------
# 5. batch_first with T = 1
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("L,bidirectional", [(1, False), (2, True)], ids=["L1", "L2-bi"])
def test_batch_first_single_step(device, L, bidirectional):
    """Input (32, 1, 8) with batch_first: nn.LSTM's values and gradients, output (32, 1, D*H),
    h_n and c_n (L*D, 32, H)."""
    torch.manual_seed(2)
    ref, ours = make_pair(8, 5, L, batch_first=True, bidirectional=bidirectional,
                          device=device)
    D = 2 if bidirectional else 1
    x = torch.randn(32, 1, 8, dtype=torch.float64, device=device)
    runs = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        out, (h_n, c_n) = m(xi)
        assert out.shape == (32, 1, D * 5) and h_n.shape == c_n.shape == (L * D, 32, 5)
        runs.append([out, h_n, c_n] + list(grads_of((out, h_n, c_n), [xi] + list(m.parameters()))))
    for a, b in zip(runs[1], runs[0]):
        assert_close(a, b, torch.float64)


# --------------------------------------------------------------------------------------------
# 6. A loss from one output only
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("which", ["output", "h_n", "c_n"])
@pytest.mark.parametrize("kwargs", [dict(), dict(num_layers=2, bidirectional=True, proj_size=3)],
                         ids=["plain", "L2-bi-P3"])
def test_loss_from_one_output_matches_nn(device, which, kwargs):
    """Only one of output, h_n, c_n reaches the loss: the other two get no gradient at all
    (undefined, not zeros) and every gradient is finite and equals nn.LSTM's."""
    torch.manual_seed(4)
    ref, ours = make_pair(3, 5, device=device, **kwargs)
    x = torch.randn(6, 2, 3, dtype=torch.float64, device=device)
    LD = ours.num_layers * (2 if ours.bidirectional else 1)
    hx = (torch.randn(LD, 2, ours.proj_size or 5, dtype=torch.float64, device=device),
          torch.randn(LD, 2, 5, dtype=torch.float64, device=device))
    runs = []
    for m in (ref, ours):
        leaves = [x.clone().requires_grad_()] + [t.clone().requires_grad_() for t in hx]
        out, (h_n, c_n) = m(leaves[0], tuple(leaves[1:]))
        chosen = {"output": out, "h_n": h_n, "c_n": c_n}[which]
        inputs = leaves + list(m.parameters())
        grads = grads_of((chosen,), inputs)
        # nn.LSTM's fused kernel returns zeros for parameters the loss does not reach.
        runs.append([torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)])
    for a, b in zip(runs[1], runs[0]):
        assert torch.isfinite(a).all()
        assert_close(a, b, torch.float64)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("which", [0, 1, 2], ids=["output", "h_n", "c_n"])
@pytest.mark.parametrize("P", [0, 2], ids=["noproj", "proj"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_gradcheck_one_output_with_undefined_grads(device, which, P, reverse):
    args = [t for t in make_args(3, 2, 3, 4, P, device=device) if t is not None]

    def f(x, h0, c0, w_ih, w_hh, b, *w_hr):
        return hl.lstm(x, h0, c0, w_ih, w_hh, b, weight_hr=w_hr[0] if w_hr else None,
                       reverse=reverse)[which]

    assert torch.autograd.gradcheck(f, args, check_undefined_grad=True)


# --------------------------------------------------------------------------------------------
# 7. Long sequences and large T x N
# --------------------------------------------------------------------------------------------

def _long_case(T, N, I, H, device, dtype=torch.float32, seed=5):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    return [r(T, N, I, scale=1.0), r(N, H, scale=0.5), r(N, H, scale=0.5),
            r(4 * H, I, scale=0.3), r(4 * H, H, scale=0.1), r(4 * H, scale=0.1)]


@pytest.mark.slow
@pytest.mark.parametrize("device", device_params())
def test_long_sequence_matches_chunked_run(device):
    """T = 65,536, N = 2, H = 128, forward and backward in one call. Checked against the same
    sequence run in chunks carrying (h, c) (final state, outputs, parameter gradients), against
    the float64 reference on a prefix, and on the last chunk from the state reached there."""
    T, N, I, H, chunk = 65_536, 2, 4, 128, 8192
    x, h0, c0, *weights = _long_case(T, N, I, H, device)
    weights = [w.requires_grad_() for w in weights]

    out, h_n, c_n = hl.lstm(x, h0, c0, *weights)
    whole = [out.detach(), h_n.detach(), c_n.detach()]
    whole += [g.detach() for g in grads_of((out, h_n, c_n), weights)]
    del out, h_n, c_n

    h, c, outs = h0, c0, []
    for s in range(0, T, chunk):
        o, h, c = hl.lstm(x[s:s + chunk], h, c, *weights)
        outs.append(o)
    out_c = torch.cat(outs)
    chunked = [out_c.detach(), h.detach(), c.detach()]
    chunked += [g.detach() for g in grads_of((out_c, h, c), weights)]
    del outs, out_c, h, c
    for a, b, name in zip(whole, chunked, ("output", "h_n", "c_n", "dw_ih", "dw_hh", "db")):
        assert_close(a, b, torch.float32, name)

    w64 = [w.detach().double() for w in weights]
    prefix = 256
    ref = reference.lstm(x[:prefix].double(), h0.double(), c0.double(), *w64)
    assert_close(whole[0][:prefix], ref[0], torch.float32, "prefix")

    # The last `prefix` steps in float64 from the state the op reached before them.
    with torch.no_grad():
        _, h, c = hl.lstm(x[:T - prefix], h0, c0, *weights)
    ref = reference.lstm(x[T - prefix:].double(), h.double(), c.double(), *w64)
    assert_close(whole[0][T - prefix:], ref[0], torch.float32, "suffix")
    assert_close(whole[1], ref[1], torch.float32, "h_n")
    assert_close(whole[2], ref[2], torch.float32, "c_n")


@pytest.mark.slow
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("T,N", [(2048, 48), (3, 70_000)], ids=["T2048-N48", "T3-N70000"])
def test_large_time_times_batch_matches_reference(device, T, N):
    """T x N beyond 65,536 (and N beyond 65,535): nothing is tied to a 16-bit grid dimension or
    a 32-bit element count; values and input gradients equal the float64 reference."""
    I, H = 3, 8
    args = [t.double() for t in _long_case(T, N, I, H, device)]
    leaves = [t.clone().requires_grad_() for t in args]
    outs = hl.lstm(*leaves)
    ours = list(outs) + list(grads_of(outs, leaves))
    ref_leaves = [t.clone().requires_grad_() for t in args]
    ref_outs = reference.lstm(*ref_leaves)
    theirs = list(ref_outs) + list(grads_of(ref_outs, ref_leaves))
    for a, b in zip(ours, theirs):
        assert_close(a, b, torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("P", [0, 3], ids=["noproj", "proj"])
def test_weight_gradients_of_long_reductions_keep_float32_accuracy(device, P):
    """Regression: dW_ih, dW_hh and dW_hr sum T*N terms each. As one float32 GEMM over
    T*N = 131,072 rows, MKL on AMD EPYC lost 1.2e-5 of dW_ih's largest entry (an error growing
    like sqrt(T*N); 6e-6 to 1.6e-5 here at 262,144 rows); the driver now sums blocks of rows in
    float64. The float32 backward is
    compared with the float64 backward of the very same saved activations, so the only
    difference left is float32 rounding in the backward itself."""
    T, N, I, H = 2048, 128, 4, 8
    x, h0, c0, w_ih, w_hh, b = _long_case(T, N, I, H, device, seed=6)
    w_hr = (torch.randn(P, H, generator=torch.Generator().manual_seed(7)) * 0.3).to(
        device) if P else None
    if P:
        h0, w_hh = h0[:, :P].contiguous(), w_hh[:, :P].contiguous()
    saved = torch.ops.handlstm.lstm_forward(x, h0, c0, w_ih, w_hh, b, w_hr, None, False)
    out, h_n, c_n = saved[:3]
    grads = loss_weights([out, h_n, c_n], seed=8)

    def backward(dtype):
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return torch.ops.handlstm.lstm_backward(
            *map(cast, grads), cast(x), cast(h0), cast(c0), cast(w_ih), cast(w_hh), cast(w_hr),
            *map(cast, (out, saved[3], saved[4], saved[5])), None, False)

    ours, exact = backward(torch.float32), backward(torch.float64)
    names = ("dx", "dh0", "dc0", "dw_ih", "dw_hh", "db", "dw_hr")
    for a, b, name in zip(ours, exact, names):
        if b.numel() == 0:
            continue
        err = (a.double() - b).abs().max().item() / b.abs().max().item()
        # float32 rounding of sums blocked as in the driver: at most 2.1e-6 measured
        assert err <= 4e-6, f"{name}: error {err:.3g} relative to its largest entry"


# --------------------------------------------------------------------------------------------
# 8. Memory: flat after warm-up over many calls of varying shape
# --------------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


def _memory_workload(seed, count):
    rng = random.Random(seed)
    return [(rng.randint(1, 300), rng.randint(1, 64)) for _ in range(count)]


def _one_iteration(T, N, weights, device):
    x = torch.randn(T, N, weights[0].shape[1], device=device, requires_grad=True)
    outs = hl.lstm(x, None, None, *weights)
    torch.autograd.grad((outs[0].sum() + outs[1].sum() + outs[2].sum()), [x] + weights)


def _memory_weights(device, I=4, H=8):
    g = torch.Generator().manual_seed(6)
    return [(torch.randn(*s, generator=g) * 0.3).to(device).requires_grad_()
            for s in ((4 * H, I), (4 * H, H), (4 * H,))]


# A leak of the saved activations would grow by ~100 KiB per call (over 100 MiB here); what
# the allocator keeps around after the largest shapes have been seen stays well below this.
RSS_SLACK_MIB = 24


@pytest.mark.slow
def test_memory_flat_over_many_calls():
    """2,000 forward+backward calls, T from 1..300 and N from 1..64, on the CPU: resident
    memory after warm-up (the largest shape first, then 200 calls) does not grow."""
    weights = _memory_weights("cpu")
    shapes = _memory_workload(0, 2000)
    for _ in range(3):
        _one_iteration(300, 64, weights, "cpu")
    for T, N in shapes[:200]:
        _one_iteration(T, N, weights, "cpu")
    start = _rss_mib()
    samples = []
    for k, (T, N) in enumerate(shapes[200:]):
        _one_iteration(T, N, weights, "cpu")
        if k % 200 == 199:
            samples.append(_rss_mib())
    growth = max(samples) - start
    assert growth < RSS_SLACK_MIB, f"RSS grew {growth:.1f} MiB: {start:.0f} -> {samples}"


@pytest.mark.slow
def test_memory_flat_from_a_thread_pool():
    """The same workload from four threads at once (each thread with its own graph, shared
    weights): no growth after warm-up, and no error from concurrent calls."""
    weights = _memory_weights("cpu")
    shapes = _memory_workload(1, 1000)
    errors = []
    lock = threading.Lock()

    def work(shape):
        try:
            _one_iteration(*shape, weights, "cpu")
        except Exception as exc:  # surfaced below with the shape that failed
            with lock:
                errors.append((shape, exc))

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(work, [(300, 64)] * 8 + shapes[:200]))
        start = _rss_mib()
        samples = []
        for s in range(200, 1000, 200):
            list(pool.map(work, shapes[s:s + 200]))
            samples.append(_rss_mib())
    assert not errors, errors[:3]
    growth = max(samples) - start
    assert growth < RSS_SLACK_MIB, f"RSS grew {growth:.1f} MiB: {start:.0f} -> {samples}"


@pytest.mark.slow
@pytest.mark.cuda
def test_cuda_memory_returns_to_baseline():
    """On the GPU the caching allocator makes RSS meaningless; the allocated bytes must come
    back to the same value after every call."""
    weights = _memory_weights("cuda")
    shapes = _memory_workload(2, 2000)
    _one_iteration(300, 64, weights, "cuda")
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    for T, N in shapes:
        _one_iteration(T, N, weights, "cuda")
        assert torch.cuda.memory_allocated() == baseline
