"""Physics baselines and displacement metrics, in feet.

Shapes: positions (F, Th, 2) of history and (F, K, 2) of forecasts, the last axis being
(Local_X, Local_Y). Local_X runs across the road and Local_Y along it, so the x error is the
lateral error and the y error the longitudinal one.
"""

from __future__ import annotations

import numpy as np


def constant_velocity(history: np.ndarray, horizon: int) -> np.ndarray:
    """Repeat the last observed step's displacement. (F, Th>=2, 2) -> (F, K, 2).

    Exact on constant-velocity motion.
    """
    last = history[:, -1]
    step = history[:, -1] - history[:, -2]
    k = np.arange(1, horizon + 1, dtype=history.dtype)[None, :, None]
    return last[:, None] + k * step[:, None]


def constant_acceleration(history: np.ndarray, horizon: int) -> np.ndarray:
    """Keep the last step's displacement changing by the last second difference.

    (F, Th>=3, 2) -> (F, K, 2). With step v and change a, step j ahead moves v + j*a, so
    position k is last + k*v + a*k*(k+1)/2; exact on constant-acceleration motion sampled at
    a fixed rate.
    """
    last = history[:, -1]
    step = history[:, -1] - history[:, -2]
    accel = history[:, -1] - 2 * history[:, -2] + history[:, -3]
    k = np.arange(1, horizon + 1, dtype=history.dtype)[None, :, None]
    return last[:, None] + k * step[:, None] + 0.5 * k * (k + 1) * accel[:, None]


def displacement_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """pred, truth (F, K, 2) in feet -> ADE, FDE, lateral/longitudinal RMSE (all feet).

    ADE: Euclidean error averaged over the K steps and the windows; FDE: at step K only.
    RMSEs pool all K steps.
    """
    if pred.shape != truth.shape or pred.ndim != 3 or pred.shape[-1] != 2:
        raise ValueError(
            f"pred and truth must both be (F, K, 2), got {pred.shape} and {truth.shape}"
        )
    err = pred - truth
    dist = np.sqrt((err**2).sum(-1))
    return {
        "ade_ft": float(dist.mean()),
        "fde_ft": float(dist[:, -1].mean()),
        "rmse_lateral_ft": float(np.sqrt((err[..., 0] ** 2).mean())),
        "rmse_longitudinal_ft": float(np.sqrt((err[..., 1] ** 2).mean())),
        "windows": int(pred.shape[0]),
    }
