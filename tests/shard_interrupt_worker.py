"""`shard-data` through the CLI on rows that come slowly, for the interruption test in test_shard_writer.

usage: python tests/shard_interrupt_worker.py OUT SECONDS_PER_ROW [shard-data flags ...]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

from toolkit import __main__ as cli
from toolkit.data.prepare import shard_writer
from toolkit.data.prepare.sources import ListSource

ROWS = 60


class SlowSource(ListSource):
    """Text rows, each after `delay` seconds: a run long enough to be stopped between its shards."""

    def __init__(self, delay: float) -> None:
        texts = [[{"user": f"question {i}?", "assistant": f"answer {i}"}] for i in range(ROWS)]
        super().__init__("slow", [{"images": [], "texts": t} for t in texts])
        self.delay = delay

    def rows(self, start: int, stop: int) -> Iterator[tuple[int, str, Any]]:
        for item in super().rows(start, stop):
            time.sleep(self.delay)
            yield item


if __name__ == "__main__":
    out, delay, *flags = sys.argv[1:]
    shard_writer.open_source = lambda *args, **kw: SlowSource(float(delay))
    sys.exit(cli.main(["shard-data", "slow-rows", out, *flags]))
