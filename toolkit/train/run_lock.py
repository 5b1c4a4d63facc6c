"""One training run per run folder at a time.

Two runs started on the same train.run_dir (a job resubmitted while the first still ran, a launcher signalled
while its workers trained on) both trained: metrics.jsonl held every step twice, TensorBoard two event files,
and one run deleted the checkpoint folder the other was writing. Rank 0 holds an exclusive lock on
RUN/.lock for the run's life; the kernel drops it when the process ends, however it ends, so a crashed or killed
run never leaves a stale lock (a torchrun restart takes it again).
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
import socket
from pathlib import Path

from toolkit import dist
from toolkit.config import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunLock:
    """Rank 0's lock on a run folder: `claim()` on every rank (all refuse together), `release()` at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fd: int | None = None

    def claim(self) -> None:
        """Take the lock on rank 0 and tell every rank whether it was free: each refuses in the same words."""
        holder = self._take() if dist.get_rank() == 0 else None
        holders = dist.all_gather_object(holder) if dist.is_distributed() else [holder]
        if holders[0] is not None:
            raise ConfigError(
                f"train.run_dir={self.root} is in use by another run ({holders[0]}); wait for it to end, stop it, "
                "or choose another train.run_dir"
            )

    def _take(self) -> str | None:
        """None once the lock is held; else who holds it, as its lock file says."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return path.read_text().strip() or "its lock file names no process"
        except OSError as exc:  # a filesystem without locks (some NFS or Lustre mounts): run unguarded
            os.close(fd)
            log.warning("%s: cannot lock (%s); make sure no other run uses this train.run_dir", path, exc.strerror)
            return None
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode())
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays (removing it would race a new claimant)
            self._fd = None
