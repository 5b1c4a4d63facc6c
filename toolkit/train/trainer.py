"""The training loop: gather micro-batches, weight by tokens, step, report. It never asks which backend it has.

One optimizer step is `gradient_accumulation_steps` micro-batches per rank. Before any backward pass the loop
all-reduces one small vector per step: target tokens (the denominator of the step's loss, so the gradient is
that of a token mean over the whole global batch, not a mean of per-micro-batch means), token and tile counts
for throughput, a "my data ran out" flag, so that no rank starts a step another cannot finish, and one slot per
rank for that rank's estimated compute (the packer's cost model), so `rank_cost_imbalance` (max / mean over ranks)
costs no extra collective. A stop request (a signal seen by one rank) travels with the loss all-reduce at the end
of the step, so every rank stops after the same step and before drawing the next batches from its loader; that
all-reduce also carries each rank's measured forward seconds, less its waits for other ranks (ForwardClock), for
`rank_time_imbalance`.

The counts are read back only where a rank must know them before its forward: when this rank's stream may run
out (a plain iterable), since a rank that stopped while the others entered the forward's collectives would hang
them. The toolkit's training loader never runs out (it starts another epoch; it raises on data it cannot read)
and says so (`endless`); so does `train_step`'s caller. Then the all-reduced counts stay on the device, the loss
is scaled by their target count there, and they are read with the loss after the backward: one transfer a step.

A step whose loss (or gradient norm) is NaN/inf is skipped by the backend and counted, and so is a step with no
target token on any rank (every sample of its batches was skipped by the loader, or had no assistant tokens): its
update would be AdamW's momentum and weight decay alone. `max_bad_steps` of them in a row stop the run with an
error instead of training on garbage.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch.profiler import record_function

from toolkit import dist
from toolkit.config import Config
from toolkit.data.batch import Batch
from toolkit.data.cost import SampleCost, sample_cost
from toolkit.train.backends.base import Backend
from toolkit.train.forward_clock import ForwardClock
from toolkit.train.optim import frozen_parts

log = logging.getLogger(__name__)

# Layout of the all-reduced counts vector, gathered before the step's first forward pass: these sums, then one
# slot per rank (rank r writes its estimated cost at N_COUNTS + r, the others leave it 0).
TARGETS, TOKENS, TILES, SUM_SQ, EXHAUSTED, SLOTS, IMAGES, ROWS, DIGEST = range(9)
N_COUNTS = 9


def n_targets(counts: torch.Tensor) -> int:
    """The step's target tokens over all ranks, at least 1: the denominator of its token-mean loss."""
    return max(int(counts[TARGETS]), 1)


@dataclass
class StepCounts:
    """The step's all-reduced counts: on the host, or still on the device (`on_device`), to be read with the loss."""

    values: torch.Tensor
    on_device: bool = False

    def loss_scale(self) -> float | torch.Tensor:
        """1 / the step's target tokens over all ranks: a number, or a device scalar when the counts are unread
        (the same double either way: one IEEE division of 1 by the same count)."""
        if self.on_device:
            return self.values[TARGETS].clamp(min=1).reciprocal()
        return 1.0 / n_targets(self.values)


# Why a step was skipped -> what to do when too many in a row stop the run.
SKIP_ADVICE = {
    "loss or gradient not finite": "Lower train.lr_* or train.max_grad_norm, try backend.precision=fp32 to rule "
    "out bf16 overflow, or check the data for broken images or labels",
    "no target tokens on any rank": "The loader skipped every sample of these batches or they had no assistant "
    "tokens: see the skip reasons logged and in metrics.jsonl's `samples`, and run `toolkit data-stats`",
}


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class MetricsSink(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps taken, skipped ones included (the schedule advanced for them too)
    bad_in_row: int = 0
    skipped_total: int = 0
    tokens_seen: int = 0
    best_val_loss: float = float("inf")
    best_step: int = 0


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or this process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def per_rank(value: float, *, rank: int, world: int) -> torch.Tensor:
    """`value` in this rank's slot of a world-sized vector: summed over ranks, it holds every rank's value."""
    slots = torch.zeros(world, dtype=torch.float64)
    slots[rank] = value
    return slots


def imbalance(values: torch.Tensor) -> float:
    """max / mean over ranks: how much longer the slowest rank works than an even split would take (1 = even)."""
    mean = float(values.mean())
    return float(values.max()) / mean if mean > 0 else 1.0


def _slot() -> tuple[int, int]:
    """This rank's slot and the slot count of the per-rank parts of the step's all-reduces."""
    world = dist.get_world_size()
    return (dist.get_rank() if world > 1 else 0), world


def local_counts(
    micro_batches: Sequence[Batch], *, exhausted: bool, cost: SampleCost | None = None, rank: int = 0, world: int = 1
) -> torch.Tensor:
    """This rank's contribution to the step's all-reduced counts (float64: exact integers far past 2^31)."""
    counts = torch.zeros(N_COUNTS, dtype=torch.float64)
    for mb in micro_batches:
        stats = mb.stats
        counts[TARGETS] += stats.targets
        counts[TOKENS] += stats.tokens
        counts[SLOTS] += mb.slots
        counts[IMAGES] += stats.images
        counts[ROWS] += stats.rows
        # A fingerprint of the step's tokens (sum of CRC32s stays exact in float64): resume tests compare batches.
        counts[DIGEST] += zlib.crc32(mb.inputs.input_ids.cpu().numpy().tobytes())
        counts[TILES] += stats.tiles
        counts[SUM_SQ] += float(sum(n * n for n in stats.sample_lengths))  # attention cost of the packed samples
    counts[EXHAUSTED] = float(exhausted)
    # The cost model is linear in tokens, tiles and squared lengths: this rank's cost follows from its own sums.
    mine = 0.0
    if cost is not None:
        mine = cost.total(
            tokens=float(counts[TOKENS]), sum_sq_lengths=float(counts[SUM_SQ]), tiles=float(counts[TILES])
        )
    return torch.cat([counts, per_rank(mine, rank=rank, world=world)])


class Trainer:
    """Runs optimizer steps on a set-up backend; metrics go to `history` and, on rank 0, to `writer`."""

    def __init__(
        self,
        backend: Backend,
        cfg: Config,
        *,
        writer: MetricsSink | None = None,
        callbacks: Sequence[Callable[[Trainer, dict[str, Any]], None]] = (),  # per step; may add to metrics
        peak_flops: float | None = None,
    ) -> None:
        self.backend = backend
        self.cfg = cfg
        self.writer = writer
        self.callbacks = list(callbacks)
        self.peak_flops = peak_flops
        self.state = TrainerState()
        self.cost = sample_cost(cfg.model, cfg.data.cost_calibration)  # the packer's model, for rank_cost_imbalance
        self.history: list[dict[str, Any]] = []
        self._stop_requested = False  # this rank saw a signal
        self._stop_reason = ""  # what asked this rank to stop, for the log
        self._last_skip = ""  # why the last skipped step was skipped, for the error that stops a run
        self._stopping = False  # some rank did: agreed by all after the last step
        self._clock: ForwardClock | None = None  # made at the first step, on the set-up backend's module

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = TrainerState(**state)

    def request_stop(self, reason: str = "a stop was requested") -> None:
        """Ask every rank to stop (safe from a signal handler, on any one rank); `reason` is logged.

        Ranks agree at the end of a step: a request made during a step's forward/backward stops after that step,
        one made later (e.g. from a callback) after the next. Either way no rank draws batches it will not train.
        """
        self._stop_reason = self._stop_reason or reason
        self._stop_requested = True

    def agree_on_stop(self) -> bool:
        """Whether any rank asked to stop since this step's own agreement, agreed now by all (a collective: every
        rank calls it at the same step). Called after a checkpoint, which can take minutes: a preemption signal that
        arrived meanwhile cost one more step and a second checkpoint of it, and torchrun gives its workers 30 s
        between SIGTERM and SIGKILL. True: the step just saved is the last."""
        flag = torch.tensor([float(self._stop_requested)], device=self.backend.device)
        self._stopping = self._stopping or bool(dist.all_reduce_sum(flag).item() > 0)
        return self._stopping

    def fit(self, batches: Iterable[Batch], *, max_steps: int | None = None) -> list[dict[str, Any]]:
        """Train until max_steps (default train.max_training_steps), the data ends, or a stop is requested.

        `batches` with a true `endless` attribute promise never to run out, which saves each step the read of its
        counts before the forward (module docstring)."""
        end = max_steps or self.cfg.train.max_training_steps
        endless = bool(getattr(batches, "endless", False))
        stream = iter(batches)
        while self.state.step < end:
            if self._stopping:  # checked before fetching: no batch is drawn from the loader and then dropped
                why = self._stop_reason or "another rank was asked to stop"
                dist.log0("stopping after step %d: %s", self.state.step, why)
                break
            started = time.perf_counter()
            micro = self._take(stream)
            wait = time.perf_counter() - started
            exhausted = len(micro) < self.backend.accumulation
            if endless and exhausted:
                raise RuntimeError(
                    f"the training batches ended after {self.state.step} steps though they said they were endless; "
                    "pass an iterable without an `endless` attribute if it can run out"
                )
            counts = self._global_counts(micro, exhausted=exhausted, read=not endless)
            if not endless and counts.values[EXHAUSTED] > 0:
                dist.log0("stopping after step %d: the training data ran out", self.state.step)
                break
            self._run_step(micro, counts, started=started, data_wait=wait)
        return self.history

    def train_step(self, micro_batches: Sequence[Batch]) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches (collective: every rank calls it, each with its
        accumulation's worth: nothing has run out, so the counts are read with the loss)."""
        started = time.perf_counter()
        counts = self._global_counts(micro_batches, exhausted=False, read=False)
        return self._run_step(micro_batches, counts, started=started, data_wait=0.0)

    def _take(self, stream: Iterator[Batch]) -> list[Batch]:
        micro = []
        for _ in range(self.backend.accumulation):
            try:
                micro.append(next(stream))
            except StopIteration:
                break
        return micro

    def _global_counts(self, micro: Sequence[Batch], *, exhausted: bool, read: bool) -> StepCounts:
        """The step's counts summed over ranks. Alone (world size 1) they never leave the host: the trip to the
        device and back was a device sync at the start of every single-GPU step, waiting for the previous step's
        update. With ranks they go through the device, which NCCL's all-reduce needs, and come back now if `read`,
        else with the loss (`StepCounts.on_device`)."""
        rank, world = _slot()
        counts = local_counts(micro, exhausted=exhausted, cost=self.cost, rank=rank, world=world)
        if world == 1:
            return StepCounts(counts)
        summed = dist.all_reduce_sum(counts.to(self.backend.device))
        return StepCounts(summed.cpu()) if read else StepCounts(summed, on_device=True)

    def _run_step(
        self, micro: Sequence[Batch], step_counts: StepCounts, *, started: float, data_wait: float
    ) -> dict[str, Any]:
        with record_function("toolkit.forward_backward"):  # named spans in a train.profile_steps trace
            loss_sum, fwd_bwd, forward = self._forward_backward(micro, step_counts.loss_scale())
        with record_function("toolkit.norm_and_loss_read"):
            loss, grad_norm, counts, rank_times = self._read_step(loss_sum, forward, step_counts)
        empty = int(counts[TARGETS]) == 0
        with record_function("toolkit.optimizer_step"):
            result = self.backend.step(skip=empty or not math.isfinite(loss), grad_norm=grad_norm)
        self._count(result.skipped, "no target tokens on any rank" if empty else "loss or gradient not finite")
        elapsed = time.perf_counter() - started
        self.state.tokens_seen += int(counts[TOKENS])
        if empty:  # no loss to speak of: 0.0 (the sum over no token) plotted as a dip to zero, its norm too
            loss = float("nan")
        metrics = {
            "loss": loss,
            "grad_norm": float("nan") if empty else result.grad_norm,
            "lr": result.lrs,
            "tokens_per_s": float(counts[TOKENS]) / max(elapsed, 1e-9),
            "n_targets": int(counts[TARGETS]),
            "tokens": int(counts[TOKENS]),
            "tiles": int(counts[TILES]),
            "batch_digest": int(counts[DIGEST]),
            "skipped": result.skipped,
            "step_time_s": elapsed,
            "data_wait_s": data_wait,
            "data_wait_share": data_wait / max(elapsed, 1e-9),
            "fill_rate": float(counts[TOKENS]) / max(float(counts[SLOTS]), 1.0),
            "images_per_pack": float(counts[IMAGES]) / max(float(counts[ROWS]), 1.0),
            "peak_memory_gb": peak_memory_gb(self.backend.device),
            "fwd_bwd_s": fwd_bwd,  # this rank's (rank 0's in metrics.jsonl), waits for other ranks included
            "forward_s": forward,  # this rank's forward without its waits: what rank_time_imbalance compares
            "rank_time_imbalance": imbalance(rank_times),
            "rank_cost_imbalance": imbalance(counts[N_COUNTS:]),
            **self._mfu(counts, elapsed),
            "tokens_seen": self.state.tokens_seen,  # over the run, resumes included: loss against tokens
            "skipped_steps": self.state.skipped_total,  # over the run
        }
        for callback in self.callbacks:  # after the update, before logging: they may add metrics (val_loss, ...)
            callback(self, metrics)
        self.history.append({"step": self.state.step, **metrics})
        if self.writer is not None:
            self.writer.log(self.state.step, metrics)
        self._check_divergence()
        return metrics

    def _read_step(
        self, loss_sum: torch.Tensor, forward: float, step_counts: StepCounts
    ) -> tuple[float, float | None, torch.Tensor, torch.Tensor]:
        """The step's one read: (loss, gradient norm, counts, each rank's forward seconds less its waits).

        The stop flag and each rank's compute time ride on the loss all-reduce (no extra collective); the norm, and
        the counts if still on the device, come back in the same transfer."""
        norm = self.backend.grad_norm()  # collective, on the device
        mine = torch.stack([loss_sum, loss_sum.new_tensor(float(self._stop_requested))])
        rank, world = _slot()
        times = per_rank(forward, rank=rank, world=world).to(mine.device)
        reduced = dist.all_reduce_sum(torch.cat([mine, times]))
        unread = [step_counts.values] if step_counts.on_device else []
        norms = [norm.reshape(1).to(reduced.dtype)] if norm is not None else []
        host = torch.cat([reduced, *unread, *norms]).cpu()
        reduced, rest = host[: len(reduced)], host[len(reduced) :]
        counts = rest[: len(step_counts.values)] if step_counts.on_device else step_counts.values
        loss = float(reduced[0]) / n_targets(counts)
        self._stopping = bool(reduced[1] > 0)
        return loss, (float(host[-1]) if norm is not None else None), counts, reduced[2 : 2 + world]

    def _forward_backward(
        self, micro: Sequence[Batch], loss_scale: float | torch.Tensor
    ) -> tuple[torch.Tensor, float, float]:
        """The step's summed loss, this rank's forward + backward seconds (waiting for the device on CUDA, where
        the loss all-reduce that follows would wait for it anyway) and its forward seconds less its waits for the
        other ranks (the ForwardClock's, which rank_time_imbalance compares)."""
        device = self.backend.device
        if self._clock is None:  # the backend's module and hooks exist once it is set up
            self._clock = ForwardClock(self.backend.module, self.backend.gathering_modules(), device)
        started = time.perf_counter()
        self._clock.start()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for mb in micro:
            loss_sum += self.backend.forward_backward(mb, loss_scale).double()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return loss_sum, time.perf_counter() - started, self._clock.seconds()

    def _mfu(self, counts: torch.Tensor, elapsed: float) -> dict[str, float]:
        """Model FLOPs utilisation when the device's peak is known (CUDA); nothing otherwise."""
        if not self.peak_flops:
            return {}
        from toolkit.train.metrics import step_flops

        flops = step_flops(
            self.cfg.model,
            n_tokens=int(counts[TOKENS]),
            sum_sq_lengths=float(counts[SUM_SQ]),
            n_tiles=int(counts[TILES]),
            head_tokens=int(counts[TARGETS]) if self.cfg.train.chunked_loss else None,  # the head's only rows
            frozen=frozen_parts(self.cfg.train),
        )
        return {"mfu": flops / (elapsed * self.peak_flops * dist.get_world_size())}

    def _count(self, skipped: bool, why: str) -> None:
        self.state.step += 1
        if not skipped:
            self.state.bad_in_row = 0
            return
        self.state.bad_in_row += 1
        self.state.skipped_total += 1
        self._last_skip = why
        dist.log0(
            "step %d skipped: %s (%d in a row)", self.state.step, why, self.state.bad_in_row, level=logging.WARNING
        )

    def _check_divergence(self) -> None:
        limit = self.cfg.train.max_bad_steps
        if self.state.bad_in_row >= limit:
            raise TrainingDiverged(
                f"{self.state.bad_in_row} optimizer steps in a row were skipped, the last for {self._last_skip} (up "
                f"to step {self.state.step}; train.max_bad_steps={limit}). {SKIP_ADVICE[self._last_skip]}"
            )
