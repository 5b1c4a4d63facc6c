"""A checkpoint save that fails because the disk is full or a folder is not writable ends in one line (exit 2)
naming the folder, the space free and needed, what to do, and the step `latest` still names; any other save error
stays a traceback. A run folder whose checkpoints/ or export/ is not writable is refused before step 1.

Runs are `train` in this process on the single backend (a few tiny steps); the disk is simulated (the writer raises
as torch.save does on a full disk, shutil.disk_usage reports what a full filesystem would), so no root or mount.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections import namedtuple
from pathlib import Path

import cli_runs
import pytest
import torch
from cli_runs import train, write_data

from toolkit import __main__ as cli
from toolkit.errors import OtherRankFailed
from toolkit.train import checkpoint as ckpt
from toolkit.train import preflight, write_errors
from toolkit.train.backends import single

Usage = namedtuple("Usage", "total used free")
TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 890112 vs 890064"  # its own words


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("synth"))


def train_args(synth: Path, run: Path, *extra: str) -> list[str]:
    """Two steps, a checkpoint after each: the writer fails at the second."""
    return cli_runs.train_args(synth, run, "backend.name=single", "data.val_shards=", *extra)


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def fail_from_save(monkeypatch, error: BaseException, *, at: int = 2) -> None:
    """The single backend's writer fails at its `at`-th save, after writing part of the file (as on a full disk)."""
    real, calls = single._write_state, []

    def write(path: Path, state: dict) -> None:
        calls.append(path)
        if len(calls) < at:
            return real(path, state)
        path.mkdir(parents=True, exist_ok=True)
        (path / single.STATE_FILE).write_bytes(b"PK" * 1000)
        raise error

    monkeypatch.setattr(single, "_write_state", write)


def full_disk(monkeypatch, free: int = 0) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1 << 30, (1 << 30) - free, free))


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("error", ["enospc", "torch"])
def test_a_full_disk_during_a_save_is_one_line_and_latest_stays_on_the_last_complete_step(
    error, async_save, synth, tmp_path, capsys, monkeypatch
):
    """torch.save on a full disk says only "unexpected pos"; the free space says the rest. An OSError with
    ENOSPC (a background write, DCP) says it itself, whatever the free space reads afterwards."""
    run = tmp_path / "run"
    if error == "torch":
        fail_from_save(monkeypatch, RuntimeError(TORCH_FULL_DISK))
        full_disk(monkeypatch, free=4096)
    else:
        fail_from_save(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    assert train(train_args(synth, run, f"train.async_checkpoint={str(async_save).lower()}")) == 2
    line = one_line(capsys)
    size = write_errors._size(write_errors._tree_bytes(run / "checkpoints" / "step_1"))
    assert line.startswith("error: writing checkpoint step 2") and "failed" in line, line
    assert f"the filesystem of {run / 'checkpoints'} is full" in line and f"takes {size}" in line, line
    assert "train.keep_checkpoints (now 2" in line and "train.run_dir" in line, line
    assert "`latest` still names step_1, so the run resumes from there" in line, line
    if error == "torch":
        assert "0.0 MiB free" in line and "unexpected pos" in line, line
    else:
        assert "No space left on device" in line, line
    assert ckpt.RunDir(run).latest().name == "step_1"


def test_a_save_error_that_is_not_the_disk_stays_a_traceback(synth, tmp_path, monkeypatch):
    fail_from_save(monkeypatch, RuntimeError("a bug in the writer"))  # the real disk has room for a checkpoint
    with pytest.raises(RuntimeError, match="a bug in the writer"):
        train(train_args(synth, tmp_path / "run"))
    assert ckpt.RunDir(tmp_path / "run").latest().name == "step_1"


def test_a_folder_that_refuses_the_save_is_named(synth, tmp_path, capsys, monkeypatch):
    """checkpoints/ made read-only while the run goes on: rank 0's mkdir of step_N raises PermissionError."""
    run = tmp_path / "run"
    real = ckpt.prepare_step_dir

    def prepare(path: Path) -> None:
        if path.name == "step_2":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real(path)

    monkeypatch.setattr(ckpt, "prepare_step_dir", prepare)
    assert train(train_args(synth, run)) == 2
    line = one_line(capsys)
    assert line.startswith("error: writing checkpoint step 2") and "is not writable by this user" in line, line
    assert f"chmod u+w {run / 'checkpoints'}" in line and "`latest` still names step_1" in line, line


def test_a_background_write_that_failed_on_another_rank_is_not_committed(tmp_path, monkeypatch):
    """finish_checkpoint's all-reduce carries the failures too: a rank whose own write finished does not commit
    (trainer.json, `latest`) a checkpoint another rank failed to write; it says so in one line."""
    from toolkit import dist
    from toolkit.train.backends.base import PendingSave

    run = ckpt.RunDir(tmp_path / "run")
    run.step_dir(3).mkdir(parents=True)
    pending = ckpt.PendingCheckpoint(run, 3, {"backend": "x", "world_size": 2, "trainer": {}}, 2, PendingSave())
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: t + torch.tensor([0.0, 1.0], dtype=t.dtype))
    with pytest.raises(OtherRankFailed, match=r"1 other rank.*not committed.*no complete checkpoint yet"):
        ckpt.finish_checkpoint(pending, wait=False, device=torch.device("cpu"))
    assert not (run.checkpoints / "latest").exists() and not (run.step_dir(3) / "trainer.json").exists()


def access_by_mode(path, mode, **kw) -> bool:
    """os.access as a user without root's bypass (the tests run as root in CI): the owner's mode bits."""
    bits = os.stat(path).st_mode
    return all(bits & flag for want, flag in ((os.W_OK, stat.S_IWUSR), (os.X_OK, stat.S_IXUSR)) if mode & want)


@pytest.mark.parametrize("sub", ["checkpoints", "export"])
def test_a_run_folder_whose_checkpoints_or_export_is_not_writable_is_refused_before_step_1(
    sub, synth, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    (run / sub).mkdir(parents=True)
    (run / sub).chmod(0o555)
    monkeypatch.setattr(preflight.os, "access", access_by_mode)
    try:
        assert train(train_args(synth, run)) == 2
    finally:
        (run / sub).chmod(0o755)
    line = one_line(capsys)
    assert line.startswith(f"config error: train.run_dir={run}: {run / sub} is not writable"), line
    assert f"chmod u+w {run / sub}" in line and not (run / "metrics.jsonl").exists()


def test_a_full_disk_outside_a_save_names_the_run_folder(tmp_path, capsys, monkeypatch):
    """TensorBoard's writer or metrics.jsonl on a full disk: ENOSPC from anywhere in training is one line too."""
    from toolkit.train import run as run_module

    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "tb" / "events.out"))

    monkeypatch.setattr(run_module, "run_training", full)
    assert cli.main(["train", "--config", "tiny", f"train.run_dir={tmp_path / 'run'}"]) == 2
    line = one_line(capsys)
    assert line.startswith(f"error: writing to {tmp_path / 'run'} failed: the filesystem of") and "is full" in line
    assert "No space left on device" in line and "no complete checkpoint yet" in line, line


def test_tensorboards_writer_thread_on_a_full_disk_prints_no_traceback_of_its_own(synth, tmp_path, capsys, monkeypatch):
    """TensorBoard's writer thread let its ENOSPC escape to threading's hook (a 7-line traceback) before training
    raised the same error again, in one line; only that line is left."""
    import threading

    from tensorboard.summary.writer import record_writer

    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)  # what would have been printed
    real_write, writes = record_writer.RecordWriter.write, []

    def write(self, data):
        writes.append(1)
        if len(writes) > 3:  # the file header and a few scalars, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    assert train(cli_runs.train_args(synth, tmp_path / "run", "backend.name=single", steps=4)) == 2
    line = one_line(capsys)
    assert line.startswith(f"error: writing to {tmp_path / 'run'} failed") and "No space left" in line, line
    assert escaped == []


SYNC_LOGGER = """
import os
_fsync = os.fsync


def _logged_fsync(fd):
    _fsync(fd)
    with open(os.environ["FSYNC_LOG"], "a") as log:  # one short line per call, appended
        log.write(os.readlink(f"/proc/self/fd/{fd}") + "\\n")


os.fsync = _logged_fsync
"""


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "backend",
    [["backend.name=ddp"], ["backend.name=fsdp"], ["backend.name=deepspeed"],
     ["backend.name=deepspeed", "backend.ds_config=ds_configs/zero3.json"]],
    ids=["ddp", "fsdp", "zero2", "zero3"],
)  # fmt: skip
def test_every_file_of_a_checkpoint_is_synced_before_latest_names_it(backend, synth, tmp_path) -> None:
    """`latest` (written, synced, renamed) named checkpoints whose model, optimizer and rank files were never synced:
    a node lost soon after the commit left files cut short, and the resume refused the checkpoint. Every file and
    folder of each kept checkpoint is synced now, on 2 ranks (each rank's files by that rank); fsync is logged by a
    sitecustomize in every rank's process."""
    import subprocess

    from tests.conftest import CPU_ENV, torchrun

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SYNC_LOGGER)
    log = tmp_path / "fsync.log"
    run = tmp_path / "run"
    env = {**os.environ, **CPU_ENV, "FSYNC_LOG": str(log)}
    env["PYTHONPATH"] = os.pathsep.join((str(tmp_path / "site"), env["PYTHONPATH"]))
    args = cli_runs.train_args(synth, run, *backend, "data.val_shards=")[1:]
    proc = subprocess.run(torchrun(2, "-m", "toolkit", "train", *args), env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    synced = {path.removesuffix(".tmp") for path in log.read_text().splitlines()}  # DCP syncs, then renames
    kept = [p for p in (run / "checkpoints").iterdir() if p.is_dir()]
    assert len(kept) == 2
    everything = [str(p) for step in kept for p in [step, *step.rglob("*")]]
    missing = [p for p in everything if p not in synced]
    assert missing == [], "\n".join(missing)
    assert str(run / "checkpoints") in synced  # latest's rename


def test_a_filesystem_that_cannot_sync_a_folder_still_checkpoints(tmp_path, monkeypatch) -> None:
    """CIFS and some FUSE mounts answer a folder's fsync with EINVAL: the checkpoint's files were synced one by one,
    so that is no failure; a file's fsync error (EIO: its data may be lost) still is."""
    from toolkit.train import durable

    real_fsync = os.fsync
    folder, file = tmp_path / "step_1", tmp_path / "step_1" / "rank_0.pt"
    folder.mkdir()

    def picky_fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path == str(folder):
            raise OSError(errno.EINVAL, "Invalid argument")
        if path == str(file):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", picky_fsync)
    durable.sync_path(folder)  # no error
    with pytest.raises(OSError, match="Input/output error"):
        durable.save_synced({"x": 1}, file)
