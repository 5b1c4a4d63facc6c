"""`export --format hf`: a nanoVLM-format model as a transformers Idefics3 folder (the class SmolVLM uses).

Idefics3ForConditionalGeneration is nanoVLM's architecture under other names: a SigLIP tower (conv patches, one
learned position per patch), the same pixel shuffle (its channel order equals nanoVLM's, checked by the logits
test), a bias-free linear connector, and a Llama decoder whose `image_token_id` positions take the image features
in order. So the export is a renaming of tensors plus configs, loaded by `AutoModelForImageTextToText` with no
remote code. What does not map is refused with the reason (a CLS token, RoPE attention scaling).

Two differences stay, both outside the weights:
- the decoder's RoPE: nanoVLM divides the frequencies by (longest / lm_max_position_embeddings) past that length;
  transformers' default RoPE does not, so the two agree up to lm_max_position_embeddings tokens;
- the prompt layout: nanoVLM puts the global tile first, each tile behind its own `<row_i_col_j>` token, with no
  `<fake_token_around_image>` wrappers; `toolkit.export.hf_inputs` builds that layout for the HF model.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from toolkit.config import ModelConfig
from toolkit.errors import UserError
from toolkit.model.hub import LLAMA_BLOCK_NAMES, SIGLIP_BLOCK_NAMES

# Written into preprocessor_config.json (transformers keeps unknown image-processor keys): what hf_inputs needs to
# rebuild nanoVLM's tiles and image string from the processor alone.
LAYOUT_KEY = "nanovlm_layout"


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse what Idefics3 cannot compute, before anything is written."""
    if cfg.vit_cls_flag:
        raise UserError(
            "model.vit_cls_flag=true: Idefics3's vision tower has no CLS token, so --format hf cannot export this "
            "model; use --format nanovlm"
        )
    if float(cfg.lm_attn_scaling) != 1.0:
        raise UserError(
            f"model.lm_attn_scaling={cfg.lm_attn_scaling}: transformers' Llama RoPE has no such scaling, so "
            "--format hf would change the logits; use --format nanovlm"
        )
    if cfg.lm_hidden_dim % cfg.lm_n_heads or cfg.vit_hidden_dim % cfg.vit_n_heads:
        raise UserError("hidden widths must divide by their head counts for --format hf")


def hf_config(cfg: ModelConfig, *, eos_token_id: int | None, bos_token_id: int | None) -> Any:
    """ModelConfig -> Idefics3Config (fp32, eval: dropouts are training-only and left at 0)."""
    from transformers import Idefics3Config, Idefics3VisionConfig, LlamaConfig

    vision = Idefics3VisionConfig(
        hidden_size=cfg.vit_hidden_dim,
        intermediate_size=cfg.vit_inter_dim,
        num_hidden_layers=cfg.vit_n_blocks,
        num_attention_heads=cfg.vit_n_heads,
        num_channels=3,
        image_size=cfg.vit_img_size,
        patch_size=cfg.vit_patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=cfg.vit_ln_eps,
    )
    # pad_token_id stays unset: as nn.Embedding's padding_idx it would freeze EOS's row (nanoVLM pads with EOS)
    # for anyone fine-tuning the export; generation pads with EOS through generation_config instead.
    text = LlamaConfig(
        vocab_size=cfg.lm_vocab_size,
        hidden_size=cfg.lm_hidden_dim,
        intermediate_size=cfg.lm_inter_dim,
        num_hidden_layers=cfg.lm_n_blocks,
        num_attention_heads=cfg.lm_n_heads,
        num_key_value_heads=cfg.lm_n_kv_heads,
        head_dim=cfg.lm_hidden_dim // cfg.lm_n_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.lm_max_position_embeddings,
        rms_norm_eps=cfg.lm_rms_eps,
        rope_theta=float(cfg.lm_re_base),
        tie_word_embeddings=cfg.lm_tie_weights,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    image_token_id = cfg.lm_base_vocab_size + list(cfg.vlm_extra_tokens).index("image_token")
    return Idefics3Config(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=image_token_id,
        scale_factor=cfg.mp_pixel_shuffle_factor,
        tie_word_embeddings=cfg.lm_tie_weights,
    )


def hf_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nanoVLM tensor names -> Idefics3ForConditionalGeneration's; every source tensor used exactly once."""
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise UserError(f"the checkpoint lacks {name}; is it a nanoVLM-format model of this config?")
        used.add(name)
        return state[name].float().contiguous()

    out: dict[str, torch.Tensor] = {}
    vis, ve = "model.vision_model.", "vision_encoder."
    out[f"{vis}embeddings.patch_embedding.weight"] = take(f"{ve}patch_embedding.conv.weight")
    out[f"{vis}embeddings.patch_embedding.bias"] = take(f"{ve}patch_embedding.conv.bias")
    out[f"{vis}embeddings.position_embedding.weight"] = take(f"{ve}patch_embedding.position_embedding")[0]
    for i in range(cfg.vit_n_blocks):
        hf_l, ours = f"{vis}encoder.layers.{i}.", f"{ve}blocks.{i}."
        for part in ("weight", "bias"):
            q, k, v = take(f"{ours}attn.qkv_proj.{part}").chunk(3, dim=0)
            for name, t in (("q", q), ("k", k), ("v", v)):
                out[f"{hf_l}self_attn.{name}_proj.{part}"] = t.contiguous()
            for mine, theirs in SIGLIP_BLOCK_NAMES.items():
                out[f"{hf_l}{theirs}.{part}"] = take(f"{ours}{mine}.{part}")
    for part in ("weight", "bias"):
        out[f"{vis}post_layernorm.{part}"] = take(f"{ve}layer_norm.{part}")
    out["model.connector.modality_projection.proj.weight"] = take("MP.proj.weight")
    out.update(_decoder_state(cfg, take, set(state)))
    leftover = sorted(k for k in state if k not in used and not k.endswith("rotary_embd.inv_freq"))
    if leftover:
        raise UserError(f"the checkpoint has tensors --format hf has no place for: {leftover}")
    return out


def _decoder_state(cfg: ModelConfig, take, present: set[str]) -> dict[str, torch.Tensor]:
    txt, de = "model.text_model.", "decoder."
    embed, head = f"{de}token_embedding.weight", f"{de}head.weight"
    out: dict[str, torch.Tensor] = {}
    if cfg.lm_tie_weights:  # nanoVLM stores a tied head once, as decoder.head.weight; the toolkit may hold both
        tied = take(head if head in present else embed)
        if embed in present and head in present:
            take(embed)
        out[f"{txt}embed_tokens.weight"] = out["lm_head.weight"] = tied
    else:
        out[f"{txt}embed_tokens.weight"], out["lm_head.weight"] = take(embed), take(head)
    for i in range(cfg.lm_n_blocks):
        hf_l, ours = f"{txt}layers.{i}.", f"{de}blocks.{i}."
        for mine, theirs in LLAMA_BLOCK_NAMES.items():
            out[f"{hf_l}{theirs}"] = take(f"{ours}{mine}")
    out[f"{txt}norm.weight"] = take(f"{de}norm.weight")
    return out


def layout(cfg: ModelConfig) -> dict[str, Any]:
    """What nanoVLM's processor does, in the terms hf_inputs reads back."""
    return {
        "tile": cfg.vit_img_size,
        "max_side": cfg.max_img_size,
        "resize_to_max_side_len": cfg.resize_to_max_side_len,
        "tokens_per_tile": cfg.mp_image_token_length,
        "extra_tokens": dict(cfg.vlm_extra_tokens),
    }


def stored_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The source's floating dtype when every weight shares one (a bf16 nanoVLM model), else fp32. RoPE's inverse
    frequencies are left out: they are no weight of the export, and a model cast whole casts them too."""
    found = {v.dtype for k, v in state.items() if v.is_floating_point() and not k.endswith("rotary_embd.inv_freq")}
    return found.pop() if len(found) == 1 else torch.float32


def write_hf(cfg: ModelConfig, state: dict[str, torch.Tensor], out: Path, *, tokenizer_dir: str | None) -> None:
    """Model (config.json + model.safetensors + generation_config.json), tokenizer and processor into `out`."""
    from transformers import GenerationConfig, Idefics3ForConditionalGeneration, Idefics3Processor

    from toolkit.data.tokenizer import load_tokenizer

    check_exportable(cfg)
    if not tokenizer_dir:
        raise UserError(
            "--format hf needs the model's tokenizer and the source has none beside it: pass --tokenizer DIR "
            "(the folder training read as model.tokenizer)"
        )
    tok = load_tokenizer(cfg, tokenizer_dir)  # the base tokenizer plus nanoVLM's extra tokens, checked
    bos = tok.hf.bos_token_id
    model = Idefics3ForConditionalGeneration(hf_config(cfg, eos_token_id=tok.eos_token_id, bos_token_id=bos))
    incompatible = model.load_state_dict(hf_state_dict(cfg, state), strict=False)
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise UserError(
            f"Idefics3 did not take the weights: missing {incompatible.missing_keys}, "
            f"unexpected {incompatible.unexpected_keys}"
        )
    model.to(stored_dtype(state))  # exact: the fp32 model only held the source's values
    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id
    )
    model.save_pretrained(str(out))
    # Idefics3Processor adds its own three tokens to the tokenizer it is given, so it gets a copy; the folder's
    # tokenizer files are then written from the untouched one (nanoVLM's vocabulary, nothing the model lacks).
    processor = Idefics3Processor(
        image_processor=image_processor(cfg),
        tokenizer=copy.deepcopy(tok.hf),
        image_seq_len=cfg.mp_image_token_length,
        chat_template=cfg.lm_chat_template,
    )
    processor.save_pretrained(str(out))
    tok.hf.chat_template = cfg.lm_chat_template
    tok.hf.save_pretrained(str(out))


def image_processor(cfg: ModelConfig) -> Any:
    """Idefics3's image processor set as close to nanoVLM's as its fields go (no normalisation, bicubic, the
    same long side and tile), carrying nanoVLM's layout for hf_inputs."""
    try:
        from transformers import Idefics3ImageProcessorPil as Processor
    except ImportError:  # transformers 4.x: one (PIL/numpy) image processor class
        from transformers import Idefics3ImageProcessor as Processor
    from PIL import Image

    return Processor(
        do_convert_rgb=True,
        do_resize=cfg.resize_to_max_side_len,
        size={"longest_edge": cfg.max_img_size},
        resample=Image.Resampling.BICUBIC,
        do_image_splitting=True,
        max_image_size={"longest_edge": cfg.vit_img_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=False,
        **{LAYOUT_KEY: layout(cfg)},
    )
