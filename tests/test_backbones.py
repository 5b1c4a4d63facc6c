"""Pretrained backbones from local Hugging Face folders compute what transformers computes."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

from tests.conftest import tiny_model_config
from toolkit.config import ConfigError
from toolkit.model import VisionLanguageModel
from toolkit.model.hub import CheckpointError, load_backbones


def _siglip(tmp_path, cfg):
    hf = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=cfg.vit_hidden_dim,
            intermediate_size=cfg.vit_inter_dim,
            num_hidden_layers=cfg.vit_n_blocks,
            num_attention_heads=cfg.vit_n_heads,
            image_size=cfg.vit_img_size,
            patch_size=cfg.vit_patch_size,
            layer_norm_eps=cfg.vit_ln_eps,
        )
    ).eval()
    with torch.no_grad():  # random, not HF's near-constant init, so a wrong mapping shows
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path / "siglip")
    return hf


def _llama(tmp_path, cfg, tie: bool):
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.lm_base_vocab_size,
            hidden_size=cfg.lm_hidden_dim,
            intermediate_size=cfg.lm_inter_dim,
            num_hidden_layers=cfg.lm_n_blocks,
            num_attention_heads=cfg.lm_n_heads,
            num_key_value_heads=cfg.lm_n_kv_heads,
            rms_norm_eps=cfg.lm_rms_eps,
            rope_theta=float(cfg.lm_re_base),
            max_position_embeddings=cfg.lm_max_position_embeddings,
            tie_word_embeddings=tie,
        )
    ).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path / "llama")
    return hf


def test_siglip_vision_tower_matches_transformers(tmp_path):
    cfg = tiny_model_config()
    hf = _siglip(tmp_path, cfg)
    cfg.vision_backbone = str(tmp_path / "siglip")
    model = load_backbones(VisionLanguageModel(cfg)).eval()
    pixels = torch.rand(3, 3, cfg.vit_img_size, cfg.vit_img_size)
    with torch.no_grad():
        theirs = hf(pixel_values=pixels).last_hidden_state
        ours = model.vision_encoder(pixels)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tie", [True, False])
def test_llama_decoder_matches_transformers(tmp_path, tie):
    cfg = tiny_model_config(lm_tie_weights=tie)
    hf = _llama(tmp_path, cfg, tie)
    cfg.language_backbone = str(tmp_path / "llama")
    model = load_backbones(VisionLanguageModel(cfg)).eval()
    ids = torch.randint(0, cfg.lm_base_vocab_size, (2, 37))
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
        ours = model(input_ids=ids).logits[..., : cfg.lm_base_vocab_size]
    assert (ours - theirs).abs().max().item() <= 1e-4
    # Packed: two samples in one row give each sample's own logits.
    pos = torch.cat([torch.arange(20), torch.arange(17)])[None]
    with torch.no_grad():
        packed = model(input_ids=ids[:1], position_ids=pos).logits[..., : cfg.lm_base_vocab_size]
        second = hf(input_ids=ids[:1, 20:]).logits
    assert (packed[:, :20] - theirs[:1, :20]).abs().max().item() <= 1e-4
    assert (packed[:, 20:] - second).abs().max().item() <= 1e-4


def test_backbone_shape_mismatch_names_the_field(tmp_path):
    cfg = tiny_model_config()
    _llama(tmp_path, cfg, True)
    bad = tiny_model_config(lm_inter_dim=2 * cfg.lm_inter_dim)
    bad.language_backbone = str(tmp_path / "llama")
    with pytest.raises(ConfigError, match=r"model\.lm_inter_dim"):
        load_backbones(VisionLanguageModel(bad))


def test_missing_and_unexpected_weights_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = tiny_model_config()
    _llama(tmp_path, cfg, True)
    file = next((tmp_path / "llama").glob("*.safetensors"))
    state = load_file(str(file))
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, str(file))
    cfg.language_backbone = str(tmp_path / "llama")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_backbones(VisionLanguageModel(cfg))
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(cfg.lm_inter_dim, cfg.lm_hidden_dim)
    state["model.layers.1.extra_adapter.weight"] = torch.zeros(2, 2)
    save_file(state, str(file))
    with pytest.raises(CheckpointError, match=r"extra_adapter"):
        load_backbones(VisionLanguageModel(cfg))


def test_siglip2_naflex_tower_matches_transformers(tmp_path):
    """SigLIP2 keeps patches as a Linear over (p, p, C) and resizes its position grid; both must map exactly."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    cfg = tiny_model_config()
    p, side = cfg.vit_patch_size, cfg.vit_img_size // cfg.vit_patch_size
    hf = Siglip2VisionModel(
        Siglip2VisionConfig(
            hidden_size=cfg.vit_hidden_dim,
            intermediate_size=cfg.vit_inter_dim,
            num_hidden_layers=cfg.vit_n_blocks,
            num_attention_heads=cfg.vit_n_heads,
            patch_size=p,
            num_patches=36,  # a 6x6 grid, resized to our 4x4
            layer_norm_eps=cfg.vit_ln_eps,
        )
    ).eval()
    with torch.no_grad():
        for prm in hf.parameters():
            prm.normal_(0, 0.2)
    hf.save_pretrained(tmp_path / "siglip2")
    cfg.vision_backbone = str(tmp_path / "siglip2")
    model = load_backbones(VisionLanguageModel(cfg)).eval()
    pixels = torch.rand(2, 3, cfg.vit_img_size, cfg.vit_img_size)
    patches = pixels.reshape(2, 3, side, p, side, p).permute(0, 2, 4, 3, 5, 1).reshape(2, side * side, p * p * 3)
    with torch.no_grad():
        theirs = hf(
            pixel_values=patches,
            pixel_attention_mask=torch.ones(2, side * side, dtype=torch.long),
            spatial_shapes=torch.tensor([[side, side]] * 2),
        ).last_hidden_state
        ours = model.vision_encoder(pixels)
    assert (ours - theirs).abs().max().item() <= 1e-4
