"""`bench comm`: bytes each backend hands to collectives per optimizer step on 2 gloo ranks, against its formula.

Measured: every torch.distributed collective (all_reduce, reduce, broadcast, all_gather*, reduce_scatter*,
all_to_all*, the coalesced forms, DDP's buffer broadcast) and DTensor's functional collectives are wrapped at the
start of each rank, before any engine looks them up (DeepSpeed keeps references to torch's functions in its own
comm module), and while recording, each call adds what it hands in: the bytes of its input tensors on this rank.
For all-reduce, reduce, broadcast and reduce-scatter that is the whole buffer; for all-gather it is the rank's own
shard, not the gathered output (a ring sends (N-1)/N of the buffer for a reduce-scatter or an all-gather's output,
twice that for an all-reduce). A collective called from inside another (an engine's wrapper around torch's)
counts once. DDP's own bucket all-reduce runs in C++ and passes none of these, so the fp32 DDP rows register
torch's `allreduce_hook` (the same all-reduce of the same buckets, from Python) to be seen; the bf16 rows use
the backend's own `bf16_allreduce_hook`.

Formula, per optimizer step of g micro-steps on N ranks, P trainable parameters (FSDP2: each parameter's first
dimension padded to a multiple of N, as it shards them), r bytes per reduced gradient element (4 fp32, 2 bf16)
and q bytes per gathered parameter element (the compute dtype):

    ddp      P r                       one all-reduce at the last micro-step (no_sync before it)
    ZeRO-1   P r + P q / N             gradients reduced once a step, updated partitions all-gathered
    ZeRO-2   g P r + P q / N           gradients reduced every micro-step (they are partitioned as they come)
    ZeRO-3   g (P r + k P' q / N) + Pp q / N   P' the partitioned parameters, gathered for forward and, with
             k = 2, again for backward; k = 1 when stage3_max_reuse_distance is at least P (1e9 in the shipped
             zero3.json), which keeps them gathered until their backward; Pp the persistent ones (under
             stage3_param_persistence_threshold), all-gathered after the update
    fsdp     g (P r + (k Pb + Pr) q / N)        Pb in the per-block units, gathered for forward and, with k = 2,
             again for backward; k = 1 with backend.fsdp_reshard_after_forward=false, which keeps them gathered
             until their backward; Pr in the root unit (kept gathered from forward to backward)

plus what every backend's step shares: the trainer's two float64 vectors (counts before the step; loss, stop flag
and times after it: 8 (9 + N) + 8 (2 + N) bytes), and DDP's broadcast of the model's buffers before the forward
of the micro-step that all-reduces (none under no_sync). The scalar collectives of clipping and overflow checks
are measured but have no term (a few hundred bytes). The model is the tiny preset widened so that every weight
matrix is above ZeRO-3's persistence threshold (bench memory's WIDE_MODEL).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch

WORLD = 2
MICRO = 2  # g: micro-steps per optimizer step, so per-micro-step and per-step terms differ
# (scenario, backend, ds_config stem or "", compute precision, gradient reduction dtype, *more overrides)
KEEP_GATHERED = "backend.fsdp_reshard_after_forward=false"
SCENARIOS = {
    "ddp": ("ddp", "", "fp32", "fp32"),
    "ddp_bf16": ("ddp", "", "fp32", "bf16"),
    "zero1": ("deepspeed", "zero1", "bf16", "fp32"),
    "zero1_bf16": ("deepspeed", "zero1", "bf16", "bf16"),
    "zero2": ("deepspeed", "zero2", "bf16", "fp32"),
    "zero2_bf16": ("deepspeed", "zero2", "bf16", "bf16"),
    "zero3": ("deepspeed", "zero3", "bf16", "fp32"),
    "zero3_bf16": ("deepspeed", "zero3", "bf16", "bf16"),
    "fsdp": ("fsdp", "", "bf16", "fp32"),
    "fsdp_bf16": ("fsdp", "", "bf16", "bf16"),
    "fsdp_keep_gathered": ("fsdp", "", "bf16", "fp32", KEEP_GATHERED),
}
TENSOR_ARGS: dict[str, str | int] = {  # collective -> the argument (name or position) this rank hands in
    "all_reduce": "tensor",
    "reduce": "tensor",
    "broadcast": "tensor",
    "all_gather": "tensor",
    "all_gather_into_tensor": "input_tensor",
    "all_gather_single": "input_tensor",
    "_all_gather_base": "input_tensor",
    "reduce_scatter": "input_list",
    "reduce_scatter_tensor": "input",
    "reduce_scatter_single": "input",
    "_reduce_scatter_base": "input",
    "all_to_all_single": "input",
    "all_to_all": "input_tensor_list",
    "all_reduce_coalesced": "tensors",
    "all_gather_coalesced": "input_tensor_list",
    "_broadcast_coalesced": 1,  # a C++ binding without a signature: (process_group, tensors, buffer_size, src)
}
FUNCTIONAL_ARGS = {"all_reduce": "self", "all_gather_tensor": "self", "reduce_scatter_tensor": "self"}


class CommLog:
    """Bytes handed to collectives while `recording`, by (collective, dtype); calls nested in a counted one skip."""

    def __init__(self) -> None:
        self.recording = False
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self._depth = threading.local()

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        self.recording = True
        try:
            yield
        finally:
            self.recording = False

    def wrap(self, name: str, fn: Callable, arg: str | int) -> Callable:
        """`fn` that also adds the bytes of its argument `arg` (a tensor or a list of them) when recording."""
        signature = inspect.signature(fn) if isinstance(arg, str) else None

        def handed_in(args: tuple, kwargs: dict) -> Any:
            if signature is None:
                return args[arg] if len(args) > arg else None
            return signature.bind_partial(*args, **kwargs).arguments.get(arg)

        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._depth, "n", 0)
            if self.recording and depth == 0:
                value = handed_in(args, kwargs)
                tensors = [value] if isinstance(value, torch.Tensor) else [t for t in value or () if torch.is_tensor(t)]
                for t in tensors:
                    key = (name, str(t.dtype).removeprefix("torch."))
                    self.bytes[key] += t.numel() * t.element_size()
                    self.calls[key] += 1
            self._depth.n = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth

        counted.__wrapped_by_comm_log__ = True
        return counted


def install(log: CommLog) -> None:
    """Wrap the collectives in torch.distributed, its c10d module and DTensor's functional collectives."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    import torch.distributed.distributed_c10d as c10d

    for name, arg in TENSOR_ARGS.items():
        original = getattr(c10d, name, None) or getattr(dist, name, None)
        if original is None or getattr(original, "__wrapped_by_comm_log__", False):
            continue
        counted = log.wrap(name, original, arg)
        for module in (dist, c10d):
            if hasattr(module, name):
                setattr(module, name, counted)
    for name, arg in FUNCTIONAL_ARGS.items():
        original = getattr(funcol, name)
        if not getattr(original, "__wrapped_by_comm_log__", False):
            setattr(funcol, name, log.wrap(f"functional.{name}", original, arg))


# -- the model and the formulas ---------------------------------------------------------------------------------------


def bench_config(spec: tuple[str, ...], *, model: dict[str, Any] | None = None, micro: int = MICRO) -> Any:
    """The tiny preset (widened by `model`) under a scenario's (backend, ds_config, precision, reduce dtype, *more
    overrides): one 64-token row per micro-step, CPU."""
    from toolkit.config import load_config

    backend, ds, precision, reduce, *extra = spec
    overrides = [f"model.{k}={v}" for k, v in (model or {}).items()] + extra
    overrides += [f"backend.name={backend}", f"backend.precision={precision}", f"backend.grad_reduce_dtype={reduce}"]
    overrides += ["backend.device=cpu", "train.batch_size=1", f"train.gradient_accumulation_steps={micro}"]
    overrides += ["model.lm_max_length=64", "train.max_training_steps=20"]
    if ds:
        overrides.append(f"backend.ds_config=ds_configs/{ds}.json")
    return load_config("tiny", overrides)


def trainer_bytes(world: int) -> int:
    """The trainer's two all-reduces of a step: counts (9 sums + a slot per rank), then loss, stop flag and a slot
    per rank, all float64."""
    from toolkit.train.trainer import N_COUNTS

    return 8 * (N_COUNTS + world) + 8 * (2 + world)


def padded(p: torch.Tensor, world: int) -> int:
    """Elements of `p` as FSDP2 shards it: the first dimension rounded up to a multiple of the world size."""
    if p.dim() == 0:
        return world
    return math.ceil(p.shape[0] / world) * world * math.prod(p.shape[1:])


def formula(spec: tuple[str, ...], model: torch.nn.Module, cfg: Any, world: int = WORLD) -> dict[str, float]:
    """Expected bytes handed in per optimizer step on one rank, by term (see the module docstring)."""
    backend, ds, precision, reduce, *_ = spec
    g = cfg.train.gradient_accumulation_steps
    r = 2 if reduce == "bf16" else 4
    q = 2 if precision == "bf16" else 4
    params = [p for p in model.parameters() if p.requires_grad]  # model.parameters() lists a tied weight once
    total = sum(p.numel() for p in params)
    terms = {"trainer": float(trainer_bytes(world))}
    if backend == "ddp":
        terms["grad all-reduce"] = total * r
        terms["buffer broadcast"] = sum(b.numel() * b.element_size() for b in model.buffers())  # synced forward only
    elif backend == "deepspeed" and ds in ("zero1", "zero2"):
        terms["grad reduce"] = (1 if ds == "zero1" else g) * total * r
        terms["param all-gather"] = total * q / world
    elif backend == "deepspeed":
        from toolkit.train.backends.deepspeed import resolve_ds_config

        zero = resolve_ds_config(cfg, world)["zero_optimization"]
        persistent = sum(p.numel() for p in params if p.numel() < zero.get("stage3_param_persistence_threshold", 1e5))
        # A gathered parameter reused within stage3_max_reuse_distance elements stays gathered for its backward.
        passes = 1 if zero.get("stage3_max_reuse_distance", 1e9) >= total else 2  # in between: 2 is an upper bound
        terms["grad reduce-scatter"] = g * total * r
        terms[f"param all-gather (x{passes} a micro-step)"] = g * passes * (total - persistent) * q / world
        terms["persistent all-gather"] = persistent * q / world
    else:
        in_blocks = {id(p) for block in model.blocks() for p in block.parameters()}
        blocks = sum(padded(p, world) for p in params if id(p) in in_blocks)
        root = sum(padded(p, world) for p in params if id(p) not in in_blocks)
        passes = 2 if cfg.backend.fsdp_reshard_after_forward else 1
        terms["grad reduce-scatter"] = g * (blocks + root) * r
        terms[f"param all-gather (blocks x{passes}, root once)"] = g * (passes * blocks + root) * q / world
    return terms


# -- the ranks --------------------------------------------------------------------------------------------------------

LOG = CommLog()


def measure(
    *, scenarios: dict[str, list[str]], model: dict[str, Any], steps: int, micro: int, seed: int
) -> dict[str, Any]:
    """On this rank: each scenario's backend takes one unrecorded step (lazy setup, ZeRO-3's prefetch trace), then
    `steps` recorded ones; bytes per step by collective and dtype, the formula's terms, and every step's loss,
    gradient norm and largest LR."""
    from toolkit import dist
    from toolkit.bench.memory import synthetic_batch
    from toolkit.model import VisionLanguageModel
    from toolkit.train.backends import build_backend
    from toolkit.train.optim import param_groups
    from toolkit.train.schedule import schedule_from_config
    from toolkit.train.trainer import Trainer

    rank = dist.get_rank()
    out = {}
    for name, spec in scenarios.items():
        cfg = bench_config(tuple(spec), model=model, micro=micro)
        dist.seed_everything(seed)
        net = VisionLanguageModel(cfg.model)
        terms = formula(tuple(spec), net, cfg, dist.get_world_size())  # before any engine reshapes the parameters
        backend = build_backend(cfg, device=torch.device("cpu"))
        backend.setup(net, param_groups(net, cfg.train), schedule_from_config(cfg.train))
        _make_ddp_visible(backend)
        trainer = Trainer(backend, cfg)
        batches = [synthetic_batch(cfg.model, seed=1000 * rank + i) for i in range((steps + 1) * micro)]
        history = [trainer.train_step(batches[:micro])]  # not recorded
        LOG.reset()
        with LOG.record():
            for s in range(1, steps + 1):
                history.append(trainer.train_step(batches[s * micro : (s + 1) * micro]))
        out[name] = {
            "spec": list(spec),
            "bytes": {f"{op} {dtype}": n / steps for (op, dtype), n in sorted(LOG.bytes.items())},
            "calls": {f"{op} {dtype}": n / steps for (op, dtype), n in sorted(LOG.calls.items())},
            "formula": terms,
            "params": sum(p.numel() for p in VisionLanguageModel(cfg.model).parameters()),
            "losses": [h["loss"] for h in history],  # the unrecorded first step's included
            "grad_norms": [h["grad_norm"] for h in history],
            "lrs": [max(h["lr"].values()) for h in history],
        }
        backend.close()
    return out


def _make_ddp_visible(backend: Any) -> None:
    """DDP without a comm hook all-reduces its buckets in C++, where no wrapper sees them; torch's allreduce_hook
    does the same all-reduce of the same buckets from Python. A hook the backend registered (bf16) is kept."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = getattr(backend, "model", None)
    if isinstance(ddp, DistributedDataParallel) and not ddp._comm_hooks:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(state=None, hook=default_hooks.allreduce_hook)


def launch(
    scenarios: dict[str, tuple[str, str, str, str]] | None = None,
    *,
    model: dict[str, Any] | None = None,
    steps: int = 2,
    micro: int = MICRO,
    seed: int = 0,
    timeout_s: int = 900,
) -> list[dict[str, Any]]:
    """The scenarios on WORLD gloo ranks (one torchrun launch); each rank's results."""
    from toolkit.bench.overhead import run_ranks

    chosen = scenarios or SCENARIOS
    spec = {"scenarios": {k: list(v) for k, v in chosen.items()}, "model": model or {}, "steps": steps}
    spec.update(micro=micro, seed=seed)
    return run_ranks("toolkit.bench.comm", spec, world=WORLD, timeout_s=timeout_s)


def compare(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """One scenario on one rank: measured bytes per step (gradient reductions, parameter gathers, everything)
    against the formula's."""
    _, _, precision, reduce, *_ = result["spec"]
    measured = sum(result["bytes"].values())
    expected = sum(result["formula"].values())
    grads = sum(n for k, n in result["bytes"].items() if k.split()[0].startswith(("all_reduce", "reduce")))
    grads -= sum(n for k, n in result["bytes"].items() if k.endswith("float64"))  # the trainer's vectors
    grad_terms = sum(v for k, v in result["formula"].items() if k.startswith("grad"))
    return {
        "scenario": name,
        "reduce_dtype": reduce,
        "precision": precision,
        "grad_MB": grads / 1e6,
        "grad_formula_MB": grad_terms / 1e6,
        "total_MB": measured / 1e6,
        "formula_MB": expected / 1e6,
        "vs_formula": measured / expected,
    }


def run(steps: int = 2, seed: int = 0) -> dict:
    """Every scenario on the widened tiny preset (bench memory's WIDE_MODEL), bf16 compute; rank 0's rows (rank 1's
    are the same bytes) and, for each backend, how bf16 reduction changed its gradient bytes."""
    from toolkit.bench.memory import WIDE_MODEL

    ranks = launch(model=WIDE_MODEL, steps=steps, seed=seed)
    rows = [compare(name, ranks[0][name]) for name in SCENARIOS]
    headline = {f"{r['scenario']}_vs_formula": r["vs_formula"] for r in rows}
    for row in rows:
        if row["reduce_dtype"] == "bf16":
            fp32 = next(r for r in rows if r["scenario"] == row["scenario"].removesuffix("_bf16"))
            headline[f"{fp32['scenario']}_bf16_grad_bytes_ratio"] = row["grad_MB"] / fp32["grad_MB"]
    mismatch = [r["scenario"] for r in rows if abs(r["vs_formula"] - 1) > 0.05]
    headline["all_within_5pct"] = not mismatch
    return {
        "name": "comm",
        "rows": rows,
        "headline": headline,
        "collectives": {name: ranks[0][name]["bytes"] for name in SCENARIOS},
        "calls": {name: ranks[0][name]["calls"] for name in SCENARIOS},
        "formula_terms": {name: ranks[0][name]["formula"] for name in SCENARIOS},
        "config": {"world": WORLD, "micro_steps": MICRO, "steps": steps, "model": WIDE_MODEL, "seq": 64},
    }


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "--worker":
        sys.exit("usage: python -m toolkit.bench.comm --worker OUT SPEC (started by launch(); use `bench comm`)")
    install(LOG)  # before any engine starts and keeps references to torch's functions
    from toolkit.bench.overhead import worker_main

    worker_main(sys.argv[2:], measure)
