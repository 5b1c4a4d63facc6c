"""`bench balance`: compute per rank and synchronisation, with and without cost-balanced packing.

A synchronous data-parallel step lasts as long as its costliest rank. Each simulated rank packs its own stream of a
VLM mix (70% one image of 1-17 tiles, text ~200 tokens) at a 32-pack buffer, twice on the same items: token-only
(`pack_stream` without `cost`, the baseline) and with `cost=` the nanovlm-450m cost model (toolkit/data/cost.py).
Ranks synchronise every 2 packs (the micro-step of FSDP2 and ZeRO-2/3, which reduce gradients at each one, at
`train.batch_size=2`) or every 8 (the 450m preset's optimizer step under DDP). Per synchronisation, max/mean of the
ranks' compute is how much longer the step takes than a perfectly balanced one; `step_time_ratio` = balanced max/mean
/ token-only max/mean is the step time of the same work, before any communication. The simulation is seeded, so
its figures do not depend on the machine; only `pack_time_ratio` (CPU time of the balanced packer / token-only,
interleaved rank by rank) is a timing.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from collections.abc import Iterator

from toolkit.config import load_config
from toolkit.data.cost import SampleCost
from toolkit.data.packing import pack_stream

Item = tuple[int, int, int, float]  # (tokens, images, tiles, cost)
TOKENS_PER_TILE = 64


def vlm_mix(seed: int, cost: SampleCost) -> Iterator[Item]:
    """Endless: 70% one image of 1..17 tiles x 64 tokens, the rest text only; text ~200 tokens (log-normal)."""
    rng = random.Random(seed)
    while True:
        tiles = rng.randint(1, 17) if rng.random() < 0.7 else 0
        tokens = TOKENS_PER_TILE * tiles + min(max(int(rng.lognormvariate(5.2, 0.5)), 16), 1500)
        yield tokens, int(tiles > 0), tiles, cost(tokens=tokens, tiles=tiles)


def rank_packs(items: Iterator[Item], n_packs: int, *, balanced: bool, **kw) -> tuple[list[tuple[int, float]], float]:
    """(tokens, cost) of the rank's first `n_packs` packs, and the seconds the packer took."""
    weigh = (lambda x: x[3]) if balanced else None
    packs = pack_stream(items, length=lambda x: x[0], images=lambda x: x[1], tiles=lambda x: x[2], cost=weigh, **kw)
    start = time.perf_counter()
    rows = list(itertools.islice(packs, n_packs))
    seconds = time.perf_counter() - start
    return [(sum(x[0] for x in row), sum(x[3] for x in row)) for row in rows], seconds


def max_over_mean(costs: list[list[float]], per_sync: int) -> list[float]:
    """Max/mean over ranks of each synchronisation's compute (`per_sync` consecutive packs of every rank)."""
    ratios = []
    for s in range(len(costs[0]) // per_sync):
        work = [sum(rank[s * per_sync : (s + 1) * per_sync]) for rank in costs]
        ratios.append(max(work) / statistics.fmean(work))
    return ratios


def simulate(ranks: int, n_packs: int, *, cost: SampleCost, seed: int, **kw) -> dict:
    """Both packers on every rank's stream; the streams are shared, so they pack exactly the same items."""
    runs = {"balanced": [], "token_only": []}
    seconds = dict.fromkeys(runs, 0.0)
    enough = (n_packs + kw["buffer_packs"] + 8) * kw["capacity"] // 400  # items: ~610 tokens each on average
    for rank in range(ranks):
        stream = vlm_mix(seed * 100_003 + rank, cost)
        mine, theirs = itertools.tee(itertools.chain(list(itertools.islice(stream, enough)), stream))
        for name, items in (("token_only", theirs), ("balanced", mine)):
            packs, took = rank_packs(items, n_packs, balanced=name == "balanced", **kw)
            runs[name].append(packs)
            seconds[name] += took
    out = {"pack_time_ratio": seconds["balanced"] / seconds["token_only"]}
    for name, packs in runs.items():
        out[name] = {"fill": sum(t for rank in packs for t, _ in rank) / (ranks * n_packs * kw["capacity"])}
        out[name]["costs"] = [[c for _, c in rank] for rank in packs]
    return out


def run(
    ranks: tuple[int, ...] = (64, 512),
    packs: tuple[int, ...] = (1024, 128),
    per_sync: tuple[int, ...] = (2, 8),
    buffer_packs: int = 32,
    preset: str = "nanovlm-450m",
    seed: int = 0,
) -> dict:
    """`packs[i]` packs per rank at `ranks[i]` ranks: the first ones are a run's start, where each rank's running mean
    cost (the balanced packer's target) is still settling, so the whole-run figure is the conservative one."""
    model = load_config(preset).model
    cost = SampleCost.from_model(model)
    kw = {"capacity": model.lm_max_length, "max_images": 18, "buffer_packs": buffer_packs}
    rows, headline = [], {}
    for n_ranks, n_packs in zip(ranks, packs, strict=True):
        sim = simulate(n_ranks, n_packs, cost=cost, seed=seed, **kw)
        for k in per_sync:
            mine = max_over_mean(sim["balanced"]["costs"], k)
            base = max_over_mean(sim["token_only"]["costs"], k)
            half = len(mine) // 2
            row = {
                "ranks": n_ranks,
                "packs_per_sync": k,
                "syncs": len(mine),
                "fill": sim["balanced"]["fill"],
                "token_only_fill": sim["token_only"]["fill"],
                "max_mean": statistics.fmean(mine),
                "token_only_max_mean": statistics.fmean(base),
                "step_time_ratio": statistics.fmean(mine) / statistics.fmean(base),
                "max_mean_2nd_half": statistics.fmean(mine[half:]),
                "token_only_2nd_half": statistics.fmean(base[half:]),
                "pack_time_ratio": sim["pack_time_ratio"],
            }
            rows.append(row)
            headline[f"max_mean@{n_ranks}x{k}"] = row["max_mean"]
            headline[f"token_only_max_mean@{n_ranks}x{k}"] = row["token_only_max_mean"]
        headline[f"fill@{n_ranks}"] = sim["balanced"]["fill"]
        headline[f"token_only_fill@{n_ranks}"] = sim["token_only"]["fill"]
    return {
        "name": "balance",
        "rows": rows,
        "headline": headline,
        "config": {
            "preset": preset,
            "ranks": list(ranks),
            "packs_per_rank": list(packs),
            "buffer_packs": buffer_packs,
            "seed": seed,
            "mix": "70% one image of 1-17 tiles, text lognormal(5.2, 0.5) tokens",
        },
    }
