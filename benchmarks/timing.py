"""Timing and peak-memory measurement.

CPU: torch.utils.benchmark timers, block sizes from its blocked_autorange. CUDA: CUDA events
around each call after a warm-up. On both, the implementations of one point are timed in
alternating rounds, and the median and interquartile range of the samples are reported.

The timed callable clears gradients itself (CPU, where each timed block holds several calls)
or is preceded by an untimed clear (CUDA, where each call has its own events). Clearing means
setting .grad to None, which is what optimizer.zero_grad() does by default.
"""

import ctypes
import gc
import math
import time
from dataclasses import dataclass

import logging

import torch

# torch.utils.benchmark imports torch.utils.cpp_extension, which logs a CUDA_HOME guess on
# machines without a CUDA runtime; it says nothing about the benchmark.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
import torch.utils.benchmark as tbench  # noqa: E402


@dataclass
class Stats:
    median: float  # seconds per call
    p25: float
    p75: float
    reps: int  # timed calls
    peak_bytes: float = math.nan  # peak memory of one call (see peak_cuda_bytes / peak_rss_bytes)
    samples: list = None  # per-call seconds, one per round; rounds align across implementations


def paired_ratio(samples, baseline):
    """(median, p25, p75) of the per-round ratios samples[r] / baseline[r].

    Both were timed in the same round, moments apart, so a slow spell on a shared machine
    scales both and cancels in the ratio.
    """
    return _median_iqr([a / b for a, b in zip(samples, baseline, strict=True)])


def _median_iqr(times):
    """(median, 25th percentile, 75th percentile) of the samples."""
    t = torch.tensor(times, dtype=torch.float64)
    p25, med, p75 = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return med.item(), p25.item(), p75.item()


def time_cpu(steps, clears, timing, threads, max_seconds=None):
    """{name: Stats} of per-call CPU times of each step() in `steps`, timed interleaved.

    Each implementation first makes one untimed probe call (a warm-up, and the call whose
    peak RSS growth is reported). Calls under 50 ms then get torch.utils.benchmark's
    blocked_autorange for a quarter of min_run_time, to size a block of calls long enough that
    the timer's own overhead vanishes; those samples are dropped too. Then rounds time one
    block of every implementation in turn, order reversed every other round, until each has
    cpu_min_run_time of samples and at least cpu_min_reps blocks, or (after 3 rounds) the
    point has used cpu_max_time. Interleaving makes other load on the machine fall on all
    implementations alike.
    """
    timers, numbers, times, peaks = {}, {}, {}, {}
    start = time.perf_counter()
    for name, step in steps.items():
        timer = timers[name] = tbench.Timer(
            stmt="step()", globals={"step": step}, num_threads=threads
        )
        probe = {}

        def call(timer=timer, probe=probe):
            probe["seconds"] = timer._timeit(1)

        with tbench.utils.common.set_torch_threads(threads):
            peaks[name] = peak_rss_bytes(call, clears[name])
        if probe["seconds"] >= 0.05:
            numbers[name] = 1
        else:
            warm = timer.blocked_autorange(min_run_time=timing.cpu_min_run_time / 4)
            numbers[name] = warm.number_per_run
        times[name] = []

    names = list(steps)
    rounds = 0
    with tbench.utils.common.set_torch_threads(threads):
        while rounds < timing.cpu_min_reps or any(
            sum(times[n]) * numbers[n] < timing.cpu_min_run_time for n in names
        ):
            spent = time.perf_counter() - start
            if rounds >= 1 and max_seconds is not None and spent > max_seconds:
                break
            if rounds >= 3 and spent > timing.cpu_max_time:
                break
            for name in names if rounds % 2 == 0 else reversed(names):
                # The Timer's block timer; Timer.timeit() would add two untimed calls.
                total = timers[name]._timeit(numbers[name])
                times[name].append(total / numbers[name])
            rounds += 1
    return {
        n: Stats(*_median_iqr(times[n]), reps=len(times[n]) * numbers[n], peak_bytes=peaks[n],
                 samples=times[n])
        for n in names
    }


def time_cuda(steps, clears, timing, max_seconds=None):
    """{name: Stats} of per-call device times with CUDA events, timed interleaved.

    Each implementation is warmed up (at least 3 calls and cuda_warmup seconds); its
    synchronized per-call time sizes the rounds. Each round runs every implementation once
    between its own pair of events, clear() (grads to None) untimed before each call, each
    call started on an idle GPU.
    """
    names = list(steps)
    per_call = 0.0
    for name in names:
        start, calls = time.perf_counter(), 0
        while calls < 3 or time.perf_counter() - start < timing.cuda_warmup:
            clears[name]()
            steps[name]()
            torch.cuda.synchronize()
            calls += 1
        per_call += (time.perf_counter() - start) / calls

    target = timing.cuda_target * len(names)
    if max_seconds is not None:
        target = min(target, max_seconds)
    reps = int(min(timing.cuda_max_reps, max(timing.cuda_min_reps, target / per_call)))
    events = {n: [] for n in names}
    for r in range(reps):
        for name in names if r % 2 == 0 else reversed(names):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            clears[name]()
            # Each timed call starts on an idle GPU, so that its time includes its own launch
            # cost: otherwise work still queued by the call before (a CUDA graph replay or a
            # single persistent launch returns at once) would hide the next one's launches.
            torch.cuda.synchronize()
            begin.record()
            steps[name]()
            end.record()
            events[name].append((begin, end))
    torch.cuda.synchronize()
    out = {}
    for name in names:
        times = [begin.elapsed_time(end) / 1e3 for begin, end in events[name]]
        peak = peak_cuda_bytes(steps[name], clears[name])
        out[name] = Stats(*_median_iqr(times), reps=reps, peak_bytes=peak, samples=times)
    return out


def peak_cuda_bytes(step, clear):
    """Peak bytes allocated by one call above what was allocated before it."""
    clear()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


_LIBC = None


def _malloc_trim():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def peak_rss_bytes(step, clear):
    """Run step() once; return its peak resident-set growth (Linux), or NaN where it cannot
    be read.

    Free heap memory is first handed back to the OS (malloc_trim) and the kernel's high-water
    mark is reset (/proc/self/clear_refs, "5"), so memory the call reuses from earlier calls
    still shows. It counts every allocation (ATen, oneDNN scratch, Python), so it is an upper
    bound on what the op itself needs; page granularity makes tiny cases read as 0 or 4 KiB.
    """
    clear()
    gc.collect()
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
    except (OSError, KeyError):
        before = None
    step()
    if before is None:
        return math.nan
    try:
        peak = _status_kib("VmHWM")
    except (OSError, KeyError):
        return math.nan
    return max(0, peak - before) * 1024
