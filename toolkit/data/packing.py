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

Balanced rows (`cost=`). A data-parallel step waits for its costliest rank, and a row full of image tiles costs
several times a text-heavy row of the same length. Given an additive `cost(item)` (the model's FLOPs of a sample),
each row aims at the stream's running mean row cost: (cost / tokens of every item added so far) x (mean tokens of
the rows built so far). The row is built in two steps, both within every limit above. Greedy: while the rest of
the row needs more than LEAN x the stream's cost per token, take the longest "heavy" item (costlier per token than
the stream), else the longest "light" one (LEAN < 1: a row's last, short items are mostly light), preferring items
of at most half the room so that the row ends up with items to trade. Swaps: up to SWAP_ROUNDS times, replace one
of the row's items by a pending item of about its length (or add one into the gap) where that lowers |cost left| +
FILL_WEIGHT x gap, cost above the target counting OVER times. The trade-off is fill: rows give up ~0.2% of token
slots for a row cost mostly within 1% of the target (`python -m toolkit bench balance`, tests/test_balance.py).
The target itself differs between ranks only by how far each rank's running mean is from the data's, which shrinks
as 1/sqrt(items seen). Without `cost` the rows are exactly the token-only ones.

Resumable: `Packer.state()` is the pending items in arrival order with their ages (and with `cost` the running sums
behind the target); `Packer.restore()` rebuilds an identical packer, so a resumed stream builds the same rows as an
uninterrupted one.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_AGE_BUFFERS = 4
# Balanced packing (`cost=`), tuned on `bench balance`'s mix (see the module docstring for the roles):
LEAN = 0.7  # take a costly item while the rest of the row needs more than LEAN x the stream's cost per token
PICK_SHARE = 0.5  # greedy picks prefer items of at most this share of the room left: more, smaller items to swap
SWAP_ROUNDS = 4  # swaps per row at most
SWAP_WINDOW = 192  # a swap may shorten the row by this many tokens at most
FILL_WEIGHT = 0.6  # a token of gap weighs as much as FILL_WEIGHT tokens' worth of cost (at the stream's rate)
OVER = 2.0  # cost above the target weighs OVER x cost below it: the slowest rank sets the step time
GOOD_ENOUGH = 0.003  # stop swapping within this share of a full row's cost


@dataclass
class _Pending(Generic[T]):
    item: T
    length: int
    images: int
    tiles: int
    born: int  # rows built before this item arrived
    cost: float = 0.0


@dataclass
class PackerState(Generic[T]):
    """What a packer holds between rows: pending items (arrival order) and the number of rows built so far.

    `balance` is what a packer with `cost` also carries: (cost, tokens) of every item added so far, whose ratio sets
    the rows' cost target; empty without `cost`, or from a state saved before balancing existed (the sums then
    restart from the pending items).
    """

    items: list[T]
    born: list[int]
    built: int
    balance: tuple[float, int] | tuple[()] = ()


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
        cost: Callable[[T], float] | None = None,
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
        self._keys: list[tuple] = []  # sorted (length, -seq): bisect finds the largest item that fits; + cost with it
        self._live: dict[int, _Pending[T]] = {}
        self._arrivals: deque[int] = deque()  # seqs in arrival order; removed ones are skipped lazily
        self._tokens = 0
        self._seq = 0
        self.built = 0
        self.cost = cost
        self._cost_in, self._tokens_in = 0.0, 0  # balanced packing: cost and tokens of every item added

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
        balance = (self._cost_in, self._tokens_in) if self.cost else ()
        return PackerState(
            items=[p.item for p in pending], born=[p.born for p in pending], built=self.built, balance=balance
        )

    def restore(self, state: PackerState[T]) -> None:
        """Rebuild from `state()`; sequence numbers restart but keep their order, so tie-breaks are unchanged."""
        self._keys, self._live, self._arrivals = [], {}, deque()
        self._tokens = self._seq = 0
        self._cost_in, self._tokens_in = 0.0, 0
        self.built = state.built
        for item, born in zip(state.items, state.born, strict=True):
            self._insert(item, born)
        if self.cost and state.balance:
            self._cost_in, self._tokens_in = state.balance

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
        cost = self._cost_of(item)
        seq = self._seq
        self._seq += 1
        self._live[seq] = pending = _Pending(item, length, images, tiles, born, cost)
        self._arrivals.append(seq)
        bisect.insort(self._keys, self._key(seq, pending))
        self._tokens += length
        self._cost_in += cost
        self._tokens_in += length

    def _key(self, seq: int, p: _Pending[T]) -> tuple:
        return (p.length, -seq, p.cost) if self.cost else (p.length, -seq)

    def _cost_of(self, item: T) -> float:
        if self.cost is None:
            return 0.0
        cost = float(self.cost(item))
        if not 0 <= cost < math.inf:
            raise ValueError(f"cost() returned {cost} for an item; balanced packing needs a finite cost >= 0")
        return cost

    def _build(self) -> list[T]:
        if self.cost is not None:
            return self._build_balanced()
        room = [self.capacity, self.max_images, self.max_tiles or 1 << 62, 0.0]
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

    def _take_overdue(self, room: list) -> list[T]:
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
    def _fits(p: _Pending[T], room: list) -> bool:
        return p.length <= room[0] and p.images <= room[1] and p.tiles <= room[2]

    def _remove(self, seq: int, room: list, index: int | None = None) -> T:
        p = self._live.pop(seq)
        if index is None:
            index = bisect.bisect_left(self._keys, (p.length, -seq))
        del self._keys[index]
        self._tokens -= p.length
        room[0] -= p.length
        room[1] -= p.images
        room[2] -= p.tiles
        room[3] -= p.cost
        return p.item

    def _put_back(self, seq: int, p: _Pending[T], room: list) -> None:
        """Undo `_remove` within the same row: the item keeps its place in arrival order (its seq)."""
        self._live[seq] = p
        bisect.insort(self._keys, self._key(seq, p))
        self._tokens += p.length
        room[0] += p.length
        room[1] += p.images
        room[2] += p.tiles
        room[3] += p.cost

    def _build_balanced(self) -> list[T]:
        """One row of about the stream's mean row cost: steer heavy/light picks, then swap toward the goal."""
        rho = self._cost_in / max(self._tokens_in, 1)  # the stream's cost per token so far
        done = self._tokens_in - self._tokens  # tokens already packed into rows
        target = rho * (done / self.built if self.built else self.capacity)  # the mean cost of a row
        room = [self.capacity, self.max_images, self.max_tiles or 1 << 62, target]
        forced = self._take_overdue(room)
        heavy = [k for k in self._keys if k[2] > rho * k[0]]  # by length: items costlier per token than the stream
        light = [k for k in self._keys if k[2] <= rho * k[0]]
        chosen: list[tuple[int, _Pending[T]]] = []
        while True:
            dense = room[3] > LEAN * rho * room[0]  # the rest of the row must be costlier per token than the stream
            keys, i = self._largest_fit(heavy if dense else light, room)
            if i < 0:
                keys, i = self._largest_fit(light if dense else heavy, room)
                if i < 0:
                    break
            seq = -keys.pop(i)[1]
            chosen.append((seq, self._live[seq]))
            self._remove(seq, room)
        self._swap(chosen, room, rho)
        self.built += 1
        return forced + [p.item for _, p in chosen]

    def _largest_fit(self, keys: list[tuple], room: list) -> tuple[list[tuple], int]:
        """`keys` and the index in it of its longest item that fits `room` (-1: none does)."""
        for limit in (int(room[0] * PICK_SHARE), room[0]):
            i = bisect.bisect_right(keys, (limit, 1)) - 1
            while i >= 0 and not self._fits(self._live[-keys[i][1]], room):
                i -= 1
            if i >= 0:
                return keys, i
        return keys, i

    def _swap(self, chosen: list[tuple[int, _Pending[T]]], room: list, rho: float) -> None:
        """Replace a picked item by a pending one of about its length (or add one to the gap) while that lowers
        |cost left| (x OVER when above the target) + FILL_WEIGHT x rho x tokens left, best move first."""
        weight = FILL_WEIGHT * rho
        good = GOOD_ENOUGH * rho * self.capacity
        for _ in range(SWAP_ROUNDS):
            miss = room[3]
            best, move = (miss if miss >= 0 else -OVER * miss) + weight * room[0], None
            if best <= good:
                return
            for k, (_, p) in enumerate([*chosen, (-1, None)]):
                if p is None:  # the empty slot: an item that fits the gap
                    length = images = tiles = 0
                    lo, left = room[0] - SWAP_WINDOW, room[3]
                else:
                    length, images, tiles = p.length, p.images, p.tiles
                    lo, left = length - SWAP_WINDOW, room[3] + p.cost  # cost left and room without p
                hi = length + room[0]
                i = bisect.bisect_left(self._keys, (lo, -(1 << 62)))
                j = bisect.bisect_right(self._keys, (hi, 1))
                for q_length, nseq, q_cost in self._keys[i:j]:
                    miss = left - q_cost
                    score = (miss if miss >= 0 else -OVER * miss) + weight * (hi - q_length)
                    if score < best:
                        q = self._live[-nseq]
                        if q.images - images <= room[1] and q.tiles - tiles <= room[2]:
                            best, move = score, (k, -nseq)
            if move is None:
                return
            k, seq = move
            if k < len(chosen):
                self._put_back(*chosen[k], room)
            new = (seq, self._live[seq])
            self._remove(seq, room)
            chosen[k : k + 1] = [new]


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
    cost: Callable[[T], float] | None = None,
) -> Iterator[list[T]]:
    """Pack any iterable into rows (lists of items) of at most `capacity` tokens and `max_images` images.

    Every item appears in exactly one row; rows come out in the order they are built. With `cost` (item -> float
    >= 0, additive over a row) rows also cost about the same (see the module docstring). Raises `ValueError` for an
    item that cannot fit an empty row.
    """
    packer: Packer[T] = Packer(
        length=length,
        images=images,
        capacity=capacity,
        max_images=max_images,
        buffer_packs=buffer_packs,
        tiles=tiles,
        max_tiles=max_tiles,
        cost=cost,
    )
    for item in items:
        yield from packer.add(item)
    yield from packer.flush()
