"""The CUDA time loop's mode (generic, persistent, auto) and the crossover table the auto mode
reads (csrc/cuda_loop_choice.cpp, handlstm_cuda.load_cuda_crossovers). The table's lookup is
host code, so it is checked here on any machine; which loop a GPU call then takes is checked on
a GPU. The sweep that writes such tables is benchmarks/persistent.py.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import handlstm_cuda as hl
from conftest import make_args

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import persistent as sweep  # noqa: E402

_C = hl._ext._C
GPU = "Test GPU 9000"


@pytest.fixture
def restore():
    """Leave the process's mode and table as they were (the package default)."""
    mode = hl.cuda_time_loop()
    yield
    hl.set_cuda_time_loop(mode)
    default = os.path.join(os.path.dirname(hl.__file__), "cuda_crossovers.json")
    hl.load_cuda_crossovers(default if os.path.exists(default) else None)


def _write(tmp_path, points, device=GPU):
    path = tmp_path / "crossovers.json"
    path.write_text(json.dumps({"device": device, "points": points}))
    return path


def _p(N, H, wins, dtype="float32", forward=True, T=100, graph=None):  # noqa: N803
    """A point; wins: the persistent loops won there; graph: the graph loop did (omitted from
    the point when None, as in tables written before the graph loop existed)."""
    p = dict(dtype=dtype, forward=forward, N=N, H=H, T=T, persistent_wins=wins)
    if graph is not None:
        p["graph_wins"] = graph
    return p


def test_mode_defaults_to_generic_and_round_trips(restore):
    if "HANDLSTM_CUDA_LOOP" not in os.environ and os.environ.get(
            "HANDLSTM_CUDA_PERSISTENT") != "1":
        assert hl.cuda_time_loop() == "generic"
    for mode in hl.CUDA_TIME_LOOPS:
        hl.set_cuda_time_loop(mode)
        assert hl.cuda_time_loop() == mode
        assert hl.cuda_persistent_enabled() == (mode == "persistent")
    hl.set_cuda_persistent_enabled(True)
    assert hl.cuda_time_loop() == "persistent"
    hl.set_cuda_persistent_enabled(False)
    assert hl.cuda_time_loop() == "generic"


def test_a_bad_mode_is_refused_naming_the_choices(restore):
    choices = r"\('generic', 'persistent', 'auto', 'graph'\)"
    with pytest.raises(ValueError, match=rf"one of {choices}, got 'fast'"):
        hl.set_cuda_time_loop("fast")
    with pytest.raises(RuntimeError, match="mode must be 0"):
        _C._set_cuda_loop_mode(7)


def test_a_bad_environment_value_warns_and_keeps_the_default(tmp_path):
    import subprocess

    env = dict(os.environ, HANDLSTM_CUDA_LOOP="fastest")
    env.pop("HANDLSTM_CUDA_PERSISTENT", None)
    proc = subprocess.run([sys.executable, "-c", "import handlstm_cuda as h; print(h.cuda_time_loop())"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "generic"
    assert "HANDLSTM_CUDA_LOOP='fastest' is not one of" in proc.stderr


def test_the_nearest_measured_point_decides(tmp_path, restore):
    n = hl.load_cuda_crossovers(_write(tmp_path, [
        _p(8, 256, True), _p(64, 256, False), _p(8, 1024, False),
        _p(8, 256, False, forward=False),           # the backward has its own points
        _p(8, 256, False, dtype="bfloat16"),        # and each dtype
    ]))
    assert n == 5 and _C._cuda_crossover_count() == 5
    choice = _C._cuda_crossover_choice
    assert choice(GPU, "float32", True, 8, 256, 100) == "persistent"
    assert choice(GPU, "float32", True, 4, 300, 200) == "persistent"  # nearest: (8, 256)
    assert choice(GPU, "float32", True, 48, 256, 100) == "generic"    # nearest: (64, 256)
    assert choice(GPU, "float32", True, 8, 900, 100) == "generic"     # nearest: (8, 1024)
    assert choice(GPU, "float32", False, 8, 256, 100) == "generic"    # backward point
    assert choice(GPU, "bfloat16", True, 8, 256, 100) == "generic"
    assert choice(GPU, "float16", True, 8, 256, 100) == "generic"  # no float16 point at all
    assert choice("Another GPU", "float32", True, 8, 256, 100) == "generic"
    # Two octaves away from every point (4x in N): not guessed, the generic loop.
    assert choice(GPU, "float32", True, 2, 256, 100) == "persistent"
    assert choice(GPU, "float32", True, 1, 256, 100) == "generic"
    hl.load_cuda_crossovers(None)
    assert _C._cuda_crossover_count() == 0
    assert choice(GPU, "float32", True, 8, 256, 100) == "generic"


def test_equally_near_points_must_all_say_persistent(tmp_path, restore):
    choice = _C._cuda_crossover_choice
    hl.load_cuda_crossovers(_write(tmp_path, [_p(4, 256, True), _p(16, 256, False)]))
    assert choice(GPU, "float32", True, 8, 256, 100) == "generic"
    hl.load_cuda_crossovers(_write(tmp_path, [_p(4, 256, True), _p(16, 256, True)]))
    assert choice(GPU, "float32", True, 8, 256, 100) == "persistent"
    # N = 20 is one octave from 10 and from 40, though log2 puts the two 1e-16 apart: a tie
    # whatever the order of the table.
    for points in ([_p(10, 256, False), _p(40, 256, True)],
                   [_p(40, 256, True), _p(10, 256, False)]):
        hl.load_cuda_crossovers(_write(tmp_path, points))
        assert choice(GPU, "float32", True, 20, 256, 100) == "generic"
    # Exactly two octaves (5 -> 20) is near enough whatever log2 rounds to; a bit more is not.
    hl.load_cuda_crossovers(_write(tmp_path, [_p(5, 256, True)]))
    assert choice(GPU, "float32", True, 20, 256, 100) == "persistent"
    assert choice(GPU, "float32", True, 21, 256, 100) == "generic"


def test_graph_points_steer_to_the_graph_loop(tmp_path, restore):
    choice = _C._cuda_crossover_choice
    hl.load_cuda_crossovers(_write(tmp_path, [
        _p(8, 256, True, graph=False), _p(64, 256, False, graph=True), _p(8, 1024, False),
        _p(64, 256, False, graph=True, forward=False)]))
    assert choice(GPU, "float32", True, 8, 256, 100) == "persistent"
    assert choice(GPU, "float32", True, 50, 300, 100) == "graph"     # nearest: (64, 256)
    assert choice(GPU, "float32", False, 64, 256, 100) == "graph"
    assert choice(GPU, "float32", True, 8, 1024, 100) == "generic"   # graph_wins omitted
    assert choice(GPU, "float32", True, 1000, 256, 100) == "generic"  # beyond two octaves
    assert choice(GPU, "bfloat16", True, 64, 256, 100) == "generic"
    # Equally near points must all have chosen the graph loop.
    hl.load_cuda_crossovers(_write(tmp_path, [_p(4, 256, False, graph=True),
                                              _p(16, 256, True, graph=False)]))
    assert choice(GPU, "float32", True, 8, 256, 100) == "generic"


@pytest.mark.parametrize("table,message", [
    ([], "expected a JSON object with 'device' and 'points', got list"),
    ({"device": 5, "points": []}, "'device' must be a string .*, got 5"),
    ({"device": GPU, "points": [[8, 256]]}, "point 0 must be an object, got list"),
    ({"device": GPU, "points": [_p(10 ** 20, 256, True)]}, "N must be a positive integer below"),
    ({"device": GPU, "points": {}}, "'points' must be a list"),
    ({"device": GPU, "points": [{"dtype": "float32"}]},
     "point 0 lacks forward, N, H, T, persistent_wins"),
    ({"device": GPU, "points": [_p(8, 256, True, dtype="int8")]}, "dtype must be one of"),
    ({"device": GPU, "points": [dict(_p(8, 256, True), forward=1)]}, "must be true or false"),
    ({"device": GPU, "points": [_p(8, 256, False, graph="yes")]},
     "graph_wins must be true or false, got .*'yes'"),
    ({"device": GPU, "points": [_p(8, 256, True, graph=True)]}, "cannot both be true"),
    ({"device": GPU, "points": [_p(0, 256, True)]}, "N must be a positive integer .*, got 0"),
    ({"device": GPU, "points": [_p(8, 2.5, True)]}, "H must be a positive integer .*, got 2.5"),
])
def test_a_malformed_table_is_refused_naming_what_is_wrong(tmp_path, restore, table, message):
    """Every refusal names the file, the point and the field, and leaves the table in force."""
    hl.load_cuda_crossovers(_write(tmp_path, [_p(8, 256, True)]))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(table))
    with pytest.raises(ValueError, match=message):
        hl.load_cuda_crossovers(path)
    with pytest.raises(ValueError, match="bad.json"):
        hl.load_cuda_crossovers(path)
    # The table in force is untouched by a refused one.
    assert _C._cuda_crossover_choice(GPU, "float32", True, 8, 256, 100) == "persistent"


def test_invalid_json_is_refused_naming_the_file(tmp_path, restore):
    path = tmp_path / "broken.json"
    path.write_text('{"device": "x", "points": [')
    with pytest.raises(ValueError, match=r"broken.json.*not valid JSON"):
        hl.load_cuda_crossovers(path)


def test_a_broken_shipped_table_warns_at_import_and_the_package_still_works(tmp_path):
    """A copy of the package whose shipped table is malformed still imports and runs."""
    import shutil
    import subprocess

    pkg = Path(hl.__file__).parent
    copy = tmp_path / "handlstm_cuda"
    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "cuda_crossovers.json").write_text("{not json")
    code = ("import torch, handlstm_cuda as h; print(h.cuda_time_loop(), "
            "h._ext._C._cuda_crossover_count()); "
            "x = torch.randn(3, 2, 4); w = torch.randn(8, 4); u = torch.randn(8, 2); "
            "print(h.lstm(x, None, None, w, u)[0].shape)")
    env = {k: v for k, v in os.environ.items()
           if k not in ("HANDLSTM_CUDA_LOOP", "HANDLSTM_CUDA_PERSISTENT")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["generic", "0", "torch.Size([3,", "2,", "2])"]
    assert "shipped crossover table is unusable" in proc.stderr
    assert "not valid JSON" in proc.stderr


def test_the_sweep_writes_a_table_the_package_loads(tmp_path, restore):
    def row(mode, N, vs_generic, loops=("cooperative", "cooperative"), graph=None,  # noqa: N803
            replayed=True):
        return dict(dtype="float32", T=100, N=N, I=256, H=256, mode=mode,
                    forward_loop=loops[0], backward_loop=loops[1],
                    persistent_vs_generic=vs_generic,
                    graphloop_vs_generic=1.0 if graph is None else graph,
                    graph_replayed=replayed)

    rows = [row("infer", 8, 3.0), row("fwd+bwd", 8, 1.02),   # within the margin
            row("infer", 64, 0.5), row("fwd+bwd", 64, 5.0, ("generic", "generic")),
            row("infer", 32, 1.5, graph=2.0),                  # both won: the faster one
            row("fwd+bwd", 32, 2.5, graph=2.0),
            row("infer", 16, 0.9, graph=3.0, replayed=False),  # its calls did not replay
            row("fwd+bwd", 16, 5.0, ("generic", "generic"), graph=1.2)]
    table = sweep.crossovers({"gpu": GPU, "date": "today", "commit": "abc"}, rows)
    assert [p["persistent_wins"] for p in table["points"]] == [True, False, False, False,
                                                               False, True, False, False]
    assert [p["graph_wins"] for p in table["points"]] == [False, False, False, False,
                                                          True, False, False, True]
    assert [p["forward"] for p in table["points"]] == [True, False, True, False] * 2
    path = tmp_path / "cuda_crossovers.json"
    path.write_text(json.dumps(table))
    assert hl.load_cuda_crossovers(path) == 8
    assert _C._cuda_crossover_choice(GPU, "float32", True, 8, 256, 100) == "persistent"
    assert _C._cuda_crossover_choice(GPU, "float32", False, 8, 256, 100) == "generic"
    assert _C._cuda_crossover_choice(GPU, "float32", True, 32, 256, 100) == "graph"
    assert _C._cuda_crossover_choice(GPU, "float32", False, 16, 256, 100) == "graph"


@pytest.mark.cuda
@pytest.mark.parametrize("winner,expected", [("persistent", "cooperative"), ("graph", "graph"),
                                             ("generic", "generic")])
def test_auto_mode_follows_the_table_on_this_gpu(tmp_path, restore, winner, expected):
    T, N, I, H = 10, 8, 16, 256
    wins, graph = winner == "persistent", winner == "graph"
    hl.load_cuda_crossovers(_write(tmp_path, [
        _p(N, H, wins, T=T, graph=graph), _p(N, H, wins, forward=False, T=T, graph=graph)],
        device=torch.cuda.get_device_name()))
    hl.set_cuda_time_loop("auto")
    hl.clear_cuda_graphs()
    try:
        for _ in range(3):  # the graph loop replays from the third call of a signature on
            args = [t for t in make_args(T, N, I, H, 0, dtype=torch.float32, device="cuda")
                    if t is not None]
            out = hl.lstm(*args)[0]
            out.sum().backward()
    finally:
        hl.clear_cuda_graphs()
    assert _C._cuda_last_loops() == (expected, expected)
