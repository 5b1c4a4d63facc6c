"""`bench overhead`: the toolkit's `single` backend + Trainer step against a plain PyTorch loop doing the same work.

Both sides train their own copy of the tiny preset's model from the same initial weights on the same batches
(packed by the toolkit's loader from synthetic shards), fp32 on the CPU with one thread: AdamW with the same three
per-module groups and peak LRs, nanoVLM's warmup-cosine as a LambdaLR, clipping to train.max_grad_norm, and the
token-mean loss, read back as a Python float each step as any loop that logs does. The plain loop is written out
here independently of toolkit/train, so whatever the toolkit adds (the counts all-reduce, token weighting, skip
checks, metrics) is what the ratio measures.

The two alternate in blocks of steps after an untimed warm-up block each, so a noisy neighbour slows both alike;
the headline is the ratio of median step times. Losses of the two runs are compared as a check that they really
did the same work (they agree to float rounding).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.config import Config
from toolkit.data.batch import Batch
from toolkit.train.optim import fused_adamw_ok

GROUP_PREFIXES = (("mp", "MP."), ("vision", "vision_encoder."), ("language", "decoder."))


def loader_batches(n: int, *, seed: int, tmp: Path) -> tuple[Config, list[Batch]]:
    """`n` real batches of the tiny preset (train.batch_size packed rows each) from synthetic shards."""
    from toolkit.bench.pipeline import make_data
    from toolkit.data.loader import build_loader

    cfg = make_data(tmp, samples=max(200, 50 * n), seed=seed)
    cfg.backend.device, cfg.backend.precision = "cpu", "fp32"
    batches = []
    for batch in build_loader(cfg, rank=0, world=1, finite=True):
        batches.append(batch)
        if len(batches) == n:
            break
    return cfg, batches


def new_model(cfg: Config, seed: int, device: torch.device | None = None) -> nn.Module:
    """The preset's model with seeded random weights, built directly on `device` (a 450M model inits fast on GPU)."""
    from toolkit.model import VisionLanguageModel

    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        return VisionLanguageModel(cfg.model)


def toolkit_step(cfg: Config, seed: int) -> tuple[Callable[[Batch], float], nn.Module]:
    """One optimizer step through build_backend('single') + Trainer.train_step; returns the step's loss."""
    from toolkit.train.backends import build_backend
    from toolkit.train.optim import param_groups
    from toolkit.train.schedule import schedule_from_config
    from toolkit.train.trainer import Trainer

    model = new_model(cfg, seed)
    backend = build_backend(cfg)
    backend.setup(model, param_groups(model, cfg.train), schedule_from_config(cfg.train))
    trainer = Trainer(backend, cfg)
    return (lambda batch: trainer.train_step([batch])["loss"]), model


def warmup_cosine(max_steps: int, warmup_ratio: float, min_ratio: float) -> Callable[[int], float]:
    """nanoVLM's get_lr as a multiplier of each group's peak (capped at 1 at the end of a fractional warmup)."""
    warmup = max_steps * warmup_ratio

    def factor(it: int) -> float:
        if it < warmup:
            return min(1.0, (it + 1) / warmup)
        if it > max_steps:
            return min_ratio
        decay = (it - warmup) / (max_steps - warmup)
        return min_ratio + 0.5 * (1.0 + math.cos(math.pi * decay)) * (1.0 - min_ratio)

    return factor


def plain_step(
    cfg: Config, seed: int, device: torch.device | None = None
) -> tuple[Callable[[Batch], float], nn.Module]:
    """The same step as a plain loop: forward, token-mean loss, backward, clip, AdamW, LambdaLR.

    With backend.precision=bf16 the forward runs under autocast over fp32 weights, as a plain mixed-precision loop
    does (the `gpu` bench's baseline); batches are expected on `device` already.
    """
    model = new_model(cfg, seed, device)
    model.train()
    tc = cfg.train
    peaks = {"mp": tc.lr_mp, "vision": tc.lr_vision_backbone, "language": tc.lr_language_backbone}
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if n.startswith(prefix)], "lr": peaks[name]} for name, prefix in GROUP_PREFIXES
    ]
    params = [p for g in groups for p in g["params"]]
    fused = fused_adamw_ok(params)  # what a careful plain loop asks for, as the toolkit does
    optimizer = torch.optim.AdamW(groups, lr=tc.lr_mp, weight_decay=tc.weight_decay, fused=fused or None)
    factor = warmup_cosine(tc.max_training_steps, tc.warmup_ratio, tc.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    device_type = (device or torch.device("cpu")).type
    bf16 = cfg.backend.precision == "bf16"
    precision = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step(batch: Batch) -> float:
        with precision():
            out = model(**batch.inputs.as_kwargs())
        loss = out.loss_sum / (batch.inputs.labels != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return float(loss.detach())

    return step, model


def timed_step(step: Callable[[Batch], float], batch: Batch) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, loss) of one step."""
    wall, cpu = time.perf_counter(), time.process_time()
    loss = step(batch)
    return time.perf_counter() - wall, time.process_time() - cpu, loss


def interleave(
    steps: dict[str, Callable[[Batch], float]], batches: list[Batch], *, blocks: int, block: int, warmup: int
) -> dict[str, list[tuple[float, float, float]]]:
    """Alternate blocks of `block` steps between the runs; each run sees the same batch sequence.

    The first `warmup` steps of each run are taken (they update the weights, as in the other run) but not kept.
    Which run goes first alternates from block to block, so neither always follows the other's cache state.
    """
    names = list(steps)
    cursor = dict.fromkeys(names, 0)
    timings: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names}
    for b in range(-1, blocks):
        order = names if b % 2 == 0 else names[::-1]
        for name in order:
            for _ in range(warmup if b < 0 else block):
                timed = timed_step(steps[name], batches[cursor[name] % len(batches)])
                cursor[name] += 1
                if b >= 0:
                    timings[name].append(timed)
    return timings


def run(blocks: int = 12, block: int = 8, warmup: int = 4, n_batches: int = 8, seed: int = 0) -> dict:
    """Median step time of the toolkit against the plain loop over blocks x block steps each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
            cfg, batches = loader_batches(n_batches, seed=seed, tmp=Path(tmp))
        cfg.train.max_training_steps = warmup + blocks * block
        ours, _ = toolkit_step(cfg, seed)
        plain, _ = plain_step(cfg, seed)
        timings = interleave({"toolkit": ours, "plain": plain}, batches, blocks=blocks, block=block, warmup=warmup)
    finally:
        torch.set_num_threads(threads)
    return summarise(timings, cfg, n_batches=len(batches), seed=seed)


def summarise(timings: dict[str, list[tuple[float, float, float]]], cfg: Config, **config: Any) -> dict:
    """The result dict: median wall and CPU step times per loop, their ratios, and how far the losses drifted apart."""
    med = {
        n: (statistics.median(w for w, _, _ in t), statistics.median(c for _, c, _ in t)) for n, t in timings.items()
    }
    losses = {n: [loss for _, _, loss in t] for n, t in timings.items()}
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(losses["toolkit"], losses["plain"]))
    rows = [
        {
            "loop": name,
            "steps": len(timings[name]),
            "median_step_ms": 1e3 * med[name][0],
            "median_cpu_ms": 1e3 * med[name][1],
            "vs_plain": med[name][0] / med["plain"][0],
            "first_loss": losses[name][0],
            "last_loss": losses[name][-1],
        }
        for name in ("plain", "toolkit")
    ]
    return {
        "name": "overhead",
        "rows": rows,
        "headline": {
            "ratio": med["toolkit"][0] / med["plain"][0],
            "ratio_cpu": med["toolkit"][1] / med["plain"][1],
            "max_loss_rel_diff": loss_diff,
        },
        "config": {"preset": "tiny", "precision": "fp32", "threads": 1, "batch_size": cfg.train.batch_size, **config},
    }
