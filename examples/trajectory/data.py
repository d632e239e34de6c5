"""Loading, validating, cleaning and splitting the vehicle-trajectory windows.

Vocabulary used in this module and its callers:

    F       number of windows (one CSV file each)
    W       window length in steps (67 in the dataset)
    Th      observed history steps (62)
    K       forecast horizon in steps (5)
    C       raw columns (12, see ``COLUMNS``)
    D       model input features (see ``FEATURE_NAMES``)

Positions are in feet and steps are 0.1 s apart, as in the data README. Everything here is plain
numpy so the module is usable (and testable) without a GPU or the shared data folder.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLUMNS = (
    "Local_X",
    "Local_Y",
    "v_Vel",
    "v_Acc",
    "Space_Headway",
    "dis_cen",
    "i_l",
    "i_r",
    "i_f",
    "dis_l",
    "dis_r",
    "dis_f",
)
COL = {name: k for k, name in enumerate(COLUMNS)}

WINDOW_STEPS = 67
HISTORY_STEPS = 62
HORIZON = WINDOW_STEPS - HISTORY_STEPS
DT = 0.1

# Sentinels of the source data: a neighbour distance of 99 ft means "no such neighbour", a
# Space_Headway of 0 means "no preceding vehicle".
NO_NEIGHBOUR = 99.0
NO_HEADWAY = 0.0

ENV_DATA_DIR = "HANDLSTM_TRAJ_DATA"
REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "trajectories" / "car_data"

CACHE_FORMAT = 1


class DataFormatError(ValueError):
    """A CSV file (named in the message) does not have the expected layout."""


def default_data_dir() -> Path | None:
    """``$HANDLSTM_TRAJ_DATA`` if set, else the shared car_data folder if present, else None."""
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser()
    if SHARED_DATA_DIR.is_dir():
        return SHARED_DATA_DIR
    return None


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _file_id(path: Path) -> int:
    try:
        return int(path.stem)
    except ValueError:
        raise DataFormatError(
            f"{path}: file names must be '<integer id>.csv' (ids order the windows in time)"
        ) from None


def list_csv_files(folder: str | os.PathLike) -> list[Path]:
    """The ``<id>.csv`` files of ``folder``, sorted by numeric id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist or is not a directory")
    files = [p for p in folder.iterdir() if p.suffix.lower() == ".csv" and p.is_file()]
    if not files:
        raise DataFormatError(f"{folder}: no .csv files found")
    return sorted(files, key=_file_id)


def read_window_csv(path: str | os.PathLike, rows: tuple[int, ...] = (WINDOW_STEPS,)) -> np.ndarray:
    """Read one window file. Returns float64 (rows, C) in ``COLUMNS`` order.

    Columns may come in any order but must be exactly the 12 of ``COLUMNS``; the number of data
    rows must be one of ``rows``. Every error names the file.
    """
    path = Path(path)
    with open(path, newline="") as fh:
        header = fh.readline().strip()
        names = [c.strip().strip('"') for c in header.split(",")] if header else []
        missing = [c for c in COLUMNS if c not in names]
        unexpected = [c for c in names if c not in COL]
        if missing or unexpected or len(names) != len(COLUMNS):
            raise DataFormatError(
                f"{path}: header must hold the {len(COLUMNS)} columns {', '.join(COLUMNS)}; "
                f"missing {missing or 'none'}, unexpected {unexpected or 'none'}"
                + (f", {len(names)} given" if not (missing or unexpected) else "")
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # loadtxt warns on an empty body; we raise below
            try:
                values = np.loadtxt(fh, delimiter=",", dtype=np.float64, ndmin=2)
            except ValueError as exc:
                raise DataFormatError(f"{path}: cannot parse the numbers: {exc}") from None
    if values.size == 0:
        values = values.reshape(0, len(COLUMNS))
    if values.shape[0] not in rows:
        want = " or ".join(str(r) for r in rows)
        raise DataFormatError(f"{path}: expected {want} data rows, got {values.shape[0]}")
    if not np.isfinite(values).all():
        raise DataFormatError(f"{path}: contains NaN or infinite values")
    order = [names.index(c) for c in COLUMNS]
    return values[:, order]


@dataclass
class WindowSet:
    """Windows of one folder, sorted by file id.

    windows: float64 (F, W, C) in ``COLUMNS`` order; file_ids: int64 (F,).
    """

    windows: np.ndarray
    file_ids: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.file_ids)


def _folder_key(files: list[Path]) -> str:
    digest = hashlib.sha1(f"format={CACHE_FORMAT}".encode())
    for p in files:
        st = p.stat()
        digest.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return digest.hexdigest()[:20]


def load_folder(
    folder: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> WindowSet:
    """Load every ``<id>.csv`` of ``folder`` as (F, 67, 12) windows.

    With ``cache_dir`` the parsed array is stored as ``.npz`` keyed by the folder's file list
    (names, sizes, modification times), so a changed folder is parsed again.
    """
    files = list_csv_files(folder)
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"windows_{_folder_key(files)}.npz"
        if cache_path.is_file():
            with np.load(cache_path) as z:
                return WindowSet(z["windows"], z["file_ids"], str(folder))

    iterator = files
    if progress:
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal.
        iterator = tqdm(files, desc="reading csv", unit="file", leave=False, disable=None)
    windows = np.stack([read_window_csv(p) for p in iterator])
    file_ids = np.array([_file_id(p) for p in files], dtype=np.int64)
    if len(np.unique(file_ids)) != len(file_ids):
        raise DataFormatError(f"{folder}: two files share one numeric id (e.g. 7.csv and 07.csv)")

    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp.npz")
        np.savez(tmp, windows=windows, file_ids=file_ids)
        os.replace(tmp, cache_path)
    return WindowSet(windows, file_ids, str(folder))


# --------------------------------------------------------------------------------------------
# Cleaning: jumps to another vehicle, chains of consecutive files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JumpLimits:
    """Largest plausible displacement of one car in one 0.1 s step, in feet.

    The fastest speed in the data is 95 ft/s (9.5 ft per step) and a lane change moves a few
    ft/s sideways, so a step beyond these limits is a switch to another vehicle (or a tracking
    failure that is just as unusable).
    """

    forward: float = 15.0
    backward: float = 2.0
    lateral: float = 4.0


def find_jumps(windows: np.ndarray, limits: JumpLimits = JumpLimits()) -> np.ndarray:
    """Flag windows that jump to another vehicle. windows (F, W, C) -> bool (F,)."""
    step_x = np.diff(windows[:, :, COL["Local_X"]], axis=1)
    step_y = np.diff(windows[:, :, COL["Local_Y"]], axis=1)
    sideways = np.abs(step_x) > limits.lateral
    bad = sideways | (step_y > limits.forward) | (step_y < -limits.backward)
    return bad.any(axis=1)


def find_chains(
    windows: np.ndarray, file_ids: np.ndarray, tol_x: float = 3.0, tol_y: float = 10.0
) -> np.ndarray:
    """Label runs of files that continue one vehicle. Returns int64 (F,) chain labels.

    File n+1 continues file n when its id is n+1 and its first position lies within
    (tol_x, tol_y) ft of file n's last position extrapolated by one step. The tolerances are
    loose on purpose: a missed link could leak a vehicle across a split boundary, a spurious
    one only drops a few more windows there. ``file_ids`` must be sorted.
    """
    if np.any(np.diff(file_ids) <= 0):
        raise ValueError("file_ids must be strictly increasing")
    x, y = windows[:, :, COL["Local_X"]], windows[:, :, COL["Local_Y"]]
    next_x = 2 * x[:-1, -1] - x[:-1, -2]
    next_y = 2 * y[:-1, -1] - y[:-1, -2]
    linked = (
        (file_ids[1:] == file_ids[:-1] + 1)
        & (np.abs(x[1:, 0] - next_x) < tol_x)
        & (np.abs(y[1:, 0] - next_y) < tol_y)
    )
    return np.concatenate([[0], np.cumsum(~linked)]).astype(np.int64)


def find_repeats(
    windows: np.ndarray, reference: np.ndarray, tol: float = 0.02, min_run: int = 10,
    min_step: float = 0.05,
) -> np.ndarray:
    """Flag windows that retrace a reference window's path. Returns bool (F,).

    A window repeats a reference window when, for ``min_run`` consecutive moving rows (a step
    of more than ``min_step`` ft), each of its positions lies within ``tol`` ft in both
    coordinates of the reference window's position at the same shift of rows (the match may
    start at any row of either). The real data holds such near-exact repeats under file ids
    far apart, which chain linking cannot see; kept in a later block they would be leakage.
    windows (F, W, C), reference (G, W', C).
    """
    def moving_positions(w):
        xy = w[:, :, [COL["Local_X"], COL["Local_Y"]]]
        step = np.hypot(*np.moveaxis(np.diff(xy, axis=1, prepend=xy[:, :1]), -1, 0))
        step[:, 0] = step[:, 1] if w.shape[1] > 1 else 0.0
        return xy, step > min_step

    ref_xy, ref_moving = moving_positions(reference)
    # Reference rows by grid cell of side tol: a match within tol lies in one of the 3 x 3
    # cells around a position's own.
    cells: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for g, r in zip(*np.nonzero(ref_moving)):
        x, y = ref_xy[g, r]
        cells.setdefault((int(np.floor(x / tol)), int(np.floor(y / tol))), []).append((g, r))
    xy, moving = moving_positions(windows)
    out = np.zeros(len(windows), dtype=bool)
    for f in range(len(windows)):
        run: dict[tuple[int, int], int] = {}  # (reference window, row shift) -> run length
        for r in range(windows.shape[1]):
            hits = set()
            if moving[f, r]:
                x, y = xy[f, r]
                cx, cy = int(np.floor(x / tol)), int(np.floor(y / tol))
                for dx in (-1, 0, 1):
                    for dy in (-1, 0, 1):
                        for g, r2 in cells.get((cx + dx, cy + dy), ()):
                            if (abs(ref_xy[g, r2, 0] - x) <= tol
                                    and abs(ref_xy[g, r2, 1] - y) <= tol):
                                hits.add((g, r2 - r))
            run = {k: run.get(k, 0) + 1 for k in hits}
            if any(n >= min_run for n in run.values()):
                out[f] = True
                break
    return out


@dataclass
class Split:
    """Row indices (into a WindowSet) of each block; ``dropped`` lists the guard rows."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    dropped: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"train": self.train, "val": self.val, "test": self.test}


def split_blocks(
    chains: np.ndarray,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    guard: int = 0,
) -> Split:
    """Split rows (sorted by file id) into train | val | test contiguous blocks.

    Nominal boundaries sit at the given fractions of the rows. A later block then starts at
    the first chain start at or after its boundary, plus ``guard`` more rows, so no chain has
    files in two blocks; the skipped rows go to ``dropped``. Deterministic: no randomness.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"fractions must be three non-negative numbers summing to 1, got {fractions}"
        )
    n = len(chains)
    starts = np.flatnonzero(np.concatenate([[True], chains[1:] != chains[:-1]]))

    def block_start(nominal: int) -> int:
        if nominal <= 0:
            return 0
        k = np.searchsorted(starts, nominal)
        first = starts[k] if k < len(starts) else n
        return min(int(first) + guard, n)

    b1 = int(round(fractions[0] * n))
    b2 = int(round((fractions[0] + fractions[1]) * n))
    val_start = block_start(b1)
    test_start = max(block_start(b2), val_start)
    rows = np.arange(n)
    train = rows[:b1]
    val = rows[val_start:b2] if b2 > val_start else rows[:0]
    test = rows[test_start:]
    dropped = np.setdiff1d(rows, np.concatenate([train, val, test]))
    return Split(train, val, test, dropped)


# --------------------------------------------------------------------------------------------
# Features and targets
# --------------------------------------------------------------------------------------------

# Continuous features first (standardised), then 0/1 masks (left as they are).
CONTINUOUS_FEATURES = (
    "rel_x",  # Local_X minus its value at the last observed step
    "rel_y",  # Local_Y minus its value at the last observed step
    "step_x",  # Local_X displacement over the previous step
    "step_y",
    "v_Vel",
    "v_Acc",
    "Local_X",  # absolute lateral position: which lane, how near the edges
    "dis_cen",
    "Space_Headway",  # valid only where has_leader
    "dis_l",  # valid only where has_left
    "dis_r",
    "dis_f",
)
MASK_FEATURES = ("has_leader", "has_left", "has_right", "has_front")
FEATURE_NAMES = CONTINUOUS_FEATURES + MASK_FEATURES


def history_features(windows: np.ndarray, history: int = HISTORY_STEPS):
    """Model inputs from the observed steps.

    windows (F, W>=history, C) -> (features float64 (F, Th, D), valid bool (F, Th, D)).
    Sentinel entries are replaced by 0 and marked invalid, so no 99 (or headway 0) is ever a
    value; the mask features carry the information instead. The neighbour masks come from the
    indicator columns i_l, i_r, i_f, not from the distances: the real data has rows with i_f = 1
    and a true gap of exactly 99.0 ft (19 of 629,800), which a test of dis_f != 99 would drop.
    """
    h = windows[:, :history]
    x, y = h[..., COL["Local_X"]], h[..., COL["Local_Y"]]
    step_x = np.diff(x, axis=1, prepend=x[:, :1])
    step_y = np.diff(y, axis=1, prepend=y[:, :1])
    step_x[:, 0], step_y[:, 0] = step_x[:, 1], step_y[:, 1]

    has_leader = h[..., COL["Space_Headway"]] != NO_HEADWAY
    has_left = h[..., COL["i_l"]] == 1
    has_right = h[..., COL["i_r"]] == 1
    has_front = h[..., COL["i_f"]] == 1
    always = np.ones_like(has_leader)

    columns = [
        (x - x[:, -1:], always),
        (y - y[:, -1:], always),
        (step_x, always),
        (step_y, always),
        (h[..., COL["v_Vel"]], always),
        (h[..., COL["v_Acc"]], always),
        (x, always),
        (h[..., COL["dis_cen"]], always),
        (h[..., COL["Space_Headway"]], has_leader),
        (h[..., COL["dis_l"]], has_left),
        (h[..., COL["dis_r"]], has_right),
        (h[..., COL["dis_f"]], has_front),
    ]
    masks = [has_leader, has_left, has_right, has_front]
    values = [np.where(ok, v, 0.0) for v, ok in columns] + [m.astype(np.float64) for m in masks]
    valid = [ok for _, ok in columns] + [always] * len(masks)
    return np.stack(values, axis=-1), np.stack(valid, axis=-1)


class Standardizer:
    """Per-feature z-score over valid entries only; invalid entries map to 0 (the mean).

    Features listed in ``passthrough`` (0/1 masks) are left unchanged.
    """

    def __init__(self, passthrough: tuple[int, ...] = ()):
        self.passthrough = tuple(passthrough)
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def fit(self, values: np.ndarray, valid: np.ndarray) -> "Standardizer":
        """values, valid: (..., D). Statistics use only entries where valid is True."""
        d = values.shape[-1]
        v = values.reshape(-1, d)
        ok = valid.reshape(-1, d)
        count = np.maximum(ok.sum(0), 1)
        mean = np.where(ok, v, 0.0).sum(0) / count
        var = np.where(ok, (v - mean) ** 2, 0.0).sum(0) / count
        std = np.sqrt(var)
        std = np.where(std > 1e-8, std, 1.0)
        for k in self.passthrough:
            mean[k], std[k] = 0.0, 1.0
        self.mean, self.std = mean, std
        return self

    def transform(self, values: np.ndarray, valid: np.ndarray) -> np.ndarray:
        if self.mean is None:
            raise RuntimeError("Standardizer.transform called before fit")
        return np.where(valid, (values - self.mean) / self.std, 0.0)

    def state_dict(self) -> dict:
        return {"passthrough": list(self.passthrough), "mean": self.mean, "std": self.std}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Standardizer":
        obj = cls(tuple(state["passthrough"]))
        obj.mean = np.asarray(state["mean"], dtype=np.float64)
        obj.std = np.asarray(state["std"], dtype=np.float64)
        return obj


def future_positions(windows: np.ndarray, history: int = HISTORY_STEPS) -> np.ndarray:
    """(F, W, C) -> float64 (F, K, 2): (Local_X, Local_Y) of the steps after the history."""
    return windows[:, history:, [COL["Local_X"], COL["Local_Y"]]]


def history_positions(windows: np.ndarray, history: int = HISTORY_STEPS) -> np.ndarray:
    """(F, W, C) -> float64 (F, Th, 2)."""
    return windows[:, :history, [COL["Local_X"], COL["Local_Y"]]]
