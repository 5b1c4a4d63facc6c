"""Elastic-restart fault injection: launch/torchrun.sh (torchrun --max-restarts) trains, one rank is SIGKILLed.

Each try trains the tiny preset on 2 CPU ranks through the shipped launcher, waits until rank 0 has logged a
random step, SIGKILLs a random rank (found by the RANK in its environment), and lets torchrun restart the group.
The try passes when the job exits 0 within the timeout, metrics.jsonl holds every step exactly once, and every
step's loss and batch digest equal an uninterrupted run's. Used by tests/test_elastic.py; by hand:

    python tests/elastic_harness.py --backend fsdp --tries 10 --out /tmp/elastic
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

from conftest import CPU_ENV, free_port  # noqa: E402

BACKENDS = {
    "fsdp": ["backend.name=fsdp"],
    "zero2": ["backend.name=deepspeed", "backend.ds_config=ds_configs/zero2.json"],
}
STEPS = 10


def train_args(synth: Path, run: Path, backend: str) -> list[str]:
    return [
        "--config", "tiny", "backend.precision=fp32", "backend.device=cpu", f"model.tokenizer={synth / 'tokenizer'}",
        f"data.train_shards={synth / 'train'}", f"data.val_shards={synth / 'val'}", "data.num_workers=1",
        "data.shuffle_buffer=32", "train.batch_size=2",
        f"train.max_training_steps={STEPS}", "train.checkpoint_interval=2", "train.eval_interval=0",
        "train.export_best=false", "train.log_interval=1", f"train.run_dir={run}", *BACKENDS[backend],
    ]  # fmt: skip


def launch(args: list[str], *, max_restarts: int) -> subprocess.Popen:
    env = {**os.environ, **CPU_ENV, "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1", "PYTHON": sys.executable,
           "MASTER_PORT": str(free_port()), "MAX_RESTARTS": str(max_restarts),
           "RDZV_ID": f"elastic-{os.getpid()}-{time.time_ns()}"}  # fmt: skip
    cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip


def steps_logged(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line being written
            continue
        if "loss" in record:
            out.append(record)
    return out


def worker_pid(rank: int) -> int | None:
    """The live training process of `rank` (its environment says RANK=rank and that torchelastic started it)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
            cmdline = (entry / "cmdline").read_text()
        except (OSError, ValueError):
            continue
        ours = env.get("ELASTIC_HARNESS_PARENT") == str(os.getpid()) and "toolkit" in cmdline
        if ours and env.get("TORCHELASTIC_RUN_ID") and env.get("RANK") == str(rank):
            return int(entry.name)
    return None


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def one_try(synth: Path, run: Path, backend: str, *, seed: int, timeout_s: float, reference: list[dict]) -> dict:
    rng = random.Random(seed)
    kill_step, kill_rank = rng.randint(1, STEPS - 1), rng.randint(0, 1)
    os.environ["ELASTIC_HARNESS_PARENT"] = str(os.getpid())
    proc = launch(train_args(synth, run, backend), max_restarts=2)
    started, killed, outcome = time.monotonic(), None, {"seed": seed, "kill_step": kill_step, "kill_rank": kill_rank}
    while proc.poll() is None and time.monotonic() - started < timeout_s:
        if killed is None and len(steps_logged(run)) >= kill_step:
            pid = worker_pid(kill_rank)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed = len(steps_logged(run))
        time.sleep(0.05)
    hung = proc.poll() is None
    if hung:
        kill_group(proc)
    output = proc.communicate()[0]
    got = steps_logged(run)
    outcome.update(
        killed_after_step=killed,
        returncode=None if hung else proc.returncode,
        seconds=round(time.monotonic() - started, 1),
        steps=[r["step"] for r in got],
        same_losses=[r["loss"] for r in got] == [r["loss"] for r in reference],
        same_batches=[r["batch_digest"] for r in got] == [r["batch_digest"] for r in reference],
    )
    outcome["ok"] = (
        not hung
        and proc.returncode == 0
        and killed is not None
        and outcome["steps"] == list(range(1, STEPS + 1))
        and outcome["same_losses"]
        and outcome["same_batches"]
    )
    if not outcome["ok"]:
        outcome["output_tail"] = output[-6000:]
    return outcome


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", choices=sorted(BACKENDS), required=True)
    p.add_argument("--tries", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=240.0)
    p.add_argument("--synth", default="")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    synth = Path(a.synth) if a.synth else out / "synth"
    if not (synth / "train").exists():
        from toolkit.data.prepare.synthetic import write_synth

        write_synth(str(synth), samples=192, val_samples=8, seed=0)
    reference_run = out / f"{a.backend}-reference"
    if not steps_logged(reference_run):
        done = launch(train_args(synth, reference_run, a.backend), max_restarts=0)
        assert done.wait(timeout=a.timeout_s) == 0, done.communicate()[0][-4000:]
    reference = steps_logged(reference_run)
    results = []
    for i in range(a.tries):
        result = one_try(synth, out / f"{a.backend}-try{i}", a.backend, seed=a.seed * 1000 + i,
                         timeout_s=a.timeout_s, reference=reference)  # fmt: skip
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "output_tail"}), flush=True)
    (out / f"{a.backend}-results.json").write_text(json.dumps(results, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
