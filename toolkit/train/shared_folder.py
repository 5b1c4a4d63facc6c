"""train.run_dir must be one folder that every node sees.

Each rank writes its own part of every checkpoint into train.run_dir (its rank_R.pt, its ZeRO or DCP shard) and
rank 0 commits them all with `latest`. A run_dir on node-local disk (/tmp, a node's scratch SSD, a container's own
filesystem) trained until its first checkpoint, train.checkpoint_interval steps in (often hours), then failed there
with a bare "No such file or directory" for another node's rank file (rank 0 makes the step folder on its own
disk); where the other nodes held the folder too (a run_dir used before), the checkpoints were split across the
nodes and every resume was refused. At start rank 0 writes a probe file there, the first rank of every other node
looks for it, and one all-gather lets every rank refuse together, naming the nodes that could not see it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from pathlib import Path

from toolkit import dist
from toolkit.config import ConfigError
from toolkit.train.durable import write_text_synced

PROBE = ".node-probe"


def check_shared(root: Path, env: dist.DistEnv) -> None:
    """Collective on a multi-node job (nothing on one node): refuse a `root` that some node does not share."""
    if env.num_nodes == 1:
        return
    probe = root / PROBE
    token = None
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        token = f"{secrets.token_hex(8)} from rank 0 on {socket.gethostname()}"
        write_text_synced(probe, token + "\n")  # synced: another node's read must find it whole
    token = dist.all_gather_object(token)[0]  # also the barrier: the probe is written before anyone looks
    seen = None
    if env.local_rank == 0 and not env.is_main:
        seen = (env.rank, socket.gethostname(), _read(probe) == token)
    reports = dist.all_gather_object(seen)
    if env.is_main:
        with contextlib.suppress(OSError):
            os.unlink(probe)
    blind = [(rank, host) for rank, host, ok in filter(None, reports) if not ok]
    if blind:
        where = ", ".join(f"rank {rank} on {host}" for rank, host in blind[:4]) + (" ..." if len(blind) > 4 else "")
        raise ConfigError(
            f"train.run_dir={root} is not one folder for every node: the first rank of {len(blind)} node(s) ({where}) "
            f"does not see the file rank 0 wrote there. Every rank writes its part of each checkpoint into it, so a "
            "resume needs them in one place: put train.run_dir on a filesystem every node mounts (Lustre, GPFS, NFS, "
            "...), not on node-local disk (/tmp, a node's scratch)"
        )


def _read(probe: Path) -> str | None:
    try:
        return probe.read_text().strip()
    except OSError:
        return None
