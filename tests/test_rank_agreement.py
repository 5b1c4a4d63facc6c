"""Ranks launched with different configs, library versions or toolkit code stop at the start with one message,
instead of hanging or drifting."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CPU_ENV, REPO, torchrun

# Rank 1 alone gets the extra overrides: what a per-node wrapper or a file edited on one host does.
WORKER = """
import os, sys
from toolkit.__main__ import main
extra = sys.argv[2:] if os.environ["RANK"] == "1" else []
sys.exit(main(["train", "--config", sys.argv[1], *extra]))
"""


def write_config(tmp_path: Path, *, steps: int):
    """tmp_path/cfg.yaml: the tiny preset on DDP over synthetic data written beside it, for `steps` steps."""
    from toolkit.config import load_config, save_config
    from toolkit.data.prepare.synthetic import write_synth

    write_synth(str(tmp_path / "synth"), samples=16, val_samples=4, seed=0)
    cfg = load_config("tiny", [f"model.tokenizer={tmp_path / 'synth' / 'tokenizer'}",
                               f"data.train_shards={tmp_path / 'synth' / 'train'}", "data.val_shards=",
                               "data.num_workers=0", "train.eval_interval=0", "backend.name=ddp", "backend.device=cpu",
                               f"train.run_dir={tmp_path / 'run'}", f"train.max_training_steps={steps}"])  # fmt: skip
    save_config(cfg, tmp_path / "cfg.yaml")
    return cfg


@pytest.mark.multiproc
def test_ranks_with_different_configs_are_refused_before_training(tmp_path: Path) -> None:
    """Measured before: train.log_interval=2 on one rank hung at step 1 (one rank gathered sample counts, the other
    started the next step), train.checkpoint_interval hung at the save barrier, train.lr_mp trained two drifting
    DDP replicas and exited 0."""
    cfg = write_config(tmp_path, steps=4)
    (tmp_path / "worker.py").write_text(WORKER)
    cmd = torchrun(
        2, str(tmp_path / "worker.py"), str(tmp_path / "cfg.yaml"), "train.log_interval=2", "train.lr_mp=0.01"
    )
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, **CPU_ENV}, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    # Both ranks print the line; their writes to the shared stderr may land on one line, so count, not split.
    assert done.stderr.count("launched with different configs") == 2, done.stderr[-3000:]
    said = done.stderr[done.stderr.index("launched with different configs") :]
    assert f"train.log_interval: rank 0 {cfg.train.log_interval}, rank 1 2; train.lr_mp: rank 0 " in said
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was trained


def test_the_collective_timeout_is_the_configs(monkeypatch) -> None:
    """backend.collective_timeout_s reaches the process group (it was 1800 s, hard-coded)."""
    from toolkit import dist
    from toolkit.config import load_config
    from toolkit.train.backends import build_backend

    cfg = load_config("tiny", ["backend.name=ddp", "backend.device=cpu", "backend.collective_timeout_s=77"])
    backend = build_backend(cfg, env=dist.DistEnv(rank=0, local_rank=0, world_size=2, local_world_size=2))
    seen = {}
    monkeypatch.setattr(dist, "is_distributed", lambda: False)
    monkeypatch.setattr(dist, "init_distributed", lambda device, env, timeout_s: seen.update(timeout_s=timeout_s))
    backend.start_process_group()
    assert seen == {"timeout_s": 77}


# Rank 1 on its own "node" (every rank LOCAL_RANK 0 of 1), with what the test gives it: another torch version, or
# the toolkit imported from another copy of its code.
OTHER_NODE_WORKER = """
import os, sys
os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
if os.environ["RANK"] == "1":
    if os.environ.get("OTHER_TOOLKIT"):
        sys.path.insert(0, os.environ["OTHER_TOOLKIT"])
    if os.environ.get("OTHER_TORCH"):
        import torch
        torch.__version__ = os.environ["OTHER_TORCH"]
from toolkit.__main__ import main
import toolkit
print("rank", os.environ["RANK"], "runs", toolkit.__file__, flush=True)
sys.exit(main(["train", "--config", sys.argv[1]]))
"""


@pytest.mark.multiproc
def test_nodes_with_other_libraries_or_other_toolkit_code_are_refused_before_training(tmp_path: Path) -> None:
    """A node with another torch (a stale container image) or another checkout of the toolkit (pulled on one node)
    hung in a collective or failed on one rank deep inside a library; now every rank refuses at the start, naming
    what differs and where. The config is the same on both ranks."""
    import shutil

    write_config(tmp_path, steps=2)
    (tmp_path / "worker.py").write_text(OTHER_NODE_WORKER)
    other = tmp_path / "other_checkout"
    shutil.copytree(REPO / "toolkit", other / "toolkit", ignore=shutil.ignore_patterns("__pycache__"))
    edited = other / "toolkit" / "train" / "trainer.py"
    edited.write_text(edited.read_text() + "\n# edited on this node only\n")
    cases = {
        "OTHER_TORCH": ("0.0.1-other", "run different software (torch: rank 0 on "),
        "OTHER_TOOLKIT": (str(other), "the toolkit's code differs between nodes (toolkit code: rank 0 on "),
    }
    for variable, (value, says) in cases.items():
        env = {**os.environ, **CPU_ENV, variable: value}
        cmd = torchrun(2, str(tmp_path / "worker.py"), str(tmp_path / "cfg.yaml"))
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode != 0
        assert done.stderr.count(says) == 2, done.stderr[-3000:]
        said = done.stderr[done.stderr.index(says) :].splitlines()[0]
        assert ", rank 1 on " in said, said
        if variable == "OTHER_TORCH":
            assert f"'{value}')" in said, said
        else:  # rank 1 really ran the other copy
            assert f"rank 1 runs {other / 'toolkit' / '__init__.py'}" in done.stdout, done.stdout[-2000:]
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
