"""`train.profile_steps`: a torch.profiler trace of a few steps of the run itself, on every rank.

`bench gpu --profile` traces synthetic steps of one preset on one GPU; where a real run's time goes (its data,
its backend at its world size, a slow rank) only a trace of that run can say. Every rank writes its own trace,
since a straggler is one rank's story. Steps are counted from this launch's first, so a resumed job is traced too,
and the window skips `train.profile_start` steps (compilation, the allocator's growth) before it opens.

The trainer calls `stop_due` before and `start_due` after the run's per-step work (checkpoints, validation), so
the window opens and closes on training steps; a checkpoint or validation that falls due between two traced steps
is in the trace, under its own span (`toolkit.checkpoint`, `toolkit.validate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from toolkit import dist

TABLE_ROWS = 40


class StepProfiler:
    """Traces steps `first + 1` .. `first + steps` of the run (`first` = the launch's start step + `skip`), or up to
    the run's `end` step if that comes first."""

    def __init__(
        self, out_dir: Path, *, steps: int, skip: int, start_step: int, end: int, rank: int, device: torch.device
    ) -> None:
        self.out_dir, self.rank, self.device = out_dir, rank, device
        self.first, self.last = start_step + skip, min(start_step + skip + steps, end)
        self._prof: profile | None = None
        self._open_if_due(start_step)  # skip = 0: from the launch's first step

    def start_due(self, trainer: Any, metrics: dict[str, Any]) -> None:
        """Per-step callback, last: open the window after step `first`."""
        self._open_if_due(trainer.state.step)

    def stop_due(self, trainer: Any, metrics: dict[str, Any]) -> None:
        """Per-step callback, first: close the window after step `last`."""
        if trainer.state.step >= self.last:
            self.close(trainer.state.step)

    def close(self, step: int) -> None:
        """Stop and write what was traced (also when the run ends inside the window)."""
        prof = self._stop()
        if prof is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        steps = f"steps{self.first + 1}-{step}"
        prof.export_chrome_trace(str(self.out_dir / f"rank{self.rank}_{steps}.json"))
        if self.rank == 0:
            sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=sort, row_limit=TABLE_ROWS)
            (self.out_dir / f"ops_{steps}.txt").write_text(table)
        dist.log0("steps %d-%d traced: %s (one trace per rank)", self.first + 1, step, self.out_dir)

    def discard(self) -> None:
        """Stop an open window without writing it: the run is ending on an error, and a profiler left running
        would keep recording into the interpreter's teardown."""
        self._stop()

    def _open_if_due(self, step: int) -> None:
        """Start recording after step `first`, once (steps only grow), if the window holds any step."""
        if self._prof is None and step == self.first < self.last:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._prof = profile(activities=activities)
            self._prof.start()

    def _stop(self) -> profile | None:
        """The profiler, stopped, if one was recording."""
        prof, self._prof = self._prof, None
        if prof is not None:
            prof.stop()
        return prof
