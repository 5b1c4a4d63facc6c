"""One data order for any number of ranks and loader workers (issue 13, items 1-3 for the data stream).

The loaders here are built for each (rank, world) in this process, as the ranks of a job build theirs: the global
order is a property of the loaders, so the per-step sample sets are compared directly. The losses through real
ranks are compared in test_losses_agree_on_1_2_and_4_ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import shardgen

from tests.conftest import run_ranks
from toolkit.config import ConfigError
from toolkit.data.loader import build_loader
from toolkit.data.order import allowed_world_sizes, check_layout, owned_readers
from toolkit.data.prepare.synthetic import write_synth
from toolkit.train.preflight import derive_accumulation

VIRTUAL, GLOBAL, BATCH = 4, 4, 1


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> tuple[str, int]:
    return shardgen.make_tokenizer(tmp_path_factory.mktemp("tok"))


def config(tok, shards: Path, *, world: int, workers: int):
    cfg = shardgen.tiny_config(tok, str(shards), data={"num_workers": workers, "virtual_readers": VIRTUAL})
    cfg.train.batch_size, cfg.train.global_batch_size = BATCH, GLOBAL
    derive_accumulation(cfg, world)
    return cfg


def step_keys(tok, shards: Path, *, world: int, workers: int, steps: int, start: list | None = None) -> list[set]:
    """The sample keys of each optimizer step over all ranks; `start` = every rank's saved loader state."""
    cfg = config(tok, shards, world=world, workers=workers)
    accumulation = cfg.train.gradient_accumulation_steps
    assert accumulation * world * BATCH == GLOBAL
    per_rank = []
    for rank in range(world):
        loader = build_loader(cfg, rank=rank, world=world)
        if start is not None:
            assert loader.reshard(start)
        it = iter(loader)
        per_rank.append([[next(it) for _ in range(accumulation)] for _ in range(steps)])
    return [
        {k for rank in per_rank for batch in rank[s] for row in batch.stats.keys for k in row} for s in range(steps)
    ]


def saved_states(tok, shards: Path, *, world: int, workers: int, steps: int) -> list[dict]:
    """Every rank's loader state after `steps` optimizer steps, as a checkpoint holds them."""
    cfg = config(tok, shards, world=world, workers=workers)
    states = []
    for rank in range(world):
        loader = build_loader(cfg, rank=rank, world=world)
        it = iter(loader)
        for _ in range(steps * cfg.train.gradient_accumulation_steps):
            next(it)
        states.append(loader.state_dict())
    return states


@pytest.mark.parametrize("shards", [6, 2], ids=["more-shards-than-readers", "fewer-shards-than-readers"])
def test_every_layout_trains_each_step_on_the_same_samples(tok, tmp_path, shards):
    shardgen.make_dataset(tmp_path / "d", shards=shards, per_shard=12)
    layouts = [(1, 0), (1, 2), (2, 0), (2, 2), (4, 0)]  # (ranks, loader workers per rank)
    seen = {layout: step_keys(tok, tmp_path / "d", world=layout[0], workers=layout[1], steps=8) for layout in layouts}
    reference = seen[1, 0]
    assert all(len(keys) >= GLOBAL for keys in reference)  # packed rows of real samples in every step
    assert len(set().union(*reference)) >= min(30, shards * 12)  # the steps walk through the data
    for layout, keys in seen.items():
        assert keys == reference, layout


def test_the_data_position_reshards_at_a_step_boundary(tok, tmp_path):
    """4 steps on 2 ranks x 2 workers, then 1 rank without workers (and 4 ranks) continue at the next global row."""
    shardgen.make_dataset(tmp_path / "d", shards=3, per_shard=12)
    uninterrupted = step_keys(tok, tmp_path / "d", world=2, workers=2, steps=8)
    saved = saved_states(tok, tmp_path / "d", world=2, workers=2, steps=4)
    assert step_keys(tok, tmp_path / "d", world=1, workers=0, steps=4, start=saved) == uninterrupted[4:]
    assert step_keys(tok, tmp_path / "d", world=4, workers=0, steps=4, start=saved) == uninterrupted[4:]


def test_layout_rules_and_refusals(tok, tmp_path):
    assert owned_readers(8, rank=1, world=2) == [1, 3, 5, 7]
    assert owned_readers(8, rank=1, world=2, worker=1, workers=2) == [3, 7]
    assert allowed_world_sizes(8, batch_size=1, global_batch=16, workers=2) == [1, 2, 4]
    shardgen.make_dataset(tmp_path / "d", shards=2, per_shard=4)
    with pytest.raises(ConfigError, match=r"cannot be split over 3 ranks.*can use 1, 2 or 4 ranks"):
        config(tok, tmp_path / "d", world=3, workers=0)
    with pytest.raises(ConfigError, match=r"not a multiple of train\.batch_size x world size"):
        cfg = shardgen.tiny_config(tok, str(tmp_path / "d"))
        cfg.train.global_batch_size = 6
        derive_accumulation(cfg, 4)


def test_layout_refusals_name_the_setting_to_change_and_what_would_work():
    """The global batch the user never set is not blamed first, and a layout no world size fits says so."""
    with pytest.raises(ConfigError) as exc:  # data.virtual_readers=4 data.num_workers=3, global batch derived
        check_layout(4, world=1, workers=3, batch_size=4, global_batch=4)
    assert "train.global_batch_size" not in str(exc.value)
    assert "With data.num_workers=3 no number of ranks works; on 1 ranks, set data.num_workers to 1, 2 or 4" in str(
        exc.value
    )
    with pytest.raises(ConfigError, match=r"no number of ranks works; on 1 ranks, set data.num_workers to 1, 2 or 4"):
        check_layout(4, world=1, workers=3, batch_size=1, global_batch=16)  # it said "the run can use [] ranks"
    with pytest.raises(ConfigError, match=r"on 3 ranks, set data.virtual_readers to a multiple of 6"):
        check_layout(8, world=3, workers=2, batch_size=1, global_batch=16)
    batch_message = r"Set train.global_batch_size to a multiple of 16, e.g. 16 \(the run can then use 1 or 2 ranks\)"
    with pytest.raises(ConfigError, match=batch_message):
        check_layout(4, world=1, workers=2, batch_size=4, global_batch=4)
    check_layout(4, world=2, workers=2, batch_size=4, global_batch=32)  # an allowed layout passes


def backend_args(backend: str) -> list[str]:
    """ddp / fsdp by name; zeroN is DeepSpeed with the shipped ds_configs/zeroN.json."""
    if backend.startswith("zero"):
        return ["backend.name=deepspeed", f"backend.ds_config=ds_configs/{backend}.json"]
    return [f"backend.name={backend}"]


def launch(world: int, run: Path, synth: Path, backend: str, *extra: str) -> list[dict]:
    args = [
        "-m", "toolkit", "train", "--config", "tiny", *backend_args(backend), "backend.precision=fp32",
        "backend.device=cpu", f"model.tokenizer={synth / 'tokenizer'}", f"data.train_shards={synth / 'train'}",
        "data.val_shards=", "data.num_workers=0", "data.shuffle_buffer=16", f"data.virtual_readers={VIRTUAL}",
        f"train.batch_size={BATCH}", f"train.global_batch_size={GLOBAL}", "train.max_training_steps=8",
        "train.eval_interval=0", "train.export_best=false", f"train.run_dir={run}", "train.log_interval=1", *extra,
    ]  # fmt: skip
    run_ranks(world, *args, timeout=300)
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_losses_agree_on_1_2_and_4_ranks(tmp_path):
    """The real loader, the real trainer: 8 steps of the same global batch on 1, 2 and 4 DDP ranks (fp32)."""
    synth = tmp_path / "synth"
    write_synth(str(synth), samples=96, val_samples=8, seed=0)
    runs = {world: launch(world, tmp_path / f"w{world}", synth, "ddp") for world in (1, 2, 4)}
    one = runs[1]
    assert [m["step"] for m in one] == list(range(1, 9))
    for world in (2, 4):
        assert [m["batch_digest"] for m in runs[world]] == [m["batch_digest"] for m in one]  # the same rows
        for a, b in zip(runs[world], one, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (world, a["step"])


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("backend", "first", "then"),
    [("ddp", 2, 1), ("fsdp", 2, 1), ("fsdp", 1, 2), ("zero1", 2, 1), ("zero2", 2, 1), ("zero3", 2, 1), ("zero2", 1, 2)],
)
def test_resume_on_another_world_size_continues_at_the_next_global_row(backend, first, then, tmp_path):
    """Checkpoint at step 4 on `first` ranks, resume on `then`: steps 5-8 equal the uninterrupted run's.

    DeepSpeed (zeroN) reshards through its universal checkpoint, converted by the backend on the resume.
    """
    synth = tmp_path / "synth"
    write_synth(str(synth), samples=96, val_samples=8, seed=0)
    once = launch(first, tmp_path / "once", synth, backend)
    launch(first, tmp_path / "twice", synth, backend, "train.stop_at_step=4")
    twice = launch(then, tmp_path / "twice", synth, backend)
    assert [m["step"] for m in twice] == list(range(1, 9))  # each step once: nothing repeated, nothing skipped
    assert [m["batch_digest"] for m in twice] == [m["batch_digest"] for m in once]
    for a, b in zip(twice[4:], once[4:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
    if backend.startswith("zero"):  # converted once, inside the checkpoint it was converted from
        assert (tmp_path / "twice" / "checkpoints" / "step_4" / "model" / "universal").is_dir()
