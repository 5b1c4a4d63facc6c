"""`bench packing`: fill and speed of pack_stream against nanoVLM's balanced greedy knapsack.

The baseline is re-implemented from nanoVLM's description: fill a buffer with about `buffer_packs` packs' worth of
samples, open ceil(total / capacity) + delta knapsacks (delta = 5), place samples longest first into the
least-loaded knapsack that still fits (tokens and images), open a new one when none fits, and emit every
knapsack of the buffer. Balancing spreads tokens thinly over the extra knapsacks and nothing carries over to the
next buffer, which is where its underfilled packs come from.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Iterator

from toolkit.data.packing import pack_stream

Item = tuple[int, int]  # (tokens, images)


def vlm_length_mix(n: int, seed: int = 0, *, tokens_per_tile: int = 64) -> list[Item]:
    """Mostly one image of 1..17 tiles x 64 tokens, some text-only or two-image samples, text ~200 tokens."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        n_images = rng.choices((0, 1, 2), weights=(5, 85, 10))[0]
        tiles = sum(rng.randint(1, 17) for _ in range(n_images))
        text = min(max(int(rng.lognormvariate(5.2, 0.5)), 16), 1500)
        items.append((tiles * tokens_per_tile + text, n_images))
    return items


def nanovlm_knapsack(
    items: Iterable[Item], *, capacity: int, max_images: int, buffer_packs: int, delta: int = 5, seed: int = 0
) -> Iterator[list[Item]]:
    rng = random.Random(seed)
    buffer: list[Item] = []
    filled = 0
    for item in items:
        buffer.append(item)
        filled += item[0]
        if filled >= buffer_packs * capacity:
            yield from _balanced(buffer, capacity, max_images, delta, rng)
            buffer, filled = [], 0
    if buffer:
        yield from _balanced(buffer, capacity, max_images, delta, rng)


def _balanced(buffer: list[Item], capacity: int, max_images: int, delta: int, rng: random.Random):
    n = -(-sum(t for t, _ in buffer) // capacity) + delta
    load, imgs, groups = [0] * n, [0] * n, [[] for _ in range(n)]
    for tokens, images in sorted(buffer, key=lambda x: x[0], reverse=True):
        target = next(
            (
                k
                for k in sorted(range(len(load)), key=load.__getitem__)
                if load[k] + tokens <= capacity and imgs[k] + images <= max_images
            ),
            None,
        )
        if target is None:
            load.append(0), imgs.append(0), groups.append([])
            target = len(load) - 1
        groups[target].append((tokens, images))
        load[target] += tokens
        imgs[target] += images
    rng.shuffle(groups)
    return [g for g in groups if g]


def measure(packer, items: list[Item], **kw) -> dict:
    start = time.perf_counter()
    packs = list(packer(items, **kw))
    seconds = time.perf_counter() - start
    used = sum(t for p in packs for t, _ in p)
    assert sorted(x for p in packs for x in p) == sorted(items), "a packer lost or duplicated items"
    return {"fill": used / (len(packs) * kw["capacity"]), "samples_per_s": len(items) / seconds, "packs": len(packs)}


def ours(items, *, capacity, max_images, buffer_packs):
    return pack_stream(
        items,
        length=lambda x: x[0],
        images=lambda x: x[1],
        capacity=capacity,
        max_images=max_images,
        buffer_packs=buffer_packs,
    )


def run(n: int = 100_000, capacity: int = 4096, max_images: int = 18, seed: int = 0) -> dict:
    items = vlm_length_mix(n, seed)
    rows, headline = [], {}
    for buffer_packs in (8, 32, 128):
        kw = {"capacity": capacity, "max_images": max_images, "buffer_packs": buffer_packs}
        base = measure(nanovlm_knapsack, items, **kw)
        mine = measure(ours, items, **kw)
        rows.append(
            {
                "buffer_packs": buffer_packs,
                "fill": mine["fill"],
                "nanovlm_fill": base["fill"],
                "fill_ratio": mine["fill"] / base["fill"],
                "samples_per_s": mine["samples_per_s"],
                "nanovlm_samples_per_s": base["samples_per_s"],
                "speed_ratio": mine["samples_per_s"] / base["samples_per_s"],
            }
        )
        headline[f"fill@{buffer_packs}"] = mine["fill"]
    headline["samples_per_s@32"] = rows[1]["samples_per_s"]
    return {
        "name": "packing",
        "rows": rows,
        "headline": headline,
        "config": {"items": n, "capacity": capacity, "max_images": max_images, "seed": seed},
    }
