"""Data module of the trajectory example: loading errors, sentinels, jumps, chain-safe splits.

Everything runs on generated windows; the tests on the real folder skip when it is absent.
"""

from pathlib import Path

import numpy as np
import pytest

from examples.trajectory import data as D
from examples.trajectory import synthetic as S
from examples.trajectory import training as T


@pytest.fixture(scope="module")
def synth():
    windows, ids, chains, jumps = S.make_windows(400, seed=3, n_jumps=4)
    return windows, ids, chains, jumps


def _write(folder: Path, name: str, rows: np.ndarray, header=D.COLUMNS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    np.savetxt(path, rows, delimiter=",", header=",".join(header), comments="", fmt="%.6f")
    return path


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def test_folder_roundtrip_sorted_by_numeric_id(tmp_path, synth):
    windows, ids, _, _ = synth
    pick = [0, 1, 2, 10, 11, 100]  # lexicographic order would put 10 and 100 before 2
    S.write_csv_folder(tmp_path, windows[pick], ids[pick])
    ws = D.load_folder(tmp_path)
    assert ws.file_ids.tolist() == pick
    np.testing.assert_allclose(ws.windows, windows[pick], atol=1e-6)


def test_missing_column_names_the_file(tmp_path, synth):
    header = list(D.COLUMNS)
    header[9] = "dis_left"
    bad = _write(tmp_path, "5.csv", synth[0][0], header)
    _write(tmp_path, "4.csv", synth[0][1])
    expect = r"5\.csv.*missing \['dis_l'\].*unexpected \['dis_left'\]"
    with pytest.raises(D.DataFormatError, match=expect):
        D.load_folder(tmp_path)
    with pytest.raises(D.DataFormatError, match=str(bad.name)):
        D.read_window_csv(bad)


def test_extra_column_names_the_file(tmp_path, synth):
    rows = np.concatenate([synth[0][0], np.zeros((D.WINDOW_STEPS, 1))], axis=1)
    _write(tmp_path, "8.csv", rows, D.COLUMNS + ("Vehicle_ID",))
    with pytest.raises(D.DataFormatError, match=r"8\.csv.*unexpected \['Vehicle_ID'\]"):
        D.load_folder(tmp_path)


@pytest.mark.parametrize("n_rows", [0, 1, 62, 66, 68])
def test_wrong_row_count_names_the_file(tmp_path, synth, n_rows):
    rows = np.resize(synth[0][0], (n_rows, len(D.COLUMNS)))
    _write(tmp_path, "0.csv", synth[0][0])
    _write(tmp_path, "1.csv", rows)
    with pytest.raises(D.DataFormatError, match=rf"1\.csv: expected 67 data rows, got {n_rows}"):
        D.load_folder(tmp_path)


def test_unparseable_value_names_the_file(tmp_path, synth):
    path = _write(tmp_path, "3.csv", synth[0][0])
    lines = path.read_text().splitlines()
    lines[10] = lines[10].replace(",", ",abc,", 1).rsplit(",", 1)[0]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(D.DataFormatError, match=r"3\.csv: cannot parse"):
        D.load_folder(tmp_path)


def test_non_integer_file_name_is_rejected(tmp_path, synth):
    _write(tmp_path, "window_a.csv", synth[0][0])
    with pytest.raises(D.DataFormatError, match=r"window_a\.csv"):
        D.load_folder(tmp_path)


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_folder(tmp_path / "nope")
    with pytest.raises(D.DataFormatError, match="no .csv files"):
        D.load_folder(tmp_path)


def test_columns_in_another_order_and_crlf(tmp_path, synth):
    order = list(reversed(D.COLUMNS))
    rows = synth[0][0][:, [D.COL[c] for c in order]]
    path = _write(tmp_path, "0.csv", rows, order)
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    np.testing.assert_allclose(D.read_window_csv(path), synth[0][0], atol=1e-6)


def test_cache_is_reused_and_invalidated(tmp_path, synth):
    folder, cache = tmp_path / "csv", tmp_path / "cache"
    S.write_csv_folder(folder, synth[0][:5], synth[1][:5])
    first = D.load_folder(folder, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1
    again = D.load_folder(folder, cache_dir=cache)
    np.testing.assert_array_equal(first.windows, again.windows)

    S.write_csv_folder(folder, synth[0][5:6], np.array([5]))
    grown = D.load_folder(folder, cache_dir=cache)
    assert len(grown) == 6 and len(list(cache.glob("*.npz"))) == 2


# --------------------------------------------------------------------------------------------
# Sentinels and scaling
# --------------------------------------------------------------------------------------------


def test_synthetic_data_has_sentinels(synth):
    w = synth[0]
    for col in ("dis_l", "dis_r", "dis_f"):
        assert (w[..., D.COL[col]] == D.NO_NEIGHBOUR).any() and (w[..., D.COL[col]] < 30).any()
    assert (w[..., D.COL["Space_Headway"]] == D.NO_HEADWAY).any()
    # The indicator columns agree with the distance sentinels, as in the real data.
    for i, dist in (("i_l", "dis_l"), ("i_r", "dis_r"), ("i_f", "dis_f")):
        np.testing.assert_array_equal(w[..., D.COL[i]] == 0, w[..., D.COL[dist]] == D.NO_NEIGHBOUR)


def test_sentinels_become_masks_not_values(synth):
    w = synth[0]
    values, valid = D.history_features(w)
    assert values.shape == (len(w), D.HISTORY_STEPS, len(D.FEATURE_NAMES)) == valid.shape
    for name, col, mask in (
        ("dis_l", "dis_l", "has_left"),
        ("dis_r", "dis_r", "has_right"),
        ("dis_f", "dis_f", "has_front"),
        ("Space_Headway", "Space_Headway", "has_leader"),
    ):
        k, m = D.FEATURE_NAMES.index(name), D.FEATURE_NAMES.index(mask)
        raw = w[:, : D.HISTORY_STEPS, D.COL[col]]
        sentinel = D.NO_HEADWAY if col == "Space_Headway" else D.NO_NEIGHBOUR
        np.testing.assert_array_equal(values[..., m], raw != sentinel)
        np.testing.assert_array_equal(valid[..., k], raw != sentinel)
        assert not (values[..., k] == D.NO_NEIGHBOUR).any()
        assert (values[..., k][~valid[..., k]] == 0).all()


def test_a_true_99_ft_gap_is_a_value_not_the_sentinel(synth):
    """The real data has rows with a vehicle in front (i_f = 1) exactly 99.0 ft away: the
    indicator, not the distance, says whether there is a neighbour."""
    w = synth[0][:1].copy()
    t = 10
    w[0, t, D.COL["i_f"]] = 1
    w[0, t, D.COL["dis_f"]] = D.NO_NEIGHBOUR
    w[0, t, D.COL["Space_Headway"]] = D.NO_NEIGHBOUR
    values, valid = D.history_features(w)
    k, m = D.FEATURE_NAMES.index("dis_f"), D.FEATURE_NAMES.index("has_front")
    assert values[0, t, m] == 1 and valid[0, t, k] and values[0, t, k] == 99.0


def test_no_raw_99_reaches_the_scaler(synth, monkeypatch):
    seen = []
    fit = D.Standardizer.fit

    def spy(self, values, valid):
        seen.append((values.copy(), valid.copy()))
        return fit(self, values, valid)

    monkeypatch.setattr(D.Standardizer, "fit", spy)
    scaler = T.fit_scaler(synth[0][~synth[3]])  # jump-free, as prepare() would pass
    (values, valid), = seen
    for name in ("dis_l", "dis_r", "dis_f", "Space_Headway"):
        k = D.FEATURE_NAMES.index(name)
        used = values[..., k][valid[..., k]]
        assert used.size and not (used == D.NO_NEIGHBOUR).any()
        assert used.min() > 0
    k = D.FEATURE_NAMES.index("dis_l")
    assert 2.0 <= scaler.mean[k] <= 28.5  # a mean over real distances, not pulled towards 99
    masks = [D.FEATURE_NAMES.index(m) for m in D.MASK_FEATURES]
    np.testing.assert_array_equal(scaler.mean[masks], 0.0)
    np.testing.assert_array_equal(scaler.std[masks], 1.0)

    scaled = scaler.transform(values, valid)
    assert np.abs(scaled[..., : len(D.CONTINUOUS_FEATURES)]).max() < 50
    assert (scaled[~valid] == 0).all()


def test_standardizer_state_roundtrip(synth):
    values, valid = D.history_features(synth[0])
    a = D.Standardizer((12, 13)).fit(values, valid)
    b = D.Standardizer.from_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.transform(values, valid), b.transform(values, valid))


def test_features_are_relative_to_last_observed_position(synth):
    values, _ = D.history_features(synth[0])
    rx, ry = D.FEATURE_NAMES.index("rel_x"), D.FEATURE_NAMES.index("rel_y")
    np.testing.assert_array_equal(values[:, -1, [rx, ry]], 0.0)


# --------------------------------------------------------------------------------------------
# Jumps to another vehicle
# --------------------------------------------------------------------------------------------


def test_clean_synthetic_windows_have_no_jumps(synth):
    windows, _, _, jumps = synth
    np.testing.assert_array_equal(D.find_jumps(windows), jumps)


@pytest.mark.parametrize("step", [1, 30, 61, 66])
def test_jump_to_another_vehicle_is_flagged(synth, step):
    clean = synth[0][~synth[3]][:3].copy()
    clean[1] = clean[1].copy()
    S.insert_jump(clean[1], step=step, rng=np.random.default_rng(step))
    assert D.find_jumps(clean).tolist() == [False, True, False]


def test_lateral_only_jump_is_flagged(synth):
    w = synth[0][~synth[3]][:1].copy()
    w[0, 40:, D.COL["Local_X"]] += S.LANE_WIDTH  # same speed, next lane: another car
    assert D.find_jumps(w).tolist() == [True]


def test_stopping_and_lane_change_are_not_jumps(synth):
    w = synth[0][:1].copy()
    w[0, :, D.COL["Local_Y"]] = 100.0 + np.minimum(np.arange(67), 30) * 3.0  # 30 ft/s, stops
    w[0, :, D.COL["Local_X"]] = 17.0 + 12.4 / (1 + np.exp(-(np.arange(67) - 33) / 4.0))
    assert D.find_jumps(w).tolist() == [False]


# --------------------------------------------------------------------------------------------
# Chains and the split
# --------------------------------------------------------------------------------------------


def test_chains_recovered_on_synthetic_data(synth):
    windows, ids, chains, jumps = synth
    found = D.find_chains(windows, ids)
    true_link = chains[1:] == chains[:-1]
    found_link = found[1:] == found[:-1]
    assert not (found_link & ~true_link).any()
    # A link may only be missed out of a window that was made to jump.
    missed = np.flatnonzero(true_link & ~found_link)
    assert jumps[missed].all()


def test_chains_break_at_missing_ids(synth):
    windows, ids, chains, _ = synth
    first_chain = windows[chains == chains[0]]
    assert len(first_chain) >= 2
    ids = np.arange(len(first_chain))
    ids[1:] += 5
    labels = D.find_chains(first_chain, ids)
    assert labels[0] != labels[1]


def test_split_drops_the_boundary_chain():
    #                  rows 0-2   3-6         7-9      10-11 12-16          17-19
    chains = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 4, 4, 5, 5, 5])
    s = D.split_blocks(chains, (0.4, 0.3, 0.3))  # nominal boundaries at rows 8 and 14
    assert s.train.tolist() == list(range(0, 8))
    assert s.val.tolist() == [10, 11, 12, 13]  # chain 2's tail (8, 9) is dropped
    assert s.test.tolist() == [17, 18, 19]  # chain 4's tail (14-16) is dropped
    assert s.dropped.tolist() == [8, 9, 14, 15, 16]

    g = D.split_blocks(chains, (0.4, 0.3, 0.3), guard=1)
    assert g.val[0] == 11 and g.test.tolist() == [18, 19]


def _assert_no_leak(split: D.Split, chains: np.ndarray, guard: int = 0) -> None:
    blocks = [split.train, split.val, split.test]
    for b in blocks:
        if len(b):
            np.testing.assert_array_equal(b, np.arange(b[0], b[-1] + 1))  # contiguous
    for a, b in zip(blocks, blocks[1:]):
        if len(a) and len(b):
            assert b[0] - a[-1] - 1 >= guard
            assert not set(chains[a]) & set(chains[b])
    assert not set(chains[split.train]) & set(chains[split.test])
    every = np.concatenate(blocks + [split.dropped])
    assert len(every) == len(set(every.tolist())) == len(chains)


@pytest.mark.parametrize("guard", [0, 3])
def test_split_has_no_chain_across_blocks(synth, guard):
    windows, ids, true_chains, _ = synth
    found = D.find_chains(windows, ids)
    split = D.split_blocks(found, (0.7, 0.1, 0.2), guard=guard)
    _assert_no_leak(split, found, guard)
    _assert_no_leak(split, true_chains, guard)  # also against the generator's own chains
    assert len(split.val) > 0 and len(split.test) > 0
    again = D.split_blocks(found, (0.7, 0.1, 0.2), guard=guard)
    for a, b in zip(split.as_dict().values(), again.as_dict().values()):
        np.testing.assert_array_equal(a, b)


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="summing to 1"):
        D.split_blocks(np.zeros(10, dtype=np.int64), (0.7, 0.2, 0.2))


def test_prepare_fits_on_train_only_and_drops_jumps(synth):
    windows, ids, _, jumps = synth
    ws = D.WindowSet(windows, ids)
    prep = T.prepare(ws, T.TrainConfig())
    used = np.concatenate([s.file_ids for s in prep.splits.values()])
    assert not np.isin(ids[jumps], used).any()
    ref = T.fit_scaler(windows[np.isin(ids, prep.splits["train"].file_ids)])
    np.testing.assert_allclose(prep.scaler.mean, ref.mean)
    moved = windows.copy()
    moved[np.isin(ids, prep.splits["test"].file_ids), :, D.COL["v_Vel"]] += 1000.0
    prep2 = T.prepare(D.WindowSet(moved, ids), T.TrainConfig())
    np.testing.assert_allclose(prep2.scaler.mean, prep.scaler.mean)


def _retrace(source, target, start, length, shift, noise, seed=0):
    """target with rows [start, start+length) replaced by source's rows shifted by `shift`,
    positions moved by up to `noise` ft."""
    out = target.copy()
    rows = slice(start, start + length)
    out[rows] = source[start + shift:start + shift + length]
    jitter = np.random.default_rng(seed).uniform(-noise, noise, (length, 2))
    out[rows, D.COL["Local_X"]] += jitter[:, 0]
    out[rows, D.COL["Local_Y"]] += jitter[:, 1]
    return out


def test_find_repeats_flags_a_retraced_path_at_any_shift(synth):
    windows = synth[0]
    moving = np.flatnonzero(np.abs(np.diff(windows[:, :, D.COL["Local_Y"]], axis=1)).min(1) > 0.5)
    src, other = windows[moving[0]], windows[moving[-1]]
    ref = windows[moving[:5]]
    assert not D.find_repeats(windows[moving[-3:]], ref).any()  # other cars: no repeat
    for length, noise, expected in ((12, 0.015, True), (12, 0.04, False), (8, 0.0, False)):
        w = _retrace(src, other, 20, length, 5, noise)
        assert D.find_repeats(w[None], ref)[0] == expected, (length, noise)
    # Stationary rows never count: a parked car at a spot a reference car once stood is not
    # a retraced path.
    parked = np.repeat(src[:1], len(src), axis=0)
    assert not D.find_repeats(parked[None], np.repeat(parked[None], 2, axis=0)).any()


def test_prepare_drops_later_windows_that_retrace_earlier_blocks(synth):
    windows, ids, _, _ = synth
    base = T.prepare(D.WindowSet(windows, ids), T.TrainConfig())
    assert base.summary["test"]["repeats_dropped"] == 0  # synthetic cars never repeat
    # Make one test window retrace a training window (all of it: a partial copy would jump).
    train_row = int(np.flatnonzero(ids == base.splits["train"].file_ids[10])[0])
    test_ids = base.splits["test"].file_ids
    test_id = test_ids[len(test_ids) // 2]
    test_row = int(np.flatnonzero(ids == test_id)[0])
    copied = windows.copy()
    copied[test_row] = windows[train_row]
    prep = T.prepare(D.WindowSet(copied, ids), T.TrainConfig())
    assert prep.summary["test"]["repeat_file_ids"] == [int(test_id)]
    assert test_id not in prep.splits["test"].file_ids
    assert len(prep.splits["test"].file_ids) == len(base.splits["test"].file_ids) - 1
    kept = T.prepare(D.WindowSet(copied, ids), T.TrainConfig(drop_repeats=False))
    assert test_id in kept.splits["test"].file_ids


# --------------------------------------------------------------------------------------------
# The real folder (skipped without it)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    folder = D.default_data_dir()
    if folder is None or not Path(folder).is_dir():
        pytest.skip(f"real trajectory data not found (set ${D.ENV_DATA_DIR} or provide "
                    f"{D.SHARED_DATA_DIR})")
    return D.load_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))


def test_real_data_loads_and_splits_without_leakage(real):
    assert real.windows.shape[1:] == (D.WINDOW_STEPS, len(D.COLUMNS))
    assert np.all(np.diff(real.file_ids) > 0)
    jumps = D.find_jumps(real.windows)
    # The README counts 26 jumps; our limits also catch a few teleporting tracks.
    assert 20 <= jumps.sum() <= 60
    chains = D.find_chains(real.windows, real.file_ids)
    split = D.split_blocks(chains)
    _assert_no_leak(split, chains)
    # Looser tolerances link more files; the split must not leak under them either.
    loose = D.find_chains(real.windows, real.file_ids, tol_x=10.0, tol_y=50.0)
    _assert_no_leak(D.split_blocks(loose), loose)


def test_real_data_repeats_under_unrelated_ids_are_found(real):
    """Pairs found by a review: test 17407 retraces train 12197 (31 rows within 0.004 ft),
    test 17048 train 15400, test 16625 validation 16053. No chain links them (ids far apart)."""
    row = {int(i): k for k, i in enumerate(real.file_ids)}
    for later, earlier in ((17407, 12197), (17048, 15400), (16625, 16053)):
        w, ref = real.windows[[row[later]]], real.windows[[row[earlier]]]
        assert D.find_repeats(w, ref)[0], (later, earlier)
    assert not D.find_repeats(real.windows[[row[17407]]], real.windows[[row[15400]]])[0]
