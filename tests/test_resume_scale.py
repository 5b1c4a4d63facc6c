"""A resume's reads of the shared filesystem grow with the ranks, not with their square.

Every rank checked every file of the checkpoint (each rank_R.pt, every model, ZeRO or DCP shard) and, on another
world size, read every saved rank_R.pt: at 512 ranks about two million metadata calls and 262,000 reads for one
resume. Each rank now checks and reads its share (files r, r+W, ...), and one all-gather brings every rank the
first failure or the states it needs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import cli_runs
import pytest
from cli_runs import train, write_data

from tests.conftest import CPU_ENV, REPO, torchrun
from toolkit import dist
from toolkit.train import file_checks
from toolkit.train.file_checks import FileCheck
from toolkit.train.safe_load import CheckpointFileError


def test_each_rank_checks_its_share_and_every_rank_raises_the_first_failure(tmp_path, monkeypatch):
    """Seven files on three ranks: each file checked once in all, and every rank raises what one process checking
    them in order raises (the first failing file, not the first one a rank happened to find)."""
    checked: list[tuple[int, str]] = []
    bad = {"f2": "cut", "f4": "lost", "f6": "cut"}

    def checks(rank: int) -> list[FileCheck]:
        def problem(file: Path) -> str | None:
            checked.append((rank, file.name))
            return bad.get(file.name)

        return [FileCheck(tmp_path / f"f{i}", "a test file", problem) for i in range(7)]

    with pytest.raises(CheckpointFileError) as alone:
        file_checks.check_files_shared(lambda: checks(0))
    assert alone.value.file.name == "f2" and alone.value.reason == "cut"
    checked.clear()
    shares = [file_checks._first_failure(lambda r=r: checks(r), r, 3) for r in range(3)]  # what each rank gathers
    # Once each; rank 2 stops at its first failure (f2), so f5 is never checked
    assert sorted(name for _, name in checked) == [f"f{i}" for i in (0, 1, 2, 3, 4, 6)]
    assert all(int(name[1:]) % 3 == rank for rank, name in checked)  # rank r: files r, r+3, ...
    monkeypatch.setattr(dist, "all_gather_object", lambda mine: shares)
    for rank in range(3):
        with pytest.raises(CheckpointFileError) as raised:
            file_checks.check_files_shared(lambda r=rank: checks(r), rank=rank, world=3)
        assert str(raised.value) == str(alone.value)


def test_a_list_that_cannot_be_built_fails_every_rank_with_its_file(tmp_path, monkeypatch):
    """DCP's .metadata (read to know the shards) unreadable on one rank: that rank still joins the all-gather,
    so the others raise its error instead of waiting in the collective."""

    def unreadable() -> list[FileCheck]:
        raise CheckpointFileError(tmp_path / ".metadata", "the shard layout", "the file is missing")

    shares = [None, file_checks._first_failure(unreadable, 1, 2)]
    monkeypatch.setattr(dist, "all_gather_object", lambda mine: shares)
    with pytest.raises(CheckpointFileError, match=r"\.metadata \(the shard layout\) cannot be read: the file is"):
        file_checks.check_files_shared(lambda: [], rank=0, world=2)


FILE_LOG = """
import builtins, os, threading, zipfile

_open, _is_zipfile, _inside = builtins.open, zipfile.is_zipfile, threading.local()


def _log(kind, path):
    with _open(os.environ["FILE_LOG"], "a") as out:
        out.write(f"{os.getpid()} {kind} {path}\\n")


def is_zipfile(filename):
    _log("check", filename)
    _inside.on = True
    try:
        return _is_zipfile(filename)
    finally:
        _inside.on = False


def logged_open(file, mode="r", *args, **kwargs):
    reading = isinstance(file, (str, os.PathLike)) and str(file).endswith(".pt") and "r" in mode
    if reading and not getattr(_inside, "on", False):
        _log("read", file)
    return _open(file, mode, *args, **kwargs)


zipfile.is_zipfile, builtins.open = is_zipfile, logged_open
"""


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory) -> tuple[Path, Path]:
    """Two DDP steps on one rank, a checkpoint after each: (data, run folder)."""
    synth = write_data(tmp_path_factory.mktemp("synth"))
    run = tmp_path_factory.mktemp("ddp") / "run"
    assert train(args(synth, run, steps=2)) == 0
    return synth, run


def args(synth: Path, run: Path, *, steps: int) -> list[str]:
    return cli_runs.train_args(synth, run, "backend.name=ddp", "data.val_shards=", steps=steps)


def resume_on_two_ranks(synth: Path, run: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """`train` resumed from `run` on 2 ranks for one more step; each file check and .pt read: (pid, kind, path)."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(FILE_LOG)
    log = tmp_path / "files.log"
    env = {**os.environ, **CPU_ENV, "FILE_LOG": str(log)}
    env["PYTHONPATH"] = os.pathsep.join((str(tmp_path / "site"), env.get("PYTHONPATH", str(REPO))))
    cmd = torchrun(2, "-m", "toolkit", *args(synth, run, steps=3))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return proc, [line.split(" ", 2) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.multiproc
def test_a_resume_on_two_ranks_checks_and_reads_each_file_once(one_rank_run, tmp_path):
    """A 1-rank checkpoint (rank_0.pt, model/state.pt) resumed on 2 ranks: each file is checked by one rank, and
    rank_0.pt (its data position and RNG state, which both ranks need on another world size) is read by one rank
    and shared. Before, each rank checked both files and read rank_0.pt itself."""
    synth, saved = one_rank_run
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    step = run / "checkpoints" / "step_2"
    proc, logged = resume_on_two_ranks(synth, run, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "finished at step 3 on 2 rank(s)" in proc.stdout
    checks = Counter(path for _, kind, path in logged if kind == "check" and path.startswith(str(step)))
    assert checks == {str(step / "rank_0.pt"): 1, str(step / "model" / "state.pt"): 1}, checks
    checkers = {pid for pid, kind, path in logged if kind == "check" and path.startswith(str(step))}
    assert len(checkers) == 2  # one file each
    reads = Counter(path for _, kind, path in logged if kind == "read" and path == str(step / "rank_0.pt"))
    assert reads == {str(step / "rank_0.pt"): 1}, reads


@pytest.mark.multiproc
def test_a_cut_file_checked_by_one_rank_stops_both_with_its_name(one_rank_run, tmp_path):
    """model/state.pt is rank 1's to check: rank 0 gets the failure through the all-gather, and both ranks say
    which checkpoint is damaged and which to resume instead, nothing built or written."""
    synth, saved = one_rank_run
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    state = run / "checkpoints" / "step_2" / "model" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    proc, _ = resume_on_two_ranks(synth, run, tmp_path)
    assert proc.returncode != 0
    said = f"checkpoint {state.parent.parent} is damaged: {state}"
    assert proc.stderr.count(said) == 2, proc.stderr[-4000:]
    assert proc.stderr.count(f"train.resume={run / 'checkpoints' / 'step_1'}") == 2
    assert max(cli_runs.logged(run)) == 2  # nothing trained past the checkpoint


# Each rank its own "node" (LOCAL_RANK 0 of 1); rank 1 with its own mount of FOLDER when BLIND is set: it sees an
# empty tmpfs where rank 0 sees train.run_dir, as a node whose run_dir is on its local disk would.
NODE_WORKER = """
import os, sys
os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
if os.environ["RANK"] == "1" and os.environ.get("BLIND"):
    mount = 'mount --make-rprivate / && mount -t tmpfs tmpfs "$0" && exec "$@"'
    os.execvp("unshare", ["unshare", "-m", "sh", "-c", mount, os.environ["BLIND"], sys.executable, "-m", "toolkit",
                          *sys.argv[1:]])
from toolkit.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def can_unshare_mounts() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount --make-rprivate / && mount -t tmpfs tmpfs /mnt"],
                           capture_output=True)  # fmt: skip
    return probe.returncode == 0


@pytest.mark.multiproc
@pytest.mark.skipif(not can_unshare_mounts(), reason="needs root and mount namespaces (unshare -m) to give one rank "
                    "its own view of a folder, as a node-local disk would")  # fmt: skip
def test_a_run_folder_one_node_cannot_see_is_refused_before_training(one_rank_run, tmp_path):
    """Two 'nodes' (a rank each); the second sees its own empty folder where the first writes train.run_dir (a
    node-local /tmp). Before, this trained to its first checkpoint and failed there with a bare "No such file or
    directory" for rank 1's file (measured). The same two nodes sharing the folder train."""
    synth, _ = one_rank_run
    (tmp_path / "worker.py").write_text(NODE_WORKER)
    env = {**os.environ, **CPU_ENV}
    for blind in (True, False):
        folder = tmp_path / ("local" if blind else "shared")
        folder.mkdir()
        run = folder / "run"
        env["BLIND"] = str(folder) if blind else ""
        cmd = torchrun(2, str(tmp_path / "worker.py"), *args(synth, run, steps=1))
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        if blind:
            assert proc.returncode != 0
            said = f"train.run_dir={run} is not one folder for every node: the first rank of 1 node(s) (rank 1 on"
            assert proc.stderr.count(said) == 2, proc.stderr[-4000:]
            assert not (run / "metrics.jsonl").exists() and not (run / ".node-probe").exists()
        else:
            assert proc.returncode == 0, proc.stderr[-4000:]
            assert max(cli_runs.logged(run)) == 1 and not (run / ".node-probe").exists()


@pytest.mark.multiproc
@pytest.mark.skipif(not can_unshare_mounts(), reason="needs root and mount namespaces (unshare -m) to give one rank "
                    "its own view of a folder, as a node-local disk would")  # fmt: skip
def test_ranks_that_find_different_checkpoints_to_resume_are_refused(one_rank_run, tmp_path):
    """train.resume=auto where one node sees the run's checkpoints and the other sees none: rank 0 would load step 2
    and rank 1 start fresh, then wait in different collectives. Every rank refuses, naming what each found."""
    synth, saved = one_rank_run
    (tmp_path / "worker.py").write_text(NODE_WORKER)
    folder = tmp_path / "local"
    run = folder / "run"
    shutil.copytree(saved, run)
    env = {**os.environ, **CPU_ENV, "BLIND": str(folder)}
    proc = subprocess.run(torchrun(2, str(tmp_path / "worker.py"), *args(synth, run, steps=3)), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    said = "the ranks found different checkpoints to resume from train.resume=auto (checkpoint: rank 0 on "
    assert proc.stderr.count(said) == 2, proc.stderr[-4000:]
    line = proc.stderr[proc.stderr.index(said) :].splitlines()[0]
    assert f"'{run / 'checkpoints' / 'step_2'}', rank 1 on " in line and "'None')" in line, line
    assert max(cli_runs.logged(run)) == 2  # nothing trained


@pytest.mark.multiproc
def test_a_rank_file_that_fails_only_where_it_is_read_stops_every_rank_with_its_error(one_rank_run, tmp_path):
    """rank_1.pt rewritten as a whole torch file that holds a Python object beyond plain data (it passes the zip
    check; only rank 1 reads it): rank 1 refused it and rank 0 went on to its next collective, where it failed with
    'another rank stopped first'. Both ranks now give the refusal, naming the file."""
    import datetime

    import torch

    synth, _ = one_rank_run
    run = tmp_path / "run"
    done = subprocess.run(torchrun(2, "-m", "toolkit", *args(synth, run, steps=2)), cwd=REPO,
                          env={**os.environ, **CPU_ENV}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    rank_file = run / "checkpoints" / "step_2" / "rank_1.pt"
    torch.save({"loader": None, "rng": datetime.date(2026, 1, 1)}, rank_file)
    proc, _ = resume_on_two_ranks(synth, run, tmp_path)
    assert proc.returncode != 0
    assert (
        proc.stderr.count(f"{rank_file}") >= 2 and proc.stderr.count("holds Python objects, not only tensors") == 2
    ), proc.stderr[-4000:]
    assert "another rank stopped first" not in proc.stderr
