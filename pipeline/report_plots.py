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
