"""`shard-data --holdout N`: a validation split taken from the source itself, disjoint from training by key.

The held-out rows are spread evenly over the whole source (row floor(j * rows / N) for j < N), not its first N
rows: a source concatenated from subsets would otherwise hold out the first subset only. The choice is a pure
function of (rows, N), so every run, resumed or split into parts, holds out the same rows. A sample keeps its
key (its index in the whole source), so the two folders never share a key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from toolkit.data.prepare.sources import ShardDataError, Source


def holdout_count(spec: str, rows: int) -> int:
    """'5000' -> 5000 rows; '0.01' -> 1% of the rows (at least 1)."""
    try:
        value = float(spec) if "." in spec else int(spec)
    except ValueError:
        raise ShardDataError(f"--holdout {spec!r} is neither a row count (5000) nor a fraction (0.01)") from None
    count = max(1, round(value * rows)) if isinstance(value, float) else value
    if isinstance(value, float) and not 0 < value < 1:
        raise ShardDataError(f"--holdout {spec}: a fraction must be between 0 and 1")
    if not 0 < count < rows:
        raise ShardDataError(f"--holdout {spec} leaves no rows for training or none for validation ({rows} rows)")
    return count


def holdout_rows(rows: int, count: int) -> np.ndarray:
    """The held-out row indices: `count` rows evenly spread over `rows`, sorted."""
    return (np.arange(count, dtype=np.int64) * rows) // count


class Subset(Source):
    """Some rows of another source, in their order, each keeping its index in the whole source."""

    def __init__(self, base: Source, indices: np.ndarray, label: str) -> None:
        self.base, self.indices, self.label = base, np.asarray(indices, dtype=np.int64), label
        self.name, self.subsets, self.num_rows = base.name, list(base.subsets), len(self.indices)

    def rows(self, start: int, stop: int) -> Iterator[tuple[int, str, Any]]:
        wanted = self.indices[start:stop]
        if not len(wanted):
            return
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1  # read runs of consecutive rows in one go
        for run in np.split(wanted, breaks):
            yield from self.base.rows(int(run[0]), int(run[-1]) + 1)

    def row_sizes(self) -> np.ndarray:
        return self.base.row_sizes()[self.indices]

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.base.fingerprint().encode())
        digest.update(self.label.encode() + self.indices.tobytes())
        return digest.hexdigest()
