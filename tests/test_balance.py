"""Balanced packing (`cost=`): every limit kept, every item once, deterministic, resumable, and rows of equal cost.

The cost model is checked against `step_flops` (what MFU counts), and the token-only packer against a digest of the
rows it built before balancing existed, so `data.balance=false` really is yesterday's packing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import statistics
from collections import Counter
from typing import NamedTuple

import pytest
import shardgen
import torch
from shardgen import tiny_config

from toolkit.bench import calibrate
from toolkit.bench.balance import max_over_mean, vlm_mix
from toolkit.config import ConfigError, load_config
from toolkit.data.cost import SampleCost, sample_cost
from toolkit.data.loader import build_loader, stream_states
from toolkit.data.packing import MAX_AGE_BUFFERS, Packer, pack_stream
from toolkit.train.metrics import step_flops

CAPACITY = 4096
COST = SampleCost.from_model(load_config("nanovlm-450m").model)


class Item(NamedTuple):
    id: int
    length: int
    images: int
    tiles: int
    cost: float


def mixed(n: int, seed: int, kind: str) -> list[Item]:
    """'vlm': 70% one image of 1-17 tiles; 'multi': up to two images; 'skewed': mostly text, some near-full rows."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        if kind == "vlm":
            grids = [rng.randint(1, 17)] if rng.random() < 0.7 else []
        elif kind == "multi":
            grids = [rng.randint(1, 12) for _ in range(rng.choice((0, 1, 2)))]
        else:
            grids = [rng.randint(30, 60)] if rng.random() < 0.05 else []
        text = min(max(int(rng.lognormvariate(5.2, 0.7)), 1), 1500)
        length = min(64 * sum(grids) + text, CAPACITY)
        items.append(Item(i, length, len(grids), sum(grids), COST(tokens=length, tiles=sum(grids))))
    return items


def packer(buffer_packs: int, *, cost: bool = True, **kw) -> Packer[Item]:
    limits = {"capacity": CAPACITY, "max_images": 18, **kw}
    return Packer(length=lambda x: x.length, images=lambda x: x.images, tiles=lambda x: x.tiles,
                  cost=(lambda x: x.cost) if cost else None, buffer_packs=buffer_packs, **limits)  # fmt: skip


def pack(items: list[Item], buffer_packs: int, **kw) -> list[list[Item]]:
    p = packer(buffer_packs, **kw)
    rows = [row for item in items for row in p.add(item)]
    return rows + p.flush()


def row_costs(rows: list[list[Item]]) -> list[float]:
    return [sum(x.cost for x in row) for row in rows]


# -- the cost model ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "nanovlm-222m", "nanovlm-450m"])
def test_cost_model_is_step_flops_per_sample(preset: str) -> None:
    """One sample's cost is step_flops of that sample alone (MFU's count, which test_run_lifecycle checks against
    torch's FLOP counter), and per-sample costs add up to the step's FLOPs."""
    model = load_config(preset).model
    cost = SampleCost.from_model(model)
    samples = [(200, 0), (776, 9), (1, 1), (model.lm_max_length, 17)]
    for tokens, tiles in samples:
        alone = step_flops(model, n_tokens=tokens, sum_sq_lengths=tokens**2, n_tiles=tiles)
        assert cost(tokens=tokens, tiles=tiles) == pytest.approx(alone, rel=1e-12)
    step = step_flops(model, n_tokens=sum(t for t, _ in samples), sum_sq_lengths=sum(t * t for t, _ in samples),
                      n_tiles=sum(n for _, n in samples))  # fmt: skip
    assert sum(cost(tokens=t, tiles=n) for t, n in samples) == pytest.approx(step, rel=1e-12)


def test_a_tile_costs_several_times_its_tokens(monkeypatch) -> None:
    """Why balancing matters (issue 14): at nanovlm-450m a 512 px tile costs ~4.6x the decoder work of its 64
    tokens. Counted by torch's FLOP counter on the preset's own shapes (meta tensors: nothing is computed), not
    read off the cost model that is under test."""
    from torch.utils.flop_counter import FlopCounterMode

    from tests.test_run_lifecycle import _matmul_attention
    from toolkit.model import VisionLanguageModel

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _matmul_attention)
    cfg = load_config("nanovlm-450m").model
    counted = []
    with torch.device("meta"):
        model = VisionLanguageModel(cfg).eval()  # eval: no dummy tile in the text-only count
        runs = [lambda: model.MP(model.vision_encoder(torch.rand(1, 3, cfg.vit_img_size, cfg.vit_img_size))),
                lambda: model(input_ids=torch.zeros(1, 64, dtype=torch.long)).logits]  # fmt: skip
        for run in runs:
            with FlopCounterMode(display=False) as counter:
                run().sum().backward()
            counted.append(counter.get_total_flops())
    attention = 3 * cfg.lm_n_blocks * 4 * 64 * 64 * cfg.lm_hidden_dim  # the counter's full 64 x 64 square
    ratio = counted[0] / (counted[1] - attention)
    assert 4 < ratio < 5
    assert COST(tokens=0, tiles=1) / (COST(tokens=64, tiles=0) - COST.per_token_sq * 64**2) == pytest.approx(
        ratio, rel=0.01
    )


def test_calibration_file_replaces_the_flops(tmp_path) -> None:
    path = tmp_path / "times.json"
    path.write_text(json.dumps({"seconds_per_tile": 2e-3, "seconds_per_token": 1e-5, "seconds_per_token_sq": 1e-9}))
    cost = sample_cost(load_config("tiny").model, str(path))
    assert cost(tokens=100, tiles=3) == pytest.approx(3 * 2e-3 + 100 * 1e-5 + 100**2 * 1e-9)
    path.write_text("{}")
    with pytest.raises(ValueError, match="seconds_per_tile"):
        sample_cost(load_config("tiny").model, str(path))
    for tile, token in [(0.0, 0.0), (-1e-3, 1e-5), (float("nan"), 1e-5)]:
        path.write_text(
            json.dumps({"seconds_per_tile": tile, "seconds_per_token": token})
        )  # what a fit ruined by noise writes: it balanced nothing, silently
        with pytest.raises(ValueError, match="unusable times"):
            sample_cost(load_config("tiny").model, str(path))
    with pytest.raises(ConfigError, match=r"data\.cost_calibration"):
        load_config("tiny", [f"data.cost_calibration={tmp_path / 'missing.json'}"])


def test_calibration_fit_recovers_the_times_it_was_given() -> None:
    """`bench gpu --calibrate` fits per-tile, per-token and attention seconds: on timings made from known
    coefficients (plus a constant per step) the fit returns them; a term that noise drives negative is dropped."""
    cfg = load_config("tiny", ["backend.device=cpu"])
    known = {
        "seconds_per_tile": 3e-4,
        "seconds_per_token": 2e-6,
        "seconds_per_token_sq": 5e-10,
        "seconds_per_step": 0.01,
    }

    def timer(batch) -> float:
        stats = batch.stats
        sum_sq = sum(n * n for n in stats.sample_lengths)
        return (known["seconds_per_tile"] * stats.tiles + known["seconds_per_token"] * stats.tokens
                + known["seconds_per_token_sq"] * sum_sq + known["seconds_per_step"])  # fmt: skip

    points, coef = calibrate.calibrate(cfg, torch.device("cpu"), timer)
    assert len({(p["tiles_per_row"], p["rows"], p["samples"]) for p in points}) == len(points) >= 8
    for term, value in known.items():
        assert coef[term] == pytest.approx(value, rel=1e-6), term
    assert coef["r2"] == pytest.approx(1.0)
    tiles_cost_nothing = [
        {**p, "seconds": p["seconds"] - 1.01 * known["seconds_per_tile"] * p["tiles"]} for p in points
    ]
    refit = calibrate.fit(tiles_cost_nothing)
    assert refit["seconds_per_tile"] == 0.0 and refit["seconds_per_token"] > 0


def test_bench_gpu_calibrate_writes_what_data_cost_calibration_reads(tmp_path, monkeypatch) -> None:
    """The whole path on the CPU: the real backend runs every design point, the fit, the file, and the trainer's and
    loader's cost model is then the file's. CPU timings of the tiny model are noise (a fit of them came out all
    zero under load), so the timer runs the real step and reports times made from known coefficients."""
    from toolkit.bench import gpu

    known = (3e-4, 2e-6, 5e-10)
    real_timer = calibrate.backend_timer

    def known_times(*args, **kwargs):
        timed, backend = real_timer(*args, **kwargs)

        def timer(batch) -> float:
            timed(batch)
            sum_sq = sum(n * n for n in batch.stats.sample_lengths)
            return known[0] * batch.stats.tiles + known[1] * batch.stats.tokens + known[2] * sum_sq + 0.01

        return timer, backend

    monkeypatch.setattr(calibrate, "backend_timer", known_times)
    path = tmp_path / "calibration.json"
    result = gpu.run(device="cpu", preset="tiny", calibrate=path, steps=1, warmup=0)
    assert len(result["rows"]) == len(calibrate.design_points(load_config("tiny")))
    written = json.loads(path.read_text())
    assert [written[t] for t in calibrate.TERMS[:3]] == pytest.approx(known, rel=1e-6) and written["device"] == "cpu"
    cfg = load_config("tiny", [f"data.cost_calibration={path}"])
    cost = sample_cost(cfg.model, cfg.data.cost_calibration)
    assert (cost.per_tile, cost.per_token, cost.per_token_sq) == tuple(written[t] for t in calibrate.TERMS[:3])


def test_bench_gpu_calibrate_writes_no_file_the_loader_would_refuse(tmp_path, monkeypatch) -> None:
    """Times that shrink as tiles and tokens grow (noise did that on a loaded CPU) fit per tile = per token = 0. The
    file was written, with a warning, and every training run given it then failed at its start; now the benchmark
    refuses and writes none."""
    from toolkit.bench import gpu
    from toolkit.errors import UserError

    def shrinking(batch) -> float:
        return 0.05 - 1e-4 * batch.stats.tiles - 1e-6 * batch.stats.tokens

    monkeypatch.setattr(calibrate, "backend_timer", lambda *a, **k: (shrinking, _Closes()))
    path = tmp_path / "calibration.json"
    with pytest.raises(UserError, match=r"was not written.*more --steps"):
        gpu.run(device="cpu", preset="tiny", calibrate=path, steps=1, warmup=0)
    assert not path.exists()


class _Closes:
    def close(self) -> None:
        pass


# -- limits, exactly once, determinism, bounds -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("kind", "limits"), [("vlm", {}), ("multi", {"max_images": 2, "max_tiles": 24}),
                                              ("skewed", {"max_tiles": 60})])  # fmt: skip
def test_every_item_once_and_every_limit_kept(kind: str, limits: dict, seed: int) -> None:
    items = mixed(1500, seed, kind)
    rows = pack(items, 8, **limits)
    counts = Counter(x.id for row in rows for x in row)
    assert set(counts) == {x.id for x in items} and max(counts.values()) == 1, "an item was lost or duplicated"
    assert all(row for row in rows)
    assert max(sum(x.length for x in row) for row in rows) <= CAPACITY
    assert max(sum(x.images for x in row) for row in rows) <= limits.get("max_images", 18)
    assert max(sum(x.tiles for x in row) for row in rows) <= limits.get("max_tiles", 1 << 62)
    assert rows == pack(items, 8, **limits), "the same input gave other rows"


def test_state_stays_bounded_and_every_item_leaves_within_a_bounded_number_of_buffers() -> None:
    """A cheap 1-token item among costly half-rows never fits a gap; age alone must send it, cost or not."""
    buffer_packs = 4
    items = [Item(0, 1, 0, 0, 1.0)] + [Item(i, 50, 1, 1, 500.0 + i % 7) for i in range(1, 3000)]
    p = packer(buffer_packs, capacity=100, max_images=2)
    arrived, left = {}, {}
    for item in items:
        arrived[item.id] = p.built
        for row in p.add(item):
            left.update({x.id: p.built for x in row})
        state = p.state()
        assert sum(x.length for x in state.items) < (buffer_packs + 1) * 100 and len(state.balance) == 2
    assert 0 in left, "the odd item stayed in the buffer until the end of input"
    assert max(left[i] - arrived[i] for i in left) <= (MAX_AGE_BUFFERS + 1) * buffer_packs


def test_bad_costs_are_refused() -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite cost"):
            list(pack_stream([1, 2], length=int, images=lambda _: 0, capacity=4, max_images=0, buffer_packs=1,
                             cost=lambda _, c=bad: c))  # fmt: skip


@pytest.mark.parametrize("cut", [1, 333, 1234])
def test_state_restore_mid_stream_gives_the_same_rows(cut: int) -> None:
    items = mixed(2500, 5, "vlm")
    whole = pack(items, 8)
    first, rows = packer(8), []
    for item in items[:cut]:
        rows += first.add(item)
    state = first.state()
    resumed = packer(8)
    resumed.restore(state)
    for item in items[cut:]:
        rows += resumed.add(item)
    assert rows + resumed.flush() == whole


# -- balance and fill --------------------------------------------------------------------------------------------------


def test_rows_cost_about_the_same_and_stay_full() -> None:
    """8 ranks of the bench's VLM mix: the costliest rank of a 2-row step ~2% above the mean, token-only ~7%."""
    ranks, n_rows, kw = 8, 200, {"capacity": CAPACITY, "max_images": 18, "buffer_packs": 32}
    costs = {True: [], False: []}
    fill = {}
    for balanced in costs:
        used = 0
        for rank in range(ranks):
            rows = pack_stream(vlm_mix(rank, COST), length=lambda x: x[0], images=lambda x: x[1],
                               tiles=lambda x: x[2], cost=(lambda x: x[3]) if balanced else None, **kw)  # fmt: skip
            rows = list(itertools.islice(rows, n_rows))
            costs[balanced].append([sum(x[3] for x in row) for row in rows])
            used += sum(x[0] for row in rows for x in row)
        fill[balanced] = used / (ranks * n_rows * CAPACITY)
    mine, theirs = (statistics.fmean(max_over_mean(costs[b], 2)) for b in (True, False))
    assert mine < 1.03 and theirs > 1.05 and mine - 1 < (theirs - 1) / 3, (mine, theirs)
    every = {b: list(itertools.chain.from_iterable(costs[b])) for b in costs}
    cv = {b: statistics.pstdev(every[b]) / statistics.fmean(every[b]) for b in costs}
    assert cv[True] < 0.03 and cv[True] < cv[False] / 4, cv
    assert fill[True] >= 0.99 and fill[False] - fill[True] < 0.005, fill


def test_bench_balance_writes_its_table(tmp_path) -> None:
    from toolkit import bench

    result = bench.run("balance", out_dir=tmp_path, ranks=(4,), packs=(40,))
    assert [(r["ranks"], r["packs_per_sync"], r["syncs"]) for r in result["rows"]] == [(4, 2, 20), (4, 8, 5)]
    assert (
        json.loads((tmp_path / "balance.json").read_text())["headline"]["max_mean@4x2"] == result["rows"][0]["max_mean"]
    )
    assert all(r["max_mean"] < r["token_only_max_mean"] for r in result["rows"])


# -- token-only packing is unchanged; the loader balances by default ---------------------------------------------------


def test_without_cost_the_rows_are_those_of_the_token_only_packer() -> None:
    """Digest of the rows the packer built before `cost=` existed, on three mixes and limits."""
    digest = hashlib.sha256()
    for kind, limits in (("vlm", {}), ("multi", {"max_images": 2, "max_tiles": 24}), ("skewed", {})):
        rows = pack(mixed(3000, 7, kind), 8, cost=False, **limits)
        digest.update(repr([[x.id for x in row] for row in rows]).encode())
    assert digest.hexdigest() == TOKEN_ONLY_DIGEST


TOKEN_ONLY_DIGEST = "908ecce9ffef03fcb07c1c78fb1089172e8f5fe10f0122ccc25fe6e03a71e2b1"  # the packer before `cost=`


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> tuple[str, int]:
    return shardgen.make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_loader_balances_by_default_and_resumes(tok, tmp_path) -> None:
    """data.balance (on by default) packs the same samples into other rows; its running sums travel in the state."""
    rng = random.Random(3)
    samples = [shardgen.good(f"s{i:03d}", images=rng.choice((0, 1, 1, 2)), seed=i, turns=rng.randint(1, 3),
                             size=(rng.randint(20, 90), rng.randint(20, 90))) for i in range(40)]  # fmt: skip
    (tmp_path / "a").mkdir()
    shardgen.write_shard(tmp_path / "a" / "shard-000000.tar", samples)
    data = {"buffer_packs": 3, "shuffle_buffer": 4}
    on = tiny_config(tok, str(tmp_path / "a"), data=data)
    off = tiny_config(tok, str(tmp_path / "a"), data={**data, "balance": False})
    assert on.data.balance and not off.data.balance
    balanced, plain = (list(build_loader(c, rank=0, world=1, finite=True)) for c in (on, off))
    assert sorted(shardgen.batch_keys(balanced)) == sorted(shardgen.batch_keys(plain)) != []
    assert [b.stats.keys for b in balanced] != [b.stats.keys for b in plain]
    loader = build_loader(on, rank=0, world=1, finite=True)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    (stream,) = stream_states(state)
    assert len(stream["packer_balance"]) == 2 and stream["packer_balance"][1] > 0
    rest = list(it)
    resumed = build_loader(on, rank=0, world=1, finite=True)
    resumed.load_state_dict(state)
    again = list(resumed)
    assert [b.stats for b in again] == [b.stats for b in rest] and rest
    assert all(torch.equal(a.inputs.input_ids, b.inputs.input_ids) for a, b in zip(again, rest, strict=True))
