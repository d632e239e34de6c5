"""benchmarks/persistent.py, the GPU sweep of the persistent loops against cuDNN: what can be
checked without a GPU (the order of its points, the target verdicts and the tables it writes
from rows), and, on a GPU, one quick run end to end.
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import persistent  # noqa: E402


def _row(dtype="float32", T=100, N=8, I=256, H=256, mode="fwd+bwd", generic=1.2,  # noqa: E741
         speedup=3.5, loops=("cooperative", "cooperative"), **extra):
    row = dict(dtype=dtype, T=T, N=N, I=I, H=H, mode=mode, forward_loop=loops[0],
               backward_loop=loops[1], cudnn_ms=1.0, generic_ms=1 / generic,
               persistent_ms=1 / speedup, speedup_generic=generic, speedup_persistent=speedup,
               persistent_vs_generic=speedup / generic, persistent_us_per_step=3.0,
               graphloop_ms=0.5, speedup_graphloop=2.0, err_generic=1e-7, err_persistent=2e-7,
               err_graphloop=1e-7)
    row.update(extra)
    return row


def test_points_put_the_targets_first_and_have_no_duplicates():
    quick, full = persistent.points(True), persistent.points(False)
    assert quick[0] == persistent.SEED
    assert full[:len(quick)] == quick
    assert len(set(full)) == len(full)
    targets = {(d, 100, n, h, h) for d in ("float32", "bfloat16") for n in (1, 8)
               for h in (256, 512)}
    assert targets <= set(quick)


def test_targets_judge_the_worst_point():
    rows = [_row(), _row(N=1, H=512, I=512, speedup=2.9), _row(dtype="bfloat16", speedup=4.0)]
    lines = persistent.targets(rows)
    first = lines[0]
    assert "x2.90" in first and "N1 H512" in first and first.endswith("NOT MET")
    rows[1]["speedup_persistent"] = 3.1
    assert persistent.targets(rows)[0].endswith(": MET")


def test_targets_seed_and_never_slower_use_the_faster_loop():
    seed = _row(T=62, N=64, I=12, H=64, speedup=1.6, generic=0.7)
    slow = _row(N=64, H=1000, I=1000, speedup=0.5, generic=0.95, mode="infer")
    lines = persistent.targets([seed, slow])
    assert any(line.startswith("seed fwd+bwd >= 1.5x cuDNN: x1.60 (persistent loop): MET")
               for line in lines)
    never = next(line for line in lines if line.startswith("never below"))
    # The faster of the two loops at the slow point is the generic one, at 0.95: met.
    assert "x0.95" in never and never.endswith(": MET")
    slow["speedup_generic"] = 0.8
    never = next(line for line in persistent.targets([seed, slow]) if "never" in line)
    assert never.endswith("NOT MET")


def test_a_persistent_call_that_fell_back_is_not_named_persistent():
    seed = _row(T=62, N=64, I=12, H=64, speedup=1.6, generic=1.4, loops=("generic", "generic"))
    line = next(x for x in persistent.targets([seed]) if x.startswith("seed"))
    assert "x1.40 (generic loop)" in line and line.endswith("NOT MET")


def test_the_graph_loop_counts_only_where_its_calls_replayed():
    seed = _row(T=62, N=64, I=12, H=64, speedup=1.2, generic=0.7, speedup_graphloop=1.8)
    line = next(x for x in persistent.targets([seed]) if x.startswith("seed"))
    assert "x1.20 (persistent loop)" in line and line.endswith("NOT MET")
    seed["graph_replayed"] = True
    line = next(x for x in persistent.targets([seed]) if x.startswith("seed"))
    assert "x1.80 (graph loop)" in line and line.endswith(": MET")


def test_targets_compare_per_step_time_with_barrier_plus_matvec():
    ok = _row(mode="infer", barrier_us=1.0, matvec_us=0.5, persistent_us_per_step=2.9)
    far = _row(mode="infer", H=512, I=512, barrier_us=1.0, matvec_us=0.5,
               persistent_us_per_step=3.1)
    lines = [line for line in persistent.targets([ok, far]) if "barrier" in line]
    assert lines[0].endswith("(within 2x)") and lines[1].endswith("(NOT within 2x)")
    no_probe = _row(mode="infer", barrier_us=math.nan, matvec_us=math.nan)
    assert not [line for line in persistent.targets([no_probe]) if "barrier" in line]


def test_csv_and_markdown_carry_every_row(tmp_path):
    rows = [_row(), _row(mode="infer", barrier_us=1.0, matvec_us=0.5)]
    meta = {"gpu": "test GPU", "torch": "x"}
    persistent.write_csv(tmp_path / "p.csv", meta, rows)
    text = (tmp_path / "p.csv").read_text().splitlines()
    assert text[0] == "# gpu: test GPU"
    assert text[2].split(",") == list(persistent.COLUMNS)
    assert len(text) == 2 + 1 + len(rows)
    md = persistent.markdown(meta, rows)
    table = [line for line in md.splitlines() if line.startswith("| float32")]
    assert len(table) == 2 and "cooperative/cooperative" in table[0]
    assert "## Targets" in md


def test_sweep_keeps_its_results_and_stops_when_the_cuda_context_breaks(tmp_path, monkeypatch,
                                                                         capsys):
    """run() on the CPU with the GPU parts faked: the first point measures, the second fails,
    then the per-point cleanup meets a broken context, as after a sticky CUDA error. The sweep
    stops there (no third point), exits 1, and leaves the first point's rows in all three
    files, with a crossover table load_cuda_crossovers accepts."""
    import argparse

    import torch

    import handlstm_cuda as hl

    calls = []

    def measure(hl_, C, point, rows):
        calls.append(point)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        rows.extend([_row(mode="infer"), _row()])

    def clear():
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(hl, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(hl, "clear_cuda_graphs", clear)
    monkeypatch.setattr(persistent, "measure", measure)
    monkeypatch.setattr(persistent.env, "cudnn_version", lambda: "fake")
    # run() turns TF32 off for the sweep: put the flags back, and the switches it sets.
    before = (hl.cuda_kernels_enabled(), hl.cuda_time_loop(), torch.backends.cudnn.allow_tf32,
              torch.backends.cuda.matmul.allow_tf32)
    try:
        rc = persistent.run(argparse.Namespace(quick=True, budget=None, out=str(tmp_path)))
    finally:
        hl.set_cuda_kernels_enabled(before[0])
        hl.set_cuda_time_loop(before[1])
        torch.backends.cudnn.allow_tf32 = before[2]
        torch.backends.cuda.matmul.allow_tf32 = before[3]
    assert rc == 1 and len(calls) == 2
    assert "the CUDA context is unusable" in capsys.readouterr().out
    rows = [r for r in (tmp_path / "persistent.csv").read_text().splitlines()
            if not r.startswith("#")]
    assert len(rows) == 1 + 2
    assert "## Targets" in (tmp_path / "persistent.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cuda_crossovers.json",
                                                          "persistent.csv", "persistent.md"]
    try:
        assert hl.load_cuda_crossovers(tmp_path / "cuda_crossovers.json") == 2
    finally:
        hl.load_cuda_crossovers(None)


def test_without_a_gpu_it_says_so_and_exits_2():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the end-to-end test below runs instead")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.persistent", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "needs a CUDA GPU" in proc.stdout


@pytest.mark.cuda
def test_quick_run_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.persistent", "--quick", "--budget", "5", "--out",
         str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = (tmp_path / "persistent.csv").read_text().splitlines()
    assert len([r for r in rows if not r.startswith("#")]) >= 3  # header + both modes of one point
    assert "## Targets" in (tmp_path / "persistent.md").read_text()
