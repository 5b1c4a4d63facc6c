"""Every rank runs the same config, the same libraries and the same toolkit code, or none starts.

One all-gather at the start carries each rank's config, the checkpoint it found to resume, its library versions
and (from the first rank of each node) a digest of the toolkit's source; every rank compares them with rank 0's
and raises the same error.

- A launcher that gave one rank other overrides (a per-node wrapper, a file edited on one host) hung at the first
  checkpoint or log line one rank reached alone, or trained two drifting replicas and exited 0.
- A node with other library versions (torch, torchdata, the backend's engine; a stale container image, a venv
  updated on one node) hangs in a collective whose arguments differ between versions, or fails deep inside a
  library on one rank only.
- A node with other toolkit code (a checkout pulled on one node, not on the others) does the same, or computes
  something else without a word.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import socket
from pathlib import Path
from typing import Any

import torch

from toolkit import dist
from toolkit.config import Config, ConfigError

TOOLKIT_ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torchdata", "transformers", "webdataset")  # what every rank's work or its files depend on


# What every rank must agree on, in the order they are checked, and the error for each: {shown} lists what differs.
REFUSALS = {
    "config": "the ranks were launched with different configs ({shown}); give every rank the same --config file "
    "and overrides (same command and files on every node)",
    "resume": "the ranks found different checkpoints to resume from train.resume={resume} ({shown}): train.run_dir "
    "does not look the same from every node. Put it on a filesystem every node mounts, or give "
    "train.resume=RUN/checkpoints/step_N",
    "software": "the ranks run different software ({shown}); give every node the same environment (one container "
    "image, or one venv on a shared filesystem)",
    "code": "the toolkit's code differs between nodes ({shown}: a digest of its .py files); run one checkout on "
    "every node (the same commit and no local edits, or one checkout on a shared filesystem)",
}


def check_ranks_agree(
    cfg: Config, env: dist.DistEnv | None = None, *, engine: tuple[str, ...] = (), resume_from: Path | None = None
) -> None:
    """Collective: refuse ranks that differ in config, library versions or toolkit code (see the module doc), or
    that found different checkpoints to resume (`resume_from`, resolved by each rank from train.resume: ranks that
    load different steps, or some none, then wait in different collectives); `engine`: the backend's own packages
    (Backend.libraries), compared too."""
    env = env or dist.dist_env()
    code = {"toolkit code": code_digest()} if env.local_rank == 0 else {}  # one per node: its files
    mine = {"config": _flat(cfg.to_dict()), "resume": {"checkpoint": str(resume_from)},
            "software": software(engine), "code": code, "host": socket.gethostname()}  # fmt: skip
    ranks = dist.all_gather_object(mine)
    hosts = [r["host"] for r in ranks]
    for key, words in REFUSALS.items():
        differ = _differences([r[key] for r in ranks], None if key == "config" else hosts, skip_missing=key == "code")
        if differ:
            raise ConfigError(words.format(shown=_shown(differ), resume=cfg.train.resume))


def software(engine: tuple[str, ...] = ()) -> dict[str, str]:
    """Python, torch (and the CUDA and NCCL it was built with), the libraries the toolkit uses and `engine`'s."""
    python = ".".join(platform.python_version_tuple()[:2])  # 3.11.7 and 3.11.9 pickle and behave alike
    found = {"python": python, "torch": torch.__version__, "torch cuda": str(torch.version.cuda)}
    nccl = getattr(torch.cuda, "nccl", None)
    if torch.cuda.is_available() and nccl is not None:
        found["nccl"] = ".".join(map(str, nccl.version()))
    for name in (*LIBRARIES, *engine):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def code_digest() -> str:
    """sha1 of the toolkit's .py files (names and contents), 12 hex digits."""
    digest = hashlib.sha1()
    for file in sorted(TOOLKIT_ROOT.rglob("*.py")):
        digest.update(str(file.relative_to(TOOLKIT_ROOT)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _differences(values: list[dict], hosts: list[str] | None = None, *, skip_missing: bool = False) -> dict[str, str]:
    """Each key whose value differs from rank 0's, with rank 0's value and the first other rank's."""
    where = (lambda rank: f"rank {rank} on {hosts[rank]}") if hosts else (lambda rank: f"rank {rank}")
    differ: dict[str, str] = {}
    for rank, other in enumerate(values[1:], start=1):
        for key in sorted(set(values[0]) | set(other)):
            if skip_missing and key not in other:
                continue
            if values[0].get(key) != other.get(key):
                differ.setdefault(key, f"{where(0)} {values[0].get(key)!r}, {where(rank)} {other.get(key)!r}")
    return differ


def _shown(differ: dict[str, str]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in list(differ.items())[:5]) + ("; ..." if len(differ) > 5 else "")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and prefix == "":  # sections; a field's own dict value compares whole
            out.update(_flat(value, f"{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
