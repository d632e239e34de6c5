"""PNG figures: example test windows and training curves. Uses the non-interactive Agg backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_windows(
    path: Path,
    history: np.ndarray,
    truth: np.ndarray,
    preds: dict[str, np.ndarray],
    file_ids: np.ndarray,
    tail: int = 20,
) -> Path:
    """One panel per window: the last ``tail`` observed steps, the truth and each forecast.

    history (F, Th, 2), truth (F, K, 2), preds name -> (F, K, 2); feet. Positions are drawn
    relative to the last observed point, longitudinal (Local_Y) on the horizontal axis.
    """
    plt = _pyplot()
    n = len(history)
    cols = min(n, 3)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    styles = {
        "model": dict(color="tab:red", marker="o"),
        "constant_velocity": dict(color="tab:blue", marker="^", linestyle="--"),
        "constant_acceleration": dict(color="tab:green", marker="v", linestyle=":"),
    }
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        origin = history[k, -1]
        h = history[k, -tail:] - origin
        t = truth[k] - origin
        ax.plot(h[:, 1], h[:, 0], color="0.5", marker=".", label="history")
        ax.plot(t[:, 1], t[:, 0], color="black", marker="s", label="truth")
        for name, p in preds.items():
            q = p[k] - origin
            ax.plot(q[:, 1], q[:, 0], label=name.replace("_", " "), **styles.get(name, {}))
        ax.set_title(f"file {int(file_ids[k])}")
        ax.set_xlabel("longitudinal (ft, rel. to last obs.)")
        ax.set_ylabel("lateral (ft)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training_curves(path: Path, histories: dict[str, list[dict]], loss_name: str) -> Path:
    """Train and validation loss per epoch, one colour per LSTM implementation."""
    plt = _pyplot()
    fig, (ax_loss, ax_time) = plt.subplots(1, 2, figsize=(11, 3.8))
    for k, (name, hist) in enumerate(histories.items()):
        epochs = [h["epoch"] for h in hist]
        color = f"C{k}"
        ax_loss.plot(epochs, [h["train_loss"] for h in hist], color=color, linestyle="--",
                     label=f"{name} train")
        ax_loss.plot(epochs, [h["val_loss"] for h in hist], color=color, label=f"{name} val")
        ax_time.plot(epochs, [h["seconds"] for h in hist], color=color, marker="o", label=name)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel(f"loss ({loss_name})")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_time.set_xlabel("epoch")
    ax_time.set_ylabel("training seconds per epoch")
    ax_time.set_ylim(bottom=0)
    ax_time.legend()
    ax_time.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
