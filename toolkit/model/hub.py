"""Checkpoint formats: nanoVLM's folder both ways, and Hugging Face SigLIP / Llama backbones in.

nanoVLM's format is `config.json` (VLMConfig field names) + `model.safetensors` (module names as in nanoVLM, the
tied head stored once as `decoder.head.weight`, aliases listed in the safetensors metadata as
`safetensors.torch.save_model` writes them). Anything that does not map exactly is an error naming the tensor:
a silently half-loaded backbone trains for days before anyone notices.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from toolkit.config import ConfigError, ModelConfig
from toolkit.errors import UserError
from toolkit.model.vlm import VisionLanguageModel

log = logging.getLogger(__name__)

TOOLKIT_ONLY_FIELDS = ("vision_backbone", "language_backbone", "tokenizer")
TIED_ALIAS = "decoder.token_embedding.weight"


class CheckpointError(UserError):
    """A checkpoint whose tensors or config do not fit the model; the message names them."""


def nanovlm_config_dict(cfg: ModelConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in TOOLKIT_ONLY_FIELDS}


def read_nanovlm_config(folder: str | Path) -> ModelConfig:
    """config.json -> ModelConfig; a relative tokenizer path is resolved against the checkpoint folder."""
    folder = Path(folder)
    file = folder / "config.json"
    if not file.exists():
        raise CheckpointError(f"{folder} has no config.json; is it a nanoVLM checkpoint folder?")
    raw = json.loads(file.read_text())
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        log.warning("ignoring config.json fields this toolkit does not know: %s", ", ".join(unknown))
    cfg = ModelConfig(**{k: v for k, v in raw.items() if k in known})
    if not cfg.tokenizer and not Path(cfg.lm_tokenizer).is_absolute():
        # nanoVLM's exports keep the tokenizer inside the folder; some layouts keep it beside the checkpoint.
        for base in (folder, folder.parent):
            if (base / cfg.lm_tokenizer).is_dir():
                cfg.tokenizer = str((base / cfg.lm_tokenizer).resolve())
                break
    cfg.validate()
    return cfg


def load_nanovlm(folder: str | Path, *, map_location: str | torch.device = "cpu") -> VisionLanguageModel:
    folder = Path(folder)
    cfg = read_nanovlm_config(folder)
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise CheckpointError(f"{folder} has no model.safetensors")
    model = VisionLanguageModel(cfg)
    state = load_file(str(weights), device=str(map_location))
    load_exact(model, state, source=str(weights))
    return model


def load_weights_from(model: VisionLanguageModel, folder: str | Path) -> None:
    """A new stage's start (train.init_from): every weight from a nanoVLM-format folder, into `model` as built
    from the run's config; a tensor that does not fit names the model.* field to change."""
    weights = Path(folder) / "model.safetensors"
    try:
        load_exact(model, load_file(str(weights)), source=str(weights))
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc}. Set the run's model.* fields to those in {Path(folder) / 'config.json'} (train.init_from "
            "keeps the architecture; only the training recipe may change between stages)"
        ) from exc


def load_exact(model: VisionLanguageModel, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load every tensor, refusing missing, unexpected or misshaped ones (the tied alias may be absent)."""
    own = model.state_dict()
    tied = model.cfg.lm_tie_weights
    missing = [k for k in own if k not in state and not (tied and k == TIED_ALIAS and "decoder.head.weight" in state)]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    if shapes:
        problems.append(f"wrong shape {shapes}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model config: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)


def nanovlm_state_dict(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """The tensors nanoVLM stores: its names, fp32-or-as-is, contiguous, tied head once."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.lm_tie_weights:
        state.pop(TIED_ALIAS, None)
    return state


def save_nanovlm(model: VisionLanguageModel, folder: str | Path, *, tokenizer_dir: str | None = None) -> None:
    """Write config.json + model.safetensors (+ tokenizer/ when given or when model.tokenizer is a folder)."""
    write_nanovlm(model.cfg, nanovlm_state_dict(model), folder, tokenizer_dir=tokenizer_dir)


def write_nanovlm(
    model_cfg: ModelConfig, state: dict[str, torch.Tensor], folder: str | Path, *, tokenizer_dir: str | None = None
) -> None:
    """nanoVLM's folder from a config and a full state dict (e.g. one a sharded backend gathered on rank 0)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(model_cfg)
    tok_src = tokenizer_dir or (cfg.tokenizer if cfg.tokenizer and Path(cfg.tokenizer).is_dir() else None)
    if tok_src:
        shutil.copytree(tok_src, folder / "tokenizer", dirs_exist_ok=True)
        cfg.lm_tokenizer = "tokenizer"
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if cfg.lm_tie_weights:
        tensors.pop(TIED_ALIAS, None)
    metadata = {TIED_ALIAS: "decoder.head.weight"} if cfg.lm_tie_weights else {"format": "pt"}
    save_file(tensors, str(folder / "model.safetensors"), metadata=metadata)
    (folder / "config.json").write_text(json.dumps(nanovlm_config_dict(cfg), indent=4))


# ---------------------------------------------------------------- Hugging Face backbones


def _read_hf_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder} is not a Hugging Face model folder (no config.json)")
    config = json.loads((folder / "config.json").read_text())
    files = sorted(folder.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return config, state
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise CheckpointError(f"{folder} holds no *.safetensors or pytorch_model*.bin weights")
    state = {}
    for f in bins:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return config, state


class _Taker:
    """Hands out a checkpoint's tensors by name and remembers which were used, so leftovers can be named."""

    def __init__(self, tensors: dict[str, torch.Tensor], missing: str) -> None:
        self.tensors, self.missing, self.used = tensors, missing, set()

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise CheckpointError(f"{self.missing}{name}")
        self.used.add(name)
        return self.tensors[name]


def _check_shape_fields(cfg: ModelConfig, hf: dict, pairs: dict[str, str], folder: str | Path) -> None:
    for ours, theirs in pairs.items():
        if theirs in hf and hf[theirs] != getattr(cfg, ours):
            raise ConfigError(
                f"model.{ours}={getattr(cfg, ours)} but the backbone in {folder} has {theirs}={hf[theirs]}; "
                f"set model.{ours}={hf[theirs]}"
            )


VISION_PAIRS = {
    "vit_hidden_dim": "hidden_size",
    "vit_inter_dim": "intermediate_size",
    "vit_n_heads": "num_attention_heads",
    "vit_n_blocks": "num_hidden_layers",
    "vit_patch_size": "patch_size",
    "vit_ln_eps": "layer_norm_eps",
}


def _vision_config(raw: dict) -> dict:
    return raw.get("vision_config", raw) if raw.get("model_type") in ("siglip", "siglip2") else raw


# One ViT block's modules besides the fused qkv: ours -> transformers' SigLIP (backbone import and HF export).
SIGLIP_BLOCK_NAMES = {
    "attn.out_proj": "self_attn.out_proj",
    "ln1": "layer_norm1",
    "ln2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def vision_state_from_hf(cfg: ModelConfig, folder: str | Path) -> dict[str, torch.Tensor]:
    """SigLIP (conv patches, fixed grid) or SigLIP2 (linear patches, resizable grid) -> our vision_encoder.*"""
    raw, state = _read_hf_folder(folder)
    hf = _vision_config(raw)
    _check_shape_fields(cfg, hf, VISION_PAIRS, folder)
    # Full SigLIP checkpoints prefix the tower with "vision_model."; a saved SiglipVisionModel may not.
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in state) else ""
    src = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and not k.startswith("text_model.")}
    if "embeddings.patch_embedding.weight" not in src:
        raise CheckpointError(f"{folder} has no SigLIP vision embeddings; is it a SigLIP/SigLIP2 checkpoint?")
    take = _Taker(src, f"{folder} lacks vision tensor {prefix}")

    out = {}
    out.update(_patch_embedding(cfg, take))
    for i in range(cfg.vit_n_blocks):
        hf_l, ours = f"encoder.layers.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            qkv = [take(f"{hf_l}self_attn.{p}_proj.{part}") for p in "qkv"]
            out[f"{ours}attn.qkv_proj.{part}"] = torch.cat(qkv, dim=0)
            for mine, theirs in SIGLIP_BLOCK_NAMES.items():
                out[f"{ours}{mine}.{part}"] = take(f"{hf_l}{theirs}.{part}")
    for part in ("weight", "bias"):
        out[f"layer_norm.{part}"] = take(f"post_layernorm.{part}")
    # The attention-pooling head serves SigLIP's contrastive loss; nanoVLM reads the patch features instead.
    leftover = sorted(
        k for k in src if k not in take.used and not k.startswith("head.") and not k.endswith("position_ids")
    )
    if leftover:
        raise CheckpointError(f"{folder} has vision tensors the toolkit would ignore: {leftover}")
    return {f"vision_encoder.{k}": v for k, v in out.items()}


def _patch_embedding(cfg: ModelConfig, take) -> dict[str, torch.Tensor]:
    p, d = cfg.vit_patch_size, cfg.vit_hidden_dim
    weight = take("embeddings.patch_embedding.weight")
    if weight.dim() == 2:  # SigLIP2: Linear over patches flattened as (p, p, C)
        weight = weight.reshape(d, p, p, 3).permute(0, 3, 1, 2).contiguous()
    pos = take("embeddings.position_embedding.weight")  # (n_pos, D)
    side = cfg.vit_img_size // p
    src_side = round(pos.shape[0] ** 0.5)
    if src_side != side:  # SigLIP2 resizes its position grid to the image; we resize once to our tile grid
        grid = pos.reshape(1, src_side, src_side, d).permute(0, 3, 1, 2).float()
        grid = torch.nn.functional.interpolate(
            grid, size=(side, side), mode="bilinear", align_corners=False, antialias=True
        )
        pos = grid.permute(0, 2, 3, 1).reshape(side * side, d).to(pos.dtype)
    return {
        "patch_embedding.conv.weight": weight,
        "patch_embedding.conv.bias": take("embeddings.patch_embedding.bias"),
        "patch_embedding.position_embedding": pos[None],
    }


LANGUAGE_PAIRS = {
    "lm_hidden_dim": "hidden_size",
    "lm_inter_dim": "intermediate_size",
    "lm_n_heads": "num_attention_heads",
    "lm_n_kv_heads": "num_key_value_heads",
    "lm_n_blocks": "num_hidden_layers",
    "lm_rms_eps": "rms_norm_eps",
    "lm_base_vocab_size": "vocab_size",
    "lm_tie_weights": "tie_word_embeddings",
}


# One decoder block's tensors: ours -> transformers' Llama (read by the backbone import and the HF export).
LLAMA_BLOCK_NAMES = {
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.out_proj.weight": "self_attn.o_proj.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "norm1.weight": "input_layernorm.weight",
    "norm2.weight": "post_attention_layernorm.weight",
}


def _check_llama(cfg: ModelConfig, hf: dict, folder: str | Path) -> None:
    _check_shape_fields(cfg, hf, LANGUAGE_PAIRS, folder)
    theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta"))
    if theta is not None and float(theta) != float(cfg.lm_re_base):
        raise ConfigError(f"model.lm_re_base={cfg.lm_re_base} but {folder} has rope_theta={theta}")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConfigError(f"{folder} sets {flag}=true; the toolkit's Llama decoder has no biases")
    head_dim = hf.get("head_dim")
    if head_dim and head_dim != cfg.lm_hidden_dim // cfg.lm_n_heads:
        raise ConfigError(f"{folder} has head_dim={head_dim}; the toolkit needs lm_hidden_dim / lm_n_heads")


def language_state_from_hf(cfg: ModelConfig, folder: str | Path, model: VisionLanguageModel) -> dict:
    """Llama-family causal LM -> decoder.*; extra image-token rows of the embedding keep the model's own init."""
    raw, state = _read_hf_folder(folder)
    _check_llama(cfg, raw, folder)
    take = _Taker(state, f"{folder} lacks language tensor ")

    out = {}
    for i in range(cfg.lm_n_blocks):
        hf_l, ours = f"model.layers.{i}.", f"blocks.{i}."
        for mine, theirs in LLAMA_BLOCK_NAMES.items():
            out[f"{ours}{mine}"] = take(f"{hf_l}{theirs}")
    out["norm.weight"] = take("model.norm.weight")
    out["token_embedding.weight"] = _extend_rows(
        model.decoder.token_embedding.weight, take("model.embed_tokens.weight")
    )
    if not cfg.lm_tie_weights:
        out["head.weight"] = _extend_rows(model.decoder.head.weight, take("lm_head.weight"))
    leftover = sorted(k for k in state if k not in take.used and not k.endswith("rotary_emb.inv_freq"))
    if cfg.lm_tie_weights:
        leftover = [k for k in leftover if k != "lm_head.weight"]
    if leftover:
        raise CheckpointError(f"{folder} has language tensors the toolkit would ignore: {leftover}")
    return {f"decoder.{k}": v for k, v in out.items()}


def _extend_rows(current: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Pretrained rows first, the model's freshly initialised rows for the extra tokens after them."""
    merged = current.detach().clone()
    merged[: base.shape[0]] = base.to(merged.dtype)
    return merged


def load_backbones(model: VisionLanguageModel) -> VisionLanguageModel:
    """Fill the vision and/or language side from model.vision_backbone / model.language_backbone folders."""
    cfg = model.cfg
    state = {}
    if cfg.vision_backbone:
        state.update(vision_state_from_hf(cfg, cfg.vision_backbone))
    if cfg.language_backbone:
        state.update(language_state_from_hf(cfg, cfg.language_backbone, model))
    if state:
        own = model.state_dict()
        bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
        if bad:
            raise CheckpointError(f"backbone tensors do not fit the model config: {bad}")
        model.load_state_dict(state, strict=False)
    return model
