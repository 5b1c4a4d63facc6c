"""Run configuration: four dataclasses, YAML presets and `section.field=value` overrides.

Every field carries its help text in `metadata`, so `--help`, the README's config reference and the error
messages all read from one place. Validation happens here, before any process group, model or loader exists:
a typo or an impossible shape must cost the user a second, not a cluster allocation.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from toolkit.config_hints import ALIASES, did_you_mean, suggest_keys

PRESETS_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and what would be accepted."""


@dataclass(frozen=True)
class Range:
    """The numbers a field accepts, declared beside its default so that no numeric field goes unchecked: a zero
    that divides or counts fails here with the field's name instead of as a ZeroDivisionError steps later."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: Any) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


COUNT = Range(1)  # divides, sizes or counts something: 0 cannot work
NON_NEGATIVE = Range(0)  # 0 is a setting (off, no limit, frozen; a seed), as the field's help says
POSITIVE = Range(0, low_open=True)  # a float that multiplies or guards a division (epsilons, scales)
FRACTION = Range(0, 1)
FRACTION_BELOW_1 = Range(0, 1, high_open=True)  # warmup must leave steps to decay over; dropout 1 zeroes everything


def opt(default: Any, help: str, *, choices: tuple | None = None, valid: Range | None = None) -> Any:
    """A dataclass field with its help text, allowed values (`choices`) or numeric range (`valid`) beside the
    default."""
    meta = {"help": help, "choices": choices, "valid": valid}
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

    vit_hidden_dim: int = opt(768, "Width of the vision transformer.", valid=COUNT)
    vit_inter_dim: int = opt(3072, "Hidden width of the ViT MLP.", valid=COUNT)
    vit_patch_size: int = opt(16, "Side of one ViT patch in pixels.", valid=COUNT)
    vit_img_size: int = opt(512, "Side of one image tile fed to the ViT, in pixels.", valid=COUNT)
    vit_n_heads: int = opt(12, "Attention heads in the ViT.", valid=COUNT)
    vit_dropout: float = opt(0.0, "Dropout inside the ViT.", valid=FRACTION_BELOW_1)
    vit_n_blocks: int = opt(12, "Number of ViT blocks.", valid=COUNT)
    vit_ln_eps: float = opt(1e-6, "LayerNorm epsilon in the ViT.", valid=POSITIVE)
    vit_cls_flag: bool = opt(False, "Prepend a CLS token and return only it (nanoVLM keeps this False).")
    vit_model_type: str = opt("google/siglip2-base-patch16-512", "Name of the vision backbone (metadata).")
    lm_hidden_dim: int = opt(960, "Width of the language decoder.", valid=COUNT)
    lm_inter_dim: int = opt(2560, "Hidden width of the decoder's SwiGLU MLP.", valid=COUNT)
    lm_rms_eps: float = opt(1e-5, "RMSNorm epsilon in the decoder.", valid=POSITIVE)
    lm_re_base: int = opt(100000, "RoPE base (theta).", valid=COUNT)
    lm_max_position_embeddings: int = opt(
        8192, "Positions RoPE was trained for; longer inputs scale the frequencies.", valid=COUNT
    )
    lm_base_vocab_size: int = opt(49152, "Vocabulary of the tokenizer before the extra image tokens.", valid=COUNT)
    extra_token_amount: int = opt(
        66, "Number of extra tokens nanoVLM adds (image, global image, 64 tile tokens).", valid=NON_NEGATIVE
    )
    lm_vocab_size: int = opt(49218, "Decoder vocabulary: lm_base_vocab_size + extra_token_amount.", valid=COUNT)
    lm_n_heads: int = opt(15, "Query heads in the decoder.", valid=COUNT)
    lm_n_kv_heads: int = opt(5, "Key/value heads in the decoder (grouped-query attention).", valid=COUNT)
    lm_dropout: float = opt(0.0, "Dropout inside the decoder.", valid=FRACTION_BELOW_1)
    lm_n_blocks: int = opt(32, "Number of decoder blocks.", valid=COUNT)
    lm_attn_scaling: float = opt(1.0, "Multiplier on RoPE cos/sin (nanoVLM's attention scaling).", valid=POSITIVE)
    lm_max_length: int = opt(4096, "Tokens per packed row: the packer's capacity.", valid=COUNT)
    lm_use_tokens: bool = opt(False, "nanoVLM flag: decoder returns logits itself (kept for config compatibility).")
    lm_tie_weights: bool = opt(True, "Share the input embedding and the output head.")
    lm_model_type: str = opt("HuggingFaceTB/SmolLM2-360M-Instruct", "Name of the language backbone (metadata).")
    lm_tokenizer: str = opt("HuggingFaceTB/SmolLM2-360M-Instruct", "Tokenizer named in nanoVLM's config.json.")
    lm_chat_template: str = opt(NANOVLM_CHAT_TEMPLATE, "Jinja chat template (nanoVLM's ChatML).")
    mp_pixel_shuffle_factor: int = opt(
        4, "Pixel-shuffle factor of the projector (tokens per tile shrink by its square).", valid=COUNT
    )
    mp_image_token_length: int = opt(64, "Image tokens per tile after pixel shuffle.", valid=COUNT)
    max_img_size: int = opt(2048, "Longest image side after resizing, in pixels.", valid=COUNT)
    resize_to_max_side_len: bool = opt(True, "Always resize the long side to max_img_size (else only shrink to fit).")
    vlm_extra_tokens: dict = opt(default_extra_tokens(), "Extra special tokens by attribute name, in id order.")
    vlm_load_backbone_weights: bool = opt(True, "nanoVLM flag (metadata); use vision_backbone/language_backbone.")
    vlm_checkpoint_path: str = opt("checkpoints", "nanoVLM field (metadata).")
    hf_repo_name: str = opt("nanoVLM", "nanoVLM field (metadata).")
    vision_backbone: str = opt("", "Local Hugging Face folder of a SigLIP/SigLIP2 vision tower to start from.")
    language_backbone: str = opt("", "Local Hugging Face folder of a Llama-family causal LM to start from.")
    tokenizer: str = opt("", "Local tokenizer folder; overrides lm_tokenizer when set.")

    def validate(self) -> None:
        """Each field's range first (a zero head count must not reach a modulo), then the shapes that must divide
        each other, then the extra tokens the data pipeline writes."""
        _check_ranges(self, "model")
        self._check_shapes()
        self._check_extra_tokens()

    def _check_shapes(self) -> None:
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
        _require(self.max_img_size >= self.vit_img_size, "model.max_img_size", "must be at least vit_img_size")

    def _check_extra_tokens(self) -> None:
        """The image string names the image token, the global-image token and a position token per tile
        (`r{row}c{col}`); a grid larger than the tile tokens reach would fail on the first big image, mid-run."""
        tokens = self.vlm_extra_tokens
        _require(
            len(tokens) == self.extra_token_amount,
            "model.extra_token_amount",
            f"must equal the number of vlm_extra_tokens ({len(tokens)})",
        )
        _require(
            all(isinstance(v, str) and v for v in tokens.values()),
            "model.vlm_extra_tokens",
            "must map each attribute name to a non-empty token string",
        )
        missing = [name for name in ("image_token", "global_image_token") if name not in tokens]
        _require(
            not missing, "model.vlm_extra_tokens", f"lacks {', '.join(missing)}; nanoVLM's image string needs both"
        )
        side = math.ceil(self.max_img_size / self.vit_img_size)  # rows and columns of the largest tile grid
        reach = 0  # tile tokens r1c1 .. r{reach}c{reach} all exist
        while reach < side and all(f"r{i}c{j}" in tokens for i in range(1, reach + 2) for j in range(1, reach + 2)):
            reach += 1
        has = f"tile tokens up to r{reach}c{reach} only" if reach else "no tile tokens"
        _require(
            side == 1 or reach == side,
            f"model.max_img_size={self.max_img_size}",
            f"allows grids of {side}x{side} tiles of vit_img_size={self.vit_img_size} px, but vlm_extra_tokens has "
            f"{has}; lower max_img_size to {max(reach, 1) * self.vit_img_size} or add the tile tokens up to "
            f"r{side}c{side}",
        )

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.lm_tokenizer


@dataclass
class DataConfig:
    """Where the shards are and how samples become packed rows."""

    train_shards: Any = opt("", "Brace pattern, folder or manifest.json; or a list of {pattern, weight} to mix sets.")
    val_shards: str = opt("", "Held-out shards (brace pattern, folder or manifest.json); empty = no validation.")
    max_sample_length: int = opt(4096, "Samples with more tokens are dropped and counted.", valid=COUNT)
    max_images_per_example: int = opt(4, "Samples with more images are dropped and counted.", valid=COUNT)
    max_images_per_knapsack: int = opt(18, "Most images in one packed row.", valid=COUNT)
    max_tiles_per_knapsack: int = opt(
        0, "Most tiles in one packed row (0 = no limit beyond tokens).", valid=NON_NEGATIVE
    )
    buffer_packs: int = opt(
        32, "Packs the packer keeps open at once; more packs fill better and hold more memory.", valid=COUNT
    )
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
    shuffle_buffer: int = opt(1000, "Samples in the shuffle buffer (1 = no shuffle).", valid=COUNT)
    num_workers: int = opt(2, "Data-loader worker processes per rank.", valid=NON_NEGATIVE)
    worker_start: str = opt(
        "auto",
        "How loader workers start: fork, forkserver, spawn, or auto (forkserver on Python 3.11 and older, whose fork "
        "can deadlock a worker that a multi-threaded training process forks, CPython gh-112275; fork on 3.12+).",
        choices=("auto", "fork", "forkserver", "spawn"),
    )
    prefetch_factor: int = opt(2, "Batches each worker prepares ahead.", valid=COUNT)
    seed: int = opt(0, "Seed of shard order, sample shuffle and mixture sampling.", valid=NON_NEGATIVE)
    relevance_min_rating: int = opt(
        1, "Drop turns whose FineVision relevance rating is below this (nanoVLM's rule).", valid=NON_NEGATIVE
    )
    image_correspondence_min_rating: int = opt(
        1, "Drop turns whose image-correspondence rating is below this.", valid=NON_NEGATIVE
    )
    visual_dependency_min_rating: int = opt(
        1, "Drop turns whose visual-dependency rating is below this.", valid=NON_NEGATIVE
    )
    formatting_min_rating: int = opt(1, "Drop turns whose formatting rating is below this.", valid=NON_NEGATIVE)
    caption_prompt: str = opt(
        "Describe the image.", "The user turn of an image-caption pair (img2dataset layout: KEY.jpg + KEY.txt/json)."
    )
    virtual_readers: int = opt(
        0,
        "Fixed readers of the training data that ranks and workers divide among themselves (0 = one reader per rank "
        "and worker). With V > 0 the data order is the same on any world size that divides V: see README.",
        valid=NON_NEGATIVE,
    )

    def validate(self) -> None:
        _check_ranges(self, "data")
        _require(
            not self.cost_calibration or Path(self.cost_calibration).is_file(),
            "data.cost_calibration",
            f"names no file ({self.cost_calibration}); write one with `python -m toolkit bench gpu --calibrate FILE` "
            "or leave it empty",
        )
        _check_train_shards(self.train_shards)


def _check_train_shards(shards: Any) -> None:
    """A pattern string, or a mixture: a non-empty list of {pattern, weight} with a string pattern and a finite
    positive weight (the loader reads them with float() and sums them, so anything else fails deep inside it)."""
    if not isinstance(shards, list):
        _require(isinstance(shards, str), "data.train_shards", "must be a string or a list of {pattern, weight}")
        return
    _require(bool(shards), "data.train_shards", "is an empty list; give at least one {pattern: ..., weight: ...}")
    for i, item in enumerate(shards):
        key = f"data.train_shards[{i}]"
        ok = isinstance(item, dict) and set(item) <= {"pattern", "weight"} and "pattern" in item
        _require(ok, f"{key}={item!r}", "must be a mapping {pattern: ..., weight: ...}")
        pattern = item["pattern"]
        _require(
            isinstance(pattern, str) and bool(pattern.strip()),
            f"{key}.pattern={pattern!r}",
            "must be a brace pattern, folder or manifest.json path (a non-empty string)",
        )
        weight = item.get("weight", 1.0)
        number = _as_number(weight)
        _require(
            number is not None and math.isfinite(number) and number > 0,
            f"{key}.weight={weight!r}",
            "must be a number > 0: the set's share of the mixture (weights need not sum to 1)",
        )


@dataclass
class TrainConfig:
    """nanoVLM's optimisation recipe plus the run's cadence and lifecycle."""

    batch_size: int = opt(1, "Packed rows per rank per micro-step.", valid=COUNT)
    gradient_accumulation_steps: int = opt(
        1, "Micro-steps per optimizer step (derived from global_batch_size when that is set).", valid=COUNT
    )
    global_batch_size: int = opt(
        0,
        "Packed rows per optimizer step over all ranks; 0 = batch_size x gradient_accumulation_steps x world size. "
        "When set, accumulation is derived for the world size the run starts on.",
        valid=NON_NEGATIVE,
    )
    max_training_steps: int = opt(1000, "Optimizer steps of the run; the LR schedule spans them.", valid=COUNT)
    lr_mp: float = opt(5e-3, "Peak learning rate of the modality projector (0 = frozen).", valid=NON_NEGATIVE)
    lr_vision_backbone: float = opt(5e-5, "Peak learning rate of the vision encoder (0 = frozen).", valid=NON_NEGATIVE)
    lr_language_backbone: float = opt(5e-5, "Peak learning rate of the decoder (0 = frozen).", valid=NON_NEGATIVE)
    weight_decay: float = opt(0.01, "AdamW weight decay (nanoVLM: torch's AdamW default, 0.01).", valid=NON_NEGATIVE)
    warmup_ratio: float = opt(
        0.03, "Share of max_training_steps spent in linear warmup (nanoVLM: 0.03).", valid=FRACTION_BELOW_1
    )
    min_lr_ratio: float = opt(0.1, "Cosine floor as a share of each group's peak (nanoVLM: 0.1).", valid=FRACTION)
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this (0 = no clipping).", valid=NON_NEGATIVE)
    max_bad_steps: int = opt(
        5, "Stop after this many skipped steps in a row (NaN/inf loss or gradient, or no target token).", valid=COUNT
    )
    eval_interval: int = opt(
        0, "Validate every N steps (0 = only at the end when val_shards is set).", valid=NON_NEGATIVE
    )
    eval_max_batches: int = opt(
        0, "Cap on validation batches per rank (0 = the whole held-out set).", valid=NON_NEGATIVE
    )
    eval_accuracy_samples: int = opt(
        0, "Held-out samples answered by greedy generation at each validation (0 = off).", valid=NON_NEGATIVE
    )
    checkpoint_interval: int = opt(0, "Checkpoint every N steps (0 = only at the end).", valid=NON_NEGATIVE)
    export_interval: int = opt(
        0, "Export nanoVLM format every N steps (0 = never during training).", valid=NON_NEGATIVE
    )
    export_best: bool = opt(True, "Export to run_dir/export/best whenever validation loss improves.")
    keep_checkpoints: int = opt(2, "Checkpoints kept on disk; the one 'latest' names is never deleted.", valid=COUNT)
    async_checkpoint: bool = opt(
        False,
        "Write checkpoints in the background while training goes on (single, ddp, fsdp); `latest` moves only once "
        "every rank's write is complete.",
    )
    stop_at_step: int = opt(
        0,
        "Checkpoint and exit 0 after this step; the schedule still spans max_training_steps (time-boxed jobs; a "
        "step past max_training_steps ends there).",
        valid=NON_NEGATIVE,
    )
    log_interval: int = opt(1, "Log a progress line every N steps.", valid=COUNT)
    activation_checkpointing: str = opt(
        "none",
        "Recompute activations per block (a frozen vision tower's blocks keep none, so are left as they are).",
        choices=("none", "vision", "language", "all"),
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
        "else FlexAttention; a dense mask on CPU), or force varlen, flex or dense (to compare them with `bench gpu`; "
        "varlen and flex train on CUDA only).",
        choices=("auto", "flex", "varlen", "dense"),
    )
    profile_steps: int = opt(
        0,
        "Trace this many steps with torch.profiler on every rank (0 = off): run_dir/profile/ gets each rank's trace "
        "(Chrome/Perfetto JSON, with the trainer's forward_backward, norm_and_loss_read and optimizer_step spans) "
        "and rank 0's table of the ops that took the most time.",
        valid=NON_NEGATIVE,
    )
    profile_start: int = opt(
        5,
        "Steps of each launch left untraced before train.profile_steps begin (compilation, allocator growth).",
        valid=NON_NEGATIVE,
    )
    seed: int = opt(0, "Seed of model initialisation and dropout.", valid=NON_NEGATIVE)
    run_dir: str = opt("runs/default", "Run folder: config, checkpoints, exports, TensorBoard, metrics.jsonl.")
    resume: str = opt(
        "auto",
        "'auto' continues from run_dir's latest checkpoint, or starts fresh when run_dir has none; 'none' starts "
        "fresh and refuses a run_dir that already holds checkpoints (give a new run_dir instead); any other value is "
        "a checkpoint folder (or a run folder, or its checkpoints/ folder, whose latest is taken) to continue from.",
    )
    resume_data: bool = opt(
        True,
        "On resume, continue the data stream where the checkpoint left it. false: start it afresh from the first "
        "batch of data.train_shards (under data.seed) while the model, optimizer, schedule and step continue: for "
        "a resume after changing the data, whose saved stream position fits only the data it was saved with.",
    )
    init_from: str = opt(
        "",
        "A nanoVLM-format folder (an export, or nanoVLM's own checkpoint) whose weights start a new stage: all three "
        "parts' weights come from it, and its config.json sets the model's architecture (a model.* shape field set "
        "on the command line must agree with it); optimizer, schedule, data position and step start fresh.",
    )

    lmms_tasks: str = opt(
        "",
        "Comma-separated lmms-eval tasks scored on each lmms_interval export while training goes on (empty = off; "
        "nanoVLM's set: mmstar,mmmu_val,ocrbench,textvqa_val,docvqa_val,scienceqa,mme,infovqa_val,chartqa).",
    )
    lmms_interval: int = opt(0, "Export and score lmms_tasks every N steps (0 = off).", valid=NON_NEGATIVE)
    lmms_limit: int = opt(0, "At most this many documents per lmms-eval task (0 = every document).", valid=NON_NEGATIVE)
    lmms_batch_size: int = opt(64, "Requests answered together by the lmms-eval adapter (nanoVLM: 64).", valid=COUNT)
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
        valid=NON_NEGATIVE,
    )
    wandb_project: str = opt("", "Weights & Biases project to log to from rank 0 (empty = no W&B).")
    wandb_mode: str = opt(
        "online",
        "W&B mode: online, offline (sync later with `wandb sync`) or disabled.",
        choices=("online", "offline", "disabled"),
    )

    def validate(self) -> None:
        _check_ranges(self, "train")
        _require(bool(self.run_dir.strip()), "train.run_dir", "is empty; name the run's folder, e.g. runs/NAME")
        self._check_resume()
        _require(
            any((self.lr_mp, self.lr_vision_backbone, self.lr_language_backbone)),
            "train.lr_mp",
            "and train.lr_vision_backbone and train.lr_language_backbone are all 0, which freezes every weight; "
            "give at least one module a learning rate",
        )
        _require(
            not self.lmms_interval or bool(self.lmms_tasks.strip()),
            "train.lmms_interval",
            "is set but train.lmms_tasks is empty; name the tasks (e.g. train.lmms_tasks=mmstar,mme) or set 0",
        )

    def _check_resume(self) -> None:
        """Anything but 'auto' and 'none' is read as a path, so 'None' or '' would fail later as a missing
        checkpoint folder rather than as the keyword the user meant."""
        resume = self.resume.strip()
        _require(bool(resume), "train.resume", "is empty; give auto, none or a checkpoint folder")
        keyword = resume.lower()
        _require(
            keyword not in ("auto", "none") or resume == keyword,
            f"train.resume={self.resume!r}",
            f"would be read as a checkpoint path; write {keyword!r} (lower case) for the keyword",
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
    collective_timeout_s: int = opt(
        1800,
        "Seconds a collective may wait for the other ranks before it fails: a rank that hangs (a stuck filesystem, "
        "a node gone silent) stops the run after this instead of holding every GPU. Above the longest rank-0-only "
        "pause (validation by generation, an export).",
        valid=COUNT,
    )

    def validate(self) -> None:
        """Ranges only: the backend named checks its own settings when it is built, before any process group."""
        _check_ranges(self, "backend")


@dataclass
class Config:
    """A whole run: model, data, train and backend sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    # "section.field" names the command line set (load_config's overrides): what the user asked for by name, as
    # against a preset's or file's defaults. train.init_from's folder decides the architecture fields except these.
    overridden: set[str] = field(default_factory=set, compare=False, repr=False)

    def validate(self) -> Config:
        for section in SECTIONS:
            sub = getattr(self, section)
            _check_types(sub, section)
            _check_choices(sub, section)
            if hasattr(sub, "validate"):
                sub.validate()
        return self

    def to_dict(self) -> dict:
        return {section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS}


SECTIONS = ("model", "data", "train", "backend")


def _require(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{name} {what}")


def _check_ranges(obj: Any, section: str) -> None:
    """Every field that declares a Range holds a number inside it; the message repeats the field's meaning, whose
    help says what 0 stands for where 0 is allowed."""
    for f in dataclasses.fields(obj):
        valid, value = f.metadata.get("valid"), getattr(obj, f.name)
        if valid is not None and not valid.holds(value):
            meaning = f.metadata["help"].split(". ")[0].split(": ")[0].rstrip(".")
            raise ConfigError(f"{section}.{f.name}={value!r} must be {valid}: {meaning}")


def _as_number(value: Any) -> float | None:
    """float(value) for what YAML or the command line gives as a number (1, 0.5, '1e-3'), else None; a bool is
    not a number here, though Python would read True as 1."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


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
        number = _as_number(value) if isinstance(value, (int, float, str)) else None  # YAML 1.1 reads "1e-3" as str
        if number is not None and math.isfinite(number):
            return number
        if number is not None:  # .inf, .nan: no rate, ratio or norm in this config means anything infinite
            raise ConfigError(f"{name}={value!r} must be a finite number")
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


def _all_fields() -> dict[str, list[str]]:
    return {s: section_fields(s) for s in SECTIONS}


def _unknown_field(section: str, name: str) -> ConfigError:
    allowed = ", ".join(section_fields(section))
    hint = did_you_mean(suggest_keys(name, _all_fields(), section))
    return ConfigError(f"unknown field '{section}.{name}'.{hint} Fields of {section}: {allowed}")


def _unknown_section(section: str, field: str | None = None) -> ConfigError:
    """`field` is the name after the dot in an override; a YAML section has none, but its own name may be a field
    written at the top level (a flat config such as nanoVLM's), which is then placed under its section."""
    keys = difflib.get_close_matches(section, SECTIONS, n=1)
    if field is not None:
        keys = (
            [f"{keys[0]}.{field}"] if keys and field in section_fields(keys[0]) else suggest_keys(field, _all_fields())
        )
    else:
        keys += suggest_keys(section, _all_fields()) if section.lower() in ALIASES or _is_field(section) else []
    return ConfigError(f"unknown config section {section!r}.{did_you_mean(keys)} Sections: {', '.join(SECTIONS)}")


def _is_field(name: str) -> bool:
    return any(name in section_fields(s) for s in SECTIONS)


def apply_mapping(cfg: Config, data: dict, origin: str = "config") -> None:
    """Set fields from a nested {section: {field: value}} mapping, refusing unknown names."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must be a mapping of sections ({', '.join(SECTIONS)})")
    for section, values in data.items():
        if section not in SECTIONS:
            raise _unknown_section(str(section))
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping of fields")
        allowed = section_fields(section)
        for key, value in values.items():
            if key not in allowed:
                raise _unknown_field(section, str(key))
            setattr(getattr(cfg, section), key, value)


def parse_override(text: str) -> tuple[str, str, Any]:
    """'train.lr_mp=1e-3' -> ('train', 'lr_mp', 0.001); the value is read as YAML so lists and bools work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    if key.count(".") != 1:
        hint = did_you_mean(suggest_keys(key, _all_fields())) if "." not in key else ""
        raise ConfigError(
            f"override {text!r}: the key must be section.field, one of sections {', '.join(SECTIONS)}.{hint}"
        )
    section, name = key.split(".")
    if section not in SECTIONS:
        raise _unknown_section(section, name)
    if name not in section_fields(section):
        raise _unknown_field(section, name)
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
        cfg.overridden.add(f"{section}.{name}")
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
