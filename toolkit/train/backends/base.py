"""The backend seam: one interface the training loop calls, whatever engine runs the step.

    setup(model, param_groups, schedule)        wrap/shard the model, build AdamW + LambdaLR on what results
    forward_backward(micro_batch, loss_scale)   one micro-step; returns this rank's detached sum of token losses
    step(skip=False) -> StepResult              clip on the global norm, update, advance the schedule
    save(dir, client_state) / load(dir)         the engine's native checkpoint of model + optimizer + schedule
    full_state_dict()                           fp32 weights gathered on rank 0 (collective), for export
    eval_loss(micro_batch)                      (loss sum, targets) without gradients, every rank (collective)
    read_full_weights(dir, model)               classmethod: full weights from a saved `dir`, one process, offline

A backend also declares what it can do (`capabilities`), so that the run, the checkpointer and the exporter ask
it rather than test its name; only this package knows a backend's name, its engine and its files.

Token weighting lives in this contract: the loop passes `loss_scale = 1 / (target tokens of the whole optimizer
step, summed over micro-batches and ranks)`, and every backend turns `loss_sum * loss_scale` into gradients that
*sum* over micro-batches and ranks. Data-parallel engines average gradients over ranks (DDP, FSDP2, DeepSpeed)
and DeepSpeed also divides by the accumulation steps; each backend undoes exactly its own averaging, so a step
is the gradient of one token mean however the global batch is split.

Activation checkpointing and torch.compile wrap each block here, not in model/: the model stays plain torch
with its own parameter names, and a checkpointed block saves only its input.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import types
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from toolkit import dist
from toolkit.config import Config, TrainConfig
from toolkit.data.batch import Batch
from toolkit.dist import DistEnv
from toolkit.model.attention import check_kernel
from toolkit.train.optim import ParamGroup, group_lrs
from toolkit.train.schedule import WarmupCosine


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; callers branch on these, never on the backend's name."""

    distributed: bool  # needs a process group (started once, by `start_process_group`, before setup)
    reshardable: bool  # its checkpoint loads onto another number of ranks
    async_save: bool = False  # can write a checkpoint while training continues
    offline_weights: bool = True  # `read_full_weights` reads its own checkpoint's full weights in one process


class PendingSave:
    """A checkpoint write that may still be running: `save_async`'s handle. The state was staged (copied off the
    training tensors) before it was returned, so training may go on changing them."""

    def __init__(self, future: concurrent.futures.Future | None = None) -> None:
        self._future = future  # None: nothing left to write on this rank

    def done(self) -> bool:
        return self._future is None or self._future.done()

    def wait(self) -> None:
        """Block until written; a write that failed raises here."""
        if self._future is not None:
            self._future.result()


def background_writer() -> concurrent.futures.ThreadPoolExecutor:
    """One writer thread per backend: a rank has at most one checkpoint in flight, written in order."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")


@dataclass
class StepResult:
    grad_norm: float  # global L2 norm of the gradient before clipping (inf/NaN when the step was skipped)
    lrs: dict[str, float]  # LR each group used for this update, by group name (frozen = 0)
    skipped: bool = False  # no update: the loss or the gradient was not finite


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A block's own forward, recomputed in backward instead of storing its activations."""
    forward = type(self).forward
    if not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)
    return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)


def prepare_blocks(model: nn.Module, tc: TrainConfig, device: torch.device) -> None:
    """Checkpoint (none / vision / language / all) and optionally compile each block, before any wrapping.

    Also sets the decoder's packed-row attention kernel (train.attention_kernel), refusing one that cannot run,
    and whether the loss is chunked (train.chunked_loss).

    The checkpointed forward is bound to the block instance, so parameter names, state dicts and FSDP2's
    per-block sharding see the unchanged module. The recomputation runs inside the block's own backward, where
    FSDP2 (per-block units) and ZeRO-3 (blocks as leaf modules) hold the block's parameters gathered.
    """
    cfg = model.cfg
    check_kernel(tc.attention_kernel, device, cfg.lm_hidden_dim // cfg.lm_n_heads, cfg.lm_dropout)
    chosen = {
        "none": [],
        "vision": model.vision_blocks(),
        "language": model.language_blocks(),
        "all": model.blocks(),
    }[tc.activation_checkpointing]
    if tc.lr_vision_backbone == 0:  # a frozen tower fed pixels keeps no activations for a backward: nothing to save
        frozen = {id(block) for block in model.vision_blocks()}  # (and compile failed on its RNG-tagged recompute)
        chosen = [block for block in chosen if id(block) not in frozen]
    for block in chosen:
        block.forward = types.MethodType(_checkpointed_forward, block)
    if tc.compile:
        for block in model.blocks():
            compile_block(block)
    model.decoder.attention_kernel = tc.attention_kernel
    model.decoder.head.chunked = tc.chunked_loss


def compile_block(block: nn.Module) -> None:
    """torch.compile the block's forward (its checkpointed one, if set), not its whole call.

    The module hooks that FSDP2 and ZeRO-3 later put on each block then run as plain Python around the compiled
    code. `block.compile()` compiled the call, hooks included: dynamo traced ZeRO-3's hooks, specialised them on
    each block's `ds_id` and recompiled them block after block until its recompile limit, then ran them eagerly.
    (FSDP2's hooks dynamo skips either way.)
    """
    block.forward = torch.compile(block.forward)


def grad_norm_tensor(params: list[nn.Parameter]) -> torch.Tensor | None:
    """Global L2 norm of the gradients on the device, not read (None without gradients). FSDP2's shards: their
    squared norms summed over the group they are sharded on (a collective), without DTensor's dispatch."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    shards = _local_shards(grads)
    if shards is None:
        return torch.nn.utils.get_total_norm(grads)
    local, group = shards
    squares = torch.nn.utils.get_total_norm(local).square()
    if torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(squares, group=group)
    return squares.sqrt()


def clip_to_norm(params: list[nn.Parameter], max_norm: float, total: torch.Tensor) -> None:
    """Scale the gradients by min(1, max_norm / (total + 1e-6)) on the device: torch's clip for plain tensors, one
    foreach multiply of the local shards for FSDP2's (the same arithmetic; on the narrow nanovlm-450m on a CPU the
    clip took 20 ms a step through DTensor, 10 ms on the shards, 8 ms under DDP)."""
    shards = _local_shards([p.grad for p in params if p.grad is not None])
    if shards is None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    else:
        torch._foreach_mul_(shards[0], torch.clamp(max_norm / (total + 1e-6), max=1.0))


def _local_shards(grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any] | None:
    """FSDP2's gradients as their local shards and the group their squared norms sum over (the mesh dimensions
    they are sharded on); None for plain tensors, or DTensors laid out in more than one way."""
    first = grads[0]
    if not hasattr(first, "to_local"):
        return None
    mesh, placements = first.device_mesh, first.placements
    if any(g.device_mesh != mesh or g.placements != placements for g in grads):
        return None
    dims = [d for d, placement in enumerate(placements) if placement.is_shard()]
    if len(dims) != 1:
        return None
    return [g._local_tensor for g in grads], mesh.get_group(dims[0])


class Backend(ABC):
    """One training engine. Construction reads and checks the config only: no process group, no model."""

    name = ""
    capabilities = Capabilities(distributed=True, reshardable=False)
    # Backends that write the same checkpoint files resume each other's (`single` <-> `ddp`); "" = its own only.
    checkpoint_format = ""
    # Its engine's packages beyond torch: every rank must run the same versions (train/agreement.py compares them)
    libraries: tuple[str, ...] = ()

    def __init__(self, cfg: Config, *, env: DistEnv, device: torch.device) -> None:
        self.cfg = cfg
        self.env = env
        self.device = device
        self.groups: list[ParamGroup] = []
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self._micro = 0

    # -- derived settings --
    @property
    def accumulation(self) -> int:
        return self.cfg.train.gradient_accumulation_steps

    @property
    def bf16(self) -> bool:
        return self.cfg.backend.precision == "bf16"

    @property
    def grad_average_factor(self) -> float:
        """What the engine divides summed gradients by; the loss is multiplied by it to get sums back."""
        return 1.0

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The model itself (unwrapped; sharded under FSDP2/ZeRO-3), for names, eval and inspection."""

    def gathering_modules(self) -> list[nn.Module]:
        """Modules whose pre-forward hooks (the backend's) wait for other ranks' parameters: FSDP2's units and
        ZeRO-3's hooked modules; none where the forward exchanges nothing. The forward clock leaves those waits
        out of a rank's time (toolkit/train/forward_clock.py)."""
        return []

    # -- the interface --
    def start_process_group(self) -> None:
        """Start the process group this backend trains in, once per process; nothing when it needs none."""
        if self.capabilities.distributed and not dist.is_distributed():
            dist.init_distributed(self.device, self.env, timeout_s=self.cfg.backend.collective_timeout_s)

    @abstractmethod
    def setup(self, model: nn.Module, param_groups: list[ParamGroup], schedule: WarmupCosine) -> None: ...

    def forward_backward(self, micro_batch: Batch, loss_scale: float | torch.Tensor) -> torch.Tensor:
        """Forward and backward of one micro-batch; gradients accumulate until `step`.

        `loss_scale` is 1 / (global target tokens of this optimizer step): a number, or a scalar on the device
        when the trainer has not read the counts back. Returns this rank's summed token loss of the micro-batch
        (detached, fp32) for reporting.
        """
        if self._micro >= self.accumulation:
            raise RuntimeError(
                f"{self.accumulation} micro-batches per step (train.gradient_accumulation_steps); "
                "call step() before the next forward_backward"
            )
        last = self._micro == self.accumulation - 1
        self._micro += 1
        inputs = self._inputs(micro_batch)
        with self._micro_step(last=last):
            out = self._forward(inputs)
            scale = loss_scale * self.grad_average_factor  # in double, as a number or as a device scalar
            if isinstance(scale, torch.Tensor):  # then rounded to the loss's dtype, as a number is: same gradients
                scale = scale.to(out.loss_sum.dtype)
            self._backward(out.loss_sum * scale)
        return out.loss_sum.detach().float()

    def grad_norm(self) -> torch.Tensor | None:
        """Collective, after the step's last micro-batch: the global gradient norm the coming `step` clips to, as
        a device tensor not yet read, so the trainer reads it with the loss in one transfer (one device sync, not
        two); then pass the value read to `step(grad_norm=...)`. None where the engine computes its norm inside
        its own step (DeepSpeed)."""
        return None

    def step(self, *, skip: bool = False, grad_norm: float | None = None) -> StepResult:
        """Clip, update and advance the schedule; `skip` (a non-finite loss) drops the gradients instead.

        `grad_norm` is the value of the tensor `grad_norm()` returned, read by the caller; without it the step
        computes and reads the norm itself. The schedule advances on a skipped step too, so the LR stays a function
        of the step index (and of the batches consumed), which is what resuming relies on.
        """
        if self._micro != self.accumulation:
            raise RuntimeError(f"step() after {self._micro} micro-batches; expected {self.accumulation}")
        self._micro = 0
        return self._step(skip, grad_norm)

    @abstractmethod
    def save(self, path: str | Path, client_state: dict | None = None) -> None:
        """Collective: every rank writes its part of model, optimizer and schedule state under `path`."""

    def save_async(self, path: str | Path, client_state: dict | None = None) -> PendingSave:
        """Collective: stage what `save` writes and return, writing it in the background (backends whose
        capabilities say async_save); nothing is guaranteed on disk until the handle is done on every rank."""
        raise NotImplementedError(f"backend {self.name} cannot write checkpoints in the background")

    no_async_reason = "it has no background checkpoint writer."

    def checkpoint_meta(self) -> dict[str, Any]:
        """What trainer.json records beside backend and world size, for the offline checks of the backend's files
        (`file_checks`) where the files alone cannot say what should be there; nothing by default."""
        return {}

    @abstractmethod
    def load(self, path: str | Path) -> dict:
        """Collective: restore what `save` wrote (after `setup`); returns the client_state saved with it."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: the full fp32 model state (module.state_dict() keys) on rank 0, None on other ranks."""

    @classmethod
    @abstractmethod
    def read_full_weights(cls, path: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
        """Offline (one process, no process group): the full weights that `save(path)` wrote, as a state dict
        with `model.state_dict()`'s keys. `model` is a freshly built model of the run's config, for shapes."""

    @abstractmethod
    def optimizer_state_numel(self) -> int:
        """Elements of optimizer state tensors held by this rank (AdamW moments), for tests and benchmarks."""

    def close(self) -> None:
        """Release engine resources (threads, hooks) before the process group goes; a no-op by default."""
        return

    @torch.no_grad()
    def eval_loss(self, micro_batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token losses, target tokens) of one micro-batch without gradients.

        Dropout is off, but the root keeps its training flag so a rank without an image still runs the vision
        encoder: under ZeRO-3 and FSDP2 every rank must join every parameter gather, in evaluation too.
        """
        module = self.module
        module.eval()
        module.training = True
        try:
            with self._autocast():
                out = self._model_call(self._inputs(micro_batch))
        finally:
            module.train()
        return out.loss_sum.detach().float(), out.n_targets.detach()

    def _inputs(self, micro_batch: Batch) -> dict[str, torch.Tensor]:
        """The micro-batch's model inputs on the device, with the image and target positions found on the host."""
        return micro_batch.inputs.with_indices(self.module.image_token_id).to(self.device).as_kwargs()

    # -- what subclasses provide --
    def _micro_step(self, *, last: bool) -> contextlib.AbstractContextManager:
        """Context around one micro-step's forward and backward (e.g. DDP's no_sync before the last)."""
        return contextlib.nullcontext()

    def _autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def _forward(self, inputs: dict[str, torch.Tensor]) -> Any:
        with self._autocast():
            return self._model_call(inputs)

    @abstractmethod
    def _model_call(self, inputs: dict[str, torch.Tensor]) -> Any: ...

    @abstractmethod
    def _backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def _step(self, skip: bool, grad_norm: float | None) -> StepResult: ...

    # -- shared helpers --
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.module.parameters() if p.requires_grad)


def tensor_state_numel(state: dict) -> int:
    """Elements of every per-parameter optimizer state tensor except the scalar step counters."""
    total = 0
    for per_param in state.values():
        for key, value in per_param.items():
            if key != "step" and torch.is_tensor(value):
                total += value.numel() if not hasattr(value, "to_local") else value.to_local().numel()
    return total


class TorchOptimizerBackend(Backend):
    """Engines whose model is called directly and whose step is a plain torch optimizer (single, DDP, FSDP2).

    Subclasses set `self.model`, `self.optimizer` and `self.scheduler` in setup(); clipping uses the global norm
    (DTensor-aware), and a non-finite norm skips the update like a non-finite loss does.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    _trainable: list[nn.Parameter] | None = None  # listed at the first step: the set is fixed once set up
    _norm: torch.Tensor | None = None  # grad_norm()'s tensor, for the step that follows it

    def _model_call(self, inputs: dict[str, torch.Tensor]) -> Any:
        return self.model(**inputs)

    def _update(self) -> None:
        """The optimizer's update of the parameters from their gradients."""
        self.optimizer.step()

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_norm(self) -> torch.Tensor | None:
        if self._micro != self.accumulation:
            raise RuntimeError(f"grad_norm() after {self._micro} micro-batches; expected {self.accumulation}")
        self._norm = grad_norm_tensor(self._params())
        return self._norm

    def _params(self) -> list[nn.Parameter]:
        if self._trainable is None:  # walking the ~600 modules of nanovlm-450m for them took ~10 ms a step on a CPU
            self._trainable = list(self.trainable_parameters())
        return self._trainable

    def _step(self, skip: bool, grad_norm: float | None) -> StepResult:
        total, self._norm = self._norm, None
        if grad_norm is not None and total is None:
            raise RuntimeError("step(grad_norm=...) takes the value of the tensor grad_norm() returned for this step")
        if total is None:
            total = grad_norm_tensor(self._params())
        if grad_norm is None:  # the caller did not read the norm with its own transfer: read it here
            grad_norm = 0.0 if total is None else float(total)
        skip = skip or not math.isfinite(grad_norm)
        if not skip and total is not None and self.cfg.train.max_grad_norm > 0:
            clip_to_norm(self._params(), self.cfg.train.max_grad_norm, total)
        lrs = group_lrs(self.optimizer.param_groups, self.groups)
        if not skip:
            self._update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepResult(grad_norm=grad_norm, lrs=lrs, skipped=skip)
