"""Command line: ``python -m examples.trajectory {run,train,evaluate,predict} [options]``.

run       train (and, with handlstm_cuda.LSTM available, train the nn.LSTM twin for
          comparison), then evaluate on the test block: metrics.json and PNGs in --out
train     train one model; checkpoints in OUT/checkpoints/<lstm>.pt, --resume continues
evaluate  metrics of a checkpoint on a block (default: test) against the physics baselines
predict   forecast the 5 steps after each window of a CSV file or folder of CSVs
"""

from __future__ import annotations

import argparse
import csv
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import data as D
from . import training as T
from .metrics import constant_velocity
from .model import LSTM_CHOICES, handlstm_unavailable_reason, resolve_lstm_name

DEFAULT_OUT = D.REPO_ROOT / "runs" / "trajectory"


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and environment")
    g.add_argument("--data-dir", type=Path, default=None,
                   help=f"folder of <id>.csv windows (default: ${D.ENV_DATA_DIR}, else "
                        f"{D.SHARED_DATA_DIR} when it exists)")
    g.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="use N generated windows instead of a data folder")
    g.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="output folder (default: %(default)s)")
    g.add_argument("--cache-dir", type=Path, default=None,
                   help="where the parsed folder is cached as .npz (default: OUT/cache)")
    g.add_argument("--no-cache", action="store_true", help="always parse the CSV files")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: for this small model the steadiest on "
                        "a shared machine; 0 keeps torch's default)")
    g.add_argument("--lstm", choices=("auto",) + LSTM_CHOICES, default="auto",
                   help="LSTM implementation; auto = handlstm when it imports, else torch")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of training and of --synthetic data (default 0; evaluate: the "
                        "checkpoint's, so that it scores the data the model was trained on)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _training(p: argparse.ArgumentParser) -> None:
    d = T.TrainConfig()
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--hidden", type=int, default=d.hidden)
    g.add_argument("--layers", type=int, default=d.layers)
    g.add_argument("--head", type=int, default=d.head, help="width of the MLP head")
    g.add_argument("--loss", choices=("euclidean", "mse"), default=d.loss)
    g.add_argument("--val-frac", type=float, default=d.fractions[1])
    g.add_argument("--test-frac", type=float, default=d.fractions[2])
    g.add_argument("--guard", type=int, default=d.guard,
                   help="extra files skipped after each split boundary (on top of the "
                        "boundary chain, which is always skipped)")
    g.add_argument("--keep-jumps", action="store_true",
                   help="keep windows that jump to another vehicle (default: drop them)")
    g.add_argument("--keep-repeats", action="store_true",
                   help="keep validation/test windows that retrace an earlier block's path "
                        "(default: drop them)")
    g.add_argument("--max-train-windows", type=int, default=0,
                   help="cap the training block (0: all)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/<lstm>.pt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m examples.trajectory",
        description="Vehicle trajectory forecasting (5 steps from 62) with handlstm_cuda.LSTM.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train (+ nn.LSTM comparison), evaluate, plot")
    _common(p)
    _training(p)
    p.add_argument("--no-compare", action="store_true",
                   help="skip training the other LSTM implementation for comparison")
    p.add_argument("--plot-windows", type=int, default=6)

    p = sub.add_parser("train", help="train one model")
    _common(p)
    _training(p)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint against the physics baselines")
    _common(p)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="default: OUT/checkpoints/<lstm>.pt")
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--plot-windows", type=int, default=6)

    p = sub.add_parser("predict", help="forecast from CSV windows of 62 or 67 rows")
    _common(p)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="default: OUT/checkpoints/<lstm>.pt")
    p.add_argument("--input", type=Path, required=True, help="a CSV file or a folder of CSV files")
    p.add_argument("--output", type=Path, default=None, help="default: OUT/predictions.csv")
    return parser


def _config(args) -> T.TrainConfig:
    train_frac = 1.0 - args.val_frac - args.test_frac
    return T.TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, hidden=args.hidden,
        layers=args.layers, head=args.head, loss=args.loss, seed=args.seed,
        fractions=(train_frac, args.val_frac, args.test_frac), guard=args.guard,
        drop_jumps=not args.keep_jumps, drop_repeats=not args.keep_repeats,
        max_train_windows=args.max_train_windows,
    )


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _device(args) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def _lstm(args) -> str:
    name = resolve_lstm_name(args.lstm)
    if args.lstm == "auto" and name == "torch":
        print(f"note: using torch.nn.LSTM because {handlstm_unavailable_reason()}")
    return name


def load_windows(args) -> D.WindowSet:
    if args.synthetic:
        from .synthetic import make_windows

        n = args.synthetic
        windows, ids, _, _ = make_windows(n, seed=args.seed, n_jumps=n // 200)
        return D.WindowSet(windows, ids, f"synthetic:{args.synthetic}:seed={args.seed}")
    folder = args.data_dir or D.default_data_dir()
    if folder is None:
        raise SystemExit(
            f"no data folder: pass --data-dir, set ${D.ENV_DATA_DIR}, or use --synthetic N "
            f"(looked for {D.SHARED_DATA_DIR})"
        )
    cache = None if args.no_cache else (args.cache_dir or args.out / "cache")
    t0 = time.perf_counter()
    ws = D.load_folder(folder, cache_dir=cache, progress=not args.quiet)
    print(f"loaded {len(ws)} windows from {folder} in {time.perf_counter() - t0:.1f} s")
    return ws


def _checkpoint(args, lstm: str) -> Path:
    return args.checkpoint or T.checkpoint_path(args.out, lstm)


def _command_line(args) -> str:
    return "python -m examples.trajectory " + " ".join(shlex.quote(a) for a in args.argv)


def _timing(state: dict) -> dict:
    seconds = [h["seconds"] for h in state["history"]]
    return {
        "epochs": len(seconds),
        "epoch_seconds": seconds,
        "epoch_seconds_median": statistics.median(seconds) if seconds else None,
        "epoch_seconds_min": min(seconds) if seconds else None,
        "best_val_loss": state["best_val"],
        "best_epoch": state["best_epoch"],
        "final_val_loss": state["history"][-1]["val_loss"] if seconds else None,
    }


def _environment(device: torch.device) -> dict:
    return {
        "torch": torch.__version__,
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
    }


def _print_metrics(name: str, m: dict) -> None:
    print(f"{name} block ({m['model']['windows']} windows), feet:")
    print(f"  {'':24s} {'ADE':>7s} {'FDE':>7s} {'RMSE lat':>9s} {'RMSE lon':>9s}")
    for key in ("model", "constant_velocity", "constant_acceleration"):
        r = m[key]
        print(f"  {key:24s} {r['ade_ft']:7.3f} {r['fde_ft']:7.3f} "
              f"{r['rmse_lateral_ft']:9.3f} {r['rmse_longitudinal_ft']:9.3f}")
    print(f"  ADE improvement over constant velocity: {100 * m['ade_improvement_over_cv']:.1f} %")


def _write_plots(out: Path, split: T.SplitArrays, result: dict, n: int, seed: int,
                 name: str = "test") -> Path | None:
    """Plots n windows of `split` (named `name`: the file is NAME_windows.png)."""
    from .plots import plot_windows

    if n <= 0 or len(split.file_ids) == 0:
        return None
    rng = np.random.default_rng(seed)
    # Pick windows that move (a parked car is a dull picture), reproducibly.
    moving = np.flatnonzero(np.abs(split.truth[:, -1, 1] - split.history[:, -1, 1]) > 2.0)
    pool = moving if len(moving) >= n else np.arange(len(split.file_ids))
    pick = np.sort(rng.choice(pool, size=min(n, len(pool)), replace=False))
    preds = {
        "model": result["pred"][pick],
        "constant_velocity": split.cv[pick],
        "constant_acceleration": result["ca"][pick],
    }
    return plot_windows(out / f"{name}_windows.png", split.history[pick], split.truth[pick],
                        preds, split.file_ids[pick])


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def cmd_train(args, log=print) -> dict:
    device = _device(args)
    lstm = _lstm(args)
    cfg = _config(args)
    prep = T.prepare(load_windows(args), cfg)
    _print_summary(prep.summary)
    return T.train(prep, cfg, lstm, device, ckpt=T.checkpoint_path(args.out, lstm),
                   resume=args.resume, progress=not args.quiet, log=log)


def _print_summary(s: dict) -> None:
    print(
        f"{s['files']} files, {s['chains']} chains, {s['jump_windows']} windows jump to another "
        f"vehicle, {s['guard_dropped']} dropped at split boundaries"
    )
    for name in ("train", "val", "test"):
        b = s[name]
        ids = f"{b['file_id_min']}..{b['file_id_max']}"
        print(f"  {name:5s} {b['windows']:6d} windows, file ids {ids}")


def cmd_evaluate(args) -> dict:
    device = _device(args)
    lstm = _lstm(args)
    path = _checkpoint(args, lstm)
    state = T.load_checkpoint(path)
    if args.seed is None:
        args.seed = state["config"]["seed"]
    model, scaler, target_scale = T.model_from_checkpoint(state, device)
    cfg = T.TrainConfig(**{**state["config"], "fractions": tuple(state["config"]["fractions"])})
    prep = T.prepare(load_windows(args), cfg, scaler=scaler, target_scale=target_scale)
    split = prep.splits[args.split]
    result = T.evaluate_split(model, split, target_scale, device)
    _print_metrics(args.split, result["metrics"])
    args.out.mkdir(parents=True, exist_ok=True)
    plot = _write_plots(args.out, split, result, args.plot_windows, args.seed, args.split)
    report = {
        "command": _command_line(args),
        "checkpoint": str(path),
        "lstm": state["lstm"],
        "split": args.split,
        "metrics": result["metrics"],
        "data": prep.summary,
        "config": state["config"],
        "training": _timing(state),
        "environment": _environment(device),
        "plots": [str(plot)] if plot else [],
    }
    T.write_json(args.out / f"metrics_{args.split}.json", report)
    print(f"wrote {args.out / f'metrics_{args.split}.json'}")
    return report


def cmd_run(args) -> dict:
    from .plots import plot_training_curves

    t_start = time.perf_counter()
    device = _device(args)
    primary = _lstm(args)
    cfg = _config(args)
    ws = load_windows(args)
    prep = T.prepare(ws, cfg)
    _print_summary(prep.summary)

    names = [primary]
    reason = None
    if not args.no_compare:
        other = "torch" if primary == "handlstm" else "handlstm"
        reason = handlstm_unavailable_reason() if other == "handlstm" else None
        if reason is None:
            names.append(other)
        else:
            print(f"note: no comparison run, {reason}")

    # Epochs of the two implementations alternate, so a change in machine load between them
    # does not show up as a difference in speed.
    trainers = {
        name: T.Trainer(prep, cfg, name, device, ckpt=T.checkpoint_path(args.out, name),
                        resume=args.resume, progress=not args.quiet)
        for name in names
    }
    while not all(t.done for t in trainers.values()):
        for t in trainers.values():
            if not t.done:
                t.run_epoch()
    states = {name: t.state for name, t in trainers.items()}

    results = {}
    for name in names:
        model, _, scale = T.model_from_checkpoint(states[name], device)
        results[name] = {
            split: T.evaluate_split(model, prep.splits[split], scale, device)
            for split in ("val", "test")
        }
    test = results[primary]["test"]
    _print_metrics("test", test["metrics"])

    args.out.mkdir(parents=True, exist_ok=True)
    plots = [
        _write_plots(args.out, prep.splits["test"], test, args.plot_windows, args.seed),
        plot_training_curves(args.out / "training_curves.png",
                             {n: states[n]["history"] for n in names}, cfg.loss),
    ]
    timing = {n: _timing(states[n]) for n in names}
    comparison = None
    if "handlstm" in timing and "torch" in timing:
        ours, ref = timing["handlstm"], timing["torch"]
        comparison = {
            "best_val_loss_handlstm": ours["best_val_loss"],
            "best_val_loss_torch": ref["best_val_loss"],
            "best_val_loss_relative_difference":
                abs(ours["best_val_loss"] - ref["best_val_loss"]) / ref["best_val_loss"],
            "epoch_seconds_median_handlstm": ours["epoch_seconds_median"],
            "epoch_seconds_median_torch": ref["epoch_seconds_median"],
            "epoch_seconds_min_handlstm": ours["epoch_seconds_min"],
            "epoch_seconds_min_torch": ref["epoch_seconds_min"],
            # nn.LSTM time / our time: above 1 means ours is faster.
            "speedup_per_epoch": ref["epoch_seconds_median"] / ours["epoch_seconds_median"],
            "speedup_per_epoch_min": ref["epoch_seconds_min"] / ours["epoch_seconds_min"],
        }
        print(
            f"training seconds per epoch (median / fastest): handlstm "
            f"{ours['epoch_seconds_median']:.2f} / {ours['epoch_seconds_min']:.2f}, nn.LSTM "
            f"{ref['epoch_seconds_median']:.2f} / {ref['epoch_seconds_min']:.2f} "
            f"(nn.LSTM time / ours: x{comparison['speedup_per_epoch']:.2f}); best val loss "
            f"{ours['best_val_loss']:.4f} vs {ref['best_val_loss']:.4f}"
        )
    report = {
        "command": _command_line(args),
        "lstm": primary,
        "test": test["metrics"],
        "val": results[primary]["val"]["metrics"],
        "other_lstm": {n: {"test": results[n]["test"]["metrics"]} for n in names[1:]},
        "target_ade_improvement_over_cv": 0.25,
        "meets_target": test["metrics"]["ade_improvement_over_cv"] >= 0.25,
        "training": timing,
        "comparison": comparison,
        "comparison_skipped_because": reason,
        "data": {"source": ws.source, **prep.summary},
        "config": states[primary]["config"],
        "environment": _environment(device),
        "wall_seconds": time.perf_counter() - t_start,
        "plots": [str(p) for p in plots if p],
    }
    T.write_json(args.out / "metrics.json", report)
    print(f"wrote {args.out / 'metrics.json'} and plots in {args.out} "
          f"({report['wall_seconds']:.0f} s in all)")
    return report


def cmd_predict(args) -> Path:
    device = _device(args)
    lstm = _lstm(args)
    state = T.load_checkpoint(_checkpoint(args, lstm))
    model, scaler, target_scale = T.model_from_checkpoint(state, device)

    src = args.input
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix.lower() == ".csv")
    else:
        files = [src]
    if not files:
        raise SystemExit(f"{src}: no .csv files")
    windows = [D.read_window_csv(p, rows=(D.HISTORY_STEPS, D.WINDOW_STEPS)) for p in files]
    has_truth = [len(w) == D.WINDOW_STEPS for w in windows]
    history = np.stack([w[: D.HISTORY_STEPS] for w in windows])
    values, valid = D.history_features(history)
    feats = scaler.transform(values, valid).astype(np.float32)
    cv = constant_velocity(D.history_positions(history), D.HORIZON)
    pred = T.predict_positions(model, feats, cv, target_scale, device)

    out = args.output or args.out / "predictions.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "step", "x_pred", "y_pred", "x_cv", "y_cv", "x_true", "y_true"])
        for k, path in enumerate(files):
            for s in range(D.HORIZON):
                truth = (
                    [f"{v:.4f}" for v in windows[k][D.HISTORY_STEPS + s, :2]]
                    if has_truth[k] else ["", ""]
                )
                w.writerow([path.name, s + 1, f"{pred[k, s, 0]:.4f}", f"{pred[k, s, 1]:.4f}",
                            f"{cv[k, s, 0]:.4f}", f"{cv[k, s, 1]:.4f}", *truth])
    print(f"wrote {len(files)} forecasts of {D.HORIZON} steps to {out}")
    return out


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.seed is None and args.command != "evaluate":  # (evaluate takes the checkpoint's)
        args.seed = 0
    command = {"run": cmd_run, "train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict}
    return command[args.command](args)
