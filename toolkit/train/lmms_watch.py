"""lmms-eval while training: each train.lmms_interval export is scored in the background, logged at its step.

Every lmms_interval steps the Lifecycle exports the model (a collective) to run_dir/export/lmms_step_S, and rank 0
starts one scoring job for it and returns: training never waits for a score. A job is a shell script,
run_dir/lmms/step_S.sh, that runs `python -m toolkit eval --lmms-tasks ... --json-out run_dir/lmms/step_S.json`
and then writes its exit status to step_S.rc; its output goes to step_S.log. train.lmms_launcher=process runs the
script with bash on rank 0's node and device, beside training; slurm submits it with sbatch, one job per export
(nanoVLM's eval.slurm does the same per checkpoint).

Every step rank 0 looks at its outstanding jobs (a few stat calls) and logs a finished job's scores with
`writer.log(S, {"lmms/<task>/<metric>": value})` at the export's step S, however many later steps were logged
already. run_dir/lmms/ledger.json records each job (running, logged, failed), so a score is logged once, a job
that finished while the run was down is logged after the resume, and a process-launched job that died with the run
is started again from its export. A resume from step R forgets the jobs after R: those steps are trained, exported
and scored again, as metrics.jsonl forgets their lines. A failed job is a warning naming its log; it never stops
training. Other ranks take part in the export and nothing else.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from toolkit.config import TrainConfig
from toolkit.errors import UserError

log = logging.getLogger(__name__)

LEDGER = "ledger.json"
# What torchrun, DeepSpeed, MPI and SLURM tell a training rank about its group. A scorer that inherited them would
# take itself for a rank of that group (accelerate, inside lmms-eval, reads them): the job script unsets them.
GROUP_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
              "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE",
              "SLURM_PROCID", "SLURM_LOCALID", "NANOVLM_STOP_FILE")  # fmt: skip
GROUP_PREFIXES = ("TORCHELASTIC_", "OMPI_COMM_WORLD_", "PMI_", "PMIX_", "MV2_")
SCRIPT_NOTE = "# Run it again with bash or sbatch: the run logs its result at its next start (train.resume=auto)."
POLL_S = 1.0  # how often the end-of-training wait looks for results


@dataclass
class Job:
    """One export's scoring, as the ledger keeps it."""

    step: int
    launcher: str
    state: str = "queued"  # queued | running | logged | failed
    pid: int = 0  # process launcher: the job script's bash
    host: str = ""
    job_id: str = ""  # slurm launcher


def check_can_score(t: TrainConfig) -> None:
    """Refuse, before the first step, a run whose scorings could not start (every rank: a refusal on rank 0 alone
    would leave the others waiting in a collective). Called by preflight's check_run, before anything is written:
    a refusal leaves no run folder."""
    if importlib.util.find_spec("lmms_eval") is None:
        from toolkit.lmms import LMMS_MISSING

        raise UserError(f"train.lmms_tasks={t.lmms_tasks}: {LMMS_MISSING}")
    if t.lmms_launcher == "slurm" and shutil.which("sbatch") is None:
        raise UserError(
            "train.lmms_launcher=slurm submits each scoring with sbatch, which is not on PATH here; train where "
            "SLURM's commands are, or use train.lmms_launcher=process"
        )
    if t.lmms_include and not Path(t.lmms_include).is_dir():
        raise UserError(f"train.lmms_include={t.lmms_include} is not a folder (of lmms-eval task YAMLs)")


class LmmsWatch:
    """Rank 0's scoring jobs: start one per export, log each finished one at its step, once."""

    def __init__(self, t: TrainConfig, run_root: Path, *, writer, device: Any, rank: int, start_step: int) -> None:
        """start_step: the step training starts from (the resumed checkpoint's, or 0)."""
        self.t, self.writer = t, writer
        self.enabled = bool(t.lmms_interval and t.lmms_tasks.strip())
        self.active = self.enabled and rank == 0
        self.dir = Path(run_root).resolve() / "lmms"
        self.device = str(device) if t.lmms_launcher == "process" else "auto"
        self.jobs: dict[int, Job] = {}
        self.procs: dict[int, subprocess.Popen] = {}  # this session's process-launched jobs
        if not self.enabled:
            return  # check_can_score ran in preflight, before the run folder was made
        if self.active:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.jobs = self._load(start_step)
            self._revive()
            self.poll()  # scores that arrived while the run was down

    def due(self, step: int) -> bool:
        return self.enabled and step % self.t.lmms_interval == 0

    def path(self, kind: str, step: int) -> Path:
        return self.dir / f"step_{step}.{kind}"

    # -- ledger --
    def _load(self, start_step: int) -> dict[int, Job]:
        ledger = self.dir / LEDGER
        jobs = {int(s): Job(**j) for s, j in json.loads(ledger.read_text()).items()} if ledger.exists() else {}
        for step in [s for s in jobs if s > start_step]:  # to be trained, exported and scored again
            del jobs[step]
            for kind in ("json", "rc"):
                self.path(kind, step).unlink(missing_ok=True)
        self.jobs = jobs
        self._save()
        return jobs

    def _save(self) -> None:
        ledger = self.dir / LEDGER
        tmp = ledger.with_name(ledger.name + ".tmp")
        tmp.write_text(json.dumps({str(s): asdict(j) for s, j in sorted(self.jobs.items())}, indent=1))
        os.replace(tmp, ledger)

    def _revive(self) -> None:
        """A process-launched job of an earlier start that is gone without a result is queued again."""
        for step, job in sorted(self.jobs.items()):
            if job.state != "running" or job.launcher != "process" or _alive(job, self):
                continue
            if self._finished(step) is not None or self.path("json", step).exists():
                continue  # poll() logs it or reports its failure
            if self.path("sh", step).exists() and self.export_dir(step).is_dir():
                log.warning("lmms-eval scoring of step %d stopped with the run; starting it again", step)
                job.state = "queued"
            else:
                self._fail(step, f"it stopped with the run and its export {self.export_dir(step)} is gone")
        self._save()

    def export_dir(self, step: int) -> Path:
        return self.dir.parent / "export" / f"lmms_step_{step}"

    # -- starting --
    def launch(self, step: int, export: Path) -> None:
        """Score `export` (rank 0; other ranks return). The process launcher runs one job at a time (two models
        beside training's on one GPU is one too many): a later export waits in the queue, started by poll()."""
        if not self.active:
            return
        self.jobs[step] = Job(step, launcher=self.t.lmms_launcher, state="queued", host=socket.gethostname())
        try:
            for kind in ("json", "rc"):
                self.path(kind, step).unlink(missing_ok=True)
            self.path("sh", step).write_text(self.job_script(step, Path(export)))
        except OSError as exc:
            self._fail(step, f"its job script could not be written: {exc}")
            return
        if self.t.lmms_launcher == "slurm":
            self._start(step)  # the scheduler queues
        else:
            self._start_queued()
        self._save()

    def _start_queued(self) -> None:
        queued = [s for s, j in sorted(self.jobs.items()) if j.state == "queued"]
        if queued and not self._own_running():
            self._start(queued[0])

    def _start(self, step: int) -> None:
        """Run or submit step_S.sh; a job that cannot start is a warning."""
        job, script = self.jobs[step], self.path("sh", step)
        try:
            if job.launcher == "process":
                with open(self.path("log", step), "w") as out:
                    proc = subprocess.Popen(["bash", str(script)], stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)  # fmt: skip
                job.pid, job.host, self.procs[step] = proc.pid, socket.gethostname(), proc
            else:
                job.job_id = submit(script)
        except (OSError, subprocess.SubprocessError, UserError) as exc:
            self._fail(step, f"it could not start: {exc}")
            return
        job.state = "running"
        self._save()
        where = f"pid {job.pid}" if job.pid else f"SLURM job {job.job_id}"
        log.info("step %d: lmms-eval scoring started (%s), log %s", step, where, self.path("log", step))

    def job_script(self, step: int, export: Path) -> str:
        """The job: the scorer with the training group's variables unset, then its exit status to step_S.rc."""
        rc = shlex.quote(str(self.path("rc", step)))
        package_root = shlex.quote(str(Path(__file__).resolve().parents[2]))
        lines = [
            "#!/usr/bin/env bash",
            f"# lmms-eval scoring of training step {step}, written by {__name__}.",
            SCRIPT_NOTE,
        ]
        if self.t.lmms_launcher == "slurm":
            lines += slurm_header(self.dir.parent.name, step, self.path("log", step))
        lines += [
            f"cd {shlex.quote(os.getcwd())}",
            "unset " + " ".join(GROUP_VARS),
            f'for v in {" ".join(f"${{!{p}@}}" for p in GROUP_PREFIXES)}; do unset "$v"; done',
            f"export PYTHONPATH={package_root}${{PYTHONPATH:+:$PYTHONPATH}} TOKENIZERS_PARALLELISM=false",
            f"trap 'echo 143 > {rc}; exit 143' TERM",  # SLURM's cancel and time limit: a status, not silence
            shlex.join(self.eval_command(export, self.path("json", step))),
            "status=$?",
            f'echo "$status" > {rc}.tmp && mv {rc}.tmp {rc}',
            'exit "$status"',
        ]
        return "\n".join(lines) + "\n"

    def eval_command(self, export: Path, result: Path) -> list[str]:
        t = self.t
        cmd = [sys.executable, "-m", "toolkit", "eval", "--checkpoint", str(Path(export).resolve()),
               "--lmms-tasks", t.lmms_tasks, "--lmms-batch-size", str(t.lmms_batch_size), "--device", self.device,
               "--json-out", str(result)]  # fmt: skip
        if t.lmms_limit:
            cmd += ["--lmms-limit", str(t.lmms_limit)]
        if t.lmms_include:
            cmd += ["--lmms-include", str(Path(t.lmms_include).resolve())]
        return cmd

    # -- results --
    def poll(self) -> None:
        """Log every finished job's scores at its step; note failures. Cheap: a stat or two per running job."""
        if not self.active:
            return
        for step, job in sorted(self.jobs.items()):
            if job.state == "running":
                self._check(step)
        for step in [s for s, p in self.procs.items() if p.poll() is not None]:
            del self.procs[step]  # reaped
        self._start_queued()

    def _check(self, step: int) -> None:
        status = self._finished(step)  # read before the result: a job writes its result, then its status
        result = self.path("json", step)
        if result.exists():
            try:
                scores = json.loads(result.read_text())["scores"]
            except (OSError, ValueError, KeyError) as exc:
                self._fail(step, f"its result {result} is unreadable ({exc})")
                return
            flat = {f"lmms/{task}/{metric}": v for task, m in scores.items() for metric, v in m.items()}
            self.writer.log(step, flat)  # flat keys in metrics.jsonl too, as `report` reads them
            self.jobs[step].state = "logged"
            self._save()
            shown = "; ".join(
                f"{task} " + ", ".join(f"{k} {v:.4g}" for k, v in m.items()) for task, m in scores.items()
            )
            log.info("lmms-eval scores of step %d: %s", step, shown or "(no numeric metric)")
        elif status is not None:
            self._fail(step, f"it exited with status {status} without a result")

    def _finished(self, step: int) -> int | None:
        """The job's exit status once it ended (its rc file, else its bash's own status when that was killed)."""
        rc = self.path("rc", step)
        if rc.exists():
            try:
                return int(rc.read_text().strip() or -1)
            except ValueError:
                return -1
        proc = self.procs.get(step)
        return proc.returncode if proc is not None and proc.poll() is not None else None

    def _fail(self, step: int, why: str) -> None:
        self.jobs[step].state = "failed"
        self._save()
        log.warning("lmms-eval scoring of step %d failed: %s; see %s", step, why, self.path("log", step))

    def _own_running(self) -> list[int]:
        """This run's process-launched jobs whose process is still going."""
        return [s for s, p in self.procs.items() if p.poll() is None]

    def _own_pending(self) -> list[int]:
        """This run's process-launched jobs still to finish: running here or queued."""
        return sorted({*self._own_running(), *(s for s, j in self.jobs.items() if j.state == "queued")})

    def finish(self, *, wait: bool) -> None:
        """End of training. With `wait`, wait at most train.lmms_wait seconds for this run's process-launched jobs,
        so their scores reach metrics.jsonl; say where the rest will land."""
        if not self.active:
            return
        self.poll()
        if wait and self.t.lmms_wait > 0 and self._own_pending():
            log.info("waiting up to %d s for lmms-eval scoring of step(s) %s (logs in %s)", self.t.lmms_wait,
                     ", ".join(map(str, self._own_pending())), self.dir)  # fmt: skip
            deadline = time.monotonic() + self.t.lmms_wait
            while self._own_pending() and time.monotonic() < deadline:
                time.sleep(POLL_S)
                self.poll()
            self.poll()  # the last one may have ended after the loop's last look
        left = [s for s, j in sorted(self.jobs.items()) if j.state in ("running", "queued")]
        if left:
            log.warning(
                "lmms-eval scoring of step(s) %s not finished; results land in %s/step_S.json and are logged to "
                "metrics.jsonl when this run folder trains again (train.resume=auto)",
                ", ".join(map(str, left)),
                self.dir,
            )


def slurm_header(run_name: str, step: int, log_path: Path) -> list[str]:
    """One node, one GPU per scoring, like launch/train.slurm's header. Partition, account and time limit come from
    sbatch's own SBATCH_PARTITION, SBATCH_ACCOUNT and SBATCH_TIMELIMIT in the training job's environment."""
    return [
        f"#SBATCH --job-name=lmms-{run_name}-{step}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=8",
        f"#SBATCH --output={log_path}",
    ]


def submit(script: Path) -> str:
    """sbatch the job script; its SLURM job id."""
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise UserError(f"sbatch {script} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]


def _alive(job: Job, watch: LmmsWatch) -> bool:
    """An earlier start's job script still running here (its pid, on this host, running that script)."""
    if job.host != socket.gethostname() or job.pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{job.pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return str(watch.path("sh", job.step)) in cmdline
