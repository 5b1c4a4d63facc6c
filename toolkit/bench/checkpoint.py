"""`bench checkpoint`: how long a checkpoint stops training, with train.async_checkpoint against a synchronous save.

Each backend (single, which ddp shares, and FSDP2 at world size 1) is set up once on the preset's model with random
weights and trains one step, so AdamW's moments exist and the state is a real checkpoint's size (nanovlm-222m:
~222M parameters, ~2.7 GB of fp32 weights and moments). Then, alternating on that same state, it checkpoints
`repeats` times through the trainer's own path each way:

- sync:  `save_checkpoint`, which training waits for in full;
- async: `start_checkpoint` (what training waits for: staging a host copy, the per-rank files), then one training
  step while the write goes on, then `finish_checkpoint` (commit). The step's time, against a step with no write
  in flight, shows what the background writer takes from training on a machine with few cores.

The stall is the time training does not run; the headline is the median async stall over the median sync stall
per backend. Checkpoints go to a temporary folder on the same disk as runs/ unless `out_dir` says otherwise.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from toolkit import dist
from toolkit.config import Config, load_config
from toolkit.data.batch import Batch
from toolkit.train.checkpoint import RunDir, finish_checkpoint, save_checkpoint, start_checkpoint

BACKENDS = ("single", "fsdp")


def bench_config(preset: str, backend: str, overrides: list[str]) -> Config:
    """The preset's model, fp32 on the CPU, rows of 256 tokens (the state's size does not depend on them)."""
    settings = [f"backend.name={backend}", "backend.device=cpu", "backend.precision=fp32", "model.lm_max_length=256",
                "train.batch_size=1", "train.gradient_accumulation_steps=1"]  # fmt: skip
    return load_config(preset, [*settings, *overrides])


def one_batch(cfg: Config) -> Batch:
    """One packed row: a sample with one image tile, the rest text, so every parameter group gets a gradient."""
    from toolkit.bench.gpu import make_batch

    text = cfg.model.lm_max_length - cfg.model.mp_image_token_length
    return make_batch(cfg, [[(1, text, 1)]], torch.Generator().manual_seed(0), torch.device("cpu"))


def set_up(cfg: Config, seed: int) -> tuple[Any, Any]:
    from toolkit.bench.overhead import new_model
    from toolkit.train.backends import build_backend
    from toolkit.train.optim import param_groups
    from toolkit.train.schedule import schedule_from_config
    from toolkit.train.trainer import Trainer

    backend = build_backend(cfg)
    if backend.capabilities.distributed:  # FSDP2 at world size 1 still needs a process group
        dist.init_distributed(backend.device, dist.DistEnv())
    model = new_model(cfg, seed)
    backend.setup(model, param_groups(model, cfg.train), schedule_from_config(cfg.train))
    return backend, Trainer(backend, cfg)


def state_bytes(backend: Any) -> int:
    """Bytes of the model's parameters and of AdamW's state on this rank."""
    params = sum(p.numel() * p.element_size() for p in backend.module.parameters())
    moments = sum(t.numel() * t.element_size() for s in backend.optimizer.state.values() for t in s.values()
                  if isinstance(t, torch.Tensor))  # fmt: skip
    return params + moments


def measure(backend: Any, trainer: Any, batch: Batch, root: Path, *, repeats: int) -> dict[str, list[float]]:
    run = RunDir(root)
    times: dict[str, list[float]] = {"sync": [], "async": [], "async_write": [], "step": [], "step_writing": []}
    kw = {"backend": backend, "loader": None, "keep": 1}
    for i in range(repeats):
        step = 2 * i + 1
        started = time.perf_counter()
        save_checkpoint(run, step, trainer_state=trainer.state_dict(), **kw)
        times["sync"].append(time.perf_counter() - started)
        started = time.perf_counter()
        trainer.train_step([batch])
        times["step"].append(time.perf_counter() - started)
        started = time.perf_counter()
        pending = start_checkpoint(run, step + 1, trainer_state=trainer.state_dict(), **kw)
        staged = time.perf_counter()
        trainer.train_step([batch])
        times["step_writing"].append(time.perf_counter() - staged)
        finish_checkpoint(pending, wait=True, device=backend.device)
        times["async"].append(staged - started)
        times["async_write"].append(time.perf_counter() - started)
    return times


def run(
    preset: str = "nanovlm-222m",
    repeats: int = 3,
    backends: tuple[str, ...] = BACKENDS,
    overrides: tuple[str, ...] = (),
    out_dir: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    rows, headline = [], {}
    for name in backends:
        cfg = bench_config(preset, name, list(overrides))
        parent = Path(out_dir or "runs")  # on disk, not /tmp (often RAM); a fresh clone has no runs/ yet
        parent.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=parent))
        backend = None
        try:
            backend, trainer = set_up(cfg, seed)
            batch = one_batch(cfg)
            trainer.train_step([batch])  # AdamW's moments now exist
            times = measure(backend, trainer, batch, root, repeats=repeats)
            size = state_bytes(backend)
        finally:
            if backend is not None:
                backend.close()
            dist.destroy_distributed()
            shutil.rmtree(root, ignore_errors=True)
        sync, stall = statistics.median(times["sync"]), statistics.median(times["async"])
        step, step_writing = statistics.median(times["step"]), statistics.median(times["step_writing"])
        rows += [
            {"backend": name, "mode": "sync", "stall_s": sync, "written_s": sync, "vs_sync": 1.0,
             "step_s": step, "state_GB": size / 1e9},
            {"backend": name, "mode": "async", "stall_s": stall, "written_s": statistics.median(times["async_write"]),
             "vs_sync": stall / sync, "step_s": step_writing, "state_GB": size / 1e9},
        ]  # fmt: skip
        headline[f"{name}_async_stall_vs_sync"] = stall / sync
        headline[f"{name}_step_while_writing_vs_step"] = step_writing / step
    config = {"preset": preset, "repeats": repeats, "backends": list(backends), "overrides": list(overrides)}
    return {"name": "checkpoint", "rows": rows, "headline": headline, "config": config}
