"""`export --format hf`: transformers' own Idefics3 classes load the export and compute the toolkit's logits.

References: nanoVLM's fixture (logits and greedy tokens computed by nanoVLM's code, its prompt ids and tiles) and a
tiny run trained here, whose live toolkit model is compared with the export loaded by AutoModelForImageTextToText.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import CPU_ENV, tiny_model_config
from toolkit import __main__ as cli
from toolkit.data.prepare.synthetic import write_synth
from toolkit.errors import UserError
from toolkit.evaluate import load_for_inference, prompt_inputs
from toolkit.export import export, hf_inputs
from toolkit.model import VisionLanguageModel

REPO = Path(__file__).resolve().parent.parent


def _hf_model(folder: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(folder)).eval()


def _processor(folder: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(folder))


def _fixture_image() -> Image.Image:
    # reference.json's recipe: numpy RandomState(0).rand(40, 56, 3) * 255 as uint8 RGB
    return Image.fromarray((np.random.RandomState(0).rand(40, 56, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def fixture_export(tmp_path_factory) -> Path:
    from tests.conftest import REFERENCE, REFERENCE_HINT

    if not (REFERENCE / "checkpoint" / "model.safetensors").exists():
        pytest.skip(f"nanoVLM reference fixture not found at {REFERENCE}: {REFERENCE_HINT}")
    out = tmp_path_factory.mktemp("hf") / "fixture"
    export(REFERENCE / "checkpoint", out, fmt="hf")
    return out


def test_fixture_export_loads_as_idefics3_and_gives_nanovlms_logits(fixture_export, reference_dir):
    from transformers import Idefics3ForConditionalGeneration

    ref = load_file(str(reference_dir / "reference.safetensors"))
    model = _hf_model(fixture_export)
    assert isinstance(model, Idefics3ForConditionalGeneration)  # transformers' own class, no remote code
    assert not (fixture_export / "modeling_nanovlm.py").exists()
    with torch.no_grad():
        out = model(
            input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], pixel_values=ref["pixel_values"][None]
        )
    assert out.logits.dtype == torch.float32
    assert (out.logits - ref["logits"]).abs().max().item() <= 1e-4
    # and the toolkit's own forward on the same ids and tiles
    ours = VisionLanguageModel.from_pretrained(str(reference_dir / "checkpoint")).eval()
    with torch.no_grad():
        mine = ours(input_ids=ref["input_ids"], pixel_values=ref["pixel_values"], return_logits=True).logits
    assert (out.logits - mine).abs().max().item() <= 1e-4


def test_fixture_greedy_generate_equals_nanovlms(fixture_export, reference_dir):
    ref = load_file(str(reference_dir / "reference.safetensors"))
    model = _hf_model(fixture_export)
    new = ref["greedy_tokens"].shape[1]
    kw = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
    out = model.generate(**kw, pixel_values=ref["pixel_values"][None], max_new_tokens=new, do_sample=False)
    assert out[:, ref["input_ids"].shape[1] :].tolist() == ref["greedy_tokens"].tolist()


def test_autoprocessor_loads_with_nanovlms_tokens_and_template(fixture_export, reference_dir):
    from transformers import Idefics3Processor

    processor = _processor(fixture_export)
    assert isinstance(processor, Idefics3Processor)
    cfg = json.loads((reference_dir / "checkpoint" / "config.json").read_text())
    tok = processor.tokenizer
    for i, text in enumerate(cfg["vlm_extra_tokens"].values()):  # nanoVLM appends them after the base vocabulary
        assert tok.convert_tokens_to_ids(text) == cfg["lm_base_vocab_size"] + i, text
    assert processor.chat_template == cfg["lm_chat_template"]
    assert tok.chat_template == cfg["lm_chat_template"]
    # the saved tokenizer has no token the model lacks (the processor adds its own three only in memory)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(fixture_export))) == cfg["lm_vocab_size"]


def test_hf_inputs_build_nanovlms_prompt_ids_and_tiles(fixture_export, reference_dir, tmp_path):
    """nanoVLM's own ids for the fixture's conversation, up to the assistant's answer, and its tiles."""
    raw = json.loads((reference_dir / "reference.json").read_text())
    ref = load_file(str(reference_dir / "reference.safetensors"))
    inputs = hf_inputs(_fixture_image(), raw["user"], _processor(fixture_export))
    ids = inputs["input_ids"][0].tolist()
    answer_ids = len(raw["input_ids"]) - len(ids)
    assert answer_ids > 0 and ids == raw["input_ids"][: len(ids)]
    assert torch.equal(inputs["pixel_values"][0], ref["pixel_values"])
    assert inputs["attention_mask"].tolist() == [[1] * len(ids)]
    png = tmp_path / "image.png"  # a path as the image gives the same inputs (was an AttributeError)
    _fixture_image().save(png)
    by_path = hf_inputs(str(png), raw["user"], _processor(fixture_export))
    assert all(torch.equal(by_path[k], inputs[k]) for k in inputs)


def test_a_black_tile_is_kept_and_changes_nothing(fixture_export, reference_dir):
    """Idefics3 drops all-zero images as padding; hf_inputs keeps a black photo's tiles with the same logits."""
    processor = _processor(fixture_export)
    black = Image.new("RGB", (56, 40), (0, 0, 0))
    inputs = hf_inputs(black, "what is it", processor)
    ours = VisionLanguageModel.from_pretrained(str(reference_dir / "checkpoint")).eval()
    tok_model, tok = load_for_inference(reference_dir / "checkpoint", device="cpu")
    ids, pixels = prompt_inputs(tok_model, tok, [black], "what is it")
    assert ids == inputs["input_ids"][0].tolist() and bool((pixels == 0).all())
    with torch.no_grad():
        theirs = _hf_model(fixture_export)(**inputs).logits
        mine = ours(input_ids=torch.tensor([ids]), pixel_values=pixels, return_logits=True).logits
    assert (theirs - mine).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny run trained for a few steps on shapes-VQA (single backend, fp32), its export in HF format."""
    root = tmp_path_factory.mktemp("hfrun")
    synth = root / "synth"
    write_synth(str(synth), samples=96, val_samples=8, seed=0)
    run = root / "run"
    args = [
        "backend.precision=fp32",
        "backend.device=cpu",
        f"model.tokenizer={synth / 'tokenizer'}",
        f"data.train_shards={synth / 'train'}",
        f"data.val_shards={synth / 'val'}",
        "data.num_workers=0",
        "train.batch_size=2",
        "train.max_training_steps=6",
        "train.lr_language_backbone=3e-3",
        "train.lr_vision_backbone=3e-3",
        "train.export_best=false",
        f"train.run_dir={run}",
    ]
    env = {**os.environ, **CPU_ENV}
    cmd = [sys.executable, "-m", "toolkit", "train", "--config", "tiny", *args]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    cmd = [sys.executable, "-m", "toolkit", "export", str(run), str(root / "hf"), "--format", "hf"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "transformers Idefics3" in done.stdout
    # the same run, named by its checkpoint step, in nanoVLM format: the toolkit's reference model
    export(run / "checkpoints" / "step_6", root / "nanovlm", fmt="nanovlm")
    return root


def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype(np.uint8))


@pytest.mark.slow  # trains a tiny run and exports it through the CLI: ~60 s on 2 cores
def test_trained_run_export_logits_equal_the_toolkits(trained_run):
    model, tok = load_for_inference(trained_run / "nanovlm", device="cpu")
    hf, processor = _hf_model(trained_run / "hf"), _processor(trained_run / "hf")
    for seed, size in ((1, (80, 50)), (2, (30, 30))):  # a 2 x 1 grid with its global tile, and a single tile
        img, question = _photo(seed, size), "what shape is in the picture?"
        inputs = hf_inputs(img, question, processor)
        ids, pixels = prompt_inputs(model, tok, [img], question)
        assert inputs["input_ids"][0].tolist() == ids and torch.equal(inputs["pixel_values"][0], pixels)
        with torch.no_grad():
            theirs = hf(**inputs).logits
            mine = model(input_ids=torch.tensor([ids]), pixel_values=pixels, return_logits=True).logits
        assert (theirs - mine).abs().max().item() <= 1e-4


@pytest.mark.slow  # trains a tiny run and exports it through the CLI: ~60 s on 2 cores
def test_trained_run_greedy_generate_through_hf_inputs_equals_the_toolkits(trained_run):
    """Token for token: once stopping at EOS as both do, and once 12 tokens with EOS off, so the KV-cache decode
    is compared well past the first token whatever this briefly trained model says first."""
    model, tok = load_for_inference(trained_run / "nanovlm", device="cpu")
    hf, processor = _hf_model(trained_run / "hf"), _processor(trained_run / "hf")
    img, question = _photo(3, (64, 40)), "what colour is the shape?"
    ids, pixels = prompt_inputs(model, tok, [img], question)
    inputs = hf_inputs(img, question, processor)
    mine = model.generate(torch.tensor([ids]), pixels, max_new_tokens=12, eos_token_id=tok.eos_token_id)[0].tolist()
    if tok.eos_token_id in mine:  # the toolkit pads with EOS after it; transformers stops there
        mine = mine[: mine.index(tok.eos_token_id) + 1]
    out = hf.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1] :].tolist()
    assert out == mine
    mine = model.generate(torch.tensor([ids]), pixels, max_new_tokens=12, eos_token_id=None)[0].tolist()
    hf.generation_config.eos_token_id = None
    out = hf.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(out) == 12 and out == mine


def test_unexportable_models_are_refused_with_the_reason(tmp_path):
    cfg = tiny_model_config(vit_cls_flag=True)
    VisionLanguageModel(cfg).save_pretrained(str(tmp_path / "cls"))
    with pytest.raises(UserError, match="CLS token"):
        export(tmp_path / "cls", tmp_path / "out", fmt="hf", tokenizer=str(tmp_path))
    assert not (tmp_path / "out").exists()


def test_hf_inputs_refuses_a_processor_that_is_not_an_export():
    class Stock:
        image_processor = object()

    with pytest.raises(UserError, match="--format hf"):
        hf_inputs(None, "hi", Stock())


def test_a_bf16_source_is_exported_in_bf16_both_ways(reference_dir, tmp_path):
    """A nanoVLM folder saved in bf16 came out in fp32, values exact but the files twice the size. Its own dtype is
    kept: in nanoVLM format tensor for tensor, and in the HF export's weights and the dtype its config names."""
    import shutil

    from safetensors.torch import save_file

    src = tmp_path / "bf16"
    shutil.copytree(reference_dir / "checkpoint", src)
    fp32 = load_file(str(src / "model.safetensors"))
    save_file({k: v.bfloat16() for k, v in fp32.items()}, str(src / "model.safetensors"), metadata={"format": "pt"})
    stored = load_file(str(src / "model.safetensors"))
    tokenizer = ["--tokenizer", str(reference_dir / "tokenizer")]
    assert cli.main(["export", str(src), str(tmp_path / "nanovlm"), *tokenizer]) == 0
    out = load_file(str(tmp_path / "nanovlm" / "model.safetensors"))
    assert out.keys() == stored.keys()
    assert all(out[k].dtype == torch.bfloat16 and torch.equal(out[k], stored[k]) for k in stored)
    assert cli.main(["export", str(src), str(tmp_path / "hf"), "--format", "hf", *tokenizer]) == 0
    hf_tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert {t.dtype for t in hf_tensors.values()} == {torch.bfloat16}
    embed = hf_tensors["model.text_model.embed_tokens.weight"]
    assert torch.equal(embed, stored["decoder.head.weight"])  # tied: nanoVLM stores the head
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"
