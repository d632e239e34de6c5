"""Input sets for the benchmark: real trajectory windows for the seed's workload, random data
elsewhere.

Shape vocabulary: T time, N batch, I input, H hidden, D directions, L layers.
"""

import os
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
CAR_DATA = REPO_ROOT.parent / "shared" / "data" / "trajectories" / "car_data"

# Columns whose value is a sentinel rather than a measurement (see car_data's README):
# the distances read 99.0 when there is no neighbour, Space_Headway reads 0 when there is no
# preceding vehicle. Sentinels are left out of the scaling statistics and then set to 0, the
# scaled mean; the i_l / i_r / i_f indicator columns already say which values are missing.
_SENTINELS = {"dis_l": 99.0, "dis_r": 99.0, "dis_f": 99.0, "Space_Headway": 0.0}


def _numeric_csvs(folder):
    return sorted(
        (p for p in Path(folder).glob("*.csv") if p.stem.isdigit()), key=lambda p: int(p.stem)
    )


def load_car_windows(folder, count, T, N, I):  # noqa: E741
    """Read `count` input sets of shape (T, N, I) from car_data, or return None.

    Set k is made of the files with the (k*N)-th to ((k+1)*N - 1)-th smallest numeric names,
    one file per batch row, its first T rows and I columns, z-scored per feature over all
    sets together (sentinels excluded, see _SENTINELS). Returns None when the folder is
    missing or has too few files, rows or columns for the request.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = _numeric_csvs(folder)
    if len(files) < count * N:
        return None

    with open(files[0]) as f:
        columns = f.readline().strip().split(",")
    if len(columns) < I:
        return None
    windows = []
    for path in files[: count * N]:
        rows = np.loadtxt(path, delimiter=",", skiprows=1, max_rows=T, ndmin=2)
        if rows.shape[0] < T:
            return None
        windows.append(rows[:, :I])
    data = np.stack(windows)  # (count*N, T, I)

    missing = np.zeros(data.shape, dtype=bool)
    for j, name in enumerate(columns[:I]):
        if name in _SENTINELS:
            missing[..., j] = data[..., j] == _SENTINELS[name]
    masked = np.ma.array(data, mask=missing)
    mean = masked.mean(axis=(0, 1)).filled(0.0)
    std = masked.std(axis=(0, 1)).filled(1.0)
    std = np.where(std > 1e-12, std, 1.0)
    scaled = np.where(missing, 0.0, (data - mean) / std)

    scaled = scaled.reshape(count, N, T, I).transpose(0, 2, 1, 3)  # (count, T, N, I)
    return [torch.from_numpy(np.ascontiguousarray(s)).float() for s in scaled]


def car_data_folder(data_dir=None):
    """The folder of car_data CSVs: data_dir, else $HANDLSTM_TRAJ_DATA (the trajectory example's
    setting), else the shared folder beside the repository."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get("HANDLSTM_TRAJ_DATA")
    return Path(env) if env else CAR_DATA


def make_input_sets(case, count, device, dtype, seed=0, data_dir=None):
    """`count` tuples (x, h0, c0, grad_output) for one case, on device in dtype.

    x (T, N, I) requires grad; h0, c0 (L*D, N, H); grad_output (T, N, D*H). Returns the sets
    and a word naming where x came from ("car_data" or "random"). Real windows come from
    car_data_folder(data_dir) when it exists.
    """
    gen = torch.Generator().manual_seed(seed)
    xs = None
    source = "random"
    if case.real_data:
        xs = load_car_windows(car_data_folder(data_dir), count, case.T, case.N, case.I)
        if xs is not None:
            source = "car_data"
    if xs is None:
        xs = [torch.randn(case.T, case.N, case.I, generator=gen) for _ in range(count)]

    sets = []
    state_shape = (case.layers * case.directions, case.N, case.H)
    for x in xs:
        h0 = torch.randn(state_shape, generator=gen)
        c0 = torch.randn(state_shape, generator=gen)
        grad_out = torch.randn(case.T, case.N, case.directions * case.H, generator=gen)
        x = x.to(device=device, dtype=dtype).requires_grad_()
        sets.append(tuple([x] + [t.to(device=device, dtype=dtype) for t in (h0, c0, grad_out)]))
    return sets, source
