"""DeepSpeed ZeRO stage 0-3 (and the offload variants) behind the backend interface.

The files in ds_configs/ hold ZeRO settings only. Batch size, accumulation, clipping, bf16 and the gradient
reduction's dtype (`communication_data_type`, from backend.grad_reduce_dtype) are the toolkit config's: they
are filled in here, and a value written by hand that disagrees is an error naming both, since a silent mismatch
changes the effective batch or the precision without anyone noticing. The optimizer is the
toolkit's AdamW with one group per module and the schedule the toolkit's LambdaLR, stepped here rather than by
DeepSpeed: DeepSpeed's WarmupCosineLR would write one LR into every group, and stepping it ourselves keeps a
skipped step (non-finite loss) advancing the schedule the same way under every ZeRO stage.

Loss scaling: DeepSpeed averages gradients over data-parallel ranks; `backward(scale_wrt_gas=False)` stops its
1/accumulation scaling, and the loss is multiplied by the world size, so gradients are token-weighted sums.

Resume on another number of ranks (ZeRO 1, 2 and 3): ZeRO's shards are cut for the world size that wrote them.
When `load` finds shards from another world size, rank 0 converts them once with DeepSpeed's `ds_to_universal`
into `<checkpoint>/universal/` (written under a temporary name and renamed, so a killed conversion is redone and
a finished one is reused), and every rank then loads that folder through the engine's universal path. Two
things that path gets wrong for this optimizer are put right after it (see `_after_universal_load`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit import dist
from toolkit.config import Config, ConfigError
from toolkit.train.backends.base import (
    Backend,
    Capabilities,
    StepResult,
    grad_norm_tensor,
    prepare_blocks,
    tensor_state_numel,
)
from toolkit.train.durable import sync_after_save, sync_path
from toolkit.train.file_checks import FileCheck, check_files_shared, zip_problem
from toolkit.train.optim import GROUP_PREFIXES, ParamGroup, build_optimizer, freeze_frozen_groups, group_lrs
from toolkit.train.safe_load import CheckpointFileError, read_failure
from toolkit.train.schedule import WarmupCosine, build_scheduler

CHECKPOINT_TAG = "deepspeed"
UNIVERSAL_DIR = "universal"  # inside a checkpoint's model folder: its ZeRO shards converted for any world size
ZERO_SHARD_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")  # ZeRO 1-3, bf16_ prefix too
REPO_ROOT = Path(__file__).resolve().parents[3]
PICKLE_WARNING = (
    "%s: DeepSpeed reads its checkpoint files with Python's pickle, which can run code hidden in a file. "
    "The toolkit cannot make that safe: resume from and export only DeepSpeed checkpoints you wrote yourself"
)


def _find_config(path: str) -> Path:
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.name for p in (REPO_ROOT / "ds_configs").glob("*.json")))
    raise ConfigError(f"backend.ds_config={path} is not a file; the shipped ones are ds_configs/{{{shipped}}}")


def _same(given: Any, expected: Any) -> bool:
    if isinstance(given, bool) or isinstance(expected, bool):
        return given is expected
    if isinstance(given, (int, float)) and isinstance(expected, (int, float)):
        return math.isclose(float(given), float(expected))
    return given == expected


def resolve_ds_config(cfg: Config, world_size: int) -> dict:
    """Read backend.ds_config and fill in what the toolkit config owns; a disagreeing hand-set value is an error."""
    path = _find_config(cfg.backend.ds_config)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"backend.ds_config={path} is not valid JSON: {exc}") from exc
    for owned in ("optimizer", "scheduler"):
        if owned in raw:
            raise ConfigError(
                f"{path} has a '{owned}' section; remove it: the toolkit builds AdamW with per-module LR groups and "
                "nanoVLM's warmup-cosine itself (train.lr_*, train.warmup_ratio)"
            )
    if raw.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"{path} enables fp16; remove the fp16 section and use backend.precision=bf16 or fp32")
    stage = raw.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path} must set zero_optimization.stage to 0, 1, 2 or 3 (got {stage!r})")
    tc = cfg.train
    owned_values = {
        "train_micro_batch_size_per_gpu": (tc.batch_size, "train.batch_size"),
        "gradient_accumulation_steps": (tc.gradient_accumulation_steps, "train.gradient_accumulation_steps"),
        "train_batch_size": (
            tc.batch_size * tc.gradient_accumulation_steps * world_size,
            f"train.batch_size x train.gradient_accumulation_steps x {world_size} ranks",
        ),
        "gradient_clipping": (tc.max_grad_norm, "train.max_grad_norm"),
        # DeepSpeed's default is the parameters' dtype (bf16 under bf16); the toolkit's is fp32 unless asked.
        "communication_data_type": (cfg.backend.grad_reduce_dtype, "backend.grad_reduce_dtype"),
    }
    resolved = dict(raw)
    for key, (value, source) in owned_values.items():
        _check_owned(path, key, raw.get(key, "auto"), value, source)
        resolved[key] = value
    bf16_section = dict(raw.get("bf16", raw.get("bfloat16", {})))
    _check_owned(
        path,
        "bf16.enabled",
        bf16_section.get("enabled", "auto"),
        cfg.backend.precision == "bf16",
        f"backend.precision={cfg.backend.precision}",
    )
    resolved.pop("bfloat16", None)
    resolved["bf16"] = {**bf16_section, "enabled": cfg.backend.precision == "bf16"}
    resolved.setdefault("steps_per_print", 2**62)  # the toolkit logs; DeepSpeed's own progress lines would repeat it
    resolved.setdefault("zero_allow_untested_optimizer", True)
    if raw.get("zero_optimization", {}).get("compute_grad_norm") is False:
        raise ConfigError(f"{path} sets zero_optimization.compute_grad_norm=false; remove it: every step reports it")
    if "offload_optimizer" in raw.get("zero_optimization", {}):
        resolved.setdefault("zero_force_ds_cpu_optimizer", False)  # torch AdamW when DeepSpeedCPUAdam can't build
    return resolved


def _check_owned(path: Path, key: str, given: Any, expected: Any, source: str) -> None:
    if given != "auto" and not _same(given, expected):
        raise ConfigError(
            f'{path} sets {key}={given!r} but {source} gives {expected!r}; set {key} to "auto" (or delete it) '
            f"in {path.name} and choose the value through the toolkit config"
        )


def _import_deepspeed(device: torch.device):
    """Import DeepSpeed pointing it at the CPU accelerator when we train on CPU (it would probe for CUDA)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # torch 2.13 deprecates the collectives DeepSpeed calls (all_gather_into_tensor, reduce_scatter_tensor): one
    # FutureWarning per rank, 512 copies of advice for DeepSpeed's authors at 512 GPUs, none the user can act on.
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", rf"`torch\.distributed\.{name}` is deprecated", FutureWarning)
    import deepspeed

    return deepspeed


def _gather_per_block(deepspeed: Any, model: nn.Module) -> None:
    """ZeRO-3 gathers and releases each vision/decoder block's parameters as one unit, hooking the block only.

    By default DeepSpeed hooks every submodule (~450 in nanovlm-450m) and its per-hook Python bookkeeping was
    most of ZeRO-3's cost on an H200 (0.75 s a step against 0.33 for `single`, world size 1). With the blocks as
    "leaf" modules the same narrow-model CPU comparison drops ZeRO-3's overhead over `single` from 0.28 to
    0.13 s. A block's parameters are a few percent of the model, so the memory ZeRO-3 saves is unchanged.
    """
    classes = sorted({type(block) for block in model.blocks()}, key=lambda cls: cls.__name__)
    deepspeed.utils.set_z3_leaf_modules(model, classes)


@contextlib.contextmanager
def _updates_disabled(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Run DeepSpeed's step with the inner AdamW update switched off.

    A skipped step must leave weights and AdamW moments untouched under every ZeRO stage. Going through
    engine.step() keeps DeepSpeed's own bookkeeping (micro-step counters, partitioned gradient buffers) right;
    only the torch update is replaced by a no-op for that one call.
    """
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del optimizer.step


def checkpoint_file_checks(path: Path) -> list[FileCheck]:
    """The files DeepSpeed wrote under `path/deepspeed/`, to check without unpickling any: a model-states file, one
    ZeRO optimizer shard per rank trainer.json records (a lost one would look like another world size and start a
    conversion), each a whole zip archive (torch.save's format; a cut file has no end record). DeepSpeed's own load
    fails on these with torch's message or a bare AssertionError, naming no file."""
    what, tag = "DeepSpeed's model and optimizer state", path / CHECKPOINT_TAG
    files = sorted(tag.glob("*.pt"))
    if not any(f.name.endswith("model_states.pt") for f in files):
        raise CheckpointFileError(tag / "mp_rank_00_model_states.pt", what, "no *model_states.pt file is there")
    meta_file = path.parent / "trainer.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}  # read and checked by the caller
    shards = [(f, m) for f in files if (m := ZERO_SHARD_RE.search(f.name))]
    world = meta.get("world_size", 0)
    templates = meta.get("rank_files")  # recorded since 2026-12-07; before, the ZeRO shards' names are inferred
    if templates is None and shards:
        templates = [shards[0][0].name[: shards[0][1].start()] + "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"]
    # Without the templates a checkpoint that lost every shard looked like ZeRO-0's
    expected = [tag / template.format(rank=rank) for template in templates or [] for rank in range(world)]
    lost = functools.partial(zip_problem, missing=f"the file is missing (trainer.json records {world} ranks)")
    named = set(expected)
    others = [f for f in files if f not in named]
    return [FileCheck(f, what, lost) for f in expected] + [FileCheck(f, what, zip_problem) for f in others]


def _stage0_weights(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """A ZeRO-0 checkpoint's weights: its model-states file's module, with the fp32 masters DeepSpeed's bf16
    wrapper keeps (`fp32_groups`, in the optimizer groups' parameter order) in place of the bf16 working copy."""
    saved = torch.load(path / CHECKPOINT_TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    state = {k: v.float() if v.is_floating_point() else v for k, v in saved["module"].items()}
    masters = (saved.get("optimizer") or {}).get("fp32_groups")
    if not masters:  # fp32 training: the module is the master
        return state
    named = dict(model.named_parameters(remove_duplicate=False))
    by_group = {
        g: [n for n, _ in model.named_parameters() if n.startswith(prefix)] for prefix, g in GROUP_PREFIXES.items()
    }
    groups = [g["name"] for g in saved["toolkit_param_groups"]]
    master_of = {}
    for group, tensors in zip(groups, masters, strict=True):
        for name, tensor in zip(by_group[group], tensors, strict=True):
            if tuple(tensor.shape) != tuple(named[name].shape):
                file = path / CHECKPOINT_TAG / "mp_rank_00_model_states.pt"
                raise CheckpointFileError(file, "DeepSpeed's fp32 masters", f"{name}'s has shape {tuple(tensor.shape)}")
            master_of[id(named[name])] = tensor.float()
    return {k: master_of.get(id(named[k]), v) if k in named else v for k, v in state.items()}


def saved_world_size(path: Path) -> int | None:
    """How many data-parallel ranks wrote this checkpoint's ZeRO shards (None: no ZeRO shards, i.e. stage 0)."""
    shards = (ZERO_SHARD_RE.search(f.name) for f in (path / CHECKPOINT_TAG).glob("*optim_states.pt"))
    return len({int(m.group(1)) for m in shards if m}) or None


def convert_to_universal(path: Path) -> Path:
    """`path/universal/`: DeepSpeed's universal checkpoint of the ZeRO shards in `path`, converted if not yet there.

    The conversion writes `universal.tmp/` and renames it into place last, so `universal/` exists only complete.
    `inject_missing_state` adds the version record DeepSpeed's converter asks for (engines without tensor or
    pipeline parallelism do not write one); one worker each, since this runs inside a rank of the job.
    """
    done = path / UNIVERSAL_DIR
    if done.is_dir():
        return done
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = path / f"{UNIVERSAL_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(path / CHECKPOINT_TAG),
        output_folder=str(tmp / CHECKPOINT_TAG),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    ds_to_universal(args)
    os.replace(tmp, done)
    return done


@contextlib.contextmanager
def _universal_loading(engine: Any) -> Iterator[None]:
    """The ds_config's `checkpoint.load_universal`, switched on for one load: the engine reads it (through
    `engine.load_universal_checkpoint()`) only while loading, so it need not be known when the engine is built."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before


def _group_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each torch param group's hyperparameters (LR, name, betas ...), without its tensors."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


class DeepSpeedBackend(Backend):
    name = "deepspeed"
    libraries = ("deepspeed",)
    # ZeRO 1-3 reshard through DeepSpeed's universal checkpoint (set per instance in __init__); ZeRO-0 and NVMe
    # offload do not: stage 0 writes no ZeRO shards to convert, and the engine skips the ZeRO load under NVMe.
    capabilities = Capabilities(distributed=True, reshardable=False)

    no_async_reason = (
        "DeepSpeed 0.19's background writer (the decoupled checkpoint engine) needs its DeepNVMe async_io op and "
        "commits checkpoints itself, so the toolkit could not keep `latest` on the last checkpoint complete on "
        "every rank."
    )

    def __init__(self, cfg: Config, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        self.ds_config = resolve_ds_config(cfg, self.env.world_size)
        self.stage = int(self.ds_config["zero_optimization"]["stage"])
        offload = self.ds_config["zero_optimization"].get("offload_optimizer") or {}
        reshardable = self.stage in (1, 2, 3) and offload.get("device") != "nvme"
        self.capabilities = Capabilities(distributed=True, reshardable=reshardable)
        self.engine = None
        self.optimizer: torch.optim.Optimizer | None = None  # the torch AdamW inside DeepSpeed's wrapper

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def gathering_modules(self) -> list[nn.Module]:
        """ZeRO-3 hooks every module but those inside a leaf block (_gather_per_block); ZeRO-0-2 gather nothing."""
        if self.stage != 3:
            return []
        model = self.engine.module
        inside = {id(m) for block in model.blocks() for m in block.modules() if m is not block}
        return [m for m in model.modules() if id(m) not in inside]

    @property
    def grad_average_factor(self) -> float:
        return float(dist.get_world_size())

    def setup(self, model: nn.Module, param_groups: list[ParamGroup], schedule: WarmupCosine) -> None:
        deepspeed = _import_deepspeed(self.device)
        self.groups = param_groups
        freeze_frozen_groups(model, param_groups)
        tc = self.cfg.train
        prepare_blocks(model, tc, self.device)
        self.optimizer = build_optimizer(model, param_groups, weight_decay=tc.weight_decay)
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        if self.stage == 3:
            _gather_per_block(deepspeed, model)
        # Stage 0 in bf16 wraps AdamW in DeepSpeed's FP16_UnfusedOptimizer, whose start steps it once on zero
        # gradients "to initialize its states": AdamW's step count is then 1 before training (every later update
        # 0.74x too small at step 1, by Adam's bias correction) and the weights took one weight-decay step.
        first_step = _updates_disabled(self.optimizer) if self.stage == 0 and self.bf16 else contextlib.nullcontext()
        with first_step:
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.ds_config)
        writer = getattr(self.engine, "checkpoint_engine", None)
        if type(writer).__name__ == "TorchCheckpointEngine":  # the default; a ds_config's fast or decoupled engine
            sync_after_save(writer)  # writes in its own way and is left to it
        # ZeRO rewrites the param lists of the AdamW's groups in place; the group dicts (lr, name) stay ours.
        self.scheduler = build_scheduler(self.optimizer, schedule)
        self.engine.train()

    def _model_call(self, inputs: dict[str, torch.Tensor]) -> Any:
        return self.engine(**inputs)

    def _backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        if self._micro < self.accumulation:
            self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step

    def _step(self, skip: bool, grad_norm: float | None) -> StepResult:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed engine is not at an accumulation boundary; micro-step counts disagree")
        fallback = None
        if self.stage == 0 and not self.bf16:  # plain torch AdamW: DeepSpeed clips but does not record the norm
            total = grad_norm_tensor(list(self.trainable_parameters()))
            fallback = 0.0 if total is None else float(total)
            skip = skip or not math.isfinite(fallback)
        lrs = group_lrs(self.optimizer.param_groups, self.groups)
        with _updates_disabled(self.optimizer) if skip else contextlib.nullcontext():
            self.engine.step()
        norm = fallback if fallback is not None else float(self.engine.get_global_grad_norm())
        self.scheduler.step()
        return StepResult(grad_norm=norm, lrs=lrs, skipped=skip or not math.isfinite(norm))

    def close(self) -> None:
        """DeepSpeed's offload keeps helper threads; ending the process without destroy() aborts it."""
        if self.engine is not None:
            module = self.engine.module
            self.engine.destroy()
            self.engine = None
            _release_zero3_globals(module)

    def checkpoint_meta(self) -> dict[str, Any]:
        """The names of the files every rank writes (DeepSpeed's naming, {rank} for the rank): with every ZeRO
        shard lost, the files left looked like a checkpoint without them (ZeRO-0 in fp32), and DeepSpeed's own
        error named no file."""
        templates = []
        if self.engine.save_zero_checkpoint:  # optimizer shards; bf16_ as in DeepSpeed's _get_zero_ckpt_prefix
            prefix = "bf16_" if self.engine.bfloat16_enabled() else ""
            templates.append(prefix + "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        if self.stage == 3:  # ZeRO-3 writes a model-states file per rank too
            templates.append("zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        return {"rank_files": templates, "zero_stage": self.stage}

    def check_resumable(self, path: Path, meta: dict[str, Any]) -> None:
        """ZeRO-3 partitions the parameters and its checkpoints hold per-rank model states; DeepSpeed loads one
        written under 3 into a stage 0-2 engine, or the reverse, with a bare AssertionError naming no file."""
        saved = meta.get("zero_stage")
        if saved is None:  # written before 2026-12-07: ZeRO-3 is the stage that writes per-rank model states
            saved = 3 if any((path / "model" / CHECKPOINT_TAG).glob("zero_pp_rank_*_model_states.pt")) else None
        if saved is not None and (saved == 3) != (self.stage == 3):
            raise ConfigError(
                f"{path} was written under ZeRO-{saved} and backend.ds_config={self.cfg.backend.ds_config} is "
                f"ZeRO-{self.stage}; DeepSpeed cannot load one into the other: resume with a ZeRO-{saved} ds_config "
                "(ds_configs/zero3.json, or zero1/zero2.json), or export this run and start a new train.run_dir "
                "with train.init_from=<the export>"
            )

    def save(self, path: str | Path, client_state: dict | None = None) -> None:
        state = {
            "toolkit_client_state": client_state or {},
            "toolkit_scheduler": self.scheduler.state_dict(),
            "toolkit_param_groups": _group_settings(self.optimizer),  # for a universal load (see below)
        }
        self.engine.save_checkpoint(str(path), tag=CHECKPOINT_TAG, client_state=state, save_latest=False)
        if self.env.rank == 0:  # its conversion scripts (zero_to_fp32.py ...), copied in by rank 0 and not synced
            for script in Path(path).glob("*.py"):
                sync_path(script)

    def load(self, path: str | Path) -> dict:
        dist.log0(PICKLE_WARNING, path, level=logging.WARNING)
        path = Path(path)
        saved_world = saved_world_size(path)
        universal = saved_world is not None and saved_world != self.env.world_size
        if universal and not self.capabilities.reshardable:
            raise ValueError(
                f"{path} holds ZeRO shards of {saved_world} ranks and this run has {self.env.world_size}; "
                "with NVMe optimizer offload DeepSpeed cannot reshard them: resume on the same number of ranks"
            )
        if universal:
            dist.log0(
                "%s was written by %d ranks and this run has %d: loading it through DeepSpeed's universal checkpoint",
                path,
                saved_world,
                self.env.world_size,
            )
            fresh_groups = _group_settings(self.optimizer)
            source = self._universal_copy(path)
        else:
            source = path
        with _universal_loading(self.engine) if universal else contextlib.nullcontext():
            try:
                loaded, state = self.engine.load_checkpoint(
                    str(source), tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
                )
            except (EOFError, OSError, RuntimeError, pickle.UnpicklingError) as exc:  # a file torch.load fails on
                reason = read_failure(exc)
                if reason is None:
                    raise
                raise CheckpointFileError(getattr(exc, "filename", None) or source / CHECKPOINT_TAG,
                                          "DeepSpeed's model and optimizer state", reason) from exc  # fmt: skip
        if loaded is None or state is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {source / CHECKPOINT_TAG}")
        self.scheduler.load_state_dict(state["toolkit_scheduler"])
        if universal:
            self._after_universal_load(state.get("toolkit_param_groups"), fresh_groups)
        return state["toolkit_client_state"]

    def _universal_copy(self, path: Path) -> Path:
        """Rank 0 converts (or reuses) `path/universal/`; every rank waits for it and fails if rank 0 failed."""
        failure: BaseException | None = None
        if self.env.is_main:
            try:
                convert_to_universal(path)
            except Exception as exc:  # every rank must reach the collective below, or the others hang in it
                failure = exc
        reports = dist.all_gather_object(None if failure is None else f"{type(failure).__name__}: {failure}")
        if reports[0] is not None:
            message = f"converting {path} to DeepSpeed's universal checkpoint failed on rank 0: {reports[0]}"
            raise RuntimeError(message) from failure
        return path / UNIVERSAL_DIR

    def _after_universal_load(self, saved_groups: list[dict] | None, fresh_groups: list[dict]) -> None:
        """Undo two things DeepSpeed's universal load (0.19) does wrongly with several torch param groups.

        - Under ZeRO-3 it copies group 0's hyperparameters (LR, name, initial_lr) into every group
          (`load_hp_checkpoint_state_from_checkpoint_dir_stage3`). Each group gets back what `save` recorded;
          a checkpoint written before that record existed gets the settings this run built, at the LR the
          loaded schedule is at.
        - Under ZeRO-3 every group's AdamW state holds one and the same `step` tensor, which a fused or
          foreach AdamW increments in place once per group: each gets its own copy, on the device AdamW keeps
          it on (the parameter's when fused or capturable, else the CPU).
        """
        groups = self.optimizer.param_groups
        if saved_groups is None:
            saved_groups = [dict(g, lr=lr) for g, lr in zip(fresh_groups, self.scheduler.get_last_lr(), strict=True)]
        saved_names, names = [g.get("name") for g in saved_groups], [g.get("name") for g in fresh_groups]
        if saved_names != names:  # compared with this run's groups as built: the load may have renamed them
            raise ValueError(
                f"the checkpoint's optimizer groups {saved_names} differ from this run's {names}: resume with the "
                "same train.lr_* settings (a group at LR 0 is frozen and has no optimizer state)"
            )
        for group, saved in zip(groups, saved_groups, strict=True):
            group.update(saved)
        on_param = bool(self.optimizer.defaults.get("fused") or self.optimizer.defaults.get("capturable"))
        for param, state in self.optimizer.state.items():
            step = state.get("step")
            if torch.is_tensor(step):
                device = param.device if on_param else torch.device("cpu")
                state["step"] = step.detach().to(device=device, dtype=torch.float32).clone()

    @classmethod
    def file_checks(cls, path: str | Path) -> list[FileCheck]:
        """checkpoint_file_checks, for the resume (before DeepSpeed's engine reads anything)."""
        return checkpoint_file_checks(Path(path))

    @classmethod
    def read_full_weights(cls, path: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
        """fp32 master weights from the optimizer shards (DeepSpeed's zero_to_fp32 reader, any stage)."""
        _import_deepspeed(torch.device("cpu"))
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        logging.getLogger(__name__).warning(PICKLE_WARNING, path)
        check_files_shared(lambda: checkpoint_file_checks(Path(path)))
        if saved_world_size(Path(path)) is None:  # ZeRO-0: no shards for zero_to_fp32 (it failed on None)
            return _stage0_weights(Path(path), model)
        return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=CHECKPOINT_TAG)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """fp32 master weights (not the bf16 working copy); frozen parameters as the module holds them."""
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        full: dict[int, torch.Tensor] = {}
        wrapper = self.engine.optimizer  # ZeRO-0 in bf16: DeepSpeed's unfused wrapper pairs each param with a master
        masters = {id(p16): p32 for g16, g32 in zip(getattr(wrapper, "fp16_groups", None) or [],
                                                    getattr(wrapper, "fp32_groups", None) or [], strict=False)
                   for p16, p32 in zip(g16, g32, strict=True)}  # fmt: skip
        for p in module.parameters():  # collective under ZeRO-3: every rank walks the same parameters
            value = safe_get_full_fp32_param(p) if p.requires_grad and id(p) not in masters else masters.get(id(p))
            if value is None:
                value = self._gathered(p)
            full[id(p)] = value.detach().float().cpu()
        if self.env.rank != 0:
            return None
        named = dict(module.named_parameters(remove_duplicate=False))
        state = {}
        for key, value in module.state_dict().items():
            state[key] = full[id(named[key])] if key in named else value.detach().cpu().clone()
        return state

    def _gathered(self, p: nn.Parameter) -> torch.Tensor:
        if not hasattr(p, "ds_id"):
            return p.data.clone()
        from deepspeed.runtime.zero import GatheredParameters

        with GatheredParameters([p]):
            return p.data.clone()

    def optimizer_state_numel(self) -> int:
        return tensor_state_numel(self.optimizer.state)


def _release_zero3_globals(module: nn.Module) -> None:
    """Drop the two references DeepSpeed's ZeRO-3 keeps in globals, which outlive destroy() and hold `module`.

    ZeRO-3 pushes the model onto a module-level forward stack at setup and never pops it, and it memoises which
    parameters to free after each submodule in a `functools.lru_cache` on the coordinator's class, keyed by
    (coordinator, submodule). Either one keeps the model, its partitions and (on a GPU) their memory alive for the
    process's life, so a second run in the same process (a sweep, a notebook, the tests) held two models. The
    cache sits inside DeepSpeed's NVTX wrapper; if a release moves either, this does nothing, and the test that a
    run frees its model fails.
    """
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    stack = getattr(parameter_offload, "FWD_MODULE_STACK", [])
    stack[:] = [m for m in stack if m is not module]
    method = vars(PartitionedParameterCoordinator).get("_PartitionedParameterCoordinator__params_to_release")
    for cell in getattr(method, "__closure__", None) or ():
        clear = getattr(cell.cell_contents, "cache_clear", None)
        if clear is not None:
            clear()
