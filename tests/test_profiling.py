"""`train.profile_steps`: a trace of exactly the steps asked for, on every rank, opening and closing on steps."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CPU_ENV, torchrun
from toolkit import __main__ as cli
from toolkit.config import ConfigError, load_config
from toolkit.data.prepare.synthetic import write_synth

REPO = Path(__file__).resolve().parent.parent
SPANS = ("toolkit.forward_backward", "toolkit.norm_and_loss_read", "toolkit.optimizer_step")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synth(str(out), samples=32, val_samples=4, seed=0)
    return out


def train_args(synth: Path, run: Path, *, steps: int, start: int, traced: int) -> list[str]:
    return [
        "backend.device=cpu", "backend.precision=fp32", f"model.tokenizer={synth / 'tokenizer'}",
        f"data.train_shards={synth / 'train'}", f"data.val_shards={synth / 'val'}", "data.num_workers=0",
        "data.shuffle_buffer=8", "train.batch_size=2", f"train.max_training_steps={steps}",
        "train.checkpoint_interval=1", "train.export_best=false", f"train.run_dir={run}",
        f"train.profile_start={start}", f"train.profile_steps={traced}",
    ]  # fmt: skip


def spans(trace: Path) -> dict[str, int]:
    """How many times each trainer span appears in a Chrome trace."""
    names = [event.get("name") for event in json.loads(trace.read_text())["traceEvents"]]
    return {span: names.count(span) for span in SPANS}


@pytest.mark.parametrize(
    ("start", "traced", "name", "steps_traced"),
    [(1, 2, "steps2-3", 2), (0, 1, "steps1-1", 1), (2, 10, "steps3-4", 2)],
    ids=["inside", "from-the-first-step", "past-the-end"],
)
def test_the_trace_holds_exactly_the_steps_asked_for(synth, tmp_path, start, traced, name, steps_traced):
    """A checkpoint after every step and validation after the last: only those between two traced steps land in
    the trace (one less than the steps), and a window that runs past the end still writes what it traced."""
    run = tmp_path / "run"
    assert cli.main(["train", "--config", "tiny", *train_args(synth, run, steps=4, start=start, traced=traced)]) == 0
    profile = run / "profile"
    assert sorted(p.name for p in profile.iterdir()) == [f"ops_{name}.txt", f"rank0_{name}.json"]
    assert spans(profile / f"rank0_{name}.json") == dict.fromkeys(SPANS, steps_traced)
    names = [e.get("name", "") for e in json.loads((profile / f"rank0_{name}.json").read_text())["traceEvents"]]
    assert (names.count("toolkit.checkpoint"), names.count("toolkit.validate")) == (steps_traced - 1, 0)
    assert "toolkit.forward_backward" in (profile / f"ops_{name}.txt").read_text()


def test_no_trace_by_default(synth, tmp_path):
    run = tmp_path / "run"
    args = [a for a in train_args(synth, run, steps=2, start=0, traced=0) if not a.startswith("train.profile")]
    assert cli.main(["train", "--config", "tiny", *args]) == 0
    assert not (run / "profile").exists()


def test_a_run_that_fails_inside_the_window_stops_the_profiler(synth, tmp_path, monkeypatch):
    """An error mid-window (here a diverging loss) must not leave torch's profiler recording after the run."""
    import torch

    from toolkit.train.trainer import Trainer, TrainingDiverged

    def diverge(self):
        raise TrainingDiverged("diverged on purpose")

    monkeypatch.setattr(Trainer, "_check_divergence", diverge)
    run = tmp_path / "run"
    assert cli.main(["train", "--config", "tiny", *train_args(synth, run, steps=4, start=0, traced=3)]) == 1
    assert not torch.autograd.profiler._is_profiler_enabled
    assert not (run / "profile").exists()  # nothing half-written


def test_negative_profile_settings_are_refused():
    for field in ("profile_steps", "profile_start"):
        with pytest.raises(ConfigError, match=f"train.{field}"):
            load_config("tiny", [f"train.{field}=-1"])


@pytest.mark.multiproc
def test_every_rank_writes_its_own_trace(synth, tmp_path):
    """A straggler is one rank's story: each rank traces the same steps, with its own collectives in them."""
    run = tmp_path / "run"
    args = [*train_args(synth, run, steps=3, start=1, traced=1), "backend.name=ddp"]
    target = torchrun(2, "-m", "toolkit", "train", "--config", "tiny", *args)
    done = subprocess.run(target, env={**os.environ, **CPU_ENV}, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    traces = sorted((run / "profile").glob("rank*.json"))
    assert [t.name for t in traces] == ["rank0_steps2-2.json", "rank1_steps2-2.json"]
    for trace in traces:
        assert spans(trace) == dict.fromkeys(SPANS, 1)
        assert "gloo:all_reduce" in trace.read_text()  # DDP's gradient all-reduce and the loss's, on each rank
    assert [p.name for p in (run / "profile").glob("ops_*")] == ["ops_steps2-2.txt"]  # rank 0's table only


@pytest.mark.gpu
def test_a_cuda_run_traces_its_kernels_and_sorts_by_device_time(synth, tmp_path):
    """On CUDA the trace holds the device's kernels too, and rank 0's table is sorted by their time."""
    run = tmp_path / "run"
    args = [a.replace("device=cpu", "device=cuda") for a in train_args(synth, run, steps=3, start=1, traced=1)]
    assert cli.main(["train", "--config", "tiny", *args]) == 0
    trace = json.loads((run / "profile" / "rank0_steps2-2.json").read_text())
    assert any(event.get("cat") == "kernel" for event in trace["traceEvents"])
    assert spans(run / "profile" / "rank0_steps2-2.json") == dict.fromkeys(SPANS, 1)
    header = (run / "profile" / "ops_steps2-2.txt").read_text().splitlines()[1]
    assert "CUDA" in header or "Device" in header, header
