"""Data preparation, the training loop with resumable checkpoints, and evaluation.

The model predicts, for each of the K future steps, the offset of the true position from the
constant-velocity extrapolation (a residual on top of the physics baseline), scaled per
coordinate by its spread on the training block.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import data as D
from .metrics import constant_acceleration, constant_velocity, displacement_metrics
from .model import build_model


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    lr_final_fraction: float = 0.05  # cosine decay to this fraction of lr at the last epoch
    weight_decay: float = 0.0
    hidden: int = 64
    layers: int = 1
    head: int = 64
    loss: str = "euclidean"  # "euclidean" (ADE in feet, robust) or "mse" (on scaled offsets)
    seed: int = 0
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    guard: int = 0
    drop_jumps: bool = True
    drop_repeats: bool = True  # validation/test windows retracing an earlier block's path
    max_train_windows: int = 0  # 0 = all; a quick way to shrink a run

    def model_kwargs(self, input_size: int) -> dict:
        return {
            "input_size": input_size,
            "hidden_size": self.hidden,
            "num_layers": self.layers,
            "head_size": self.head,
            "horizon": D.HORIZON,
        }


@dataclass
class SplitArrays:
    """One block, ready for the model. features (F, Th, D) float32; the rest float64 feet."""

    file_ids: np.ndarray
    features: np.ndarray
    history: np.ndarray  # (F, Th, 2)
    truth: np.ndarray  # (F, K, 2)
    cv: np.ndarray  # (F, K, 2) constant-velocity extrapolation


@dataclass
class Prepared:
    splits: dict[str, SplitArrays]
    scaler: D.Standardizer
    target_scale: np.ndarray  # (2,) ft per unit of model output, per coordinate
    summary: dict = field(default_factory=dict)


def _split_arrays(windows: np.ndarray, file_ids: np.ndarray, scaler: D.Standardizer) -> SplitArrays:
    values, valid = D.history_features(windows)
    history = D.history_positions(windows)
    return SplitArrays(
        file_ids=file_ids,
        features=scaler.transform(values, valid).astype(np.float32),
        history=history,
        truth=D.future_positions(windows),
        cv=constant_velocity(history, D.HORIZON),
    )


def fit_scaler(windows: np.ndarray) -> D.Standardizer:
    values, valid = D.history_features(windows)
    passthrough = tuple(range(len(D.CONTINUOUS_FEATURES), len(D.FEATURE_NAMES)))
    return D.Standardizer(passthrough).fit(values, valid)


def prepare(
    ws: D.WindowSet,
    cfg: TrainConfig,
    scaler: D.Standardizer | None = None,
    target_scale: np.ndarray | None = None,
) -> Prepared:
    """Clean, split by contiguous file-id blocks, fit scalers on train only, build arrays.

    ``scaler`` and ``target_scale`` (from a checkpoint) replace the ones fitted here.
    """
    jumps = D.find_jumps(ws.windows)
    chains = D.find_chains(ws.windows, ws.file_ids)
    split = D.split_blocks(chains, cfg.fractions, cfg.guard)

    rows = {}
    summary = {
        "files": len(ws),
        "chains": int(len(np.unique(chains))),
        "jump_windows": int(jumps.sum()),
        "jump_file_ids": ws.file_ids[jumps].tolist(),
        "guard_dropped": int(len(split.dropped)),
    }
    for name, idx in split.as_dict().items():
        keep = idx[~jumps[idx]] if cfg.drop_jumps else idx
        if name == "train" and cfg.max_train_windows and len(keep) > cfg.max_train_windows:
            keep = keep[: cfg.max_train_windows]
        rows[name] = keep
        ids = ws.file_ids[keep]
        summary[name] = {
            "windows": int(len(keep)),
            "file_id_min": int(ids.min()) if len(ids) else None,
            "file_id_max": int(ids.max()) if len(ids) else None,
            "jumps_dropped": int(jumps[idx].sum()) if cfg.drop_jumps else 0,
        }
    if cfg.drop_repeats:
        # Validation must not retrace training paths, nor test those of training or validation.
        earlier = rows["train"]
        for name in ("val", "test"):
            repeats = D.find_repeats(ws.windows[rows[name]], ws.windows[earlier])
            summary[name]["repeats_dropped"] = int(repeats.sum())
            summary[name]["repeat_file_ids"] = ws.file_ids[rows[name][repeats]].tolist()
            earlier = np.concatenate([earlier, rows[name]])
            rows[name] = rows[name][~repeats]
            summary[name]["windows"] = int(len(rows[name]))
    if len(rows["train"]) == 0 or len(rows["val"]) == 0:
        raise ValueError(f"train and validation blocks must not be empty, got {summary}")

    if scaler is None:
        scaler = fit_scaler(ws.windows[rows["train"]])
    splits = {
        name: _split_arrays(ws.windows[r], ws.file_ids[r], scaler) for name, r in rows.items()
    }
    if target_scale is None:
        train = splits["train"]
        resid = (train.truth - train.cv).reshape(-1, 2)
        target_scale = np.maximum(resid.std(0), 1e-3)
    return Prepared(splits, scaler, target_scale, summary)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _tensors(s: SplitArrays, target_scale: np.ndarray, device: torch.device):
    x = torch.as_tensor(s.features, device=device)
    y = torch.as_tensor(((s.truth - s.cv) / target_scale).astype(np.float32), device=device)
    return x, y


def _loss(pred: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mse":
        return ((pred - target) ** 2).mean()
    if kind == "euclidean":
        diff = (pred - target) * scale  # back to feet
        return torch.sqrt((diff**2).sum(-1) + 1e-9).mean()
    raise ValueError(f"loss must be 'euclidean' or 'mse', got {kind!r}")


def _lr_at(cfg: TrainConfig, epoch: int) -> float:
    if cfg.epochs <= 1:
        return cfg.lr
    t = epoch / (cfg.epochs - 1)
    lo = cfg.lr * cfg.lr_final_fraction
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * t))


@torch.no_grad()
def _eval_loss(model, x, y, scale, kind, batch_size) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(x), batch_size * 4):
        xb, yb = x[i : i + batch_size * 4], y[i : i + batch_size * 4]
        total += _loss(model(xb), yb, scale, kind).item() * len(xb)
        n += len(xb)
    return total / max(n, 1)


def _jsonable(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def checkpoint_path(out_dir: Path, lstm: str) -> Path:
    return Path(out_dir) / "checkpoints" / f"{lstm}.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; run `train` first")
    return torch.load(path, map_location="cpu", weights_only=True)


class Trainer:
    """Trains one model an epoch at a time, saving a checkpoint after each epoch.

    Batches are shuffled by a generator seeded with (seed, epoch), the learning rate is a
    function of the epoch, and model and optimizer state are saved after every epoch, so a
    resumed run continues exactly where an uninterrupted one would be. Stepping two trainers
    in turn (see ``cli.cmd_run``) lets both see the same machine load when they are timed.
    """

    def __init__(
        self,
        prep: Prepared,
        cfg: TrainConfig,
        lstm: str,
        device: torch.device,
        ckpt: Path | None = None,
        resume: bool = False,
        progress: bool = True,
        log=print,
    ):
        self.cfg, self.lstm, self.device, self.ckpt = cfg, lstm, device, ckpt
        self.progress, self.log = progress, log
        n_features = prep.splits["train"].features.shape[-1]
        self.model = build_model(lstm, cfg.seed, **cfg.model_kwargs(n_features)).to(device)
        self.opt = torch.optim.Adam(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.state = {
            "config": {k: _jsonable(v) for k, v in asdict(cfg).items()},
            "lstm": lstm,
            "feature_names": list(D.FEATURE_NAMES),
            "scaler": {k: _jsonable(v) for k, v in prep.scaler.state_dict().items()},
            "target_scale": prep.target_scale.tolist(),
            "epoch": 0,
            "history": [],
            "best_val": float("inf"),
            "best_epoch": -1,
            "best_model": None,
        }
        if resume and ckpt is not None and Path(ckpt).is_file():
            self._resume(load_checkpoint(ckpt))

        self.x_tr, self.y_tr = _tensors(prep.splits["train"], prep.target_scale, device)
        self.x_va, self.y_va = _tensors(prep.splits["val"], prep.target_scale, device)
        self.scale = torch.as_tensor(prep.target_scale, dtype=torch.float32, device=device)

    def _resume(self, old: dict) -> None:
        # Everything but the epoch count must match; more epochs extend the run (the cosine
        # schedule then follows the new length from the resumed epoch on).
        config = self.state["config"]
        differ = [k for k, v in config.items() if k != "epochs" and old["config"].get(k) != v]
        if old["lstm"] != self.lstm or differ:
            raise ValueError(
                f"{self.ckpt} was trained with another setup (lstm {old['lstm']}, differing "
                f"settings: {differ or 'none'}); remove it or drop --resume"
            )
        self.model.load_state_dict(old["model"])
        self.opt.load_state_dict(old["optimizer"])
        for k in ("epoch", "history", "best_val", "best_epoch", "best_model", "model", "optimizer"):
            self.state[k] = old[k]
        self.log(f"[{self.lstm}] resuming from {self.ckpt} after epoch {self.state['epoch']}")

    @property
    def done(self) -> bool:
        return self.state["epoch"] >= self.cfg.epochs

    def run_epoch(self) -> dict:
        """Train one epoch, validate, checkpoint. Returns the epoch's history entry."""
        from tqdm import tqdm

        cfg, model, opt, state = self.cfg, self.model, self.opt, self.state
        epoch = state["epoch"]
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        n = len(self.x_tr)
        order = torch.randperm(n, generator=gen).to(self.device)
        batches = range(0, n, cfg.batch_size)
        bar = tqdm(
            batches,
            desc=f"[{self.lstm}] epoch {epoch + 1}/{cfg.epochs}",
            unit="batch",
            leave=False,
            # None: off when stderr is not a terminal (logs, CI), as well as on --quiet.
            disable=None if self.progress else True,
        )
        model.train()
        t0 = time.perf_counter()
        running = 0.0
        for b, i in enumerate(bar):
            idx = order[i : i + cfg.batch_size]
            loss = _loss(model(self.x_tr[idx]), self.y_tr[idx], self.scale, cfg.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item()
            if b % 10 == 0:
                bar.set_postfix(loss=f"{running / (b + 1):.4f}")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0

        val = _eval_loss(model, self.x_va, self.y_va, self.scale, cfg.loss, cfg.batch_size)
        entry = {
            "epoch": epoch + 1,
            "train_loss": running / max(len(batches), 1),
            "val_loss": val,
            "seconds": seconds,
        }
        state["history"].append(entry)
        weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if val < state["best_val"]:
            state["best_val"], state["best_epoch"], state["best_model"] = val, epoch + 1, weights
        state["epoch"] = epoch + 1
        state["model"] = weights
        state["optimizer"] = opt.state_dict()
        if self.ckpt is not None:
            save_checkpoint(Path(self.ckpt), state)
        self.log(
            f"[{self.lstm}] epoch {epoch + 1:3d}/{cfg.epochs}  train {entry['train_loss']:.4f}  "
            f"val {val:.4f}  {seconds:6.2f} s"
        )
        return entry


def train(prep: Prepared, cfg: TrainConfig, lstm: str, device: torch.device, **kwargs) -> dict:
    """Train one model to ``cfg.epochs``; returns the final checkpoint dict.

    kwargs go to ``Trainer`` (ckpt, resume, progress, log).
    """
    trainer = Trainer(prep, cfg, lstm, device, **kwargs)
    while not trainer.done:
        trainer.run_epoch()
    return trainer.state


# --------------------------------------------------------------------------------------------
# Inference and evaluation
# --------------------------------------------------------------------------------------------


def model_from_checkpoint(state: dict, device: torch.device, lstm: str | None = None):
    """Rebuild the best model of a checkpoint. Returns (model, scaler, target_scale)."""
    cfg = TrainConfig(**{**state["config"], "fractions": tuple(state["config"]["fractions"])})
    lstm = lstm or state["lstm"]
    model = build_model(lstm, cfg.seed, **cfg.model_kwargs(len(state["feature_names"])))
    model.load_state_dict(state["best_model"] or state["model"], strict=True)
    model.to(device).eval()
    scaler = D.Standardizer.from_state_dict(state["scaler"])
    return model, scaler, np.asarray(state["target_scale"], dtype=np.float64)


@torch.no_grad()
def predict_positions(
    model: nn.Module, features: np.ndarray, cv: np.ndarray, target_scale: np.ndarray,
    device: torch.device, batch_size: int = 1024,
) -> np.ndarray:
    """features (F, Th, D) scaled; cv (F, K, 2) ft -> predicted positions (F, K, 2) ft."""
    model.eval()
    out = []
    for i in range(0, len(features), batch_size):
        xb = torch.as_tensor(features[i : i + batch_size], device=device)
        out.append(model(xb).double().cpu().numpy())
    offsets = np.concatenate(out) if out else np.zeros((0, D.HORIZON, 2))
    return cv + offsets * target_scale


def evaluate_split(model, s: SplitArrays, target_scale, device) -> dict:
    """Metrics of the model and both physics baselines on one block, plus the predictions."""
    pred = predict_positions(model, s.features, s.cv, target_scale, device)
    ca = constant_acceleration(s.history, D.HORIZON)
    metrics = {
        "model": displacement_metrics(pred, s.truth),
        "constant_velocity": displacement_metrics(s.cv, s.truth),
        "constant_acceleration": displacement_metrics(ca, s.truth),
    }
    cv_ade = metrics["constant_velocity"]["ade_ft"]
    metrics["ade_improvement_over_cv"] = 1 - metrics["model"]["ade_ft"] / cv_ade if cv_ade else None
    return {"metrics": metrics, "pred": pred, "ca": ca}


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")
