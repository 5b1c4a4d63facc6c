"""Run folder layout, atomic `latest`, keep-last-k, and per-rank loader/RNG state.

    runs/NAME/config.yaml                resolved config
    runs/NAME/checkpoints/step_N/        backend-native sharded state + trainer.json + rank_R.pt (loader, RNG)
    runs/NAME/checkpoints/latest         name of the newest complete checkpoint, written last by rank 0
    runs/NAME/export/step_N/             nanoVLM format
    runs/NAME/tb/, runs/NAME/metrics.jsonl

A checkpoint is complete only once `latest` names it: `latest` is replaced atomically (write + fsync + rename)
after a barrier that every rank reaches only when its own files are written. A run killed mid-save therefore
resumes from the previous checkpoint, and a half-written step_N is overwritten on the next save.
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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
            "Resume with the same number of ranks (FSDP model and optimizer state reshard, the data stream does not)"
        )
    return torch.load(file, map_location="cpu", weights_only=False)


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
