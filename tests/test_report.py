"""`report`: the PNG draws what metrics.jsonl holds, including issue 14's two rank-imbalance series."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from toolkit.report import COLOURS, PANEL_H, PANEL_W, read_series, write_report


def _write_run(run: Path, steps: int = 6, *, imbalance: bool = True) -> None:
    run.mkdir()
    lines = []
    for step in range(1, steps + 1):
        record = {"step": step, "loss": 5.0 - step * 0.5, "grad_norm": 1.0, "tokens_per_s": 100.0 * step,
                  "lr": {"mp": 1e-3, "language": 1e-4}}  # fmt: skip
        if imbalance:
            record |= {"rank_cost_imbalance": 1.0 + 0.01 * step, "rank_time_imbalance": 1.5 - 0.05 * step}
        lines.append(json.dumps(record))
    lines.append(json.dumps({"step": steps, "val_loss": 2.5}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_series_hold_every_logged_value(tmp_path) -> None:
    _write_run(tmp_path / "run")
    panels = read_series(tmp_path / "run" / "metrics.jsonl")
    imbalance = panels["rank imbalance (max/mean)"]
    assert imbalance["estimated cost"] == [(s, 1.0 + 0.01 * s) for s in range(1, 7)]
    assert imbalance["fwd+bwd time"] == [(s, 1.5 - 0.05 * s) for s in range(1, 7)]
    assert panels["loss"]["validation"] == [(6, 2.5)]
    assert set(panels["learning rate"]) == {"mp", "language"}


def _panel_colours(image: Image.Image, index: int) -> set[tuple[int, int, int]]:
    x0, y0 = (index % 2) * PANEL_W, (index // 2) * PANEL_H
    return set(image.crop((x0, y0, x0 + PANEL_W, y0 + PANEL_H)).getdata())


def test_png_draws_the_imbalance_panel(tmp_path) -> None:
    """Both imbalance lines appear in the fifth panel; a run logged before issue 14 gets an empty one."""
    for name, imbalance in (("new", True), ("old", False)):
        _write_run(tmp_path / name, imbalance=imbalance)
        image = Image.open(write_report(tmp_path / name))
        assert image.size == (2 * PANEL_W, 3 * PANEL_H)
        drawn = _panel_colours(image, 4)
        assert (COLOURS[0] in drawn and COLOURS[1] in drawn) == imbalance
        assert COLOURS[0] in _panel_colours(image, 0)  # the loss panel is drawn in both
