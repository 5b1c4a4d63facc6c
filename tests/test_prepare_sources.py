"""shard-data's sources: chat `messages` rows, LLaVA's .json array, relative image paths and LLaVA columns in
parquet/arrow, upper-case suffixes, and the messages for rows without turns or a run that wrote nothing.

Shards are read back with Python's tarfile only, as in test_shard_writer.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image
from test_shard_writer import read_shards

from toolkit.data.prepare.shard_writer import ShardDataError, shard_data

QA = [{"user": "What is it?", "assistant": "a square"}]


def noise_png(path: Path, seed: int) -> bytes:
    """A small random PNG at `path` (folders made); returns its bytes."""
    arr = np.random.default_rng(seed).integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path)
    return path.read_bytes()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True)
def _local_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def chat(user: object, assistant: object = "a square") -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def test_chat_messages_rows_are_read_from_jsonl_and_parquet(tmp_path):
    """OpenAI / transformers chat rows (`messages`) were all skipped as no_texts; now string content and lists of
    parts are read, an image part is a placeholder as LLaVA's `<image>` is, and a system turn is refused."""
    png = noise_png(tmp_path / "a.png", 1)
    parts = [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    middle = [{"type": "text", "text": "Is "}, {"type": "image"}, {"type": "text", "text": "round?"}]
    rows = [
        {"id": "plain", "images": ["a.png"], "messages": chat("What is it?")},
        {"id": "parts", "images": ["a.png"], "messages": chat(parts, [{"type": "text", "text": "a square"}])},
        {"id": "mid", "image": "a.png", "messages": chat(middle, "no")},
        {"images": ["a.png"], "messages": [{"role": "system", "content": "be brief"}, *chat("What is it?")]},
        {"images": ["a.png"], "messages": chat([{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}])},
        {"images": ["a.png"], "messages": chat([{"type": "image_url", "image_url": {"url": "a.png"}}])},
        {"images": ["a.png"], "messages": chat("What is it?")[:1]},  # a question without its answer
    ]
    manifest = shard_data(str(write_jsonl(tmp_path / "chat.jsonl", rows)), str(tmp_path / "out"))
    assert (manifest["samples"], manifest["skipped"]) == (3, {"placeholder_mismatch": 1, "wrong_type": 3})
    samples = read_shards(tmp_path / "out")
    assert [m["texts"] for _, m, _ in samples] == [QA, QA, [{"user": "Is round?", "assistant": "no"}]]
    assert [m["id"] for _, m, _ in samples] == ["plain", "parts", "mid"]
    assert all(imgs == [("img0.png", png)] and "messages" not in m for _, m, imgs in samples)

    answers = [[{"type": "text", "text": text}] for text in ("a square", "a circle")]  # Arrow: one content type
    table = {"images": [["a.png"], ["a.png"]], "messages": [chat(parts, answer) for answer in answers]}
    datasets.Dataset.from_dict(table).to_parquet(str(tmp_path / "chat.parquet"))
    manifest = shard_data(str(tmp_path / "chat.parquet"), str(tmp_path / "pq"))
    assert (manifest["samples"], manifest["skipped"]) == (2, {})
    samples = read_shards(tmp_path / "pq")
    assert [m["texts"][0]["assistant"] for _, m, _ in samples] == ["a square", "a circle"]
    assert [m["texts"][0]["user"] for _, m, _ in samples] == ["What is it?"] * 2
    assert all(imgs == [("img0.png", png)] for _, _, imgs in samples)


def test_a_row_without_turns_names_its_keys_and_a_run_of_no_samples_says_why(tmp_path):
    """A row in another format was skipped as a bare no_texts; the message now names the row's keys and those
    read. nothing_written gives shard_writer the error for a run in which no row became a sample."""
    from toolkit.data.prepare.samples import SkipRow, encode_row

    with pytest.raises(SkipRow) as skip:
        encode_row(0, "rows", {"question": "q?", "answer": "a", "texts": None})
    assert skip.value.reason == "no_texts"
    for words in ("question, answer, texts (null)", "'texts'", "'conversations'", "'messages'", "'image'"):
        assert words in str(skip.value)

    src = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q?", "answer": "a"}] * 2)
    with pytest.raises(ShardDataError, match="none of the 2 rows") as error:  # exit 0 with 0 samples, before
        shard_data(str(src), str(tmp_path / "out"))
    assert "2 no_texts" in str(error.value) and "its keys: question, answer" in str(error.value)
    assert not json.loads((tmp_path / "out" / "manifest.json").read_text()).get("complete")  # nothing trains on it
    from toolkit.data.prepare.samples import nothing_written

    counts = {"source": str(src), "rows": 2, "samples": 0, "skipped": {"no_texts": 2}}
    assert "row 0" not in str(nothing_written(counts))  # without the source: the counts only
    assert nothing_written({**counts, "samples": 1}) is None and nothing_written({**counts, "rows": 0}) is None


def test_relative_image_paths_in_parquet_and_arrow_start_at_their_folder_or_images(tmp_path, monkeypatch):
    """`images: ['imgs/a.png']` in a parquet file beside imgs/ was read from the current directory (every row
    missing_image), and --images was refused for anything but JSONL."""
    data = tmp_path / "data"
    png = noise_png(data / "imgs" / "a.png", 2)
    table = datasets.Dataset.from_dict({"images": [["imgs/a.png"], [str(data / "imgs" / "a.png")]], "texts": [QA] * 2})
    table.to_parquet(str(data / "rows.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    monkeypatch.chdir(tmp_path)  # not the parquet's folder
    for src, images in ((data / "rows.parquet", None), (arrow, str(data)), (tmp_path / "saved", str(data))):
        out = tmp_path / f"out-{src.name}"
        manifest = shard_data(str(src), str(out), images=images)
        assert (manifest["samples"], manifest["skipped"]) == (2, {}), src
        assert [imgs for _, _, imgs in read_shards(out)] == [[("img0.png", png)]] * 2
    assert shard_data(str(arrow), str(tmp_path / "no-images"))["skipped"] == {"missing_image": 1}
    with pytest.raises(ShardDataError, match=r"--images .* is not a folder"):
        shard_data(str(data / "rows.parquet"), str(tmp_path / "bad"), images=str(tmp_path / "nope"))

    from toolkit.data.prepare.sources import resolve_images

    row = {"image": {"bytes": None, "path": "x.png"}, "images": [{"bytes": b"1", "path": "y.png"}, "/abs.png"]}
    resolve_images(row, Path("/base"))
    assert row == {
        "image": {"bytes": None, "path": "/base/x.png"},
        "images": [{"bytes": b"1", "path": "y.png"}, "/abs.png"],
    }


def test_upper_case_suffixes_are_read(tmp_path):
    png = noise_png(tmp_path / "a.png", 3)
    table = datasets.Dataset.from_dict({"images": [["a.png"]], "texts": [QA]})
    table.to_parquet(str(tmp_path / "ROWS.Parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    next((tmp_path / "saved").glob("*.arrow")).rename(tmp_path / "ROWS.ARROW")
    write_jsonl(tmp_path / "ROWS.JSONL", [{"images": ["a.png"], "texts": QA}])
    for name in ("ROWS.JSONL", "ROWS.Parquet", "ROWS.ARROW"):
        manifest = shard_data(str(tmp_path / name), str(tmp_path / f"out-{name}"))
        assert (manifest["samples"], manifest["skipped"]) == (1, {}), name
        [(_, meta, imgs)] = read_shards(tmp_path / f"out-{name}")
        assert meta["texts"] == QA and imgs == [("img0.png", png)]
    for folder in ("top", "hub/data"):  # a folder of such files was refused as holding no .parquet files
        (tmp_path / folder).mkdir(parents=True)
        table.to_parquet(str(tmp_path / folder / "train-00000.PARQUET"))
        src = tmp_path / folder.split("/")[0]
        noise_png(src / "a.png", 3)
        manifest = shard_data(str(src), str(tmp_path / f"out-{src.name}"))
        assert (manifest["samples"], manifest["skipped"]) == (1, {}), folder


LLAVA_TALK = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a square"}]


def test_llava_json_array_is_read_like_jsonl(tmp_path):
    """LLaVA's own format (llava_v1_5_mix665k.json: one JSON list of rows) was refused; its rows are read, at the
    right offsets past non-ASCII text, with images from the file's folder or --images."""
    png = noise_png(tmp_path / "coco" / "a.png", 4)
    rows = [
        {"id": "é🙂", "image": "a.png", "conversations": LLAVA_TALK},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Grüße?"}, {"from": "gpt", "value": "ja"}]},
        ["not", "an", "object"],
        {"id": "gone", "image": "missing.png", "conversations": LLAVA_TALK},
        {"id": "last", "image": "a.png", "conversations": LLAVA_TALK},
    ]
    src = tmp_path / "llava.json"
    src.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, ensure_ascii=False, indent=2).encode())  # with a BOM
    manifest = shard_data(str(src), str(tmp_path / "out"), images=str(tmp_path / "coco"), shard_size="2")
    assert (manifest["rows"], manifest["samples"]) == (5, 3)
    assert manifest["skipped"] == {"missing_image": 1, "wrong_type": 1}
    samples = read_shards(tmp_path / "out")
    assert [m["id"] for _, m, _ in samples] == ["é🙂", "text-only", "last"]
    assert samples[1][1]["texts"] == [{"user": "Grüße?", "assistant": "ja"}]
    assert [imgs for _, _, imgs in samples] == [[("img0.png", png)], [], [("img0.png", png)]]
    assert samples[0][1]["texts"] == QA

    (tmp_path / "coco" / "rows.json").write_text(json.dumps([rows[0]]))
    assert shard_data(str(tmp_path / "coco" / "rows.json"), str(tmp_path / "beside"))["samples"] == 1

    bad = {"dict.json": '{"data": []}', "strings.json": '["a", "b"]', "broken.json": '[{"id": 1},, {"id": 2}]'}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
    for name, match in (("dict", "one JSON object, not a list of rows"), ("strings", "a JSON list of no objects"),
                        ("broken", "is not valid JSON .*line 1 column 12")):  # fmt: skip
        with pytest.raises(ShardDataError, match=match):
            shard_data(str(tmp_path / f"{name}.json"), str(tmp_path / f"out-{name}"))
        assert not (tmp_path / f"out-{name}").exists()


def test_llava_columns_are_read_from_parquet_and_save_to_disk(tmp_path):
    """`image` + `conversations` columns were refused outside JSONL ("has no column images, texts"); a dataset
    with neither kind of turn column is still refused, naming what is read."""
    png = noise_png(tmp_path / "a.png", 5)
    talk = [LLAVA_TALK, [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "hello"}]]
    datasets.Dataset.from_dict({"image": ["a.png", None], "conversations": talk}).to_parquet(
        str(tmp_path / "llava.parquet")
    )
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
        }
    )
    saved = datasets.Dataset.from_dict({"image": [str(tmp_path / "a.png"), None], "conversations": talk}, features)
    saved.save_to_disk(str(tmp_path / "saved"))
    for src in (tmp_path / "llava.parquet", tmp_path / "saved"):
        out = tmp_path / f"out-{src.name}"
        manifest = shard_data(str(src), str(out))
        assert (manifest["samples"], manifest["skipped"]) == (2, {}), src
        samples = read_shards(out)
        assert [m["texts"] for _, m, _ in samples] == [QA, [{"user": "Hi?", "assistant": "hello"}]]
        assert [imgs for _, _, imgs in samples] == [[("img0.png", png)], []]

    datasets.Dataset.from_dict({"image": ["a.png"], "question": ["q"]}).to_parquet(str(tmp_path / "qa.parquet"))
    with pytest.raises(
        ShardDataError, match=r"no column texts or conversations or messages .*columns: image, question"
    ):
        shard_data(str(tmp_path / "qa.parquet"), str(tmp_path / "out-qa"))


def test_python_rows_take_any_pil_image_as_it_is_now_and_numpy_pixels(tmp_path):
    """write_shards(ListSource(...)): a CMYK image stopped the whole run (PNG cannot hold CMYK), an image changed
    in place after opening (thumbnail) was written as its original file, and a numpy array was wrong_type. An
    image opened and left alone still keeps its file's bytes."""
    import io

    from toolkit.data.prepare.shard_writer import ListSource, write_shards

    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 200, 3), dtype=np.uint8)).save(photo, quality=90)
    shrunk = Image.open(photo)
    shrunk.thumbnail((100, 100))
    pixels = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    images = [Image.new("CMYK", (16, 12), (0, 255, 0, 0)), shrunk, Image.open(photo), pixels]
    turn = [{"user": "what is it?", "assistant": "a test"}]
    manifest = write_shards(ListSource("rows", [{"images": [im], "texts": turn} for im in images]), tmp_path / "out",
                            shard_size="1MB")  # fmt: skip
    assert (manifest["samples"], manifest["skipped"]) == (4, {})
    written = [imgs[0][1] for _, _, imgs in read_shards(tmp_path / "out")]
    decoded = [Image.open(io.BytesIO(data)) for data in written]
    assert decoded[0].mode == "RGB" and decoded[0].getpixel((0, 0)) == Image.new(
        "CMYK", (1, 1), (0, 255, 0, 0)
    ).convert("RGB").getpixel((0, 0))
    assert decoded[1].size == (100, 20)  # the thumbnail, not the 200 x 40 file
    assert written[2] == photo.read_bytes()
    assert np.array_equal(np.asarray(decoded[3]), pixels)


def test_a_row_with_two_kinds_of_turns_is_refused_and_an_empty_one_beside_them_is_not(tmp_path):
    """`texts` was taken and `conversations` dropped without a word; an empty or null column of the other kind (a
    concatenated dataset's) still reads."""
    noise_png(tmp_path / "a.png", 1)
    llava = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a square"}]
    rows = [
        {"id": "both", "images": ["a.png"], "texts": QA, "conversations": llava},
        {"id": "chat too", "images": ["a.png"], "texts": QA, "messages": chat("What is it?")},
        {"id": "empty texts", "images": ["a.png"], "texts": [], "conversations": llava},
        {"id": "null messages", "images": ["a.png"], "texts": QA, "messages": None},
    ]
    manifest = shard_data(str(write_jsonl(tmp_path / "mixed.jsonl", rows)), str(tmp_path / "out"))
    assert (manifest["samples"], manifest["skipped"]) == (2, {"wrong_type": 2})
    samples = read_shards(tmp_path / "out")
    assert [(m["id"], m["texts"]) for _, m, _ in samples] == [("empty texts", QA), ("null messages", QA)]
