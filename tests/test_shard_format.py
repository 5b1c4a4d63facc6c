"""The shard format: one definition for writer and reader, tars that end early, and skips counted in every path."""

from __future__ import annotations

import ast
import gzip
import json
import shutil
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import shardgen
from shardgen import Spec, good, tiny_config, write_shard

from toolkit.config import Config
from toolkit.data import format as fmt
from toolkit.data.loader import EndOfPass, build_loader, data_stats
from toolkit.data.prepare.shard_writer import ListSource, write_shards
from toolkit.data.shards import (
    ReaderSlot,
    SetReader,
    ShardScan,
    SkipCounter,
    image_members,
    resolve_sets,
    shard_order,
)

DATA = Path(fmt.__file__).parent


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> tuple[str, int]:
    return shardgen.make_tokenizer(tmp_path_factory.mktemp("tok"))


# ---------------------------------------------------------------------------------------------- one definition


def test_the_writer_names_members_as_the_reader_parses_them(tmp_path: Path) -> None:
    png, jpg = shardgen.image_bytes(30, 20), shardgen.image_bytes(20, 30, fmt="JPEG", seed=1)
    rows = [
        {"images": [png, jpg], "texts": [{"user": "q", "assistant": "a"}]},
        {"texts": [{"user": "q", "assistant": "b"}]},
    ]
    manifest = write_shards(ListSource("rows", rows), tmp_path, shard_size="10")
    assert manifest["format"] == fmt.FORMAT and (tmp_path / fmt.MANIFEST).is_file()
    with tarfile.open(tmp_path / fmt.shard_name(0)) as tar:
        names = tar.getnames()
    keys = [f"{i:010d}" for i in range(2)]
    assert names == [fmt.json_member(keys[0]), fmt.image_member(keys[0], 0, "png"), fmt.image_member(keys[0], 1, "jpg"),
                     fmt.json_member(keys[1])]  # fmt: skip
    assert [fmt.split_member(n) for n in names] == [(keys[0], "json"), (keys[0], "img0.png"), (keys[0], "img1.jpg"),
                                                    (keys[1], "json")]  # fmt: skip
    (shard_set,) = resolve_sets(str(tmp_path))
    assert [Path(s.path).name for s in shard_set.shards] == [fmt.shard_name(0)]
    samples = {key: files for _, key, files in ShardScan(shard_set.shards[0].path)}
    assert image_members(samples[keys[0]]) == [png, jpg] and image_members(samples[keys[1]]) == []


def test_images_are_ordered_by_index_not_by_name() -> None:
    exts = ["img10.png", "json", "img2.jpg", "img0.webp", "image.png", "img1"]
    assert fmt.image_exts(exts) == ["img0.webp", "img2.jpg", "img10.png"]
    assert fmt.split_member("a/b/k.7.img0.png") == ("a/b/k", "7.img0.png")


def _calls_with_a_literal_reason(path: Path) -> list[str]:
    """Skip(...), SkipRow(...), BadRow(...) or an `error = (...)` whose reason is spelled out instead of named."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        first = None
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("Skip", "SkipRow", "BadRow"):
            first = node.args[0] if node.args else None
        elif isinstance(node, ast.Assign) and any(getattr(t, "attr", None) == "error" for t in node.targets):
            first = node.value.elts[0] if isinstance(node.value, ast.Tuple) and node.value.elts else None
        if isinstance(first, ast.Constant):
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_skip_reasons_are_named_in_the_format_only() -> None:
    modules = [DATA / "shards.py", DATA / "loader.py", *sorted((DATA / "prepare").glob("*.py"))]
    assert [hit for m in modules for hit in _calls_with_a_literal_reason(m)] == []
    reasons = fmt.READ_SKIPS + fmt.WRITE_SKIPS
    assert len(set(fmt.READ_SKIPS)) == len(fmt.READ_SKIPS) and len(set(fmt.WRITE_SKIPS)) == len(fmt.WRITE_SKIPS)
    assert set(fmt.READ_SKIPS) & set(fmt.WRITE_SKIPS) == {fmt.NO_TEXTS} and all(r.islower() for r in reasons)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_reading_and_preparing_do_not_import_each_other() -> None:
    reading = {p.name: _imports(p) for p in DATA.glob("*.py")}
    preparing = {p.name: _imports(p) for p in (DATA / "prepare").glob("*.py")}
    assert {"shards.py", "loader.py", "packing.py", "collate.py", "format.py"} <= set(reading)
    assert {"shard_writer.py", "sources.py", "samples.py", "token_stats.py", "synthetic.py"} <= set(preparing)
    assert not set(reading) & (set(preparing) - {"__init__.py"})  # moved, with nothing left behind
    assert {n: [i for i in imp if i.startswith("toolkit.data.prepare")] for n, imp in reading.items()} == {
        n: [] for n in reading
    }
    reader_modules = tuple(f"toolkit.data.{m}" for m in ("shards", "loader", "packing", "collate"))
    assert {n: [i for i in imp if i.startswith(reader_modules)] for n, imp in preparing.items()} == {
        n: [] for n in preparing
    }
    assert "toolkit.data.format" in preparing["shard_writer.py"] and "toolkit.data.format" in reading["shards.py"]


# ---------------------------------------------------------------------------------------------- tars that end early


def samples(n: int = 6, prefix: str = "t") -> list[Spec]:
    return [good(f"{prefix}{i:03d}", seed=i) for i in range(n)]


def cut_tar(path: Path, specs: list[Spec], cut: str) -> None:
    """A tar written by Python's tarfile, then cut: inside the last member's data or header, or in its end."""
    write_shard(path, specs)
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    data_end = last.offset_data + -(-last.size // 512) * 512  # where the end-of-archive blocks begin
    at = {"in_data": last.offset_data + last.size // 2, "in_header": last.offset + 100, "no_end": data_end,
          "one_end_block": data_end + 512, "short_end_block": data_end + 768}[cut]  # fmt: skip
    path.write_bytes(path.read_bytes()[:at])


CUTS = ["in_data", "in_header", "no_end", "one_end_block", "short_end_block"]


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("readers", [1, 4], ids=["one-reader", "by-sample-4-readers"])
def test_a_truncated_tar_without_manifest_is_counted_once_and_keeps_the_samples_before_the_cut(
    tmp_path: Path, cut: str, readers: int
) -> None:
    specs = samples()
    cut_tar(tmp_path / "shard-000000.tar", specs, cut)
    assert not (tmp_path / fmt.MANIFEST).exists()
    (shard_set,) = resolve_sets(str(tmp_path))
    keys, skipped = [], Counter()
    for index in range(readers):  # each reader walks the whole tar and keeps every readers-th sample
        counter = SkipCounter()
        reader = SetReader(shard_set, 0, slot=ReaderSlot(index, readers), seed=0, finite=True, counter=counter)
        while (raw := reader.next()) is not None:
            keys.append(raw.key)
        skipped.update(counter.skipped)
    assert sorted(keys) == [s.key for s in specs[:-1]]  # the last sample may have lost a member: dropped
    assert dict(skipped) == {fmt.TRUNCATED_TAR: 1}


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (3, 2)], ids=["one-reader", "by-sample-3-ranks-2-workers"])
def test_the_loader_counts_a_truncated_tar_once_per_job(tok, tmp_path: Path, world: int, workers: int) -> None:
    (tmp_path / "d").mkdir()
    cut_tar(tmp_path / "d" / "shard-000000.tar", samples(), "in_header")
    cfg = tiny_config(tok, str(tmp_path / "d"), data={"num_workers": workers})
    totals, read = Counter(), 0
    for rank in range(world):
        loader = build_loader(cfg, rank=rank, world=world, finite=True)
        for _ in loader:
            pass
        counts = loader.counts()
        totals.update(counts["skipped"])
        read += counts["read"]
    assert (dict(totals), read) == ({fmt.TRUNCATED_TAR: 1}, 5)


def write_with_gnu_tar(path: Path, specs: list[Spec]) -> None:
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    src = path.parent / "members"
    src.mkdir()
    names = []
    for spec in specs:
        for ext, data in [("json", json.dumps(spec.meta).encode()), *spec.images]:
            (src / f"{spec.key}.{ext}").write_bytes(data)
            names.append(f"{spec.key}.{ext}")
    subprocess.run(["tar", "-cf", str(path), "-C", str(src), *names], check=True)
    shutil.rmtree(src)


def write_with_webdataset(path: Path, specs: list[Spec]) -> None:
    wds = pytest.importorskip("webdataset")
    with wds.TarWriter(str(path)) as sink:
        for spec in specs:
            sink.write({"__key__": spec.key, "json": json.dumps(spec.meta).encode(), **dict(spec.images)})


def write_gzipped(path: Path, specs: list[Spec]) -> None:
    plain = path.with_suffix(".plain")
    write_shard(plain, specs)
    with tarfile.open(plain) as src, tarfile.open(path, "w:gz") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
    plain.unlink()


@pytest.mark.parametrize("writer", ["tarfile", "gnu-tar", "webdataset", "gzip"])
def test_complete_tars_from_other_writers_are_not_counted(tok, tmp_path: Path, writer: str) -> None:
    specs, path = samples(), tmp_path / "d" / "shard-000000.tar"
    path.parent.mkdir()
    {"tarfile": write_shard, "gnu-tar": write_with_gnu_tar, "webdataset": write_with_webdataset,
     "gzip": write_gzipped}[writer](path, specs)  # fmt: skip
    scan = ShardScan(str(path))
    assert [key for _, key, _ in scan] == [s.key for s in specs] and scan.error is None and scan.groups == 6
    stats = data_stats(tiny_config(tok, str(path.parent)))
    assert (stats["samples_read"], stats["samples_packed"], stats["skipped"]) == (6, 6, {})


def test_a_gzipped_tar_cut_short_is_counted(tmp_path: Path) -> None:
    specs = samples(8)
    write_shard(tmp_path / "whole.tar", specs)
    with tarfile.open(tmp_path / "whole.tar") as tar:
        last = tar.getmembers()[-1]
    raw = (tmp_path / "whole.tar").read_bytes()[: last.offset_data + last.size // 2]
    (tmp_path / "cut.tar").write_bytes(gzip.compress(raw))  # a complete gzip stream of a cut tar
    scan = ShardScan(str(tmp_path / "cut.tar"))
    assert [key for _, key, _ in scan] == [s.key for s in specs[:-1]]
    assert scan.error is not None and scan.error[0] == fmt.TRUNCATED_TAR and scan.groups == 7


# ---------------------------------------------------------------------------------------------- every skip counted


def textless(key: str) -> Spec:
    """An image-caption pair without `texts`: not trainable as a conversation."""
    return Spec(key, {"source": "captions", "caption": f"a picture of {key}"}, good(key).images)


def mixed_set(folder: Path, *, good_samples: int, textless_samples: tuple[int, int]) -> None:
    """Two shards: good samples then text-less ones, and text-less ones only.

    The first is the shard that reader 0 of 2 (loader worker 0) reads, so worker 0 delivers its batches first and
    worker 1, with none to deliver, ends after them: its skips reach the loader only through the end marker."""
    folder.mkdir()
    first = shard_order(2, seed=Config().data.seed, set_index=0, epoch=0)[0]
    mixed = [good(f"g{i:03d}", seed=i) for i in range(good_samples)] + [
        textless(f"a{i:03d}") for i in range(textless_samples[0])
    ]
    write_shard(folder / f"shard-{first:06d}.tar", mixed)
    write_shard(folder / f"shard-{1 - first:06d}.tar", [textless(f"b{i:03d}") for i in range(textless_samples[1])])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_pass_where_no_sample_survives_counts_every_skip(tok, tmp_path: Path, workers: int) -> None:
    (tmp_path / "d").mkdir()
    write_shard(tmp_path / "d" / "shard-000000.tar", [textless(f"n{i:03d}") for i in range(60)])
    stats = data_stats(tiny_config(tok, str(tmp_path / "d"), data={"num_workers": workers}))
    assert (stats["samples_read"], stats["skipped"], stats["packs"]) == (60, {fmt.NO_TEXTS: 60}, 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_skips_are_counted_when_some_samples_survive(tok, tmp_path: Path, workers: int) -> None:
    """With 2 workers, one reads the shard with good samples and delivers batches, the other none at all."""
    mixed_set(tmp_path / "d", good_samples=2, textless_samples=(10, 50))
    stats = data_stats(tiny_config(tok, str(tmp_path / "d"), data={"num_workers": workers}))
    assert (stats["samples_read"], stats["samples_packed"], stats["skipped"]) == (62, 2, {fmt.NO_TEXTS: 60})
    assert stats["packs"] > 0


def test_a_validation_pass_with_next_never_sees_the_end_marker_and_counts_everything(tok, tmp_path: Path) -> None:
    mixed_set(tmp_path / "d", good_samples=2, textless_samples=(3, 15))
    cfg = tiny_config(tok, str(tmp_path / "d"), data={"num_workers": 2, "val_shards": str(tmp_path / "d")})
    loader = build_loader(cfg, rank=0, world=1, split="val")
    for _ in range(2):  # a second pass starts over and counts the same
        stream, batches = iter(loader), []
        while (batch := next(stream, None)) is not None:
            batches.append(batch)
        assert batches and not any(isinstance(b, EndOfPass) for b in batches)
        assert loader.counts() == {"read": 20, "skipped": {fmt.NO_TEXTS: 18}}
    assert data_stats(cfg)["skipped"] == {fmt.NO_TEXTS: 18}
