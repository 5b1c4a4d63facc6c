"""What a newcomer hits ends in one line that says what to do, not a traceback (issue 6)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolkit import __main__ as cli

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolkit", *args], cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["train", "--config", "tiny", "model.tokenizer=/nowhere/tok"], "Set model.tokenizer="),
        (
            ["data-stats", "--config", "tiny", "data.train_shards=/nowhere/shard-{000..003}.tar"],
            "4 of 4 shards are missing",
        ),
        (["train", "--config", "tiny", "backend.name=horovod"], "choose one of single, ddp, deepspeed, fsdp"),
        (["generate", "--checkpoint", "/nowhere", "--image", "x.png", "--prompt", "hi"], "no nanoVLM checkpoint"),
        (["report", "/nowhere"], "pass a run folder"),
    ],
)
def test_errors_end_in_one_line_of_advice(args, says, tmp_path):
    done = run_cli(*args)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert says in done.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when no GPU is present")
def test_gpu_asked_for_but_absent(tmp_path):
    done = run_cli("train", "--config", "tiny", "backend.device=cuda", f"train.run_dir={tmp_path}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "set backend.device=cpu or auto" in done.stderr


def test_generate_names_an_image_it_cannot_read_before_loading_the_model(tmp_path, capsys, monkeypatch):
    """PIL's UnidentifiedImageError (and a cut file's OSError) as one line naming the file; the model never loads."""
    from toolkit import evaluate

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")  # enough to be found; loading it would fail
    monkeypatch.setattr(evaluate, "load_for_inference", lambda *a, **k: pytest.fail("loaded the model first"))
    (tmp_path / "notes.jpg").write_text("not an image")
    png = tmp_path / "cut.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 10, 10)).save(png)
    png.write_bytes(png.read_bytes()[:60])
    for image, says in [("notes.jpg", "is not an image PIL can read"), ("cut.png", "cannot be read")]:
        path = tmp_path / image
        args = ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--image", str(path), "--prompt", "hi"]
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --image {path}") and says in err and "\n" not in err, err


def test_out_of_memory_gets_a_hint(monkeypatch, capsys):
    def boom(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setitem(cli.HANDLERS, "report", boom)
    assert cli.main(["report", "x"]) == 3
    err = capsys.readouterr().err
    assert "lower train.batch_size" in err and "train.activation_checkpointing" in err


def test_unreachable_hostfile_host(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# a host that does not resolve\nno-such-host.invalid slots=8\n")
    done = subprocess.run(["bash", "launch/deepspeed.sh", str(hostfile), "--config", "tiny"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1
    assert "no-such-host.invalid" in done.stderr and "ssh-copy-id" in done.stderr


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    from toolkit.data.prepare.synthetic import write_synth

    root = tmp_path_factory.mktemp("synth")
    write_synth(str(root), samples=16, val_samples=4, seed=0)
    return root


def test_train_check_runs_the_checks_for_the_given_world_and_starts_nothing(synth_data, tmp_path, capsys):
    """`train --check --world N` makes the run's checks for N ranks (accumulation, resume) and writes nothing."""
    base = ["train", "--check", "--config", "tiny", f"model.tokenizer={synth_data / 'tokenizer'}",
            f"data.train_shards={synth_data / 'train'}", f"data.val_shards={synth_data / 'val'}",
            f"train.run_dir={tmp_path / 'run'}", "train.global_batch_size=4", "train.batch_size=1",
            "backend.name=ddp"]  # fmt: skip
    assert cli.main([*base, "--world", "2"]) == 0
    said = capsys.readouterr().out
    assert "config ok for 2 ranks" in said and "2 micro-steps of 1 rows" in said  # 4 rows / (1 row x 2 ranks)
    assert not (tmp_path / "run").exists()
    assert cli.main([*base, "--world", "3"]) == 2  # 4 rows cannot split over 3 ranks: the run would fail there
    assert "not a multiple of train.batch_size x world size" in capsys.readouterr().err


def test_a_typo_under_torchrun_fails_once_before_any_rank_starts(synth_data, tmp_path):
    """torchrun restarts a failed group (--max_restarts): a config error used to print on every rank of every
    restart and end in torchrun's ChildFailedError (exit 1). The launcher checks once first: exit 2, one line."""
    done = subprocess.run(
        ["bash", "launch/torchrun.sh", "--config", "tiny", f"model.tokenizer={synth_data / 'tokenizer'}",
         f"data.train_shards={synth_data / 'train'}", "train.max_step=5"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "NPROC_PER_NODE": "2"},
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("config error") == 1 and "ChildFailedError" not in done.stderr
    assert "train.max_training_steps" in done.stderr  # the hint
