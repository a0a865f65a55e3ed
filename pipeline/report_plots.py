"""PNG charts for stage reports (matplotlib, headless). Optional: without matplotlib the reports say so."""

from __future__ import annotations

from pathlib import Path

from .artifacts import atomic_write_bytes


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def robust_vs_eps(path: Path, series: dict[str, list[tuple[float, float]]], eps_mark: float | None = None,
                  chance: float | None = None) -> bool:
    """Accuracy against eps (in /255 units on the x axis), one line per series (e.g. per backend)."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, pts in series.items():
        pts = sorted(pts)
        ax.plot([e * 255 for e, _ in pts], [a for _, a in pts], marker="o", label=name)
    if eps_mark is not None:
        ax.axvline(eps_mark * 255, color="grey", lw=0.8, ls="--", label=f"eps = {eps_mark * 255:.3g}/255")
    if chance is not None:
        ax.axhline(chance, color="red", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("Linf eps (x/255)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Robust accuracy vs eps (PGD)")
    _save(fig, path)
    plt.close(fig)
    return True


def latency_bars(path: Path, rows: list[tuple[str, float, float]]) -> bool:
    """rows: (label, p50 ms, p99 ms); bars at p50 with the p99 as an error whisker."""
    plt = _pyplot()
    if plt is None or not rows:
        return False
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(rows) + 1.2))
    labels = [r[0] for r in rows]
    p50 = [r[1] for r in rows]
    err = [max(0.0, r[2] - r[1]) for r in rows]
    ax.barh(range(len(rows)), p50, xerr=[[0] * len(rows), err], color="#4a7ab7", capsize=3)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("latency ms (bar: p50, whisker: p99)")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return True


def weight_matrix(path: Path, cells, shape: tuple[int, int], cell: tuple[int, int], title: str) -> bool:
    """A weight matrix's non-zero pattern (cells: 1 = non-zero, each covering cell = (r, c) weights of a
    matrix of `shape` rows x columns) with axes in weight indices, a title and a scale saying what black,
    white and one pixel mean."""
    plt = _pyplot()
    if plt is None:
        return False
    from matplotlib.colors import ListedColormap

    rows, cols = shape
    # wide GEMM views (VGG: 512 x 4608) stay readable: the height follows the aspect, within limits
    height = min(6.0, max(2.2, 7.0 * rows / max(cols, 1) + 1.2))
    fig, ax = plt.subplots(figsize=(7.5, height))
    image = ax.imshow(cells, cmap=ListedColormap(["white", "black"]), vmin=0, vmax=1, interpolation="nearest",
                      aspect="auto", extent=(0, cols, rows, 0))
    ax.set_xlabel("GEMM column: input channel x kernel position (in*kh*kw)")
    ax.set_ylabel("output channel")
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(image, ax=ax, ticks=[0.25, 0.75], fraction=0.04, pad=0.02)
    bar.ax.set_yticklabels(["zero", "non-zero"])
    r, c = cell
    if r > 1 or c > 1:
        bar.set_label(f"1 pixel = {r} x {c} weights (black: any non-zero)", fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return True


def _grid(plt, n: int, cols: int = 4, size: tuple[float, float] = (4.0, 2.8)):
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def histogram_grid(path: Path, panels: list[tuple[str, list[float], dict[str, list[float]]]], xlabel: str,
                   ylabel: str, title: str, colors: dict[str, str] | None = None) -> bool:
    """One panel per (title, bin edges, {run: counts}): the runs' histograms overlaid as outlines, each
    normalised to its own total (a share per bin), so a dense and a 99 % sparse run are comparable.
    colors: one colour per run in every panel (default: matplotlib's cycle in the order of first appearance)."""
    plt = _pyplot()
    if plt is None or not panels:
        return False
    colors = dict(colors or {})
    for _, _, runs in panels:
        for label in runs:
            colors.setdefault(label, f"C{len(colors) % 10}")
    fig, axes = _grid(plt, len(panels))
    for ax, (name, edges, runs) in zip(axes, panels):
        for label, counts in runs.items():
            total = sum(counts)
            if total:
                ax.stairs([c / total for c in counts], edges, label=label, lw=1.2, color=colors[label])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles = {}
    for ax in axes:  # a run left out of the first panel is still in the legend
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        axes[0].legend(list(handles.values()), list(handles), fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def pair_matrix(path: Path, labels: list[str], values: list[list[float | None]], title: str) -> bool:
    """A symmetric runs x runs matrix (Jaccard), each cell annotated; None (not computed) is grey and 'n/a'."""
    plt = _pyplot()
    if plt is None or not labels:
        return False
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    side = 1.2 + 0.9 * len(labels)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d0d0d0")
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, "n/a" if v is None else f"{v:.3f}", ha="center", va="center", fontsize=8,
                    color="black" if v is None or v > 0.6 else "white")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=10)
    _save(fig, path)
    plt.close(fig)
    return True


def layer_lines(path: Path, layers: list[str], series: dict[str, list[float | None]], ylabel: str, title: str,
                ylim: tuple[float, float] | None = (0, 1)) -> bool:
    """One line per series over the layers in model order (None: the series has no such layer)."""
    plt = _pyplot()
    if plt is None or not layers or not series:
        return False
    fig, ax = plt.subplots(figsize=(max(5.5, 0.45 * len(layers) + 2), 3.6))
    for label, values in series.items():
        ax.plot(range(len(layers)), [float("nan") if v is None else v for v in values], marker="o", label=label)
    ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    _save(fig, path)
    plt.close(fig)
    return True
