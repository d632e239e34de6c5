"""Benchmark handlstm_cuda against torch.nn.LSTM (cuDNN on GPU, oneDNN/ATen on CPU) and the
pure-PyTorch reference loop.

    python -m benchmarks.bench            # default preset: about 5 minutes on 2 CPU cores
    python -m benchmarks.bench --quick    # the two target workloads and one point per sweep
    python -m benchmarks.bench --full     # the whole sweep
    python -m benchmarks.bench --help

Writes bench.csv (metadata header + one row per point), bench.md (the tables) and bench.png
(time vs H and vs N) to --out (default benchmarks/out/<device>-<preset>/), then prints the
ratio table. benchmarks/README.md explains the columns.

Shape vocabulary: T time, N batch, I input, H hidden, L layers, D directions.
"""

import argparse
import contextlib
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import env, impls, report
from .cases import MODES, PRESETS
from .data import REPO_ROOT, make_input_sets
from .timing import paired_ratio, time_cpu, time_cuda

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# err_vs_torch above this gets a warning under the table: the timed op may not compute the
# same function as nn.LSTM.
ERROR_LIMIT = {"float32": 1e-3, "tf32": 3e-2, "bfloat16": 5e-2, "float16": 3e-2}


@dataclass(frozen=True)
class Setting:
    dtype_name: str
    tf32: str  # "off" / "on" for CUDA float32, "n/a" otherwise

    @property
    def dtype(self):
        return DTYPES[self.dtype_name]


@contextlib.contextmanager
def tf32_mode(setting):
    """Set cuDNN's and cuBLAS's TF32 switches together for one setting, restore after."""
    if setting.tf32 == "n/a":
        yield
        return
    flag = setting.tf32 == "on"
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = flag
    torch.backends.cuda.matmul.allow_tf32 = flag
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def tf32_readback(setting):
    """What torch reports under a setting, legacy flags and the newer fp32_precision ones."""
    with tf32_mode(setting):
        parts = [
            f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}",
            f"cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}",
        ]
        try:
            parts.append(f"cudnn.rnn.fp32_precision={torch.backends.cudnn.rnn.fp32_precision}")
            parts.append(f"cuda.matmul.fp32_precision={torch.backends.cuda.matmul.fp32_precision}")
        except (AttributeError, RuntimeError):
            pass
    return ", ".join(parts)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="Time handlstm_cuda against torch.nn.LSTM and the reference loop.",
    )
    preset = p.add_mutually_exclusive_group()
    for name in ("smoke", "quick", "full"):
        preset.add_argument(
            f"--{name}", dest="preset", action="store_const", const=name,
            help=f"preset '{name}': {PRESETS[name].description}",
        )
    preset.add_argument("--preset", choices=sorted(PRESETS), help="preset by name")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:K or auto (default)")
    p.add_argument(
        "--dtypes", help="comma list of float32,bfloat16,float16 (default: float32 on CPU, "
        "all three on CUDA)",
    )
    p.add_argument(
        "--tf32", default="off,on",
        help="CUDA float32 only: TF32 settings to run, comma list of off,on (default both)",
    )
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {','.join(MODES)}")
    p.add_argument(
        "--impls", default=",".join(impls.IMPLS),
        help="comma list of ours,torch,reference (torch is always run: it is the baseline)",
    )
    p.add_argument("--groups", help="only these case groups (seed,fastrnns,latency,...)")
    p.add_argument(
        "--cuda-loop", choices=("generic", "persistent", "auto", "graph"),
        help="CUDA only: the time loop ours runs (handlstm_cuda.set_cuda_time_loop; default: "
             "the package's, 'generic' unless HANDLSTM_CUDA_LOOP says otherwise); the "
             "metadata records it",
    )
    p.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)),
        help="torch CPU threads (default: all cores this process may use)",
    )
    p.add_argument("--sets", type=int, default=4, help="input sets rotated between calls")
    p.add_argument("--budget", type=float, help="seconds; points after this are skipped")
    p.add_argument("--out", type=Path, help="output folder (default benchmarks/out/DEV-PRESET)")
    p.add_argument(
        "--data-dir", type=Path,
        help="folder of NGSIM car_data CSVs for the seed workload's inputs (default: "
             "$HANDLSTM_TRAJ_DATA, else ../shared/data/trajectories/car_data; random inputs "
             "when it does not exist)",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.preset = args.preset or "default"
    args.argv = list(argv)
    return args


def _split(text, allowed, what, scope=""):
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise SystemExit(
            f"error: --{what} takes a comma list of {', '.join(allowed)}{scope}; got {text!r}"
        )
    return items


def build_settings(args, device):
    default = "float32" if device.type == "cpu" else "float32,bfloat16,float16"
    dtypes = _split(args.dtypes or default, DTYPES, "dtypes")
    tf32 = _split(args.tf32, ("off", "on"), "tf32")
    settings = []
    for d in dtypes:
        if device.type == "cuda" and d == "float32":
            settings.extend(Setting(d, t) for t in tf32)
        else:
            settings.append(Setting(d, "n/a"))
    return settings


def _short(e):
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:160]


class Runner:
    """Times every (setting, case, mode, impl) point and collects the rows."""

    def __init__(self, args, device, preset, hl, ref):
        self.args = args
        self.device = device
        self.preset = preset
        self.hl = hl
        self.ref = ref
        self.rows = []
        self.baselines = set()
        self.data_sources = set()
        self.start = time.perf_counter()

    def over_budget(self):
        b = self.args.budget
        return b is not None and time.perf_counter() - self.start > b

    def remaining(self):
        b = self.args.budget
        return None if b is None else max(0.0, b - (time.perf_counter() - self.start))

    def wanted(self, case):
        names = ["ours"] if "ours" in self.args.impl_list else []
        names.append("torch")
        if "reference" in self.args.impl_list and case.reference and case.single_layer:
            names.append("reference")
        return names

    def row(self, setting, case, source, mode, name, backend, status, **values):
        r = {
            "device": self.device.type,
            "dtype": setting.dtype_name,
            "tf32": setting.tf32,
            "case": case.name,
            "group": case.group,
            "T": case.T,
            "N": case.N,
            "I": case.I,
            "H": case.H,
            "layers": case.layers,
            "bidirectional": case.bidirectional,
            "data": source,
            "mode": mode,
            "impl": name,
            "backend": backend,
            "status": status,
            "median_ms": math.nan,
            "p25_ms": math.nan,
            "p75_ms": math.nan,
            "reps": 0,
            "us_per_step": math.nan,
            "peak_mb": math.nan,
            "err_vs_torch": math.nan,
            "ratio_p25": math.nan,
            "ratio_p75": math.nan,
        }
        r.update(values)
        self.rows.append(r)

    def run_block(self, setting, case, modes, bar):
        """All modes and implementations of one case in one setting."""
        names = self.wanted(case)
        if self.over_budget():
            for mode, name in itertools.product(modes, names):
                self.row(setting, case, "-", mode, name, "-", "skipped: time budget")
                bar.update(1)
            return

        with tf32_mode(setting):
            sets, source = make_input_sets(case, self.args.sets, self.device, setting.dtype,
                                           data_dir=self.args.data_dir)
            self.data_sources.add(source)
            base = impls.make_baseline_module(case, self.device, setting.dtype)
            built, failed = {}, {}
            for name in names:
                try:
                    if name == "torch":
                        built[name] = impls.make_torch(base)
                    elif name == "ours":
                        built[name] = impls.make_ours(
                            case, base, self.hl, self.device, setting.dtype
                        )
                    else:
                        built[name] = impls.make_reference(case, base, self.ref)
                except Exception as e:
                    failed[name] = "error: " + _short(e)

            # Run each once on the same inputs: compare with torch and warm up.
            results, errors, backends = {}, {}, {}
            for name in list(built):
                try:
                    results[name], backends[name] = impls.run_once(built[name], sets[0])
                except Exception as e:
                    failed[name] = "error: " + _short(e)
                    del built[name]
            if "torch" in results:
                self.baselines.add(backends["torch"])
                for name in results:
                    if name != "torch":
                        errors[name] = impls.relative_error(results[name], results["torch"])

            for mode in modes:
                bar.set_postfix_str(f"{setting.dtype_name} {case.name} {mode}")
                for name in failed:
                    self.row(setting, case, source, mode, name, "-", failed[name])
                if self.over_budget():
                    for name in built:
                        self.row(setting, case, source, mode, name, backends[name],
                                 "skipped: time budget")
                elif built:
                    self.measure(setting, case, source, mode, built, backends, sets, errors)
                bar.update(len(names))

    def measure(self, setting, case, source, mode, built, backends, sets, errors):
        """Time one (setting, case, mode) point: every built implementation, interleaved."""
        on_cuda = self.device.type == "cuda"
        steps, clears = {}, {}
        for name, impl in built.items():
            steps[name], clears[name] = make_step(impl, sets, mode, clear_inside=not on_cuda)
        try:
            if on_cuda:
                stats = time_cuda(steps, clears, self.preset.timing, self.remaining())
            else:
                stats = time_cpu(steps, clears, self.preset.timing, self.args.threads,
                                 self.remaining())
        except Exception as e:
            for name in built:
                self.row(setting, case, source, mode, name, backends[name], "error: " + _short(e))
            return
        base = stats.get("torch")
        for name in built:
            st = stats[name]
            r50, r25, r75 = paired_ratio(st.samples, base.samples) if base else (math.nan,) * 3
            # A point whose err_vs_torch is over its limit is timed all the same; main()
            # prints a warning naming it.
            self.row(
                setting, case, source, mode, name, backends[name], "ok",
                median_ms=st.median * 1e3,
                p25_ms=st.p25 * 1e3,
                p75_ms=st.p75 * 1e3,
                reps=st.reps,
                us_per_step=st.median * 1e6 / case.T,
                peak_mb=st.peak_bytes / 2**20,
                err_vs_torch=errors.get(name, math.nan),
                ratio_paired=r50,
                ratio_p25=r25,
                ratio_p75=r75,
            )


def make_step(impl, sets, mode, clear_inside):
    """(step, clear): one call of `impl` in `mode` on the next input set, and the grad reset.

    With clear_inside the reset happens at the start of step (the CPU timer times blocks of
    calls); otherwise the caller runs clear() untimed before each step.
    """
    cycle = itertools.cycle(sets)
    leaves = impl.params + [s[0] for s in sets]

    def clear():
        for t in leaves:
            t.grad = None

    if mode == "infer":

        def core():
            x, h0, c0, _ = next(cycle)
            with torch.no_grad():
                impl.forward(x, h0, c0)

    elif mode == "train-fwd":

        def core():
            x, h0, c0, _ = next(cycle)
            impl.forward(x, h0, c0)

    elif mode == "fwd+bwd":

        def core():
            x, h0, c0, grad_out = next(cycle)
            torch.autograd.backward(impl.forward(x, h0, c0), grad_out)

    else:
        raise ValueError(f"unknown mode {mode!r}")

    if not clear_inside:
        return core, clear

    def step():
        clear()
        core()

    return step, clear


def _progress(total, disable):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or disable:
        return _NoBar()
    # disable=None: no bar when stderr is not a terminal (a log file, CI).
    return tqdm(total=total, unit="pt", file=sys.stderr, dynamic_ncols=True, disable=None)


class _NoBar:
    def update(self, n):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    preset = PRESETS[args.preset]
    if args.threads < 1 or args.sets < 1:
        raise SystemExit("error: --threads and --sets must be at least 1")
    torch.set_num_threads(args.threads)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)

    settings = build_settings(args, device)
    modes = _split(args.modes, MODES, "modes")
    args.impl_list = _split(args.impls, impls.IMPLS, "impls")
    cases = list(preset.cases) + (list(preset.cuda_extra) if device.type == "cuda" else [])
    if args.groups:
        groups = set(_split(args.groups, sorted({c.group for c in cases}), "groups",
                            f" (the groups of the {args.preset} preset on {device.type})"))
        cases = [c for c in cases if c.group in groups]

    hl = ref = None
    ours_desc = "not timed"
    if "ours" in args.impl_list:
        try:
            hl = impls.load_ours(device)
            if args.cuda_loop and device.type == "cuda":
                hl.set_cuda_time_loop(args.cuda_loop)
            # Now, not at the end: a rebuild during the run must not change what is reported.
            ours_desc = env.ours_description(hl)
        except impls.OursUnavailable as e:
            print(f"error: cannot benchmark 'ours': {e}", file=sys.stderr)
            return 2
    if "reference" in args.impl_list:
        try:
            ref = impls.load_reference()
        except ImportError as e:
            print(f"error: cannot import handlstm_cuda.reference ({e})", file=sys.stderr)
            return 2

    out = args.out or REPO_ROOT / "benchmarks" / "out" / f"{device.type}-{args.preset}"
    out.mkdir(parents=True, exist_ok=True)

    # The two target workloads first in every setting, so a time budget cuts the sweep.
    blocks = sorted(
        itertools.product(enumerate(settings), enumerate(cases)),
        key=lambda b: (b[1][1].priority, b[0][0], b[1][0]),
    )
    runner = Runner(args, device, preset, hl, ref)
    total = sum(len(modes) * len(runner.wanted(c)) for _, (_, c) in blocks)
    load_before = os.getloadavg()
    cpus = len(os.sched_getaffinity(0))
    # Busy now? Other processes' share of the CPUs over one second (the load average lags by
    # minutes and, on some virtual machines, never falls below 1 on an idle machine).
    probe = env.CpuContention()
    time.sleep(1.0)
    others_now = probe.others()
    # Other processes' share of the machine beyond the cores the torch threads left free (plus
    # a margin of 10% of the machine): past that, the torch threads had to wait for cores.
    def short_of_cores(others):
        return others > max(0.0, 1 - args.threads / cpus) + 0.1

    busy = device.type == "cpu" and (
        short_of_cores(others_now) if others_now is not None
        else load_before[0] > cpus - args.threads + 0.5)
    if busy:
        print(
            f"warning: other processes are using "
            + (f"{others_now:.0%} of the CPUs" if others_now is not None
               else f"the CPUs (load average {load_before[0]:.1f})")
            + f" with {args.threads} torch threads on {cpus} CPUs: other work competes for "
            f"the cores"
            + (
                ", and multithreaded timings can then be off by 10x or more. Wait for a quiet "
                "machine or pass --threads 1."
                if args.threads > 1
                else "; wait for a quiet machine for numbers worth keeping."
            ),
            file=sys.stderr,
        )
    contention = env.CpuContention()
    bar = _progress(total, args.no_progress)
    interrupted = False
    try:
        for (_, setting), (_, case) in blocks:
            runner.run_block(setting, case, modes, bar)
    except KeyboardInterrupt:
        interrupted = True  # write what was measured so far
    finally:
        bar.close()
    load_after = os.getloadavg()
    others = contention.others()

    rows = report.add_ratios(runner.rows)
    t = preset.timing
    if device.type == "cuda":
        timing_desc = (
            f"CUDA events around each call; warm-up >= 3 calls and {t.cuda_warmup}s per "
            f"implementation; then {t.cuda_min_reps}-{t.cuda_max_reps} rounds (~{t.cuda_target}s "
            f"per implementation), implementations alternating; median; {args.sets} input sets "
            f"rotated; grads set to None, untimed, before each call"
        )
    else:
        timing_desc = (
            f"torch.utils.benchmark Timer; per implementation one probe call (warm-up and peak "
            f"RSS), block size from blocked_autorange for calls under 50 ms (samples dropped); "
            f"then alternating rounds of one block per implementation until >= "
            f"{t.cpu_min_reps} blocks and {t.cpu_min_run_time}s each (at least 3 rounds once "
            f"a point passes {t.cpu_max_time}s); median of per-call block means; {args.sets} "
            f"input sets rotated; grads set to None inside each call"
        )
    meta = env.collect(args, device, settings, ours_desc, runner.baselines, timing_desc,
                       runner.data_sources)
    meta["loadavg"] = (
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (1-min; other work on the "
        f"machine slows both sides)"
    )
    if device.type == "cuda":
        meta["tf32_effective"] = "; ".join(
            f"{flag}: {tf32_readback(Setting('float32', flag))}"
            for flag in dict.fromkeys(st.tf32 for st in settings if st.tf32 != "n/a")
        )
    meta["other_cpu_use"] = (
        "unknown" if others is None
        else f"{others:.0%} of all CPU time during the run went to other processes"
    )
    meta["wall_s"] = f"{time.perf_counter() - runner.start:.0f}"

    notes = []
    crowded = device.type == "cpu" and (short_of_cores(others) if others is not None else busy)
    if crowded:
        notes.append(
            f"WARNING: the machine was busy (load average {load_before[0]:.2f} at the start; "
            f"{meta['other_cpu_use']}) with {args.threads} torch threads on {cpus} CPUs: "
            f"these times are unreliable."
        )
    flagged = [
        r for r in rows
        if r["impl"] != "torch" and r["status"] == "ok"
        and not (r["err_vs_torch"] <= ERROR_LIMIT["tf32" if r["tf32"] == "on" else r["dtype"]])
    ]
    if flagged:
        notes.append(
            "WARNING: these implementations disagree with torch.nn.LSTM beyond tolerance, so "
            "their times may not be comparable: "
            + "; ".join(sorted({f"{r['impl']} {r['dtype']} {r['case']}" for r in flagged}))
        )
    errors = sorted({(r["impl"], r["status"]) for r in rows if r["status"].startswith("error")})
    for impl, status in errors:
        notes.append(f"{impl}: {status}")
    if interrupted:
        notes.append("Interrupted (Ctrl-C): the points after the last row were not run.")
    skipped = sum(r["status"].startswith("skipped") for r in rows)
    if skipped:
        notes.append(f"{skipped} points were skipped: the --budget of {args.budget}s ran out.")

    csv_path, md_path, png_path = out / "bench.csv", out / "bench.md", out / "bench.png"
    caveat = "busy machine, not a verdict: rerun on a quiet one" if crowded else None
    report.write_csv(csv_path, meta, rows)
    report.write_markdown(md_path, meta, rows, notes, caveat=caveat)
    wrote = [csv_path, md_path]
    if not args.no_plot:
        title = f"{meta['device_name']} | torch {meta['torch']} | {meta['date'][:10]}"
        from .plot import plot

        if plot(rows, png_path, title):
            wrote.append(png_path)

    print(f"wrote {', '.join(str(p) for p in wrote)}")
    print(f"{meta['device_name']}; torch {meta['torch']}; threads {meta['threads']}; "
          f"load {meta['loadavg']}")
    if crowded:
        print(notes[0])
    print(report.text_table(rows))
    seed_data = sorted({r.get("data", "?") for r in rows if r.get("group") == "seed"})
    print("\nours/torch: time ratio, below 1 means ours is faster (speedup: its inverse)."
          + (f" Seed workload inputs: {', '.join(seed_data)}." if seed_data else ""))
    print("\ntargets:")
    print(report.targets_text(rows, caveat=caveat) or "  none for this device")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
