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
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as dcp_filesystem
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from toolkit import dist
from toolkit.config import ConfigError
from toolkit.train.backends.base import (
    Capabilities,
    PendingSave,
    TorchOptimizerBackend,
    prepare_blocks,
    tensor_state_numel,
)
from toolkit.train.optim import ParamGroup, build_optimizer, freeze_frozen_groups
from toolkit.train.safe_load import UnsafeCheckpointError, load_plain
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
            torch.save(extra, path / EXTRA_FILE)
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
            torch.save(extra, path / EXTRA_FILE)
        return PendingSave(future)

    def load(self, path: str | Path) -> dict:
        path = Path(path)
        if not (path / EXTRA_FILE).exists():
            raise FileNotFoundError(f"{path / EXTRA_FILE} not found: not a checkpoint of backend fsdp")
        extra = load_plain(path / EXTRA_FILE, what="the fsdp backend's schedule and client state")
        reader = _SafeReader(str(path))
        reader.read_metadata()  # a refused file raises here, not wrapped in DCP's per-rank CheckpointException
        state = self._sharded_state()
        dcp.load(state, storage_reader=reader)
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        self.scheduler.load_state_dict(extra["scheduler"])
        return extra["client_state"]

    @classmethod
    def read_full_weights(cls, path: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
        """DCP reshards the saved shards into the full tensors of a plain model (one process, no group)."""
        state = {"model": model.state_dict()}  # tied weights: one storage under two names, either one fills it
        reader = _SafeReader(str(path))
        saved = set(reader.read_metadata().state_dict_metadata)
        covered = {t.data_ptr() for k, t in state["model"].items() if f"model.{k}" in saved}
        missing = [k for k, t in state["model"].items() if t.data_ptr() not in covered]
        if missing:
            raise ValueError(f"{path} holds no weights for {', '.join(missing[:3])}: not this run's model")
        planner = DefaultLoadPlanner(allow_partial_load=True)  # the optimizer's entries stay on disk
        with warnings.catch_warnings():  # DCP warns that it loads in one process, which is what is asked
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(state, storage_reader=reader, planner=planner, no_dist=True)
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
