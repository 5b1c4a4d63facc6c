"""Run folder layout, atomic `latest`, keep-last-k, and per-rank loader/RNG state.

    runs/NAME/config.yaml                resolved config
    runs/NAME/checkpoints/step_N/        backend-native sharded state + trainer.json + rank_R.pt (loader, RNG)
    runs/NAME/checkpoints/latest         name of the newest complete checkpoint, written last by rank 0
    runs/NAME/export/step_N/             nanoVLM format
    runs/NAME/tb/, runs/NAME/metrics.jsonl

A checkpoint is complete only once `latest` names it: `latest` is replaced atomically (write + fsync + rename)
after a barrier that every rank reaches only when its own files are written. A run killed mid-save therefore
resumes from the previous checkpoint, and a half-written step_N is overwritten on the next save.

With train.async_checkpoint the backend writes its shards in the background (`start_checkpoint`) while training
goes on; the small per-rank files are written at once. `finish_checkpoint` then asks every rank, after each step,
whether its write is done, and commits (trainer.json, then `latest`) only when all are: a run killed before that
resumes from the previous checkpoint, exactly as a run killed during a synchronous save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.train.safe_load import load_plain

STEP_RE = re.compile(r"^step_(\d+)$")


@dataclass
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def exports(self) -> Path:
        return self.root / "export"

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step}"

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None when the run has none."""
        pointer = self.checkpoints / "latest"
        if not pointer.exists():
            return None
        target = self.checkpoints / pointer.read_text().strip()
        if not (target / "trainer.json").exists():
            raise FileNotFoundError(f"{pointer} names {target}, which is incomplete; delete {pointer} to start over")
        return target


def rng_state() -> dict[str, Any]:
    """Every generator's state as plain data (tensors, numbers, tuples), so it loads with weights_only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos}
    numpy_state.update(has_gauss=has_gauss, cached_gaussian=gauss)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    if isinstance(saved, dict):
        keys = saved["keys"].numpy().astype(np.uint32)
        saved = (saved["kind"], keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"])
    np.random.set_state(saved)  # a tuple with a numpy array: checkpoints written before the plain format
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def prepare_step_dir(path: Path) -> None:
    """Rank 0, before anyone writes: a leftover from a save that was killed is removed."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def write_rank_state(path: Path, rank: int, loader_state: dict | None) -> None:
    torch.save({"loader": loader_state, "rng": rng_state()}, path / f"rank_{rank}.pt")


def read_rank_state(path: Path, rank: int) -> dict:
    file = path / f"rank_{rank}.pt"
    if not file.exists():
        saved = sorted(p.name for p in path.glob("rank_*.pt"))
        raise FileNotFoundError(
            f"{file} is missing: the checkpoint was written by {len(saved)} ranks ({', '.join(saved)}). "
            "Resume with the same number of ranks (a reshardable backend's model reshards, the data stream does not)"
        )
    return load_plain(file, what="this rank's data-loader and RNG state")


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def commit(run: RunDir, step: int, trainer_state: dict, keep: int) -> None:
    """Rank 0, after every rank finished writing: mark step_N complete, point `latest` at it, prune old ones."""
    path = run.step_dir(step)
    _fsync_write(path / "trainer.json", json.dumps(trainer_state, indent=1))
    tmp = run.checkpoints / "latest.tmp"
    _fsync_write(tmp, path.name)
    os.replace(tmp, run.checkpoints / "latest")
    prune(run, keep)


def prune(run: RunDir, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; never the one `latest` names; drop incomplete leftovers."""
    latest = run.latest()
    steps = []
    for p in run.checkpoints.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir():
            steps.append((int(m.group(1)), p))
    steps.sort()
    complete = [p for _, p in steps if (p / "trainer.json").exists()]
    doomed = set(complete[:-keep]) | {p for _, p in steps if not (p / "trainer.json").exists()}
    for p in doomed:
        if latest is None or p != latest:
            shutil.rmtree(p, ignore_errors=True)


def resolve_resume(run: RunDir, resume: str) -> Path | None:
    """train.resume: 'auto' -> latest if any, 'none' -> fresh, else an explicit checkpoint folder."""
    if resume == "none":
        return None
    if resume == "auto":
        return run.latest()
    path = Path(resume)
    if (path / "checkpoints" / "latest").exists():  # a run folder
        return RunDir(path).latest()
    if (path / "latest").exists():  # its checkpoints/ folder
        return RunDir(path.parent).latest()
    if not (path / "trainer.json").exists():
        raise FileNotFoundError(f"train.resume={resume} is not a complete checkpoint folder (no trainer.json)")
    return path


# ---------------------------------------------------------------- collective save / restore / export


def save_checkpoint(run: RunDir, step: int, *, backend, loader, trainer_state: dict, keep: int) -> Path:
    """Every rank: backend shards, then its loader and RNG state; rank 0 marks it complete last."""
    pending = start_checkpoint(run, step, backend=backend, loader=loader, trainer_state=trainer_state, keep=keep,
                               background=False)  # fmt: skip
    finish_checkpoint(pending, wait=True, device=backend.device)
    return run.step_dir(step)


@dataclass
class PendingCheckpoint:
    """A checkpoint whose backend shards are still being written; committed by `finish_checkpoint`."""

    run: RunDir
    step: int
    meta: dict
    keep: int
    write: Any  # the backend's PendingSave


def start_checkpoint(
    run: RunDir, step: int, *, backend, loader, trainer_state: dict, keep: int, background: bool = True
) -> PendingCheckpoint:
    """Every rank: write (with `background`, stage and start writing) the backend state; loader and RNG state are
    written now either way (they are small, and the loader moves on with the next batch)."""
    from toolkit import dist
    from toolkit.train.backends.base import PendingSave

    env = backend.env
    path = run.step_dir(step)
    if env.is_main:
        prepare_step_dir(path)
    dist.barrier()
    # The small per-rank state first: once the backend's write runs in the background, a rank killed meanwhile
    # still leaves a complete rank file (and the order cannot race with the writer thread).
    write_rank_state(path, env.rank, loader.state_dict() if loader is not None else None)
    client_state = {"step": step}
    if background:
        write = backend.save_async(path / "model", client_state=client_state)
    else:
        backend.save(path / "model", client_state=client_state)
        write = PendingSave()  # written already
    meta = {"backend": backend.name, "world_size": env.world_size, "trainer": dict(trainer_state)}
    return PendingCheckpoint(run, step, meta, keep, write)


def finish_checkpoint(pending: PendingCheckpoint, *, wait: bool, device: torch.device) -> bool:
    """Collective: commit `pending` if every rank's write is done (or, with `wait`, once it is); True if committed.

    One all-reduce of one number per call, made only while a write is in flight. A write that failed raises here
    on its rank, and the others then fail in their next collective, as after any rank's error.
    """
    from toolkit import dist

    if wait:
        pending.write.wait()
    busy = torch.tensor([0.0 if pending.write.done() else 1.0], dtype=torch.float64, device=device)
    if float(dist.all_reduce_sum(busy)[0]) > 0:
        return False
    pending.write.wait()  # done: re-raises the writer's error, if any
    if dist.get_rank() == 0:
        commit(pending.run, pending.step, pending.meta, pending.keep)
    dist.barrier()
    return True


def restore_checkpoint(path: Path, *, backend, loader) -> dict:
    """Every rank: model/optimizer/schedule, then loader and RNG state; returns the saved trainer state.

    A reshardable backend's model and optimizer load onto a different number of ranks; the data stream cannot be
    resharded, so on a different world size the loader starts a fresh pass (logged) and RNG comes from rank 0's.
    """
    from toolkit import dist

    meta = json.loads((path / "trainer.json").read_text())
    saved_world, world = meta["world_size"], backend.env.world_size
    if meta["backend"] != backend.name:
        raise ValueError(f"{path} was written by backend {meta['backend']}; resume with backend.name={meta['backend']}")
    if saved_world != world and not backend.capabilities.reshardable:
        raise ValueError(
            f"{path} was written by {saved_world} ranks and this run has {world}; backend {backend.name} cannot "
            f"reshard its checkpoint: resume on {saved_world} ranks"
        )
    backend.load(path / "model")
    own = backend.env.rank if saved_world == world else 0
    rank_state = read_rank_state(path, own)
    if saved_world == world and loader is not None and rank_state["loader"] is not None:
        loader.load_state_dict(rank_state["loader"])
    elif loader is not None:  # every saved rank's data position, rank 0's already read above
        saved = [rank_state["loader"] if r == own else read_rank_state(path, r)["loader"] for r in range(saved_world)]
        if loader.reshard([state for state in saved if state is not None]):
            dist.log0("resumed %s ranks -> %s: the data continues at the next global row", saved_world, world)
        else:
            dist.log0(
                "resumed %s ranks -> %s: the data stream starts a new pass (set data.virtual_readers for a global "
                "order that reshards)",
                saved_world,
                world,
                level=30,
            )
    set_rng_state(rank_state["rng"])
    return meta["trainer"]


def export_live(backend, model_cfg, out: Path, *, tokenizer_dir: str | None = None) -> None:
    """Collective: gather the full fp32 weights on rank 0 (parameter by parameter, never the optimizer state)
    and write nanoVLM's format atomically (a temp folder renamed into place)."""
    from toolkit import dist
    from toolkit.model.hub import write_nanovlm

    state = backend.full_state_dict()
    if backend.env.is_main:
        write_atomically(out, lambda tmp: write_nanovlm(model_cfg, state, tmp, tokenizer_dir=tokenizer_dir))
    dist.barrier()


def write_atomically(out: Path, write) -> None:
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    old = out.with_name(out.name + ".old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- offline export (no process group)


def find_checkpoint(path: str | Path) -> Path:
    """A run folder (its latest checkpoint), its checkpoints/ folder, or one step_N folder."""
    path = Path(path)
    if (path / "trainer.json").exists():
        return path
    found = resolve_resume(RunDir(path), str(path)) if path.exists() else None
    if found is None:
        raise FileNotFoundError(f"{path} is neither a run folder with a checkpoint nor a checkpoint folder (step_N)")
    return found


def offline_state_dict(ckpt: Path, model_cfg) -> dict[str, torch.Tensor]:
    """Full model weights from any backend's checkpoint, in one process, without the training ranks."""
    from toolkit.model import VisionLanguageModel
    from toolkit.train.backends import backend_class

    meta = json.loads((ckpt / "trainer.json").read_text())
    cls = backend_class(meta["backend"], field=f"{ckpt / 'trainer.json'}: backend")
    if not cls.capabilities.offline_weights:
        raise ValueError(f"{ckpt} is a {cls.name} checkpoint, which cannot be read offline; export it while training")
    return cls.read_full_weights(ckpt / "model", VisionLanguageModel(model_cfg))


def checkpoint_weights(src: str | Path) -> tuple[Path, Any, dict[str, torch.Tensor], str | None]:
    """A run folder or checkpoint on disk -> (checkpoint, the run's ModelConfig, fp32 weights, tokenizer folder)."""
    from toolkit.config import Config, apply_mapping

    ckpt = find_checkpoint(src)
    run_root = ckpt.parent.parent
    config_file = run_root / "config.yaml"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: export needs the run folder the checkpoint belongs to")
    import yaml

    cfg = Config()
    apply_mapping(cfg, yaml.safe_load(config_file.read_text()), origin=str(config_file))
    cfg.validate()
    state = {k: v.float() if v.is_floating_point() else v for k, v in offline_state_dict(ckpt, cfg.model).items()}
    tok = cfg.model.tokenizer_path if Path(cfg.model.tokenizer_path).is_dir() else None
    return ckpt, cfg.model, state, tok
