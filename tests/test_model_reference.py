"""Compatibility with nanoVLM itself: the reference fixture was written by nanoVLM's own code (../shared)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from toolkit.model import VisionLanguageModel
from toolkit.model.hub import read_nanovlm_config


@pytest.fixture
def ref(reference_dir):
    return load_file(str(reference_dir / "reference.safetensors"))


@pytest.fixture
def model(reference_dir):
    return VisionLanguageModel.from_pretrained(str(reference_dir / "checkpoint")).eval()


def test_logits_and_loss_match_nanovlm(model, ref):
    with torch.no_grad():
        out = model(
            input_ids=ref["input_ids"],
            pixel_values=ref["pixel_values"],
            labels=ref["labels"],
            attention_mask=ref["attention_mask"],
            return_logits=True,
        )
    assert out.logits.dtype == torch.float32
    assert (out.logits - ref["logits"]).abs().max().item() <= 1e-4
    assert out.loss.item() == pytest.approx(ref["loss"].item(), abs=1e-5)


def test_packing_path_matches_nanovlm_on_one_sample(model, ref):
    """The packed (document-mask) path with explicit positions computes the same as nanoVLM's causal path."""
    pos = torch.arange(ref["input_ids"].shape[1])[None]
    with torch.no_grad():
        out = model(input_ids=ref["input_ids"], pixel_values=ref["pixel_values"], position_ids=pos)
    assert (out.logits - ref["logits"]).abs().max().item() <= 1e-4


def test_greedy_tokens_match_nanovlm(model, ref):
    tokens = model.generate(ref["input_ids"], ref["pixel_values"], ref["attention_mask"], max_new_tokens=6)
    assert tokens.tolist() == ref["greedy_tokens"].tolist()


def test_save_then_load_is_bit_identical_and_nanovlm_shaped(model, reference_dir, tmp_path):
    model.save_pretrained(str(tmp_path / "ckpt"))
    again = VisionLanguageModel.from_pretrained(str(tmp_path / "ckpt"))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    with (
        safe_open(str(reference_dir / "checkpoint" / "model.safetensors"), "pt") as theirs,
        safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as ours,
    ):
        assert sorted(ours.keys()) == sorted(theirs.keys())
        for key in theirs.keys():  # noqa: SIM118 - safe_open is not a dict
            assert ours.get_slice(key).get_shape() == theirs.get_slice(key).get_shape(), key
            assert ours.get_slice(key).get_dtype() == theirs.get_slice(key).get_dtype(), key
        assert ours.metadata() == theirs.metadata()
    theirs_cfg = json.loads((reference_dir / "checkpoint" / "config.json").read_text())
    ours_cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert ours_cfg == theirs_cfg  # same VLMConfig fields and values: nanoVLM's VLMConfig(**cfg) accepts it


def test_tokenizer_resolved_against_checkpoint(reference_dir):
    cfg = read_nanovlm_config(reference_dir / "checkpoint")
    assert cfg.tokenizer and (reference_dir / "tokenizer").samefile(cfg.tokenizer)


def test_inputs_rebuilt_from_raw_conversation_and_image(reference_dir, ref):
    """Issue 2, item 2, with issue 3's data code (toolkit.data.tokenizer / images / conversation)."""
    from toolkit.data.conversation import encode_sample
    from toolkit.data.images import process_image
    from toolkit.data.tokenizer import load_tokenizer

    raw = json.loads((reference_dir / "reference.json").read_text())
    cfg = read_nanovlm_config(reference_dir / "checkpoint")
    h, w = raw["image_hw"]
    pixels = (np.random.RandomState(raw["image_seed"]).rand(h, w, 3) * 255).astype(np.uint8)
    tiles, grid = process_image(
        Image.fromarray(pixels, "RGB"),
        tile=cfg.vit_img_size,
        max_side=cfg.max_img_size,
        resize_to_max=cfg.resize_to_max_side_len,
    )
    assert list(grid) == raw["grid"]
    assert (tiles - ref["pixel_values"]).abs().max().item() <= 1e-6
    tok = load_tokenizer(cfg)
    ids, labels = encode_sample(
        tok, [{"user": raw["user"], "assistant": raw["assistant"]}], [grid], cfg.mp_image_token_length
    )
    assert tok.render([{"role": "user", "content": "x"}]) + tok.render([]) == "<|im_start|>user\nx<|im_end|>\n"
    assert ids == raw["input_ids"] == ref["input_ids"][0].tolist()
    assert labels == raw["labels"] == ref["labels"][0].tolist()
    assert tok.decode(ids, skip_special_tokens=False) == raw["prompt_text"]
