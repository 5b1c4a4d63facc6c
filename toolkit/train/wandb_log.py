"""Optional Weights & Biases logging for rank 0's MetricsWriter: the run id that survives restarts, and the sink.

wandb is imported only by runs that name a project, so it stays an optional extra (`nanovlm-scale[wandb]`).
"""

from __future__ import annotations

import os
import secrets
import string
from pathlib import Path
from typing import Any

from toolkit.errors import UserError

WANDB_MISSING = (
    "train.wandb_project={project} asks for Weights & Biases logging but wandb is not installed; install it with "
    "pip install 'nanovlm-scale[wandb]' (or pip install wandb), or leave train.wandb_project empty"
)
WANDB_STEP = "step"  # our optimizer step, W&B's x-axis for every metric; wandb's own _step only counts log calls
WANDB_ID_FILE = "wandb_id"


def wandb_enabled(project: str, mode: str) -> bool:
    """W&B is on when a project is named, unless its mode is `disabled` (which then needs no wandb installed)."""
    return bool(project) and mode != "disabled"


def import_wandb(project: str):
    """wandb, imported only for runs that log to it; a missing package is a UserError that says what to install."""
    try:
        import wandb
    except ImportError as exc:
        raise UserError(WANDB_MISSING.format(project=project)) from exc
    return wandb


def wandb_run_id(run_root: Path) -> str:
    """The W&B run id of this run folder: read from run_root/wandb_id, or made and written there at the first start,
    so every restart of the run (resume after a crash, a preemption, stop_at_step) continues the same W&B run."""
    path = run_root / WANDB_ID_FILE
    if path.exists():
        return path.read_text().strip()
    alphabet = string.ascii_lowercase + string.digits  # wandb's own ids: 8 characters of these
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)  # atomic: a start killed here leaves no half-written id
    return run_id


class WandbSink:
    """Rank 0's W&B run: the scalars TensorBoard gets, under the same keys, against our step as a custom x-axis.

    W&B requires its own step to grow with every call, but metrics may arrive for an earlier step after later steps
    were logged (lmms-eval scores are logged at the step of the export they scored). So our step is logged as the
    metric `step` that every other metric is plotted against (`define_metric(..., step_metric="step")`), and
    wandb's step argument is never passed: a late point keeps its value and its step.

    A resumed run continues the same W&B run (id from run_root/wandb_id, `resume="allow"`). metrics.jsonl and
    TensorBoard drop the steps logged after the checkpoint resumed from; W&B cannot drop points (rewinding a run
    needs the server, so it is not done offline), so the redone steps appear twice there, the earlier points kept.
    Offline, each start writes its own run_root/wandb/offline-run-* folder with the same id; `wandb sync` given all
    of them uploads them in order of start time into the one run.
    """

    def __init__(self, run_root: Path, *, project: str, mode: str, config: dict[str, Any] | None) -> None:
        wandb = import_wandb(project)
        try:
            self.run = wandb.init(
                project=project,
                mode=mode,
                dir=str(run_root),  # W&B's files live in the run folder, beside tb/ and metrics.jsonl
                id=wandb_run_id(run_root),
                resume="allow",
                name=run_root.resolve().name,
                config=config,
            )
        except wandb.errors.Error as exc:  # no API key, no network, a project that cannot be reached
            raise UserError(
                f"Weights & Biases could not start the run for train.wandb_project={project}: {exc}; log in "
                "(`wandb login` or WANDB_API_KEY), or set train.wandb_mode=offline and `wandb sync` later"
            ) from exc
        self.run.define_metric(WANDB_STEP, hidden=True)
        self.run.define_metric("*", step_metric=WANDB_STEP)

    def log(self, step: int, flat: dict[str, float]) -> None:
        if flat:  # a call with no scalar would add a W&B row holding only the step
            self.run.log({**flat, WANDB_STEP: step})

    def close(self, *, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
