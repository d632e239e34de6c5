"""The benchmark harness: its smoke preset end to end, and the pieces a wrong number could hide
in (ratios, targets, the 'ours' guard, the car_data loader).

The end-to-end test runs `python -m benchmarks.bench --smoke` on one thread (under a minute on
a 2-core CI machine) and checks what a reader relies on: the table is printed, every ratio is
finite, the CSV header names the machine and versions.
"""

import importlib
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench, data, env, impls, report  # noqa: E402


def _ours():
    """The built extension module, or None."""
    try:
        hl = importlib.import_module("handlstm_cuda")
    except Exception:
        return None
    return hl if hasattr(hl, "lstm") else None


def _run_cli(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )


def _check_outputs(out, stdout, device, impl_names, plot=True):
    assert "ours/torch" in stdout and "speedup" in stdout, stdout
    assert f"{device} float32" in stdout
    assert "targets:" in stdout

    meta, rows = report.read_csv(out / "bench.csv")
    for key in env.REQUIRED_KEYS:
        assert meta.get(key), f"CSV header lacks {key!r}: {meta}"
    assert meta["device"].startswith(device)
    assert meta["torch"] == torch.__version__
    assert list(rows[0]) == list(report.COLUMNS)

    assert {r["impl"] for r in rows} == set(impl_names)
    assert {r["mode"] for r in rows} == {"infer", "train-fwd", "fwd+bwd"}
    hl = _ours()
    for r in rows:
        if r["impl"] == "ours" and r["layers"] != "1" and not hasattr(hl, "LSTM"):
            # The multi-layer module is not written yet; the row must say so, not time it.
            assert r["status"].startswith("error") and "LSTM" in r["status"], r
            continue
        assert r["status"] == "ok", r
        ratio = float(r["ratio_vs_torch"])
        assert math.isfinite(ratio) and ratio > 0, r
        assert math.isfinite(float(r["median_ms"])) and float(r["median_ms"]) > 0, r
        if r["impl"] == "torch":
            assert ratio == 1.0
        else:
            assert float(r["err_vs_torch"]) < 1e-3, r
    assert (out / "bench.md").read_text().count("### ") >= 1
    if plot:
        png = out / "bench.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_cli_cpu(tmp_path):
    """--smoke on CPU: table, finite ratios, complete CSV header; 'ours' when it is built."""
    names = ["ours", "torch", "reference"] if _ours() else ["torch", "reference"]
    if "ours" not in names:
        # Without the extension, asking for 'ours' must fail loudly, never time a stand-in.
        refused = _run_cli("--smoke", "--device", "cpu", "--out", str(tmp_path / "refused"))
        assert refused.returncode == 2
        assert "cannot benchmark 'ours'" in refused.stderr
        assert not (tmp_path / "refused" / "bench.csv").exists()

    result = _run_cli(
        "--smoke", "--device", "cpu", "--threads", "1", "--no-progress",
        "--impls", ",".join(names), "--out", str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _check_outputs(tmp_path, result.stdout, "cpu", names)


@pytest.mark.slow
def test_quick_cli_cpu(tmp_path):
    """--quick, the preset the README offers for a first look (about a minute on 2 cores): the
    target workloads and one point of each sweep, every row timed with finite ratios, the CSV
    header complete and both targets judged."""
    names = ["ours", "torch", "reference"] if _ours() else ["torch", "reference"]
    result = _run_cli(
        "--quick", "--device", "cpu", "--no-progress", "--no-plot",
        "--impls", ",".join(names), "--out", str(tmp_path), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _check_outputs(tmp_path, result.stdout, "cpu", names, plot=False)
    _, rows = report.read_csv(tmp_path / "bench.csv")
    assert {"seed", "fastrnns", "latency", "stacked"} <= {r["group"] for r in rows}
    if "ours" in names:
        assert "not measured" not in result.stdout.split("targets:")[1]


@pytest.mark.cuda
def test_smoke_cli_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    names = ["ours", "torch", "reference"] if _ours() else ["torch", "reference"]
    result = _run_cli(
        "--smoke", "--device", "cuda", "--no-progress", "--dtypes", "float32", "--tf32", "off",
        "--impls", ",".join(names), "--out", str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _check_outputs(tmp_path, result.stdout, "cuda", names)


def test_ours_guard_refuses_stand_ins(monkeypatch):
    """'ours' is the extension's op or nothing: no module, no lstm, or lstm being the
    reference loop are each refused with a message saying what to do."""
    monkeypatch.setitem(sys.modules, "handlstm_cuda", types.ModuleType("handlstm_cuda"))
    with pytest.raises(impls.OursUnavailable, match="has no lstm"):
        impls.load_ours("cpu")

    fake = types.ModuleType("handlstm_cuda")
    ref = types.ModuleType("handlstm_cuda.reference")
    ref.lstm = fake.lstm = lambda *a, **k: None
    fake.LSTM = object
    monkeypatch.setitem(sys.modules, "handlstm_cuda", fake)
    monkeypatch.setitem(sys.modules, "handlstm_cuda.reference", ref)
    with pytest.raises(impls.OursUnavailable, match="reference loop itself"):
        impls.load_ours("cpu")

    monkeypatch.setitem(sys.modules, "handlstm_cuda", None)  # import raises ImportError
    with pytest.raises(impls.OursUnavailable, match="make build"):
        impls.load_ours("cpu")


def _row(impl, ms, group="seed", mode="fwd+bwd", device="cpu", tf32="n/a"):
    return {
        "device": device, "dtype": "float32", "tf32": tf32, "case": group, "group": group,
        "mode": mode, "impl": impl, "status": "ok", "median_ms": ms,
    }


def test_ratios_and_targets():
    rows = report.add_ratios(
        [
            _row("torch", 4.0),
            _row("ours", 1.0),
            _row("reference", 8.0),
            _row("torch", 10.0, group="fastrnns"),
            _row("ours", 12.5, group="fastrnns"),
            _row("ours", 3.0, mode="infer"),  # no torch time beside it: no ratio
            _row("torch", 2.0, mode="train-fwd"),
            dict(_row("ours", 1.0, mode="train-fwd"), ratio_paired=0.6),  # round by round
        ]
    )
    ratios = [r["ratio_vs_torch"] for r in rows]
    assert ratios[:5] == [1.0, 0.25, 2.0, 1.0, 1.25]
    assert math.isnan(ratios[5])
    assert ratios[7] == 0.6

    verdicts = {text.split(":")[0]: (speedup, verdict) for text, speedup, _, verdict in
                report.targets(rows)}
    assert verdicts["CPU seed workload fwd+bwd, float32"] == (4.0, "met")
    assert verdicts["CPU fastrnns default fwd+bwd, float32"] == (0.8, "MISSED")


def test_targets_on_a_busy_machine_carry_the_caveat():
    """A run whose timings the harness itself calls unreliable must not print a bare 'met'."""
    rows = report.add_ratios([_row("torch", 4.0), _row("ours", 1.0)])
    plain = report.targets_text(rows)
    assert "met" in plain and "not a verdict" not in plain
    busy = report.targets_text(rows, caveat="busy machine, not a verdict")
    seed_line = next(line for line in busy.splitlines() if "seed" in line)
    assert seed_line.endswith("met (busy machine, not a verdict)")


def test_car_data_folder_precedence(monkeypatch, tmp_path):
    """--data-dir, then $HANDLSTM_TRAJ_DATA (the trajectory example's setting), then the shared
    folder beside the repository."""
    monkeypatch.delenv("HANDLSTM_TRAJ_DATA", raising=False)
    assert data.car_data_folder() == data.CAR_DATA
    monkeypatch.setenv("HANDLSTM_TRAJ_DATA", str(tmp_path / "env"))
    assert data.car_data_folder() == tmp_path / "env"
    assert data.car_data_folder(tmp_path / "arg") == tmp_path / "arg"


def test_relative_error_never_hides_nan():
    good = [torch.ones(3)]
    assert impls.relative_error([torch.ones(3)], good) == 0.0
    assert impls.relative_error([torch.tensor([1.0, float("nan"), 1.0])], good) == math.inf


def test_car_windows_loader(tmp_path):
    """Numeric file order, first T rows and I columns, sentinels excluded and set to 0."""
    header = ("Local_X,Local_Y,v_Vel,v_Acc,Space_Headway,dis_cen,i_l,i_r,i_f,dis_l,dis_r,"
              "dis_f\n")
    gen = torch.Generator().manual_seed(0)
    for n in range(9):
        vals = torch.rand(7, 12, generator=gen) + 100 * n
        vals[:, 9] = 99.0 if n % 2 else vals[:, 9]  # dis_l: no left neighbour in odd files
        lines = "".join(",".join(f"{v:.4f}" for v in row.tolist()) + "\n" for row in vals)
        (tmp_path / f"{n if n != 2 else 10}.csv").write_text(header + lines)
    (tmp_path / "README.md").write_text("not data")

    sets = data.load_car_windows(tmp_path, count=2, T=5, N=4, I=12)
    assert len(sets) == 2 and sets[0].shape == (5, 4, 12)
    stacked = torch.stack(sets)
    assert torch.isfinite(stacked).all()
    # Batch row k of set j is file 4j+k in numeric order: 0, 1, 3, 4 | 5, 6, 7, 8 ("10" last).
    order = stacked[:, 0, :, 0].flatten()
    assert (order[1:] > order[:-1]).all()
    dis_l = stacked[..., 9]  # 99.0 (no neighbour) in the odd files 1, 3 | 5, 7
    assert (dis_l[0][:, [1, 2]] == 0).all() and (dis_l[1][:, [0, 2]] == 0).all()
    assert (dis_l[0][:, [0, 3]] != 0).all() and (dis_l[1][:, [1, 3]] != 0).all()
    assert abs(stacked[..., 0].mean().item()) < 1e-5

    assert data.load_car_windows(tmp_path, count=3, T=5, N=4, I=12) is None  # too few files
    assert data.load_car_windows(tmp_path / "missing", 1, 5, 4, 12) is None


def test_preset_shapes_cover_the_issue():
    """The sweep names the workloads the benchmark promises (seed, fastrnns default, ...)."""
    full = {c.name for c in bench.PRESETS["full"].cases}
    assert "seed T62 N64 I12 H64" in full
    assert "fastrnns T100 N64 I512 H512" in full
    for T in (100, 1000):
        for N in (1, 8, 32):
            for H in (64, 256, 512, 1024):
                assert f"latency T{T} N{N} I{H} H{H}" in full
    assert {"large-batch T100 N256 I512 H512", "large-batch T100 N256 I1024 H1024"} <= full
    assert any(c.layers == 3 and c.bidirectional for c in bench.PRESETS["full"].cases)


def test_cpu_timer_rounds_align():
    """Both implementations get the same number of rounds, so ratios can be paired."""
    from benchmarks.cases import Timing
    from benchmarks.timing import paired_ratio, time_cpu

    a, b = torch.randn(64, 64), torch.randn(256, 256)
    steps = {"torch": lambda: a @ a, "ours": lambda: b @ b}
    clears = {"torch": lambda: None, "ours": lambda: None}
    timing = Timing(0.002, 4, 5.0, 0.0, 0.0, 1, 1)
    stats = time_cpu(steps, clears, timing, threads=1)
    assert len(stats["ours"].samples) == len(stats["torch"].samples) >= 4
    assert all(s.median > 0 and s.p25 <= s.median <= s.p75 for s in stats.values())
    med, lo, hi = paired_ratio(stats["ours"].samples, stats["torch"].samples)
    assert 0 < lo <= med <= hi


def test_cuda_timer_logic_with_fake_events(monkeypatch):
    """time_cuda's bookkeeping (warm-up, rounds, pairing, peak memory) without a GPU: events
    read the host clock, and synchronize / memory queries are stubbed."""
    import time as _time

    from benchmarks.cases import Timing
    from benchmarks.timing import time_cuda

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = _time.perf_counter()

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3  # milliseconds, as CUDA's

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 1000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 1000 + 2**20)

    calls = {"ours": 0, "torch": 0}
    cleared = {"ours": 0, "torch": 0}
    a = torch.randn(128, 128)

    def step(name):
        calls[name] += 1
        a @ a

    steps = {n: (lambda n=n: step(n)) for n in calls}
    clears = {n: (lambda n=n: cleared.__setitem__(n, cleared[n] + 1)) for n in calls}
    timing = Timing(0.0, 1, 1.0, 0.001, 0.002, 7, 9)
    stats = time_cuda(steps, clears, timing)
    for name in calls:
        st = stats[name]
        assert 7 <= st.reps <= 9 and len(st.samples) == st.reps
        assert 0 < st.p25 <= st.median <= st.p75
        assert st.peak_bytes == 2**20
        assert calls[name] == cleared[name] >= 3 + st.reps + 1  # warm-up, rounds, memory call


def test_git_describe_takes_the_named_commit_in_a_copy_without_git(monkeypatch):
    """A lent GPU machine gets the tree without .git: HANDLSTM_GIT_COMMIT names the commit."""
    def no_git(*args, **kwargs):
        raise OSError("git: not found")

    monkeypatch.setattr(env.subprocess, "run", no_git)
    monkeypatch.delenv("HANDLSTM_GIT_COMMIT", raising=False)
    assert env.git_describe() == "unknown (not a git checkout)"
    monkeypatch.setenv("HANDLSTM_GIT_COMMIT", "abc1234")
    assert env.git_describe().startswith("abc1234 (named by HANDLSTM_GIT_COMMIT")
