"""`python -m toolkit report RUN1 RUN2 ...`: several runs on shared axes, and a summary line per run.

Choosing a backend, a batch size or a data mix means putting runs side by side; one report per run left that to
flipping between images with different axes. Here each run is one colour in every panel: the smoothed train loss
with its validation points, tokens/s, the gradient norm and (when logged) MFU, each over optimizer steps. The
summary gives what a comparison table needs: steps, the last smoothed train loss, the best validation loss and
its step, median tokens/s and MFU. Figures and reading come from toolkit/report.py; only the layout is new.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator, PercentFormatter

from toolkit.report import DPI, PANEL_INCHES, STEP_LABEL, Points, Series, _log_axis, _xy, read_series, smooth

PANELS = {
    "loss": "Loss (log scale): train smoothed, validation dots",
    "tokens_per_s": "Throughput (tokens / s, all ranks)",
    "grad_norm": "Gradient norm (global, before clipping)",
    "mfu": "Model FLOPs utilisation",
}


def run_names(runs: list[Path]) -> list[str]:
    """Each run's folder name, with its parent's where two names are alike (runs/a/x and runs/b/x)."""
    names = [run.resolve().name for run in runs]
    return [
        f"{run.resolve().parent.name}/{name}" if names.count(name) > 1 else name
        for run, name in zip(runs, names, strict=True)
    ]


def summary(series: Series) -> dict[str, float | int | None]:
    """One run's comparison row; None where the run logged nothing of that kind."""
    best = min(series.val_loss, key=lambda p: p[1]) if series.val_loss else None
    mfu = [v for _, v in series.mfu]
    return {
        "steps": series.loss[-1][0] if series.loss else None,
        "train_loss": smooth([v for _, v in series.loss])[-1] if series.loss else None,
        "best_val_loss": best[1] if best else None,
        "best_val_step": best[0] if best else None,
        "median_tokens_per_s": statistics.median(v for _, v in series.tokens_per_s) if series.tokens_per_s else None,
        "median_mfu": statistics.median(mfu) if mfu else None,
    }


def format_summary(name: str, row: dict[str, float | int | None]) -> str:
    def num(key: str, fmt: str, scale: int = 1) -> str:
        return "-" if row[key] is None else format(row[key] * scale, fmt)

    val = "-" if row["best_val_loss"] is None else f"{num('best_val_loss', '.4f')} (step {num('best_val_step', 'd')})"
    return (
        f"{name}: {num('steps', 'd')} steps, train loss {num('train_loss', '.4f')}, best val {val}, "
        f"{num('median_tokens_per_s', ',.0f')} tok/s, MFU {num('median_mfu', '.1f', 100)}"
        + ("%" if row["median_mfu"] is not None else "")
    )


def _lines(ax: Axes, runs: dict[str, Points], *, smoothed: bool = False, scale: float = 1.0) -> None:
    for i, (name, points) in enumerate(runs.items()):
        if not points:
            continue
        steps, values = _xy(points)
        values = smooth(values) if smoothed else values
        ax.plot(steps, [v * scale for v in values], color=f"C{i % 10}", linewidth=1.6, label=name,
                marker="o" if len(points) == 1 else None)  # fmt: skip


def _loss(ax: Axes, series: dict[str, Series]) -> None:
    _lines(ax, {name: [(st, v) for st, v in s.loss if v > 0] for name, s in series.items()}, smoothed=True)
    for i, s in enumerate(series.values()):
        val = [(st, v) for st, v in s.val_loss if v > 0]
        if val:
            ax.plot(*_xy(val), linestyle="none", marker="o", color=f"C{i % 10}")
    if ax.has_data():
        _log_axis(ax)


def build_comparison(series: dict[str, Series]) -> Figure:
    """Two panels a row; MFU only when some run logged it. Each axis' title is its PANELS entry."""
    draw: dict[str, Callable[[Axes], None]] = {
        "loss": lambda ax: _loss(ax, series),
        "tokens_per_s": lambda ax: _lines(ax, {n: s.tokens_per_s for n, s in series.items()}),
        "grad_norm": lambda ax: _lines(ax, {n: s.grad_norm for n, s in series.items()}),
    }
    if any(s.mfu for s in series.values()):
        draw["mfu"] = lambda ax: _lines(ax, {n: s.mfu for n, s in series.items()}, scale=100.0)
    rows = -(-len(draw) // 2)
    fig = Figure(figsize=(2 * PANEL_INCHES[0], rows * PANEL_INCHES[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, 2)
    for i, (key, paint) in enumerate(draw.items()):
        row, col = divmod(i, 2)
        ax = fig.add_subplot(grid[row, :] if i == len(draw) - 1 and col == 0 else grid[row, col])
        ax.set_title(PANELS[key])
        paint(ax)
        if ax.has_data():
            ax.set_xlabel(STEP_LABEL)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
        if key == "tokens_per_s":
            ax.yaxis.set_major_formatter(EngFormatter())
        if key == "mfu":
            ax.yaxis.set_major_formatter(PercentFormatter())
    return fig


def write_comparison(runs: list[str | Path], out: str | Path) -> tuple[Path, list[str]]:
    """Draw the runs to `out`; returns its path and the runs' summary lines."""
    paths = [Path(run) for run in runs]
    for path in paths:
        if not (path / "metrics.jsonl").exists():
            raise FileNotFoundError(f"{path / 'metrics.jsonl'} not found: pass run folders (train.run_dir)")
    series = {name: read_series(path / "metrics.jsonl") for name, path in zip(run_names(paths), paths, strict=True)}
    out = Path(out)
    build_comparison(series).savefig(out, format="png")
    return out, [format_summary(name, summary(s)) for name, s in series.items()]
