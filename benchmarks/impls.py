"""The implementations put side by side: ours, torch.nn.LSTM and the reference loop.

All three get the same weights (copied from one seeded nn.LSTM) and the same inputs. Each is
wrapped as an `Impl`: a forward(x, h0, c0) -> output callable plus the tensors whose .grad
the harness clears between timed calls.

Shape vocabulary: T time, N batch, I input, H hidden, L layers, D directions.
"""

import importlib
import importlib.util
import math
from dataclasses import dataclass

import torch

from .data import REPO_ROOT

IMPLS = ("ours", "torch", "reference")


class OursUnavailable(RuntimeError):
    """handlstm_cuda does not provide the op to benchmark under the name 'ours'."""


@dataclass
class Impl:
    name: str
    backend: str  # what actually runs, for the report
    forward: object  # (x (T,N,I), h0 (L*D,N,H), c0 (L*D,N,H)) -> output (T,N,D*H)
    params: list  # leaf tensors in nn.LSTM's parameter order (for grad clearing and checks)


def load_ours(device):
    """Import handlstm_cuda and check it provides the real op, or raise OursUnavailable.

    Never falls back to anything else: a number printed as 'ours' must be the extension's.
    """
    hint = (
        "Build the extension first (`make build`, or `python setup.py build_ext --inplace`), "
        "or leave 'ours' out with `--impls torch,reference` to time only the baselines."
    )
    try:
        hl = importlib.import_module("handlstm_cuda")
    except Exception as e:  # an ImportError, or a broken build raising something else
        raise OursUnavailable(f"cannot import handlstm_cuda ({type(e).__name__}: {e}). {hint}")
    if not hasattr(hl, "lstm"):
        raise OursUnavailable(
            f"handlstm_cuda (from {getattr(hl, '__file__', None) or 'a namespace'}) has no "
            f"lstm. {hint}"
        )
    try:
        ref = importlib.import_module("handlstm_cuda.reference")
    except ImportError:
        ref = None
    if ref is not None and hl.lstm is getattr(ref, "lstm", None):
        raise OursUnavailable(
            "handlstm_cuda.lstm is the reference loop itself; refusing to time it as 'ours'."
        )
    if torch.device(device).type == "cuda":
        has = getattr(hl, "has_cuda_kernels", None)
        if has is None or not has():
            raise OursUnavailable(
                "handlstm_cuda was built without CUDA kernels (has_cuda_kernels() is false "
                "or missing); rebuild with CUDA before timing 'ours' on the GPU. " + hint
            )
        enabled = getattr(hl, "cuda_kernels_enabled", None)
        if enabled is not None and not enabled():
            raise OursUnavailable(
                "handlstm_cuda's CUDA kernels are switched off (not yet verified on a GPU), so "
                "'ours' would time the reference loop; set HANDLSTM_CUDA_KERNELS=1 to time them."
            )
    return hl


def load_reference():
    """handlstm_cuda.reference; loaded straight from its file when the package itself cannot
    be imported (the extension is not built): the reference is plain PyTorch either way."""
    try:
        return importlib.import_module("handlstm_cuda.reference")
    except ImportError:
        path = REPO_ROOT / "handlstm_cuda" / "reference.py"
        spec = importlib.util.spec_from_file_location("_handlstm_reference", path)
        if spec is None or not path.is_file():
            raise
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def make_baseline_module(case, device, dtype, seed=0):
    """The seeded nn.LSTM whose weights every implementation uses."""
    torch.manual_seed(seed)
    module = torch.nn.LSTM(
        case.I, case.H, num_layers=case.layers, bidirectional=case.bidirectional
    )
    return module.to(device=device, dtype=dtype)


def _copies(module):
    return [p.detach().clone().requires_grad_() for p in module.parameters()]


def make_torch(base):
    def forward(x, h0, c0):
        return base(x, (h0, c0))[0]

    return Impl("torch", "torch.nn.LSTM", forward, list(base.parameters()))


def make_functional(name, backend, fn, base):
    """A single-layer unidirectional op with the contract's signature, on copied weights."""
    w_ih, w_hh, b_ih, b_hh = params = _copies(base)

    def forward(x, h0, c0):
        # The two biases are summed inside the timed call, as a module wrapping the op would.
        return fn(x, h0[0], c0[0], w_ih, w_hh, b_ih + b_hh)[0]

    return Impl(name, backend, forward, params)


def make_ours(case, base, hl, device, dtype):
    backend = "handlstm_cuda " + ("CUDA kernels" if torch.device(device).type == "cuda" else "CPU")
    if case.single_layer:
        return make_functional("ours", backend + " (lstm)", hl.lstm, base)
    if not hasattr(hl, "LSTM"):
        raise OursUnavailable("handlstm_cuda.LSTM (the multi-layer module) does not exist yet")
    module = hl.LSTM(
        case.I, case.H, num_layers=case.layers, bidirectional=case.bidirectional
    ).to(device=device, dtype=dtype)
    module.load_state_dict(base.state_dict(), strict=True)

    def forward(x, h0, c0):
        return module(x, (h0, c0))[0]

    # Ordered as nn.LSTM's parameters, so the gradient check can pair them up.
    named = dict(module.named_parameters())
    params = [named[n] for n, _ in base.named_parameters()]
    return Impl("ours", backend + " (LSTM)", forward, params)


def make_reference(case, base, ref):
    if not case.single_layer:
        raise ValueError("the reference loop is timed on single-layer cases only")
    return make_functional("reference", "reference loop (Python, per-step ops)", ref.lstm, base)


def torch_backend(output):
    """Which kernel family nn.LSTM ran, read off the autograd graph of a training forward."""
    seen, stack, names = set(), [output.grad_fn], []
    while stack and len(seen) < 10000:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    if any("Cudnn" in n for n in names):
        return "cuDNN"
    if any("Mkldnn" in n for n in names):
        return "oneDNN (mkldnn_rnn_layer)"
    if any("Miopen" in n for n in names):
        return "MIOpen"
    return "ATen native loop"


def run_once(impl, inputs):
    """One training forward + backward; returns [output, x.grad, *param grads] in float32.

    The harness calls this once per implementation before timing: to compare results with
    torch.nn.LSTM's, and as the first warm-up call.
    """
    x, h0, c0, grad_out = inputs
    for t in impl.params + [x]:
        t.grad = None
    out = impl.forward(x, h0, c0)
    backend = torch_backend(out) if impl.name == "torch" else impl.backend
    torch.autograd.backward(out, grad_out)
    tensors = [out.detach().float(), x.grad.float()] + [
        p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float)
        for p in impl.params
    ]
    for t in impl.params + [x]:
        t.grad = None
    return tensors, backend


def relative_error(tensors, baseline):
    """Largest ||a - b|| / ||b|| over paired tensors (output, input grad, parameter grads).

    A sanity check that the timed ops compute the same function, not an accuracy study.
    """
    err = 0.0
    for a, b in zip(tensors, baseline, strict=True):
        denom = b.norm().item()
        diff = (a - b).norm().item()
        e = diff / denom if denom > 0 else diff
        if not math.isfinite(e):
            return math.inf  # NaN or Inf anywhere is a failure, never a small error
        err = max(err, e)
    return err
