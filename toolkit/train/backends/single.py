"""`single` (one process) and `ddp` (DistributedDataParallel): full fp32 replicas, bf16 through autocast.

Both keep the whole model, its gradients and AdamW's state on every rank, so their checkpoint is one file
written by rank 0. DDP averages gradients over ranks in its all-reduce, and skips that all-reduce on micro-steps
before the last (`no_sync`), so accumulation costs one gradient exchange per optimizer step. With
backend.grad_reduce_dtype=bf16 that exchange sends bf16 copies of the fp32 gradient buckets
(`bf16_allreduce_hook`): half the bytes; `single` has nothing to reduce and ignores the setting.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist_c10d
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from toolkit import dist
from toolkit.config import ConfigError
from toolkit.train.backends.base import (
    Capabilities,
    PendingSave,
    TorchOptimizerBackend,
    background_writer,
    prepare_blocks,
    tensor_state_numel,
)
from toolkit.train.durable import save_synced
from toolkit.train.file_checks import FileCheck, zip_problem
from toolkit.train.optim import ParamGroup, build_optimizer, freeze_frozen_groups
from toolkit.train.safe_load import CheckpointFileError, WeightsMismatchError, load_plain, weights_mismatch
from toolkit.train.schedule import WarmupCosine, build_scheduler

STATE_FILE = "state.pt"


class SingleBackend(TorchOptimizerBackend):
    """One process, one device; also the reference every other backend is tested against."""

    name = "single"
    # One full copy: a checkpoint loads onto any world size, and under ddp (which inherits the format).
    capabilities = Capabilities(distributed=False, reshardable=True, async_save=True)
    checkpoint_format = "full-replica"
    _writer = None  # the background checkpoint thread, started by the first save_async
    _staging: tuple[list, list[int]] | None = None  # the last save_async's host buffers, refilled by the next one

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.name == "single" and self.env.world_size > 1:
            raise ConfigError(
                f"backend.name=single runs one process but the launcher started {self.env.world_size} ranks; "
                "use backend.name=ddp, fsdp or deepspeed, or launch one process"
            )
        self._module: nn.Module | None = None
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def module(self) -> nn.Module:
        return self._module

    def setup(self, model: nn.Module, param_groups: list[ParamGroup], schedule: WarmupCosine) -> None:
        self.groups = param_groups
        freeze_frozen_groups(model, param_groups)
        tc = self.cfg.train
        prepare_blocks(model, tc, self.device)
        self._module = model.to(self.device)
        self.model = self._wrap(self._module)
        self.model.train()
        self.optimizer = build_optimizer(self._module, param_groups, weight_decay=tc.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, schedule)

    def _wrap(self, module: nn.Module) -> nn.Module:
        return module

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _state(self, client_state: dict | None) -> dict[str, Any]:
        return {
            "model": self._module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "client_state": client_state or {},
        }

    def save(self, path: str | Path, client_state: dict | None = None) -> None:
        """Rank 0 writes model, optimizer and schedule in one file; replicas are identical, so one copy suffices."""
        if self.env.rank == 0:
            _write_state(Path(path), self._state(client_state))
        dist.barrier()

    def save_async(self, path: str | Path, client_state: dict | None = None) -> PendingSave:
        """Rank 0 copies the state to host memory (the only part training waits for) and a thread writes the
        same file `save` writes; the other ranks hold replicas and write nothing."""
        if self.env.rank != 0:
            return PendingSave()
        staged = self._stage(self._state(client_state))
        if self._writer is None:
            self._writer = background_writer()
        return PendingSave(self._writer.submit(_write_state, Path(path), staged))

    def _stage(self, state: dict[str, Any]) -> dict[str, Any]:
        """A host copy of `state`, written into the previous save's buffers when the shapes are the same: the
        copy is then a memcpy into pages already mapped (a fresh 3 GB allocation costs as much again in page
        faults). Safe because a rank has one write in flight at most: the last one finished before this call.
        Tensors that share memory (the tied embedding and head) stay one tensor, as `save` writes them."""
        leaves, spec = torch.utils._pytree.tree_flatten(state)
        first: dict[tuple, int] = {}
        keys = [_memory_key(leaf) for leaf in leaves]
        pattern = [first.setdefault(k, i) if k is not None else -1 for i, k in enumerate(keys)]  # shared memory
        old, old_pattern = self._staging or (None, None)
        if old_pattern != pattern or not all(map(_same_buffer, old, leaves)):
            old = [None] * len(leaves)
        staged = []
        for i, (buf, leaf) in enumerate(zip(old, leaves, strict=True)):
            if pattern[i] == -1:
                staged.append(leaf)
            elif pattern[i] < i:  # shares memory with an earlier leaf: the same staged tensor
                staged.append(staged[pattern[i]])
            else:
                staged.append(buf.copy_(leaf) if buf is not None else _host_copy(leaf))
        self._staging = (staged, pattern)
        return torch.utils._pytree.tree_unflatten(staged, spec)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)  # a write in flight finishes: its caller decides whether it counts
            self._writer = None

    def load(self, path: str | Path) -> dict:
        state = _read_state(Path(path), self.name)
        problem = weights_mismatch(self._module, state["model"])
        if problem:  # preflight compared config.yaml; this is a config.yaml that no longer matches its weights
            raise WeightsMismatchError(
                f"{Path(path) / STATE_FILE} does not hold this run's model ({problem}): it was trained with other "
                "model.* values (a failed resume of an older version may have rewritten the run's config.yaml); "
                "resume with the values it was trained with"
            )
        self._module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state["client_state"]

    @classmethod
    def read_full_weights(cls, path: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
        return _read_state(Path(path), cls.name)["model"]

    @classmethod
    def file_checks(cls, path: str | Path) -> list[FileCheck]:
        """state.pt there and whole (its zip end record), without reading it: checked before a resume reads it."""
        return [FileCheck(Path(path) / STATE_FILE, f"the {cls.name} backend's model, optimizer and schedule state",
                          zip_problem)]  # fmt: skip

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.env.rank != 0:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in self._module.state_dict().items()}

    def optimizer_state_numel(self) -> int:
        return tensor_state_numel(self.optimizer.state)


def _host_copy(value: Any) -> Any:
    """A tensor's copy in host memory (never a view of the live one); anything else as it is."""
    return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value


def _memory_key(leaf: Any) -> tuple | None:
    """Where a tensor's values live (two views of one parameter share it); None for anything else."""
    if not isinstance(leaf, torch.Tensor):
        return None
    return (leaf.untyped_storage().data_ptr(), leaf.storage_offset(), tuple(leaf.shape), leaf.stride(), leaf.dtype)


def _same_buffer(buffer: Any, leaf: Any) -> bool:
    """`buffer` (a staged leaf) can take `leaf`'s values in place."""
    if not isinstance(leaf, torch.Tensor):
        return not isinstance(buffer, torch.Tensor)
    return isinstance(buffer, torch.Tensor) and buffer.shape == leaf.shape and buffer.dtype == leaf.dtype


def _write_state(path: Path, state: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_synced(state, path / STATE_FILE)


def _read_state(path: Path, name: str) -> dict:
    file = path / STATE_FILE
    what = f"the {name} backend's model, optimizer and schedule state"
    if not file.exists():
        raise CheckpointFileError(file, what, f"the file is missing (every {name} checkpoint has one)")
    return load_plain(file, what=what)


def bf16_allreduce_hook(
    group: dist_c10d.ProcessGroup | None, bucket: dist_c10d.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: all-reduce a bf16 copy of the bucket, pre-divided by the world size (exact: a power of two
    for the usual world sizes), and write the mean back into the fp32 bucket.

    torch ships the same idea as `bf16_compress_hook`, but DDP refuses that one by name unless it runs on NCCL;
    gloo reduces bf16 as well, so CPU runs and tests take this one.
    """
    group = group if group is not None else dist_c10d.group.WORLD
    buffer = bucket.buffer()  # (numel,) fp32: a view of the gradients (gradient_as_bucket_view)
    sent = buffer.to(torch.bfloat16).div_(group.size())

    def write_back(fut: torch.futures.Future) -> torch.Tensor:
        return buffer.copy_(fut.value()[0])

    return dist_c10d.all_reduce(sent, group=group, async_op=True).get_future().then(write_back)


# DDP compares a hook's annotations with the classes themselves; under `from __future__ import annotations` they
# are strings, so the real ones are set here.
bf16_allreduce_hook.__annotations__.update(
    bucket=dist_c10d.GradBucket, **{"return": torch.futures.Future[torch.Tensor]}
)


class DDPBackend(SingleBackend):
    """DistributedDataParallel over every rank; gradients all-reduced once per optimizer step."""

    name = "ddp"
    capabilities = Capabilities(distributed=True, reshardable=True, async_save=True)

    @property
    def grad_average_factor(self) -> float:
        return float(dist.get_world_size())

    def _wrap(self, module: nn.Module) -> nn.Module:
        if not dist.is_distributed():
            raise RuntimeError("backend ddp needs a process group: call toolkit.dist.init_distributed first")
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True)
        if self.cfg.backend.grad_reduce_dtype == "bf16":
            ddp.register_comm_hook(state=None, hook=bf16_allreduce_hook)
        return ddp

    def _micro_step(self, *, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.model.no_sync()
