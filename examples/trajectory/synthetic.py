"""Synthetic windows with the 12 columns of the real data, for tests and for users without it.

Each chain is one follower driven by the Intelligent Driver Model (Treiber, Hennecke and
Helbing, 2000) behind a leader whose speed wanders, with occasional lane changes and side
neighbours that come and go. A chain is cut into consecutive 67-step windows whose file ids
run on by one, like the real folder, so neighbouring ids continue the same vehicle. Units are
feet and seconds, steps 0.1 s apart; the sentinels match the data (99 = no side/front
neighbour, Space_Headway 0 = no leader).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .data import COL, COLUMNS, DT, NO_HEADWAY, NO_NEIGHBOUR, WINDOW_STEPS

LANE_WIDTH = 12.4
N_LANES = 7
LANE_CENTRES = 4.6 + LANE_WIDTH * np.arange(N_LANES)
ACC_CLIP = 11.2  # ft/s^2, the clip of v_Acc in the real data

# IDM parameters in feet and seconds, drawn per chain around common passenger-car values.
IDM_GAP_MIN = 6.5  # s0, ft
IDM_ACCEL = 3.0  # a, ft/s^2
IDM_DECEL = 5.0  # b, comfortable braking, ft/s^2
IDM_DELTA = 4.0


def _idm_accel(v, dv, gap, v0, headway_time):
    """IDM acceleration; dv = v - v_leader (positive when closing in)."""
    s_star = IDM_GAP_MIN + np.maximum(
        0.0, v * headway_time + v * dv / (2.0 * np.sqrt(IDM_ACCEL * IDM_DECEL))
    )
    return IDM_ACCEL * (1.0 - (v / v0) ** IDM_DELTA - (s_star / np.maximum(gap, 0.5)) ** 2)


def _simulate(n_chains: int, steps: int, rng: np.random.Generator, lane_change_rate: float):
    """Vectorised over chains. Returns a dict of (n_chains, steps) arrays."""
    v0 = rng.uniform(35.0, 90.0, n_chains)
    headway_time = rng.uniform(1.0, 2.0, n_chains)
    lane = rng.integers(0, N_LANES, n_chains)
    x = LANE_CENTRES[lane] + rng.normal(0.0, 0.8, n_chains)
    y = rng.uniform(0.0, 300.0, n_chains)
    v = rng.uniform(10.0, 50.0, n_chains)
    has_leader = rng.random(n_chains) < 0.85
    gap = rng.uniform(25.0, 120.0, n_chains)
    v_lead = np.clip(v + rng.normal(0.0, 3.0, n_chains), 0.0, None)
    lead_target = rng.uniform(5.0, 70.0, n_chains)
    side = {s: rng.random(n_chains) < 0.4 for s in ("l", "r")}
    side_dist = {s: rng.uniform(4.0, 25.0, n_chains) for s in ("l", "r")}

    # Lane-change manoeuvre: target lateral offset and progress in [0, 1].
    lc_from = x.copy()
    lc_to = x.copy()
    lc_progress = np.ones(n_chains)
    lc_duration = 4.0  # s

    keys = ("x", "y", "v", "a", "gap", "l", "r", "dl", "dr")
    out = {k: np.zeros((n_chains, steps)) for k in keys}
    for t in range(steps):
        # Leader: speed relaxes towards a wandering target; occasionally it brakes hard.
        lead_target += rng.normal(0.0, 0.6, n_chains)
        brake = rng.random(n_chains) < 0.002
        lead_target = np.where(brake, lead_target * 0.3, lead_target)
        lead_target = np.clip(lead_target, 0.0, 85.0)
        lead_acc = np.clip(0.4 * (lead_target - v_lead), -9.0, 4.0)
        v_lead = np.clip(v_lead + lead_acc * DT, 0.0, None)

        free = _idm_accel(v, 0.0, np.full(n_chains, 1e6), v0, headway_time)
        follow = _idm_accel(v, v - v_lead, gap, v0, headway_time)
        acc = np.clip(np.where(has_leader, follow, free), -ACC_CLIP, ACC_CLIP)
        v_new = np.clip(v + acc * DT, 0.0, None)
        y = y + 0.5 * (v + v_new) * DT
        gap = gap + (v_lead - 0.5 * (v + v_new)) * DT
        v = v_new

        # Start a lane change now and then (only when not already changing).
        start = (lc_progress >= 1.0) & (rng.random(n_chains) < lane_change_rate)
        direction = np.where(rng.random(n_chains) < 0.5, -1, 1)
        direction = np.where(lane == 0, 1, np.where(lane == N_LANES - 1, -1, direction))
        lane = np.where(start, lane + direction, lane)
        lc_from = np.where(start, x, lc_from)
        lc_to = np.where(start, LANE_CENTRES[lane] + rng.normal(0.0, 0.5, n_chains), lc_to)
        lc_progress = np.where(start, 0.0, lc_progress)
        # A new lane means a new leader (or none) at a fresh gap.
        has_leader = np.where(start, rng.random(n_chains) < 0.8, has_leader)
        gap = np.where(start, rng.uniform(30.0, 120.0, n_chains), gap)
        v_lead = np.where(start, np.clip(v + rng.normal(0.0, 4.0, n_chains), 0.0, None), v_lead)
        has_leader &= gap < 600.0  # beyond sensing range, as in the data (max 638 ft)
        lc_progress = np.minimum(lc_progress + DT / lc_duration, 1.0)
        shape = 0.5 - 0.5 * np.cos(np.pi * lc_progress)  # smooth 0 -> 1
        x = np.where(lc_progress < 1.0, lc_from + (lc_to - lc_from) * shape, lc_to)
        x = x + rng.normal(0.0, 0.01, n_chains)  # small lateral wander

        # Side neighbours appear and disappear; none beyond the outer lanes.
        for s, edge in (("l", 0), ("r", N_LANES - 1)):
            flip = rng.random(n_chains) < 0.01
            side[s] = np.where(flip, ~side[s], side[s]) & (lane != edge)
            side_dist[s] = np.clip(side_dist[s] + rng.normal(0.0, 0.3, n_chains), 2.1, 28.5)

        out["x"][:, t], out["y"][:, t], out["v"][:, t], out["a"][:, t] = x, y, v, acc
        out["gap"][:, t] = np.where(has_leader, np.maximum(gap, 1.0), NO_HEADWAY)
        out["l"][:, t], out["r"][:, t] = side["l"], side["r"]
        out["dl"][:, t] = np.where(side["l"], side_dist["l"], NO_NEIGHBOUR)
        out["dr"][:, t] = np.where(side["r"], side_dist["r"], NO_NEIGHBOUR)
    return out


def make_windows(
    n_windows: int,
    seed: int = 0,
    max_chain_windows: int = 12,
    lane_change_rate: float = 0.0005,
    n_jumps: int = 0,
):
    """Generate ``n_windows`` windows in chains of 1..max_chain_windows consecutive windows.

    Returns (windows float64 (F, 67, 12) in COLUMNS order, file_ids int64 (F,) = 0..F-1,
    chains int64 (F,) true chain labels, jumps bool (F,) windows given a jump to another car).
    """
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < n_windows:
        lengths.append(int(rng.integers(1, max_chain_windows + 1)))
    lengths[-1] -= sum(lengths) - n_windows
    n_chains = len(lengths)
    sim = _simulate(n_chains, max(lengths) * WINDOW_STEPS, rng, lane_change_rate)

    columns = {
        "Local_X": "x", "Local_Y": "y", "v_Vel": "v", "v_Acc": "a", "Space_Headway": "gap",
        "i_l": "l", "i_r": "r", "dis_l": "dl", "dis_r": "dr",
    }
    windows = np.zeros((n_windows, WINDOW_STEPS, len(COLUMNS)))
    chains = np.repeat(np.arange(n_chains), lengths)
    offsets = np.concatenate([np.arange(n) for n in lengths])  # window index within its chain
    for row, (c, w) in enumerate(zip(chains, offsets)):
        s = slice(w * WINDOW_STEPS, (w + 1) * WINDOW_STEPS)
        for column, key in columns.items():
            windows[row, :, COL[column]] = sim[key][c, s]
    _fill_derived(windows)

    jumps = np.zeros(n_windows, dtype=bool)
    if n_jumps:
        rows = rng.choice(n_windows, size=min(n_jumps, n_windows), replace=False)
        for r in rows:
            insert_jump(windows[r], step=int(rng.integers(5, WINDOW_STEPS - 5)), rng=rng)
            jumps[r] = True
    return windows, np.arange(n_windows, dtype=np.int64), chains, jumps


def _fill_derived(windows: np.ndarray) -> None:
    """dis_cen, i_f and dis_f from position and headway, as defined in the data README."""
    x = windows[:, :, COL["Local_X"]]
    windows[:, :, COL["dis_cen"]] = np.abs(x[..., None] - LANE_CENTRES).min(-1)
    headway = windows[:, :, COL["Space_Headway"]]
    front = headway != NO_HEADWAY
    windows[:, :, COL["i_f"]] = front
    windows[:, :, COL["dis_f"]] = np.where(front, headway, NO_NEIGHBOUR)


def insert_jump(window: np.ndarray, step: int, rng: np.random.Generator | None = None) -> None:
    """From ``step`` on, switch ``window`` (67, 12) in place to another car: a shifted lane
    and a position far along the road, as in the real files that jump."""
    rng = rng or np.random.default_rng(0)
    window[step:, COL["Local_X"]] += LANE_WIDTH * rng.choice([-1.0, 1.0])
    window[step:, COL["Local_Y"]] -= rng.uniform(200.0, 1500.0)
    x = window[:, COL["Local_X"]]
    window[:, COL["dis_cen"]] = np.abs(x[:, None] - LANE_CENTRES).min(-1)


def write_csv_folder(folder: str | os.PathLike, windows: np.ndarray, file_ids: np.ndarray) -> Path:
    """Write each window as ``<id>.csv`` with the data's header. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header = ",".join(COLUMNS)
    for win, fid in zip(windows, file_ids):
        np.savetxt(
            folder / f"{fid}.csv", win, delimiter=",", header=header, comments="", fmt="%.6f"
        )
    return folder
