"""pack_stream / Packer: fill on a VLM-like mix, limits, exactly-once, bounded delay, resumable state."""

from __future__ import annotations

import random
from collections import Counter
from typing import NamedTuple

import pytest

from toolkit.data.packing import MAX_AGE_BUFFERS, Packer, pack_stream

CAPACITY = 4096


class Item(NamedTuple):
    id: int
    length: int
    images: int
    tiles: int


def vlm_mix(n: int, seed: int = 0) -> list[Item]:
    """Mostly one image of 64 tokens x (1..17) tiles plus ~200 text tokens; some text-only, some two images."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        u = rng.random()
        tiles = [rng.randint(1, 17)] if u < 0.85 else [] if u < 0.93 else [rng.randint(1, 17), rng.randint(1, 17)]
        text = max(16, int(rng.gauss(200, 60)))
        items.append(Item(i, text + 64 * sum(tiles), len(tiles), sum(tiles)))
    return items


def pack(items, buffer_packs: int, **kw) -> list[list[Item]]:
    args = {"capacity": CAPACITY, "max_images": 18, **kw}
    return list(
        pack_stream(items, length=lambda x: x.length, images=lambda x: x.images, buffer_packs=buffer_packs, **args)
    )


def fill(packs: list[list[Item]], capacity: int = CAPACITY) -> float:
    return sum(x.length for p in packs for x in p) / (len(packs) * capacity)


def assert_exactly_once(items: list[Item], packs: list[list[Item]]) -> None:
    counts = Counter(x.id for p in packs for x in p)
    assert set(counts) == {x.id for x in items}, "an item was lost"
    assert max(counts.values()) == 1, "an item was emitted twice"


@pytest.mark.parametrize(("buffer_packs", "target"), [(32, 0.99), (8, 0.985)])
def test_vlm_mix_fill_limits_and_exactly_once(buffer_packs: int, target: float) -> None:
    items = vlm_mix(20_000)
    packs = pack(items, buffer_packs)
    assert fill(packs) >= target, f"fill {fill(packs):.4f} at buffer {buffer_packs}"
    assert all(sum(x.length for x in p) <= CAPACITY for p in packs)
    assert all(sum(x.images for x in p) <= 18 for p in packs)
    assert_exactly_once(items, packs)


def test_image_limit_binds_and_text_fills_the_rest() -> None:
    items = vlm_mix(4000, seed=1)
    packs = pack(items, 16, max_images=2)
    assert max(sum(x.images for x in p) for p in packs) == 2
    assert all(sum(x.images for x in p) <= 2 for p in packs)
    assert_exactly_once(items, packs)
    # Text-only items go where images no longer may: rows with 2 images still take text-only items.
    assert any(sum(x.images for x in p) == 2 and any(x.images == 0 for x in p) for p in packs)


def test_tile_limit() -> None:
    items = vlm_mix(3000, seed=2)
    packs = list(
        pack_stream(
            items,
            length=lambda x: x.length,
            images=lambda x: x.images,
            tiles=lambda x: x.tiles,
            capacity=CAPACITY,
            max_images=18,
            max_tiles=34,
            buffer_packs=8,
        )
    )
    assert max(sum(x.tiles for x in p) for p in packs) <= 34
    assert_exactly_once(items, packs)


def test_every_item_leaves_within_a_bounded_number_of_buffers() -> None:
    """A 1-token item never fits any gap (every other item is exactly half a row); age alone must flush it."""
    buffer_packs, capacity = 4, 100
    items = [Item(0, 1, 0, 0)] + [Item(i, 50, 0, 0) for i in range(1, 2000)]
    packer = Packer(length=lambda x: x.length, images=lambda x: x.images, capacity=capacity, max_images=1,
                    buffer_packs=buffer_packs)  # fmt: skip
    arrived, left = {}, {}
    for item in items:
        arrived[item.id] = packer.built
        for row in packer.add(item):
            left.update({x.id: packer.built for x in row})
    delay = max(left[i] - arrived[i] for i in left)
    assert 0 in left, "the odd item stayed in the buffer until the end of input"
    assert delay <= (MAX_AGE_BUFFERS + 1) * buffer_packs


@pytest.mark.parametrize("cut", [1, 777, 3001])
def test_state_restore_gives_the_same_packs(cut: int) -> None:
    items = vlm_mix(4000, seed=3)

    def new() -> Packer:
        return Packer(length=lambda x: x.length, images=lambda x: x.images, capacity=CAPACITY, max_images=18,
                      buffer_packs=8)  # fmt: skip

    whole = pack(items, 8)
    first, rows = new(), []
    for item in items[:cut]:
        rows += first.add(item)
    state = first.state()
    assert len(state.items) == len(first) > 0
    resumed = new()
    resumed.restore(state)
    for item in items[cut:]:
        rows += resumed.add(item)
    rows += resumed.flush()
    assert rows == whole


def test_items_that_cannot_fit_an_empty_row_raise() -> None:
    with pytest.raises(ValueError, match="cannot fit an empty pack"):
        pack([Item(0, CAPACITY + 1, 0, 0)], 4)
    with pytest.raises(ValueError, match="cannot fit an empty pack"):
        pack([Item(0, 10, 3, 3)], 4, max_images=2)


def test_generic_items_and_short_input() -> None:
    """Any iterable of anything: plain ints are their own length; a short input still comes out whole."""
    packs = list(pack_stream(iter([5, 3, 9, 1]), length=int, images=lambda _: 0, capacity=10, max_images=0,
                             buffer_packs=2))  # fmt: skip
    assert sorted(x for p in packs for x in p) == [1, 3, 5, 9]
    assert all(sum(p) <= 10 for p in packs)
    assert len(packs) == 2  # 9+1 and 5+3: the best fit, not arrival order
