"""`python -m toolkit report RUN`: one PNG of a run's metrics.jsonl, for clusters without a TensorBoard port.

Panels: loss (log axis: raw train loss faint, its smoothed line, validation points), learning rate per parameter
group, gradient norm, tokens/s, MFU, data-wait share of the step, rank imbalance and lmms-eval scores over steps.
MFU, rank imbalance and lmms-eval scores get a panel only when the run logged them (MFU needs a known device peak,
so not on CPU; lmms-eval scores need train.lmms_tasks); the other panels say so when they have no data.

Drawn with matplotlib rather than by hand: the hand-drawn Pillow version had no ticks, no log axis and drew equal
learning-rate curves on top of each other, and a log axis with real ticks is what reading a loss curve needs.
matplotlib is used through `Figure` + the Agg canvas only, never pyplot, so nothing picks an interactive backend
or needs a display on a headless node, and building a figure leaves no global state behind.

The smoothed loss is a debiased exponential moving average (TensorBoard's smoothing): with decay b,
`m_t = b * m_(t-1) + (1 - b) * x_t`, `m_0 = 0`, plotted as `m_t / (1 - b^t)` so the first points are not pulled
towards 0. The decay follows the run's length: `b = 1 - 1 / span`, `span = max(1, n // SMOOTH_DIVISOR)` for n
finite train losses, i.e. a window of about 3% of the run whatever its length (no smoothing under 60 steps).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FuncFormatter, MaxNLocator, PercentFormatter

from toolkit.errors import UserError

Points = list[tuple[int, float]]

PANEL_INCHES = (6.4, 3.6)  # one panel; the figure is two panels wide
DPI = 100
SMOOTH_DIVISOR = 30
LMMS_PREFIX = "lmms/"
IMBALANCE_KEYS = {"rank_cost_imbalance": "estimated cost", "rank_time_imbalance": "measured forward time"}
STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v")]  # line style, marker
STEP_LABEL = "optimizer step"

TITLES = {
    "loss": "Loss (log scale)",
    "lr": "Learning rate per parameter group",
    "grad_norm": "Gradient norm (global, before clipping)",
    "tokens_per_s": "Throughput",
    "mfu": "Model FLOPs utilisation",
    "data_wait": "Waiting for data",
    "imbalance": "Rank imbalance (max / mean over ranks)",
    "lmms": "lmms-eval",
}


@dataclass
class Series:
    """Every plotted quantity as (step, value) points sorted by step, finite values only."""

    loss: Points = field(default_factory=list)
    val_loss: Points = field(default_factory=list)
    lr: dict[str, Points] = field(default_factory=dict)  # parameter group -> points
    grad_norm: Points = field(default_factory=list)
    tokens_per_s: Points = field(default_factory=list)
    mfu: Points = field(default_factory=list)  # fraction of peak, 0..1
    data_wait_share: Points = field(default_factory=list)  # fraction of step time, 0..1
    imbalance: dict[str, Points] = field(default_factory=dict)  # IMBALANCE_KEYS label -> points
    lmms: dict[str, Points] = field(default_factory=dict)  # "task/metric" -> points


def _number(value: Any) -> float | None:
    """A finite float, or None for what cannot be plotted (None, NaN, inf, strings, bools)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_records(metrics_file: Path) -> list[dict[str, Any]]:
    """The JSON objects of metrics.jsonl. A last line cut off mid-write (the run is still going) is ignored;
    any other line that is not a JSON object with a `step` is an error naming the line."""
    text = metrics_file.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):
                break  # being written right now
            raise UserError(f"{metrics_file}:{number} is not JSON ({e}): fix or delete that line") from e
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{metrics_file}:{number} has no integer 'step': fix or delete that line")
        records.append(record)
    return records


def read_series(metrics_file: Path) -> Series:
    """metrics.jsonl -> Series. Records may come in any step order (lmms-eval scores are written when scoring
    finishes, after later steps); where a step repeats a key, the later line wins."""
    by_key: dict[tuple[str, str], dict[int, float]] = {}

    def put(kind: str, name: str, step: int, value: Any) -> None:
        if (v := _number(value)) is not None:
            by_key.setdefault((kind, name), {})[step] = v

    for m in read_records(metrics_file):
        step = m["step"]
        for key in ("loss", "val_loss", "grad_norm", "tokens_per_s", "mfu", "data_wait_share"):
            put(key, "", step, m.get(key))
        for key, label in IMBALANCE_KEYS.items():
            put("imbalance", label, step, m.get(key))
        lrs = m.get("lr")
        for group, lr in lrs.items() if isinstance(lrs, dict) else ():
            put("lr", group, step, lr)
        for key, value in m.items():
            if key.startswith(LMMS_PREFIX):
                put("lmms", key[len(LMMS_PREFIX) :], step, value)
    series = Series()
    for (kind, name), points in by_key.items():
        ordered = sorted(points.items())
        if name:
            getattr(series, kind)[name] = ordered
        else:
            setattr(series, kind, ordered)
    order = [label for label in IMBALANCE_KEYS.values() if label in series.imbalance]
    series.imbalance = {label: series.imbalance[label] for label in order}
    return series


def smoothing_span(n: int) -> int:
    """Steps the EMA averages over for a series of n points (1 = no smoothing)."""
    return max(1, n // SMOOTH_DIVISOR)


def smooth(values: list[float]) -> list[float]:
    """The debiased EMA of the module docstring."""
    decay = 1.0 - 1.0 / smoothing_span(len(values))
    out, mean = [], 0.0
    for t, x in enumerate(values, 1):
        mean = decay * mean + (1.0 - decay) * x
        out.append(mean / (1.0 - decay**t))
    return out


def _xy(points: Points) -> tuple[list[int], list[float]]:
    return [s for s, _ in points], [v for _, v in points]


def _line(ax: Axes, points: Points, scale: float = 1.0, **style: Any) -> None:
    """One series; a single point gets a marker so it shows at all."""
    steps, values = _xy(points)
    if len(points) == 1:
        style.setdefault("marker", "o")
    ax.plot(steps, [v * scale for v in values], **style)


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color="0.45")
    ax.set_xticks([])
    ax.set_yticks([])


def _log_axis(ax: Axes) -> None:
    """A log y axis labelled in plain numbers (0.6, 2, 3e-05), not 6 x 10^-1. Under two decades of range the
    ticks between powers of ten are labelled too (only 2, 3 and 5 above 0.6 decades), so a loss that moves
    little still reads off several ticks."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.3g}"))

    def minor(x: float, _: int) -> str:
        low, high = ax.get_ylim()
        decades = math.log10(high / low) if low > 0 else math.inf
        mantissa = round(x / 10 ** math.floor(math.log10(x)))
        shown = decades < 0.6 or (decades < 2 and mantissa in (2, 3, 5))
        return f"{x:.3g}" if shown else ""

    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _loss_panel(ax: Axes, s: Series) -> None:
    train = [(step, v) for step, v in s.loss if v > 0]  # a log axis cannot show 0 or below
    val = [(step, v) for step, v in s.val_loss if v > 0]
    if not train and not val:
        return _empty(ax, "no loss logged yet")
    if train:
        steps, values = _xy(train)
        ax.plot(steps, values, color="C0", alpha=0.3, linewidth=0.8, label="train (raw)")
        span = smoothing_span(len(values))
        smoothing = f"EMA over ~{span} steps" if span > 1 else "too few steps to smooth"
        ax.plot(steps, smooth(values), color="C0", linewidth=2, label=f"train ({smoothing})")
    if val:
        steps, values = _xy(val)
        ax.plot(steps, values, linestyle="none", marker="o", color="C3", label="validation")
    _log_axis(ax)
    ax.set_ylabel("cross-entropy (nats / target token)")
    ax.legend()


def _lr_panel(ax: Axes, s: Series) -> None:
    """A log axis when the groups' peaks are far apart (nanoVLM's projector LR is 100x the backbones'); the
    plotted data stay the logged values, a 0 at the schedule's end drops to the axis' bottom edge."""
    if not s.lr:
        return _empty(ax, "no learning rate logged")
    n = max(len(points) for points in s.lr.values())
    every = max(1, n // 8)
    peaks = [max(v for _, v in points) for points in s.lr.values()]
    for i, (group, points) in enumerate(s.lr.items()):
        linestyle, marker = STYLES[i % len(STYLES)]
        offset = i * every // len(s.lr)  # staggered markers keep equal curves apart
        label = group if peaks[i] > 0 else f"{group} (0: frozen)"
        ax.plot(*_xy(points), color=f"C{i}", linestyle=linestyle, marker=marker, markevery=(offset, every),
                markersize=7 - 1.5 * (i % 3), linewidth=1.6, label=label)  # fmt: skip
    live = [p for p in peaks if p > 0]  # a frozen group's zeros lie on the bottom edge of a log axis (clipped)
    if len(live) > 1 and max(live) / min(live) > 20:  # one frozen group flattened the others on a linear axis
        _log_axis(ax)
        ax.set_ylim(bottom=min(live) / 1e3)  # a schedule decaying to ~0 would stretch the axis over decades
    ax.set_ylabel("learning rate")
    ax.legend(title="group")


def _single_panel(ax: Axes, points: Points, ylabel: str, empty: str, scale: float = 1.0) -> None:
    if not points:
        return _empty(ax, empty)
    _line(ax, points, scale, color="C0", linewidth=1.4)
    ax.set_ylabel(ylabel)


def _imbalance_panel(ax: Axes, s: Series) -> None:
    for i, (label, points) in enumerate(s.imbalance.items()):
        linestyle, _ = STYLES[i]
        _line(ax, points, color=f"C{i}", linestyle=linestyle, linewidth=1.4, label=label)
    ax.set_ylabel("max / mean (1.0 = even)")
    ax.legend()


def lmms_tasks(s: Series) -> dict[str, dict[str, Points]]:
    """lmms-eval series grouped by task ("mme/perception" -> task "mme", metric "perception"): one panel each,
    since tasks score in their own units (MME in the thousands, accuracies in 0..1) and one axis would flatten
    all but the largest."""
    tasks: dict[str, dict[str, Points]] = {}
    for name, points in sorted(s.lmms.items()):
        task, _, metric = name.partition("/")
        tasks.setdefault(task, {})[metric or task] = points
    return tasks


def _lmms_panel(ax: Axes, metrics: dict[str, Points]) -> None:
    for i, (metric, points) in enumerate(metrics.items()):
        linestyle, marker = STYLES[i % len(STYLES)]
        ax.plot(*_xy(points), color=f"C{i % 10}", linestyle=linestyle, marker=marker, label=metric)
    ax.set_ylabel("score (the task's own units)")
    ax.legend(title="metric", fontsize="small")


def _panels(s: Series) -> list[tuple[str, Callable[[Axes], None]]]:
    """(TITLES key, drawing function) for every panel this run gets, in reading order."""
    panels: list[tuple[str, Callable[[Axes], None]]] = [
        ("loss", lambda ax: _loss_panel(ax, s)),
        ("lr", lambda ax: _lr_panel(ax, s)),
        ("grad_norm", lambda ax: _single_panel(ax, s.grad_norm, "L2 norm", "no gradient norm logged")),
        ("tokens_per_s", lambda ax: _single_panel(ax, s.tokens_per_s, "tokens / s (all ranks)", "no tokens/s")),
    ]
    if s.mfu:
        panels.append(("mfu", lambda ax: _single_panel(ax, s.mfu, "MFU (% of peak)", "", scale=100.0)))
    panels.append(("data_wait", lambda ax: _single_panel(
        ax, s.data_wait_share, "share of step time (%)", "no data-wait share logged", scale=100.0)))  # fmt: skip
    if s.imbalance:
        panels.append(("imbalance", lambda ax: _imbalance_panel(ax, s)))
    for task, metrics in lmms_tasks(s).items():
        panels.append((f"lmms:{task}", lambda ax, m=metrics: _lmms_panel(ax, m)))
    return panels


def panel_title(key: str) -> str:
    """TITLES[key]; lmms-eval panels ("lmms:TASK") are titled by their task."""
    kind, _, task = key.partition(":")
    return f"{TITLES[kind]}: {task}" if task else TITLES[key]


def build_figure(series: Series, title: str = "") -> Figure:
    """The report as a matplotlib Figure (not drawn to any screen): two panels a row, an odd last panel
    spanning the row. Each axis carries its TITLES entry as its title, so callers can find panels by it."""
    panels = _panels(series)
    rows = -(-len(panels) // 2)
    fig = Figure(figsize=(2 * PANEL_INCHES[0], rows * PANEL_INCHES[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, 2)
    for i, (key, draw) in enumerate(panels):
        row, col = divmod(i, 2)
        ax = fig.add_subplot(grid[row, :] if i == len(panels) - 1 and col == 0 else grid[row, col])
        ax.set_title(panel_title(key))
        draw(ax)
        if ax.has_data():
            ax.set_xlabel(STEP_LABEL)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, which="major", alpha=0.3)
        if key == "tokens_per_s":
            ax.yaxis.set_major_formatter(EngFormatter())
        elif key in ("mfu", "data_wait") and ax.has_data():
            ax.yaxis.set_major_formatter(PercentFormatter())
    if title:
        fig.suptitle(title)
    return fig


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Draw RUN/metrics.jsonl to `out` (default RUN/report.png); returns the PNG's path."""
    run = Path(run)
    metrics_file = run / "metrics.jsonl"
    if not metrics_file.exists():
        raise FileNotFoundError(f"{metrics_file} not found: pass a run folder (train.run_dir) that has trained")
    series = read_series(metrics_file)
    last = series.loss[-1][0] if series.loss else None
    fig = build_figure(series, title=f"{run.resolve().name}" + (f" (step {last})" if last is not None else ""))
    out = Path(out) if out else run / "report.png"
    fig.savefig(out, format="png")
    return out
