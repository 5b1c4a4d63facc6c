"""`report`: the figure's matplotlib objects hold exactly what a hand-written metrics.jsonl says.

The records mirror the trainer's keys (`loss`, `grad_norm`, `lr` per group, `tokens_per_s`, `data_wait_share`,
`mfu`, the two rank-imbalance keys, `val_loss`) plus lmms-eval records written out of step order, as scoring while
training writes them. Nothing here reads pixels except the PNG's size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from toolkit import __main__ as cli
from toolkit.errors import UserError
from toolkit.report import TITLES, build_figure, panel_title, read_series, write_report

STEPS = 150
SKIPPED_LOSS = {40: float("nan"), 43: None}  # skipped steps: NaN as runs wrote it before, null as they write it now
INF_GRAD_STEP = 41
VAL_STEPS = (30, 60, 90, 120, 150)
LONE_VAL = (45, 3.25)  # a val_loss record of its own, without train keys


def _loss(step: int) -> float:
    return 4.0 * math.exp(-step / 60) + 1.0 + 0.3 * math.sin(step * 1.7)


def _lr(step: int) -> dict[str, float]:
    scale = min(1.0, step / 10) * (0.5 + 0.5 * math.cos(math.pi * step / STEPS))
    return {"mp": 5e-3 * scale, "vision": 5e-5 * scale, "language": 5e-5 * scale}  # two groups share an LR


def _record(step: int, *, imbalance: bool, mfu: bool) -> dict:
    record = {"step": step, "loss": _loss(step), "grad_norm": 1.0 + step / 100, "lr": _lr(step),
              "tokens_per_s": 1000.0 + step, "data_wait_share": step / 1000, "step_time_s": 0.5}  # fmt: skip
    if step in SKIPPED_LOSS:
        record["loss"] = SKIPPED_LOSS[step]  # the report must not draw it
    if step == INF_GRAD_STEP:
        record["grad_norm"] = float("inf")
    if imbalance:
        record |= {"rank_cost_imbalance": 1.0 + step / 1000, "rank_time_imbalance": 1.2 - step / 1000}
    if mfu:
        record["mfu"] = None if step % 7 == 0 else 0.3 + step / 10000  # None: nothing to plot there
    if step in VAL_STEPS:
        record["val_loss"] = _loss(step) + 0.1
    return record


# lmms-eval scores land after later steps: (written after step, record)
LMMS = [
    (60, {"step": 50, "lmms/mmstar/average": 0.31, "lmms/ai2d/exact_match": 0.42}),
    (140, {"step": 100, "lmms/mmstar/average": 0.35, "lmms/ai2d/exact_match": 0.47}),
    (150, {"step": 25, "lmms/mmstar/average": 0.28, "lmms/ai2d/exact_match": 0.40}),
    (150, {"step": 150, "lmms/ai2d/exact_match": 0.5}),  # one task only
]


def _write_run(run: Path, *, imbalance: bool = True, mfu: bool = True, lmms: bool = True) -> Path:
    run.mkdir()
    lines = []
    for step in range(1, STEPS + 1):
        lines.append(json.dumps(_record(step, imbalance=imbalance, mfu=mfu)))
        if step == LONE_VAL[0]:
            lines.append(json.dumps({"step": LONE_VAL[0], "val_loss": LONE_VAL[1]}))
        lines += [json.dumps(r) for after, r in LMMS if lmms and after == step]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def _panel(fig, key: str):
    found = [ax for ax in fig.axes if ax.get_title() == panel_title(key)]
    assert len(found) == 1, [ax.get_title() for ax in fig.axes]
    return found[0]


def _lines(ax) -> dict[str, tuple[list, list]]:
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}


@pytest.fixture
def fig(tmp_path):
    return build_figure(read_series(_write_run(tmp_path / "run") / "metrics.jsonl"))


def _debiased_ema(values: list[float], span: int) -> list[float]:
    """Reference: each point is the mean of all points so far weighted decay^age (the EMA's closed form)."""
    decay = 1 - 1 / span
    x = np.asarray(values)
    out = []
    for t in range(len(x)):
        weights = decay ** np.arange(t, -1, -1)
        out.append(float((weights * x[: t + 1]).sum() / weights.sum()))
    return out


def test_loss_panel_is_log_with_raw_smoothed_and_validation(fig) -> None:
    ax = _panel(fig, "loss")
    assert ax.get_yscale() == "log"
    lines = _lines(ax)
    steps = [s for s in range(1, STEPS + 1) if s not in SKIPPED_LOSS]
    raw = [_loss(s) for s in steps]
    assert lines["train (raw)"] == (steps, raw)
    (smoothed,) = [v for k, v in lines.items() if k.startswith("train (EMA")]
    assert smoothed[0] == steps
    assert smoothed[1] == pytest.approx(_debiased_ema(raw, span=148 // 30), rel=1e-12)  # 148 finite losses
    assert smoothed[1] != pytest.approx(raw)  # it does smooth
    val_steps = sorted([*VAL_STEPS, LONE_VAL[0]])
    expected_val = [LONE_VAL[1] if s == LONE_VAL[0] else _loss(s) + 0.1 for s in val_steps]
    assert lines["validation"] == (val_steps, expected_val)
    assert ax.get_lines()[-1].get_linestyle() == "None" and ax.get_lines()[-1].get_marker() == "o"


def test_lr_panel_has_one_distinct_line_per_group(fig) -> None:
    ax = _panel(fig, "lr")
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines] == ["mp", "vision", "language"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mp", "vision", "language"]
    for ln in lines:
        assert list(ln.get_xdata()) == list(range(1, STEPS + 1))
        assert list(ln.get_ydata()) == [_lr(s)[ln.get_label()] for s in range(1, STEPS + 1)]
    assert len({(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in lines}) == 3
    assert len({ln.get_linestyle() for ln in lines}) == 3 and len({ln.get_marker() for ln in lines}) == 3
    assert ax.get_yscale() == "log"  # mp's LR is 100x the backbones'


def test_lr_panel_stays_log_with_a_frozen_group(tmp_path) -> None:
    """A frozen vision tower (LR 0, a projector-alignment stage) turned the axis linear, the language curve lying
    on the frozen line at 0 under the projector's 100x larger one."""
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": s, "loss": 1.0, "lr": {**_lr(s), "vision": 0.0}} for s in range(1, STEPS + 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ax = _panel(build_figure(read_series(run / "metrics.jsonl")), "lr")
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mp", "vision (0: frozen)", "language"]


def test_step_panels_skip_nan_inf_and_none(fig) -> None:
    (grad,) = _lines(_panel(fig, "grad_norm")).values()
    assert grad == ([s for s in range(1, STEPS + 1) if s != INF_GRAD_STEP],
                    [1.0 + s / 100 for s in range(1, STEPS + 1) if s != INF_GRAD_STEP])  # fmt: skip
    (tokens,) = _lines(_panel(fig, "tokens_per_s")).values()
    assert tokens == (list(range(1, STEPS + 1)), [1000.0 + s for s in range(1, STEPS + 1)])
    (wait,) = _lines(_panel(fig, "data_wait")).values()
    assert wait[1] == pytest.approx([s / 10 for s in range(1, STEPS + 1)])  # percent of step time
    (mfu,) = _lines(_panel(fig, "mfu")).values()
    kept = [s for s in range(1, STEPS + 1) if s % 7]
    assert mfu[0] == kept and mfu[1] == pytest.approx([100 * (0.3 + s / 10000) for s in kept])
    imbalance = _lines(_panel(fig, "imbalance"))
    assert imbalance["estimated cost"][1] == pytest.approx([1.0 + s / 1000 for s in range(1, STEPS + 1)])
    assert imbalance["measured forward time"][1] == pytest.approx([1.2 - s / 1000 for s in range(1, STEPS + 1)])


def test_lmms_panels_one_per_task_with_the_records_sorted_by_step(fig) -> None:
    """Each task in its own panel (its own units), each of its metrics a line over the export steps."""
    assert _lines(_panel(fig, "lmms:ai2d")) == {"exact_match": ([25, 50, 100, 150], [0.40, 0.42, 0.47, 0.5])}
    assert _lines(_panel(fig, "lmms:mmstar")) == {"average": ([25, 50, 100], [0.28, 0.31, 0.35])}
    assert panel_title("lmms:mmstar") == "lmms-eval: mmstar"


def test_every_drawn_axis_has_labels_and_ticks(fig) -> None:
    for ax in fig.axes:
        assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel(), ax.get_title()
        assert len(ax.get_xticks()) > 1 and len(ax.get_yticks()) > 1, ax.get_title()


def test_optional_panels_only_when_logged(tmp_path) -> None:
    """A CPU run before issue 14: no MFU, no rank imbalance, no lmms-eval scores -> no such panels."""
    run = _write_run(tmp_path / "old", imbalance=False, mfu=False, lmms=False)
    titles = {ax.get_title() for ax in build_figure(read_series(run / "metrics.jsonl")).axes}
    assert titles == {TITLES[k] for k in ("loss", "lr", "grad_norm", "tokens_per_s", "data_wait")}


def test_panel_without_data_says_so(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "val_loss": 2.0}) + "\n")
    fig = build_figure(read_series(run / "metrics.jsonl"))
    ax = _panel(fig, "lr")
    assert not ax.get_lines() and [t.get_text() for t in ax.texts] == ["no learning rate logged"]
    assert _lines(_panel(fig, "loss")) == {"validation": ([1], [2.0])}


def test_png_is_written_at_the_figure_size(tmp_path) -> None:
    """640 x 360 px a panel (6.4 x 3.6 in at 100 dpi), two a row: 9 panels (two lmms-eval tasks) = 5 rows, 5 panels
    = 3 rows."""
    full = _write_run(tmp_path / "full")
    assert write_report(full) == full / "report.png"
    with Image.open(full / "report.png") as image:
        assert (image.format, image.size) == ("PNG", (1280, 1800))
    old = _write_run(tmp_path / "old", imbalance=False, mfu=False, lmms=False)
    assert cli.main(["report", str(old), "--out", str(tmp_path / "elsewhere.png")]) == 0
    with Image.open(tmp_path / "elsewhere.png") as image:
        assert (image.format, image.size) == ("PNG", (1280, 1080))
    assert not (old / "report.png").exists()


def test_bad_lines(tmp_path) -> None:
    """A last line cut off mid-write (training still running) is ignored; a broken line elsewhere is an error."""
    run = _write_run(tmp_path / "run", lmms=False)
    path = run / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 151, "lo')
    assert read_series(path).loss[-1][0] == STEPS
    path.write_text('{"step": 1, "lo\n' + path.read_text())
    with pytest.raises(UserError, match=r"metrics.jsonl:1 is not JSON"):
        read_series(path)
    path.write_text('{"loss": 1.0}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:1 has no integer 'step'"):
        read_series(path)
    with pytest.raises(FileNotFoundError, match="pass a run folder"):
        write_report(tmp_path / "nowhere")


def test_report_out_a_folder_writes_inside_it_and_a_non_png_name_is_refused(tmp_path, capsys) -> None:
    """`--out outdir/` wrote a file named outdir, and `--out rep.pdf` wrote PNG bytes under a .pdf name."""
    from toolkit import __main__ as cli

    run = _write_run(tmp_path / "run")
    assert cli.main(["report", str(run), "--out", str(tmp_path / "plots") + "/"]) == 0
    assert (tmp_path / "plots" / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["report", str(run), "--out", str(tmp_path / "rep.pdf")]) == 2
    assert "is a PNG image" in capsys.readouterr().err and not (tmp_path / "rep.pdf").exists()
    assert cli.main(["report", str(run), "--out", str(tmp_path / "new" / "dir" / "r.png")]) == 0  # was Errno 2
    assert (tmp_path / "new" / "dir" / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_several_runs_share_axes_and_each_gets_a_summary_line(tmp_path, capsys) -> None:
    """`report RUN1 RUN2` was 'unrecognized arguments': comparing backends or mixes meant flipping between images
    with different axes. Each run is one line per panel, named by its folder (with its parent where two are alike)."""
    from toolkit.report_compare import PANELS, build_comparison, run_names, summary

    a = _write_run(tmp_path / "a")
    (tmp_path / "other").mkdir()
    b = _write_run(tmp_path / "other" / "a", mfu=False)  # same folder name
    records = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    for r in records:  # run b: twice the loss, half the throughput
        scaled = {"loss": 2, "val_loss": 2, "tokens_per_s": 0.5}
        r.update({k: r[k] * f for k, f in scaled.items() if r.get(k) is not None})
    (b / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    names = run_names([a, b])
    assert names == ["tmp_path_name/a".replace("tmp_path_name", tmp_path.name), "other/a"]
    series = {name: read_series(run / "metrics.jsonl") for name, run in zip(names, [a, b], strict=True)}
    fig = build_comparison(series)
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert set(axes) == set(PANELS.values())  # MFU: run a logged it
    tokens = _lines(axes[PANELS["tokens_per_s"]])
    assert tokens[names[0]][1] == [1000.0 + s for s in range(1, STEPS + 1)]
    assert tokens[names[1]][1] == [(1000.0 + s) / 2 for s in range(1, STEPS + 1)]
    losses = [s_ for s_ in range(1, STEPS + 1) if s_ not in SKIPPED_LOSS]
    row = summary(series[names[1]])
    assert row["steps"] == STEPS and row["best_val_step"] == max(VAL_STEPS)  # the loss falls: the last is best
    assert row["best_val_loss"] == pytest.approx(2 * (_loss(max(VAL_STEPS)) + 0.1))
    assert row["train_loss"] == pytest.approx(_debiased_ema([2 * _loss(s) for s in losses], len(losses) // 30)[-1])
    assert row["median_tokens_per_s"] == pytest.approx((1000.0 + (1 + STEPS) / 2) / 2)
    assert row["median_mfu"] is None and summary(series[names[0]])["median_mfu"] is not None
    assert cli.main(["report", str(a), str(b), "--out", str(tmp_path / "cmp.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith(f"other/a: {STEPS} steps, train loss ") and out[1].endswith("tok/s, MFU -")
    assert out[0].endswith("%") and f"best val {_loss(max(VAL_STEPS)) + 0.1:.4f} (step {max(VAL_STEPS)})" in out[0]
    assert Image.open(tmp_path / "cmp.png").size[0] > 0
