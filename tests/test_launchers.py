"""launch/: the scripts stop their ranks cleanly on a signal, refuse bad arguments, and size the job they are in.

Real 2-rank CPU runs check what a signal to the launcher's pid does (every rank checkpoints the step it stopped
at and is gone, the launcher exits 0, the run resumes); stub programs on PATH (`srun`, `scontrol`, `pdsh`, the
interpreter) check the arguments a script passes on and what it refuses before starting anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.cli_runs import train_args, write_data
from tests.conftest import CPU_ENV, free_port

REPO = Path(__file__).resolve().parent.parent
MARK = "NANOVLM_LAUNCHER_TEST"  # in the environment of every process a test starts, to find the ones left behind


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("launchers") / "synth")


@pytest.fixture
def mark() -> str:
    """A token for this test's processes; any still alive at the end are killed (by pid) so none leak."""
    token = uuid.uuid4().hex
    yield token
    for pid in marked(token):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def marked(token: str) -> list[int]:
    """Live processes (not zombies) whose environment carries `token`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if f"{MARK}={token}".encode() in environ.split(b"\0") and state != "Z":
            pids.append(int(entry.name))
    return pids


def steps_logged(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if "loss" in record:
                steps.append(record["step"])
    return steps


def latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def launch(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """The launcher with SIGINT at its default (a test runner may ignore it) and its output in `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def signal_mid_run(proc: subprocess.Popen, run: Path, sig: int, log: Path, *, after: int = 2) -> int:
    """Send `sig` to the launcher once `after` steps are logged; its exit status (the test fails on a hang)."""
    deadline = time.monotonic() + 120
    while len(steps_logged(run)) < after:
        assert proc.poll() is None, f"the run ended before step {after}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no step {after} in 120 s:\n{log.read_text()[-4000:]}"
        time.sleep(0.1)
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the launcher did not end within 90 s of {signal.Signals(sig).name}:\n{log.read_text()[-4000:]}")


def assert_no_process_left(token: str) -> None:
    deadline = time.monotonic() + 5  # the ranks are gone before torchrun ends; a few seconds for the kernel
    while marked(token) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not marked(token), "processes of the run are still alive after the launcher ended"


def torchrun_env(token: str, **extra: str) -> dict:
    return {**os.environ, **CPU_ENV, MARK: token, "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "RDZV_ID": f"launchers-{token}", "PYTHON": sys.executable,
            "PREFLIGHT": "0", **extra}  # fmt: skip


def run_args(synth: Path, run: Path, steps: int, *extra: str) -> list[str]:
    """The tiny preset on 2 CPU ranks; one checkpoint only at the end (or at a stop), so `latest` tells which."""
    return train_args(synth, run, "train.checkpoint_interval=1000", *extra, steps=steps)[1:]


@pytest.mark.multiproc
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_torchrun_signal_stops_every_rank_at_a_checkpoint(sig, synth, tmp_path, mark):
    run, log = tmp_path / "run", tmp_path / "launcher.log"
    cmd = ["bash", "launch/torchrun.sh", *run_args(synth, run, 400, "backend.name=ddp")]
    proc = launch(cmd, torchrun_env(mark), log)
    status = signal_mid_run(proc, run, sig, log)
    output = log.read_text()
    assert status == 0, output[-4000:]
    assert "Traceback" not in output and "SignalException" not in output, output[-4000:]
    assert_no_process_left(mark)
    steps = steps_logged(run)
    assert 2 <= steps[-1] < 400 and steps == list(range(1, steps[-1] + 1))
    assert latest(run) == f"step_{steps[-1]}"  # the stop's own checkpoint, of the last step trained
    if sig != signal.SIGUSR1:
        return
    stopped = steps[-1]  # the same command, to a nearer end: resumes from that checkpoint and finishes
    cmd = ["bash", "launch/torchrun.sh", *run_args(synth, run, stopped + 2, "backend.name=ddp")]
    # ... on one node with no port given, while another job holds port 29500 (the default both met at: the second
    # waited on the first's rendezvous, then died): it takes a free port of its own
    env = {k: v for k, v in torchrun_env(mark).items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RDZV_ID")}
    with contextlib.ExitStack() as held:
        other = held.enter_context(socket.socket())
        with contextlib.suppress(OSError):  # 29500 in use already: as good
            other.bind(("127.0.0.1", 29500))
            other.listen()
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert steps_logged(run) == list(range(1, stopped + 3)) and latest(run) == f"step_{stopped + 2}"


@pytest.mark.multiproc
def test_torchrun_ctrl_c_still_stops_at_once(synth, tmp_path, mark):
    """SIGINT is not turned into a stop at the end of the run: torchrun gets it and ends the ranks."""
    run, log = tmp_path / "run", tmp_path / "launcher.log"
    cmd = ["bash", "launch/torchrun.sh", *run_args(synth, run, 400, "backend.name=ddp")]
    status = signal_mid_run(launch(cmd, torchrun_env(mark), log), run, signal.SIGINT, log)
    assert status != 0 and steps_logged(run)[-1] < 400, log.read_text()[-3000:]
    assert_no_process_left(mark)


@pytest.mark.multiproc
def test_deepspeed_sigterm_stops_every_rank_at_a_checkpoint(synth, tmp_path, mark):
    """One host (`localhost slots=2`) runs without ssh; SIGTERM killed the runner alone and the ranks trained on."""
    run, log, hostfile = tmp_path / "run", tmp_path / "launcher.log", tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    before = set((REPO / "runs").glob(".deepspeed-stop.*"))
    env = {**os.environ, **CPU_ENV, MARK: mark, "MASTER_PORT": str(free_port()), "PYTHON": sys.executable}
    proc = launch(["bash", "launch/deepspeed.sh", str(hostfile), *run_args(synth, run, 400)], env, log)
    status = signal_mid_run(proc, run, signal.SIGTERM, log)
    assert status == 0, log.read_text()[-4000:]
    assert_no_process_left(mark)
    steps = steps_logged(run)
    assert 2 <= steps[-1] < 400 and latest(run) == f"step_{steps[-1]}"
    assert set((REPO / "runs").glob(".deepspeed-stop.*")) == before  # its stop file's folder is removed


# Stubs: fake programs that write what they were given (and the stop file they see) to $STUB_RECORD.
RECORDER = """#!/usr/bin/env bash
{ printf '%s\\n' "$@"; echo "STOP_FILE=${NANOVLM_STOP_FILE:-}"; [ -e "${NANOVLM_STOP_FILE:-/nonexistent}" ] \\
  && echo STOP_FILE_EXISTED; } >>"$STUB_RECORD"
"""
WAITER = """
if [ -n "${STUB_WAIT:-}" ]; then  # stands for a run: ends (0) when the stop file appears
  for _ in $(seq 300); do [ -e "${NANOVLM_STOP_FILE:-/nonexistent}" ] && exit 0; sleep 0.1; done; exit 9
fi
"""


def stub(path: Path, body: str = RECORDER + WAITER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    path.chmod(0o755)
    return path


@pytest.fixture
def stubs(tmp_path) -> dict:
    """PATH with recording `ssh`, `pdsh`, `srun` and `scontrol` first, PYTHON a recording interpreter."""
    bin_dir = tmp_path / "bin"
    for name in ("ssh", "pdsh", "srun"):
        stub(bin_dir / name)
    # A long node list: a reader that stops at the first line (`head -n 1`) would end it with SIGPIPE.
    stub(bin_dir / "scontrol", "#!/usr/bin/env bash\necho node-a; for i in $(seq 20000); do echo node-$i; done\n")
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(stub(tmp_path / "python")),
            "STUB_RECORD": str(tmp_path / "record"), "NPROC_PER_NODE": "2", "PREFLIGHT": "0"}  # fmt: skip


def recorded(tmp_path: Path) -> list[str]:
    """What the stubs wrote, every call's arguments followed by its STOP_FILE= line."""
    record = tmp_path / "record"
    return record.read_text().splitlines() if record.exists() else []


def first_call(tmp_path: Path) -> list[str]:
    lines = recorded(tmp_path)
    return lines[: next(i for i, line in enumerate(lines) if line.startswith("STOP_FILE="))]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "usage: launch/deepspeed.sh HOSTFILE"),
        (["--config", "tiny"], "HOSTFILE '--config' is not a readable file"),
        (["no/such/hostfile", "--config", "tiny"], "HOSTFILE 'no/such/hostfile' is not a readable file"),
        (["{dir}", "--config", "tiny"], "is not a readable file"),
        (["{comments}", "--config", "tiny"], "lists no host"),
        (["{hostfile}", "--config", "tiny", "backend.name=fsdp"], "backend.name=fsdp conflicts"),
        (["{hostfile}", "backend.name='ddp'"], "backend.name='ddp' conflicts"),
    ],
    ids=["no-args", "config-first", "missing", "a-folder", "no-host", "fsdp", "quoted-ddp"],
)
def test_deepspeed_argument_errors_start_nothing(args, says, tmp_path, stubs):
    (tmp_path / "comments").write_text("# node-a slots=8\n\n")
    (tmp_path / "hostfile").write_text("node-x slots=8\n")  # remote: its ssh check would run were it reached
    args = [a.format(dir=tmp_path, comments=tmp_path / "comments", hostfile=tmp_path / "hostfile") for a in args]
    done = subprocess.run(["bash", "launch/deepspeed.sh", *args], cwd=REPO, env={**os.environ, **stubs},
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert recorded(tmp_path) == []  # no ssh, no DeepSpeed runner


def test_a_deepspeed_config_typo_fails_once_before_any_rank_starts(synth, tmp_path):
    """deepspeed.sh had no `train --check`: a typo printed its error once per rank of every host, after DeepSpeed
    had started them. Checked once for the hostfile's slots now: exit 2, one line, no rank started."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    args = [*run_args(synth, tmp_path / "run", 2), "train.max_step=5"]
    done = subprocess.run(["bash", "launch/deepspeed.sh", str(hostfile), *args], cwd=REPO,
                          env={**os.environ, **CPU_ENV, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("config error") == 1 and "train.max_training_steps" in done.stderr, done.stderr[-3000:]
    assert "deepspeed.launcher" not in done.stderr and not (tmp_path / "run").exists()


def test_deepspeed_passes_its_backend_and_the_users_own(tmp_path, stubs):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    for given in ([], ["backend.name=deepspeed"], ['backend.name="deepspeed"']):
        (tmp_path / "record").unlink(missing_ok=True)
        done = subprocess.run(["bash", "launch/deepspeed.sh", str(hostfile), "--config", "tiny", *given], cwd=REPO,
                              env={**os.environ, **stubs}, capture_output=True, text=True, timeout=30)  # fmt: skip
        assert done.returncode == 0, done.stderr
        args = first_call(tmp_path)
        assert args[:2] == ["-m", "deepspeed.launcher.runner"] and "--hostfile" in args
        train = args[args.index("--module") + 1 :]
        assert train[:4] == ["toolkit", "train", "--config", "tiny"] and train[-1] == "backend.name=deepspeed"


def test_deepspeed_on_several_hosts_exports_the_stop_file_and_stops_on_sigterm(tmp_path, stubs, mark):
    """Ranks on other hosts see only what DeepSpeed exports over pdsh: the stop file goes with the user's env file."""
    hostfile, env_file = tmp_path / "hostfile", tmp_path / "my_env"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two hosts, neither needs an ssh check
    env_file.write_text("GLOO_SOCKET_IFNAME=eth7\n")
    env = {**os.environ, **CPU_ENV, **stubs, MARK: mark, "PYTHON": sys.executable, "DS_ENV_FILE": str(env_file),
           "STUB_WAIT": "1"}  # fmt: skip
    proc = launch(["bash", "launch/deepspeed.sh", str(hostfile), "--config", "tiny"], env, tmp_path / "log")
    deadline = time.monotonic() + 60
    while not any(line.startswith("STOP_FILE=") for line in recorded(tmp_path)):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
        time.sleep(0.1)
    exports = next(line for line in recorded(tmp_path) if "export " in line)
    assert "export GLOO_SOCKET_IFNAME=eth7;" in exports, exports
    stop_file = exports.split("export NANOVLM_STOP_FILE=")[1].split(";")[0]
    assert not Path(stop_file).exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, (tmp_path / "log").read_text()[-3000:]  # pdsh ended when the file appeared
    assert not Path(stop_file).parent.exists()  # the launcher's own folder is removed


def test_torchrun_refuses_several_nodes_without_master_addr(tmp_path, stubs):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run(["bash", "launch/torchrun.sh", "--config", "tiny"], cwd=REPO,
                          env={**env, **stubs, "NNODES": "2"}, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 2 and "MASTER_ADDR" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert recorded(tmp_path) == []  # neither the check nor torchrun started
    env.update(stubs, NNODES="2", MASTER_ADDR="node-001", PREFLIGHT="0")
    done = subprocess.run(["bash", "launch/torchrun.sh", "--config", "tiny"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    args = first_call(tmp_path)
    assert done.returncode == 0 and "node-001:29500" in args and args[args.index("--nnodes") + 1] == "2"


def test_torchrun_stop_file_is_fresh_and_a_users_is_kept(tmp_path, stubs, mark):
    """The default stop file is new for every launch (an old one cannot stop a new run) and removed at the end; one
    the user names is not deleted at the start, and removed at the end only when the launcher's signal made it."""
    env = {**os.environ, **stubs, MARK: mark, "PREFLIGHT": "0"}
    names = []
    for _ in range(2):
        (tmp_path / "record").unlink(missing_ok=True)
        done = subprocess.run(["bash", "launch/torchrun.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=30)  # fmt: skip
        assert done.returncode == 0 and "STOP_FILE_EXISTED" not in recorded(tmp_path), done.stderr
        names.append(next(line for line in recorded(tmp_path) if line.startswith("STOP_FILE=")).split("=", 1)[1])
        assert names[-1] and not Path(names[-1]).parent.exists()
    assert names[0] != names[1]

    own = tmp_path / "shared" / "stop"
    own.parent.mkdir()
    own.touch()  # left there by the user: a warning, and it stays
    done = subprocess.run(["bash", "launch/torchrun.sh"], cwd=REPO, env={**env, "NANOVLM_STOP_FILE": str(own)},
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0 and "exists already" in done.stderr and own.exists()
    own.unlink()  # made by the launcher's trap: removed once the run has stopped
    (tmp_path / "record").unlink()
    log = tmp_path / "log"
    proc = launch(["bash", "launch/torchrun.sh"], {**env, "NANOVLM_STOP_FILE": str(own), "STUB_WAIT": "1"}, log)
    deadline = time.monotonic() + 30
    while not recorded(tmp_path) or "STOP_FILE=" + str(own) not in recorded(tmp_path):
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=30) == 0, log.read_text()
    assert not own.exists() and own.parent.exists()


def slurm_env(tmp_path: Path, stubs: dict, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "GPUS_PER_NODE"}
    return {**env, **stubs, "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "77",
            "SLURM_SUBMIT_DIR": str(tmp_path), "NANOVLM_STOP_FILE": str(tmp_path / "job.stop"), **extra}  # fmt: skip


@pytest.mark.parametrize(
    ("given", "ranks"),
    [
        ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "8"}, "4"),
        ({"SLURM_GPUS_PER_NODE": "a100:2"}, "2"),
        ({"SLURM_GPUS_PER_NODE": "3"}, "3"),
        ({"SLURM_GPUS_ON_NODE": "4", "GPUS_PER_NODE": "1"}, "1"),
        ({}, "8"),
    ],
    ids=["gpus-on-node", "typed-per-node", "per-node", "explicit-wins", "default"],
)
def test_slurm_starts_one_rank_per_allocated_gpu(given, ranks, tmp_path, stubs):
    # The preflight runs the submit folder's .venv/bin/python: a recorder here.
    stub(tmp_path / ".venv" / "bin" / "python")
    env = slurm_env(tmp_path, stubs, PREFLIGHT="1", **given)
    cmd = ["bash", str(REPO / "launch" / "train.slurm"), "--config", "tiny"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    args = recorded(tmp_path)
    assert args[args.index("--world") + 1] == str(2 * int(ranks))  # the preflight's world: 2 nodes
    assert args[args.index("--nproc_per_node") + 1] == ranks and args[args.index("--nnodes") + 1] == "2"
    assert args[args.index("--rdzv_endpoint") + 1] == "node-a:29500"  # the first node


def test_slurm_refuses_a_gpu_count_it_cannot_read(tmp_path, stubs):
    env = slurm_env(tmp_path, stubs, SLURM_GPUS_PER_NODE="a100:x")
    cmd = ["bash", str(REPO / "launch" / "train.slurm")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "GPUS_PER_NODE" in done.stderr and recorded(tmp_path) == []


def test_slurm_preemption_signal_becomes_the_stop_file(tmp_path, stubs, mark):
    log = tmp_path / "log"
    env = slurm_env(tmp_path, stubs, PREFLIGHT="0", STUB_WAIT="1", **{MARK: mark})
    proc = launch(["bash", str(REPO / "launch" / "train.slurm")], env, log)
    deadline = time.monotonic() + 30
    while not recorded(tmp_path):
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=30) == 0, log.read_text()  # srun's status, after the stop file ended it
    assert (tmp_path / "job.stop").exists()
    # The job is requeued (same id) or resubmitted with the same NANOVLM_STOP_FILE: the file the preemption left
    # must not stop the new attempt after one step.
    env.pop("STUB_WAIT")
    done = subprocess.run(["bash", str(REPO / "launch" / "train.slurm")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0 and "exists already" not in done.stderr, done.stderr
    assert not (tmp_path / "job.stop").exists()


def test_slurm_keeps_a_stop_file_someone_else_made(tmp_path, stubs):
    """One a user made (to stop the job at its first step) is kept with a warning, as the other launchers do; it
    was removed without a word."""
    (tmp_path / "job.stop").touch()
    env = slurm_env(tmp_path, stubs, PREFLIGHT="0")
    done = subprocess.run(["bash", str(REPO / "launch" / "train.slurm")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0 and "job.stop exists already" in done.stderr, done.stderr
    assert (tmp_path / "job.stop").exists()


def test_slurm_runs_the_python_it_is_given(tmp_path, stubs):
    """PYTHON (a venv on node-local disk, a container's) is what srun starts on every node, as in torchrun.sh and
    deepspeed.sh; the submit folder's .venv/bin/python when unset (train.slurm always ran that one)."""
    cmd = ["bash", str(REPO / "launch" / "train.slurm")]
    for given, expected in ((stubs["PYTHON"], stubs["PYTHON"]), (None, ".venv/bin/python")):
        env = slurm_env(tmp_path, stubs, PREFLIGHT="0")
        if given is None:
            env.pop("PYTHON")
        (tmp_path / "record").unlink(missing_ok=True)
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        args = first_call(tmp_path)  # srun's
        assert args[args.index("--kill-on-bad-exit=1") + 1] == expected
