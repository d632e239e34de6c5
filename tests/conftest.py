"""Shared markers, fixtures and helpers for the test suite.

Shape vocabulary: T time, N batch, I input, H hidden, G = 4H, P projection size.
No CUDA query runs at import time; the `cuda` marker is resolved per test.
"""

import os

import pytest
import torch

# The CUDA tests exist to verify the fused CUDA kernels, which are off by default until they
# have run on a GPU (see handlstm_cuda/_ops.py); turn them on before the package is imported.
os.environ.setdefault("HANDLSTM_CUDA_KERNELS", "1")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    have_gpu = None
    for item in items:
        if "cuda" in item.keywords:
            if have_gpu is None:
                have_gpu = torch.cuda.is_available()
            if not have_gpu:
                item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: at these tiny sizes thread hand-offs cost more than they
    save on a small shared machine, and no result depends on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["avx512", "avx2", "scalar"])
def cpu_path(request):
    """Runs the test on one of the CPU SIMD paths (units chosen at run time: pointwise kernels,
    GEMMs, half-type conversions); paths this CPU cannot run are skipped."""
    import handlstm_cuda as hl  # here, not at the top: see HANDLSTM_CUDA_KERNELS above
    from handlstm_cuda import _C

    before = hl.cpu_pointwise_path()
    try:
        _C._set_cpu_pointwise_path(request.param)
    except RuntimeError:
        pytest.skip(f"this CPU cannot run the {request.param} path")
    yield request.param
    _C._set_cpu_pointwise_path(before)


def device_params():
    """cpu always, cuda as a marked parameter (skipped without a GPU)."""
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def make_args(T, N, I, H, P=0, *, bias=True, dtype=torch.float64, device="cpu", seed=0,
              requires_grad=True, scale=0.5):
    """Random (input, h0, c0, weight_ih, weight_hh, bias, weight_hr) for the op."""
    g = torch.Generator().manual_seed(seed)
    Hout = P or H

    def r(*shape):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype,
                                                                               device=device)
        return t.requires_grad_(requires_grad)

    return (r(T, N, I), r(N, Hout), r(N, H), r(4 * H, I), r(4 * H, Hout),
            r(4 * H) if bias else None, r(P, H) if P else None)


def outputs_and_grads(args, loss="all", fn=None, **kw):
    """handlstm_cuda.lstm's outputs (detached) on args (as make_args returns them) and the
    gradients of every tensor argument for a fixed random loss of all outputs, or of h_n alone
    (loss="h_n": autograd then hands the backward no grad_output). fn: another function of
    lstm's signature to run instead (handlstm_cuda.reference.lstm)."""
    import handlstm_cuda as hl  # here, not at the top: see HANDLSTM_CUDA_KERNELS above

    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in args]
    outs = (fn or hl.lstm)(*leaves[:6], weight_hr=leaves[6], **kw)
    used = outs if loss == "all" else outs[1:2]
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in used]
    grads = torch.autograd.grad(used, [t for t in leaves if t is not None], weights)
    return [o.detach() for o in outs] + list(grads)


def packed_batch_sizes(lengths):
    """batch_sizes (T,) of a PackedSequence with these lengths (sorted descending inside)."""
    lengths = sorted(lengths, reverse=True)
    return torch.tensor([sum(l > t for l in lengths) for t in range(lengths[0])],
                        dtype=torch.int64)
