"""Validation loss over a backend: one pass of data.val_shards on every rank, token-weighted over all of them.

It lives in train/ because it drives the backend (a collective forward on every rank); evaluate.py keeps the
one-process evaluation of an exported model, which needs no backend.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from toolkit import dist
from toolkit.config import Config
from toolkit.data.loader import build_loader, sum_counts
from toolkit.data.tokenizer import VLMTokenizer
from toolkit.train.backends import Backend


@dataclass
class Validation:
    loss: float  # token mean over every rank's pass; NaN when the pass had no target tokens
    samples: dict  # {'read': n, 'skipped': {reason: n}} summed over ranks, as data-stats counts them


def validation_loss(backend: Backend, cfg: Config, tokenizer: VLMTokenizer, *, max_batches: int = 0) -> Validation:
    """Token-mean loss over one pass of data.val_shards, on every rank (collective).

    Ranks can finish a finite pass after different numbers of batches; a rank that has run out feeds an empty
    batch while any other still has data, because sharded backends need every rank in every forward.
    """
    env = backend.env
    loader = build_loader(cfg, rank=env.rank, world=env.world_size, tokenizer=tokenizer, split="val")
    stream, total, n = iter(loader), torch.zeros(2, dtype=torch.float64), 0
    while not max_batches or n < max_batches:
        batch = next(stream, None)
        live = dist.all_reduce_sum(torch.tensor([float(batch is not None)], device=backend.device))
        if float(live[0]) == 0:
            break
        loss_sum, targets = backend.eval_loss(batch if batch is not None else loader.empty_batch())
        total += torch.stack([loss_sum.double().cpu(), targets.double().cpu()])
        n += 1
    total = dist.all_reduce_sum(total.to(backend.device)).cpu()
    samples = sum_counts(dist.all_gather_object(loader.counts()))
    if float(total[1]) == 0:  # nothing to score: NaN, never a "best" loss of 0
        dist.log0("validation found no target tokens in data.val_shards (samples: %s)", samples, level=logging.WARNING)
        return Validation(float("nan"), samples)
    return Validation(float(total[0] / total[1]), samples)
