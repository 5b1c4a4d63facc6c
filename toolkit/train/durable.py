"""Checkpoint files on the disk, not in a node's page cache, before `latest` names their checkpoint.

`latest` is replaced atomically (write, fsync, rename), but it promised more than the files behind it held: the
model, optimizer and rank files were written with torch.save and never synced, so a node that died (or lost power)
soon after a commit left `latest` naming a checkpoint whose files were cut short or empty, and the resume refused
it. Each file is synced by the process that wrote it, as it writes it (one fsync per file, no listing or reopening
of other ranks' files), and the step's folder once before the commit, so its new names are on disk too. DCP syncs
its own shards (FileSystemWriter's sync_files, on by default).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch


def save_synced(obj: Any, path: str | Path) -> None:
    """torch.save, then the bytes flushed to the disk before returning."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


# What fsync of a folder gives on a filesystem that has nothing to sync for one (CIFS, some FUSE mounts): not a
# failure of the checkpoint, whose files were synced one by one. A file's fsync errors (EIO: data lost) still raise.
NO_FOLDER_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR}


def write_text_synced(path: str | Path, text: str) -> None:
    """A text file (trainer.json, `latest`), its bytes flushed to the disk before returning."""
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def sync_path(path: str | Path) -> None:
    """fsync a file or a folder (a folder's entries: the names of files made in it) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (exc.errno in NO_FOLDER_SYNC and os.path.isdir(path)):
            raise
    finally:
        os.close(fd)


def sync_after_save(engine: Any) -> None:
    """DeepSpeed's checkpoint engine (torch.save per file, unsynced) syncs each file it saves: its `save` is
    wrapped on this instance; called with DeepSpeed's positional or keyword arguments alike."""
    save = engine.save

    def save_then_sync(state_dict: Any, path: str) -> None:
        save(state_dict, path)
        sync_path(path)

    engine.save = save_then_sync
