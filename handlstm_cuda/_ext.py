"""The one place that loads the native extension (and with it the torch.ops.handlstm ops)."""

try:
    from handlstm_cuda import _C  # noqa: F401  (loading registers torch.ops.handlstm.*)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "handlstm_cuda: the native extension handlstm_cuda._C is not built or does not match "
        "the installed torch. From the repository root run `make build` (or "
        "`python setup.py build_ext --inplace`, or `pip install --no-build-isolation .`). "
        f"Original error: {exc}"
    ) from exc

has_cuda_kernels = _C.has_cuda_kernels
cpu_pointwise_path = _C.cpu_pointwise_path
