"""Tables (terminal and markdown), CSV and the target check, from the benchmark's rows.

A row is one (setting, case, mode, implementation) point; see COLUMNS. Ratios are time ratios
against torch.nn.LSTM on the same point, taken round by round (see add_ratios): ours / torch
< 1 means ours is faster, and the speedup column is the inverse.
"""

import csv
import math

COLUMNS = (
    "device",
    "dtype",
    "tf32",
    "case",
    "group",
    "T",
    "N",
    "I",
    "H",
    "layers",
    "bidirectional",
    "data",
    "mode",
    "impl",
    "backend",
    "status",
    "median_ms",
    "p25_ms",
    "p75_ms",
    "reps",
    "us_per_step",
    "peak_mb",
    "err_vs_torch",
    "ratio_vs_torch",
    "ratio_p25",
    "ratio_p75",
)

# (device type, case group, description, required torch/ours speedup)
TARGETS = (
    ("cpu", "seed", "CPU seed workload fwd+bwd, float32: ours at least 2x faster", 2.0),
    ("cpu", "fastrnns", "CPU fastrnns default fwd+bwd, float32: ours at least 1.0x", 1.0),
    ("cuda", "seed", "GPU seed workload fwd+bwd, float32, TF32 off: ours at least 1.0x", 1.0),
    ("cuda", "fastrnns", "GPU fastrnns default fwd+bwd, float32, TF32 off: at least 1.0x", 1.0),
)


def add_ratios(rows):
    """Fill ratio_vs_torch for every timed row that has a timed torch row beside it.

    The ratio is the median over rounds of (this call / torch's call in the same round) when
    the row carries it (ratio_paired), else the ratio of the two medians.
    """
    torch_ms = {
        _point(r): r["median_ms"] for r in rows if r["impl"] == "torch" and r["status"] == "ok"
    }
    for r in rows:
        base = torch_ms.get(_point(r))
        ok = r["status"] == "ok" and base is not None and base > 0
        paired = r.get("ratio_paired", math.nan)
        if not ok:
            r["ratio_vs_torch"] = math.nan
        elif math.isfinite(paired):
            r["ratio_vs_torch"] = paired
        else:
            r["ratio_vs_torch"] = r["median_ms"] / base
    return rows


def _point(r):
    return (r["device"], r["dtype"], r["tf32"], r["case"], r["mode"])


def _setting(r):
    return (r["device"], r["dtype"], r["tf32"])


def targets(rows):
    """[(description, speedup or None, required, verdict)] for the targets of this device."""
    out = []
    devices = {r["device"].split(":")[0] for r in rows}
    for device, group, text, need in TARGETS:
        if device not in devices:
            continue
        hits = [
            r
            for r in rows
            if r["device"].split(":")[0] == device
            and r["group"] == group
            and r["mode"] == "fwd+bwd"
            and r["impl"] == "ours"
            and r["dtype"] == "float32"
            and r["tf32"] in ("off", "n/a")
        ]
        ratio = hits[0]["ratio_vs_torch"] if hits else math.nan
        if math.isfinite(ratio) and ratio > 0:
            speedup = 1.0 / ratio
            out.append((text, speedup, need, "met" if speedup >= need else "MISSED"))
        else:
            out.append((text, None, need, "not measured"))
    return out


def _fmt(v, spec):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


_TABLE_HEAD = (
    ("case", "<"),
    ("mode", "<"),
    ("ours ms", ">"),
    ("torch ms", ">"),
    ("ref ms", ">"),
    ("ours/torch", ">"),
    ("round IQR", ">"),
    ("speedup", ">"),
    ("ours us/step", ">"),
    ("torch us/step", ">"),
    ("ours MB", ">"),
    ("torch MB", ">"),
    ("ours err", ">"),
)


def _iqr(r):
    """'p25-p75' of the per-round ratios of one row, or '-'."""
    if r is None or r["status"] != "ok":
        return "-"
    lo, hi = r.get("ratio_p25", math.nan), r.get("ratio_p75", math.nan)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "-"
    return f"{lo:.2f}-{hi:.2f}"


def _table_rows(rows):
    """Yield (setting, [cells]) pivoted to one line per (case, mode)."""
    order = []
    by_point = {}
    for r in rows:
        key = _point(r)
        if key not in by_point:
            by_point[key] = {}
            order.append(key)
        by_point[key][r["impl"]] = r
    for key in order:
        impls = by_point[key]
        ours, base, ref = impls.get("ours"), impls.get("torch"), impls.get("reference")
        first = next(iter(impls.values()))

        def ms(r):
            if r is None:
                return "n/r"  # not run for this point
            if r["status"] != "ok":
                return r["status"].split(":")[0]
            return _fmt(r["median_ms"], ".3f")

        ratio = ours["ratio_vs_torch"] if ours else math.nan
        speedup = 1.0 / ratio if math.isfinite(ratio) and ratio > 0 else math.nan
        cells = [
            first["case"] + (" [car_data]" if first["data"] == "car_data" else ""),
            first["mode"],
            ms(ours),
            ms(base),
            ms(ref),
            _fmt(ratio, ".3f"),
            _iqr(ours),
            _fmt(speedup, ".2f") + ("x" if math.isfinite(speedup) else ""),
            _fmt(ours["us_per_step"] if ours and ours["status"] == "ok" else None, ".1f"),
            _fmt(base["us_per_step"] if base and base["status"] == "ok" else None, ".1f"),
            _fmt(ours["peak_mb"] if ours and ours["status"] == "ok" else None, ".1f"),
            _fmt(base["peak_mb"] if base and base["status"] == "ok" else None, ".1f"),
            _fmt(ours["err_vs_torch"] if ours else None, ".1e"),
        ]
        yield _setting(first), cells, impls


def _setting_title(setting, rows):
    device, dtype, tf32 = setting
    backends = sorted(
        {r["backend"] for r in rows if _setting(r) == setting and r["impl"] == "torch"}
    )
    title = f"{device} {dtype}"
    if tf32 != "n/a":
        title += f", TF32 {tf32}"
    return title + " | torch.nn.LSTM runs " + (", ".join(backends) or "-")


def _grouped_cells(rows):
    """Table cells per setting (dtype / TF32 block), in the order the rows come."""
    groups = {}
    for setting, cells, _ in _table_rows(rows):
        groups.setdefault(setting, []).append(cells)
    return groups


def text_table(rows):
    lines = []
    for setting, body in _grouped_cells(rows).items():
        head = [h for h, _ in _TABLE_HEAD]
        widths = [max(len(c[i]) for c in body + [head]) for i in range(len(head))]

        def line(cells):
            return "  ".join(
                c.ljust(w) if a == "<" else c.rjust(w)
                for c, w, (_, a) in zip(cells, widths, _TABLE_HEAD)
            )

        lines.append("")
        lines.append(_setting_title(setting, rows))
        lines.append(line(head))
        lines.append("  ".join("-" * w for w in widths))
        lines.extend(line(c) for c in body)
    return "\n".join(lines)


def markdown_table(rows):
    lines = []
    for setting, body in _grouped_cells(rows).items():
        head = [h for h, _ in _TABLE_HEAD]
        lines.append("")
        lines.append(f"### {_setting_title(setting, rows)}")
        lines.append("")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" if a == "<" else "---:" for _, a in _TABLE_HEAD) + "|")
        lines.extend("| " + " | ".join(c) + " |" for c in body)
    return "\n".join(lines)


def targets_text(rows, markdown=False, caveat=None):
    """One line per target; with a caveat (a busy machine), each verdict carries it."""
    lines = []
    for text, speedup, need, verdict in targets(rows):
        got = f"{speedup:.2f}x" if speedup is not None else "-"
        if caveat and speedup is not None:
            verdict = f"{verdict} ({caveat})"
        lines.append(("- " if markdown else "  ") + f"{text}: {got} -> {verdict}")
    return "\n".join(lines)


def write_csv(path, meta, rows):
    """Metadata as '# key: value' lines, then one CSV header line and the rows."""
    with open(path, "w", newline="") as f:
        f.write("# handlstm_cuda benchmark\n")
        for k, v in meta.items():
            f.write(f"# {k}: {str(v).replace(chr(10), ' ')}\n")
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _csv_value(r.get(k)) for k in COLUMNS})


def _csv_value(v):
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    return v


def read_csv(path):
    """(meta, rows) back from write_csv's file; numbers come back as strings."""
    meta, lines = {}, []
    with open(path, newline="") as f:
        for line in f:
            if line.startswith("# ") and ": " in line:
                k, v = line[2:].rstrip("\n").split(": ", 1)
                meta[k] = v
            elif not line.startswith("#"):
                lines.append(line)
    return meta, list(csv.DictReader(lines))


def write_markdown(path, meta, rows, notes=(), caveat=None):
    with open(path, "w") as f:
        f.write(f"# LSTM benchmark: {meta['device_name']}, {meta['date'][:10]}\n\n")
        for k, v in meta.items():
            f.write(f"- **{k}**: {v}\n")
        f.write(
            "\nTimes are medians per call. ours/torch: median over timing rounds of the ratio "
            "of the two calls timed in that round (below 1: ours is faster); round IQR: its "
            "quartiles; speedup: its inverse. MB: peak memory of one call (GPU: "
            "max_memory_allocated above the starting allocation; CPU: growth of the "
            "process's peak RSS). err: ||ours - torch|| / ||torch||, largest over the output "
            "and all gradients. n/r: not run for this point.\n"
        )
        f.write(markdown_table(rows))
        f.write("\n\n## Targets\n\n")
        f.write(targets_text(rows, markdown=True, caveat=caveat) or "- none for this device")
        f.write("\n")
        for note in notes:
            f.write(f"\n{note}\n")
