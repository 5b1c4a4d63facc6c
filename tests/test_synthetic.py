"""synth: deterministic from the seed, answers readable from pixels by a trivial rule, tokenizer fits the toolkit."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from toolkit.config import load_config
from toolkit.data.prepare.shard_writer import ShardDataError
from toolkit.data.prepare.synthetic import COLOURS, NUMBERS, QUESTION_TYPES, SHAPES, write_synth
from toolkit.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
ARGS = {"samples": 32, "val_samples": 8, "seed": 5}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    write_synth(out, **ARGS)
    return out


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def samples(split_dir: Path) -> list[tuple[dict, bytes]]:
    out = []
    for shard in json.loads((split_dir / "manifest.json").read_text())["shards"]:
        with tarfile.open(split_dir / shard["name"]) as tar:
            members = tar.getmembers()
            assert [m.name.split(".", 1)[1] for m in members] == ["json", "img0.png"] * (len(members) // 2)
            for meta, image in zip(members[::2], members[1::2]):
                out.append((json.loads(tar.extractfile(meta).read()), tar.extractfile(image).read()))
    return out


def read_answer(question_type: str, png: bytes) -> str:
    """What a trivial rule reads off the pixels: shapes are the saturated pixels, the background is grey."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    mask = rgb.max(axis=2) - rgb.min(axis=2) > 80
    ys, xs = np.nonzero(mask)
    if question_type == "count":
        quadrants = {(int(x >= 32), int(y >= 32)) for x, y in zip(xs, ys)}
        return NUMBERS[len(quadrants) - 1]
    if question_type == "colour":
        palette = np.array(list(COLOURS.values()))
        nearest = np.argmin(((rgb[mask][:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
        return list(COLOURS)[Counter(nearest.tolist()).most_common(1)[0][0]]
    if question_type == "position":
        sides = {"left": xs.max() < 32, "right": xs.min() >= 32, "top": ys.max() < 32, "bottom": ys.min() >= 32}
        assert sum(sides.values()) == 1, sides  # the shape is on exactly one side of the centre lines
        return next(side for side, ok in sides.items() if ok)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    fill = box.mean()
    if fill > 0.95:
        return "square"
    if fill > 0.7:
        return "circle"
    return "triangle" if box[-1].mean() > 0.9 else "cross"


def test_same_seed_gives_identical_bytes_in_another_process_and_other_seed_differs(synth, tmp_path):
    cli = tmp_path / "cli"
    cmd = [sys.executable, "-m", "toolkit", "synth", str(cli), "--samples", "32", "--val-samples", "8", "--seed", "5"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    assert files(cli) == files(synth)

    other = tmp_path / "other"
    write_synth(other, **{**ARGS, "seed": 6})
    assert files(other / "tokenizer") == files(synth / "tokenizer")  # the tokenizer does not depend on the seed
    assert files(other / "train") != files(synth / "train")


def test_rerun_is_a_no_op_and_other_arguments_refuse(synth):
    before = files(synth)
    manifests = write_synth(synth, **ARGS)
    assert files(synth) == before
    assert manifests["train"] == json.loads((synth / "train" / "manifest.json").read_text())
    with pytest.raises(ShardDataError, match="other arguments"):
        write_synth(synth, **{**ARGS, "seed": 7})


def test_answers_are_one_word_balanced_and_readable_from_the_pixels(synth):
    train = samples(synth / "train")
    manifest = json.loads((synth / "train" / "manifest.json").read_text())
    assert len(train) == manifest["samples"] == 32 and len(manifest["shards"]) == 8
    assert len(samples(synth / "val")) == 8
    assert Counter(meta["question_type"] for meta, _ in train) == dict.fromkeys(QUESTION_TYPES, 8)
    for meta, png in train:
        [turn] = meta["texts"]
        answer = turn["assistant"]
        assert Image.open(io.BytesIO(png)).size == (64, 64)
        assert answer.isalpha() and answer == read_answer(meta["question_type"], png), meta
        if meta["question_type"] in ("colour", "shape"):
            assert answer in meta["description"]
    assert {meta["texts"][0]["assistant"] for meta, _ in train if meta["question_type"] == "shape"} <= set(SHAPES)


def test_tokenizer_loads_with_the_toolkit_and_round_trips_the_text(synth):
    cfg = load_config("tiny", [f"model.tokenizer={synth / 'tokenizer'}"]).model
    tok = load_tokenizer(cfg)
    assert len(tok) == cfg.lm_vocab_size == 450
    assert tok.image_token_id == 384 == cfg.lm_base_vocab_size
    assert tok.hf.bos_token == "<|im_start|>" and tok.hf.eos_token == "<|im_end|>"
    for meta, _ in samples(synth / "train"):
        [turn] = meta["texts"]
        text = tok.render(
            [{"role": "user", "content": turn["user"]}, {"role": "assistant", "content": turn["assistant"]}]
        )
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
        assert len(tok.encode(turn["assistant"])) == 1  # one-word answers are one token: easy to score
    hist = json.loads((synth / "train" / "manifest.json").read_text())["token_histogram"]
    assert hist["includes_image_tokens"] and hist["max"] <= load_config("tiny").data.max_sample_length
