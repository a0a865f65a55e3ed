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
