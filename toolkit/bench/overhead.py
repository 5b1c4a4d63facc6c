"""`bench overhead`: the toolkit's `single` backend + Trainer step against a plain PyTorch loop doing the same work.

Both sides train their own copy of the tiny preset's model from the same initial weights on the same batches
(packed by the toolkit's loader from synthetic shards), fp32 on the CPU with one thread: AdamW with the same three
per-module groups and peak LRs, nanoVLM's warmup-cosine as a LambdaLR, clipping to train.max_grad_norm, and the
token-mean loss, read back as a Python float each step as any loop that logs does. The plain loop is written out
here independently of toolkit/train, so whatever the toolkit adds (the counts all-reduce, token weighting, skip
checks, metrics) is what the ratio measures.

The two alternate in blocks of steps after an untimed warm-up block each, so a noisy neighbour slows both alike;
the headline is the ratio of median step times. Losses of the two runs are compared as a check that they really
did the same work (they agree to float rounding).

`bench overhead --backend NAME` (ddp, deepspeed = ZeRO-2 unless backend.ds_config says otherwise, fsdp): that
backend's host time per optimizer step against `single`'s, on the narrow nanovlm-450m (`NARROW_450M`: the preset's
12 + 32 blocks and every parameter tensor at width 48, as `bench gpu --device cpu` builds it through
gpu.bench_config), fp32, one thread per rank, synthetic packs from gpu.synthetic_batches. It runs twice: at world
size 1 (the H200 table's setting: what the backend adds with no one to talk to) and on 2 gloo ranks under torchrun.
On 2 ranks, `single` runs on each rank as well, a replica of its own on that rank's batches, inside the same
trainer and its two per-step all-reduces of counts and loss: both sides then occupy both cores and wait for the
slower rank at the same points, so what the ratio adds is the backend's own work and its gradient and parameter
collectives (on the CPU, gloo's copies and sums are host work too). Each rank alternates blocks of the two after
a warm-up; a step's time is the slower rank's, its CPU time the ranks' mean (process time, gloo's threads
included); the headline is the ratio of medians, wall and CPU.

It also counts the step's device -> host syncs (`HostReads`): each read of a would-be device tensor's values by
the host, by call site, over a few more steps of each loop.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import re
import statistics
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from toolkit.config import Config
from toolkit.data.batch import Batch
from toolkit.dist import DistEnv
from toolkit.train.optim import fused_adamw_ok

if TYPE_CHECKING:
    from toolkit.train.trainer import Trainer

GROUP_PREFIXES = (("mp", "MP."), ("vision", "vision_encoder."), ("language", "decoder."))


def loader_batches(n: int, *, seed: int, tmp: Path) -> tuple[Config, list[Batch]]:
    """`n` real batches of the tiny preset (train.batch_size packed rows each) from synthetic shards."""
    from toolkit.bench.pipeline import make_data
    from toolkit.data.loader import build_loader

    cfg = make_data(tmp, samples=max(200, 50 * n), seed=seed)
    cfg.backend.device, cfg.backend.precision = "cpu", "fp32"
    batches = []
    for batch in build_loader(cfg, rank=0, world=1, finite=True):
        batches.append(batch)
        if len(batches) == n:
            break
    return cfg, batches


def new_model(cfg: Config, seed: int, device: torch.device | None = None) -> nn.Module:
    """The preset's model with seeded random weights, built directly on `device` (a 450M model inits fast on GPU)."""
    from toolkit.model import VisionLanguageModel

    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        return VisionLanguageModel(cfg.model)


def toolkit_trainer(cfg: Config, seed: int, *, env: DistEnv | None = None) -> Trainer:
    """build_backend(cfg) set up on a fresh seeded model, in a Trainer; `env` places the backend in the job
    (default: as the launcher says), so a 1-rank `env` runs `single` inside a multi-rank job."""
    from toolkit.train.backends import build_backend
    from toolkit.train.optim import param_groups
    from toolkit.train.schedule import schedule_from_config
    from toolkit.train.trainer import Trainer

    model = new_model(cfg, seed)
    backend = build_backend(cfg, env=env)
    backend.setup(model, param_groups(model, cfg.train), schedule_from_config(cfg.train))
    return Trainer(backend, cfg)


def toolkit_step(cfg: Config, seed: int) -> tuple[Callable[[Batch], float], nn.Module]:
    """One optimizer step through build_backend(cfg) + Trainer.train_step; returns the step's loss."""
    trainer = toolkit_trainer(cfg, seed)
    return (lambda batch: trainer.train_step([batch])["loss"]), trainer.backend.module


def warmup_cosine(max_steps: int, warmup_ratio: float, min_ratio: float) -> Callable[[int], float]:
    """nanoVLM's get_lr as a multiplier of each group's peak (capped at 1 at the end of a fractional warmup)."""
    warmup = max_steps * warmup_ratio

    def factor(it: int) -> float:
        if it < warmup:
            return min(1.0, (it + 1) / warmup)
        if it > max_steps:
            return min_ratio
        decay = (it - warmup) / (max_steps - warmup)
        return min_ratio + 0.5 * (1.0 + math.cos(math.pi * decay)) * (1.0 - min_ratio)

    return factor


def plain_step(
    cfg: Config, seed: int, device: torch.device | None = None
) -> tuple[Callable[[Batch], float], nn.Module]:
    """The same step as a plain loop: forward, token-mean loss, backward, clip, AdamW, LambdaLR.

    With backend.precision=bf16 the forward runs under autocast over fp32 weights, as a plain mixed-precision loop
    does (the `gpu` bench's baseline); batches are expected on `device` already.
    """
    model = new_model(cfg, seed, device)
    model.train()
    tc = cfg.train
    peaks = {"mp": tc.lr_mp, "vision": tc.lr_vision_backbone, "language": tc.lr_language_backbone}
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if n.startswith(prefix)], "lr": peaks[name]} for name, prefix in GROUP_PREFIXES
    ]
    params = [p for g in groups for p in g["params"]]
    fused = fused_adamw_ok(params)  # what a careful plain loop asks for, as the toolkit does
    optimizer = torch.optim.AdamW(groups, lr=tc.lr_mp, weight_decay=tc.weight_decay, fused=fused or None)
    factor = warmup_cosine(tc.max_training_steps, tc.warmup_ratio, tc.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    device_type = (device or torch.device("cpu")).type
    bf16 = cfg.backend.precision == "bf16"
    precision = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step(batch: Batch) -> float:
        with precision():
            out = model(**batch.inputs.as_kwargs())
        loss = out.loss_sum / (batch.inputs.labels != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return float(loss.detach())

    return step, model


def timed_step(step: Callable[[Batch], float], batch: Batch) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, loss) of one step."""
    wall, cpu = time.perf_counter(), time.process_time()
    loss = step(batch)
    return time.perf_counter() - wall, time.process_time() - cpu, loss


def interleave(
    steps: dict[str, Callable[[Batch], float]], batches: list[Batch], *, blocks: int, block: int, warmup: int
) -> dict[str, list[tuple[float, float, float]]]:
    """Alternate blocks of `block` steps between the runs; each run sees the same batch sequence.

    The first `warmup` steps of each run are taken (they update the weights, as in the other run) but not kept.
    Which run goes first alternates from block to block, so neither always follows the other's cache state.
    """
    names = list(steps)
    cursor = dict.fromkeys(names, 0)
    timings: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names}
    for b in range(-1, blocks):
        order = names if b % 2 == 0 else names[::-1]
        for name in order:
            for _ in range(warmup if b < 0 else block):
                timed = timed_step(steps[name], batches[cursor[name] % len(batches)])
                cursor[name] += 1
                if b >= 0:
                    timings[name].append(timed)
    return timings


def run(
    blocks: int | None = None,
    block: int | None = None,
    warmup: int = 4,
    n_batches: int = 8,
    seed: int = 0,
    backend: str | None = None,
    **kw: Any,
) -> dict:
    """Median step time of the toolkit against the plain loop over blocks x block steps each (12 x 8); with
    `backend`, that backend against `single` on 2 ranks instead (run_backend, whose defaults apply to what is
    not given: `blocks` and `block` were dropped on the way, so --blocks/--block changed nothing)."""
    if backend is not None:
        sizes = {k: v for k, v in (("blocks", blocks), ("block", block)) if v is not None}
        return run_backend(backend, seed=seed, **sizes, **kw)
    blocks, block = blocks or 12, block or 8
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
            cfg, batches = loader_batches(n_batches, seed=seed, tmp=Path(tmp))
        cfg.train.max_training_steps = warmup + blocks * block
        ours, _ = toolkit_step(cfg, seed)
        plain, _ = plain_step(cfg, seed)
        timings = interleave({"toolkit": ours, "plain": plain}, batches, blocks=blocks, block=block, warmup=warmup)
    finally:
        torch.set_num_threads(threads)
    return summarise(timings, cfg, n_batches=len(batches), seed=seed)


def summarise(timings: dict[str, list[tuple[float, float, float]]], cfg: Config, **config: Any) -> dict:
    """The result dict: median wall and CPU step times per loop, their ratios, and how far the losses drifted apart."""
    med = {
        n: (statistics.median(w for w, _, _ in t), statistics.median(c for _, c, _ in t)) for n, t in timings.items()
    }
    losses = {n: [loss for _, _, loss in t] for n, t in timings.items()}
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(losses["toolkit"], losses["plain"]))
    rows = [
        {
            "loop": name,
            "steps": len(timings[name]),
            "median_step_ms": 1e3 * med[name][0],
            "median_cpu_ms": 1e3 * med[name][1],
            "vs_plain": med[name][0] / med["plain"][0],
            "first_loss": losses[name][0],
            "last_loss": losses[name][-1],
        }
        for name in ("plain", "toolkit")
    ]
    return {
        "name": "overhead",
        "rows": rows,
        "headline": {
            "ratio": med["toolkit"][0] / med["plain"][0],
            "ratio_cpu": med["toolkit"][1] / med["plain"][1],
            "max_loss_rel_diff": loss_diff,
        },
        "config": {"preset": "tiny", "precision": "fp32", "threads": 1, "batch_size": cfg.train.batch_size, **config},
    }


# -- `bench overhead --backend NAME`: a distributed backend's step against `single`'s, on 2 gloo ranks ---------------

WORLD = 2
# nanovlm-450m's structure (12 ViT + 32 decoder blocks, 3:1 grouped-query heads, pixel shuffle 4, tied head) at width
# 48, with 64 px tiles (one image token each), 256-token rows and a 1,090-token vocabulary: every block, hook and
# parameter tensor of the preset is there, while the arithmetic is small enough that what a backend adds on the
# host (hooks, Python loops over parameters, copies, collectives) shows in a CPU step.
NARROW_450M = {
    "vit_hidden_dim": 48,
    "vit_inter_dim": 192,
    "vit_n_heads": 3,
    "vit_img_size": 64,
    "max_img_size": 256,
    "mp_image_token_length": 1,
    "lm_hidden_dim": 48,
    "lm_inter_dim": 128,
    "lm_n_heads": 3,
    "lm_n_kv_heads": 1,
    "lm_max_length": 256,
    "lm_base_vocab_size": 1024,
    "lm_vocab_size": 1090,
}
BACKEND_SETTINGS = {
    "single": ["backend.name=single"],
    "ddp": ["backend.name=ddp"],
    "fsdp": ["backend.name=fsdp"],
    "deepspeed": ["backend.name=deepspeed"],  # ZeRO-2 (the preset's ds_config) unless backend.ds_config says otherwise
}


def narrow_config(backend: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The narrow nanovlm-450m as `bench gpu --device cpu` builds it (gpu.bench_config), fp32, under `backend`.

    fp32 because torch's CPU bf16 kernels are several times slower than its fp32 ones: they would bury the host
    work this comparison is about (on a GPU the bf16 casts are device work, not host work).
    """
    from toolkit.bench.gpu import Variant, bench_config

    if backend not in BACKEND_SETTINGS:
        raise ValueError(
            f"backend {backend!r}: choose one of {', '.join(b for b in BACKEND_SETTINGS if b != 'single')}"
        )
    settings = [f"model.{k}={v}" for k, v in NARROW_450M.items()] + ["backend.precision=fp32", *overrides]
    return bench_config(
        "nanovlm-450m",
        Variant("single"),
        batch_size=None,
        device="cpu",
        overrides=[*settings, *BACKEND_SETTINGS[backend]],
    )


def positive(text: str) -> int:
    """--blocks, --block: 0 ran no timed step and failed later on an empty median."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def world_sizes(text: str) -> tuple[int, ...]:
    """`--world 1,2`: one value, so overrides may follow it (a list of values took them for world sizes)."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected world sizes such as 1,2, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"world sizes must be at least 1, got {text!r}")
    return sizes


def output_label(backend: str, overrides: list[str]) -> str:
    """runs/bench/LABEL.json: overhead_zero2, or overhead_fsdp+fsdp_reshard_after_forward=false with overrides, so
    a run that changes a setting does not overwrite the run it is compared with (the DeepSpeed config file is
    already in the backend's name)."""
    settings = [o.split(".", 1)[-1] for o in overrides if not o.startswith("backend.ds_config=")]
    return "+".join([f"overhead_{backend}", *(re.sub(r"[^A-Za-z0-9_.=-]", "-", s) for s in settings)])


def backend_label(cfg: Config) -> str:
    """ddp, fsdp, or zeroN (the DeepSpeed config's file name)."""
    if cfg.backend.name == "deepspeed":
        return Path(cfg.backend.ds_config).stem
    return cfg.backend.name


def run_ranks(module: str, spec: dict[str, Any], *, world: int = WORLD, timeout_s: int = 1200) -> list[dict[str, Any]]:
    """`python -m MODULE --worker OUT SPEC_JSON` on `world` CPU ranks under torchrun (gloo, one thread each); the
    workers write OUT/rankR.json, returned in rank order. A worker that fails fails the call with its output."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory(prefix="bench-ranks-") as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1"]
        cmd += [f"--master_port={port}", "-m", module, "--worker", tmp, json.dumps(spec)]
        path = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run(cmd, cwd=repo, env={**env, "PYTHONPATH": path}, capture_output=True, text=True,
                              timeout=timeout_s)  # fmt: skip
        if proc.returncode != 0:
            first = proc.stderr.find("Traceback")  # the first rank's error, before torchrun's own report
            shown = proc.stderr[first : first + 5000] if first >= 0 else proc.stderr[-5000:]
            raise RuntimeError(f"{module} ranks failed (exit {proc.returncode}):\n{shown}")
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]


def worker_main(argv: list[str], measure: Callable[..., dict[str, Any]]) -> None:
    """A rank started by run_ranks: join the gloo group, `measure(**spec)`, write OUT/rankR.json."""
    import json

    from toolkit import dist

    out, spec = Path(argv[0]), json.loads(argv[1])
    torch.set_num_threads(1)
    env = dist.init_distributed(torch.device("cpu"), dist.dist_env())
    try:
        result = measure(**spec)
    finally:
        dist.barrier()
    (out / f"rank{env.rank}.json").write_text(json.dumps(result))
    dist.destroy_distributed()


def measure_backend(
    *,
    backend: str,
    overrides: list[str],
    blocks: int,
    block: int,
    warmup: int,
    n_batches: int,
    seed: int,
    read_steps: int,
    profile_steps: int,
) -> dict[str, Any]:
    """On this rank: `backend` and `single` (a 1-rank replica of its own) alternate blocks of steps on the same
    batches; then host reads of tensor values are counted over `read_steps` more steps of each, and rank 0 profiles
    `profile_steps` of the backend's."""
    from toolkit import dist
    from toolkit.bench.gpu import synthetic_batches

    rank = dist.get_rank()
    cfg, single_cfg = narrow_config(backend, overrides), narrow_config("single", overrides)
    total = warmup + blocks * block + read_steps + profile_steps
    cfg.train.max_training_steps = single_cfg.train.max_training_steps = total
    batches = synthetic_batches(cfg, n_batches, seed=seed + rank, device=torch.device("cpu"))  # each rank its own
    trainers = {"backend": toolkit_trainer(cfg, seed), "single": toolkit_trainer(single_cfg, seed, env=DistEnv())}
    steps = {name: (lambda batch, t=t: t.train_step([batch])["loss"]) for name, t in trainers.items()}
    try:
        timings = interleave(steps, batches, blocks=blocks, block=block, warmup=warmup)
        reads = {name: count_host_reads(t, batches[:read_steps]) for name, t in trainers.items()}
        # Every rank runs the profiled steps (they hold collectives: a rank that skipped them would hang the rest);
        # rank 0's profile is the one kept.
        profile = profile_text(steps["backend"], batches[:profile_steps]) if profile_steps else None
    finally:
        for trainer in trainers.values():
            trainer.backend.close()
    profile = profile if rank == 0 else None
    return {"rank": rank, "label": backend_label(cfg), "timings": timings, "host_reads": reads, "profile": profile}


def profile_text(step: Callable[[Batch], float], batches: list[Batch], rows: int = 35) -> str:
    """cProfile of `step` over `batches`: the functions with the most time of their own, then by cumulative time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for batch in batches:
        step(batch)
    prof.disable()
    out = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(rows)
    return out.getvalue()


# Tensor methods that hand a tensor's values to the host: on a GPU each one on a device tensor waits for the device.
VALUE_READS = frozenset({"item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__"})
HOST_RESULTS = frozenset({"cpu", "numpy", "tolist"})  # their results live on the host
# Ops whose output size depends on the values: torch copies a count to the host to allocate it (a sync on a GPU).
SIZE_FROM_VALUES = frozenset({"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount"})


def _sizes_from_values(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether this call, on a device tensor, must read values to know its output's size."""
    if name in SIZE_FROM_VALUES:
        return True
    if name in ("__getitem__", "__setitem__", "index_put_", "index_put") and len(args) > 1:  # a boolean mask index
        leaves = torch.utils._pytree.tree_leaves(args[1])
        return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in leaves)
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    return name == "where" and len(args) == 1 and not kwargs


class HostReads(TorchFunctionMode):
    """Counts, by call site, the reads of a device tensor's values by the host: the device -> host syncs of a step,
    explicit (`.item()`, `float(t)`, `.cpu()`, `if t:`) or implied by an output whose size depends on the values
    (`nonzero`, boolean-mask indexing, ...).

    On the CPU every tensor is a host tensor, so which ones would live on a GPU is tracked instead: a tensor is on
    the host when made by a factory without a `device` argument (torch.zeros(9), torch.tensor(x)), returned by
    `.cpu()` or `.to("cpu")` (but in DeepSpeed, whose CPU accelerator is named "cpu"), or computed only from host
    tensors. `.to(d)` with `d` the backend's device (or the
    `.device` of a device tensor) puts it on the device; `.to()` with any other device leaves it where it was.
    Everything else (parameters, gradients, activations, engine buffers, anything made with `device=`) is on the
    device. Work the autograd engine does in C++ is not seen; its results are device tensors, as on a GPU.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self._host: dict[int, weakref.ref] = {}
        self._devices = {id(device): device}  # device objects that name the accelerator (kept alive: ids stay unique)
        self.sites: collections.Counter[tuple[str, str]] = collections.Counter()

    def is_host(self, t: torch.Tensor) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def mark(self, tensors: list[torch.Tensor], *, host: bool) -> None:
        for t in tensors:
            if host:
                self._host[id(t)] = weakref.ref(t)
            else:
                self._host.pop(id(t), None)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # torch's protocol
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        from_device = any(not self.is_host(t) for t in tensors)
        target = self._target(name, args, kwargs)  # "device", "host" or None (not a move)
        if target == "host" and name == "to" and "deepspeed/" in _caller():
            target = "device"  # DeepSpeed's CPU accelerator names its device "cpu": `.to(accelerator)` is no copy
        reads = name in VALUE_READS or target == "host" or _sizes_from_values(name, args, kwargs)
        if reads and tensors and not self.is_host(tensors[0]):
            self.sites[(name, _caller())] += 1
        out = func(*args, **kwargs)
        results = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if name == "__get__" and getattr(func.__self__, "__name__", "") == "device" and from_device:
            self._devices[id(out)] = out
        if target is not None:
            self.mark(results, host=target == "host")
        else:
            made_on_host = not tensors and "device" not in kwargs  # a factory without an explicit device
            self.mark(results, host=name in HOST_RESULTS or made_on_host or (bool(tensors) and not from_device))
        return out

    def _target(self, name: str, args: tuple, kwargs: dict) -> str | None:
        """Where `.to(...)` / `.cpu()` sends a tensor: 'device', 'host', or None for anything else."""
        if name == "cpu":
            return "host"
        if name != "to":
            return None
        places = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (torch.device, str))]
        if any(id(a) in self._devices and self._devices[id(a)] is a for a in places):
            return "device"
        if any(a == "cpu" for a in places):  # spelled out: a torch.device from elsewhere may name the accelerator
            return "host"
        return None  # a dtype change, or a device this run cannot tell apart: the tensor stays where it is


def _caller() -> str:
    """The first frame outside torch's tensor and override machinery: where the read was asked for."""
    frame = sys._getframe(2)
    while frame and frame.f_code.co_filename.endswith(("torch/_tensor.py", "torch/overrides.py")):
        frame = frame.f_back
    if frame is None:
        return "?"
    path = frame.f_code.co_filename
    for marker in ("site-packages/", f"{Path(__file__).resolve().parents[2]}/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{frame.f_lineno} ({frame.f_code.co_name})"


def count_host_reads(trainer: Trainer, batches: list[Batch]) -> dict[str, float]:
    """Host reads of device tensors per optimizer step, by 'method site', over one step per batch.

    The batches start on the host, as the loader hands them over; the backend moves them to its device.
    """
    mode = HostReads(trainer.backend.device)
    with mode:
        for batch in batches:
            mode.mark(list(batch.inputs.as_kwargs().values()), host=True)
            trainer.train_step([batch])
    n = max(len(batches), 1)
    return {f"{method} {site}": count / n for (method, site), count in sorted(mode.sites.items())}


def run_backend(
    backend: str,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    worlds: tuple[int, ...] = (1, WORLD),
    blocks: int = 6,
    block: int = 3,
    warmup: int = 3,
    n_batches: int = 4,
    seed: int = 0,
    read_steps: int = 2,
    profile_steps: int = 0,
    timeout_s: int = 1500,
) -> dict:
    """`backend` against `single` at each world size in `worlds` (one torchrun launch each): median host time
    per optimizer step, wall and CPU, and the host reads of device values per step."""
    spec = {"backend": backend, "overrides": list(overrides), "blocks": blocks, "block": block, "warmup": warmup}
    spec.update(n_batches=n_batches, seed=seed, read_steps=read_steps, profile_steps=profile_steps)
    narrow_config(backend, overrides)  # a bad name or override fails here, before any rank starts
    launches = {w: run_ranks("toolkit.bench.overhead", spec, world=w, timeout_s=timeout_s) for w in worlds}
    return summarise_ranks(launches, spec)


def per_step(ranks: list[dict[str, Any]], name: str) -> tuple[list[float], list[float], list[float]]:
    """Step by step over the ranks: the slowest rank's wall time (the job waits for it), the ranks' mean CPU time,
    and the loss (the same on every rank)."""
    series = [r["timings"][name] for r in ranks]
    walls = [max(s[i][0] for s in series) for i in range(len(series[0]))]
    cpus = [statistics.fmean(s[i][1] for s in series) for i in range(len(series[0]))]
    return walls, cpus, [t[2] for t in series[0]]


def paired_ratios(stats: dict[str, tuple[list[float], list[float], list[float]]], block: int) -> tuple[float, float]:
    """Median over block pairs (a block of each loop, run back to back) of backend / single median step time, wall
    and CPU: a load that drifts over minutes on a shared machine moves both halves of a pair alike."""
    out = []
    for series in (0, 1):  # wall, CPU
        ours, base = stats["backend"][series], stats["single"][series]
        pairs = range(0, len(base) - block + 1, block)
        out.append(statistics.median(
            statistics.median(ours[i : i + block]) / statistics.median(base[i : i + block]) for i in pairs
        ))  # fmt: skip
    return out[0], out[1]


def summarise_ranks(launches: dict[int, list[dict[str, Any]]], spec: dict[str, Any]) -> dict:
    """Rows per world size (single, then the backend), ratios of medians as the headline."""
    label = next(iter(launches.values()))[0]["label"]
    rows, headline, reads = [], {"backend": label}, {}
    for world, ranks in launches.items():
        stats = {name: per_step(ranks, name) for name in ("single", "backend")}
        med = {name: (statistics.median(w), statistics.median(c)) for name, (w, c, _) in stats.items()}
        for name in ("single", "backend"):
            walls, _, losses = stats[name]
            loop = "single" if name == "single" else label
            reads[f"{loop} x{world}"] = ranks[0]["host_reads"][name]
            rows.append({
                "world": world,
                "loop": loop,
                "steps": len(walls),
                "median_step_ms": 1e3 * med[name][0],
                "median_cpu_ms": 1e3 * med[name][1],
                "vs_single": med[name][0] / med["single"][0],
                "cpu_vs_single": med[name][1] / med["single"][1],
                "host_reads_per_step": sum(ranks[0]["host_reads"][name].values()),
                "first_loss": losses[0],
            })  # fmt: skip
        headline[f"ratio_world{world}"] = med["backend"][0] / med["single"][0]
        headline[f"ratio_cpu_world{world}"] = med["backend"][1] / med["single"][1]
        paired = paired_ratios(stats, spec["block"])
        headline[f"paired_ratio_world{world}"], headline[f"paired_ratio_cpu_world{world}"] = paired
    headline["host_reads_per_step"] = rows[-1]["host_reads_per_step"]
    headline["single_host_reads_per_step"] = rows[0]["host_reads_per_step"]
    profiles = {f"x{w}": ranks[0]["profile"] for w, ranks in launches.items() if ranks[0]["profile"]}
    return {
        "name": "overhead",
        "rows": rows,
        "headline": headline,
        "host_reads": reads,
        "profile_rank0": profiles,
        "config": {
            "model": "nanovlm-450m, narrow (toolkit.bench.overhead.NARROW_450M)",
            "precision": "fp32",
            "worlds": list(launches),
            "threads_per_rank": 1,
            **spec,
        },
    }


def main(argv: list[str] | None = None) -> int:
    """`bench overhead [--backend NAME] [section.field=value ...]`."""
    from toolkit.bench import run as run_bench

    p = argparse.ArgumentParser(prog="python -m toolkit bench overhead", description=__doc__.splitlines()[0])
    p.add_argument(
        "--backend",
        choices=("ddp", "deepspeed", "fsdp"),
        default=None,
        help="time this backend on 2 gloo ranks against `single` (default: single against a plain loop)",
    )
    p.add_argument(
        "--world",
        type=world_sizes,
        default=None,
        help=f"--backend: world sizes to run, comma-separated (default: 1,{WORLD})",
    )
    p.add_argument("--blocks", type=positive, default=None, help="--backend: alternating blocks of steps per loop (6)")
    p.add_argument("--block", type=positive, default=None, help="--backend: steps per block (3)")
    p.add_argument("--profile", action="store_true", help="--backend: add rank 0's cProfile of 3 backend steps")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "overrides", nargs="*", help="--backend: section.field=value, e.g. backend.ds_config=ds_configs/zero3.json"
    )
    a = p.parse_args(argv)
    if a.backend is None:
        given = [name for name, v in (("overrides", a.overrides), ("--profile", a.profile), ("--world", a.world),
                                      ("--blocks", a.blocks), ("--block", a.block)) if v]  # fmt: skip
        if given:  # they were ignored: the plain-loop comparison has fixed sizes
            p.error(f"{', '.join(given)}: only with --backend (the plain-loop comparison has fixed sizes)")
        run_bench("overhead", as_json=a.json)
        return 0
    label = output_label(backend_label(narrow_config(a.backend, a.overrides)), a.overrides)
    kw = {"backend": a.backend, "overrides": a.overrides, "worlds": a.world or (1, WORLD), "blocks": a.blocks,
          "block": a.block}  # fmt: skip
    run_bench("overhead", label=label, as_json=a.json, **kw, profile_steps=3 if a.profile else 0)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2:], measure_backend)
    else:
        raise SystemExit(main())
