"""`bench gpu --calibrate FILE`: measured seconds per tile, per token and per squared sample length, for balancing.

The packer balances ranks with a cost model of one sample (toolkit/data/cost.py). By default that model is the
sample's FLOPs, but FLOPs are a poor guide to time where kernels differ in efficiency (the ViT's short rows against
the decoder's long ones, a fused attention kernel against the matmuls). This benchmark times the training
backend's own forward + backward (what `rank_time_imbalance` measures) on packs that vary the three terms
independently: image tiles per row, packed samples per row (the attention term), and rows per batch (tokens).
A least-squares fit of `time = per_tile x tiles + per_token x tokens + per_token_sq x sum(length^2) + per_step`
gives the coefficients, written as the JSON that `data.cost_calibration=FILE` reads. The constant per-step term is
fitted so that launch overhead does not leak into the per-token figure; balancing does not need it, since every
rank pays it.

Rows are filled exactly (no padding), as the packer fills them to within a fraction of a percent. Every design point
is timed `repeats` times after `warmup` untimed calls and the median is kept.
"""

from __future__ import annotations

import itertools
import json
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from toolkit.bench.gpu import make_batch, sync_device
from toolkit.config import Config
from toolkit.data.batch import Batch
from toolkit.data.cost import SampleCost
from toolkit.errors import UserError

log = logging.getLogger(__name__)
NOISY_R2 = 0.9  # below this the fit explains too little of the timings to balance by

Timer = Callable[[Batch], float]  # seconds of one forward + backward of a batch


def design_rows(cfg: Config, *, tiles: int, samples: int) -> list[tuple[int, int, int]]:
    """One full row: an image of `tiles` tiles in the first of `samples` samples, text filling the rest exactly."""
    capacity, per_tile = cfg.model.lm_max_length, cfg.model.mp_image_token_length
    text = capacity - tiles * per_tile
    if text < samples:
        raise ValueError(f"{tiles} tiles leave no room for {samples} samples in a {capacity}-token row")
    shares = [text // samples + (i < text % samples) for i in range(samples)]
    return [(tiles if i == 0 else 0, share, int(tiles > 0 and i == 0)) for i, share in enumerate(shares)]


def design_points(cfg: Config) -> list[dict[str, int]]:
    """Rows per batch x tiles per row x samples per row: each term varies while the others stay put."""
    capacity, per_tile = cfg.model.lm_max_length, cfg.model.mp_image_token_length
    most = min(17, (capacity // 2) // per_tile)  # an image of at most 17 tiles filling at most half the row
    tile_counts = sorted({0, max(1, most // 2), most})
    return [
        {"rows": rows, "tiles_per_row": tiles, "samples": samples}
        for rows, tiles, samples in itertools.product((1, 2), tile_counts, (1, 4))
    ]


TERMS = ("seconds_per_tile", "seconds_per_token", "seconds_per_token_sq", "seconds_per_step")


def fit(points: list[dict[str, float]]) -> dict[str, float]:
    """Least squares of seconds on tiles, tokens, sum of squared lengths and a constant (float64).

    The three cost terms are kept non-negative (a term whose fit comes out negative, which only noise can cause,
    is dropped and the rest refitted), since a negative cost would have the packer chase the wrong rows.
    """
    x = torch.tensor([[p["tiles"], p["tokens"], p["sum_sq"], 1.0] for p in points], dtype=torch.float64)
    y = torch.tensor([p["seconds"] for p in points], dtype=torch.float64)
    scale = x.abs().amax(dim=0).clamp(min=1e-30)  # columns span 1 to ~1e7: solve on unit-scaled ones
    active = [0, 1, 2, 3]
    while True:
        cols = x[:, active] / scale[active]
        solution = torch.linalg.lstsq(cols, y[:, None], driver="gelsd").solution.flatten() / scale[active]
        negative = [(float(c), i) for c, i in zip(solution, active, strict=True) if i < 3 and c < 0]
        if not negative:
            break
        active.remove(min(negative)[1])
    coef = torch.zeros(4, dtype=torch.float64)
    coef[active] = solution
    fitted = x @ coef
    total = float(((y - y.mean()) ** 2).sum())
    residual = float(((fitted - y) ** 2).sum())
    return {
        **dict(zip(TERMS, coef.tolist(), strict=True)),
        "r2": 1.0 - residual / total if total > 0 else 1.0,
        "fitted": fitted.tolist(),
    }


def backend_timer(cfg: Config, device: torch.device, *, seed: int, warmup: int, repeats: int) -> tuple[Timer, Any]:
    """The `single` backend's forward + backward as the trainer runs it (kernels, checkpointing, compile alike)."""
    from toolkit.bench.overhead import new_model
    from toolkit.train.backends import build_backend
    from toolkit.train.optim import param_groups
    from toolkit.train.schedule import schedule_from_config

    model = new_model(cfg, seed, device)
    backend = build_backend(cfg, device=device)
    backend.setup(model, param_groups(model, cfg.train), schedule_from_config(cfg.train))

    def once(batch: Batch) -> float:
        sync_device(device)
        started = time.perf_counter()
        backend.forward_backward(batch, 1.0 / max(batch.stats.targets, 1))
        sync_device(device)
        seconds = time.perf_counter() - started
        backend.step(skip=True)  # drops the gradients, untimed: the optimizer costs every rank the same
        return seconds

    def timed(batch: Batch) -> float:
        for _ in range(warmup):
            once(batch)
        return statistics.median(once(batch) for _ in range(repeats))

    return timed, backend


def calibrate(cfg: Config, device: torch.device, timer: Timer, *, seed: int = 0) -> tuple[list[dict], dict[str, float]]:
    """Time every design point with `timer`; the table rows and the fitted coefficients."""
    gen = torch.Generator().manual_seed(seed)
    points = []
    for point in design_points(cfg):
        row = design_rows(cfg, tiles=point["tiles_per_row"], samples=point["samples"])
        batch = make_batch(cfg, [row] * point["rows"], gen, device)
        stats = batch.stats  # the batch's totals, over its rows: what the fit regresses on
        sum_sq = float(sum(n * n for n in stats.sample_lengths))
        points.append(
            {**point, "tiles": stats.tiles, "tokens": stats.tokens, "sum_sq": sum_sq, "seconds": timer(batch)}
        )
    return points, fit(points)


def _row(point: dict[str, Any], fitted: float) -> dict[str, Any]:
    shape = {"rows": point["rows"], "tiles_per_row": point["tiles_per_row"], "samples_per_row": point["samples"]}
    return {**shape, "tokens": point["tokens"], "measured_ms": 1e3 * point["seconds"], "fitted_ms": 1e3 * fitted}


def run(
    cfg: Config, device: torch.device, out_file: str | Path, *, seed: int = 0, warmup: int = 2, repeats: int = 5
) -> dict[str, Any]:
    """Measure, fit and write the calibration file; rows compare measured with fitted time per design point."""
    timer, backend = backend_timer(cfg, device, seed=seed, warmup=warmup, repeats=repeats)
    try:
        with warnings.catch_warnings():  # the skipped steps advance the LR schedule with no optimizer step
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
            points, coef = calibrate(cfg, device, timer, seed=seed)
    finally:
        backend.close()
    if coef["r2"] < NOISY_R2 or min(coef[t] for t in TERMS[:2]) <= 0:
        log.warning(
            "bench gpu --calibrate: the fit is poor (r2 %.3f, per tile %.3g s, per token %.3g s); the timings are "
            "noisy. Rerun on an idle device with more --steps before using %s",
            coef["r2"], coef["seconds_per_tile"], coef["seconds_per_token"], out_file,
        )  # fmt: skip
    calibration = {k: v for k, v in coef.items() if k != "fitted"}
    fitted = SampleCost(*(calibration[t] for t in TERMS[:3]))
    if fitted.unusable():  # data.cost_calibration would refuse it: say so now, not at the training run's start
        raise UserError(
            f"bench gpu --calibrate: the fit {fitted.unusable()} (r2 {coef['r2']:.3f}), so {out_file} was not "
            "written; the timings are too noisy. Rerun on an idle device with more --steps"
        )
    flops = SampleCost.from_model(cfg.model)
    calibration.update(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        precision=cfg.backend.precision,
        attention_kernel=cfg.train.attention_kernel,
        activation_checkpointing=cfg.train.activation_checkpointing,
    )
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(calibration, indent=1) + "\n")
    rows = [_row(p, fitted) for p, fitted in zip(points, coef["fitted"], strict=True)]
    per_token = calibration["seconds_per_token"]
    headline = {
        "seconds_per_tile": calibration["seconds_per_tile"],
        "seconds_per_token": per_token,
        "seconds_per_token_sq": calibration["seconds_per_token_sq"],
        "r2": calibration["r2"],
        # What balancing cares about: a tile's cost in decoder tokens, timed against the FLOPs model's estimate.
        "tile_in_tokens_measured": calibration["seconds_per_tile"] / per_token if per_token > 0 else float("nan"),
        "tile_in_tokens_flops": flops.per_tile / flops.per_token,
        "written_to": str(out),
    }
    return {"name": "gpu", "rows": rows, "headline": headline}
