"""The stream: shard lists, the rank/worker split, bad-data accounting, mixtures and epochs."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import shardgen
from shardgen import Spec, batch_keys, good, tiny_config, write_shard

from toolkit.data.loader import build_loader
from toolkit.data.shards import ReaderSlot, SetReader, ShardError, SkipCounter, expand_braces, resolve_sets


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> tuple[str, int]:
    return shardgen.make_tokenizer(tmp_path_factory.mktemp("tok"))


def run(cfg, *, rank: int = 0, world: int = 1, finite: bool = True, batches: int = 0) -> tuple[list[dict], dict]:
    """Batches of one rank (all of a finite pass, or the first `batches`) and that rank's counters."""
    loader = build_loader(cfg, rank=rank, world=world, finite=finite)
    out = []
    for batch in loader:
        out.append(batch)
        if batches and len(out) == batches:
            break
    return out, loader.counts()


def test_expand_braces() -> None:
    assert expand_braces("/d/shard-{000008..000011}.tar") == [f"/d/shard-{i:06d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_every_form_of_the_shard_list_names_the_same_shards(tmp_path: Path) -> None:
    shardgen.make_dataset(tmp_path, shards=3, per_shard=2)
    expected = [str(tmp_path / f"shard-{i:06d}.tar") for i in range(3)]
    forms = [str(tmp_path), str(tmp_path / "manifest.json"), f"{tmp_path}/shard-{{000000..000002}}.tar",
             f"{tmp_path}/shard-*.tar"]  # fmt: skip
    for form in forms:
        (shard_set,) = resolve_sets(form)
        assert [s.path for s in shard_set.shards] == expected, form
    assert [s.samples for s in resolve_sets(str(tmp_path))[0].shards] == [2, 2, 2]  # counts come from the manifest
    (tmp_path / "manifest.json").unlink()
    assert [s.path for s in resolve_sets(str(tmp_path))[0].shards] == expected  # a folder without manifest: *.tar
    mixed = resolve_sets([{"pattern": str(tmp_path), "weight": 3}, {"pattern": expected[0]}])
    assert [(len(s.shards), s.weight) for s in mixed] == [(3, 3.0), (1, 1.0)]


def test_missing_shards_fail_at_start_and_say_what_to_do(tok, tmp_path: Path) -> None:
    shardgen.make_dataset(tmp_path / "d", shards=3, per_shard=2)
    cases = {
        f"{tmp_path}/d/shard-{{000000..000003}}.tar": "shard-000003.tar",  # the range runs past the last shard
        f"{tmp_path}/empty": "matched no shards",
        f"{tmp_path}/d/nothing-*.tar": "matched no shards",
    }
    (tmp_path / "empty").mkdir()
    for spec, message in cases.items():
        with pytest.raises(ShardError, match=message):
            build_loader(tiny_config(tok, spec), rank=0, world=1)
    (tmp_path / "d" / "shard-000001.tar").unlink()
    with pytest.raises(ShardError, match=r"1 of 3 shards are missing: .*shard-000001.tar.*rerun shard-data"):
        build_loader(tiny_config(tok, str(tmp_path / "d")), rank=0, world=1)
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    (tmp_path / "d" / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ShardError, match="did not finish"):
        build_loader(tiny_config(tok, str(tmp_path / "d")), rank=0, world=1)
    empty = {**manifest, "shards": [{**sh, "samples": 0} for sh in manifest["shards"]], "skipped": {"no_texts": 6}}
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(empty))  # as shard-data wrote them before it refused
    with pytest.raises(ShardError, match=r"holds no sample .*no_texts"):  # was: a run folder, then a later failure
        resolve_sets(str(tmp_path / "d"), name="data.train_shards")


def test_a_shard_list_is_checked_by_listing_its_folder_not_by_a_stat_per_shard(tmp_path: Path, monkeypatch) -> None:
    """Every rank checks the shard lists at start: a stat per shard was 5 million metadata calls for 10,000 shards on
    512 ranks (Lustre, GPFS). One listing of the folder now; what is missing is still named."""
    folder = tmp_path / "d"
    shardgen.make_dataset(folder, shards=40, per_shard=1)
    shards = {str(folder / f"shard-{i:06d}.tar") for i in range(40)}
    stats: list[str] = []
    real_stat = os.stat

    def counting_stat(path, *args, **kwargs):
        if str(path) in shards:
            stats.append(str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    for form in (str(folder), str(folder / "manifest.json"), f"{folder}/shard-{{000000..000039}}.tar"):
        (shard_set,) = resolve_sets(form)
        assert len(shard_set.shards) == 40 and stats == [], form  # was 40 stats each
    (folder / "shard-000007.tar").unlink()
    (folder / "shard-000007.tar").mkdir()  # a folder by a shard's name is no shard
    (folder / "shard-000009.tar").unlink()
    (folder / "shard-000009.tar").symlink_to(folder / "shard-000001.tar")  # a link to one is
    with pytest.raises(ShardError, match=r"1 of 40 shards are missing: \S*shard-000007.tar\. "):
        resolve_sets(str(folder))


def row_segments(batch: dict) -> list[list[int]]:
    """The token ids of every real sample, split where position_ids restart."""
    out = []
    for r, keys in enumerate(batch.stats.keys):
        starts = [*(batch.inputs.position_ids[r] == 0).nonzero().flatten().tolist(), batch.inputs.input_ids.shape[1]]
        out += [batch.inputs.input_ids[r, starts[i] : starts[i + 1]].tolist() for i in range(len(keys))]
    return out


def test_finite_two_ranks_two_workers_read_every_sample_exactly_once(tok, tmp_path: Path) -> None:
    keys = shardgen.make_dataset(tmp_path, shards=6, per_shard=12)  # 6 shards over 4 readers: 2, 2, 1, 1
    cfg = tiny_config(tok, str(tmp_path), data={"num_workers": 2, "shuffle_buffer": 16})
    from toolkit.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    seen, readers = [], set()
    for rank in range(2):
        batches, counts = run(cfg, rank=rank, world=2)
        seen += batch_keys(batches)
        readers |= {b.stats.reader for b in batches}
        assert counts == {"read": len(batch_keys(batches)), "skipped": {}}
        for batch in batches:  # the tokens in each slot are those of the key the batch names
            names = [k.rsplit(":", 1)[1] for row in batch.stats.keys for k in row]
            for name, ids in zip(names, row_segments(batch), strict=True):
                assert f"picture {name}?" in tokenizer.decode(ids)
    assert Counter(seen) == Counter(keys)
    assert readers == {0, 1, 2, 3}


def test_fewer_shards_than_readers_split_by_sample(tok, tmp_path: Path) -> None:
    keys = shardgen.make_dataset(tmp_path, shards=3, per_shard=9)
    cfg = tiny_config(tok, str(tmp_path))
    per_rank = [batch_keys(run(cfg, rank=r, world=4)[0]) for r in range(4)]  # 4 readers, 3 shards
    assert Counter(k for keys_ in per_rank for k in keys_) == Counter(keys)
    assert [len(k) for k in per_rank] == [7, 7, 7, 6]  # 27 samples dealt by running index, nobody idles


def test_fewer_shards_than_readers_in_infinite_mode_keeps_going(tok, tmp_path: Path) -> None:
    keys = shardgen.make_dataset(tmp_path, shards=1, per_shard=10)
    cfg = tiny_config(tok, str(tmp_path))
    seen = []
    for rank in range(3):
        batches, _ = run(cfg, rank=rank, world=3, finite=False, batches=6)  # several epochs of 3-4 samples
        assert len(batches) == 6
        seen.append(set(batch_keys(batches)))
    # Every epoch deals the one shard's samples by running index: each rank its own 4, 3 or 3, none shared, none
    # left out (every rank reading all 10, or overlapping splits, also gave 6 batches).
    assert sorted(len(s) for s in seen) == [3, 3, 4] and set().union(*seen) == set(keys)


def test_a_reader_that_can_never_get_a_sample_raises_instead_of_hanging(tok, tmp_path: Path) -> None:
    shardgen.make_dataset(tmp_path, shards=1, per_shard=2)
    with pytest.raises(ShardError, match="no samples in a whole epoch"):
        run(tiny_config(tok, str(tmp_path)), rank=3, world=4, finite=False, batches=1)


def broken_set(folder: Path) -> tuple[list[str], dict[str, int]]:
    """Five shards with known damage; returns the keys that must come out and the exact skip counts."""
    folder.mkdir()
    bad = [
        Spec("nt000", {"source": "x"}, good("nt000").images),  # no texts
        Spec("cj000", good("cj000").meta, [("img0.jpg", shardgen.corrupt_jpeg())]),  # header does not parse
        Spec("tj000", good("tj000").meta, [("img0.jpg", shardgen.truncated_jpeg())]),  # fails at full decode
        Spec("bj000", b"{not json", good("bj000").images),
        Spec("bt000", {"texts": [{"user": 3, "assistant": "x"}]}, good("bt000").images),
        good("mi000", images=2),  # more than data.max_images_per_example=1
        good("tl000", turns=40),  # longer than data.max_sample_length
    ]
    shard0 = [good(f"g0x{i:03d}", seed=i) for i in range(8)]
    write_shard(folder / "shard-000000.tar", shard0[:4] + bad + shard0[4:])
    shard1 = [good(f"g1x{i:03d}", seed=100 + i) for i in range(10)]
    write_shard(folder / "shard-000001.tar", shard1, truncate_in="g1x006")  # 0..5 survive
    shard2 = [good(f"g2x{i:03d}", seed=200 + i) for i in range(6)]
    write_shard(folder / "shard-000002.tar", shard2)
    (folder / "shard-000003.tar").write_bytes(b"this is not a tar file" * 40)
    shard4 = [good(f"g4x{i:03d}", seed=400 + i) for i in range(7)]
    write_shard(folder / "shard-000004.tar", shard4, cut_after="g4x004")  # no end blocks: g4x004 may lack images
    counts = {"shard-000000.tar": 15, "shard-000001.tar": 10, "shard-000002.tar": 6, "shard-000003.tar": 1,
              "shard-000004.tar": 7}  # fmt: skip
    shardgen.write_manifest(folder, counts)
    keep = [s.key for s in shard0 + shard1[:6] + shard2 + shard4[:4]]
    skipped = {"bad_image": 2, "bad_json": 1, "bad_tar": 1, "bad_types": 1, "no_texts": 1, "too_long": 1,
               "too_many_images": 1, "truncated_tar": 2}  # fmt: skip
    return keep, skipped


@pytest.mark.parametrize(
    ("world", "workers", "pil_loads_truncated"),
    [(1, 2, False), (7, 0, False), (1, 0, True)],
    ids=["by-shard-2-workers", "by-sample-7-ranks", "pil-told-to-load-truncated-images"],
)
def test_broken_data_streams_through_with_exact_skip_counts(
    tok, tmp_path: Path, world: int, workers: int, pil_loads_truncated: bool, monkeypatch
) -> None:
    """The last case: PIL's process-wide LOAD_TRUNCATED_IMAGES on (lmms-eval sets it when imported) must not let
    the cut JPEG through as an image, and the flag is left as it was found."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", pil_loads_truncated)
    keep, skipped = broken_set(tmp_path / "d")
    cfg = tiny_config(tok, str(tmp_path / "d"), data={"num_workers": workers, "max_images_per_example": 1,
                                                     "max_sample_length": 200})  # fmt: skip
    seen, totals, read = [], Counter(), 0
    for rank in range(world):
        batches, counts = run(cfg, rank=rank, world=world)
        seen += batch_keys(batches)
        totals.update(counts["skipped"])
        read += counts["read"]
    assert Counter(seen) == Counter(keep)
    assert dict(totals) == skipped
    assert read == len(keep) + 7  # every sample taken out of a tar, good or bad at sample level
    assert ImageFile.LOAD_TRUNCATED_IMAGES is pil_loads_truncated


def test_mixture_follows_the_weights_and_the_seed(tok, tmp_path: Path) -> None:
    shardgen.make_dataset(tmp_path / "a", shards=2, per_shard=30, prefix="a")
    shardgen.make_dataset(tmp_path / "b", shards=2, per_shard=30, prefix="b")

    def draw(weights: tuple[float, float], seed: int = 0) -> list[str]:
        sets = [{"pattern": str(tmp_path / "a"), "weight": weights[0]},
                {"pattern": str(tmp_path / "b"), "weight": weights[1]}]  # fmt: skip
        cfg = tiny_config(tok, sets, data={"seed": seed, "shuffle_buffer": 1, "buffer_packs": 1})
        return batch_keys(run(cfg, finite=False, batches=60)[0])

    first = draw((3, 1))
    share = sum(k.startswith("a") for k in first) / len(first)
    assert len(first) > 400
    assert 0.70 <= share <= 0.80, share
    assert draw((3, 1)) == first  # deterministic from the seed
    assert draw((3, 1), seed=1) != first
    assert 0.20 <= sum(k.startswith("a") for k in draw((1, 3))) / len(first) <= 0.30


def test_infinite_epochs_visit_every_sample_once_in_a_new_order(tmp_path: Path) -> None:
    keys = shardgen.make_dataset(tmp_path, shards=5, per_shard=4)
    (shard_set,) = resolve_sets(str(tmp_path))
    reader = SetReader(shard_set, 0, slot=ReaderSlot(0, 1), seed=0, finite=False, counter=SkipCounter())
    epochs = [[reader.next().key for _ in keys] for _ in range(3)]
    assert all(sorted(e) == sorted(keys) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3


def test_a_shard_that_vanishes_mid_run_is_counted_not_fatal(tok, tmp_path: Path) -> None:
    """A shard deleted while the run goes on is data loss, not a config error: counted, and the run goes on."""
    shardgen.make_dataset(tmp_path / "d", shards=3, per_shard=4)
    cfg = tiny_config(tok, str(tmp_path / "d"))
    loader = build_loader(cfg, rank=0, world=1, finite=True)
    shutil.move(tmp_path / "d" / "shard-000002.tar", tmp_path / "gone.tar")
    keys = batch_keys(list(loader))
    assert len(keys) == 8
    assert loader.counts()["skipped"] == {"unreadable_shard": 1}
