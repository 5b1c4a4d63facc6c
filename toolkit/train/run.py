"""`python -m toolkit train`: one run's lifecycle around the loop.

Build (config checked first, then ranks, model, data, backend), resume from `latest`, then train with the
cadence of checkpoints, validation and exports. SIGTERM / SIGUSR1 (what schedulers send before preemption) and
the stop file named by $NANOVLM_STOP_FILE (see launch/train.slurm; one rank a node looks for it, once a second) ask
every rank to stop after the current step; the run then writes a checkpoint of that step and exits 0, and
`train.resume=auto` continues from it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.profiler import record_function

from toolkit import dist
from toolkit.config import Config, ConfigError, save_config
from toolkit.data.loader import sum_counts
from toolkit.model.attention import check_kernel
from toolkit.train import best_export
from toolkit.train.agreement import check_ranks_agree
from toolkit.train.checkpoint import (
    PendingCheckpoint,
    RunDir,
    export_live,
    finish_checkpoint,
    resolve_resume,
    restore_checkpoint,
    save_checkpoint,
    start_checkpoint,
)
from toolkit.train.lmms_watch import LmmsWatch
from toolkit.train.preflight import (
    ARCHITECTURE_FIELDS,
    check_resume,
    check_resume_files,
    check_run,
    derive_accumulation,
    saved_config,
)
from toolkit.train.profiling import StepProfiler
from toolkit.train.run_lock import RunLock
from toolkit.train.shared_folder import check_shared
from toolkit.train.trainer import Trainer, TrainerState
from toolkit.train.validation import validation_loss

STOP_FILE_ENV = "NANOVLM_STOP_FILE"
STOP_FILE_EVERY_S = 1.0  # the stop file is looked for at most this often: a stop comes at most this much later


class Lifecycle:
    """The per-step callback: checkpoint, validate and export on their intervals; watch for stop requests."""

    def __init__(self, cfg: Config, run: RunDir, *, backend, loader, tokenizer, writer, start_step: int = 0) -> None:
        self.cfg, self.run, self.backend, self.loader = cfg, run, backend, loader
        self.tokenizer, self.writer = tokenizer, writer
        self.saved_step = -1
        self.pending: PendingCheckpoint | None = None  # an async checkpoint not yet committed
        # One rank a node looks (a node-local stop file, launch/torchrun.sh's default, is seen on its node): its
        # request reaches every rank with the next step's loss all-reduce, as a signal to one rank does
        self.stop_file = os.environ.get(STOP_FILE_ENV) if backend.env.local_rank == 0 else None
        self.stop_looked = -math.inf  # time.monotonic() of the last look
        if self.stop_file and Path(self.stop_file).exists():  # a launcher's leftover stops every run after a step
            dist.log0("%s=%s exists before the first step, so the run stops after it: remove the file if an earlier "
                      "job left it", STOP_FILE_ENV, self.stop_file, level=logging.WARNING)  # fmt: skip
        self.lmms = LmmsWatch(cfg.train, run.root, writer=writer, device=backend.device, rank=backend.env.rank,
                              start_step=start_step)  # fmt: skip

    def __call__(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        t, step = self.cfg.train, trainer.state.step
        self.finish_pending(wait=False)  # commits a background checkpoint once every rank has written it
        self.watch_stop_file(trainer)
        if step % t.log_interval == 0 or step == t.max_training_steps:
            metrics["samples"] = self.data_counts()
        if (t.eval_interval and step % t.eval_interval == 0) or step == t.max_training_steps:
            with record_function("toolkit.validate"):  # named in a train.profile_steps trace
                metrics.update(self.validate(trainer))
        if t.checkpoint_interval and step % t.checkpoint_interval == 0:
            with record_function("toolkit.checkpoint"):
                self.checkpoint(trainer, background=t.async_checkpoint)
            self.watch_stop_file(trainer, now=True)
            trainer.agree_on_stop()  # a stop asked for during the save stops here, at the step just saved
        if t.export_interval and step % t.export_interval == 0:
            self.export(f"step_{step}")
        if self.lmms.due(step):  # export on every rank, then rank 0 starts the scoring and goes on
            self.export(f"lmms_step_{step}")
            self.lmms.launch(step, self.run.exports / f"lmms_step_{step}")
        self.lmms.poll()  # rank 0 logs scores that arrived, at their export's step

    def watch_stop_file(self, trainer: Trainer, *, now: bool = False) -> None:
        """Ask every rank to stop if the stop file exists; looked for at most every STOP_FILE_EVERY_S (`now`: at
        once, after a checkpoint). A stat from every rank at every step was 5,000 a second at 512 ranks and 10
        steps a second, for the whole run, on the shared filesystem's metadata server."""
        clock = time.monotonic()
        if not self.stop_file or (not now and clock - self.stop_looked < STOP_FILE_EVERY_S):
            return
        self.stop_looked = clock
        if Path(self.stop_file).exists():
            trainer.request_stop(f"the stop file {self.stop_file} ({STOP_FILE_ENV}) exists")

    def data_counts(self) -> dict[str, Any]:
        """Samples read and skipped by reason, summed over ranks (collective)."""
        return sum_counts(dist.all_gather_object(self.loader.counts()))

    def checkpoint(self, trainer: Trainer, *, background: bool = False) -> None:
        """Checkpoint this step (collective); `background` leaves the backend's write running while training goes
        on. A write still in flight is finished first: at most one checkpoint is being written at a time."""
        self.finish_pending(wait=True)
        step = trainer.state.step
        if step == self.saved_step:
            return
        kw = {"backend": self.backend, "loader": self.loader, "trainer_state": trainer.state_dict(),
              "keep": self.cfg.train.keep_checkpoints}  # fmt: skip
        if background:
            self.pending = start_checkpoint(self.run, step, **kw)
        else:
            save_checkpoint(self.run, step, **kw)
            dist.log0("checkpoint step %d written to %s", step, self.run.step_dir(step))
        self.saved_step = step

    def finish_pending(self, *, wait: bool) -> None:
        """Commit the background checkpoint if every rank's write is done (with `wait`: once it is)."""
        if self.pending is not None and finish_checkpoint(self.pending, wait=wait, device=self.backend.device):
            step = self.pending.step
            dist.log0("checkpoint step %d written to %s (in the background)", step, self.run.step_dir(step))
            self.pending = None

    def validate(self, trainer: Trainer) -> dict[str, Any]:
        """Validation loss on every rank; answer accuracy on rank 0 from a gathered copy (collective)."""
        if not self.cfg.data.val_shards:
            return {}
        result = validation_loss(self.backend, self.cfg, self.tokenizer, max_batches=self.cfg.train.eval_max_batches)
        loss = result.loss
        state: TrainerState = trainer.state
        best = loss < state.best_val_loss
        if best:
            state.best_val_loss, state.best_step = loss, state.step
        dist.log0("step %d: validation loss %.4f%s", state.step, loss, " (best so far)" if best else "")
        if best and self.cfg.train.export_best:
            self.export("best", notes={best_export.NOTE: best_export.note(state.step, loss)})
            if self.backend.env.is_main:
                best_export.drop_recomputed(self.run, state.step, loss)
        out: dict[str, Any] = {"val_loss": loss, "val_samples": result.samples}
        if self.cfg.train.eval_accuracy_samples:
            out["val_accuracy"] = self.accuracy()
        return out

    def accuracy(self) -> dict[str, float] | None:
        from toolkit.evaluate import answer_accuracy, iter_eval_samples
        from toolkit.model import VisionLanguageModel

        state = self.backend.full_state_dict()  # collective; None off rank 0
        table = None
        if state is not None:
            model = VisionLanguageModel(self.cfg.model).to(self.backend.device)
            model.load_state_dict(state)
            samples = iter_eval_samples(self.cfg.data.val_shards, caption_prompt=self.cfg.data.caption_prompt)
            acc, _ = answer_accuracy(model, self.tokenizer, samples, max_samples=self.cfg.train.eval_accuracy_samples)
            table = acc.table()
            dist.log0("answer accuracy: %s", ", ".join(f"{k} {v:.1%}" for k, v in table.items()))
        return dist.all_gather_object(table)[0]

    def export(self, name: str, notes: dict[str, dict] | None = None) -> None:
        tok_dir = self.cfg.model.tokenizer_path if Path(self.cfg.model.tokenizer_path).is_dir() else None
        export_live(self.backend, self.cfg.model, self.run.exports / name, tokenizer_dir=tok_dir, notes=notes)


def check_init_and_resume(cfg: Config, run: RunDir, resume_from: Path | None) -> None:
    """train.init_from starts a new stage; resuming continues one. The one case they meet is a restart (or a
    resubmission) of a stage that began with this same init_from: the run's own checkpoint then wins."""
    init = cfg.train.init_from
    if not init or resume_from is None:
        return
    if cfg.train.resume != "auto":
        raise ConfigError(
            f"train.init_from={init} starts a new stage from weights, train.resume={cfg.train.resume} continues a "
            "run: drop one (keep init_from for a new stage in a new train.run_dir, or resume to continue)"
        )
    saved = run.root / "config.yaml"
    started_from = saved_config(saved).get("train", {}).get("init_from", "")  # {} when there is none
    if Path(started_from or "/nonexistent").resolve() != Path(init).resolve():
        raise ConfigError(
            f"train.init_from={init} would start a new stage, but {run.root} already holds checkpoints of a run "
            f"that did not start from it; use a new train.run_dir for the new stage, or drop train.init_from "
            "to continue that run"
        )
    dist.log0("%s started from %s and has checkpoints: continuing it from %s", run.root, init, resume_from)


def _build(cfg: Config, backend, tokenizer, lock: RunLock | None = None, resume_from: Path | None = None):
    from toolkit.data.loader import build_loader
    from toolkit.model import VisionLanguageModel
    from toolkit.model.hub import load_backbones, load_weights_from
    from toolkit.train.optim import param_groups
    from toolkit.train.schedule import schedule_from_config

    env = backend.env
    backend.start_process_group()
    # Config, library versions, toolkit code and the checkpoint each rank found to resume: the same on every rank
    check_ranks_agree(cfg, env, engine=backend.libraries, resume_from=resume_from)
    if lock is not None:
        lock.claim()  # after the configs agree: every rank names the same folder
    check_shared(Path(cfg.train.run_dir), env)  # every node must see the checkpoints the others write
    if env.world_size > 1:  # before the model is built: a lost or cut file is named at once, on every rank
        check_resume_files(resume_from, backend, rank=env.rank, world=env.world_size)
    dist.seed_everything(cfg.train.seed)  # identical initial weights on every rank
    model = VisionLanguageModel(cfg.model)
    if cfg.model.vision_backbone or cfg.model.language_backbone:
        load_backbones(model)
    if cfg.train.init_from:  # before the backend shards the model: every rank loads the same full weights
        load_weights_from(model, cfg.train.init_from)
    loader = build_loader(cfg, rank=env.rank, world=env.world_size, tokenizer=tokenizer, split="train")
    backend.setup(model, param_groups(model, cfg.train), schedule_from_config(cfg.train))
    return loader


def adopt_init_architecture(cfg: Config) -> None:
    """train.init_from's folder decides the model's architecture (and its towers' names), as its weights do: every
    ARCHITECTURE_FIELDS value and vit/lm_model_type the preset or config file gave is replaced by the folder's
    config.json, and each change is logged. The run used to be refused with the overrides to paste (nanoVLM's
    checkpoint under the tiny preset: 4 fields). A field set on the command line is the user's and is kept;
    preflight refuses it if the folder differs. A folder that is not nanoVLM-format is left to preflight."""
    folder = Path(cfg.train.init_from)
    if not cfg.train.init_from or not all((folder / f).is_file() for f in ("config.json", "model.safetensors")):
        return
    from toolkit.model.hub import read_nanovlm_config

    saved = read_nanovlm_config(folder)
    adopted = []
    for name in (*ARCHITECTURE_FIELDS, "vit_model_type", "lm_model_type"):
        mine, theirs = getattr(cfg.model, name), getattr(saved, name)
        if mine != theirs and f"model.{name}" not in cfg.overridden:
            setattr(cfg.model, name, theirs)
            shown = f"({len(theirs)} tokens)" if isinstance(theirs, dict) else f"={json.dumps(theirs)}"
            adopted.append(f"model.{name}{shown}")
    if adopted:
        dist.log0("train.init_from=%s sets the architecture from its config.json: %s", folder, ", ".join(adopted))
    cfg.model.validate()
    _warn_other_vocabulary(folder, saved.tokenizer, cfg.model.tokenizer_path)


def _warn_other_vocabulary(folder: Path, theirs: str, mine: str) -> None:
    """The folder ships the tokenizer its weights learnt and the run reads another whose ids differ: it trained on
    silently re-mapped tokens (nanoVLM's fixture under the tiny preset's tokenizer: 125 of 384 ids). A change may
    be meant (a new tokenizer of the same size), so this warns."""
    if not theirs or not Path(theirs).is_dir() or not Path(mine).is_dir():
        return
    known = [_vocabulary(theirs), _vocabulary(mine)]
    if Path(theirs).resolve() == Path(mine).resolve() or None in known or known[0] == known[1]:
        return
    dist.log0("train.init_from=%s ships its tokenizer %s, whose ids differ from model.tokenizer=%s that this run "
              "reads: the weights learnt the folder's; set model.tokenizer=%s unless the change is meant", folder,
              theirs, mine, theirs, level=logging.WARNING)  # fmt: skip


def _vocabulary(folder: str) -> object:
    """tokenizer.json's vocabulary and added tokens (not its formatting), or None when it has none to read."""
    try:
        data = json.loads((Path(folder) / "tokenizer.json").read_text())
        return data["model"].get("vocab"), [(t.get("id"), t.get("content")) for t in data.get("added_tokens", [])]
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None


@dataclass
class Prepared:
    """What every check before a run leaves behind: nothing is started or written yet."""

    backend: Any
    tokenizer: Any
    run: RunDir
    resume_from: Path | None


def prepare_run(cfg: Config, env: dist.DistEnv, device: Any = None) -> Prepared:
    """Every check a run makes before it starts ranks or writes a file, on `env`'s world size."""
    from toolkit.train.backends import build_backend

    adopt_init_architecture(cfg)  # first: every check below reads the model's shapes
    derive_accumulation(cfg, env.world_size)  # train.global_batch_size on this many ranks
    backend = build_backend(cfg, env=env, device=device)  # backend name, its settings files; no process group
    m = cfg.model
    check_kernel(cfg.train.attention_kernel, _run_device(cfg, backend, checking=device is not None),
                 m.lm_hidden_dim // m.lm_n_heads, m.lm_dropout)  # fmt: skip
    tokenizer = check_run(cfg, env.world_size)  # every path and setting the run reads late, before it starts
    run = RunDir(cfg.train.run_dir)
    resume_from = resolve_resume(run, cfg.train.resume)
    check_init_and_resume(cfg, run, resume_from)
    # Architecture, backend and world size the checkpoint allows; its files in this one process only where no
    # process group will share them out (a one-rank run, `train --check`): `_build` checks them on many ranks
    check_resume(cfg, resume_from, backend, files=device is not None or env.world_size == 1)
    if resume_from is None and cfg.train.resume == "none" and (run.checkpoints / "latest").exists():
        raise FileExistsError(
            f"{run.root} already holds checkpoints; continue it with train.resume=auto or start a new train.run_dir"
        )
    return Prepared(backend, tokenizer, run, resume_from)


def _run_device(cfg: Config, backend, *, checking: bool) -> Any:
    """The device the run will train on, or None when `train --check` cannot know it: a CUDA run checked on a
    host without a GPU (a login node). A GPU node's check (the launchers' preflight) checks CUDA's rules: they
    were skipped on every host, so a forced kernel the run refuses passed `--check`."""
    import torch

    if not checking or cfg.backend.device == "cpu":
        return backend.device
    return torch.device("cuda") if torch.cuda.is_available() else None


def check_training(cfg: Config, world: int) -> str:
    """`train --check --world N`: the run's checks, once, for N ranks, without starting any. Launchers that
    restart a failed group (torchrun's --max_restarts) run it first, so a typo fails once, with status 2, instead
    of on every rank of every restart. Returns a one-line summary."""
    import torch

    env = dist.DistEnv(rank=0, local_rank=0, world_size=world, local_world_size=world)
    prepared = prepare_run(cfg, env, device=torch.device("cpu"))  # the checking host may have no GPU
    start = f"resumes from {prepared.resume_from}" if prepared.resume_from else "starts fresh"
    return (
        f"config ok for {world} ranks: backend {cfg.backend.name}, {cfg.train.gradient_accumulation_steps} "
        f"micro-steps of {cfg.train.batch_size} rows per rank a step; {prepared.run.root} {start}"
    )


def run_training(cfg: Config) -> list[dict[str, Any]]:
    # Unpacked at once: a Prepared left in this frame would keep the backend, and so the model, alive past the
    # `del` below (test_hardening's frees-its-model case)
    prepared = prepare_run(cfg, dist.dist_env())
    backend, tokenizer, run, resume_from = prepared.backend, prepared.tokenizer, prepared.run, prepared.resume_from
    del prepared
    loader, lock = None, RunLock(run.root)
    try:
        loader = _build(cfg, backend, tokenizer, lock, resume_from)
        history = _train(cfg, run, resume_from, backend=backend, loader=loader, tokenizer=tokenizer)
    finally:
        lock.release()
        backend.close()
        # The model, optimizer and loader go (with their reference cycles) while the interpreter is whole, and
        # with them the collectives' last work objects, before destroy_process_group, not in the teardown.
        del backend, loader
        gc.collect()
        dist.destroy_distributed()  # also after an error: an in-process caller can start another run
    return history


def _train(cfg: Config, run: RunDir, resume_from: Path | None, *, backend, loader, tokenizer) -> list[dict[str, Any]]:
    from toolkit.train.metrics import MetricsWriter, mfu_peak

    env = backend.env
    peak, no_mfu = mfu_peak(backend.device, cfg.backend.precision)
    if no_mfu:
        dist.log0("no mfu logged: %s", no_mfu)
    trainer = Trainer(backend, cfg, peak_flops=peak)
    if resume_from is not None:
        data = loader if cfg.train.resume_data else None  # None: the loader keeps its fresh start
        trainer.load_state_dict(restore_checkpoint(resume_from, backend=backend, loader=data))
        dist.log0("resumed from %s at step %d", resume_from, trainer.state.step)
        if data is None:
            dist.log0("train.resume_data=false: the data stream starts afresh from data.train_shards' first batch")
    else:
        dist.seed_everything(cfg.train.seed + env.rank)  # dropout differs across ranks, as in DDP training
    if env.is_main:  # only once the checkpoint loaded: a refused resume leaves the run's config.yaml as it was
        run.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.root / "config.yaml")
        best_export.set_aside_after_resume(run, trainer.state.step, trainer.state.best_val_loss)
    writer = MetricsWriter(
        run.root,
        rank=env.rank,
        total_steps=cfg.train.max_training_steps,
        log_interval=cfg.train.log_interval,
        resume_step=trainer.state.step,
        wandb_project=cfg.train.wandb_project,
        wandb_mode=cfg.train.wandb_mode,
        run_config=cfg.to_dict(),
    )
    trainer.writer = writer
    life = Lifecycle(cfg, run, backend=backend, loader=loader, tokenizer=tokenizer, writer=writer,
                     start_step=trainer.state.step)  # fmt: skip
    life.saved_step = trainer.state.step if resume_from is not None else -1
    t = cfg.train
    end = min(t.stop_at_step or t.max_training_steps, t.max_training_steps)  # never past the schedule's end
    profiler = StepProfiler(run.root / "profile", steps=t.profile_steps, skip=t.profile_start,
                            start_step=trainer.state.step, end=end,
                            rank=env.rank, device=backend.device)  # fmt: skip
    trainer.callbacks += [profiler.stop_due, life, profiler.start_due]  # the trace holds steps, not what follows
    dist.log0("training %s on %d rank(s), backend %s", cfg.train.run_dir, env.world_size, cfg.backend.name)
    try:
        with _stop_on_signals(trainer):
            history = trainer.fit(loader, max_steps=end)
            profiler.close(trainer.state.step)  # a run that ended inside the window: what was traced
            _finish(cfg, trainer, life)
        if env.is_main:  # one line for the job, not one per rank (512 alike at 512 GPUs); the last checkpoint was
            # collective, so every rank has trained to this step
            print(f"finished at step {trainer.state.step} on {env.world_size} rank(s)", flush=True)
    finally:
        profiler.discard()  # only an error leaves it open here
        writer.close()
    return history


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """SIGTERM and SIGUSR1 ask `trainer` to checkpoint and stop, for this run only.

    The previous handlers come back afterwards: a handler left installed kept the trainer, and through it the
    model, alive into the interpreter's own teardown (the likely cause of one FSDP rank's abort at exit,
    "terminate called without an active exception"), and every later run in the process kept its predecessor.
    """

    def stop(signum: int, _frame: Any) -> None:
        trainer.request_stop(f"{signal.Signals(signum).name} received")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _finish(cfg: Config, trainer: Trainer, life: Lifecycle) -> None:
    """Last checkpoint (also on a stop request) and where the best export is (the last step validated itself)."""
    done = trainer.state.step >= cfg.train.max_training_steps
    life.checkpoint(trainer)
    life.lmms.finish(wait=done)  # a stop request does not wait: the scores are logged after the resume
    if done and not math.isinf(trainer.state.best_val_loss):
        where = best_export.where_best_is(life.run, trainer.state.best_step) if cfg.train.export_best else ""
        dist.log0("best validation loss %.4f at step %d%s", trainer.state.best_val_loss, trainer.state.best_step, where)
