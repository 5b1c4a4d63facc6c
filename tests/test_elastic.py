"""Elastic restart (issue 13): under launch/torchrun.sh's `--max_restarts`, SIGKILL of a random rank at a random
step is recovered every time, and the finished run equals an uninterrupted one step for step.

Each try takes 40-65 s on 2 cores (two process starts, DeepSpeed's import), so `make test-slow` runs
ELASTIC_TRIES (default 3) tries per backend with fixed seeds; `python tests/elastic_harness.py --tries 10` runs the
long loop by hand (README: what survives what).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CPU_ENV

REPO = Path(__file__).resolve().parent.parent
TRIES = int(os.environ.get("ELASTIC_TRIES", "3"))


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("backend", ["fsdp", "zero2"])
def test_a_rank_killed_at_a_random_step_is_recovered_exactly(backend: str, tmp_path: Path) -> None:
    cmd = [sys.executable, "tests/elastic_harness.py", "--backend", backend, "--tries", str(TRIES),
           "--seed", "7", "--timeout-s", "240", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, **CPU_ENV}, capture_output=True, text=True,
                          timeout=300 * (TRIES + 1))  # fmt: skip
    results_file = tmp_path / f"{backend}-results.json"
    assert results_file.exists(), f"the harness stopped before its tries:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    results = json.loads(results_file.read_text())
    failed = [r for r in results if not r["ok"]]
    assert not failed and len(results) == TRIES, (done.stdout[-3000:], [r.get("output_tail") for r in failed][:1])
    for r in results:  # killed mid-run, restarted, every step once, each equal to the uninterrupted run's
        assert r["killed_after_step"] is not None and r["steps"] == list(range(1, 11))
        assert r["same_losses"] and r["same_batches"]
