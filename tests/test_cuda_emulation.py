"""The CUDA kernels, run on the CPU: their own source (csrc/lstm_cuda_cell_kernels.cuh, the
generic loop's pointwise kernels; csrc/lstm_cuda_persistent_kernels.cuh and
csrc/lstm_cuda_cooperative_kernels.cuh, the persistent loops) compiled as C++ with stand-ins
for the CUDA built-ins (tests/cuda_emulation/emulation.h: every CUDA thread an OS thread,
barriers and warp shuffles emulated), once under AddressSanitizer + UBSan and once under
ThreadSanitizer, and compared with the float64 oracle (handlstm_cuda.reference).

This is how these kernels first run without a GPU: wrong indices, a barrier missing between a
write and another thread's read, an access beyond a buffer or a read of shared memory nothing
wrote (which starts as NaN bytes) all fail here. What it cannot see (timing, co-residency, the
GPU's caches, the launch code) is for benchmarks/gpu_check.sh on a GPU, which also checks the
persistent loops' rounding points against the generic loop's (tests/test_cuda_persistent.py):
the tolerances here, against float64, cannot tell whether a kernel rounds at every step.

The harness gets the pre-activations from the input (x W_ih^T + b) as its `gates`, so the
oracle is reference.lstm with that tensor as input and W_ih the identity.
Shape vocabulary: T time, N batch, H hidden, G = 4H; R rows per block of the single-block
design, U hidden units per block of the cooperative design (whose rows tile is rows_tile(N)).
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from handlstm_cuda import reference

ROOT = Path(__file__).resolve().parent.parent
EMULATION = ROOT / "tests" / "cuda_emulation"
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
# Each kernel rounds what it stores to the dtype at every step, as the generic loop does; these
# bound the difference from float64, relative to max(1, largest value): 8 to 16 unit roundoffs
# of the dtype (2^-24, 2^-8, 2^-11), for the rounding of a few steps.
TOL = {"float32": 1e-6, "bfloat16": 3e-2, "float16": 5e-3}
SANITIZERS = {
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "thread": ["-fsanitize=thread"],
}
ENV = {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0",
       "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
       "TSAN_OPTIONS": "halt_on_error=1:exitcode=66:report_signal_unsafe=0"}

# (dtype, T, N, H, R, reverse, grad_output). Grids of 1 to 3 blocks with a last block of fewer
# rows, H not a multiple of 32 and H = 1, T = 1, every rows variant R, G and R H above the
# block's 256 threads (each thread takes several gate columns and elements), and a grid run in
# two waves (emulation.h's kWaveBlocks).
SINGLE = [
    ("float64", 3, 1, 5, 1, False, True),
    ("float64", 4, 5, 7, 2, True, True),
    ("float64", 2, 3, 33, 4, False, False),
    ("float64", 2, 9, 3, 8, True, True),
    ("float64", 1, 2, 1, 2, False, True),
    ("float32", 2, 10, 5, 1, False, True),
    ("float32", 3, 4, 16, 4, False, True),
    ("float32", 2, 4, 70, 4, True, True),
    ("bfloat16", 3, 2, 12, 2, True, True),
    ("float16", 3, 3, 12, 4, False, True),
]
# (dtype, T, N, H, U, reverse, grad_output). 1 to 4 blocks, the last with fewer units; N
# below, at and above the rows tile; U = 1 (a partial sum per gate row); a block's N x U carries
# fewer than its threads (threads share an element of dh's gather) and more (several passes);
# H above the block's threads (several k per thread in the backward's matvec).
COOPERATIVE = [
    ("float64", 3, 1, 5, 2, False, True),
    ("float64", 3, 3, 21, 8, True, True),
    ("float64", 2, 9, 16, 4, False, False),
    ("float64", 1, 2, 40, 40, False, True),
    ("float64", 2, 2, 3, 1, True, True),
    ("float32", 3, 4, 33, 11, False, True),
    ("float32", 2, 9, 64, 32, False, True),
    ("bfloat16", 3, 2, 12, 4, True, True),
    ("bfloat16", 2, 2, 300, 75, False, True),
    ("float16", 3, 2, 12, 5, False, True),
]


# The generic loop's pointwise kernels for one step: (dtype, N, H, n, n_prev, blocks), n_prev
# being what the driver passes, the rows that continue the step before (at most n). The first
# step (n_prev = 0), packed steps where fewer rows continue (a reverse pass over packed input)
# or all, and grids smaller than the n H elements (the grid-stride loop).
POINTWISE = [
    ("float64", 3, 5, 3, 0, 1),
    ("float64", 6, 7, 4, 4, 1),
    ("float64", 6, 33, 5, 2, 2),
    ("float64", 40, 16, 40, 40, 1),
    ("float64", 1, 1, 1, 1, 1),
    ("float32", 9, 100, 7, 3, 2),
    ("bfloat16", 5, 12, 5, 4, 1),
    ("float16", 5, 12, 3, 3, 1),
]


def _case_id(case):
    return "-".join(str(int(v) if isinstance(v, bool) else v) for v in case)


def _build(tmp_path_factory, source, name, flags):
    """`source` compiled into an executable `name` with the C++ compiler ($CXX, else g++) and
    `flags`; the test is skipped where there is no compiler."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        pytest.skip(f"no C++ compiler (g++ or $CXX) to build {source.name}")
    out = tmp_path_factory.mktemp("cuda_emulation") / name
    cmd = [compiler, "-std=c++20", "-O1", "-g", "-fno-omit-frame-pointer", "-pthread",
           f"-I{EMULATION}", *flags, str(source), "-o", str(out)]
    built = subprocess.run(cmd, capture_output=True, text=True)
    assert built.returncode == 0, f"building {source.name} failed:\n{built.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module", params=sorted(SANITIZERS))
def harness(request, tmp_path_factory):
    """The harness built under one sanitizer (about a minute on two cores)."""
    libs = cpp_extension.library_paths()
    flags = [*SANITIZERS[request.param],
             *[f"-I{p}" for p in [ROOT / "csrc", *cpp_extension.include_paths()]],
             *[f"-L{p}" for p in libs], *[f"-Wl,-rpath,{p}" for p in libs], "-lc10"]
    return request.param, _build(tmp_path_factory, EMULATION / "harness.cpp",
                                 f"harness_{request.param}", flags)


def _run(harness, folder, **kw):
    """One harness run; keys as harness.cpp lists them, those a design does not use at 0."""
    _, exe = harness
    args = {**dict(T=0, N=0, H=0, R=1, U=0, n=0, n_prev=0, blocks=1, reverse=False,
                   grad_output=False, dir=folder), **kw}
    argv = [str(exe)] + [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in args.items()]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **ENV})
    what = f"{kw['design']} {kw['direction']}"
    assert done.returncode == 0, f"{what} failed (exit {done.returncode}):\n{done.stderr[-6000:]}"
    assert "Sanitizer" not in done.stderr, done.stderr[-6000:]


def _write(folder, name, tensor, dtype):
    tensor.to(DTYPES[dtype]).contiguous().view(torch.uint8).numpy().tofile(folder / name)


def _read(folder, name, shape, dtype):
    raw = torch.from_file(str(folder / f"{name}.out"), size=int(torch.Size(shape).numel()) *
                          DTYPES[dtype].itemsize, dtype=torch.uint8)
    return raw.view(DTYPES[dtype]).reshape(shape).double()


def _rounded(tensor, dtype):
    """The float64 value of `tensor` as stored in `dtype`: what the harness reads."""
    return tensor.to(DTYPES[dtype]).double()


def _inputs(T, N, H, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=1.0: _rounded(torch.randn(*shape, generator=g, dtype=torch.float64)
                                           * scale, dtype)
    G = 4 * H
    return dict(x=r(T, N, G), h0=r(N, H), c0=r(N, H), w_hh=r(G, H, scale=H ** -0.5),
                grad_output=r(T, N, H), dh=r(N, H), dc=r(N, H))


def _oracle(inp, reverse, grad_output):
    """Activated gates, c_t and h_t of every step, and the gradients of
    sum(output * grad_output) + sum(h_n * dh) + sum(c_n * dc) with respect to the
    pre-activations from the input, h0 and c0: all in float64 from reference.py."""
    x = inp["x"].clone().requires_grad_()
    h0 = inp["h0"].clone().requires_grad_()
    c0 = inp["c0"].clone().requires_grad_()
    T, N, G = x.shape
    H = G // 4
    eye = torch.eye(G, dtype=torch.float64)
    output, h_n, c_n = reference.lstm(x, h0, c0, eye, inp["w_hh"], reverse=reverse)
    loss = (h_n * inp["dh"]).sum() + (c_n * inp["dc"]).sum()
    if grad_output:
        loss = loss + (output * inp["grad_output"]).sum()
    dgates, dh0, dc0 = torch.autograd.grad(loss, (x, h0, c0))
    # The per-step gates and cells, from the same reference functions.
    gates = torch.empty(T, N, G, dtype=torch.float64)
    cells = torch.empty(T, N, H, dtype=torch.float64)
    h, c = inp["h0"], inp["c0"]
    with torch.no_grad():
        for t in (range(T - 1, -1, -1) if reverse else range(T)):
            p = x[t] + h @ inp["w_hh"].t()
            p_i, p_f, p_g, p_o = p.split(H, dim=1)
            gates[t] = torch.cat([reference.input_gate(p_i), reference.forget_gate(p_f),
                                  reference.cell_gate(p_g), reference.output_gate(p_o)], dim=1)
            h, c = reference.lstm_cell(x[t], h, c, eye, inp["w_hh"])
            cells[t] = c
    return dict(gates=gates, cells=cells, output=output.detach(), dgates=dgates, dh=dh0, dc=dc0)


def _compare(name, ours, expected, dtype):
    assert not ours.isnan().any(), f"{name}: NaN (an element never written, or read unwritten)"
    if dtype == "float64":
        torch.testing.assert_close(ours, expected, atol=1e-12, rtol=1e-10, msg=name)
    else:
        scale = max(1.0, expected.abs().max().item())
        err = (ours - expected).abs().max().item()
        allowed = TOL[dtype] * scale
        assert err <= allowed, f"{name}: max error {err:.3g}, allowed {allowed:.3g}"


def _check(harness, design, folder, dtype, T, N, H, R, U, reverse, grad_output, seed):
    inp = _inputs(T, N, H, dtype, seed)
    want = _oracle(inp, reverse, grad_output)
    G = 4 * H
    # Forward.
    for name, value in [("gates", inp["x"]), ("h0", inp["h0"]), ("c0", inp["c0"]),
                        ("w_hh", inp["w_hh"])]:
        _write(folder, name, value, dtype)
    shape = dict(design=design, dtype=dtype, T=T, N=N, H=H, R=R, U=U, reverse=reverse,
                 grad_output=grad_output)
    _run(harness, folder, direction="forward", **shape)
    for name, shp in [("gates", (T, N, G)), ("cells", (T, N, H)), ("output", (T, N, H))]:
        _compare(f"forward {name}", _read(folder, name, shp, dtype), want[name], dtype)
    # Backward, from the oracle's forward as the forward would have saved it.
    for name, value in [("gates", want["gates"]), ("cells", want["cells"]),
                        ("grad_output", inp["grad_output"]), ("dh", inp["dh"]), ("dc", inp["dc"])]:
        _write(folder, name, value, dtype)
    _run(harness, folder, direction="backward", **shape)
    for name, shp in [("dgates", (T, N, G)), ("dh", (N, H)), ("dc", (N, H))]:
        _compare(f"backward {name}", _read(folder, name, shp, dtype), want[name], dtype)


@pytest.mark.slow
@pytest.mark.parametrize("case", SINGLE, ids=_case_id)
def test_single_block_kernels_match_the_reference(harness, case, tmp_path):
    dtype, T, N, H, R, reverse, grad_output = case
    _check(harness, "single", tmp_path, dtype, T, N, H, R, 0, reverse, grad_output, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("case", COOPERATIVE, ids=_case_id)
def test_cooperative_kernels_match_the_reference(harness, case, tmp_path):
    dtype, T, N, H, U, reverse, grad_output = case
    _check(harness, "cooperative", tmp_path, dtype, T, N, H, 0, U, reverse, grad_output, seed=2)


@pytest.fixture(scope="module")
def self_check(tmp_path_factory):
    """tests/cuda_emulation/self_check.cpp built under ThreadSanitizer."""
    return _build(tmp_path_factory, EMULATION / "self_check.cpp", "self_check",
                  SANITIZERS["thread"])


@pytest.mark.parametrize("mode,race", [("shuffle_values", False), ("shuffle_fence", True),
                                       ("syncthreads", False), ("grid_sync", False)])
def test_the_emulation_orders_memory_as_a_gpu_does(self_check, mode, race):
    """The barriers order memory and a warp shuffle does not, so that ThreadSanitizer reports a
    kernel that uses a shuffle as a fence, and only such kernels; shuffles return the partner
    lane's value."""
    done = subprocess.run([str(self_check), mode], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **ENV})
    if race:
        assert done.returncode == 66 and "ThreadSanitizer: data race" in done.stderr, done.stderr
    else:
        assert done.returncode == 0, done.stderr[-4000:]


def _pointwise_oracle(p, c_prev, c0, n_prev, dm, grad_output, dc):
    """One step from the pre-activations p (n, 4H) in float64 with reference.py's gate
    functions: the activated gates, c_t and m_t, and the gradients of
    sum(m_t * (dm + grad_output)) + sum(c_t * dc) with respect to p and c_{t-1}."""
    n, H = p.shape[0], p.shape[1] // 4
    p = p.clone().requires_grad_()
    rows = [c_prev[r] if r < n_prev else c0[r] for r in range(n)]
    cp = torch.stack(rows).requires_grad_()
    p_i, p_f, p_g, p_o = p.split(H, dim=1)
    i, f, g, o = (reference.input_gate(p_i), reference.forget_gate(p_f),
                  reference.cell_gate(p_g), reference.output_gate(p_o))
    c = reference.cell_state(i, f, g, cp)
    m = reference.hidden_state(o, c)
    loss = (m * (dm + grad_output)).sum() + (c * dc).sum()
    dgates, dcp = torch.autograd.grad(loss, (p, cp))
    gates = torch.cat([i, f, g, o], dim=1).detach()
    return dict(gates=gates, c=c.detach(), m=m.detach(), dgates=dgates, dc=dcp)


@pytest.mark.parametrize("grad_output", [True, False], ids=["grad_output", "no_grad_output"])
@pytest.mark.parametrize("case", POINTWISE, ids=_case_id)
def test_pointwise_kernels_match_the_reference(harness, case, grad_output, tmp_path):
    dtype, N, H, n, n_prev, blocks = case
    g = torch.Generator().manual_seed(4)
    r = lambda *shape: _rounded(torch.randn(*shape, generator=g, dtype=torch.float64), dtype)
    p, c_prev, c0 = r(n, 4 * H), r(max(n_prev, 1), H), r(N, H)
    dm, go, dc = r(n, H), r(n, H), r(n, H)
    want = _pointwise_oracle(p, c_prev, c0, n_prev, dm, go if grad_output else 0 * go, dc)
    shape = dict(design="pointwise", dtype=dtype, N=N, H=H, n=n, n_prev=n_prev, blocks=blocks,
                 grad_output=grad_output)
    for name, value in [("gates", p), ("c0", c0)] + ([("c_prev", c_prev[:n_prev])] if n_prev
                                                     else []):
        _write(tmp_path, name, value, dtype)
    _run(harness, tmp_path, direction="forward", **shape)
    for name, shp in [("gates", (n, 4 * H)), ("c", (n, H)), ("m", (n, H))]:
        _compare(f"forward {name}", _read(tmp_path, name, shp, dtype), want[name], dtype)
    for name, value in [("gates", want["gates"]), ("c", want["c"]), ("dm", dm),
                        ("grad_output", go), ("dc", dc)]:
        _write(tmp_path, name, value, dtype)
    _run(harness, tmp_path, direction="backward", **shape)
    for name, shp in [("dgates", (n, 4 * H)), ("dc", (n, H))]:
        _compare(f"backward {name}", _read(tmp_path, name, shp, dtype), want[name], dtype)
