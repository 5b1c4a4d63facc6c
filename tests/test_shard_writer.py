"""shard-data: round trip from a cauldron-schema `datasets` table, skip accounting, refusal, resume, workers, JSONL.

Shards are read back with Python's tarfile only, so these tests do not depend on the training stream's reader.
"""

from __future__ import annotations

import dataclasses
import io
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from toolkit.data.prepare import shard_writer
from toolkit.data.prepare.shard_writer import (
    ListSource,
    OutMismatchError,
    ShardDataError,
    parse_shard_size,
    shard_data,
    write_shards,
)

FEATURES = datasets.Features(
    {
        "images": datasets.List(datasets.Image()),
        "texts": datasets.List({"user": datasets.Value("string"), "assistant": datasets.Value("string")}),
        "relevance_ratings": datasets.List(datasets.Value("int32")),
    }
)
EXPECTED_SKIPS = {"unreadable_image": 2, "no_texts": 1, "wrong_type": 1}


def noise_image(seed: int, size: tuple[int, int] = (20, 14)) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def jpeg_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    noise_image(seed, (24, 18)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def turn(i: int, j: int = 0) -> dict:
    return {"user": f"question {i}.{j}?", "assistant": f"answer {i}.{j}"}


def cauldron_rows() -> tuple[dict, dict[int, list]]:
    """12 rows: 8 good (PIL -> PNG, raw JPEG, both, text-only ...) and 4 bad ones, one per expected skip.

    Returns the columns and, per good row, the images as the test expects them back: ("jpg", bytes) or
    ("png", pixel array)."""
    rows: list[tuple[list, list, list]] = []
    expected: dict[int, list] = {}
    for i in range(12):
        images: list = []
        texts = [turn(i), turn(i, 1)] if i % 3 == 1 else [turn(i)]
        if i in (0, 2, 9):
            img = noise_image(i)
            images.append(img)
            expected[i] = [("png", np.asarray(img))]
        elif i in (1, 8, 11):
            data = jpeg_bytes(i)
            images.append({"bytes": data, "path": None})
            expected[i] = [("jpg", data)]
        elif i == 3:
            data, img = jpeg_bytes(i), noise_image(i)
            images += [{"bytes": data, "path": None}, img]
            expected[i] = [("jpg", data), ("png", np.asarray(img))]
        elif i == 10:
            expected[i] = []  # text-only is a valid sample
        elif i == 4:
            images.append({"bytes": b"this is not an image", "path": None})
        elif i == 5:
            texts = []
        elif i == 6:
            texts = [{"user": None, "assistant": "an answer without a question"}]
        elif i == 7:
            images.append({"bytes": jpeg_bytes(i)[:300], "path": None})  # truncated: fails only on full decode
        rows.append((images, texts, [i] * len(texts)))
    columns = {"images": [r[0] for r in rows], "texts": [r[1] for r in rows], "relevance_ratings": [r[2] for r in rows]}
    return columns, expected


@pytest.fixture(scope="module")
def cauldron(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict[int, list]]:
    columns, expected = cauldron_rows()
    src = tmp_path_factory.mktemp("cauldron") / "ds"
    datasets.Dataset.from_dict(columns, features=FEATURES).save_to_disk(str(src))
    return src, columns, expected


def read_shards(out: Path) -> list[tuple[str, dict, list[tuple[str, bytes]]]]:
    """(key, json, [(image extension, bytes), ...]) for every sample, in shard and tar order."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples: dict[str, tuple[dict, list]] = {}
    for shard in manifest["shards"]:
        assert (out / shard["name"]).stat().st_size == shard["bytes"]
        with tarfile.open(out / shard["name"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                meta, images = samples.setdefault(key, ({}, []))
                if ext == "json":
                    meta.update(json.loads(data))
                else:
                    images.append((ext, data))
    return [(key, meta, images) for key, (meta, images) in samples.items()]


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def test_shards_whose_rows_were_all_skipped_are_left_out(cauldron, tmp_path):
    """One row a shard: the 4 bad rows' shards held no sample. They were listed and kept, so a loader reader
    given only such shards failed with 'no samples in a whole epoch'."""
    src, _, expected = cauldron
    out = tmp_path / "out"
    manifest = shard_data(str(src), str(out), shard_size="1")
    names = [f"shard-{i:06d}.tar" for i in sorted(expected)]
    assert [s["name"] for s in manifest["shards"]] == names and all(s["samples"] == 1 for s in manifest["shards"])
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", *names]
    assert manifest["samples"] == len(expected) and manifest["skipped"] == EXPECTED_SKIPS
    assert shard_data(str(src), str(out), shard_size="1", resume=True) == manifest  # complete: left as it is


def test_round_trip_keeps_texts_pixels_and_jpeg_bytes_and_counts_skips(cauldron, tmp_path):
    src, columns, expected = cauldron
    out = tmp_path / "out"
    manifest = shard_data(str(src), str(out), shard_size="3")

    assert manifest["complete"] is True and manifest["format"] == "nanovlm-scale-shards/1"
    assert manifest["skipped"] == EXPECTED_SKIPS
    assert manifest["samples"] == len(expected) == sum(s["samples"] for s in manifest["shards"])
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [s["name"] for s in manifest["shards"]]
    assert json.loads((out / "manifest.json").read_text()) == manifest

    samples = read_shards(out)
    assert [key for key, _, _ in samples] == [f"{i:010d}" for i in sorted(expected)]
    for key, meta, images in samples:
        i = int(key)
        assert meta["texts"] == columns["texts"][i]
        assert meta["relevance_ratings"] == [i] * len(columns["texts"][i])
        assert meta["source"] == str(src.resolve())
        assert [ext.split(".")[0] for ext, _ in images] == [f"img{k}" for k in range(len(expected[i]))]
        for (ext, data), (want_ext, want) in zip(images, expected[i]):
            assert ext.endswith("." + want_ext)
            if want_ext == "jpg":
                assert data == want  # the original bytes, never re-encoded
            else:
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), want)


def test_rerun_into_same_out_refuses_and_resume_of_complete_run_is_a_no_op(cauldron, tmp_path):
    src, _, _ = cauldron
    out = tmp_path / "out"
    first = shard_data(str(src), str(out), shard_size="4")
    before = shard_bytes(out)
    with pytest.raises(ShardDataError, match="--resume"):
        shard_data(str(src), str(out), shard_size="4")
    assert shard_data(str(src), str(out), shard_size="4", resume=True) == first
    with pytest.raises(OutMismatchError, match="shard_size"):
        shard_data(str(src), str(out), shard_size="5", resume=True)
    assert shard_bytes(out) == before


class Killed(BaseException):
    """Stands in for SIGKILL / Ctrl-C: a BaseException, so no `except Exception` in the writer can absorb it."""


def test_resume_finishes_an_interrupted_run_without_rewriting_or_duplicating(cauldron, tmp_path, monkeypatch):
    src, _, expected = cauldron
    reference = shard_data(str(src), str(tmp_path / "ref"), shard_size="2")
    out = tmp_path / "out"
    real = shard_writer.write_shard
    calls: list[str] = []
    armed = [True]

    def killed_on_third_shard(source, job, out_dir, **kwargs):
        calls.append(job.name)
        if armed[0] and len(calls) == 3:  # a killed writer leaves a half-written temporary file behind
            (out_dir / f".{job.name}.tmp").write_bytes(b"half a tar")
            raise Killed
        return real(source, job, out_dir, **kwargs)

    monkeypatch.setattr(shard_writer, "write_shard", killed_on_third_shard)
    with pytest.raises(Killed):
        shard_data(str(src), str(out), shard_size="2")
    interrupted = json.loads((out / "manifest.json").read_text())
    assert interrupted["complete"] is False and interrupted["shards"] == []
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    with pytest.raises(ShardDataError, match="--resume"):
        shard_data(str(src), str(out), shard_size="2")
    with pytest.raises(OutMismatchError):
        shard_data(str(src), str(out), shard_size="3", resume=True)

    calls.clear()
    armed[0] = False
    manifest = shard_data(str(src), str(out), shard_size="2", resume=True)
    assert calls == [f"shard-{i:06d}.tar" for i in range(2, 6)]  # finished shards are not written again
    assert manifest == reference
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref")
    keys = [key for key, _, _ in read_shards(out)]
    assert keys == sorted(set(keys)) and len(keys) == len(expected)
    assert not list(out.glob(".*"))  # no temporary file or progress record left


def test_two_workers_write_the_same_shards_as_one_in_byte_mode(cauldron, tmp_path):
    src, _, _ = cauldron
    one = shard_data(str(src), str(tmp_path / "one"), shard_size="3KB", workers=1)
    two = shard_data(str(src), str(tmp_path / "two"), shard_size="3KB", workers=2)
    assert len(one["shards"]) >= 3
    assert one == two
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")


def test_subsets_are_concatenated_in_order_with_split_and_parquet(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    src = tmp_path / "src"
    img = noise_image(1)
    a = datasets.Dataset.from_dict({"images": [[img]] * 2, "texts": [[turn(0)], [turn(1)]]}, split="test")
    a.save_to_disk(str(src / "a"))  # a saved Dataset of the split asked for
    b = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"images": [[img]], "texts": [[turn(9)]]}),
            "test": datasets.Dataset.from_dict({"images": [[img]] * 2, "texts": [[turn(2)], [turn(3)]]}),
        }
    )
    b.save_to_disk(str(src / "b"))
    (src / "c").mkdir()
    datasets.Dataset.from_dict({"images": [[img]], "texts": [[turn(4)]]}).to_parquet(str(src / "c" / "test.parquet"))

    manifest = shard_data(str(src), str(tmp_path / "out"), subsets=["a", "b", "c"], split="test", shard_size="2")
    samples = read_shards(tmp_path / "out")
    assert [m["texts"][0]["user"] for _, m, _ in samples] == [turn(i)["user"] for i in range(5)]
    assert [m["source"] for _, m, _ in samples] == ["a", "a", "b", "b", "c"]
    assert manifest["subsets"] == ["a", "b", "c"] and manifest["samples"] == 5

    with pytest.raises(ShardDataError, match="sub-folders"):
        shard_data(str(src), str(tmp_path / "missing"), subsets=["a", "nope"])
    with pytest.raises(ShardDataError, match="--subsets a,b,c"):
        shard_data(str(src), str(tmp_path / "none"))


def test_a_source_of_one_split_refuses_another_split_name(tmp_path, monkeypatch):
    """A single parquet, arrow or JSONL file, or a saved Dataset, has one split: `--split validation` wrote its
    training rows as "validation" (a run then validated on its training data). Refused, writing nothing; a
    saved Dataset cut from that split, and the default split, are read."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    rows = datasets.Dataset.from_dict({"images": [[noise_image(1)]], "texts": [[turn(0)]]})
    rows.to_parquet(str(tmp_path / "one.parquet"))
    rows.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "one.jsonl").write_text(json.dumps({"texts": [turn(0)]}) + "\n")
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for src in (tmp_path / "one.parquet", arrow, tmp_path / "saved", tmp_path / "one.jsonl"):
        with pytest.raises(ShardDataError, match="--split validation would label its rows"):
            shard_data(str(src), str(tmp_path / "val"), split="validation")
        assert not (tmp_path / "val").exists()
    cut = datasets.Dataset.from_dict(rows.to_dict(), split=datasets.Split.VALIDATION)
    cut.save_to_disk(str(tmp_path / "cut"))
    assert shard_data(str(tmp_path / "cut"), str(tmp_path / "val"), split="validation")["samples"] == 1
    assert shard_data(str(tmp_path / "saved"), str(tmp_path / "train"))["split"] == "train"


def test_jsonl_with_image_folder_and_bad_lines(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    noise_image(3).save(images / "a.png")
    jpg = jpeg_bytes(4)
    (images / "sub" / "b.jpg").write_bytes(jpg)
    good = [
        {"images": ["a.png"], "texts": [turn(0)]},
        {"images": ["sub/b.jpg", "a.png"], "texts": [turn(1), turn(1, 1)], "id": "x1"},
        {"texts": [turn(2)]},
    ]
    bad = [
        '{"images": ["missing.png"], "texts": [{"user": "q", "assistant": "a"}]}',  # missing_image
        '{"images": ["a.png"], "texts": "a string"',  # invalid_json
        '{"images": ["a.png"], "texts": "a string"}',  # wrong_type
        '{"images": "a.png", "texts": [{"user": "q", "assistant": "a"}]}',  # wrong_type
        '["not", "an", "object"]',  # wrong_type
        '{"texts": [{"user": "lone surrogate \\ud800", "assistant": "a"}]}',  # wrong_type: not encodable
    ]
    lines = [json.dumps(good[0]), bad[0], json.dumps(good[1]), "", bad[1], bad[2], json.dumps(good[2]), *bad[3:]]
    src = tmp_path / "data.jsonl"
    src.write_text("\n".join(lines) + "\n")

    manifest = shard_data(str(src), str(tmp_path / "out"), images=str(images), shard_size="1MB")
    assert manifest["skipped"] == {"invalid_json": 1, "missing_image": 1, "wrong_type": 4}
    assert manifest["rows"] == 9 and manifest["samples"] == 3
    samples = read_shards(tmp_path / "out")
    assert [m["texts"] for _, m, _ in samples] == [g["texts"] for g in good]
    assert samples[1][1]["id"] == "x1"
    assert samples[1][2] == [("img0.jpg", jpg), ("img1.png", (images / "a.png").read_bytes())]
    assert samples[2][2] == []


def test_jsonl_singular_image_key_and_llava_placeholders(tmp_path):
    """`"image": "a.png"` is one image (it was dropped and the row written text-only); `<image>` placeholders are
    stripped when there is one per image and the row is counted when there is not."""
    images = tmp_path / "images"
    images.mkdir()
    noise_image(5).save(images / "a.png")
    q = [{"user": "q", "assistant": "a"}]
    rows = [
        {"image": "a.png", "texts": q},
        {"images": ["a.png"], "texts": [{"user": "<image>\nWhat is it?", "assistant": "a shape"}]},
        {"image": "a.png", "texts": [{"user": "Compare <image> with this.", "assistant": "same"}]},
        {"images": ["a.png"], "texts": [{"user": "<image><image>\nCompare.", "assistant": "same"}]},  # 2 for 1
        {"texts": [{"user": "<image>\nWhat?", "assistant": "x"}]},  # a placeholder, no image
        {"image": "a.png", "images": ["a.png"], "texts": q},  # both keys: which?
        {"image": ["a.png", "a.png"], "texts": q},
    ]
    src = tmp_path / "data.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    manifest = shard_data(str(src), str(tmp_path / "out"), images=str(images), shard_size="1MB")
    assert manifest["skipped"] == {"placeholder_mismatch": 2, "wrong_type": 1}
    samples = read_shards(tmp_path / "out")
    png = (images / "a.png").read_bytes()
    assert [imgs for _, _, imgs in samples] == [[("img0.png", png)]] * 3 + [[("img0.png", png), ("img1.png", png)]]
    assert [m["texts"][0]["user"] for _, m, _ in samples] == ["q", "What is it?", "Compare with this.", "q"]
    assert all("image" not in m for _, m, _ in samples)  # the path is not kept as a JSON field


def test_python_rows_encode_pil_losslessly_and_skip_wrong_types(tmp_path):
    img = noise_image(7)
    rows = [
        {"images": [img], "texts": [turn(0)], "question_type": "colour", "blob": b"not json"},
        {"images": [42], "texts": [turn(1)]},
        {"images": [img], "texts": [{"user": "q"}]},
        {"images": [img], "texts": None},
        {"images": [img], "texts": [{"user": "q\ud800", "assistant": "a"}]},  # a lone surrogate: not UTF-8
    ]
    manifest = write_shards(ListSource("rows", rows), tmp_path / "out", shard_size="10")
    assert manifest["skipped"] == {"wrong_type": 3, "no_texts": 1}
    [(_, meta, images)] = read_shards(tmp_path / "out")
    assert meta == {"texts": [turn(0)], "source": "rows", "question_type": "colour"}
    assert images[0][0] == "img0.png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(images[0][1]))), np.asarray(img))


def test_token_histogram_counts_the_encoded_conversation(cauldron, tmp_path, tiny_cfg):
    from toolkit.data.conversation import encode_sample
    from toolkit.data.images import process_image
    from toolkit.data.prepare.synthetic import train_tokenizer
    from toolkit.data.tokenizer import load_tokenizer

    src, columns, expected = cauldron
    ckpt = tmp_path / "ckpt"
    tok_dir = train_tokenizer(ckpt / "tokenizer", tiny_cfg.lm_base_vocab_size)
    (ckpt / "config.json").write_text(json.dumps({**dataclasses.asdict(tiny_cfg), "lm_tokenizer": "tokenizer"}))
    tiny_cfg.tokenizer = str(tok_dir)
    tok = load_tokenizer(tiny_cfg)

    def length(i: int, with_images: bool) -> int:
        grids = []
        for ext, data in expected[i] if with_images else []:
            img = Image.fromarray(data) if ext == "png" else Image.open(io.BytesIO(data))
            grids.append(process_image(img, tile=32, max_side=64, resize_to_max=True)[1])
        return len(encode_sample(tok, columns["texts"][i], grids, tiny_cfg.mp_image_token_length)[0])

    for given, with_images in ((ckpt, True), (tok_dir, True), (tmp_path / "bare", False)):
        if given.name == "bare":
            given = train_tokenizer(given, tiny_cfg.lm_base_vocab_size)  # no config.json anywhere near: text only
        out = tmp_path / f"out-{given.name}"
        hist = shard_data(str(src), str(out), shard_size="100", tokenizer=str(given))["token_histogram"]
        want = [length(i, with_images) for i in sorted(expected)]
        assert hist["includes_image_tokens"] is with_images
        assert (hist["min"], hist["max"]) == (min(want), max(want))
        assert hist["counts"] == np.histogram(want, bins=hist["bin_edges"])[0].tolist()


def test_uncached_hub_name_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(ShardDataError, match="local Hugging Face cache"):
        shard_data("no-such-user/no-such-dataset", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_parse_shard_size():
    assert parse_shard_size("1000") == shard_writer.ShardSize("samples", 1000)
    assert parse_shard_size("256MB") == shard_writer.ShardSize("bytes", 256_000_000)
    assert parse_shard_size("2KiB") == shard_writer.ShardSize("bytes", 2048)
    for bad in ("", "12 parsecs", "0", "MB"):
        with pytest.raises(ShardDataError, match="shard-size"):
            parse_shard_size(bad)


def test_parts_then_merge_equal_one_run_byte_for_byte(cauldron, tmp_path):
    """--part 0/2 and --part 1/2 into one OUT, then --merge: the shards and the manifest of one run."""
    from toolkit.data.prepare.shard_writer import merge_parts

    src, _, _ = cauldron
    one = shard_data(str(src), str(tmp_path / "one"), shard_size="2", tokenizer=None)
    part0 = shard_data(str(src), str(tmp_path / "parts"), shard_size="2", part=(0, 2))
    assert part0["complete"] is False and part0["part_shards"] == 3  # shards 0, 2, 4 of 6
    assert sorted(shard_bytes(tmp_path / "parts")) == ["shard-000000.tar", "shard-000002.tar", "shard-000004.tar"]
    with pytest.raises(ShardDataError, match="3 of 6 shards are not written yet"):
        merge_parts(tmp_path / "parts")
    shard_data(str(src), str(tmp_path / "parts"), shard_size="2", part=(1, 2))
    shard_data(str(src), str(tmp_path / "parts"), shard_size="2", part=(1, 2), resume=True)  # a rerun writes nothing
    merged = merge_parts(tmp_path / "parts")
    assert merged == one and len(one["shards"]) == 4  # rows 4-7 (shards 2 and 3) are all skipped
    assert shard_bytes(tmp_path / "parts") == shard_bytes(tmp_path / "one")
    assert (tmp_path / "parts" / "manifest.json").read_bytes() == (tmp_path / "one" / "manifest.json").read_bytes()
    assert not list((tmp_path / "parts").glob(".*"))


def test_holdout_is_disjoint_deterministic_and_spread(cauldron, tmp_path):
    src, _, expected = cauldron
    first = shard_data(str(src), str(tmp_path / "a"), shard_size="4", holdout="3")
    again = shard_data(str(src), str(tmp_path / "b"), shard_size="4", holdout="3")
    assert first == again and shard_bytes(tmp_path / "a" / "val") == shard_bytes(tmp_path / "b" / "val")
    train = {key for key, _, _ in read_shards(tmp_path / "a" / "train")}
    val = {key for key, _, _ in read_shards(tmp_path / "a" / "val")}
    assert not train & val
    assert sorted(int(k) for k in val) == [0, 8]  # rows 12 x j / 3 = 0, 4, 8: spread out (row 4 is a bad image)
    assert first["holdout"]["skipped"] == {"unreadable_image": 1}
    assert train | val == {f"{i:010d}" for i in expected}  # every good row lands in exactly one of them
    assert first["holdout"]["samples"] == 2 and first["samples"] == len(expected) - 2
    fraction = shard_data(str(src), str(tmp_path / "c"), shard_size="4", holdout="0.25")
    assert fraction["holdout"]["settings"]["holdout"]["rows"] == 3


def test_holdout_into_a_folder_of_a_plain_run_is_refused(cauldron, tmp_path):
    """OUT held a plain run's manifest and shards beside the new train/ and val/, and data.train_shards=OUT read
    that run, held-out rows and all. A holdout run continues with --resume (its OUT holds train/ and val/ only)."""
    src, _, _ = cauldron
    out = tmp_path / "out"
    shard_data(str(src), str(out), shard_size="4")
    before = shard_bytes(out)
    with pytest.raises(ShardDataError, match="a shard-data run without --holdout"):
        shard_data(str(src), str(out), shard_size="4", holdout="3")
    assert shard_bytes(out) == before and not (out / "val").exists()
    held = tmp_path / "held"
    first = shard_data(str(src), str(held), shard_size="4", holdout="3")
    assert shard_data(str(src), str(held), shard_size="4", holdout="3", resume=True) == first


def test_llava_conversations_rows_are_read_as_texts(tmp_path):
    """LLaVA's JSONL (`image` + `conversations` of human/gpt messages) was counted as no_texts, without a hint."""
    images = tmp_path / "images"
    images.mkdir()
    noise_image(5).save(images / "a.png")
    talk = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a shape"},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "grey"}]  # fmt: skip
    rows = [
        {"id": "1", "image": "a.png", "conversations": talk},
        {"id": "2", "image": "a.png", "conversations": talk[:1]},  # a question without its answer
        {"id": "3", "image": "a.png", "conversations": [{"from": "system", "value": "be brief"}, *talk]},
    ]
    src = tmp_path / "llava.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    manifest = shard_data(str(src), str(tmp_path / "out"), images=str(images), shard_size="1MB")
    assert manifest["skipped"] == {"wrong_type": 2}
    [(_, meta, imgs)] = read_shards(tmp_path / "out")
    assert meta["texts"] == [{"user": "What is it?", "assistant": "a shape"}, {"user": "Colour?", "assistant": "grey"}]
    assert len(imgs) == 1 and "conversations" not in meta and meta["id"] == "1"


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads worker processes from /proc (Linux)")
def test_sigterm_stops_the_writers_in_one_line_and_resume_writes_the_same_shards(tmp_path):
    """`kill PID` of `shard-data --workers 2` left the spawned writers running, orphaned, for minutes (a resume
    started meanwhile raced them), and Ctrl-C printed a traceback per process. Now: exit 143 with one line, the
    writers gone, no temp file left, and --resume finishes byte-identical to an uninterrupted run."""
    script = [sys.executable, str(Path(__file__).parent / "shard_interrupt_worker.py")]
    flags = ["--shard-size", "5", "--workers", "2"]
    out = tmp_path / "out"
    proc = subprocess.Popen([*script, str(out), "0.2", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "shard-000000.tar").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    writers = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert "Traceback" not in err.decode()
    last = err.decode().strip().splitlines()[-1]
    assert "shard-data stopped by SIGTERM" in last and "--resume" in last, last
    while any(map(_alive, writers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(writers) >= 2 and not any(map(_alive, writers))
    assert not list(out.glob(".*.tmp"))
    assert 0 < len(shard_bytes(out)) < 12
    for folder, extra in ((out, ["--resume"]), (tmp_path / "fresh", [])):
        done = subprocess.run([*script, str(folder), "0", *flags, *extra], capture_output=True, timeout=300)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert shard_bytes(out) == shard_bytes(tmp_path / "fresh") and len(shard_bytes(out)) == 12
    assert json.loads((out / "manifest.json").read_text()) == json.loads(
        (tmp_path / "fresh" / "manifest.json").read_text()
    )
