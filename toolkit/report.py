"""`python -m toolkit report RUN`: a PNG of loss, LR per group, grad norm, tokens/s and rank imbalance over steps.

For clusters without a TensorBoard port. Drawn with Pillow (already a dependency) rather than adding matplotlib
for a few line charts: each panel is a polyline scaled into a box, with min/max labels on the y axis.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

PANEL_W, PANEL_H, PAD = 560, 300, 48
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def read_series(metrics_file: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """metrics.jsonl -> {panel: {series: [(step, value), ...]}}."""
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {
        "loss": {}, "learning rate": {}, "grad norm": {}, "tokens/s": {}, "rank imbalance (max/mean)": {},
    }  # fmt: skip
    for line in metrics_file.read_text().splitlines():
        m = json.loads(line)
        step = m["step"]
        if "loss" in m:
            panels["loss"].setdefault("train", []).append((step, m["loss"]))
            panels["grad norm"].setdefault("pre-clip", []).append((step, m["grad_norm"]))
            panels["tokens/s"].setdefault("global", []).append((step, m["tokens_per_s"]))
            for name, key in (("estimated cost", "rank_cost_imbalance"), ("fwd+bwd time", "rank_time_imbalance")):
                if key in m:  # runs from before issue 14 have neither
                    panels["rank imbalance (max/mean)"].setdefault(name, []).append((step, m[key]))
            for group, lr in m.get("lr", {}).items():
                panels["learning rate"].setdefault(group, []).append((step, lr))
        if "val_loss" in m:
            panels["loss"].setdefault("validation", []).append((step, m["val_loss"]))
    return panels


def _finite(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    return [(s, v) for s, v in points if v == v and abs(v) != float("inf")]


def draw_panel(draw: ImageDraw.ImageDraw, origin: tuple[int, int], title: str, series: dict) -> None:
    x0, y0 = origin
    left, top, right, bottom = x0 + PAD, y0 + PAD // 2, x0 + PANEL_W - 12, y0 + PANEL_H - PAD // 2
    draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    draw.text((left, y0 + 4), title, fill=(0, 0, 0))
    points = [p for pts in series.values() for p in _finite(pts)]
    if not points:
        draw.text((left + 10, top + 10), "no data", fill=(120, 120, 120))
        return
    smin, smax = min(s for s, _ in points), max(s for s, _ in points)
    vmin, vmax = min(v for _, v in points), max(v for _, v in points)
    span_s, span_v = max(smax - smin, 1), (vmax - vmin) or 1.0
    draw.text((x0 + 2, top), f"{vmax:.3g}", fill=(0, 0, 0))
    draw.text((x0 + 2, bottom - 10), f"{vmin:.3g}", fill=(0, 0, 0))
    draw.text((left, bottom + 4), f"step {smin}", fill=(0, 0, 0))
    draw.text((right - 70, bottom + 4), f"step {smax}", fill=(0, 0, 0))
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        xy = [
            (left + (s - smin) / span_s * (right - left), bottom - (v - vmin) / span_v * (bottom - top))
            for s, v in _finite(pts)
        ]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        elif xy:
            draw.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=colour)
        draw.text((right - 110, top + 6 + 12 * i), name, fill=colour)


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    run = Path(run)
    metrics_file = run / "metrics.jsonl"
    if not metrics_file.exists():
        raise FileNotFoundError(f"{metrics_file} not found: pass a run folder (train.run_dir) that has trained")
    panels = read_series(metrics_file)
    image = Image.new("RGB", (2 * PANEL_W, -(-len(panels) // 2) * PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    for i, (title, series) in enumerate(panels.items()):
        draw_panel(draw, ((i % 2) * PANEL_W, (i // 2) * PANEL_H), title, series)
    out = Path(out) if out else run / "report.png"
    image.save(out)
    return out
