"""Checks of everything a run reads late, made before any rank starts, so a wrong value never costs a run.

Validation shards are first opened at the first validation, backbones once the model is built, the run folder
at the first checkpoint. A typo in any of them used to surface hours in (or at the very end, losing the last
checkpoint). Each check here is cheap (paths, manifests, headers) and names the field to fix. Nothing is written:
a refused run leaves no run folder behind.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from toolkit import dist
from toolkit.config import Config, ConfigError
from toolkit.data.order import check_layout
from toolkit.data.shards import ShardSet, resolve_sets
from toolkit.data.tokenizer import VLMTokenizer, load_tokenizer
from toolkit.train.lmms_watch import check_can_score
from toolkit.train.wandb_log import WANDB_MISSING, wandb_enabled

EVAL_FIELDS = ("eval_interval", "eval_max_batches", "eval_accuracy_samples")


def derive_accumulation(cfg: Config, world: int) -> None:
    """train.global_batch_size -> train.gradient_accumulation_steps for this world size (in place), and the
    virtual-reader layout checked; a global batch this world size cannot split is refused."""
    t = cfg.train
    global_batch = t.global_batch_size or t.batch_size * t.gradient_accumulation_steps * world
    if cfg.data.virtual_readers:  # first: its message lists the world sizes this order allows
        check_layout(
            cfg.data.virtual_readers,
            world=world,
            workers=cfg.data.num_workers,
            batch_size=t.batch_size,
            global_batch=global_batch,
        )
    if global_batch % (t.batch_size * world):
        raise ConfigError(
            f"train.global_batch_size={global_batch} is not a multiple of train.batch_size x world size = "
            f"{t.batch_size} x {world}; choose a global batch, batch size and number of ranks that divide"
        )
    derived = global_batch // (t.batch_size * world)
    if t.global_batch_size and t.gradient_accumulation_steps not in (1, derived):  # 1: the default, not a choice
        dist.log0(
            "train.gradient_accumulation_steps=%d is replaced by %d: train.global_batch_size=%d on %d rank(s) of "
            "train.batch_size=%d sets it (drop one of the two)",
            t.gradient_accumulation_steps, derived, global_batch, world, t.batch_size, level=logging.WARNING,
        )  # fmt: skip
    t.gradient_accumulation_steps = derived


def check_run(cfg: Config, world: int = 1) -> VLMTokenizer:
    """Raise ConfigError naming the first field that would fail later in the run; returns the tokenizer, which
    checking model.tokenizer (and its fit to the model's vocabulary) has loaded anyway. `world`: the ranks the run
    will have, for the warning on shard sets smaller than the job's readers."""
    tokenizer = load_tokenizer(cfg.model)
    train_sets = resolve_sets(cfg.data.train_shards, name="data.train_shards")
    workers = max(1, cfg.data.num_workers)
    per_rank = (world * workers, f"{world} rank(s) x {workers} loader worker(s)")
    virtual = (cfg.data.virtual_readers, f"data.virtual_readers={cfg.data.virtual_readers}")
    _warn_few_shards("data.train_shards", train_sets, *(virtual if cfg.data.virtual_readers else per_rank))
    _warn_few_shards("data.val_shards", _check_eval(cfg), *per_rank)  # validation has no virtual readers
    for field in ("vision_backbone", "language_backbone"):
        _check_backbone(f"model.{field}", getattr(cfg.model, field))
    _check_init_from(cfg)
    _check_run_dir(Path(cfg.train.run_dir))
    _check_wandb(cfg)
    _check_lmms(cfg)
    return tokenizer


def _check_lmms(cfg: Config) -> None:
    """lmms-eval scores only the train.lmms_interval exports (there is no end-of-run scoring), so tasks without
    an interval would train for hours and score nothing; and a scoring that cannot start (lmms-eval missing, no
    sbatch, a missing include folder) is refused here, before the run folder is made, not by the watcher."""
    t = cfg.train
    if not t.lmms_tasks.strip():
        return
    if not t.lmms_interval:
        raise ConfigError(
            f"train.lmms_tasks={t.lmms_tasks} is set but train.lmms_interval is 0, so nothing would be scored: set "
            "train.lmms_interval=N to score an export every N steps, or score a finished run with "
            "`python -m toolkit eval --checkpoint RUN/export/... --lmms-tasks ...`"
        )
    check_can_score(t)


def _check_eval(cfg: Config) -> list[ShardSet]:
    t = cfg.train
    if cfg.data.val_shards:
        return resolve_sets(cfg.data.val_shards, name="data.val_shards")
    for field in EVAL_FIELDS:
        if getattr(t, field):
            raise ConfigError(
                f"train.{field}={getattr(t, field)} asks for validation but data.val_shards is empty; "
                f"set data.val_shards to held-out shards, or train.{field}=0"
            )
    return []


# Readers of a set with fewer shards than readers each open every shard and keep every n-th sample: the set is read
# n times a pass (and each shard opened n times on the filesystem). From this many readers on, that is said.
FEW_SHARDS_READERS = 16


def _warn_few_shards(field: str, sets: list[ShardSet], readers: int, how: str) -> None:
    """A set of fewer shards than the job's readers (ranks x loader workers, or data.virtual_readers) is read by
    sample: 64 validation shards on 512 ranks of 4 workers were opened 131,072 times a validation, each reader
    reading the whole set for its 1/2048. Allowed (a small held-out set is common), said once with the fix."""
    if readers < FEW_SHARDS_READERS:
        return
    for shard_set in sets:
        n = len(shard_set.shards)
        if n < readers:
            dist.log0(
                "%s: %s has %d shards for %d readers (%s): each reader opens every shard and keeps 1 sample in "
                "%d, so a pass reads the set %d times; write it as at least %d shards (shard-data --shard-size "
                "smaller) to read each sample once",
                field, shard_set.pattern, n, readers, how, readers, readers, readers,
                level=logging.WARNING,
            )  # fmt: skip


def _check_backbone(field: str, folder: str) -> None:
    if not folder:
        return
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{field}={folder} is not a Hugging Face model folder (no config.json there); "
            f"give a local folder saved with save_pretrained, or leave {field} empty to start from scratch"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise ConfigError(f"{field}={folder} holds no *.safetensors or pytorch_model*.bin weights")


# ModelConfig fields that decide the weights' shapes or what they compute: equal between train.init_from's folder
# and the run. The rest (tokenizer paths, names, image resizing, row length, dropout) may change between stages.
ARCHITECTURE_FIELDS = (
    "vit_hidden_dim", "vit_inter_dim", "vit_patch_size", "vit_img_size", "vit_n_heads", "vit_n_blocks", "vit_ln_eps",
    "vit_cls_flag", "lm_hidden_dim", "lm_inter_dim", "lm_rms_eps", "lm_re_base", "lm_max_position_embeddings",
    "lm_base_vocab_size", "extra_token_amount", "lm_vocab_size", "lm_n_heads", "lm_n_kv_heads", "lm_n_blocks",
    "lm_attn_scaling", "lm_tie_weights", "mp_pixel_shuffle_factor", "mp_image_token_length", "vlm_extra_tokens",
)  # fmt: skip


def _check_init_from(cfg: Config) -> None:
    folder = cfg.train.init_from
    if not folder:
        return
    path = Path(folder)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ConfigError(
            f"train.init_from={folder} is not a nanoVLM-format folder (config.json + model.safetensors); give an "
            "`export` of a run (runs/NAME/export/...) or a nanoVLM checkpoint folder"
        )
    from toolkit.model.hub import read_nanovlm_config

    _check_safetensors("train.init_from", path / "model.safetensors")
    saved = read_nanovlm_config(path)
    fields = [f for f in ARCHITECTURE_FIELDS if getattr(cfg.model, f) != getattr(saved, f)]
    if fields:
        differ = "; ".join(f"{f}: run {getattr(cfg.model, f)!r} vs folder {getattr(saved, f)!r}" for f in fields)
        if all(f"model.{f}" in cfg.overridden for f in fields):  # the run adopts the rest (adopt_init_architecture)
            mine = " ".join(f"model.{f}={json.dumps(getattr(cfg.model, f))}" for f in fields)
            fix = f"its weights decide these fields: drop {mine} from the command line"
        else:  # a caller that checks a config it did not prepare
            fix = " ".join(f"model.{f}={json.dumps(getattr(saved, f))}" for f in fields)
            fix = f"set those model.* fields to the values in {path / 'config.json'}: add {fix}"
        raise ConfigError(
            f"train.init_from={folder} holds another architecture than model.* describes ({differ}); {fix}"
        )
    backbones = [f"model.{f}" for f in ("vision_backbone", "language_backbone") if getattr(cfg.model, f)]
    if backbones:
        raise ConfigError(
            f"train.init_from={folder} sets every weight, so {' and '.join(backbones)} would be overwritten; "
            f"drop {' and '.join(backbones)} or train.init_from"
        )


def _check_safetensors(field: str, file: Path) -> None:
    """A safetensors file whose header is unreadable or whose size is short of what the header lays out (a copy or
    download cut short) is refused here: loading it fails once the model is built, in safetensors' own words."""
    problem = ""
    try:
        with open(file, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size)) if 0 < size < 100_000_000 else None
        if not isinstance(header, dict):
            problem = "its header is unreadable"
        else:
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if file.stat().st_size < 8 + size + end:
                problem = f"it is {file.stat().st_size} bytes, its header lays out {8 + size + end}: it was cut short"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError) as exc:
        problem = f"its header is unreadable ({type(exc).__name__})"
    if problem:
        raise ConfigError(f"{field}: {file} is not a complete safetensors file ({problem}); export it again")


# train fields whose zero / non-zero decides the optimizer's layout: a group at LR 0 is frozen and has no state.
GROUP_LR_FIELDS = ("lr_mp", "lr_vision_backbone", "lr_language_backbone")


def check_resume(cfg: Config, checkpoint: Path | None, backend: Any, *, files: bool = True) -> None:
    """What a resume cannot change, against the checkpoint's trainer.json (backend, world size) and its run's
    config.yaml (architecture, frozen groups), before anything is built or written. `files=False` leaves the
    checkpoint's files to `check_resume_files` once the ranks' process group runs (a multi-rank run).

    Without this a changed model.* failed in load_state_dict after the run folder's config.yaml had been
    rewritten with the new values, and `export` then paired the old weights with the new config.
    """
    if checkpoint is None:
        return
    from toolkit.train.checkpoint import check_resumable, damaged, read_trainer_meta
    from toolkit.train.safe_load import CheckpointFileError

    try:
        meta = read_trainer_meta(checkpoint)
        check_resumable(checkpoint, meta, backend=backend)
    except CheckpointFileError as exc:
        raise damaged(exc, checkpoint, verb="resume") from exc
    if files:
        check_resume_files(checkpoint, backend, rank=0, world=1)
    saved_file = checkpoint.parent.parent / "config.yaml"
    saved = saved_config(saved_file)
    now = cfg.to_dict()
    model = [f"model.{f}: checkpoint {saved['model'][f]!r} vs now {now['model'][f]!r}" for f in ARCHITECTURE_FIELDS
             if f in saved.get("model", {}) and saved["model"][f] != now["model"][f]]  # fmt: skip
    if model:
        raise ConfigError(
            f"resuming {checkpoint}: this run's model differs from the one that wrote it ({'; '.join(model)}; "
            f"from {saved_file}); resume with the same model.* values, or train the new architecture in a new "
            "train.run_dir (its weights cannot load these)"
        )
    seed = saved.get("data", {}).get("seed")
    if cfg.train.resume_data and seed is not None and seed != cfg.data.seed:
        raise ConfigError(
            f"resuming {checkpoint}: data.seed={cfg.data.seed}, but its data stream was saved under data.seed={seed} "
            f"(from {saved_file}), whose shuffled order its position counts in: the new order would repeat some "
            f"samples and skip others. Resume with data.seed={seed}, or add train.resume_data=false to start the "
            "new order's stream from its first batch"
        )
    frozen = [f"train.{f}: checkpoint {saved['train'][f]!r} vs now {now['train'][f]!r}" for f in GROUP_LR_FIELDS
              if f in saved.get("train", {}) and (saved["train"][f] == 0) != (now["train"][f] == 0)]  # fmt: skip
    if frozen:
        raise ConfigError(
            f"resuming {checkpoint}: a group frozen (LR 0) in one run and trained in the other ({'; '.join(frozen)}; "
            f"from {saved_file}) changes the optimizer's state; resume with the same groups frozen, or start a new "
            f"train.run_dir with train.init_from=<an export of it> (`python -m toolkit export {checkpoint} OUT`)"
        )
    _warn_global_batch(cfg, saved.get("train", {}), int(meta["world_size"]), backend.env.world_size)


def check_resume_files(checkpoint: Path | None, backend: Any, *, rank: int, world: int) -> None:
    """Every file the resume of `checkpoint` reads, there and whole: in one process (world 1: `train --check`, a
    one-rank run), or collective over the running process group, each rank checking every world-th file (every
    rank checking every file was about two million metadata calls per resume at 512 ranks)."""
    if checkpoint is None:
        return
    from toolkit.train.checkpoint import damaged, read_trainer_meta, resume_file_checks
    from toolkit.train.file_checks import check_files_shared
    from toolkit.train.safe_load import CheckpointFileError

    try:
        meta = read_trainer_meta(checkpoint)
        check_files_shared(lambda: resume_file_checks(checkpoint, meta, backend=backend), rank=rank, world=world)
    except CheckpointFileError as exc:
        raise damaged(exc, checkpoint, verb="resume") from exc


def _warn_global_batch(cfg: Config, saved: dict[str, Any], saved_world: int, world: int) -> None:
    """A resume on fewer ranks without train.global_batch_size halved the rows per optimizer step without a word,
    under the same learning rates: allowed (a choice), but said, with the setting that keeps the old one."""
    try:
        before = int(saved["batch_size"]) * int(saved["gradient_accumulation_steps"]) * saved_world
    except (KeyError, TypeError, ValueError):  # a config.yaml without them: nothing to compare
        return
    t = cfg.train
    now = t.batch_size * t.gradient_accumulation_steps * world
    if now != before:
        dist.log0(
            "resuming with %d rows per optimizer step (train.batch_size %d x %d micro-steps x %d ranks); the "
            "checkpoint trained with %d (%d x %d x %d) at the same learning rates: set train.global_batch_size=%d "
            "to keep it", now, t.batch_size, t.gradient_accumulation_steps, world, before, saved["batch_size"],
            saved["gradient_accumulation_steps"], saved_world, before, level=logging.WARNING,
        )  # fmt: skip


def saved_config(file: Path) -> dict[str, Any]:
    """The run's config.yaml as written ({} when there is none: a checkpoint copied without it is not refused)."""
    if not file.is_file():
        return {}
    try:
        saved = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{file} cannot be read ({type(exc).__name__}); it records the run's settings: "
                          "put it back from a copy") from exc  # fmt: skip
    return {k: v for k, v in saved.items() if isinstance(v, dict)} if isinstance(saved, dict) else {}


def _check_wandb(cfg: Config) -> None:
    """train.wandb_project needs the wandb package, otherwise missed only once rank 0 opens its metrics writer.
    Found without importing it (importing wandb takes a second); checked on every rank, so all refuse alike."""
    t = cfg.train
    if wandb_enabled(t.wandb_project, t.wandb_mode) and importlib.util.find_spec("wandb") is None:
        raise ConfigError(WANDB_MISSING.format(project=t.wandb_project))


# What a run writes inside train.run_dir, and when: an existing folder that is not writable failed the first save,
# export or log line, hours in, when only the run folder itself was checked.
RUN_SUBFOLDERS = {
    "checkpoints": "a checkpoint every train.checkpoint_interval steps",
    "export": "its exports (train.export_interval, train.export_best)",
    "tb": "its TensorBoard logs",
}


def _check_run_dir(run_dir: Path) -> None:
    _check_writable("train.run_dir", run_dir)
    for name, writes in RUN_SUBFOLDERS.items():
        sub = run_dir / name
        if sub.exists() and not (sub.is_dir() and os.access(sub, os.W_OK | os.X_OK)):
            what = "is not writable by this user" if sub.is_dir() else "is a file, not a folder"
            raise ConfigError(
                f"train.run_dir={run_dir}: {sub} {what}, and the run writes {writes} there; make it writable "
                f"(chmod u+w {sub}) or choose another train.run_dir"
            )
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and not os.access(metrics, os.W_OK):
        raise ConfigError(
            f"train.run_dir={run_dir}: {metrics} is not writable by this user, and the run appends to it; make it "
            f"writable (chmod u+w {metrics}) or choose another train.run_dir"
        )


def _check_writable(field: str, path: Path) -> None:
    """The folder, or the nearest parent that exists, must be a writable folder (checked without writing)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{field}={path}: {probe} is a file, not a folder; choose another {field}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}={path}: {probe} is not writable by this user; choose another {field}")
