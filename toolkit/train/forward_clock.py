"""Each rank's forward seconds without its waits for the other ranks: what `rank_time_imbalance` compares.

A rank's forward + backward seconds cannot show a straggler: DDP's all-reduce and FSDP2's and ZeRO's reduce-scatter
run inside the backward, so a fast rank's timed span ends when the slowest rank's does (measured: 1.00 with one
rank four times slower). The forward is the rank's own work under DDP and ZeRO-0/1/2, which exchange nothing
there. FSDP2 and ZeRO-3 gather parameters in a pre-forward hook of each unit, and a fast rank waits there for the
slow one; those waits are measured (between a hook just before the backend's and one just after it) and taken
out. The backward scales with the same tokens and tiles as the forward, so the forward's max / mean is the step's.

On CUDA the marks are events on the current stream, read after the step's synchronisation: the backend's hook
makes the stream wait for the gather, so the two events around it time that stall on the device.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from torch import nn


class ForwardClock:
    """Marks the forward of `root` and the pre-forward hooks of `gathering` modules while armed."""

    def __init__(self, root: nn.Module, gathering: Iterable[nn.Module], device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.armed = False
        self.marks: list[tuple[str, float | torch.cuda.Event]] = []
        gathering = list(gathering)
        # The hooks the backend put on these modules are in place: prepend=True runs before them, the default after.
        for module in gathering:
            module.register_forward_pre_hook(lambda *_: self._mark("wait"), prepend=True)
        root.register_forward_pre_hook(lambda *_: self._mark("start"), prepend=True)  # before root's own wait
        root.register_forward_hook(lambda *_: self._mark("end"))
        for module in gathering:
            module.register_forward_pre_hook(lambda *_: self._mark("go"))

    def _mark(self, kind: str) -> None:
        if not self.armed:  # validation and generation forwards are not a step's
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((kind, event))
        else:
            self.marks.append((kind, time.perf_counter()))

    def start(self) -> None:
        self.marks.clear()
        self.armed = True

    def seconds(self) -> float:
        """The forwards since start(), less their waits; call once the device is done (CUDA: synchronized)."""
        self.armed = False
        total, opened = 0.0, {}
        for kind, mark in self.marks:
            if kind in ("start", "wait"):
                opened[kind] = mark
            elif kind == "end" and "start" in opened:
                total += self._elapsed(opened.pop("start"), mark)
            elif kind == "go" and "wait" in opened and "start" in opened:
                total -= self._elapsed(opened.pop("wait"), mark)
        self.marks.clear()
        return max(total, 0.0)

    def _elapsed(self, begin: float | torch.cuda.Event, end: float | torch.cuda.Event) -> float:
        if self.cuda:
            return begin.elapsed_time(end) / 1000.0
        return end - begin
