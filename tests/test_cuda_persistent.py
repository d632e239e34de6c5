"""The persistent CUDA time loops against the generic CUDA loop and the float64 reference: the
single-block design (csrc/lstm_cuda_persistent.cu, W_hh whole in one block) and the cooperative
one (csrc/lstm_cuda_cooperative.cu, W_hh split across blocks, a grid barrier per step).

They are off by default (never run on a GPU before benchmarks/gpu_check.sh runs these tests);
each test turns them on for itself, and checks which time loop really served its calls, since
a silent fallback to the generic loop would pass every numeric check. Without a GPU only the
switch tests run.
Shape vocabulary: T time, N batch, I input, H hidden, G = 4H, P projection size.
"""

import pytest
import torch

import handlstm_cuda as hl
from conftest import make_args, outputs_and_grads, packed_batch_sizes
from handlstm_cuda import reference

# In scope: no projection, every row active. H = 1, 33 and 96, T = 1, and N giving every
# rows-per-block variant of the single-block design on an H200's 132 multiprocessors (R = 1 up
# to N = 132, 2 up to 264, 4 up to 528, else 8), with N off those tiles. In float64 W_hh of
# H = 96 (295 KB) is beyond one block, so that case runs the cooperative design.
IN_SCOPE = [(1, 1, 1, 1), (62, 64, 12, 64), (5, 13, 7, 33), (3, 2, 4, 96), (4, 201, 3, 8),
            (4, 301, 3, 8), (3, 601, 2, 16)]
SCOPE_IDS = ["T1-N1-H1", "seed", "N13-H33", "H96", "N201", "N301", "N601"]


_C = hl._ext._C


@pytest.fixture
def persistent():
    before = hl.cuda_time_loop()
    hl.set_cuda_persistent_enabled(True)
    yield
    hl.set_cuda_time_loop(before)


@pytest.fixture
def cooperative(persistent):
    """The cooperative design wherever it can run, even where one block would hold W_hh."""
    before = _C._cuda_persistent_cooperative_only()
    _C._set_cuda_persistent_cooperative_only(True)
    yield
    _C._set_cuda_persistent_cooperative_only(before)


def _loops():
    """(forward, backward) time loop of the latest CUDA call."""
    return _C._cuda_last_loops()


def test_cooperative_only_switch_is_off_by_default_and_toggles():
    assert not _C._cuda_persistent_cooperative_only()
    try:
        _C._set_cuda_persistent_cooperative_only(True)
        assert _C._cuda_persistent_cooperative_only()
    finally:
        _C._set_cuda_persistent_cooperative_only(False)
    assert not _C._cuda_persistent_cooperative_only()


def test_switch_is_off_by_default_and_toggles():
    """Off unless HANDLSTM_CUDA_PERSISTENT=1 (CI does not set it); the setter round-trips."""
    import os

    if os.environ.get("HANDLSTM_CUDA_PERSISTENT") != "1":
        assert not hl.cuda_persistent_enabled()
    before = hl.cuda_time_loop()
    try:
        hl.set_cuda_persistent_enabled(True)
        assert hl.cuda_persistent_enabled()
        hl.set_cuda_persistent_enabled(False)
        assert not hl.cuda_persistent_enabled()
    finally:
        hl.set_cuda_time_loop(before)


def _generic_then_persistent(args, expected):
    """(generic loop's results, persistent loops' results) for the same arguments, TF32 off so
    that the generic loop's cuBLAS GEMMs are IEEE float32 too; checks that each call ran the
    loop it was meant to (`expected` for the persistent one)."""
    before = (hl.cuda_time_loop(), torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        hl.set_cuda_persistent_enabled(False)
        generic = outputs_and_grads(args)
        assert _loops() == ("generic", "generic")
        hl.set_cuda_persistent_enabled(True)
        ours = outputs_and_grads(args)
        assert _loops() == (expected, expected)
    finally:
        hl.set_cuda_time_loop(before[0])
        torch.backends.cuda.matmul.allow_tf32 = before[1]
    return generic, ours


def _contractive(args):
    """args with W_hh rescaled to entries of standard deviation 0.5 / sqrt(H) (spectral radius
    about 0.5). Comparisons of two summation orders need a recurrence that damps rounding
    differences: at 0.2 per entry and H = 128 (radius about 2.3) a float32 run over 65,536
    steps drifts by up to 0.67 from a mere change of order, in any implementation."""
    args = list(args)
    w_hh = args[4].detach()
    H = w_hh.shape[1]
    scaled = w_hh.double() / w_hh.double().std() * (0.5 / H ** 0.5)
    args[4] = scaled.to(w_hh.dtype).requires_grad_(args[4].requires_grad)
    return args


def _compare(ours, theirs, tol):
    for a, b in zip(ours, theirs):
        a, b = a.double().cpu(), b.double().cpu()
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        assert (a - b).abs().max().item() <= tol * scale


def _reference_run(args, **kw):
    """The float64 reference on the CPU: outputs and gradients as in outputs_and_grads."""
    cpu = [None if t is None else t.detach().cpu().double().requires_grad_() for t in args]
    ref_outs = reference.lstm(*cpu[:6], weight_hr=cpu[6], **kw)
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in ref_outs]
    return list(ref_outs) + list(torch.autograd.grad(
        ref_outs, [t for t in cpu if t is not None], weights))


@pytest.mark.cuda
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("shape", IN_SCOPE, ids=SCOPE_IDS)
def test_float64_matches_reference(persistent, shape, reverse):
    T, N, I, H = shape
    args = make_args(T, N, I, H, 0, device="cuda", seed=5)
    ours = outputs_and_grads(args, reverse=reverse)
    _compare(ours, _reference_run(args, reverse=reverse), 1e-10)
    expected = "cooperative" if H == 96 else "single-block"
    assert _loops() == (expected, expected)


@pytest.mark.cuda
def test_fewer_rows_per_block_where_eight_do_not_fit(persistent):
    """float32 H = 115 at N = 600 (8 rows per block by the multiprocessor count): W_hh (207 KB)
    fits a block of an H200 (227 KiB), but not beside 8 rows of state (22 KB); with 4 rows it
    does, so the single-block design serves the call (the cooperative one cannot: its h tile of
    N x H alone is 276 KB)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    if getattr(props, "shared_memory_per_block_optin", None) != 232_448 or \
            props.multi_processor_count > 150:
        pytest.skip("sized for 227 KiB of shared memory per block and about 132 multiprocessors")
    args = make_args(3, 600, 4, 115, 0, dtype=torch.float32, device="cuda", seed=22)
    ours = outputs_and_grads(args)
    assert _loops() == ("single-block", "single-block")
    _compare(ours, _reference_run(args), 1e-4)


# The cooperative design at awkward sizes: H = 1 (one block), H = 33 and N = 13 (two row tiles,
# the second ragged), H = 100, and H = 263 with N = 8 (two units per block on an H200's 132
# multiprocessors, one in the last block: its gate rows and partial sums are ragged).
COOP_SHAPES = [(1, 1, 1, 1), (5, 13, 7, 33), (3, 2, 4, 100), (4, 8, 5, 263)]
COOP_IDS = ["T1-N1-H1", "N13-H33", "H100", "N8-H263"]


@pytest.mark.cuda
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("shape", COOP_SHAPES, ids=COOP_IDS)
def test_cooperative_float64_matches_reference(cooperative, shape, reverse):
    T, N, I, H = shape
    args = make_args(T, N, I, H, 0, device="cuda", seed=15)
    ours = outputs_and_grads(args, reverse=reverse)
    assert _loops() == ("cooperative", "cooperative")
    _compare(ours, _reference_run(args, reverse=reverse), 1e-10)


# The targets of the cooperative design (N <= 8, H = 256 / 512, long T) and H = 1000, beyond
# one block in every dtype.
COOP_WIDE = [(40, 8, 16, 256), (12, 3, 8, 512), (3, 2, 5, 1000)]
COOP_WIDE_IDS = ["N8-H256", "N3-H512", "H1000"]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2),
                                       (torch.float16, 5e-3)], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("shape", COOP_WIDE, ids=COOP_WIDE_IDS)
def test_cooperative_matches_the_generic_loop(shape, dtype, tol):
    """As test_matches_the_generic_loop, for the cooperative design; float32 also against the
    float64 reference, within float32's own error at these sizes."""
    T, N, I, H = shape
    args = _contractive(make_args(T, N, I, H, 0, dtype=dtype, device="cuda", seed=16, scale=0.2))
    generic, ours = _generic_then_persistent(args, "cooperative")
    _compare(ours, generic, tol)
    if dtype == torch.float32:
        _compare(ours, _reference_run(args), 1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("H,expected", [(32, "single-block"), (128, "cooperative")])
def test_long_sequence_matches_the_generic_loop(H, expected):
    """T = 65,536 steps in one launch per direction (T is a loop inside the kernels)."""
    T, N, I = 65_536, 2, 4
    args = _contractive(make_args(T, N, I, H, 0, dtype=torch.float32, device="cuda", seed=19,
                                  scale=0.2))
    generic, ours = _generic_then_persistent(args, expected)
    _compare(ours, generic, 1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2),
                                       (torch.float16, 5e-3)], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("shape", IN_SCOPE[1:3], ids=SCOPE_IDS[1:3])
def test_matches_the_generic_loop(shape, dtype, tol):
    """Same dtype, same rounding points: only the order of the recurrent sums differs. TF32 off
    so that the generic loop's cuBLAS GEMMs are IEEE float32 as well."""
    T, N, I, H = shape
    args = _contractive(make_args(T, N, I, H, 0, dtype=dtype, device="cuda", seed=6))
    generic, ours = _generic_then_persistent(args, "single-block")
    _compare(ours, generic, tol)


@pytest.fixture(params=["single-block", "cooperative"])
def design(request, persistent):
    """Each persistent design in turn: the cooperative one forced even where one block would
    hold W_hh (it spans H blocks of one unit each at these sizes)."""
    before = _C._cuda_persistent_cooperative_only()
    _C._set_cuda_persistent_cooperative_only(request.param == "cooperative")
    yield request.param
    _C._set_cuda_persistent_cooperative_only(before)


@pytest.mark.cuda
def test_gradcheck(design):
    args = [t for t in make_args(4, 3, 5, 6, 0, device="cuda", seed=7) if t is not None]

    def f(x, h0, c0, w_ih, w_hh, b):
        return hl.lstm(x, h0, c0, w_ih, w_hh, b)

    assert torch.autograd.gradcheck(f, args)
    assert _loops() == (design, design)


@pytest.mark.cuda
def test_deterministic(design):
    """Bitwise equal on a rerun: every sum runs in a fixed order (the cooperative partial sums
    in block order), no atomics."""
    args = make_args(20, 37, 5, 33, 0, dtype=torch.float32, device="cuda", seed=8)
    first = outputs_and_grads(args)
    assert _loops() == (design, design)
    second = outputs_and_grads(args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["projection", "packed", "too-large-H", "wide-batch"])
def test_out_of_scope_calls_take_the_generic_loop(persistent, case):
    """With the switch on, calls outside both persistent designs' scope still give the
    reference's numbers: they fall back to the generic loop."""
    T, N, I, H, P = (4, 5, 3, 6, 2) if case == "projection" else (4, 5, 3, 6, 0)
    if case == "too-large-H":
        # float64 W_hh of 72 MB: beyond one block, and so are the cooperative design's 4U = 48
        # gate rows per block (576 KB) on 132 multiprocessors.
        H = 1500
    if case == "wide-batch":
        # The cooperative forward's h tile (N x H, 800 KB in float64) does not fit a block; its
        # backward would, but serves only what the forward serves.
        T, N, H = 2, 200, 512
    args = make_args(T, N, I, H, P, device="cuda", seed=9)
    kw = {}
    if case == "packed":
        kw["batch_sizes"] = packed_batch_sizes([4, 4, 3, 2, 1])
    ours = outputs_and_grads(args, **kw)
    assert _loops() == ("generic", "generic")
    _compare(ours, _reference_run(args, **kw), 1e-10)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("N,H,expected", [(2 ** 19, 1024, "generic"), (2 ** 25, 16, "single-block")],
                         ids=["generic", "single-block"])
def test_indices_beyond_2_31_elements(N, H, expected):
    """gates (T, N, 4H) of 2^32 elements (8 GB in bfloat16): a 32-bit index anywhere would wrap
    and garble the last rows. Rows of an LSTM are independent, so the first and last rows of the
    big call must equal the float64 reference run on those rows alone."""
    T, I = 2, 1
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(20)

    def r(*shape, scale=0.5):
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(torch.bfloat16)

    x, h0, c0 = r(T, N, I), r(N, H), r(N, H)
    w_ih, w_hh, b = r(4 * H, I), r(4 * H, H, scale=0.1), r(4 * H)
    grad_out = r(T, N, H)
    leaves = [t.requires_grad_() for t in (x, h0, c0)]
    before = hl.cuda_time_loop()
    try:
        hl.set_cuda_persistent_enabled(expected != "generic")
        out, h_n, c_n = hl.lstm(*leaves, w_ih, w_hh, b)
        dx, dh0, dc0 = torch.autograd.grad(out, leaves, grad_out)
        assert _loops() == (expected, expected)
    finally:
        hl.set_cuda_time_loop(before)
    rows = torch.tensor([0, 1, N - 2, N - 1], device=dev)
    sub = [t.detach()[:, rows] if t.dim() == 3 else t.detach()[rows] for t in (x, h0, c0)]
    sub = [t.double().requires_grad_() for t in sub]
    ref = reference.lstm(*sub, w_ih.double(), w_hh.double(), b.double())
    ref_grads = torch.autograd.grad(ref[0], sub, grad_out[:, rows].double())
    ours = [out[:, rows], h_n[rows], c_n[rows], dx[:, rows], dh0[rows], dc0[rows]]
    _compare(ours, list(ref) + list(ref_grads), 3e-2)


@pytest.mark.cuda
@pytest.mark.slow
def test_cooperative_indices_beyond_2_31_elements():
    """The cooperative design over T = 140,000 steps at N = 8, H = 512 in bfloat16: gates and
    their gradients of 2.3e9 elements each, so the last steps sit beyond 2^31. Those steps must
    equal the float64 reference run from the state the op reached just before them, forward and
    backward (grad_output is zero before them, so their input gradients depend on them alone)."""
    T, N, I, H, tail = 140_000, 8, 1, 512, 64
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(21)

    def r(*shape, scale=0.5):
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(torch.bfloat16)

    x, h0, c0 = r(T, N, I), r(N, H), r(N, H)
    w_ih, w_hh, b = r(4 * H, I), r(4 * H, H, scale=0.5 / H ** 0.5), r(4 * H)
    grad_out = torch.zeros(T, N, H, device=dev, dtype=torch.bfloat16)
    grad_out[T - tail:] = r(tail, N, H)
    before = hl.cuda_time_loop()
    try:
        hl.set_cuda_persistent_enabled(True)
        xl = x.clone().requires_grad_()
        out = hl.lstm(xl, h0, c0, w_ih, w_hh, b)[0]
        (dx,) = torch.autograd.grad(out, [xl], grad_out)
        assert _loops() == ("cooperative", "cooperative")
        with torch.no_grad():
            _, h, c = hl.lstm(x[:T - tail], h0, c0, w_ih, w_hh, b)
    finally:
        hl.set_cuda_time_loop(before)
    xt = x[T - tail:].double().requires_grad_()
    ref = reference.lstm(xt, h.double(), c.double(), w_ih.double(), w_hh.double(), b.double())[0]
    (ref_dx,) = torch.autograd.grad(ref, [xt], grad_out[T - tail:].double())
    _compare([out[T - tail:], dx[T - tail:]], [ref, ref_dx], 3e-2)
