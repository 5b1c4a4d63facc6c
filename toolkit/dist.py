"""Process-group setup, rank helpers, seeding and rank-0 logging.

Rank, local rank and world size are read from the environment that every launcher we support writes
(torchrun and `deepspeed` set RANK / LOCAL_RANK / WORLD_SIZE; `srun` sets SLURM_PROCID / SLURM_LOCALID /
SLURM_NTASKS), so code can ask "which rank am I" before, or without, a process group: config validation and
data sharding must not need one. The process group is NCCL on CUDA and gloo on CPU; a one-process run of a
distributed backend gets a private in-memory group so DDP, FSDP and DeepSpeed still work under a plain `python`.
"""

from __future__ import annotations

import logging
import os
import random
import re
import sys
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from toolkit.errors import UserError

log = logging.getLogger("toolkit")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def _env_int(*names: str, default: int) -> int:
    for name in names:
        match = re.match(r"\d+", os.environ.get(name, ""))  # SLURM writes counts like "4(x2)"
        if match:
            return int(match.group())
    return default


def dist_env() -> DistEnv:
    """Rank layout from torchrun / deepspeed variables, else SLURM's, else a single process."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        world = _env_int("SLURM_NTASKS", default=1)
        local_world = _env_int("SLURM_NTASKS_PER_NODE", default=0) or world // _env_int("SLURM_NNODES", default=1)
        return DistEnv(
            rank=_env_int("SLURM_PROCID", default=0),
            local_rank=_env_int("SLURM_LOCALID", default=0),
            world_size=world,
            local_world_size=max(1, local_world),
        )
    world = _env_int("WORLD_SIZE", default=1)
    env = DistEnv(
        rank=_env_int("RANK", default=0),
        local_rank=_env_int("LOCAL_RANK", default=0),
        world_size=world,
        local_world_size=_env_int("LOCAL_WORLD_SIZE", default=world),
    )
    if not 0 <= env.rank < env.world_size:  # a hand-set RANK without WORLD_SIZE: a ValueError deep in a loader
        raise UserError(
            f"RANK={os.environ.get('RANK')} is not below WORLD_SIZE={os.environ.get('WORLD_SIZE', '(unset: 1)')}; "
            "launch with torchrun, deepspeed or srun, which set both, or set WORLD_SIZE to the number of ranks"
        )
    return env


def resolve_device(name: str, env: DistEnv | None = None) -> torch.device:
    """backend.device -> this rank's device: auto picks CUDA when present, one GPU per local rank."""
    env = env or dist_env()
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("backend.device=cuda but torch sees no CUDA device; set backend.device=cpu or auto")
    return torch.device("cuda", env.local_rank % torch.cuda.device_count())


def init_distributed(device: torch.device, env: DistEnv | None = None, timeout_s: int = 1800) -> DistEnv:
    """Start the process group once (nccl on CUDA, gloo on CPU); later calls return the same layout."""
    env = env or dist_env()
    if dist.is_initialized():
        return env
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    for key, value in (("RANK", env.rank), ("LOCAL_RANK", env.local_rank), ("WORLD_SIZE", env.world_size)):
        os.environ.setdefault(key, str(value))  # plain python or SLURM-only jobs: DeepSpeed reads these names
    if env.world_size == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return env
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise UserError(
            f"{' and '.join(missing)} not set for a {env.world_size}-rank job: launch with torchrun or deepspeed, "
            "or export MASTER_ADDR (first node's address) and MASTER_PORT under SLURM (launch/ scripts do)"
        )
    store = _restart_store(env, timeout)
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout, store=store)
    return env


def _restart_store(env: DistEnv, timeout: timedelta) -> dist.Store | None:
    """Under torchrun, the store of this restart only; None elsewhere (init_process_group then reads env://).

    torchrun (c10d rendezvous) hands its workers the agent's own TCPStore and keeps that same store across
    `--max-restarts` restarts, and torch's env:// store for workers adds no per-restart prefix. The keys a dead
    group wrote (gloo's peer addresses, NCCL's unique id) are therefore still there when the restarted group
    starts, and a new rank may read a dead peer's address: its connect is refused, or it waits for a peer that is
    gone. Prefixing every key with the restart count gives each restart a clean namespace.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    shared = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"nanovlm-scale/restart_{attempt}", shared)


def destroy_distributed() -> None:
    """Destroy every process group, through DeepSpeed when it has used them.

    DeepSpeed caches groups of its own (world, data-parallel, ZeRO's); its destroy forgets them with the groups.
    Torch's alone left them cached, and the next DeepSpeed engine in the same process (a sweep, a notebook) was
    handed a destroyed group: "Group ... is not registered".
    """
    if not dist.is_initialized():
        return
    ds_comm = sys.modules.get("deepspeed.comm.comm")  # its `cdb`: the package re-exports the import-time None
    if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None:
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else dist_env().rank


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op without a process group), so single-process code needs no branch."""
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order (just [obj] without a process group)."""
    if not (is_distributed() and dist.get_world_size() > 1):
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (every device) from one seed; call with the same seed on every rank before
    building the model so the replicas start identical, then with a rank offset for dropout if wanted."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def log0(msg: str, *args: object, level: int = logging.INFO) -> None:
    """Log on rank 0 only: N ranks printing the same line N times hides the line that matters."""
    if get_rank() == 0:
        log.log(level, msg, *args)
