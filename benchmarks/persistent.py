"""The persistent CUDA time loops against cuDNN and our generic CUDA loop, side by side (GPU).

    python -m benchmarks.persistent [--quick] [--budget SECONDS] [--out DIR]

For each point (dtype, T, N, H; one layer, I = H except the seed's I = 12) four calls are timed
interleaved in one run, with CUDA events: torch.nn.LSTM (cuDNN), ours on the generic loop
(a cuBLAS GEMM and a fused pointwise kernel per step), ours on the persistent loops
(whichever design serves the shape: single-block or cooperative; the table names it) and ours
on the graph loop (the generic loop replayed from a CUDA graph the op captures and caches
itself). Their ratios to the generic loop are the measured crossovers the 'auto' dispatcher
reads. float32 runs with TF32 off everywhere (exact float32, as the persistent loops compute).

Two more calls per point: cuDNN and our generic loop, each captured whole (forward and backward)
in a CUDA graph by the caller and replayed, i.e. what graphs save of their per-step launch cost
when the user captures a whole step.

For points the cooperative design serves it also times, at the same grid and shared memory,
T steps of the grid barrier alone and of the on-chip matvec alone
(handlstm_cuda._C._cuda_cooperative_probe_ms), beside the persistent forward's own time per
step: the issue's "within 2x of barrier + matvec" figure.

Writes persistent.csv, persistent.md and cuda_crossovers.json (the measured crossovers, the
table handlstm_cuda.load_cuda_crossovers reads for the 'auto' time loop; copy it to
handlstm_cuda/cuda_crossovers.json to ship it) to --out (default benchmarks/out/persistent), and
prints the table and the target lines. Needs a GPU and a CUDA build of the extension.

Shape vocabulary: T time, N batch, I input, H hidden.
"""

import argparse
import csv
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from . import env
from .cases import Timing
from .data import REPO_ROOT
from .timing import paired_ratio, time_cuda

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMPLS = ("cudnn", "generic", "persistent", "graphloop")
# The time loop each of our implementations runs under.
LOOP_MODE = {"generic": "generic", "persistent": "persistent", "graphloop": "graph"}
# Whole calls captured in a CUDA graph and replayed: what graphs save of the per-step launch
# cost, for cuDNN and for our generic loop (the persistent loops launch once anyway).
GRAPHED = ("cudnn", "generic")
MODES = ("fwd+bwd", "infer")
TIMING = Timing(cpu_min_run_time=0, cpu_min_reps=0, cpu_max_time=0, cuda_warmup=0.03,
                cuda_target=0.05, cuda_min_reps=10, cuda_max_reps=200)

SEED = ("float32", 62, 64, 12, 64)


def points(quick):
    """(dtype, T, N, I, H) in priority order: the issue's targets first, so that a budget cuts
    the least important ones."""
    first = [SEED] + [(d, 100, n, h, h) for d in ("float32", "bfloat16") for n in (1, 8)
                      for h in (256, 512)]
    if quick:
        return first
    # H = 200 and 1000: hidden sizes off cuDNN's multiples of 128.
    rest = [(d, 100, n, h, h) for d in ("float32", "bfloat16") for n in (1, 8, 32, 64)
            for h in (64, 128, 200, 256, 512, 1000)]
    rest += [(d, 1000, n, h, h) for d in ("float32", "bfloat16") for n in (1, 8)
             for h in (256, 512)]
    rest += [("float16", 100, 8, h, h) for h in (256, 512)]
    return first + [p for p in rest if p not in first]


class Point:
    """The tensors of one point and a step() per implementation and mode."""

    def __init__(self, hl, dtype, T, N, I, H):  # noqa: E741
        self.C = hl._ext._C
        dev = torch.device("cuda")
        torch.manual_seed(0)
        self.base = torch.nn.LSTM(I, H).to(device=dev, dtype=dtype)
        self.weights = [p.detach().clone().requires_grad_() for p in self.base.parameters()]
        g = torch.Generator(device=dev).manual_seed(1)
        self.x = torch.randn(T, N, I, device=dev, dtype=dtype, generator=g).requires_grad_()
        self.h0 = (torch.randn(1, N, H, device=dev, dtype=dtype, generator=g) * 0.5)
        self.c0 = (torch.randn(1, N, H, device=dev, dtype=dtype, generator=g) * 0.5)
        self.grad = torch.randn(T, N, H, device=dev, dtype=dtype, generator=g)
        self.hl = hl

    def leaves(self):
        return [self.x] + self.weights + list(self.base.parameters())

    def clear(self):
        for t in self.leaves():
            t.grad = None

    def output(self, impl):
        if impl == "cudnn":
            return self.base(self.x, (self.h0, self.c0))[0]
        # The switch is set inside the timed call, so the backward that follows runs the loop
        # of this implementation too (the flag is process-wide).
        self.hl.set_cuda_time_loop(LOOP_MODE[impl])
        w_ih, w_hh, b_ih, b_hh = self.weights
        return self.hl.lstm(self.x, self.h0[0], self.c0[0], w_ih, w_hh, b_ih + b_hh)[0]

    def step(self, impl, mode):
        if mode == "infer":
            def run():
                with torch.no_grad():
                    self.output(impl)
        else:
            def run():
                self.output(impl).backward(self.grad)
        return run

    def graphed(self, impl, mode):
        """A step() replaying a CUDA graph of one call of `impl` in `mode` (captured whole,
        forward and backward), or None with the reason when capture fails."""
        run = self.step(impl, mode)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch asks
            for _ in range(2):
                self.clear()
                run()
        torch.cuda.current_stream().wait_stream(side)
        self.clear()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                run()
        except RuntimeError as e:
            return None, f"{type(e).__name__}: {str(e).splitlines()[0]}"
        finally:
            self.clear()
        return graph.replay, None

    def check(self, impl):
        """(loops, relative error of output and input gradient against cuDNN)."""
        results = {}
        for name in ("cudnn", impl):
            self.clear()
            out = self.output(name)
            out.backward(self.grad)
            results[name] = (out.detach().float(), self.x.grad.float())
            if name != "cudnn":
                loops = self.C._cuda_last_loops()
        self.clear()
        err = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item()
                  for a, b in zip(results[impl], results["cudnn"]))
        return loops, err


def probe_per_step_us(C, N, H, dtype_name, barrier, matvec, T=2000, repeats=5):
    """Median microseconds per step of the cooperative probe (after one warm-up launch)."""
    C._cuda_cooperative_probe_ms(N, H, 10, dtype_name, barrier, matvec)
    ms = [C._cuda_cooperative_probe_ms(N, H, T, dtype_name, barrier, matvec)
          for _ in range(repeats)]
    return math.nan if min(ms) < 0 else statistics.median(ms) * 1e3 / T


def measure(hl, C, point, rows):
    """Appends the rows (one per mode) of one point to `rows`, each as soon as it is measured."""
    dtype_name, T, N, I, H = point  # noqa: E741
    p = Point(hl, DTYPES[dtype_name], T, N, I, H)
    loops, err = p.check("persistent")
    _, err_generic = p.check("generic")
    for _ in range(2):  # a signature is captured on its second call and replayed from its third
        p.check("graphloop")
    graph_loops, err_graphloop = p.check("graphloop")
    for mode in MODES:
        graph_notes = []
        steps = {impl: p.step(impl, mode) for impl in IMPLS}
        clears = {impl: p.clear for impl in IMPLS}
        for impl in GRAPHED:
            replay, why = p.graphed(impl, mode)
            if replay is None:
                graph_notes.append(f"{impl} {mode}: {why}")
                print(f"  {impl} {mode}: CUDA graph capture failed ({why})", flush=True)
                continue
            steps[impl + "+graph"] = replay
            clears[impl + "+graph"] = lambda: None  # replays write the graph's own buffers
        stats = time_cuda(steps, clears, TIMING)
        del steps
        row = dict(dtype=dtype_name, T=T, N=N, I=I, H=H, mode=mode, forward_loop=loops[0],
                   backward_loop=loops[1], err_persistent=err, err_generic=err_generic,
                   err_graphloop=err_graphloop)
        for impl, st in stats.items():  # IMPLS, and the graphed ones that captured
            key = impl.replace("+", "_")
            row[f"{key}_ms"] = st.median * 1e3
            if impl != "cudnn":
                # Per-round ratios: plain cuDNN's time over this one's (above 1: this is faster).
                row[f"speedup_{key}"] = paired_ratio(stats["cudnn"].samples, st.samples)[0]
        row["persistent_us_per_step"] = stats["persistent"].median * 1e6 / T
        row["persistent_vs_generic"] = paired_ratio(stats["generic"].samples,
                                                    stats["persistent"].samples)[0]
        row["graphloop_vs_generic"] = paired_ratio(stats["generic"].samples,
                                                   stats["graphloop"].samples)[0]
        row["graph_replayed"] = graph_loops == ("graph", "graph")
        if loops[0] == "cooperative" and mode == "infer":
            row["barrier_us"] = probe_per_step_us(C, N, H, dtype_name, True, False)
            row["matvec_us"] = probe_per_step_us(C, N, H, dtype_name, False, True)
        notes = [f"graph capture failed: {n}" for n in graph_notes]
        if not row["graph_replayed"]:
            notes.append(f"the graph loop ran {'/'.join(graph_loops)}, not its replays")
        row["note"] = "; ".join(notes)
        rows.append(row)
        print(_line(row), flush=True)


def run(args):
    import handlstm_cuda as hl

    if not (torch.cuda.is_available() and hl.has_cuda_kernels()):
        print("benchmarks.persistent: needs a CUDA GPU and handlstm_cuda built with CUDA kernels")
        return 2
    hl.set_cuda_kernels_enabled(True)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    C = hl._ext._C
    before = hl.cuda_time_loop()
    start = time.perf_counter()
    rows, skipped, failed, attempted = [], 0, [], 0
    try:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": env.cudnn_version(),
            "commit": env.git_describe(),
            "tf32": "off (cudnn.allow_tf32 = cuda.matmul.allow_tf32 = False)",
        }

        def save():
            meta["points skipped by the budget"] = skipped
            meta["points that failed"] = "; ".join(failed) or "none"
            write_csv(out / "persistent.csv", meta, rows)
            text = markdown(meta, rows)
            (out / "persistent.md").write_text(text)
            # Whole or not at all: a run cut short mid-write must not leave a table that
            # load_cuda_crossovers refuses.
            tmp = out / "cuda_crossovers.json.tmp"
            tmp.write_text(json.dumps(crossovers(meta, rows), indent=1))
            os.replace(tmp, out / "cuda_crossovers.json")
            return text

        for point in points(args.quick):
            if (args.budget is not None and attempted
                    and time.perf_counter() - start > args.budget):
                skipped += 1
                continue
            attempted += 1
            try:
                measure(hl, C, point, rows)
            except Exception as e:  # one failing point must not cost the others
                failed.append(f"{point}: {type(e).__name__}: {str(e).splitlines()[0]}")
                print(f"FAILED {failed[-1]}", flush=True)
            save()  # after every point, so that a run cut short still leaves its results
            try:
                hl.clear_cuda_graphs()  # the graph loop's cached graphs of this point
                torch.cuda.empty_cache()
            except Exception as e:  # a sticky CUDA error: every later point would fail too
                failed.append(f"after {point}, the CUDA context is unusable: "
                              f"{type(e).__name__}: {str(e).splitlines()[0]}")
                print(f"FAILED {failed[-1]}; stopping the sweep", flush=True)
                break
    finally:
        hl.set_cuda_time_loop(before)
    print()
    print(save())
    return 1 if failed else 0


COLUMNS = ("dtype", "T", "N", "I", "H", "mode", "forward_loop", "backward_loop", "cudnn_ms",
           "generic_ms", "persistent_ms", "cudnn_graph_ms", "generic_graph_ms",
           "speedup_generic", "speedup_persistent", "speedup_cudnn_graph",
           "speedup_generic_graph", "graphloop_ms", "speedup_graphloop", "persistent_vs_generic",
           "graphloop_vs_generic", "graph_replayed", "persistent_us_per_step", "barrier_us",
           "matvec_us", "err_generic", "err_persistent", "err_graphloop", "note")


# The persistent or the graph loop must beat the generic one by this factor at a point to be
# chosen there (closer calls stay on the generic loop, the better tested one).
WIN_MARGIN = 1.05


def crossovers(meta, rows):
    """The table handlstm_cuda.load_cuda_crossovers reads: for every row, which of the
    persistent loops and the graph loop beat the generic one there by WIN_MARGIN, the faster
    of the two if both did (infer rows steer the forward loop, fwd+bwd rows the backward loop).
    A point where the persistent call fell back to the generic loop, or the graph loop's call
    did not replay, is a loss for that loop."""
    points = []
    for r in rows:
        forward = r["mode"] == "infer"
        ran = r["forward_loop"] if forward else r["backward_loop"]
        # Paired per-round ratios: the generic loop's time over each one's.
        gains = {}
        if ran != "generic" and r["persistent_vs_generic"] >= WIN_MARGIN:
            gains["persistent"] = r["persistent_vs_generic"]
        if r.get("graph_replayed") and r.get("graphloop_vs_generic", 0) >= WIN_MARGIN:
            gains["graph"] = r["graphloop_vs_generic"]
        best = max(gains, key=gains.get) if gains else "generic"
        points.append(dict(dtype=r["dtype"], forward=forward, N=r["N"], H=r["H"], T=r["T"],
                           persistent_wins=best == "persistent", graph_wins=best == "graph"))
    return {"device": meta.get("gpu", ""), "measured": meta.get("date", ""),
            "commit": meta.get("commit", ""),
            "rule": f"the persistent or the graph loop where it took at most 1/{WIN_MARGIN} of "
                    "the generic loop's time at that point (median of per-round ratios), the "
                    "faster of the two where both did",
            "points": points}


def write_csv(path, meta, rows):
    with open(path, "w", newline="") as f:
        for k, v in meta.items():
            f.write(f"# {k}: {v}\n")
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})


def _f(v, spec):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _line(r):
    return (f"{r['dtype']:8} T{r['T']:<5} N{r['N']:<3} H{r['H']:<5} {r['mode']:7} "
            f"{r['forward_loop']:>12}/{r['backward_loop']:<12} cuDNN {r['cudnn_ms']:8.3f} ms  "
            f"x{r['speedup_generic']:5.2f} generic  x{r['speedup_persistent']:5.2f} persistent  "
            f"x{r['speedup_graphloop']:5.2f} graph loop")


def best_loop(r):
    """(speedup over cuDNN, name) of the fastest of our loops at a row: the loops the 'auto'
    mode can dispatch to (the graph loop only where its calls replayed)."""
    options = [(r["speedup_generic"], "generic")]
    # The persistent call counts only where a persistent design served it (else it was the
    # generic loop again, under another name).
    loops = [r["forward_loop"]] if r["mode"] == "infer" else [r["forward_loop"], r["backward_loop"]]
    if any(loop != "generic" for loop in loops):
        options.append((r["speedup_persistent"], "persistent"))
    if r.get("graph_replayed"):
        options.append((r["speedup_graphloop"], "graph"))
    return max(options)


def targets(rows):
    """The issue's targets, judged on these rows (fwd+bwd unless said) with the fastest of our
    loops per point, named (the 'auto' mode dispatches to it by the crossover table)."""
    fb = [r for r in rows if r["mode"] == "fwd+bwd"]
    lines = []
    small = [r for r in fb if r["N"] <= 8 and r["H"] in (256, 512) and r["T"] >= 100
             and r["dtype"] in ("float32", "bfloat16")]
    if small:
        worst = min(small, key=best_loop)
        x, name = best_loop(worst)
        lines.append(f"fwd+bwd >= 3x cuDNN at N <= 8, H in {{256, 512}}, T >= 100 (float32, "
                     f"bfloat16): worst x{x:.2f} ({name} loop; {worst['dtype']} "
                     f"T{worst['T']} N{worst['N']} H{worst['H']}) over {len(small)} points: "
                     + ("MET" if x >= 3 else "NOT MET"))
    seed = [r for r in fb if (r["dtype"], r["T"], r["N"], r["I"], r["H"]) == SEED]
    if seed:
        x, name = best_loop(seed[0])
        lines.append(f"seed fwd+bwd >= 1.5x cuDNN: x{x:.2f} ({name} loop): "
                     + ("MET" if x >= 1.5 else "NOT MET"))
    if rows:
        worst = min(rows, key=best_loop)
        x, name = best_loop(worst)
        lines.append(f"never below 0.9x cuDNN with the fastest of our loops per point: worst "
                     f"x{x:.2f} ({name} loop; {worst['dtype']} T{worst['T']} N{worst['N']} "
                     f"H{worst['H']} {worst['mode']}): " + ("MET" if x >= 0.9 else "NOT MET"))
    for r in rows:
        if math.isnan(r.get("barrier_us", math.nan)) or math.isnan(r.get("matvec_us", math.nan)):
            continue
        bound = r["barrier_us"] + r["matvec_us"]
        lines.append(f"cooperative forward per step {r['persistent_us_per_step']:.2f} us vs "
                     f"barrier {r['barrier_us']:.2f} + matvec {r['matvec_us']:.2f} us "
                     f"({r['dtype']} N{r['N']} H{r['H']}): x{r['persistent_us_per_step'] / bound:.2f}"
                     + (" (within 2x)" if r["persistent_us_per_step"] <= 2 * bound else
                        " (NOT within 2x)"))
    return lines


def markdown(meta, rows):
    out = ["# Persistent CUDA loops vs cuDNN and the generic loop", ""]
    out += [f"- {k}: {v}" for k, v in meta.items()]
    out += ["", "Speedups are cuDNN's time over ours, median of per-round ratios (above 1: ours "
            "is faster). generic: cuBLAS GEMM + fused pointwise kernel per step; persistent: "
            "the loop named in the loops column (forward/backward); +graph: the whole call "
            "captured in a CUDA graph by the caller and replayed (speedup still over plain "
            "cuDNN); graph loop: our time loop mode 'graph' (the op replays its own cached "
            "graph of the generic loop). "
            "us/step: the persistent "
            "call's time over T; barrier and matvec: per-step time of the cooperative grid "
            "barrier and of its on-chip matvec alone (infer rows of cooperative points).", ""]
    out.append("| dtype | T | N | H | mode | loops | cuDNN ms | generic x | persistent x | "
               "persistent/generic x | cuDNN+graph x | generic+graph x | graph loop x | "
               "us/step | barrier us | matvec us | err |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        out.append(
            f"| {r['dtype']} | {r['T']} | {r['N']} | {r['H']} | {r['mode']} | "
            f"{r['forward_loop']}/{r['backward_loop']} | {r['cudnn_ms']:.3f} | "
            f"{r['speedup_generic']:.2f} | {r['speedup_persistent']:.2f} | "
            f"{r['persistent_vs_generic']:.2f} | {_f(r.get('speedup_cudnn_graph'), '.2f')} | "
            f"{_f(r.get('speedup_generic_graph'), '.2f')} | {r['speedup_graphloop']:.2f} | "
            f"{r['persistent_us_per_step']:.2f} | "
            f"{_f(r.get('barrier_us'), '.2f')} | {_f(r.get('matvec_us'), '.2f')} | "
            f"{r['err_persistent']:.1e} |")
    out += ["", "## Targets", ""] + [f"- {line}" for line in targets(rows)]
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="the seed and the issue's target points only (N <= 8, H 256/512)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after which no new point starts (default: no limit; 0 or "
                         "less: the first point only)")
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "out", "persistent"))
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
