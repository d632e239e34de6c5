"""Trajectory example: physics baselines, metrics, training, checkpoints and the CLI.

Runs on small generated data with torch.nn.LSTM; the handlstm_cuda.LSTM tests skip until the
extension provides it.
"""

import json
import sys
import types

import numpy as np
import pytest
import torch

from examples.trajectory import data as D
from examples.trajectory import metrics as M
from examples.trajectory import synthetic as S
from examples.trajectory import training as T
from examples.trajectory.cli import main
from examples.trajectory.model import (
    TrajectoryForecaster,
    build_model,
    handlstm_unavailable_reason,
    lstm_class,
)

HANDLSTM_REASON = handlstm_unavailable_reason()
needs_handlstm = pytest.mark.skipif(HANDLSTM_REASON is not None, reason=str(HANDLSTM_REASON))

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(epochs=6, batch_size=32, lr=1e-2, hidden=16, head=16)



@pytest.fixture(scope="module")
def tiny_prep():
    windows, ids, _, _ = S.make_windows(360, seed=7, n_jumps=2)
    return T.prepare(D.WindowSet(windows, ids), T.TrainConfig(**TINY))


# --------------------------------------------------------------------------------------------
# Baselines and metrics
# --------------------------------------------------------------------------------------------


def _kinematic_windows(n: int, accel: bool, seed: int = 0) -> np.ndarray:
    """Windows moving exactly at constant velocity (or constant acceleration) in x and y."""
    rng = np.random.default_rng(seed)
    t = np.arange(D.WINDOW_STEPS) * D.DT
    p0 = rng.uniform([5.0, 0.0], [80.0, 500.0], (n, 2))
    v = rng.uniform([-2.0, 0.0], [2.0, 80.0], (n, 2))
    a = rng.uniform(-3.0, 3.0, (n, 2)) if accel else np.zeros((n, 2))
    pos = p0[:, None] + v[:, None] * t[None, :, None] + 0.5 * a[:, None] * t[None, :, None] ** 2
    windows, _, _, _ = S.make_windows(n, seed=seed)
    windows[..., D.COL["Local_X"]] = pos[..., 0]
    windows[..., D.COL["Local_Y"]] = pos[..., 1]
    return windows


def test_constant_velocity_is_exact_on_constant_velocity_motion():
    w = _kinematic_windows(50, accel=False)
    pred = M.constant_velocity(D.history_positions(w), D.HORIZON)
    m = M.displacement_metrics(pred, D.future_positions(w))
    assert m["ade_ft"] < 1e-9 and m["fde_ft"] < 1e-9
    ca = M.constant_acceleration(D.history_positions(w), D.HORIZON)
    np.testing.assert_allclose(ca, D.future_positions(w), atol=1e-9)


def test_constant_acceleration_is_exact_on_constant_acceleration_motion():
    w = _kinematic_windows(50, accel=True, seed=1)
    truth = D.future_positions(w)
    ca = M.constant_acceleration(D.history_positions(w), D.HORIZON)
    np.testing.assert_allclose(ca, truth, atol=1e-9)
    cv = M.constant_velocity(D.history_positions(w), D.HORIZON)
    assert M.displacement_metrics(cv, truth)["fde_ft"] > 1e-3


def test_displacement_metrics_by_hand():
    truth = np.zeros((2, 5, 2))
    pred = np.zeros((2, 5, 2))
    pred[0, :, 0] = 3.0  # 3 ft lateral error at every step
    pred[1, 4, 1] = 4.0  # 4 ft longitudinal error at the last step only
    m = M.displacement_metrics(pred, truth)
    assert m["ade_ft"] == pytest.approx((5 * 3.0 + 4.0) / 10)
    assert m["fde_ft"] == pytest.approx((3.0 + 4.0) / 2)
    assert m["rmse_lateral_ft"] == pytest.approx(np.sqrt(5 * 9.0 / 10))
    assert m["rmse_longitudinal_ft"] == pytest.approx(np.sqrt(16.0 / 10))
    with pytest.raises(ValueError, match=r"\(F, K, 2\)"):
        M.displacement_metrics(pred[:, :, :1], truth[:, :, :1])


# --------------------------------------------------------------------------------------------
# Model and training
# --------------------------------------------------------------------------------------------


def test_forecaster_shapes():
    model = TrajectoryForecaster(torch.nn.LSTM, input_size=16, hidden_size=8, head_size=8)
    out = model(torch.randn(3, D.HISTORY_STEPS, 16))
    assert out.shape == (3, D.HORIZON, 2)


def test_lstm_class_choices():
    assert lstm_class("torch") is torch.nn.LSTM
    with pytest.raises(ValueError, match="one of"):
        lstm_class("cudnn")
    if HANDLSTM_REASON is not None:
        with pytest.raises(RuntimeError, match="--lstm torch"):
            lstm_class("handlstm")


def test_tiny_training_run_loss_decreases(tiny_prep):
    cfg = T.TrainConfig(**TINY)
    quiet = dict(progress=False, log=lambda s: None)
    state = T.train(tiny_prep, cfg, "torch", torch.device("cpu"), **quiet)
    hist = state["history"]
    assert len(hist) == cfg.epochs
    assert hist[-1]["train_loss"] < 0.8 * hist[0]["train_loss"]
    assert state["best_val"] < hist[0]["val_loss"]


def test_training_is_reproducible_and_resumable(tiny_prep, tmp_path):
    cfg = T.TrainConfig(**{**TINY, "epochs": 3})
    cpu, quiet = torch.device("cpu"), dict(progress=False, log=lambda s: None)
    full = T.train(tiny_prep, cfg, "torch", cpu, ckpt=tmp_path / "a.pt", **quiet)

    part_cfg = T.TrainConfig(**{**TINY, "epochs": 3})
    part_cfg.epochs = 1
    T.train(tiny_prep, part_cfg, "torch", cpu, ckpt=tmp_path / "b.pt", **quiet)
    resumed = T.train(tiny_prep, cfg, "torch", cpu, ckpt=tmp_path / "b.pt", resume=True, **quiet)

    losses = lambda s: [(h["train_loss"], h["val_loss"]) for h in s["history"]]  # noqa: E731
    assert losses(resumed) == losses(full)
    for k, v in full["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, rtol=0, atol=0)

    other = T.TrainConfig(**{**TINY, "epochs": 3, "hidden": 8})
    with pytest.raises(ValueError, match=r"differing settings: \['hidden'\]"):
        T.train(tiny_prep, other, "torch", cpu, ckpt=tmp_path / "a.pt", resume=True, **quiet)

    saved = T.load_checkpoint(tmp_path / "a.pt")
    model, scaler, scale = T.model_from_checkpoint(saved, cpu)
    np.testing.assert_allclose(scaler.mean, tiny_prep.scaler.mean)
    r = T.evaluate_split(model, tiny_prep.splits["test"], scale, cpu)
    assert set(r["metrics"]) >= {"model", "constant_velocity", "constant_acceleration"}


def test_model_predictions_are_constant_velocity_plus_offsets(tiny_prep):
    model = build_model("torch", 0, **T.TrainConfig(**TINY).model_kwargs(len(D.FEATURE_NAMES)))
    with torch.no_grad():
        for p in model.head[-1].parameters():
            p.zero_()
    s = tiny_prep.splits["val"]
    pred = T.predict_positions(model, s.features, s.cv, tiny_prep.target_scale, torch.device("cpu"))
    np.testing.assert_allclose(pred, s.cv)


@needs_handlstm
def test_handlstm_model_matches_torch_model():
    kwargs = T.TrainConfig(**TINY).model_kwargs(len(D.FEATURE_NAMES))
    ours, ref = build_model("handlstm", 3, **kwargs), build_model("torch", 3, **kwargs)
    x = torch.randn(5, D.HISTORY_STEPS, len(D.FEATURE_NAMES))
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)


@needs_handlstm
def test_handlstm_training_matches_torch_training(tiny_prep):
    cfg = T.TrainConfig(**TINY)
    quiet = dict(progress=False, log=lambda s: None)
    ours = T.train(tiny_prep, cfg, "handlstm", torch.device("cpu"), **quiet)
    ref = T.train(tiny_prep, cfg, "torch", torch.device("cpu"), **quiet)
    assert ours["best_val"] == pytest.approx(ref["best_val"], rel=0.02)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def test_cli_run_evaluate_predict_on_synthetic_data(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--synthetic", "300", "--out", str(out), "--quiet", "--lstm", "torch"]
    common += ["--threads", "1"]
    report = main(["run", *common, "--epochs", "2", "--hidden", "8", "--head", "8"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["model"]["windows"] > 0
    assert metrics["command"].startswith("python -m examples.trajectory run")
    gain = 1 - metrics["test"]["model"]["ade_ft"] / metrics["test"]["constant_velocity"]["ade_ft"]
    assert report["meets_target"] is (gain >= 0.25)
    for name in ("test_windows.png", "training_curves.png", "checkpoints/torch.pt"):
        assert (out / name).stat().st_size > 0

    main(["evaluate", *common, "--plot-windows", "0"])
    evaluated = json.loads((out / "metrics_test.json").read_text())
    ade = evaluated["metrics"]["model"]["ade_ft"]
    assert ade == pytest.approx(metrics["test"]["model"]["ade_ft"])
    # A model trained with --seed 5 is evaluated on the synthetic data of seed 5 without being
    # told again; the validation split's plot does not overwrite the test one.
    seeded = tmp_path / "seeded"
    args5 = [a if a != str(out) else str(seeded) for a in common]
    main(["train", *args5, "--seed", "5", "--epochs", "1", "--hidden", "8", "--head", "8"])

    def val_metrics(*seed):
        main(["evaluate", *args5, *seed, "--split", "val", "--plot-windows", "2"])
        return json.loads((seeded / "metrics_val.json").read_text())["metrics"]

    implicit, explicit, other = val_metrics(), val_metrics("--seed", "5"), val_metrics("--seed", "0")
    assert implicit == explicit and implicit != other
    assert (seeded / "val_windows.png").is_file() and not (seeded / "test_windows.png").exists()

    windows, ids, _, _ = S.make_windows(3, seed=11)
    folder = S.write_csv_folder(tmp_path / "in", windows, ids)
    history_only = tmp_path / "in" / "9.csv"
    np.savetxt(history_only, windows[0, : D.HISTORY_STEPS], delimiter=",",
               header=",".join(D.COLUMNS), comments="", fmt="%.6f")
    pred_path = main(["predict", *common, "--input", str(folder)])
    lines = pred_path.read_text().splitlines()
    assert lines[0].startswith("file,step,x_pred,y_pred")
    assert len(lines) == 1 + 4 * D.HORIZON
    assert lines[-1].startswith("9.csv,5,") and lines[-1].endswith(",,")


def test_cli_without_data_folder_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "default_data_dir", lambda: None)
    with pytest.raises(SystemExit, match="--synthetic"):
        main(["train", "--out", str(tmp_path), "--quiet", "--lstm", "torch"])


def test_cli_run_compares_both_lstms(tmp_path, monkeypatch):
    # A stand-in module so the comparison path is exercised whether or not the extension is
    # built; the real handlstm_cuda.LSTM is covered by the needs_handlstm tests above.
    fake = types.ModuleType("handlstm_cuda")

    class StandInLSTM(torch.nn.LSTM):
        pass

    fake.LSTM = StandInLSTM
    monkeypatch.setitem(sys.modules, "handlstm_cuda", fake)
    out = tmp_path / "cmp"
    report = main(["run", "--synthetic", "240", "--out", str(out), "--quiet", "--threads", "1",
                   "--epochs", "2", "--hidden", "8", "--head", "8", "--plot-windows", "0"])
    assert report["lstm"] == "handlstm"
    c = report["comparison"]
    assert c["best_val_loss_handlstm"] == pytest.approx(c["best_val_loss_torch"], rel=1e-6)
    assert c["speedup_per_epoch"] > 0
    assert set(report["training"]) == {"handlstm", "torch"}
    for name in ("handlstm.pt", "torch.pt"):
        assert (out / "checkpoints" / name).is_file()
