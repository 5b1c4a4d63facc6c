"""The streaming knapsack packer: samples of varying length -> rows of at most `capacity` tokens.

Design trade-off. nanoVLM packs with a balanced greedy knapsack over a fixed group of samples; the row count is fixed
first, so rows come out uneven. Here the buffer holds *items*, not open rows: whenever the pending items add up to
`buffer_packs` rows' worth of tokens, one row is built from the whole buffer, largest item that still fits first,
so its last gap is filled with the best-fitting item among ~buffer_packs x (items per row) candidates. This holds
the same memory as `buffer_packs` open rows and leaves gaps of a few tokens: >= 99.5% of token slots on a VLM-like
mix at 32 rows' worth, >= 99% at 8 (see tests/test_packing.py and `python -m toolkit bench packing`).

Bounds. An item that waits while `max_age_buffers x buffer_packs` rows are built goes first into the next row, so
every item leaves within that many buffers however unlucky its length. An item that cannot fit an empty row (more
tokens than `capacity`, more images than `max_images`) is the caller's error: `ValueError`, because dropping it here
would hide a data filter that belongs upstream (the loader drops and counts such samples before packing).

Resumable: `Packer.state()` is the pending items in arrival order with their ages; `Packer.restore()` rebuilds an
identical packer, so a resumed stream builds the same rows as an uninterrupted one.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_AGE_BUFFERS = 4


@dataclass
class _Pending(Generic[T]):
    item: T
    length: int
    images: int
    tiles: int
    born: int  # rows built before this item arrived


@dataclass
class PackerState(Generic[T]):
    """What a packer holds between rows: pending items (arrival order) and the number of rows built so far."""

    items: list[T]
    born: list[int]
    built: int


class Packer(Generic[T]):
    """Incremental form of `pack_stream`: `add()` items, get finished rows back; `flush()` at the end of input."""

    def __init__(
        self,
        *,
        length: Callable[[T], int],
        images: Callable[[T], int],
        capacity: int,
        max_images: int,
        buffer_packs: int,
        tiles: Callable[[T], int] | None = None,
        max_tiles: int = 0,
        max_age_buffers: int = MAX_AGE_BUFFERS,
    ) -> None:
        if capacity <= 0 or max_images < 0 or buffer_packs <= 0:
            raise ValueError(
                f"packing needs capacity > 0, buffer_packs > 0 and max_images >= 0, got {capacity}, {buffer_packs}, "
                f"{max_images}"
            )
        self.length, self.images, self.tiles = length, images, tiles
        self.capacity, self.max_images, self.max_tiles = capacity, max_images, max_tiles
        self.target = buffer_packs * capacity  # build a row whenever this many tokens are pending
        self.max_age = max_age_buffers * buffer_packs
        self._keys: list[tuple[int, int]] = []  # sorted (length, -seq): bisect finds the largest item that fits
        self._live: dict[int, _Pending[T]] = {}
        self._arrivals: deque[int] = deque()  # seqs in arrival order; removed ones are skipped lazily
        self._tokens = 0
        self._seq = 0
        self.built = 0

    def add(self, item: T) -> list[list[T]]:
        """Take one item; return the rows it completed (usually none or one)."""
        self._insert(item, self.built)
        rows = []
        while self._tokens >= self.target:
            rows.append(self._build())
        return rows

    def flush(self) -> list[list[T]]:
        """End of input: pack everything still pending."""
        rows = []
        while self._keys:
            rows.append(self._build())
        return rows

    def state(self) -> PackerState[T]:
        pending = [self._live[s] for s in self._arrivals if s in self._live]
        return PackerState(items=[p.item for p in pending], born=[p.born for p in pending], built=self.built)

    def restore(self, state: PackerState[T]) -> None:
        """Rebuild from `state()`; sequence numbers restart but keep their order, so tie-breaks are unchanged."""
        self._keys, self._live, self._arrivals = [], {}, deque()
        self._tokens = self._seq = 0
        self.built = state.built
        for item, born in zip(state.items, state.born, strict=True):
            self._insert(item, born)

    def __len__(self) -> int:
        return len(self._live)

    def _insert(self, item: T, born: int) -> None:
        length, images = self.length(item), self.images(item)
        tiles = self.tiles(item) if self.tiles else 0
        if length > self.capacity or images > self.max_images or (self.max_tiles and tiles > self.max_tiles):
            raise ValueError(
                f"item of {length} tokens, {images} images, {tiles} tiles cannot fit an empty pack "
                f"(capacity {self.capacity}, max_images {self.max_images}, max_tiles {self.max_tiles or 'none'}); "
                "drop such items before packing"
            )
        seq = self._seq
        self._seq += 1
        self._live[seq] = _Pending(item, length, images, tiles, born)
        self._arrivals.append(seq)
        bisect.insort(self._keys, (length, -seq))
        self._tokens += length

    def _build(self) -> list[T]:
        room = [self.capacity, self.max_images, self.max_tiles or 1 << 62]
        row = self._take_overdue(room)
        while self._keys:
            i = bisect.bisect_right(self._keys, (room[0], 1)) - 1
            while i >= 0 and not self._fits(self._live[-self._keys[i][1]], room):
                i -= 1  # the largest item that fits the tokens breaks an image limit: try the next smaller one
            if i < 0:
                break
            row.append(self._remove(-self._keys[i][1], room, index=i))
        self.built += 1
        return row

    def _take_overdue(self, room: list[int]) -> list[T]:
        """Items that waited `max_age` rows go first, oldest first, so none waits forever."""
        row = []
        while self._arrivals:
            seq = self._arrivals[0]
            pending = self._live.get(seq)
            if pending is None:
                self._arrivals.popleft()
                continue
            if self.built - pending.born < self.max_age or not self._fits(pending, room):
                break
            self._arrivals.popleft()
            row.append(self._remove(seq, room))
        return row

    @staticmethod
    def _fits(p: _Pending[T], room: list[int]) -> bool:
        return p.length <= room[0] and p.images <= room[1] and p.tiles <= room[2]

    def _remove(self, seq: int, room: list[int], index: int | None = None) -> T:
        p = self._live.pop(seq)
        if index is None:
            index = bisect.bisect_left(self._keys, (p.length, -seq))
        del self._keys[index]
        self._tokens -= p.length
        room[0] -= p.length
        room[1] -= p.images
        room[2] -= p.tiles
        return p.item


def pack_stream(
    items: Iterable[T],
    *,
    length: Callable[[T], int],
    images: Callable[[T], int],
    capacity: int,
    max_images: int,
    buffer_packs: int,
    tiles: Callable[[T], int] | None = None,
    max_tiles: int = 0,
) -> Iterator[list[T]]:
    """Pack any iterable into rows (lists of items) of at most `capacity` tokens and `max_images` images.

    Every item appears in exactly one row; rows come out in the order they are built. Raises `ValueError` for an
    item that cannot fit an empty row (see the module docstring).
    """
    packer: Packer[T] = Packer(
        length=length,
        images=images,
        capacity=capacity,
        max_images=max_images,
        buffer_packs=buffer_packs,
        tiles=tiles,
        max_tiles=max_tiles,
    )
    for item in items:
        yield from packer.add(item)
    yield from packer.flush()
