"""What a result was measured on: machine, library versions and settings, as ordered pairs.

Every output file (CSV, markdown) starts with these, so a table can be judged without the
command that made it.
"""

import datetime
import os
import platform
import re
import subprocess

import torch

from .data import REPO_ROOT

# Keys every CSV header carries; tests/test_bench.py checks them.
REQUIRED_KEYS = (
    "date",
    "command",
    "preset",
    "device",
    "device_name",
    "gpu_name",
    "cpu_model",
    "threads",
    "torch",
    "cuda",
    "cudnn",
    "onednn",
    "dtypes",
    "tf32",
    "baseline",
    "timing",
)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class CpuContention:
    """Share of the machine's CPU time that other processes used while this one ran.

    From /proc/stat's busy ticks across all CPUs minus this process's own CPU time, over the
    wall time times the CPU count. None where /proc/stat cannot be read.
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        t = os.times()
        return sum(fields) - idle, sum(fields), t.user + t.system

    def others(self):
        end = self._sample()
        if self.start is None or end is None or end[1] <= self.start[1]:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (end[0] - self.start[0]) / hz
        total = (end[1] - self.start[1]) / hz
        own = end[2] - self.start[2]
        return max(0.0, (busy - own) / total)


def onednn_version():
    if not torch.backends.mkldnn.is_available():
        return "not built"
    m = re.search(r"MKL-DNN (v[\d.]+)", torch.__config__.show())
    return m.group(1) if m else "built (version unknown)"


def cudnn_version():
    if not torch.backends.cudnn.is_available():
        return "not available"
    v = torch.backends.cudnn.version()
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}" if v else "unknown"


def git_describe():
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        # A copy of the tree without .git (a lent GPU machine gets one): the commit the caller
        # names, if any.
        named = os.environ.get("HANDLSTM_GIT_COMMIT")
        if named:
            return f"{named} (named by HANDLSTM_GIT_COMMIT; not a git checkout)"
        return "unknown (not a git checkout)"
    return commit + (" (with uncommitted changes)" if dirty else "")


def ours_description(hl):
    """Version, CUDA kernels, CPU SIMD path (and whether bfloat16 multiplies bfloat16 pairs)
    and build time of the extension, read when it is imported."""
    parts = [str(getattr(hl, "__version__", "version unknown"))]
    has = getattr(hl, "has_cuda_kernels", None)
    if has is not None:
        parts.append(f"has_cuda_kernels={has()}")
    loop = getattr(hl, "cuda_time_loop", None)
    if has is not None and has() and loop is not None:
        parts.append(f"cuda_time_loop={loop()}")
    path = getattr(hl, "cpu_pointwise_path", None)
    if path is not None:
        parts.append(f"cpu_path={path()}")
    dot = getattr(getattr(hl, "_C", None), "_cpu_bf16_dot", None)
    if dot is not None:
        parts.append(f"cpu_bf16_dot_products={dot()}")
    native = getattr(getattr(hl, "_C", None), "__file__", None)
    if native:
        built = datetime.datetime.fromtimestamp(os.path.getmtime(native)).astimezone()
        parts.append(f"extension built {built.isoformat(timespec='seconds')}")
    return ", ".join(parts)


def collect(args, device, settings, ours, baselines, timing_desc, data_sources):
    is_cuda = device.type == "cuda"
    gpu = torch.cuda.get_device_name(device) if is_cuda else "none (CPU run)"
    tf32 = sorted({s.tf32 for s in settings})
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.bench"] + list(args.argv)),
        "preset": args.preset,
        "device": str(device),
        "device_name": gpu if is_cuda else f"{cpu_model()} ({os.cpu_count()} logical CPUs)",
        "gpu_name": gpu,
        "cpu_model": cpu_model(),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "cuda": (
            f"{torch.version.cuda} (torch build)" if torch.version.cuda else "none (CPU build)"
        )
        + ("" if is_cuda else "; not used in a CPU run"),
        "cudnn": cudnn_version() + ("" if is_cuda else "; not used in a CPU run"),
        "onednn": onednn_version() + ("; not used in a CUDA run" if is_cuda else ""),
        "dtypes": ",".join(dict.fromkeys(s.dtype_name for s in settings)),
        "tf32": ",".join(tf32)
        + (
            " (on = torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32 "
            "both True for ours and torch; off = both False; float32 only)"
            if is_cuda
            else " (CPU run)"
        ),
        "baseline": "torch.nn.LSTM -> " + ", ".join(sorted(baselines) or ["not run"]),
        "ours": ours,
        "timing": timing_desc,
        "data": ", ".join(sorted(data_sources)) or "none",
        "git": git_describe(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if is_cuda:
        props = torch.cuda.get_device_properties(device)
        meta["gpu_detail"] = (
            f"cc {props.major}.{props.minor}, {props.multi_processor_count} SMs, "
            f"{props.total_memory / 2**30:.0f} GiB"
        )
    return meta
