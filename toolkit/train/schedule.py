"""nanoVLM's learning-rate schedule as a LambdaLR multiplier.

nanoVLM computes, for optimizer step `it` (0-based) and a group's peak `max_lr`:

    warmup_steps = max_steps * 0.03 (a float);  min_lr = 0.1 * max_lr
    it < warmup_steps:  max_lr * (it + 1) / warmup_steps
    it > max_steps:     min_lr
    otherwise:          min_lr + 0.5 * (1 + cos(pi * decay)) * (max_lr - min_lr),
                        decay = (it - warmup_steps) / (max_steps - warmup_steps)

Every term is proportional to `max_lr`, so the schedule is one multiplier applied to each group's own peak:
a LambdaLR over per-group base LRs keeps the projector's 100x higher peak where DeepSpeed's WarmupCosineLR,
which writes one LR into every group, would collapse them. One deliberate difference: when `warmup_steps` is
not a whole number, nanoVLM's last warmup step overshoots the peak ((it + 1) / warmup_steps > 1; up to 4x for a
run of a few steps); the multiplier here is capped at 1, which is identical whenever warmup_steps is whole.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from toolkit.config import TrainConfig


class WarmupCosine:
    """step -> LR multiplier; a plain object (not a lambda) so LambdaLR's state_dict can save it."""

    def __init__(self, max_steps: int, *, warmup_ratio: float = 0.03, min_lr_ratio: float = 0.1) -> None:
        if max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {max_steps}")
        self.max_steps = max_steps
        self.warmup_steps = max_steps * warmup_ratio
        self.min_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return min(1.0, (step + 1) / self.warmup_steps)
        if step > self.max_steps:
            return self.min_ratio
        decay = (step - self.warmup_steps) / (self.max_steps - self.warmup_steps)
        coeff = 0.5 * (1.0 + math.cos(math.pi * decay))
        return self.min_ratio + coeff * (1.0 - self.min_ratio)


def schedule_from_config(cfg: TrainConfig) -> WarmupCosine:
    return WarmupCosine(cfg.max_training_steps, warmup_ratio=cfg.warmup_ratio, min_lr_ratio=cfg.min_lr_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: WarmupCosine) -> LambdaLR:
    """One multiplier for every group: each group's LR is its own peak (its `lr` at build time) x schedule(step)."""
    return LambdaLR(optimizer, lr_lambda=schedule)


SCHEDULE_NAMES = {
    "max_steps": "train.max_training_steps",
    "warmup_steps": "warmup steps",
    "min_ratio": "train.min_lr_ratio",
}


def recipe_of(optimizer: torch.optim.Optimizer, scheduler: LambdaLR) -> dict:
    """The run's recipe as setup() built it from the config: each group's peak LR and weight decay, and the
    schedule's settings. Taken before a checkpoint loads, since the load puts the checkpoint's in their place."""
    return {
        "peaks": list(scheduler.base_lrs),
        "weight_decay": [group["weight_decay"] for group in optimizer.param_groups],
        "schedule": dict(vars(scheduler.lr_lambdas[0])),
    }


def apply_recipe(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, recipe: dict) -> list[str]:
    """After a checkpoint loaded: the config's recipe again, at the loaded step; what differed from the
    checkpoint's, for the log.

    LambdaLR's state holds the schedule object's fields (max_steps ...) and the peak LRs, and the optimizer's the
    groups' weight decay: a resume with a longer train.max_training_steps or another train.lr_* kept the old
    ones without a word, while config.yaml showed the new (an extended run trained on at the old curve's floor).
    Unchanged settings give the very LRs the checkpoint had: the same product, base x schedule(step)."""
    schedule, groups = scheduler.lr_lambdas[0], optimizer.param_groups
    loaded = recipe_of(optimizer, scheduler)
    changed = [
        f"{SCHEDULE_NAMES.get(name, name)} {loaded['schedule'][name]:g} -> {value:g}"
        for name, value in recipe["schedule"].items()
        if loaded["schedule"].get(name) != value
    ]
    for key, label in (("peaks", "peak LR"), ("weight_decay", "weight decay")):
        for group, before, after in zip(groups, loaded[key], recipe[key], strict=True):
            if before != after:
                changed.append(f"{group.get('name', 'group')} {label} {before:g} -> {after:g}")
    vars(schedule).update(recipe["schedule"])
    scheduler.base_lrs = list(recipe["peaks"])
    for group, peak, decay in zip(groups, recipe["peaks"], recipe["weight_decay"], strict=True):
        group.update(initial_lr=peak, weight_decay=decay, lr=peak * schedule(scheduler.last_epoch))
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports until the next step
    return changed
