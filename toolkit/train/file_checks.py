"""A checkpoint's files checked before a resume reads any of them, shared out over the ranks.

A resume checks that every file the checkpoint should hold is there and whole (each rank_R.pt, the backend's
model, ZeRO or DCP shards), so a lost or cut file is named before anything is built on it. Every rank checked
every file: at 512 ranks that is about two million stat and open calls at once on the shared filesystem's
metadata server, for one resume. Now rank r checks files r, r+W, r+2W, ... of one list every rank builds alike,
and one all-gather brings every rank the first failure in list order, so all raise the same error as a
one-process check would (a rank that raised alone left the others waiting in their next collective).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from toolkit import dist
from toolkit.train.safe_load import CheckpointFileError


@dataclass(frozen=True)
class FileCheck:
    """One file to check: `problem(file)` says what is wrong with it, or None when it is fine."""

    file: Path
    what: str  # what the file holds, for the error ("a rank's data-loader and RNG state")
    problem: Callable[[Path], str | None]


def zip_problem(file: Path, *, missing: str = "the file is missing") -> str | None:
    """torch.save's format is a zip archive, checked from its end record without reading the rest."""
    if not file.is_file():
        return missing
    if not zipfile.is_zipfile(file):
        return "the file is cut short or not a torch file (no zip end record)"
    return None


def _first_failure(
    build: Callable[[], list[FileCheck]], rank: int, world: int
) -> tuple[int, CheckpointFileError] | None:
    """This rank's share of the checks, as (index in the list, error); a failure to build the list (a file every
    rank reads to know the others, such as DCP's .metadata) comes first, at index -1."""
    try:
        checks = build()
    except CheckpointFileError as exc:
        return (-1, exc)
    for index in range(rank, len(checks), world):
        check = checks[index]
        reason = check.problem(check.file)
        if reason is not None:
            return (index, CheckpointFileError(check.file, check.what, reason))
    return None


def check_files_shared(build: Callable[[], list[FileCheck]], *, rank: int = 0, world: int = 1) -> None:
    """Raise CheckpointFileError for the first file of `build()`'s list that fails its check.

    With world > 1 this is collective (every rank of the process group calls it with its own rank): each rank
    checks its share and every rank raises the same error. With world 1 one process checks the whole list.
    """
    mine = _first_failure(build, rank, world)
    found = [f for f in (dist.all_gather_object(mine) if world > 1 else [mine]) if f is not None]
    if found:
        raise min(found, key=lambda failure: failure[0])[1]
