"""The loader: bit-exact resume through workers, the batch contract, and what it feeds the model."""

from __future__ import annotations

import io
import itertools
import json
import random
import shutil
import tarfile
from pathlib import Path

import pytest
import shardgen
import torch
from PIL import Image
from shardgen import Spec, batch_keys, tiny_config, write_shard

from toolkit.data import loader as loader_module
from toolkit.data import workers
from toolkit.data.batch import Batch
from toolkit.data.collate import IGNORE, Encoded, collate
from toolkit.data.conversation import encode_sample
from toolkit.data.images import process_image
from toolkit.data.loader import build_loader, data_stats, stream_states
from toolkit.data.shards import ShardError
from toolkit.data.tokenizer import load_tokenizer
from toolkit.model.attention import document_ids


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> tuple[str, int]:
    return shardgen.make_tokenizer(tmp_path_factory.mktemp("tok"))


def varied_set(folder: Path, prefix: str, *, shards: int, per_shard: int, seed: int) -> list[Spec]:
    """Samples of uneven length: 0-2 images of random size, 1-4 turns, so packs differ from batch to batch."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    specs = []
    for s in range(shards):
        shard = []
        for i in range(per_shard):
            key, n_img = f"{prefix}{s:02d}x{i:03d}", rng.choice([0, 1, 1, 1, 2])
            spec = shardgen.good(key, images=0, turns=rng.randint(1, 4))
            fmt = rng.choice(["PNG", "JPEG"])
            ext = "png" if fmt == "PNG" else "jpg"
            for j in range(n_img):
                size = (rng.randint(20, 90), rng.randint(20, 90))
                spec.images.append((f"img{j}.{ext}", shardgen.image_bytes(*size, fmt=fmt, seed=rng.randrange(10**6))))
            shard.append(spec)
        write_shard(folder / f"shard-{s:06d}.tar", shard)
        specs += shard
    return specs


@pytest.fixture(scope="module")
def mixed(tok, tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("mixed")
    varied_set(root / "a", "a", shards=4, per_shard=14, seed=1)
    varied_set(root / "b", "b", shards=2, per_shard=10, seed=2)
    return [{"pattern": str(root / "a"), "weight": 2.0}, {"pattern": str(root / "b"), "weight": 1.0}]


def take(loader_or_iterator, n: int) -> list[Batch]:
    """The next `n` batches; a loader starts a new iteration, an iterator goes on."""
    it = iter(loader_or_iterator)
    return [next(it) for _ in range(n)]


def assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.stats == y.stats
        for name, t in x.inputs.as_kwargs().items():
            u = getattr(y.inputs, name)
            assert t.dtype == u.dtype and torch.equal(t, u), name


def streams(state: dict) -> list[dict]:
    return sorted(stream_states(state), key=lambda s: s["slot"])


@pytest.mark.parametrize(("workers", "world", "rank", "before"), [(2, 1, 0, 5), (0, 3, 1, 4)],
                         ids=["2-workers", "by-sample-in-process"])  # fmt: skip
def test_resume_gives_the_same_batches_bit_for_bit(tok, mixed, workers: int, world: int, rank: int, before: int):
    cfg = tiny_config(tok, mixed, data={"num_workers": workers, "shuffle_buffer": 6, "buffer_packs": 3})
    first = build_loader(cfg, rank=rank, world=world)
    uninterrupted = iter(first)
    take(uninterrupted, before)
    state = first.state_dict()
    after = take(uninterrupted, 12)  # far enough to cross epochs of the smaller set
    for stream in streams(state):  # mid-epoch, with samples in every buffer
        assert stream["shuffle"] and stream["packer"] and stream["readers"][0]["ordinal"] > 0
    resumed = build_loader(cfg, rank=rank, world=world)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 12), after)
    assert batch_keys(after) != batch_keys(take(build_loader(cfg, rank=rank, world=world), 12))


def test_resume_at_every_batch_of_a_finite_pass(tok, mixed) -> None:
    """Including the tail, where the flushed packer leaves finished rows waiting for the next batch."""
    cfg = tiny_config(tok, mixed, data={"shuffle_buffer": 5, "buffer_packs": 5}, train={"batch_size": 3})
    loader = build_loader(cfg, rank=0, world=1, finite=True)
    states, batches = [], []
    for batch in loader:
        states.append(loader.state_dict())
        batches.append(batch)
    assert any(streams(s)[0]["ready"] for s in states), "no state with rows waiting; the tail went untested"
    for i, state in enumerate(states):
        resumed = build_loader(cfg, rank=0, world=1, finite=True)
        resumed.load_state_dict(state)
        assert_same_batches(list(resumed), batches[i + 1 :])
        assert resumed.counts() == loader.counts()  # counters carry over: 'read' counts each sample once


def test_a_training_loader_says_it_is_endless_and_a_finite_pass_does_not(tok, mixed) -> None:
    """For endless batches the trainer skips the per-step agreement on whose data ran out: only a training stream
    may say so, and it must go on past its epochs."""
    cfg = tiny_config(tok, mixed, data={"shuffle_buffer": 5, "buffer_packs": 5}, train={"batch_size": 3})
    finite = build_loader(cfg, rank=0, world=1, finite=True)
    one_pass = len(list(finite))
    train = build_loader(cfg, rank=0, world=1)
    assert train.endless and not finite.endless
    assert len(take(iter(train), 3 * one_pass)) == 3 * one_pass


def test_iterating_a_training_loader_again_continues(tok, mixed) -> None:
    cfg = tiny_config(tok, mixed)
    one = build_loader(cfg, rank=0, world=1)
    it = iter(one)
    whole = take(it, 7)
    two = build_loader(cfg, rank=0, world=1)
    assert_same_batches(take(two, 3) + take(two, 4), whole)


def test_state_stays_small_and_restoring_decodes_only_the_buffers(tok, mixed, monkeypatch) -> None:
    """The state holds buffer references and counters, not the epoch so far: its size does not grow with time,
    and a restore decodes the buffered samples only."""
    cfg = tiny_config(tok, mixed)
    loader = build_loader(cfg, rank=0, world=1)
    sizes = []
    for i, _ in enumerate(loader):
        if i in (3, 40):
            sizes.append(len(json.dumps(loader.state_dict())))
        if i == 40:
            break
    state = loader.state_dict()
    (stream,) = streams(state)
    assert len(stream["shuffle"]) == cfg.data.shuffle_buffer - 1  # one slot waits to be refilled
    assert stream["readers"][0]["epoch"] >= 1  # 40 batches went past the end of an epoch
    assert sizes[1] < 1.5 * sizes[0]
    decoded = []
    real = loader_module.decode_sample
    monkeypatch.setattr(loader_module, "decode_sample", lambda raw, *a: decoded.append(raw.ref) or real(raw, *a))
    resumed = build_loader(cfg, rank=0, world=1)
    resumed.load_state_dict(state)
    iter(resumed)  # in-process: the stream restores here, before the first batch
    assert len(decoded) == len(stream["packer"]) + sum(len(row) for row in stream["ready"]) < 30
    assert stream["counts"]["read"] > 150


def test_a_moved_dataset_resumes(tok, mixed, tmp_path: Path) -> None:
    """Shards copied to another folder (a new machine's local disk) are the same data: the state still applies."""
    cfg = tiny_config(tok, mixed)
    loader = build_loader(cfg, rank=0, world=1)
    it = iter(loader)
    take(it, 3)
    state = loader.state_dict()
    moved = [{**m, "pattern": str(shutil.copytree(m["pattern"], tmp_path / str(i)))} for i, m in enumerate(mixed)]
    resumed = build_loader(tiny_config(tok, moved), rank=0, world=1)
    resumed.load_state_dict(state)
    assert batch_keys(take(resumed, 4)) == batch_keys(take(it, 4))


def test_state_from_another_reader_layout_is_refused(tok, mixed) -> None:
    cfg = tiny_config(tok, mixed)
    loader = build_loader(cfg, rank=0, world=2)
    take(loader, 1)
    other = build_loader(cfg, rank=0, world=1)
    other.load_state_dict(loader.state_dict())
    with pytest.raises(ShardError, match=r"same world size and data\.num_workers"):
        take(other, 1)


def encoded(n: int, *, first: int, tiles: int, images: int = 1) -> Encoded:
    ids = list(range(first, first + n))
    pixels = torch.full((tiles, 3, 4, 4), float(first))  # the value names the sample, to check the order
    return Encoded(ids, [i + 1 for i in ids], pixels, images=images, key=f"k{first}")


def test_collate_contract() -> None:
    rows = [[encoded(3, first=10, tiles=2), encoded(4, first=20, tiles=0, images=0)], [encoded(5, first=30, tiles=1)]]
    batch = collate(rows, capacity=10, pad_id=0, tile=4, batch_rows=3)
    assert batch.inputs.input_ids.shape == batch.inputs.labels.shape == batch.inputs.position_ids.shape == (3, 10)
    assert batch.inputs.input_ids.dtype == batch.inputs.labels.dtype == torch.long
    assert batch.inputs.input_ids[0].tolist() == [10, 11, 12, 20, 21, 22, 23, 0, 0, 0]
    assert batch.inputs.labels[0].tolist() == [11, 12, IGNORE, 21, 22, 23, IGNORE, IGNORE, IGNORE, IGNORE]
    assert batch.inputs.position_ids[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2]
    assert batch.inputs.position_ids[2].tolist() == list(range(10))  # an empty row: all padding, one segment
    assert (batch.inputs.labels[2] == IGNORE).all()
    assert document_ids(batch.inputs.position_ids)[0].tolist() == [1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    assert batch.inputs.pixel_values.shape == (3, 3, 4, 4) and batch.inputs.pixel_values.dtype == torch.float32
    assert batch.inputs.pixel_values[:, 0, 0, 0].tolist() == [10.0, 10.0, 30.0]  # row by row, in token order
    stats = batch.stats
    assert (stats.rows, stats.samples, stats.images, stats.tiles, stats.tokens, stats.targets) == (2, 3, 2, 3, 12, 9)
    assert stats.sample_lengths == [3, 4, 5] and stats.keys == [["k10", "k20"], ["k30"]]  # the padding is no sample
    text_only = collate([[encoded(3, first=1, tiles=0, images=0)]], capacity=4, pad_id=9, tile=4)
    assert text_only.inputs.pixel_values.shape == (0, 3, 4, 4)


def test_samples_are_encoded_by_the_conversation_and_image_modules(tok, mixed) -> None:
    """Each sample in a batch equals encode_sample + process_image applied to its raw tar members."""
    cfg = tiny_config(tok, mixed, data={"shuffle_buffer": 1})
    tokenizer = load_tokenizer(cfg.model)
    batch = take(build_loader(cfg, rank=0, world=1), 1)[0]
    members = {}
    for pattern in (mixed[0]["pattern"], mixed[1]["pattern"]):
        for shard in sorted(Path(pattern).glob("*.tar")):
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    members[m.name] = tar.extractfile(m).read()
    m = cfg.model
    pixels, row_ids = [], []
    for row in batch.stats.keys:
        ids = []
        for where in row:
            key = where.rsplit(":", 1)[1]
            imgs = [Image.open(io.BytesIO(members[n])) for n in sorted(members) if n.startswith(f"{key}.img")]
            tiles = [process_image(i, tile=m.vit_img_size, max_side=m.max_img_size, resize_to_max=True) for i in imgs]
            texts = json.loads(members[f"{key}.json"])["texts"]
            ids += encode_sample(tokenizer, texts, [g for _, g in tiles], m.mp_image_token_length)[0]
            pixels += [t for t, _ in tiles]
        row_ids.append(ids)
    for r, ids in enumerate(row_ids):
        assert batch.inputs.input_ids[r, : len(ids)].tolist() == ids
    assert torch.equal(batch.inputs.pixel_values, torch.cat(pixels))


def test_a_batch_feeds_the_tiny_model(tok, mixed) -> None:
    from toolkit.model.vlm import VisionLanguageModel

    cfg = tiny_config(tok, mixed)
    batch = take(build_loader(cfg, rank=0, world=1), 1)[0]
    model = VisionLanguageModel(cfg.model).eval()
    with torch.no_grad():
        out = model(**batch.inputs.as_kwargs(), return_logits=True)
    assert out.logits.shape[:2] == batch.inputs.input_ids.shape
    # Each packed sample's logits and loss are those of the sample run alone with its own tiles: positions
    # restart per sample, tiles come in the order of the image tokens, labels are aligned (a finite loss alone
    # passed with shifted labels or tiles out of order).
    x, alone, tile = batch.inputs, torch.zeros((), dtype=torch.float64), 0
    per_tile = cfg.model.mp_image_token_length
    for row in range(x.input_ids.shape[0]):
        starts = [*(x.position_ids[row] == 0).nonzero().flatten().tolist(), x.input_ids.shape[1]]
        for a, b in itertools.pairwise(starts):  # one sample (or the row's padding) at a time
            ids = x.input_ids[row, a:b][None]
            tiles = int((ids == model.image_token_id).sum()) // per_tile
            pixels = x.pixel_values[tile : tile + tiles] if tiles else None
            tile += tiles
            with torch.no_grad():
                one = model(input_ids=ids, labels=x.labels[row, a:b][None], position_ids=x.position_ids[row, a:b][None],
                            pixel_values=pixels, return_logits=True)  # fmt: skip
            torch.testing.assert_close(one.logits[0], out.logits[row, a:b], rtol=0, atol=1e-5)
            alone += one.loss_sum.double()
    assert tile == x.pixel_values.shape[0] and len(starts) > 2  # every tile used; packed rows
    assert float(out.loss_sum) == pytest.approx(float(alone), rel=1e-5)


def test_val_split_is_one_ordered_pass(tok, tmp_path: Path) -> None:
    keys = shardgen.make_dataset(tmp_path / "val", shards=2, per_shard=9)
    cfg = tiny_config(tok, str(tmp_path / "val"), data={"val_shards": str(tmp_path / "val")})
    loader = build_loader(cfg, rank=0, world=1, split="val")
    first, second = batch_keys(list(loader)), batch_keys(list(loader))
    assert sorted(first) == sorted(keys) and first == second  # finite, and a second pass starts over
    empty, real = loader.empty_batch(), next(iter(loader))
    assert empty.inputs.input_ids.shape == real.inputs.input_ids.shape and empty.stats.targets == 0
    cfg.data.val_shards = ""
    with pytest.raises(ShardError, match=r"data\.val_shards is empty"):
        build_loader(cfg, rank=0, world=1, split="val")


def test_data_stats(tok, tmp_path: Path) -> None:
    shardgen.make_dataset(tmp_path, shards=2, per_shard=10)
    write_shard(tmp_path / "shard-000002.tar", [Spec("nt", {"source": "x"})])
    (tmp_path / "manifest.json").unlink()
    stats = data_stats(tiny_config(tok, str(tmp_path)))
    assert stats["samples_read"] == 21 and stats["samples_packed"] == 20
    assert stats["skipped"] == {"no_texts": 1}
    assert stats["packs"] * stats["samples_per_pack"] == pytest.approx(20, abs=0.1)
    assert 0.5 < stats["fill"] <= 1.0 and stats["images_per_pack"] == stats["samples_per_pack"]


def test_data_stats_max_packs_counts_exactly_trainings_first_packs(tok, tmp_path: Path) -> None:
    """`--max-packs 5` with batches of 4 packs read 8: it stopped at the first whole batch reaching 5."""
    shardgen.make_dataset(tmp_path, shards=2, per_shard=20)
    cfg = tiny_config(tok, str(tmp_path), train={"batch_size": 4})
    rows = [row for b in build_loader(cfg, rank=0, world=1, finite=True) for row in b.stats.keys if row]
    assert len(rows) > 8
    stats = data_stats(cfg, max_packs=5)
    assert stats["packs"] == 5 and stats["samples_packed"] == sum(len(row) for row in rows[:5])
    assert cfg.train.batch_size == 4  # the caller's config is left as it was


@pytest.mark.parametrize("size", [(40, 40), (64, 100), (130, 70), (200, 200)])
def test_tiles_are_the_float_image_cut_row_major_with_the_global_tile_first(size):
    """process_image against slicing the [0, 1] float image by hand, and torch's antialiased resize of all of it."""
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image

    from toolkit.data.images import process_image, target_size

    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    tiles, (rows, cols) = process_image(img, tile=32, max_side=128, resize_to_max=False)
    h, w = target_size(size[1], size[0], tile=32, max_side=128, resize_to_max=False)
    resized = img.resize((w, h), Image.Resampling.BICUBIC) if (h, w) != (size[1], size[0]) else img
    x = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float() / 255.0  # (3, H, W)
    expected = [x[:, r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32] for r in range(rows) for c in range(cols)]
    if rows * cols > 1:
        whole = F.interpolate(x[None], size=(32, 32), mode="bilinear", align_corners=False, antialias=True)[0]
        expected.insert(0, whole)
    assert tiles.shape == (len(expected), 3, 32, 32) and tiles.is_contiguous()
    assert torch.equal(tiles, torch.stack(expected))


def test_worker_batches_build_their_tiles_in_shared_memory(monkeypatch):
    """In a loader worker the tiles are concatenated straight into shared memory (no extra copy on hand-off),
    with the same values as outside one; an empty batch keeps its (0, 3, tile, tile) shape."""
    from toolkit.data import collate as collate_module

    gen = torch.Generator().manual_seed(0)
    tiles = [torch.rand(n, 3, 8, 8, generator=gen) for n in (2, 1, 3)]
    plain = collate_module.cat_tiles(tiles, 8)
    assert not plain.is_shared()
    monkeypatch.setattr(collate_module, "get_worker_info", lambda: object())
    shared = collate_module.cat_tiles(tiles, 8)
    assert shared.is_shared() and shared.dtype == torch.float32 and torch.equal(shared, plain)
    assert collate_module.cat_tiles([], 8).shape == (0, 3, 8, 8)


@pytest.mark.parametrize("method", ["forkserver", pytest.param("spawn", marks=pytest.mark.slow)])  # spawn: ~10 s
def test_every_worker_start_method_gives_fork_batches_and_state(tok, mixed, method: str) -> None:
    """data.worker_start changes how workers start, not what they read: batches, counts and resume state equal
    fork's, and a fork-started state resumes under the other method."""
    cfg = {m: tiny_config(tok, mixed, data={"num_workers": 2, "shuffle_buffer": 6, "worker_start": m})
           for m in ("fork", method)}  # fmt: skip
    runs = {}
    for m, c in cfg.items():
        torch.manual_seed(0)  # the loader draws its workers' base seed from the global generator
        loader = build_loader(c, rank=0, world=1)
        runs[m] = (take(loader, 4), loader.state_dict(), loader.counts())
    assert_same_batches(runs[method][0], runs["fork"][0])
    assert runs[method][1:] == runs["fork"][1:]
    resumed = build_loader(cfg[method], rank=0, world=1)
    resumed.load_state_dict(runs["fork"][1])
    fork_next = build_loader(cfg["fork"], rank=0, world=1)
    fork_next.load_state_dict(runs["fork"][1])
    assert_same_batches(take(resumed, 2), take(fork_next, 2))


def test_auto_worker_start_is_forkserver_where_fork_can_deadlock(monkeypatch) -> None:
    for version, expected in (((3, 11, 7), "forkserver"), ((3, 12, 0), None), ((3, 13, 1), None)):
        monkeypatch.setattr(workers.sys, "version_info", version)
        context = workers.worker_context("auto")
        assert (context.get_start_method() if context else None) == expected, version
    assert workers.worker_context("fork") is None
    assert workers.worker_context("spawn").get_start_method() == "spawn"


@pytest.mark.slow  # 1000 process starts: about 30 s on 2 cores
def test_workers_start_while_c_threads_enter_python(tmp_path) -> None:
    """tests/fork_storm.py: with 4 threads of C code entering Python all the time, on this Python a plain fork
    left 4 of 1000 children blocked forever (3.11.7, 2026-12-07); data.worker_start=auto must start every one."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parent / "fork_storm.py"
    done = subprocess.run([sys.executable, str(script), "auto", "1000"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "auto: 0 of 1000 children never started" in done.stdout, done.stdout


OWNER_SCRIPT = """
import sys, time
from toolkit.config import load_config
from toolkit.data.loader import build_loader
if __name__ == "__main__":
    loader = build_loader(load_config(sys.argv[1]), rank=0, world=1)
    next(iter(loader))
    print(" ".join(str(w.pid) for w in loader._iterator._workers), flush=True)
    time.sleep(600)
"""


def test_fork_server_workers_end_when_their_rank_is_killed(tok, mixed, tmp_path) -> None:
    """A rank killed with SIGKILL (an elastic restart) must not leave its loader workers behind: a fork server's
    workers are the server's children, so torch's own parent watch never fires (seen: orphans holding the killed
    rank's output pipes kept an elastic restart test waiting forever)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from toolkit.config import save_config

    cfg = tiny_config(tok, mixed, data={"num_workers": 2, "shuffle_buffer": 6, "worker_start": "forkserver"})
    save_config(cfg, tmp_path / "cfg.yaml")
    (tmp_path / "owner.py").write_text(OWNER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    rank = subprocess.Popen([sys.executable, str(tmp_path / "owner.py"), str(tmp_path / "cfg.yaml")], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        workers = [int(pid) for pid in rank.stdout.readline().split()]
        assert len(workers) == 2 and all(Path(f"/proc/{pid}").exists() for pid in workers)
        rank.send_signal(signal.SIGKILL)
        rank.wait()
        deadline = time.monotonic() + 20
        while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in workers if Path(f"/proc/{pid}").exists()]
        assert not left, f"workers {left} outlived their rank"
    finally:
        rank.kill()


def test_another_worker_count_is_refused_clearly_or_resharded(tok, mixed, tmp_path: Path) -> None:
    """torchdata's state differs between 0 workers and some: a resume that changed data.num_workers failed inside
    it (an AssertionError). Now it is a clear error, or, with virtual readers, continues the same global order."""
    for saved_with, resumed_with in [(0, 1), (1, 0), (1, 2)]:
        loader = build_loader(tiny_config(tok, mixed, data={"num_workers": saved_with}), rank=0, world=1)
        take(loader, 2)
        other = build_loader(tiny_config(tok, mixed, data={"num_workers": resumed_with}), rank=0, world=1)
        with pytest.raises(ShardError, match=rf"saved with data\.num_workers={saved_with} .* has {resumed_with}"):
            other.load_state_dict(loader.state_dict())
    shardgen.make_dataset(tmp_path / "d", shards=2, per_shard=12)

    def virtual(workers: int):
        cfg = tiny_config(tok, str(tmp_path / "d"), data={"num_workers": workers, "virtual_readers": 2})
        return build_loader(cfg, rank=0, world=1)

    uninterrupted = virtual(0)
    first = take(uninterrupted, 4)  # 2 whole turns over the 2 readers: a step boundary
    resumed = virtual(2)
    resumed.load_state_dict(uninterrupted.state_dict())
    assert batch_keys(take(resumed, 4)) == batch_keys(take(uninterrupted, 4))
    assert first  # the saved position is after real batches


def test_a_mixture_set_whose_every_sample_is_skipped_stops_the_stream(tok, tmp_path: Path, monkeypatch) -> None:
    """Its draws were all skipped and the other set's samples took its share, with per-sample warnings only: the
    whole stream's streak never reached its bound, each good sample resetting it."""
    monkeypatch.setattr(loader_module, "MAX_SKIPS_IN_A_ROW", 20)
    shardgen.make_dataset(tmp_path / "good", shards=2, per_shard=30)
    (tmp_path / "bad").mkdir()
    write_shard(tmp_path / "bad" / "shard-000000.tar", [Spec(f"nt{i}", {"source": "x"}) for i in range(8)])
    sets = [{"pattern": str(tmp_path / "good"), "weight": 3.0}, {"pattern": str(tmp_path / "bad"), "weight": 1.0}]
    loader = build_loader(tiny_config(tok, sets), rank=0, world=1)
    with pytest.raises(ShardError, match=r"the last 20 samples of .*bad' \(weight 1, 25% of the mixture\) were all"):
        take(loader, 200)
    finite = build_loader(tiny_config(tok, sets), rank=0, world=1, finite=True)
    assert sum(b.stats.samples for b in finite) == 60  # a finite pass (validation, data-stats) reads it all
    assert finite.counts()["skipped"] == {"no_texts": 8}
    # data-stats pooled the sets' counts, so the set that gave nothing did not show; it now has a row each.
    assert data_stats(tiny_config(tok, sets))["sets"] == [
        {"pattern": str(tmp_path / "good"), "weight": 3.0, "samples": 60, "packed": 60},
        {"pattern": str(tmp_path / "bad"), "weight": 1.0, "samples": None, "packed": 0},  # no manifest: unknown
    ]


def test_an_endless_stream_whose_every_image_fails_to_decode_stops(tok, tmp_path: Path, monkeypatch) -> None:
    """Samples whose image headers read but whose pixels do not are dropped at collate, where the skip streak of
    the header stage never saw them: such a stream yielded empty batches forever (a run trained on nothing)."""
    monkeypatch.setattr(loader_module, "MAX_SKIPS_IN_A_ROW", 20)
    folder = tmp_path / "cut"
    folder.mkdir()
    meta = shardgen.good("x").meta
    write_shard(
        folder / "shard-000000.tar", [Spec(f"k{i}", meta, [("img0.jpg", shardgen.truncated_jpeg(i))]) for i in range(6)]
    )
    loader = build_loader(tiny_config(tok, str(folder)), rank=0, world=1)
    with pytest.raises(ShardError, match=r"the last 20 samples were all skipped .*bad_image"):
        take(loader, 50)
    finite = build_loader(tiny_config(tok, str(folder)), rank=0, world=1, finite=True)
    assert all(b.stats.targets == 0 for b in finite)  # a finite pass ends on its own, every sample counted
    assert finite.counts() == {"read": 6, "skipped": {"bad_image": 6}}


def test_a_state_is_refused_on_a_dataset_of_the_same_shape_and_legacy_states_still_resume(tok, tmp_path) -> None:
    """shard-data names every dataset's shards alike: with as many shards of as many samples, two datasets had one
    fingerprint and a resume continued on the wrong one. The manifest's shard bytes now tell them apart; a state
    saved before (no bytes in its fingerprint) still resumes on its own data."""
    shardgen.make_dataset(tmp_path / "a", shards=2, per_shard=8, prefix="a")
    shardgen.make_dataset(tmp_path / "b", shards=2, per_shard=8, prefix="b", images=2)  # same names and counts
    loader = build_loader(tiny_config(tok, str(tmp_path / "a")), rank=0, world=1)
    first = take(loader, 1)
    state = loader.state_dict()
    other = build_loader(tiny_config(tok, str(tmp_path / "b")), rank=0, world=1)
    with pytest.raises(ShardError, match="other shards"):
        other.load_state_dict(state)
    sets = loader.dataset.spec.sets
    for st in stream_states(state):
        assert st["data"] == loader_module.fingerprint(list(sets)) != loader_module.fingerprint(list(sets), legacy=True)
        st["data"] = loader_module.fingerprint(list(sets), legacy=True)  # as saved before the bytes counted
    again = build_loader(tiny_config(tok, str(tmp_path / "a")), rank=0, world=1)
    again.load_state_dict(state)
    assert batch_keys(take(again, 2)) == batch_keys(take(loader, 2)) and first
