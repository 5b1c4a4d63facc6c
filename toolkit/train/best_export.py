"""RUN/export/best and the validation it won: which step it holds, and what a resume to an earlier step does to it.

export/best is written whenever a validation beats the best so far. A resume from an earlier checkpoint forgets
the later steps (the best loss and step come back from the checkpoint), but the folder kept the left branch's
model: the run then logged "best validation loss 4.10 at step 20, exported to export/best" over step 30's
weights. So each best export records its step and loss (NOTE, inside the folder, written with it atomically), a
resume moves a best export of a step it leaves behind out of export/ (kept, not deleted: it may be the better
model), and the end-of-run line says what export/best really holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path

from toolkit.train.checkpoint import RunDir, remove_tree

log = logging.getLogger(__name__)

NOTE = "validation.json"  # {"step": S, "val_loss": L} of the validation that made this export the best
LEFT = "export-left-behind"  # RUN/LEFT/best_step_S: a best export of a branch that a resume left


def note(step: int, val_loss: float) -> dict[str, float | int]:
    return {"step": step, "val_loss": val_loss}


def read_note(folder: Path) -> dict | None:
    """The export's note, or None: none written (an export from before notes, or not a best export)."""
    try:
        found = json.loads((folder / NOTE).read_text())
        return found if isinstance(found.get("step"), int) else None
    except (OSError, ValueError, AttributeError):
        return None


def set_aside_after_resume(run: RunDir, step: int, best_val_loss: float) -> None:
    """Rank 0, at a resume to `step`: a best export of a later step belongs to a branch this run leaves."""
    best = run.exports / "best"
    found = read_note(best)
    if found is None or found["step"] <= step:
        return
    aside = run.root / LEFT / f"best_step_{found['step']}"
    aside.parent.mkdir(exist_ok=True)
    remove_tree(aside)  # an earlier resume set aside the same step of another branch: this one is newer
    os.replace(best, aside)
    again = "at the next validation" if math.isinf(best_val_loss) else f"when a validation beats {best_val_loss:.4f}"
    log.warning(
        "export/best held step %d's model (validation loss %.4f), a step this resume from step %d leaves behind; it "
        "is kept as %s, and export/best is written again %s",
        found["step"],
        found["val_loss"],
        step,
        aside,
        again,
    )


def drop_recomputed(run: RunDir, step: int, val_loss: float) -> None:
    """Rank 0, after export/best is written at `step`: a copy set aside for the same step and loss is the same
    model, recomputed by an exact resume (a crash between a best export and the next checkpoint), so it goes; a
    different loss (a changed recipe or data) is another model, and stays."""
    aside = run.root / LEFT / f"best_step_{step}"
    found = read_note(aside)
    if found is None or found["val_loss"] != val_loss:
        return
    remove_tree(aside)
    log.info("%s: step %d's best export was recomputed with the same validation loss; removed", aside, step)
    with contextlib.suppress(OSError):  # not empty: other steps' copies stay
        aside.parent.rmdir()


def where_best_is(run: RunDir, best_step: int) -> str:
    """The end-of-run line's account of export/best for the best step, in words."""
    found = read_note(run.exports / "best")
    if found is not None and found["step"] == best_step:
        return f", exported to {run.exports / 'best'}"
    return (
        f"; its export was replaced on a branch that a resume left, so export it from step {best_step}'s checkpoint "
        f"if one is kept (`python -m toolkit export {run.checkpoints / f'step_{best_step}'} OUT`)"
    )
