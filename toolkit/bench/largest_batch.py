"""The largest micro-batch that trains without running out of device memory, chunked loss against dense loss.

`bench gpu`'s chunked-loss rows (issue 15). The chunked head + cross-entropy never holds the (B, S, V) fp32 logits
(a 4096-token row at the 450m vocabulary: 0.8 GB of logits, 3.2 GB with what the dense backward keeps), so the
memory it frees can hold more packed rows per micro-step, which is what lets a run drop activation checkpointing.
For each loss the search runs whole training steps of one variant (backend built afresh, a warm-up step and a
timed one) at a growing number of rows: doubling until a step runs out of memory or reaches the limit, then
bisecting between the last size that fit and the first that did not. The row reports the largest size, and the
tokens/s and peak memory of its timed step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

LOSSES = {"chunked": "train.chunked_loss=true", "dense": "train.chunked_loss=false"}


def largest(fits: Callable[[int], bool], *, limit: int) -> int:
    """The largest n in 1..limit with fits(n), for a `fits` that holds up to some size and fails above it; 0 when
    not even 1 fits. Doubling, then bisection: about 2 log2(answer) calls."""
    if limit < 1:
        raise ValueError(f"the limit must be at least 1, got {limit}")
    fit, failed, n = 0, limit + 1, 1  # fit: the largest size known to fit; failed: the smallest known not to
    while n <= limit:
        if not fits(n):
            failed = n
            break
        fit, n = n, 2 * n
    while failed - fit > 1:
        mid = (fit + failed) // 2
        fit, failed = (mid, failed) if fits(mid) else (fit, mid)
    return fit


def search_rows(
    label: str,
    measure: Callable[[int], dict[str, Any]],
    *,
    limit: int,
    release: Callable[[], None] = lambda: None,
    oom: type[BaseException] | None = None,
) -> dict[str, Any]:
    """One table row: the largest micro-batch at which `measure(rows)` (a timed step, a dict of figures) does not
    raise `oom` (torch.OutOfMemoryError), with that size's figures. Every other error propagates. `release` runs
    after each try, once the exception (whose traceback holds the failed step's tensors) is gone."""
    oom = oom or torch.OutOfMemoryError
    results: dict[int, dict[str, Any]] = {}
    tried: list[int] = []

    def fits(rows: int) -> bool:
        tried.append(rows)
        with contextlib.suppress(oom):
            results[rows] = measure(rows)
        release()  # after the with: a caught error's traceback, which holds the step's tensors, is gone by now
        return rows in results

    best = largest(fits, limit=limit)
    row: dict[str, Any] = {"variant": label, "batch_rows": best, "tried": tried}
    if best == 0:
        return {**row, "status": "failed: one row does not fit"}
    capped = " (the search limit)" if best == limit else ""
    return {**row, **results[best], "status": f"ok: largest micro-batch {best} rows{capped}"}
