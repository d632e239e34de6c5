"""PNG of time against hidden size and against batch size, ours (solid) vs torch (dashed).

Only single-layer, unidirectional cases with I = H and one sequence length T (the smallest the
sweep has) are drawn, in float32 with TF32 off where that setting exists; the CSV has the rest.
"""


def _usable(rows):
    ok = [
        r
        for r in rows
        if r["status"] == "ok"
        and r["impl"] in ("ours", "torch")
        and r["layers"] == 1
        and not r["bidirectional"]
        and r["I"] == r["H"]
        and r["dtype"] == "float32"
        and r["tf32"] in ("off", "n/a")
    ]
    if not ok:
        return [], None
    T0 = min(r["T"] for r in ok)
    return [r for r in ok if r["T"] == T0], T0


def plot(rows, path, title):
    """Write the figure to path; return False (and write nothing) when there is nothing to
    draw."""
    pts, T0 = _usable(rows)
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    # Minor ticks of a log axis: label only 2x and 5x, so the labels do not overlap.
    sparse = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else "")

    modes = [m for m in ("infer", "train-fwd", "fwd+bwd") if any(r["mode"] == m for r in pts)]
    Hs_by_N = {}
    for r in pts:
        Hs_by_N.setdefault(r["N"], set()).add(r["H"])
    Ns = sorted(Hs_by_N)
    # Batch sweep at the hidden size seen with the most batch sizes (512 when the sweep has it).
    counts = {}
    for r in pts:
        counts.setdefault(r["H"], set()).add(r["N"])
    H0 = max(counts, key=lambda h: (len(counts[h]), h == 512, h))

    fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.4 * len(modes)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for row, mode in enumerate(modes):
        ax_h, ax_n = axes[row]
        for k, N in enumerate(Ns):
            color = cmap(k / max(1, len(Ns) - 1) * 0.85)
            for impl, style in (("ours", "-"), ("torch", "--")):
                series = sorted(
                    (r["H"], r["median_ms"])
                    for r in pts
                    if r["mode"] == mode and r["N"] == N and r["impl"] == impl
                )
                if len(series) > 1:
                    ax_h.plot(*zip(*series), style, marker="o", color=color,
                              label=f"{impl} N={N}")
        for impl, style, color in (("ours", "-", "C0"), ("torch", "--", "C3")):
            series = sorted(
                (r["N"], r["median_ms"])
                for r in pts
                if r["mode"] == mode and r["H"] == H0 and r["impl"] == impl
            )
            if series:
                ax_n.plot(*zip(*series), style, marker="o", color=color, label=impl)
        ax_h.set_title(f"{mode}: time vs hidden size (T={T0}, I=H)")
        ax_n.set_title(f"{mode}: time vs batch size (T={T0}, I=H={H0})")
        ax_h.set_xlabel("H")
        ax_n.set_xlabel("N")
        for ax in (ax_h, ax_n):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_ylabel("median ms per call")
            ax.xaxis.set_major_formatter(plain)
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(sparse)
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


