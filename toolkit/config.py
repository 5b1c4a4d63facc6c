"""Run configuration: four dataclasses, YAML presets and `section.field=value` overrides.

Every field carries its help text in `metadata`, so `--help`, the README's config reference and the error
messages all read from one place. Validation happens here, before any process group, model or loader exists:
a typo or an impossible shape must cost the user a second, not a cluster allocation.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESETS_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and what would be accepted."""


def opt(default: Any, help: str, *, choices: tuple | None = None) -> Any:
    """A dataclass field with its help text (and allowed values) kept beside the default."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def default_extra_tokens() -> dict[str, str]:
    """nanoVLM's `vlm_extra_tokens`: the image token, the global-image token and an 8x8 grid of tile tokens."""
    tokens = {"image_token": "<|image|>", "global_image_token": "<|global_image|>"}
    for r in range(1, 9):
        for c in range(1, 9):
            tokens[f"r{r}c{c}"] = f"<row_{r}_col_{c}>"
    return tokens


NANOVLM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class ModelConfig:
    """Model shape. Field names are nanoVLM's VLMConfig names so that its config.json loads as it is."""

    vit_hidden_dim: int = opt(768, "Width of the vision transformer.")
    vit_inter_dim: int = opt(3072, "Hidden width of the ViT MLP.")
    vit_patch_size: int = opt(16, "Side of one ViT patch in pixels.")
    vit_img_size: int = opt(512, "Side of one image tile fed to the ViT, in pixels.")
    vit_n_heads: int = opt(12, "Attention heads in the ViT.")
    vit_dropout: float = opt(0.0, "Dropout inside the ViT.")
    vit_n_blocks: int = opt(12, "Number of ViT blocks.")
    vit_ln_eps: float = opt(1e-6, "LayerNorm epsilon in the ViT.")
    vit_cls_flag: bool = opt(False, "Prepend a CLS token and return only it (nanoVLM keeps this False).")
    vit_model_type: str = opt("google/siglip2-base-patch16-512", "Name of the vision backbone (metadata).")
    lm_hidden_dim: int = opt(960, "Width of the language decoder.")
    lm_inter_dim: int = opt(2560, "Hidden width of the decoder's SwiGLU MLP.")
    lm_rms_eps: float = opt(1e-5, "RMSNorm epsilon in the decoder.")
    lm_re_base: int = opt(100000, "RoPE base (theta).")
    lm_max_position_embeddings: int = opt(8192, "Positions RoPE was trained for; longer inputs scale the frequencies.")
    lm_base_vocab_size: int = opt(49152, "Vocabulary of the tokenizer before the extra image tokens.")
    extra_token_amount: int = opt(66, "Number of extra tokens nanoVLM adds (image, global image, 64 tile tokens).")
    lm_vocab_size: int = opt(49218, "Decoder vocabulary: lm_base_vocab_size + extra_token_amount.")
    lm_n_heads: int = opt(15, "Query heads in the decoder.")
    lm_n_kv_heads: int = opt(5, "Key/value heads in the decoder (grouped-query attention).")
    lm_dropout: float = opt(0.0, "Dropout inside the decoder.")
    lm_n_blocks: int = opt(32, "Number of decoder blocks.")
    lm_attn_scaling: float = opt(1.0, "Multiplier on RoPE cos/sin (nanoVLM's attention scaling).")
    lm_max_length: int = opt(4096, "Tokens per packed row: the packer's capacity.")
    lm_use_tokens: bool = opt(False, "nanoVLM flag: decoder returns logits itself (kept for config compatibility).")
    lm_tie_weights: bool = opt(True, "Share the input embedding and the output head.")
    lm_model_type: str = opt("HuggingFaceTB/SmolLM2-360M-Instruct", "Name of the language backbone (metadata).")
    lm_tokenizer: str = opt("HuggingFaceTB/SmolLM2-360M-Instruct", "Tokenizer named in nanoVLM's config.json.")
    lm_chat_template: str = opt(NANOVLM_CHAT_TEMPLATE, "Jinja chat template (nanoVLM's ChatML).")
    mp_pixel_shuffle_factor: int = opt(
        4, "Pixel-shuffle factor of the projector (tokens per tile shrink by its square)."
    )
    mp_image_token_length: int = opt(64, "Image tokens per tile after pixel shuffle.")
    max_img_size: int = opt(2048, "Longest image side after resizing, in pixels.")
    resize_to_max_side_len: bool = opt(True, "Always resize the long side to max_img_size (else only shrink to fit).")
    vlm_extra_tokens: dict = opt(default_extra_tokens(), "Extra special tokens by attribute name, in id order.")
    vlm_load_backbone_weights: bool = opt(True, "nanoVLM flag (metadata); use vision_backbone/language_backbone.")
    vlm_checkpoint_path: str = opt("checkpoints", "nanoVLM field (metadata).")
    hf_repo_name: str = opt("nanoVLM", "nanoVLM field (metadata).")
    vision_backbone: str = opt("", "Local Hugging Face folder of a SigLIP/SigLIP2 vision tower to start from.")
    language_backbone: str = opt("", "Local Hugging Face folder of a Llama-family causal LM to start from.")
    tokenizer: str = opt("", "Local tokenizer folder; overrides lm_tokenizer when set.")

    def validate(self) -> None:
        _require(self.vit_hidden_dim % self.vit_n_heads == 0, "model.vit_n_heads", "must divide model.vit_hidden_dim")
        _require(self.vit_img_size % self.vit_patch_size == 0, "model.vit_patch_size", "must divide vit_img_size")
        side = self.vit_img_size // self.vit_patch_size
        _require(
            side % self.mp_pixel_shuffle_factor == 0,
            "model.mp_pixel_shuffle_factor",
            f"must divide the patch grid side {side} (vit_img_size / vit_patch_size)",
        )
        tokens = (side // self.mp_pixel_shuffle_factor) ** 2
        _require(
            self.mp_image_token_length == tokens,
            "model.mp_image_token_length",
            f"must be (vit_img_size / vit_patch_size / mp_pixel_shuffle_factor)^2 = {tokens}",
        )
        _require(self.lm_hidden_dim % self.lm_n_heads == 0, "model.lm_n_heads", "must divide model.lm_hidden_dim")
        _require((self.lm_hidden_dim // self.lm_n_heads) % 2 == 0, "model.lm_n_heads", "must leave an even head dim")
        _require(self.lm_n_heads % self.lm_n_kv_heads == 0, "model.lm_n_kv_heads", "must divide model.lm_n_heads")
        _require(
            self.lm_vocab_size >= self.lm_base_vocab_size + self.extra_token_amount,
            "model.lm_vocab_size",
            f"must be at least lm_base_vocab_size + extra_token_amount = "
            f"{self.lm_base_vocab_size + self.extra_token_amount}",
        )
        _require(
            len(self.vlm_extra_tokens) == self.extra_token_amount,
            "model.extra_token_amount",
            f"must equal the number of vlm_extra_tokens ({len(self.vlm_extra_tokens)})",
        )
        _require(self.max_img_size >= self.vit_img_size, "model.max_img_size", "must be at least vit_img_size")
        for name in ("vit_hidden_dim", "vit_n_blocks", "lm_hidden_dim", "lm_n_blocks", "lm_max_length"):
            _require(getattr(self, name) > 0, f"model.{name}", "must be positive")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.lm_tokenizer


@dataclass
class DataConfig:
    """Where the shards are and how samples become packed rows."""

    train_shards: Any = opt("", "Brace pattern, folder or manifest.json; or a list of {pattern, weight} to mix sets.")
    val_shards: str = opt("", "Held-out shards (brace pattern, folder or manifest.json); empty = no validation.")
    max_sample_length: int = opt(4096, "Samples with more tokens are dropped and counted.")
    max_images_per_example: int = opt(4, "Samples with more images are dropped and counted.")
    max_images_per_knapsack: int = opt(18, "Most images in one packed row.")
    max_tiles_per_knapsack: int = opt(0, "Most tiles in one packed row (0 = no limit beyond tokens).")
    buffer_packs: int = opt(32, "Packs the packer keeps open at once; more packs fill better and hold more memory.")
    balance: bool = opt(
        True,
        "Pack rows of near-equal compute (vision tiles + decoder tokens and attention), so data-parallel ranks wait "
        "less on each other; false = token-only packing.",
    )
    cost_calibration: str = opt(
        "",
        "Measured seconds per tile and per token (from `bench gpu --calibrate FILE`) for data.balance and the "
        "rank_cost_imbalance metric; empty = the model's FLOPs.",
    )
    shuffle_buffer: int = opt(1000, "Samples in the shuffle buffer.")
    num_workers: int = opt(2, "Data-loader worker processes per rank.")
    worker_start: str = opt(
        "auto",
        "How loader workers start: fork, forkserver, spawn, or auto (forkserver on Python 3.11 and older, whose fork "
        "can deadlock a worker that a multi-threaded training process forks, CPython gh-112275; fork on 3.12+).",
        choices=("auto", "fork", "forkserver", "spawn"),
    )
    prefetch_factor: int = opt(2, "Batches each worker prepares ahead.")
    seed: int = opt(0, "Seed of shard order, sample shuffle and mixture sampling.")
    relevance_min_rating: int = opt(1, "Drop turns whose FineVision relevance rating is below this (nanoVLM's rule).")
    image_correspondence_min_rating: int = opt(1, "Drop turns whose image-correspondence rating is below this.")
    visual_dependency_min_rating: int = opt(1, "Drop turns whose visual-dependency rating is below this.")
    formatting_min_rating: int = opt(1, "Drop turns whose formatting rating is below this.")
    caption_prompt: str = opt(
        "Describe the image.", "The user turn of an image-caption pair (img2dataset layout: KEY.jpg + KEY.txt/json)."
    )
    virtual_readers: int = opt(
        0,
        "Fixed readers of the training data that ranks and workers divide among themselves (0 = one reader per rank "
        "and worker). With V > 0 the data order is the same on any world size that divides V: see README.",
    )

    def validate(self) -> None:
        for name in ("max_sample_length", "max_images_per_example", "max_images_per_knapsack", "buffer_packs"):
            _require(getattr(self, name) > 0, f"data.{name}", "must be positive")
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _require(self.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1 (1 = no shuffle)")
        _require(self.virtual_readers >= 0, "data.virtual_readers", "must be >= 0 (0 = one per rank and worker)")
        _require(
            not self.cost_calibration or Path(self.cost_calibration).is_file(),
            "data.cost_calibration",
            f"names no file ({self.cost_calibration}); write one with `python -m toolkit bench gpu --calibrate FILE` "
            "or leave it empty",
        )
        shards = self.train_shards
        if isinstance(shards, list):
            for i, item in enumerate(shards):
                ok = isinstance(item, dict) and set(item) <= {"pattern", "weight"} and "pattern" in item
                _require(ok, f"data.train_shards[{i}]", "must be a mapping {pattern: ..., weight: ...}")
                _require(float(item.get("weight", 1.0)) > 0, f"data.train_shards[{i}].weight", "must be > 0")
        else:
            _require(isinstance(shards, str), "data.train_shards", "must be a string or a list of {pattern, weight}")


@dataclass
class TrainConfig:
    """nanoVLM's optimisation recipe plus the run's cadence and lifecycle."""

    batch_size: int = opt(1, "Packed rows per rank per micro-step.")
    gradient_accumulation_steps: int = opt(
        1, "Micro-steps per optimizer step (derived from global_batch_size when that is set)."
    )
    global_batch_size: int = opt(
        0,
        "Packed rows per optimizer step over all ranks; 0 = batch_size x gradient_accumulation_steps x world size. "
        "When set, accumulation is derived for the world size the run starts on.",
    )
    max_training_steps: int = opt(1000, "Optimizer steps of the run; the LR schedule spans them.")
    lr_mp: float = opt(5e-3, "Peak learning rate of the modality projector (0 = frozen).")
    lr_vision_backbone: float = opt(5e-5, "Peak learning rate of the vision encoder (0 = frozen).")
    lr_language_backbone: float = opt(5e-5, "Peak learning rate of the decoder (0 = frozen).")
    weight_decay: float = opt(0.01, "AdamW weight decay (nanoVLM: torch's AdamW default, 0.01).")
    warmup_ratio: float = opt(0.03, "Share of max_training_steps spent in linear warmup (nanoVLM: 0.03).")
    min_lr_ratio: float = opt(0.1, "Cosine floor as a share of each group's peak (nanoVLM: 0.1).")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this (0 = no clipping).")
    max_bad_steps: int = opt(5, "Stop after this many NaN/inf losses in a row.")
    eval_interval: int = opt(0, "Validate every N steps (0 = only at the end when val_shards is set).")
    eval_max_batches: int = opt(0, "Cap on validation batches per rank (0 = the whole held-out set).")
    eval_accuracy_samples: int = opt(0, "Held-out samples answered by greedy generation at each validation (0 = off).")
    checkpoint_interval: int = opt(0, "Checkpoint every N steps (0 = only at the end).")
    export_interval: int = opt(0, "Export nanoVLM format every N steps (0 = never during training).")
    export_best: bool = opt(True, "Export to run_dir/export/best whenever validation loss improves.")
    keep_checkpoints: int = opt(2, "Checkpoints kept on disk; the one 'latest' names is never deleted.")
    async_checkpoint: bool = opt(
        False,
        "Write checkpoints in the background while training goes on (single, ddp, fsdp); `latest` moves only once "
        "every rank's write is complete.",
    )
    stop_at_step: int = opt(
        0, "Checkpoint and exit 0 after this step; the schedule still spans max_training_steps (time-boxed jobs)."
    )
    log_interval: int = opt(1, "Log a progress line every N steps.")
    activation_checkpointing: str = opt(
        "none", "Recompute activations per block.", choices=("none", "vision", "language", "all")
    )
    compile: bool = opt(False, "torch.compile each block.")
    chunked_loss: bool = opt(
        True,
        "Output head + cross-entropy a chunk of target tokens at a time, never building the (B, S, V) logits; "
        "false = the dense head, for comparison.",
    )
    attention_kernel: str = opt(
        "auto",
        "Decoder attention over packed rows: auto (on CUDA a flash varlen kernel, flash-attn's or torch's own, "
        "else FlexAttention; a dense mask on CPU), or force varlen, flex or dense (to compare them with `bench gpu`).",
        choices=("auto", "flex", "varlen", "dense"),
    )
    profile_steps: int = opt(
        0,
        "Trace this many steps with torch.profiler on every rank (0 = off): run_dir/profile/ gets each rank's trace "
        "(Chrome/Perfetto JSON, with the trainer's forward_backward, norm_and_loss_read and optimizer_step spans) "
        "and rank 0's table of the ops that took the most time.",
    )
    profile_start: int = opt(
        5, "Steps of each launch left untraced before train.profile_steps begin (compilation, allocator growth)."
    )
    seed: int = opt(0, "Seed of model initialisation and dropout.")
    run_dir: str = opt("runs/default", "Run folder: config, checkpoints, exports, TensorBoard, metrics.jsonl.")
    resume: str = opt("auto", "'auto' resumes from run_dir's latest checkpoint if any, 'none' starts fresh, or a path.")
    init_from: str = opt(
        "",
        "A nanoVLM-format folder (an export, or nanoVLM's own checkpoint) whose weights start a new stage: all three "
        "parts' weights come from it, optimizer, schedule, data position and step start fresh.",
    )

    lmms_tasks: str = opt(
        "",
        "Comma-separated lmms-eval tasks scored on each lmms_interval export while training goes on (empty = off; "
        "nanoVLM's set: mmstar,mmmu_val,ocrbench,textvqa_val,docvqa_val,scienceqa,mme,infovqa_val,chartqa).",
    )
    lmms_interval: int = opt(0, "Export and score lmms_tasks every N steps (0 = off).")
    lmms_limit: int = opt(0, "At most this many documents per lmms-eval task (0 = every document).")
    lmms_batch_size: int = opt(64, "Requests answered together by the lmms-eval adapter (nanoVLM: 64).")
    lmms_launcher: str = opt(
        "process",
        "Where the scoring runs: a background process on rank 0's node, or one SLURM job per export (sbatch).",
        choices=("process", "slurm"),
    )
    lmms_include: str = opt("", "A folder of your own lmms-eval task YAMLs for lmms_tasks (lmms-eval's include_path).")
    lmms_wait: int = opt(
        3600,
        "At the end of training, wait at most this many seconds for process-launched scorings still running, so "
        "their scores reach metrics.jsonl (0 = do not wait).",
    )
    wandb_project: str = opt("", "Weights & Biases project to log to from rank 0 (empty = no W&B).")
    wandb_mode: str = opt(
        "online",
        "W&B mode: online, offline (sync later with `wandb sync`) or disabled.",
        choices=("online", "offline", "disabled"),
    )

    def validate(self) -> None:
        for name in ("batch_size", "gradient_accumulation_steps", "max_training_steps"):
            _require(getattr(self, name) > 0, f"train.{name}", "must be positive")
        for name in ("lr_mp", "lr_vision_backbone", "lr_language_backbone", "max_grad_norm", "weight_decay"):
            _require(getattr(self, name) >= 0, f"train.{name}", "must be >= 0")
        for name in (
            "eval_interval",
            "eval_max_batches",
            "eval_accuracy_samples",
            "checkpoint_interval",
            "global_batch_size",
            "lmms_interval",
            "lmms_limit",
            "lmms_wait",
            "profile_steps",
        ):
            _require(getattr(self, name) >= 0, f"train.{name}", "must be >= 0 (0 = off)")
        _require(self.profile_start >= 0, "train.profile_start", "must be >= 0")
        _require(0 <= self.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
        _require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
        _require(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        _require(self.lmms_batch_size >= 1, "train.lmms_batch_size", "must be >= 1")
        _require(
            not self.lmms_interval or bool(self.lmms_tasks.strip()),
            "train.lmms_interval",
            "is set but train.lmms_tasks is empty; name the tasks (e.g. train.lmms_tasks=mmstar,mme) or set 0",
        )


@dataclass
class BackendConfig:
    """Which distributed engine runs the step."""

    name: str = opt("single", "Training backend.", choices=("single", "ddp", "deepspeed", "fsdp"))
    ds_config: str = opt("ds_configs/zero2.json", "DeepSpeed ZeRO settings file (backend.name=deepspeed).")
    fsdp_sharding: str = opt(
        "full", "FSDP2 sharding: full, or hybrid (shard in a node, replicate across).", choices=("full", "hybrid")
    )
    fsdp_defer_grad_sync: bool = opt(
        False,
        "FSDP2: reduce-scatter gradients only on an accumulation's last micro-step (fewer collectives, but every rank "
        "holds unsharded fp32 gradients meanwhile: +4 bytes/param).",
    )
    fsdp_reshard_after_forward: bool = opt(
        True,
        "FSDP2: free each block group's gathered parameters after its forward and gather them again for its backward "
        "(ZeRO-3's memory); false keeps them until the backward: one all-gather a micro-step instead of two, for the "
        "peak memory of every block's parameters unsharded (bf16: +2 bytes/param).",
    )
    precision: str = opt(
        "bf16", "Compute precision; master weights and optimizer state stay fp32.", choices=("bf16", "fp32")
    )
    device: str = opt("auto", "auto (CUDA when present), cuda or cpu.", choices=("auto", "cuda", "cpu"))
    grad_reduce_dtype: str = opt(
        "fp32",
        "Precision of the gradient all-reduce / reduce-scatter: fp32, or bf16 (half the bytes; the loss bound is in "
        "README).",
        choices=("fp32", "bf16"),
    )

    # No validate(): the backend named checks its own settings when it is built, before any process group.


@dataclass
class Config:
    """A whole run: model, data, train and backend sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)

    def validate(self) -> Config:
        for section in SECTIONS:
            sub = getattr(self, section)
            _check_types(sub, section)
            _check_choices(sub, section)
            if hasattr(sub, "validate"):
                sub.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = ("model", "data", "train", "backend")


def _require(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{name} {what}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_choices(obj: Any, section: str) -> None:
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if choices and value not in choices:
            raise ConfigError(f"{section}.{f.name}={value!r} is not allowed; choose one of {', '.join(choices)}")


def _check_types(obj: Any, section: str) -> None:
    for name, tp in _field_types(type(obj)).items():
        value = getattr(obj, name)
        setattr(obj, name, _coerce(value, tp, f"{section}.{name}"))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Accept what YAML or the command line gives when it means the field's type; refuse everything else."""
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict or typing.get_origin(tp) is dict:
        if isinstance(value, dict):
            return value
    elif isinstance(tp, types.UnionType):
        return value
    type_name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{name}={value!r} must be of type {type_name}")


def section_fields(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(_SECTION_TYPES[section])]


_SECTION_TYPES: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "backend": BackendConfig,
}


def _unknown(kind: str, name: str, allowed: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name.split(".")[-1], allowed, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown {kind} {name!r}.{hint} Allowed: {', '.join(allowed)}")


def apply_mapping(cfg: Config, data: dict, origin: str = "config") -> None:
    """Set fields from a nested {section: {field: value}} mapping, refusing unknown names."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must be a mapping of sections ({', '.join(SECTIONS)})")
    for section, values in data.items():
        if section not in SECTIONS:
            raise _unknown("config section", str(section), list(SECTIONS))
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping of fields")
        allowed = section_fields(section)
        for key, value in values.items():
            if key not in allowed:
                raise _unknown("field", f"{section}.{key}", allowed)
            setattr(getattr(cfg, section), key, value)


def parse_override(text: str) -> tuple[str, str, Any]:
    """'train.lr_mp=1e-3' -> ('train', 'lr_mp', 0.001); the value is read as YAML so lists and bools work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    if key.count(".") != 1:
        raise ConfigError(f"override {text!r}: the key must be section.field, one of sections {', '.join(SECTIONS)}")
    section, name = key.split(".")
    if section not in SECTIONS:
        raise _unknown("config section", section, list(SECTIONS))
    if name not in section_fields(section):
        raise _unknown("field", key, section_fields(section))
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    tp = _field_types(_SECTION_TYPES[section])[name]
    if tp is str and not isinstance(value, str):
        value = raw  # '0001' or 'none' stay strings when the field is a string
    return section, name, value


def resolve_preset(path_or_name: str) -> Path:
    """A path, or the name of a preset shipped in toolkit/configs ('tiny', 'nanovlm-450m')."""
    path = Path(path_or_name)
    if path.exists():
        return path
    preset = PRESETS_DIR / f"{path_or_name.removesuffix('.yaml')}.yaml"
    if preset.exists():
        return preset
    names = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
    raise ConfigError(f"config {path_or_name!r} is neither a file nor a preset; presets: {names}")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Preset or YAML file, then overrides, then validation: the one way a run's config is made."""
    cfg = Config()
    if path:
        file = resolve_preset(path)
        with open(file) as fh:
            apply_mapping(cfg, yaml.safe_load(fh) or {}, origin=str(file))
    for text in overrides or []:
        section, name, value = parse_override(text)
        setattr(getattr(cfg, section), name, value)
    return cfg.validate()


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    apply_mapping(cfg, data)
    return cfg.validate()


def save_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)


def describe_fields() -> str:
    """Every field with its default and help: the text `--help` and the README's config reference show."""
    lines = []
    for section, cls in _SECTION_TYPES.items():
        lines.append(f"[{section}] {cls.__doc__.strip()}")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = "{...}" if isinstance(default, dict) else repr(default)
            if isinstance(default, str) and len(default) > 40:
                shown = repr(default[:37] + "...")
            choices = f" (one of: {', '.join(f.metadata['choices'])})" if f.metadata.get("choices") else ""
            lines.append(f"  {section}.{f.name} = {shown}: {f.metadata.get('help', '')}{choices}")
    return "\n".join(lines)
