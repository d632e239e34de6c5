"""The CPU time loop of the half types (bfloat16, float16; csrc/lstm_cpu.cpp): storage in the
op's dtype, each row block's steps in float32 scratch, bfloat16's step GEMMs on bfloat16 dot
products where the CPU has them (csrc/cpu/gemm_cpu_bf16.cpp).

Accuracy is judged as everywhere for these types: against the float64 reference, within a few
times the error that the same reference computed in the half type makes (the cost of rounding
to it), or a floor of 16 unit roundoffs. Shape vocabulary: T time, N batch, I input, H hidden,
P projection.
"""

import os

import pytest
import torch

import handlstm_cuda as hl
from handlstm_cuda import reference

from conftest import make_args, outputs_and_grads, packed_batch_sizes

HALF_TYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="f16")]
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}

# (T, N, I, H, P, lengths of a packed batch or None, reverse)
CASES = {
    "T1-N1-H1": (1, 1, 1, 1, 0, None, False),
    "H33-I4": (6, 5, 4, 33, 0, None, False),
    "three-blocks": (9, 48, 7, 20, 0, None, False),  # 16-row blocks, one per thread
    "long-T200": (200, 3, 5, 24, 0, None, False),
    "projection": (5, 4, 3, 20, 7, None, False),
    "projection-reverse": (5, 4, 3, 20, 7, None, True),
    "packed": (7, 6, 3, 17, 0, [7, 7, 5, 3, 3, 1], False),
    "packed-reverse": (7, 6, 3, 17, 0, [7, 7, 5, 3, 3, 1], True),
    "packed-projection": (6, 4, 2, 9, 4, [6, 4, 4, 2], False),
}


@pytest.fixture
def threads():
    """Restores torch's thread count after a test that sets it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _outputs_and_grads(fn, args, **kw):
    """fn's three outputs and the gradients of every given argument (conftest's fixed random
    loss), all as float64."""
    return [t.double() for t in outputs_and_grads(args, fn=fn, **kw)]


def _case(name, dtype, seed=1):
    T, N, I, H, P, lengths, reverse = CASES[name]
    kw = dict(reverse=reverse)
    if lengths is not None:
        kw["batch_sizes"] = packed_batch_sizes(lengths)
    args64 = make_args(T, N, I, H, P, seed=seed, requires_grad=False)
    low = [None if t is None else t.to(dtype) for t in args64]
    return args64, low, kw


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_half_loop_matches_float64_within_rounding(name, dtype, cpu_path):
    """On every SIMD path this CPU has: on AVX-512 with AVX-512 BF16, bfloat16's step GEMMs
    multiply bfloat16 pairs; elsewhere, and for float16, they run in float32."""
    args64, low, kw = _case(name, dtype)
    exact = _outputs_and_grads(reference.lstm, args64, **kw)
    baseline = _outputs_and_grads(reference.lstm, low, **kw)
    ours = _outputs_and_grads(hl.lstm, low, **kw)
    names = ["output", "h_n", "c_n", "grad input", "grad h0", "grad c0", "grad weight_ih",
             "grad weight_hh", "grad bias", "grad weight_hr"]
    for what, o, b, e in zip(names, ours, baseline, exact):
        scale = max(1.0, e.abs().max().item())
        err = (o - e).abs().max().item()
        base_err = (b - e).abs().max().item()
        bound = max(16 * UNIT_ROUNDOFF[dtype] * scale, 4 * base_err)
        assert err <= bound, f"{what}: error {err:.3g}, the baseline's {base_err:.3g}"


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_half_loop_output_dtypes_and_no_nan(dtype):
    """The results come back in the op's dtype; a saturating input stays finite."""
    args64, low, _ = _case("H33-I4", dtype)
    low[0] = low[0] * 200
    out, h_n, c_n = hl.lstm(*low[:6])
    for t in (out, h_n, c_n):
        assert t.dtype == dtype
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_half_loop_does_not_depend_on_the_thread_count(dtype, threads):
    """Row blocks follow the thread count; each element's sums do not (fixed-order float32
    kernels), so one thread and two give the same bits, gradients included."""
    _, low, _ = _case("three-blocks", dtype)
    torch.set_num_threads(1)
    one = _outputs_and_grads(hl.lstm, low)
    torch.set_num_threads(2)
    two = _outputs_and_grads(hl.lstm, low)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_half_loop_module_matches_nn_lstm_on_the_same_weights(dtype):
    """The drop-in module in a half type against nn.LSTM in float64 on the same (rounded)
    weights and input: within the rounding budget of nn.LSTM run in that type."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(5, 12, num_layers=2, bidirectional=True).to(dtype)
    ours = hl.LSTM(5, 12, num_layers=2, bidirectional=True).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(11, 3, 5).to(dtype)
    exact = torch.nn.LSTM(5, 12, num_layers=2, bidirectional=True).double()
    exact.load_state_dict({k: v.double() for k, v in ref.state_dict().items()})
    e = exact(x.double())[0]
    err = (ours(x)[0].double() - e).abs().max().item()
    base_err = (ref(x)[0].double() - e).abs().max().item()
    assert err <= max(16 * UNIT_ROUNDOFF[dtype], 4 * base_err), (err, base_err)


def _same_bits(a, b):
    """Equal bit for bit, except that any NaN matches any NaN (payloads may differ)."""
    nan = torch.isnan(a.float())
    assert torch.equal(nan, torch.isnan(b.float()))
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    assert torch.equal(a[~nan].view(ints), b[~nan].view(ints))


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_half_conversions_match_torch_bit_for_bit(cpu_path, dtype):
    """The loop's SIMD conversions (16 and 8 lanes, scalar tails) against torch's .to():
    every 16-bit pattern to float32, and back from float32 for random bit patterns of every
    exponent, exact ties (round to even), zeros, infinities, NaN, subnormals and values beyond
    the half type's range. Lengths are not multiples of 16, so the tails run too."""
    from handlstm_cuda import _C

    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)[:-3]
    _same_bits(_C._cpu_convert(every.contiguous(), torch.float32), every.float())

    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (100_003,), generator=g, dtype=torch.int64)
    floats = bits.to(torch.int32).view(torch.float32)
    # Exactly halfway between neighbours of the half type (float32 holds the midpoint), for
    # both parities of the lower one, with both signs.
    positive = torch.arange(0, 32767, dtype=torch.int32).to(torch.int16)
    a, b = positive[:-1].view(dtype).float(), positive[1:].view(dtype).float()
    finite = torch.isfinite(b)
    ties = (a[finite] + b[finite]) / 2
    ties = torch.cat([ties, -ties])
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-40,
                            65504.0, 65520.0, 70000.0, 3.0e38, -3.0e38, 1.0e-8, 6.0e-8])
    for x in (floats, ties, special):
        x = x.contiguous()
        _same_bits(_C._cpu_convert(x, dtype), x.to(dtype))


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_half_loop_nan_and_saturating_rows_stay_in_their_rows(dtype, cpu_path):
    """A NaN input at one step of row 5 and inputs of 300 in every step of row 20 (one in each
    of the first two 16-row blocks): row 5 is NaN from that step on and untouched before it,
    row 20 saturates and stays finite, and every other row's values and per-row gradients are
    bit for bit what they are without the two."""
    _, low, _ = _case("three-blocks", dtype)
    x = low[0].clone()
    x[3, 5, 0] = float("nan")
    x[:, 20] = 300
    odd = _outputs_and_grads(hl.lstm, [x] + low[1:])
    base = _outputs_and_grads(hl.lstm, low)
    out, h_n, c_n, dx, dh0, dc0 = odd[:6]
    others = [r for r in range(x.shape[1]) if r not in (5, 20)]
    for a, b in zip(odd[:6], base[:6]):
        rows = (a[:, others], b[:, others]) if a.dim() == 3 else (a[others], b[others])
        assert torch.equal(*rows)
    assert torch.equal(out[:3, 5], base[0][:3, 5])
    assert out[3:, 5].isnan().all() and h_n[5].isnan().all() and c_n[5].isnan().all()
    for t in (out[:, 20], h_n[20], c_n[20], dx[:, 20], dh0[20], dc0[20]):
        assert torch.isfinite(t).all()


def test_bf16_dot_products_follow_the_cpu_and_the_path(cpu_path):
    """Used exactly where the CPU has AVX-512 BF16 and the AVX-512 path is active."""
    from handlstm_cuda import _C

    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo to read the CPU's features from")
    with open("/proc/cpuinfo") as f:
        flags = f.read().split()
    assert _C._cpu_bf16_dot() == (cpu_path == "avx512" and "avx512_bf16" in flags)
