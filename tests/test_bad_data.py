"""Bad input on the reading side: each case is a counted skip with a named reason, or trains correctly, never a
crash inside a library, a hang, or a sample that silently trains without its images."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import threading
import time
from pathlib import Path
from typing import ClassVar

import fsspec
import numpy as np
import pytest
import shardgen
import torch
from PIL import Image
from shardgen import Spec, good, tiny_config, write_shard

from toolkit.data import format as fmt
from toolkit.data import shards, streams
from toolkit.data.images import process_image, to_rgb
from toolkit.data.loader import data_stats
from toolkit.data.prepare.shard_writer import ListSource, write_shards
from toolkit.data.shards import DecodeSpec, RawSample, ShardScan, decode_sample, load_tiles
from toolkit.data.streams import PipeStream, ShardStalled
from toolkit.data.texts import Skip, parse_texts
from toolkit.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> tuple[str, int]:
    return shardgen.make_tokenizer(tmp_path_factory.mktemp("tok"))


def meta(key: str) -> dict:
    return {"texts": [{"user": f"what is in picture {key}?", "assistant": f"it is {key}"}]}


def encoded(img: Image.Image, fmt_name: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt_name)
    return buf.getvalue()


def stats(tok, folder: Path | str, **data) -> dict:
    """data_stats' counts, plus `images`: how many images reached a batch."""
    result = data_stats(tiny_config(tok, str(folder), data={"shuffle_buffer": 1, **data}))
    return {**result, "images": round(result["images_per_pack"] * result["packs"])}


# ---------------------------------------------------------------------------------------------- text


def test_a_lone_surrogate_is_counted_as_bad_text_not_a_tokenizer_crash(tok, tmp_path: Path) -> None:
    """JSON "\\ud83d" (half an emoji) used to stop the run with a TypeError from inside the tokenizer."""
    half = b'{"texts": [{"user": "smile \\ud83d please", "assistant": "ok"}]}'
    whole = b'{"texts": [{"user": "smile \\ud83d\\ude00 please", "assistant": "ok"}]}'  # a full pair is fine
    write_shard(tmp_path / "shard-000000.tar", [good("g0"), Spec("half", half), Spec("whole", whole), good("g1")])
    result = stats(tok, tmp_path)
    assert result["skipped"] == {fmt.BAD_TEXT: 1}
    assert (result["samples_read"], result["samples_packed"]) == (4, 3)
    with pytest.raises(Skip, match=r"turn 0's user text holds a lone UTF-16 surrogate \(\\ud83d"):
        parse_texts({"json": half})
    caption = {"jpg": b"", "json": b'{"caption": "a dog \\udc00"}'}  # a caption pair's text is checked too
    with pytest.raises(Skip) as exc:
        parse_texts(caption, caption_prompt="Describe the image.")
    assert exc.value.reason == fmt.BAD_TEXT and "assistant" in exc.value.detail


# ---------------------------------------------------------------------------------------------- image members


def test_image_formats_users_ship_are_placed_and_unplaceable_ones_are_counted(tok, tmp_path: Path) -> None:
    png = shardgen.image_bytes(48, 40)
    rgb = Image.new("RGB", (48, 40), (200, 10, 30))
    write_shard(
        tmp_path / "shard-000000.tar",
        [
            Spec("gif", meta("gif"), [("gif", encoded(rgb, "GIF"))]),
            Spec("bmp", meta("bmp"), [("bmp", encoded(rgb, "BMP"))]),
            Spec("tiff", meta("tiff"), [("tiff", encoded(rgb, "TIFF"))]),
            Spec("webp", meta("webp"), [("img0.webp", encoded(rgb, "WEBP"))]),
            Spec("dotted", meta("dotted"), [("0.jpg", png), ("1.jpg", png)]),  # KEY.0.jpg, not KEY.img0.jpg
            Spec("two", meta("two"), [("jpg", png), ("png", png)]),  # which one is the caption's image?
            Spec("twice", meta("twice"), [("img0.jpg", png), ("img0.png", png)]),
            Spec("extra", meta("extra"), [("img0.png", png), ("mask.png", png)]),
            Spec("caption", None, [("0.jpg", png), ("txt", b"a red square")]),  # was no_texts ("the JSON has no")
        ],
    )
    result = stats(tok, tmp_path, caption_prompt="Describe the image.")
    assert result["skipped"] == {fmt.UNPLACED_IMAGE: 5}
    assert (result["samples_packed"], result["images"]) == (4, 4)  # every placed sample keeps its image
    assert fmt.place_images(["json", "0.jpg", "1.jpg"]) == ([], ["0.jpg", "1.jpg"])
    assert fmt.place_images(["json", "img1.png", "img0.jpg", "img0.png"]) == (["img0.jpg", "img1.png"], ["img0.png"])
    assert fmt.place_images(["txt", "GIF"]) == (["GIF"], [])


def test_a_gif_trains_on_its_first_frame(tok, tmp_path: Path) -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    write_shard(tmp_path / "a.tar", [Spec("anim", meta("anim"), [("gif", buf.getvalue())])])
    cfg = tiny_config(tok, str(tmp_path / "a.tar"))
    spec = DecodeSpec.from_config(cfg)
    (_, key, files), *_ = list(ShardScan(str(tmp_path / "a.tar")))
    sample = decode_sample(RawSample((0, 0, 0), key, "a.tar", files), load_tokenizer(cfg.model), spec)
    pixels = load_tiles(sample, spec)
    assert len(sample.images) == 1 and pixels.shape[0] == 5
    assert torch.equal(pixels[:, 0], torch.ones_like(pixels[:, 0])) and not pixels[:, 2].any()  # red, not blue


# ---------------------------------------------------------------------------------------------- member order


def ungrouped_tar(path: Path, keys: list[str]) -> None:
    """`tar cf x.tar *.json *.png`: every JSON first, then every image."""
    members = [(f"{k}.json", json.dumps(meta(k)).encode()) for k in keys]
    members += [(f"{k}.img0.png", shardgen.image_bytes(48, 40)) for k in keys]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_members_not_grouped_by_key_count_both_halves_as_split_samples(tok, tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    write_shard(data / "shard-000000.tar", [good(f"g{i}", seed=i) for i in range(3)])
    ungrouped_tar(data / "shard-000001.tar", ["u0", "u1", "u2", "u3"])
    result = stats(tok, data)
    # before: the 4 JSON halves trained as text-only samples, the 4 image halves counted as no_json
    assert result["skipped"] == {fmt.SPLIT_SAMPLE: 8}
    assert (result["samples_read"], result["samples_packed"], result["images"]) == (11, 3, 3)
    assert shards.split_keys(str(data / "shard-000000.tar"), 0) == frozenset()
    # a stream cannot be read twice: the parts after the first are caught, and the shard is named in the log
    piped = stats(tok, f"pipe:cat {data / 'shard-000001.tar'}")
    assert piped["skipped"] == {fmt.SPLIT_SAMPLE: 4} and piped["images"] == 0


# ---------------------------------------------------------------------------------------------- pixel depth


def png16(values: np.ndarray) -> bytes:
    return encoded(Image.fromarray(values.astype(np.uint16)), "PNG")


def test_16_bit_and_float_images_are_scaled_to_8_bits_not_clipped_to_white() -> None:
    ramp = np.arange(0, 65536, 64, dtype=np.uint16)[:1024].reshape(32, 32)  # every 64th 16-bit value
    with Image.open(io.BytesIO(png16(ramp))) as img:
        tiles, grid = process_image(img, tile=32, max_side=32, resize_to_max=False)  # no resize: exact values
    reference = torch.from_numpy(((ramp.astype(np.int64) + 128) // 257).astype(np.float32)).div_(255.0)
    assert grid == (1, 1) and all(torch.equal(tiles[0, c], reference) for c in range(3))
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0, -1.0, np.nan]], dtype=np.float32))
    assert np.asarray(to_rgb(floats))[0, :, 1].tolist() == [0, 128, 255, 255, 0, 0]


def test_a_16_bit_png_written_by_shard_data_trains_as_mid_grey(tok, tmp_path: Path) -> None:
    """shard-data keeps the file's bytes; the reader then trains it as grey 128/255 (it trained as white 1.0)."""
    row = {"images": [png16(np.full((40, 48), 32768))], "texts": meta("grey")["texts"]}
    manifest = write_shards(ListSource("rows", [row]), tmp_path / "out", shard_size="1MB")
    assert (manifest["samples"], manifest["skipped"]) == (1, {})
    cfg = tiny_config(tok, str(tmp_path / "out"))
    spec = DecodeSpec.from_config(cfg)
    path = str(tmp_path / "out" / fmt.shard_name(0))
    (_, key, files), *_ = list(ShardScan(path))
    pixels = load_tiles(decode_sample(RawSample((0, 0, 0), key, path, files), load_tokenizer(cfg.model), spec), spec)
    assert pixels.shape[0] == 5 and torch.equal(pixels, torch.full_like(pixels, 128) / 255)


def test_a_photo_stored_sideways_trains_upright_as_datasets_decodes_it(tok, tmp_path: Path) -> None:
    """A JPEG stored 80 x 40 with EXIF orientation 6 (a phone held upright): Hugging Face datasets (what nanoVLM
    trains from) turns it upright, 40 x 80. The toolkit kept the stored pixels, so it trained sideways, on another
    tile grid. Its shard-data count, loader grid and tiles now equal nanoVLM's processing of datasets' image."""
    import datasets

    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8)).save(
        buf, format="JPEG", quality=95, exif=exif
    )
    raw = buf.getvalue()
    feature = datasets.Features({"image": datasets.Image()})
    want_img = datasets.Dataset.from_dict({"image": [{"bytes": raw, "path": None}]}, features=feature)[0]["image"]
    assert want_img.size == (40, 80)
    row = {"images": [raw], "texts": meta("phone")["texts"]}
    manifest = write_shards(ListSource("rows", [row]), tmp_path / "out", shard_size="1MB")
    cfg = tiny_config(tok, str(tmp_path / "out"))
    spec = DecodeSpec.from_config(cfg)
    want, want_grid = process_image(want_img, tile=spec.tile, max_side=spec.max_side, resize_to_max=spec.resize_to_max)
    assert want_grid == (2, 1)  # upright: two tiles high, one wide (stored sideways it is (1, 2))
    path = str(tmp_path / "out" / fmt.shard_name(0))
    (_, key, files), *_ = list(ShardScan(path))
    sample = decode_sample(RawSample((0, 0, 0), key, path, files), load_tokenizer(cfg.model), spec)
    assert sample.grids == [want_grid] and torch.equal(load_tiles(sample, spec), want)
    assert manifest["samples"] == 1 and stats(tok, tmp_path / "out")["tiles_per_pack"] == 3  # 2 tiles + global


# ---------------------------------------------------------------------------------------------- stalled pipes


def test_a_stalled_pipe_is_logged_then_retried_and_counted_not_a_hang(tok, tmp_path: Path, monkeypatch, caplog):
    monkeypatch.setattr(streams, "READ_TIMEOUT_S", 1.2)
    monkeypatch.setattr(streams, "STALL_LOG_S", 0.5)
    monkeypatch.setattr(shards, "RETRY_DELAY_S", 0.0)
    write_shard(tmp_path / "s.tar", [good(f"p{i}", seed=i) for i in range(4)])
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="toolkit.data.streams"):
        result = stats(tok, f"pipe:sleep 60; cat {tmp_path / 's.tar'}")
    assert result["skipped"] == {fmt.UNREADABLE_SHARD: 1} and result["samples_read"] == 0
    assert time.monotonic() - start < 30  # 4 tries of 1.2 s, not the command's 60 s
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for pipe:sleep 60")]
    assert len(waits) >= 4 and "no data for" in waits[0] and streams.READ_TIMEOUT_ENV in waits[0]
    slow = stats(tok, f"pipe:sleep 0.3; cat {tmp_path / 's.tar'}")  # slow but alive: read whole
    assert (slow["samples_packed"], slow["skipped"]) == (4, {})


def test_a_stalled_command_and_its_children_are_killed(monkeypatch) -> None:
    monkeypatch.setattr(streams, "READ_TIMEOUT_S", 0.3)
    pipe = PipeStream("pipe:sleep 60; echo late")
    with pytest.raises(ShardStalled, match="gave no data for 0 s"):
        pipe.read(512)
    pipe.close()
    assert pipe.proc.returncode == -9  # the shell; its `sleep` was killed with it, not left holding the pipe
    assert wait_until_gone(pipe.proc.pid, seconds=5.0)


class _StallsAfter(io.RawIOBase):
    """A remote file that gives `head` and then no byte until closed (a connection open but silent)."""

    def __init__(self, head: bytes) -> None:
        self.head, self.released = head, threading.Event()

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.head:
            n = min(len(buf), len(self.head))
            buf[:n], self.head = self.head[:n], self.head[n:]
            return n
        self.released.wait(60)
        return 0

    def close(self) -> None:
        self.released.set()
        super().close()


class StallingFS(fsspec.AbstractFileSystem):
    protocol = "stalling"
    head: ClassVar[bytes] = b""
    opened: ClassVar[list[_StallsAfter]] = []

    def _open(self, path, mode="rb", **kwargs):
        self.opened.append(_StallsAfter(self.head))
        return self.opened[-1]


def test_a_stalled_url_is_logged_then_retried_and_counted_not_a_hang(tok, tmp_path: Path, monkeypatch, caplog):
    """fsspec's own read() has no deadline of ours: a silent connection hung the loader for good."""
    monkeypatch.setattr(streams, "READ_TIMEOUT_S", 1.0)
    monkeypatch.setattr(streams, "STALL_LOG_S", 0.4)
    monkeypatch.setattr(shards, "RETRY_DELAY_S", 0.0)
    fsspec.register_implementation("stalling", StallingFS, clobber=True)
    monkeypatch.setattr(StallingFS, "opened", [])
    write_shard(tmp_path / "s.tar", [good(f"u{i}", seed=i) for i in range(4)])
    whole = (tmp_path / "s.tar").read_bytes()
    memory = fsspec.filesystem("memory")
    memory.pipe("/bad-data/s.tar", whole)  # the same shard from a URL that answers: read whole, through the thread
    assert (
        stats(tok, "memory://bad-data/s.tar")["samples_packed"],
        stats(tok, "memory://bad-data/s.tar")["skipped"],
    ) == (4, {})
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="toolkit.data.streams"):
        result = stats(tok, "stalling://bucket/s.tar")
    assert result["skipped"] == {fmt.UNREADABLE_SHARD: 1} and result["samples_read"] == 0
    assert time.monotonic() - start < 30 and len(StallingFS.opened) == 1 + shards.REMOTE_RETRIES
    assert all(f.closed for f in StallingFS.opened)  # each stalled file closed: its thread's read returns
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for stalling://")]
    assert waits and streams.READ_TIMEOUT_ENV in waits[0]
    missing = stats(tok, "memory://bad-data/none.tar")  # the thread's FileNotFoundError is the read's error
    assert missing["skipped"] == {fmt.UNREADABLE_SHARD: 1}


def test_a_url_that_stalls_mid_shard_keeps_the_samples_before(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(streams, "READ_TIMEOUT_S", 0.5)
    fsspec.register_implementation("stalling", StallingFS, clobber=True)
    write_shard(tmp_path / "s.tar", [good(f"m{i}", seed=i) for i in range(40)])
    whole = (tmp_path / "s.tar").read_bytes()
    monkeypatch.setattr(StallingFS, "head", whole[: len(whole) // 2])
    scan = ShardScan("stalling://bucket/s.tar")
    kept = [key for _, key, _ in scan]
    assert kept == [f"m{i}" for i in range(len(kept))] and 0 < len(kept) < 40
    assert scan.error[0] == fmt.UNREADABLE_SHARD and "no data for" in scan.error[1]


def wait_until_gone(group: int, *, seconds: float) -> bool:
    """Whether process group `group` empties within `seconds` (a killed child is reaped by init a moment later)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_nanovlm_markers_in_a_text_are_stripped_and_the_sample_trains(tok, tmp_path: Path) -> None:
    """A text holding `<|image|>` (or a tile marker) was counted good by shard-data and dropped as bad_text at
    load; nanoVLM strips the image token and trains the sample. Stripped, it encodes as the same text without."""
    cfg = tiny_config(tok, str(tmp_path))
    tokenizer = load_tokenizer(cfg.model)
    image_token = tokenizer.extra["image_token"]
    marked = json.dumps({"texts": [{"user": f"what is {image_token}this?", "assistant": "a <row_1_col_1>dog"}]})
    plain = json.dumps({"texts": [{"user": "what is this?", "assistant": "a dog"}]})
    write_shard(tmp_path / "shard-000000.tar", [good("g0"), Spec("marked", marked.encode()), good("g1")])
    result = stats(tok, tmp_path)
    assert result["skipped"] == {} and result["samples_packed"] == 3
    spec = DecodeSpec.from_config(cfg)
    ids = [decode_sample(RawSample((0, 0, i), k, "x", {"json": t.encode()}), tokenizer, spec).input_ids
           for i, (k, t) in enumerate([("m", marked), ("p", plain)])]  # fmt: skip
    assert ids[0] == ids[1]
