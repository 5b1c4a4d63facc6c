"""FSDP2 (`fully_shard`): every 4 consecutive ViT or decoder blocks are one shard group, the root holds the rest.

Groups of a few blocks bound memory to those blocks' gathered parameters at a time and let the gather of the
next group overlap the current one's compute; 4 blocks rather than 1 a group because FSDP2's host work is paid
per group (BLOCKS_PER_UNIT). The root group holds the patch embedding, projector, token embedding, final norm and
the output head; with tied weights the head *is* the token embedding, and keeping both in the root group means
the one shared parameter is sharded, gathered and reduced once.

`hybrid` sharding is a 2-D mesh (replicate across nodes, shard within a node): parameter gathers stay on the
fast intra-node links and only gradient all-reduces cross nodes. Mixed precision: parameters are gathered in
bf16 and gradients reduced in fp32 (bf16 with backend.grad_reduce_dtype=bf16: half the bytes) onto fp32 shards,
which AdamW updates, on the local shards rather than through DTensor (`step_on_local_shards`). FSDP2 averages
gradients over the data-parallel ranks, so the loss is multiplied by the world size to keep token-weighted sums.
"""

from __future__ import annotations

import collections
import contextlib
import pathlib
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as dcp_filesystem
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from toolkit import dist
from toolkit.config import ConfigError
from toolkit.train.backends.base import (
    Capabilities,
    PendingSave,
    TorchOptimizerBackend,
    prepare_blocks,
    tensor_state_numel,
)
from toolkit.train.durable import save_synced
from toolkit.train.file_checks import FileCheck, check_files_shared, zip_problem
from toolkit.train.optim import ParamGroup, build_optimizer, freeze_frozen_groups
from toolkit.train.safe_load import (
    CheckpointFileError,
    UnsafeCheckpointError,
    WeightsMismatchError,
    load_plain,
    read_failure,
)
from toolkit.train.schedule import WarmupCosine, build_scheduler

# Blocks gathered, resharded and reduced together. FSDP2's host work (hooks, copies in and out of the flat buffers,
# waits) is paid per group: on the narrow nanovlm-450m (CPU, fp32) 4 blocks a group instead of 1 took the forward +
# backward's CPU time over `single`'s from +213 to +119 ms at world size 1, and from +610 to +263 ms on 2 gloo ranks.
# A group's gathered parameters are 4 of the 44 blocks' (nanovlm-450m: ~80 MB in bf16).
BLOCKS_PER_UNIT = 4
EXTRA_FILE = "fsdp_extra.pt"  # schedule state and client state, written by rank 0 beside the DCP shards


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a plain pickle; this reads it allowing only the classes that describe tensor shards.

    DCP itself unpickles the file with no restriction, so a replaced `.metadata` would run code on resume or
    export. Its shard files are already read with `torch.load(weights_only=True)`.
    """

    _ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("torch", "Size"): torch.Size,
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_filesystem._StorageInfo,
        **{("pathlib", cls.__name__): cls for cls in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath)},
    }

    def __init__(self, fh: Any, where: Path) -> None:
        super().__init__(fh)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == dcp_metadata.__name__ and isinstance(getattr(dcp_metadata, name, None), type):
            return getattr(dcp_metadata, name)  # the dataclasses and enums that describe the shards
        raise UnsafeCheckpointError(
            f"{self.where} names {module}.{name}, which no DCP checkpoint needs; it was not loaded (unpickling it "
            "could run code). Use a checkpoint you wrote yourself."
        )


class _SafeReader(FileSystemReader):
    """DCP's file reader with the metadata read by `_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        rank = kwargs.get("rank")
        file = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        with open(file, "rb") as fh:
            metadata = _MetadataUnpickler(fh, file).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise UnsafeCheckpointError(f"{file} is not DCP metadata; it was not loaded")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


SHARDS_WHAT = "the fsdp backend's model and optimizer shards"


def read_checked_metadata(path: Path) -> dcp_metadata.Metadata:
    """DCP's `.metadata` (through `_SafeReader`), then every shard file it names checked to exist and to be as long
    as the metadata lays out: a missing or cut shard is refused naming the file, before DCP reads any of it (DCP
    itself fails with a bare EOFError, or a FileNotFoundError inside its per-rank CheckpointException). One
    process (export); a resume shares the same checks out over its ranks (`FSDPBackend.file_checks`)."""
    metadata = _read_metadata(path)
    check_files_shared(lambda: _shard_checks(path, metadata))
    return metadata


def _read_metadata(path: Path) -> dcp_metadata.Metadata:
    reader = _SafeReader(str(path))
    return _read_dcp(path / ".metadata", "the fsdp checkpoint's shard layout", reader.read_metadata)


def _size_problem(end: int) -> Callable[[Path], str | None]:
    """A shard at least `end` bytes long: .metadata lays out where each of its entries ends."""

    def problem(file: Path) -> str | None:
        if not file.is_file():
            return "the file is missing"
        size = file.stat().st_size
        return f"it is {size} bytes and .metadata lays out {end}: it was cut short" if size < end else None

    return problem


def _shard_checks(path: Path, metadata: dcp_metadata.Metadata) -> list[FileCheck]:
    """Each shard file the metadata names, at least as long as the entries it lays out in it."""
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    return [FileCheck(path / name, SHARDS_WHAT, _size_problem(end)) for name, end in sorted(ends.items())]


def _read_dcp(file: Path, what: str, read: Callable[[], Any]) -> Any:
    """`read()` with a missing, cut or garbled file turned into CheckpointFileError naming `file`; any other
    error (a shape mismatch, a bug) unchanged. DCP wraps each rank's error in a CheckpointException."""
    try:
        return read()
    except CheckpointException as exc:
        errors = [error for error, _ in exc.failures.values()]
        reasons = [read_failure(error) for error in errors]
        if not errors or None in reasons:
            raise
        raise CheckpointFileError(getattr(errors[0], "filename", None) or file, what, reasons[0]) from exc
    except (EOFError, OSError, RuntimeError, pickle.UnpicklingError) as exc:
        reason = read_failure(exc)
        if reason is None:
            raise
        raise CheckpointFileError(getattr(exc, "filename", None) or file, what, reason) from exc


def shard_units(model: nn.Module) -> list[list[nn.Module]]:
    """Runs of BLOCKS_PER_UNIT consecutive blocks of one tower (ViT, decoder): one fully_shard group each."""
    return [
        blocks[i : i + BLOCKS_PER_UNIT]
        for blocks in (model.vision_blocks(), model.language_blocks())
        for i in range(0, len(blocks), BLOCKS_PER_UNIT)
    ]


def step_on_local_shards(optimizer: torch.optim.Optimizer) -> None:
    """optimizer.step() with every DTensor parameter, gradient and state tensor handed over as its local shard.

    AdamW's update is elementwise, so on each rank's shards it is the same arithmetic, bit for bit (tested); on
    the DTensors every call goes through DTensor's dispatcher first (sharding propagation over hundreds of
    tensors). On the narrow nanovlm-450m (CPU) the update took 37 ms a step that way, 16 ms this way, and 9 ms
    under DDP. The shards are views of the parameters'
    and state's storage, so the update lands in them. A step that would create AdamW's state (the first, or a
    parameter's first gradient) runs on the DTensors: the state must be DTensors for the sharded checkpoint.
    """
    groups, state = optimizer.param_groups, optimizer.state
    with_grad = [p for g in groups for p in g["params"] if p.grad is not None]
    if any(p not in state for p in with_grad):
        optimizer.step()
        return
    shards = [[p._local_tensor for p in g["params"]] for g in groups]
    local_state = {p._local_tensor: {k: getattr(v, "_local_tensor", v) for k, v in state[p].items()} for p in with_grad}
    for p in with_grad:
        p._local_tensor.grad = p.grad._local_tensor
    originals = [g["params"] for g in groups]
    try:
        for g, local in zip(groups, shards, strict=True):
            g["params"] = local
        optimizer.state = collections.defaultdict(dict, local_state)
        optimizer.step()
    finally:
        optimizer.state = state
        for g, params in zip(groups, originals, strict=True):
            g["params"] = params
        for p in with_grad:
            p._local_tensor.grad = None


class FSDPBackend(TorchOptimizerBackend):
    name = "fsdp"
    capabilities = Capabilities(distributed=True, reshardable=True, async_save=True)  # DCP reshards and saves async

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        env = self.env
        if self.cfg.backend.fsdp_sharding == "hybrid" and env.world_size % env.local_world_size:
            raise ConfigError(
                f"backend.fsdp_sharding=hybrid needs the same number of ranks on every node; world size "
                f"{env.world_size} is not a multiple of {env.local_world_size} ranks per node"
            )
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._save_group = None  # gloo group for DCP's background collectives, made by the first save_async

    @property
    def module(self) -> nn.Module:
        return self.model

    @property
    def grad_average_factor(self) -> float:
        return float(dist.get_world_size())

    def gathering_modules(self) -> list[nn.Module]:
        return [m for m in self.model.modules() if isinstance(m, FSDPModule)]  # each module of a group is one

    def _mesh(self) -> DeviceMesh:
        world = dist.get_world_size()
        if self.cfg.backend.fsdp_sharding == "hybrid":
            per_node = min(self.env.local_world_size, world)
            shape, names = (world // per_node, per_node), ("replicate", "shard")
            return init_device_mesh(self.device.type, shape, mesh_dim_names=names)
        return init_device_mesh(self.device.type, (world,), mesh_dim_names=("shard",))

    def setup(self, model: nn.Module, param_groups: list[ParamGroup], schedule: WarmupCosine) -> None:
        if not dist.is_distributed():
            raise RuntimeError("backend fsdp needs a process group: call toolkit.dist.init_distributed first")
        self.groups = param_groups
        freeze_frozen_groups(model, param_groups)
        tc = self.cfg.train
        prepare_blocks(model, tc, self.device)
        model.to(self.device)
        mesh = self._mesh()
        reduce = torch.bfloat16 if self.cfg.backend.grad_reduce_dtype == "bf16" else torch.float32
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if self.bf16 else None, reduce_dtype=reduce)
        reshard = self.cfg.backend.fsdp_reshard_after_forward
        for unit in shard_units(model):
            fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        self.model = model
        self.model.train()
        self.optimizer = build_optimizer(model, param_groups, weight_decay=tc.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, schedule)

    def _update(self) -> None:
        step_on_local_shards(self.optimizer)

    def _micro_step(self, *, last: bool) -> contextlib.AbstractContextManager:
        # Deferred sync keeps unsharded gradients until the last micro-step: one reduce-scatter per step.
        self.model.set_requires_gradient_sync(last or not self.cfg.backend.fsdp_defer_grad_sync)
        return contextlib.nullcontext()

    def _sharded_state(self) -> dict[str, Any]:
        return {
            "model": get_model_state_dict(self.model),
            "optim": get_optimizer_state_dict(self.model, self.optimizer),
        }

    def save(self, path: str | Path, client_state: dict | None = None) -> None:
        """Every rank writes its shards (torch.distributed.checkpoint); rank 0 adds schedule and client state."""
        path = Path(path)
        dcp.save(self._sharded_state(), checkpoint_id=str(path))
        if self.env.rank == 0:
            extra = {"scheduler": self.scheduler.state_dict(), "client_state": client_state or {}}
            save_synced(extra, path / EXTRA_FILE)
        dist.barrier()

    def save_async(self, path: str | Path, client_state: dict | None = None) -> PendingSave:
        """DCP's async_save: every rank copies its shards to host memory, then a DCP thread writes them.

        That thread runs DCP's own collectives (plan exchange, the metadata commit) while training runs its
        collectives, so it gets a process group of its own (gloo: host memory, and no stream shared with NCCL).
        """
        path = Path(path)
        if self._save_group is None:
            self._save_group = torch.distributed.new_group(backend="gloo")  # collective: every rank is here
        path.mkdir(parents=True, exist_ok=True)
        future = dcp.async_save(self._sharded_state(), checkpoint_id=str(path), process_group=self._save_group)
        if self.env.rank == 0:
            extra = {"scheduler": self.scheduler.state_dict(), "client_state": client_state or {}}
            save_synced(extra, path / EXTRA_FILE)
        return PendingSave(future)

    def load(self, path: str | Path) -> dict:
        """After the resume's file checks (`file_checks`, shared out over the ranks): they are not repeated here."""
        path = Path(path)
        extra = load_plain(path / EXTRA_FILE, what="the fsdp backend's schedule and client state")
        reader = _SafeReader(str(path))
        state = self._sharded_state()
        _read_dcp(path, SHARDS_WHAT, lambda: dcp.load(state, storage_reader=reader))
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        self.scheduler.load_state_dict(extra["scheduler"])
        return extra["client_state"]

    @classmethod
    def file_checks(cls, path: str | Path) -> list[FileCheck]:
        """The schedule file, `.metadata` (read here: it names the shards) and every shard it lays out (sizes
        only): what a resume checks before it reads any."""
        path = Path(path)
        extra = FileCheck(path / EXTRA_FILE, "the fsdp backend's schedule and client state", zip_problem)
        return [extra, *_shard_checks(path, _read_metadata(path))]

    @classmethod
    def read_full_weights(cls, path: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
        """DCP reshards the saved shards into the full tensors of a plain model (one process, no group)."""
        path = Path(path)
        state = {"model": model.state_dict()}  # tied weights: one storage under two names, either one fills it
        saved = read_checked_metadata(path).state_dict_metadata
        _check_fits(path, state["model"], saved)
        reader = _SafeReader(str(path))
        planner = DefaultLoadPlanner(allow_partial_load=True)  # the optimizer's entries stay on disk
        with warnings.catch_warnings():  # DCP warns that it loads in one process, which is what is asked
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            _read_dcp(path, SHARDS_WHAT, lambda: dcp.load(state, storage_reader=reader, planner=planner, no_dist=True))
        return state["model"]

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        if self.env.rank != 0:
            return None
        # Tied weights: make sure both names are there, as in module.state_dict().
        named = dict(self.model.named_parameters(remove_duplicate=False))
        first = {id(p): n for n, p in reversed(list(named.items()))}
        for name, p in named.items():
            if name not in state and first[id(p)] in state:
                state[name] = state[first[id(p)]]
        return state

    def optimizer_state_numel(self) -> int:
        return tensor_state_numel(self.optimizer.state)


def _check_fits(path: Path, model_state: dict[str, torch.Tensor], saved: dict[str, Any]) -> None:
    """The saved `model.*` entries against the model built from the config: every weight there (either name of a
    tied one), none the model lacks, the same shapes. The partial load that leaves the optimizer on disk would
    otherwise skip extra weights and fill the model from a checkpoint of another architecture without a word."""
    covered = {t.data_ptr() for k, t in model_state.items() if f"model.{k}" in saved}
    missing = [k for k, t in model_state.items() if t.data_ptr() not in covered]
    weights = {k[len("model.") :]: v for k, v in saved.items() if k.startswith("model.")}
    extra = [k for k in weights if k not in model_state]
    shapes = [f"{k} {tuple(v.size)} vs {tuple(model_state[k].shape)}" for k, v in weights.items()
              if k in model_state and hasattr(v, "size") and tuple(v.size) != tuple(model_state[k].shape)]  # fmt: skip
    parts = [f"{label}: {', '.join(names[:3])}" for label, names in
             (("missing", missing), ("not in the model", extra), ("shape differs for", shapes)) if names]  # fmt: skip
    if parts:
        raise WeightsMismatchError("; ".join(parts))
