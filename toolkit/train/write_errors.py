"""A checkpoint or export write that fails because the disk is full or a folder is not writable, in one line.

torch.save on a full disk says only "unexpected pos" or "iostream error", DCP gathers every rank's traceback
into one exception, and either ended a run under 100-200 lines that never named the disk. Here such a failure
becomes a UserError naming the folder, the space free and needed, what to do, and which checkpoint the run
resumes from; any other error passes unchanged (a real bug stays visible).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from toolkit.errors import DENIED_ERRNOS, UserError, causes, disk_full, os_error, peer_loss

if TYPE_CHECKING:
    from toolkit.train.checkpoint import RunDir

MIN_CHECKPOINT_ROOM = 16 << 20
"""The room a save is taken to need before the run has a complete checkpoint whose size says how much."""


@contextlib.contextmanager
def explain_write(run: RunDir, step: int | None, *, keep: int | None = None, folder: Path | None = None,
                  what: str | None = None) -> Iterator[None]:  # fmt: skip
    """A write under this block that fails because the disk is full or the folder not writable raises a UserError
    naming the folder, the space free and needed, and what to do; any other error passes unchanged."""
    try:
        yield
    except BaseException as exc:  # DCP's CheckpointException derives from BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit, UserError)):
            raise
        problem = write_failure(exc, run, step, keep=keep, folder=folder, what=what)
        if problem is None:
            raise
        raise problem from exc


def write_failure(exc: BaseException, run: RunDir, step: int | None, *, keep: int | None = None,
                  folder: Path | None = None, what: str | None = None) -> UserError | None:  # fmt: skip
    """`exc`, raised writing checkpoint `step` of `run` (or `what` into `folder`), as a UserError when the disk is
    the cause: ENOSPC/EDQUOT anywhere in its chain, or a filesystem left with less room than one checkpoint takes
    (torch.save on a full disk says only "unexpected pos" or "iostream error"), or a folder this user cannot write.
    None for anything else, and for a peer rank's loss (the CLI says that one)."""
    if peer_loss(exc) is not None:
        return None
    partial = run.step_dir(step) if step is not None else None
    folder = Path(folder) if folder is not None else run.checkpoints
    what = what or f"writing checkpoint step {step} ({partial})"
    denied = os_error(exc, DENIED_ERRNOS)
    if denied is not None:
        where = Path(denied.filename).parent if denied.filename else folder
        how = "is on a read-only filesystem" if denied.errno == errno.EROFS else "is not writable by this user"
        return UserError(
            f"{what} failed: {where} {how} ({denied.strerror}: {denied.filename or where}); make it writable "
            f"(chmod u+w {where}) or set another train.run_dir; {resume_note(run)}"
        )
    latest = _latest_or_none(run)
    size = _tree_bytes(latest)
    need = size or MIN_CHECKPOINT_ROOM
    try:
        free = shutil.disk_usage(_existing(folder)).free
    except OSError:
        free = None
    if not disk_full(exc):  # no errno says so: a filesystem without room for one checkpoint does
        room = None if free is None else free + _tree_bytes(partial)  # the unfinished step_N goes at the next save
        if room is None or (free >= 1 << 20 and room >= need):
            return None
    free_text = "" if free is None else f"{_size(free)} free, "
    need_text = f"a checkpoint of this run takes {_size(size)}" if size else "no complete checkpoint gives its size yet"
    if keep == 1:  # nothing to lower: a save needs room for the one kept and the one being written
        lower = ""
    else:
        lower = "lower train.keep_checkpoints" + (f" (now {keep}: each kept one takes that much), " if keep else ", ")
    return UserError(
        f"{what} failed: the filesystem of {folder} is full ({free_text}{need_text}; the write said: {_said(exc)}); "
        f"free space there, {lower}or set another train.run_dir on a larger filesystem; {resume_note(run)}"
    )


def resume_note(run: RunDir) -> str:
    latest = _latest_or_none(run)
    if latest is None:
        return "the run has no complete checkpoint yet, so a restart begins at step 0"
    return f"`latest` still names {latest.name}, so the run resumes from there"


def _latest_or_none(run: RunDir) -> Path | None:
    try:
        return run.latest()
    except (OSError, UserError):
        return None


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _tree_bytes(path: Path | None) -> int:
    """Bytes of the files under `path` (0 when there is none)."""
    total = 0
    if path is None or not path.is_dir():
        return total
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _said(exc: BaseException) -> str:
    """The error's own words, one line: the disk's OSError when there is one, else the first that is not DCP's
    wrapper (whose text is every rank's traceback)."""
    chain = [e for e in causes(exc) if type(e).__name__ != "CheckpointException"] or [exc]
    pick = next((e for e in chain if isinstance(e, OSError) and e.errno is not None), chain[0])
    text = str(pick).strip().splitlines()
    return f"{type(pick).__name__}: {text[0] if text else ''}".rstrip(": ")
