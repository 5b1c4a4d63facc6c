"""Run folder layout, atomic `latest`, keep-last-k, and per-rank loader/RNG state.

    runs/NAME/config.yaml                resolved config
    runs/NAME/checkpoints/step_N/        backend-native sharded state + trainer.json + rank_R.pt (loader, RNG)
    runs/NAME/checkpoints/latest         name of the newest complete checkpoint, written last by rank 0
    runs/NAME/export/step_N/             nanoVLM format
    runs/NAME/tb/, runs/NAME/metrics.jsonl

A checkpoint is complete only once `latest` names it: `latest` is replaced atomically (write + fsync + rename)
after a barrier that every rank reaches only when its own files are written and synced to the disk (durable.py:
a node lost just after a commit cannot leave `latest` naming files still in its page cache). A run killed mid-save
therefore resumes from the previous checkpoint, and a half-written step_N is overwritten on the next save.

With train.async_checkpoint the backend writes its shards in the background (`start_checkpoint`) while training
goes on; the small per-rank files are written at once. `finish_checkpoint` then asks every rank, after each step,
whether its write is done, and commits (trainer.json, then `latest`) only when all are: a run killed before that
resumes from the previous checkpoint, exactly as a run killed during a synchronous save.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.config import ConfigError
from toolkit.errors import OtherRankFailed, UserError
from toolkit.train.durable import save_synced, sync_path, write_text_synced
from toolkit.train.file_checks import FileCheck, zip_problem
from toolkit.train.safe_load import CheckpointFileError, WeightsMismatchError, load_plain, weights_mismatch
from toolkit.train.schedule import apply_recipe, recipe_of
from toolkit.train.write_errors import explain_write, resume_note

log = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step_(\d+)$")
RESUME_FORMS = (
    "auto (this train.run_dir's latest checkpoint, if any), none (start fresh), a run folder (its latest "
    "checkpoint) or one checkpoint folder RUN/checkpoints/step_N"
)


class DamagedCheckpointError(UserError):
    """A checkpoint with a missing or unreadable file; the message names the file and the checkpoints kept beside
    it, which are what a user resumes (or exports) from instead."""


@dataclass
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def exports(self) -> Path:
        return self.root / "export"

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step}"

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None when the run has none."""
        pointer = self.checkpoints / "latest"
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        target = self.checkpoints / name
        if not name or not (target / "trainer.json").exists():
            raise DamagedCheckpointError(
                f"{pointer} names {name or 'nothing'!r}, which is not a complete checkpoint (no trainer.json); "
                + alternatives(self.checkpoints, target, verb="resume")
            )
        return target


def kept_checkpoints(checkpoints: Path) -> list[Path]:
    """The complete (trainer.json written) step_N folders under `checkpoints`, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "trainer.json").is_file()]


def alternatives(checkpoints: Path, bad: Path, *, verb: str) -> str:
    """What to do instead of using `bad`: the newest other kept checkpoint (before it when there is one), by the
    setting (`verb` resume) or command (export) that takes it, with the list of what is kept."""
    others = [p for p in kept_checkpoints(checkpoints) if p.resolve() != bad.resolve()]
    if not others:
        return (
            f"{checkpoints} keeps no other complete checkpoint: put the file back from a copy, or start a new "
            "train.run_dir (train.init_from=<an export of this run> keeps its weights)"
        )
    bad_step = int(m.group(1)) if (m := STEP_RE.match(bad.name)) else None
    earlier = [p for p in others if bad_step is None or int(STEP_RE.match(p.name).group(1)) < bad_step]
    pick = (earlier or others)[-1]
    how = f"train.resume={pick}" if verb == "resume" else f"`python -m toolkit export {pick} OUT`"
    return f"use a kept checkpoint instead: {how} (kept: {', '.join(p.name for p in others)})"


def damaged(exc: CheckpointFileError, ckpt: Path, *, verb: str) -> DamagedCheckpointError:
    """`exc` (one file of `ckpt`) as the error a user sees: which checkpoint, and which kept one to use instead."""
    return DamagedCheckpointError(f"checkpoint {ckpt} is damaged: {exc}; {alternatives(ckpt.parent, ckpt, verb=verb)}")


def read_trainer_meta(path: Path) -> dict[str, Any]:
    """step_N/trainer.json: which backend and world size wrote the checkpoint, and the trainer's state.
    Written last by a save, so a damaged one is a disk or copy problem; the error names the file."""
    file = path / "trainer.json"
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFileError(file, "the checkpoint's backend, world size and trainer state", str(exc)) from exc
    missing = [k for k in ("backend", "world_size", "trainer") if not isinstance(meta, dict) or k not in meta]
    if missing:
        reason = f"it has no {', '.join(missing)} (not written by nanoVLM-scale, or edited)"
        raise CheckpointFileError(file, "the checkpoint's backend, world size and trainer state", reason)
    return meta


def rng_state() -> dict[str, Any]:
    """Every generator's state as plain data (tensors, numbers, tuples), so it loads with weights_only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos}
    numpy_state.update(has_gauss=has_gauss, cached_gaussian=gauss)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    if isinstance(saved, dict):
        keys = saved["keys"].numpy().astype(np.uint32)
        saved = (saved["kind"], keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"])
    np.random.set_state(saved)  # a tuple with a numpy array: checkpoints written before the plain format
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def prepare_step_dir(path: Path) -> None:
    """Rank 0, before anyone writes: leftovers of saves that were killed or failed (step folders without
    trainer.json) are removed first, this step's and every other. A save that failed on a full disk left its
    half-written step behind, and the next save after a restart failed again for want of that room."""
    run = RunDir(path.parent.parent)
    for _, leftover in _step_dirs(run):  # never `latest`: it names a complete step only
        if not (leftover / "trainer.json").exists():
            shutil.rmtree(leftover, ignore_errors=True)
    if path.exists():  # a complete checkpoint of a branch the run left (it resumed from an earlier step)
        shutil.rmtree(path)
    path.mkdir(parents=True)


def write_rank_state(path: Path, rank: int, loader_state: dict | None) -> None:
    save_synced({"loader": loader_state, "rng": rng_state()}, path / f"rank_{rank}.pt")


def resume_file_checks(path: Path, meta: dict, *, backend) -> list[FileCheck]:
    """Every file a resume of `path` reads, to check before it reads any: each rank file trainer.json implies,
    a whole zip archive (torch.save's format, checked from its end record), then the backend's own files. A file
    that failed only on the rank that reads it would leave the other ranks waiting in their next collective."""
    world = int(meta["world_size"])
    lost = functools.partial(zip_problem, missing=f"the file is missing (trainer.json records {world} rank(s), "
                             "each writes its own)")  # fmt: skip
    checks = [FileCheck(path / f"rank_{r}.pt", "a rank's data-loader and RNG state", lost) for r in range(world)]
    own = getattr(backend, "file_checks", None)  # single/ddp, fsdp and deepspeed know their files
    return checks + (own(path / "model") if own is not None else [])


def read_rank_state(path: Path, rank: int, saved_world: int | None = None) -> dict:
    """rank_R.pt; `saved_world` (from trainer.json) tells a file lost from the checkpoint from a rank the
    checkpoint never had."""
    file = path / f"rank_{rank}.pt"
    what = "this rank's data-loader and RNG state"
    if not file.exists():
        if saved_world is not None and rank < saved_world:
            reason = f"the file is missing (the checkpoint was written by {saved_world} rank(s), each writes its own)"
            raise CheckpointFileError(file, what, reason)
        saved = sorted(p.name for p in path.glob("rank_*.pt"))
        raise FileNotFoundError(
            f"{file} is missing: the checkpoint was written by {len(saved)} ranks ({', '.join(saved) or 'no files'}). "
            "Resume with the same number of ranks (a reshardable backend's model reshards, the data stream does not)"
        )
    return load_plain(file, what=what)


def commit(run: RunDir, step: int, trainer_state: dict, keep: int) -> None:
    """Rank 0, after every rank finished writing: mark step_N complete, point `latest` at it, prune old ones."""
    path = run.step_dir(step)
    write_text_synced(path / "trainer.json", json.dumps(trainer_state, indent=1))
    for folder, _, _ in os.walk(path):  # the names of every rank's files (os.walk: no stat per file)
        sync_path(folder)
    tmp = run.checkpoints / "latest.tmp"
    write_text_synced(tmp, path.name)
    os.replace(tmp, run.checkpoints / "latest")
    sync_path(run.checkpoints)  # the rename
    prune(run, keep)


def prune(run: RunDir, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints up to the one `latest` names (never that one); drop incomplete
    leftovers. A complete checkpoint after `latest` is of a branch the run left when it resumed from an earlier step:
    it is kept, and does not count. Counting it kept that branch's step_30 and deleted the new branch's step_24."""
    latest = run.latest()
    top = int(STEP_RE.match(latest.name).group(1)) if latest is not None else None
    steps = _step_dirs(run)
    complete = [p for n, p in steps if (p / "trainer.json").exists() and (top is None or n <= top)]
    doomed = set(complete[:-keep]) | {p for _, p in steps if not (p / "trainer.json").exists()}
    for p in doomed:
        if latest is None or p != latest:
            shutil.rmtree(p, ignore_errors=True)


def _step_dirs(run: RunDir) -> list[tuple[int, Path]]:
    """The run's step_N folders, complete or not, by step."""
    steps = []
    for p in run.checkpoints.iterdir() if run.checkpoints.is_dir() else ():
        m = STEP_RE.match(p.name)
        if m and p.is_dir():
            steps.append((int(m.group(1)), p))
    return sorted(steps)


def _locate(path: Path) -> Path | None:
    """A run folder, its checkpoints/ folder or one complete step_N -> that checkpoint; None when it is none."""
    if (path / "checkpoints" / "latest").exists():  # a run folder
        return RunDir(path).latest()
    if (path / "latest").exists():  # its checkpoints/ folder
        return RunDir(path.parent).latest()
    return path if (path / "trainer.json").exists() else None


def resolve_resume(run: RunDir, resume: str) -> Path | None:
    """train.resume: 'auto' -> latest if any, 'none' -> fresh, else a run folder or one checkpoint folder.
    A value that is none of these is a ConfigError listing the accepted forms (`latest` is a guess people make)."""
    if resume == "none":
        return None
    if resume == "auto":
        return run.latest()
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"train.resume={resume}: no such file or folder; give {RESUME_FORMS}")
    found = _locate(path)
    if found is None:
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():  # nanoVLM's format
            raise ConfigError(
                f"train.resume={resume} is a nanoVLM-format model (an export, or nanoVLM's own checkpoint), which "
                f"holds weights only: start from it with train.init_from={resume} (optimizer, schedule and data "
                "start fresh)"
            )
        what = "an incomplete checkpoint (no trainer.json: its save never finished)" if STEP_RE.match(path.name) \
            else "neither a run folder with checkpoints nor a checkpoint folder"  # fmt: skip
        raise ConfigError(f"train.resume={resume} is {what}; give {RESUME_FORMS}")
    return found


# ---------------------------------------------------------------- collective save / restore / export


def save_checkpoint(run: RunDir, step: int, *, backend, loader, trainer_state: dict, keep: int) -> Path:
    """Every rank: backend shards, then its loader and RNG state; rank 0 marks it complete last."""
    pending = start_checkpoint(run, step, backend=backend, loader=loader, trainer_state=trainer_state, keep=keep,
                               background=False)  # fmt: skip
    finish_checkpoint(pending, wait=True, device=backend.device)
    return run.step_dir(step)


@dataclass
class PendingCheckpoint:
    """A checkpoint whose backend shards are still being written; committed by `finish_checkpoint`."""

    run: RunDir
    step: int
    meta: dict
    keep: int
    write: Any  # the backend's PendingSave


def start_checkpoint(
    run: RunDir, step: int, *, backend, loader, trainer_state: dict, keep: int, background: bool = True
) -> PendingCheckpoint:
    """Every rank: write (with `background`, stage and start writing) the backend state; loader and RNG state are
    written now either way (they are small, and the loader moves on with the next batch).

    A write that fails for want of disk space or permission raises a UserError saying so (`explain_write`)."""
    from toolkit import dist
    from toolkit.train.backends.base import PendingSave

    env = backend.env
    path = run.step_dir(step)
    with explain_write(run, step, keep=keep):
        if env.is_main:
            prepare_step_dir(path)
        dist.barrier()
        # The small per-rank state first: once the backend's write runs in the background, a rank killed meanwhile
        # still leaves a complete rank file (and the order cannot race with the writer thread).
        write_rank_state(path, env.rank, loader.state_dict() if loader is not None else None)
        client_state = {"step": step}
        if background:
            write = backend.save_async(path / "model", client_state=client_state)
        else:
            backend.save(path / "model", client_state=client_state)
            write = PendingSave()  # written already
    meta = {"backend": backend.name, "world_size": env.world_size, **backend.checkpoint_meta()}
    meta["trainer"] = dict(trainer_state)
    return PendingCheckpoint(run, step, meta, keep, write)


def finish_checkpoint(pending: PendingCheckpoint, *, wait: bool, device: torch.device) -> bool:
    """Collective: commit `pending` if every rank's write is done (or, with `wait`, once it is); True if committed.

    One all-reduce of two numbers per call (ranks still writing, ranks whose write failed), made only while a write
    is in flight. A write that failed raises here on its rank (a UserError when the disk is full or not writable),
    and OtherRankFailed on the others: the checkpoint is committed only when every rank wrote its part.
    """
    from toolkit import dist

    failure: BaseException | None = None
    finished = wait or pending.write.done()
    if finished:
        try:
            pending.write.wait()  # done (or `wait`): re-raises the writer's error, if any
        except BaseException as exc:  # DCP's CheckpointException derives from BaseException
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            failure = exc
    status = torch.tensor([0.0 if finished else 1.0, 0.0 if failure is None else 1.0], dtype=torch.float64,
                          device=device)  # fmt: skip
    busy, failed = (float(x) for x in dist.all_reduce_sum(status))
    if failure is not None:
        with explain_write(pending.run, pending.step, keep=pending.keep):
            raise failure
    if failed > 0:
        raise OtherRankFailed(
            f"checkpoint step {pending.step}: {int(failed)} other rank(s) failed to write their part (their logs "
            f"say why), so it was not committed; {resume_note(pending.run)}"
        )
    if busy > 0:
        return False
    if dist.get_rank() == 0:
        with explain_write(pending.run, pending.step, keep=pending.keep):
            commit(pending.run, pending.step, pending.meta, pending.keep)
    dist.barrier()
    return True


def restore_checkpoint(path: Path, *, backend, loader) -> dict:
    """Every rank: model/optimizer/schedule, then loader and RNG state; returns the saved trainer state.

    A reshardable backend's model and optimizer load onto a different number of ranks; the data stream cannot be
    resharded, so on a different world size the loader starts a fresh pass (logged) and RNG comes from rank 0's.
    """
    try:
        return _restore(path, backend=backend, loader=loader)
    except CheckpointFileError as exc:  # a file read failed: which checkpoint, and which to use instead
        raise damaged(exc, path, verb="resume") from exc


def check_resumable(path: Path, meta: dict, *, backend) -> None:
    """The checkpoint's backend and world size against this run's (preflight calls it before anything starts)."""
    from toolkit.train.backends import BACKENDS, backend_class

    saved_world, world = meta["world_size"], backend.env.world_size
    fmt = backend.checkpoint_format
    same_files = fmt != "" and meta["backend"] in BACKENDS and backend_class(meta["backend"]).checkpoint_format == fmt
    if meta["backend"] != backend.name and not same_files:  # single <-> ddp: the same files
        raise ConfigError(
            f"backend.name={backend.name}, but the checkpoint to resume ({path}) was written by backend "
            f"{meta['backend']}; resume with backend.name={meta['backend']}, or start a new train.run_dir with "
            "train.init_from=<an export of this run> to switch backends"
        )
    if saved_world != world and not backend.capabilities.reshardable:
        stage = getattr(backend, "stage", None)
        which = f"{backend.name} with ZeRO-{stage}" if stage is not None else f"backend {backend.name}"
        which += " and NVMe offload" if stage in (1, 2, 3) else ""  # ZeRO-1-3 reshard unless offloaded to NVMe
        raise ConfigError(
            f"{path} was written by {saved_world} ranks and this run has {world}; {which} cannot reshard its "
            f"checkpoint: resume on {saved_world} ranks"
        )
    check = getattr(backend, "check_resumable", None)  # what else of the backend's own must match (ZeRO's stage)
    if check is not None:
        check(path, meta)


def _restore(path: Path, *, backend, loader) -> dict:
    """restore_checkpoint's reads, in order; a file that fails raises CheckpointFileError naming it."""
    from toolkit import dist

    meta = read_trainer_meta(path)
    saved_world, world = meta["world_size"], backend.env.world_size
    check_resumable(path, meta, backend=backend)
    recipe = recipe_of(backend.optimizer, backend.scheduler)
    backend.load(path / "model")
    changed = apply_recipe(backend.optimizer, backend.scheduler, recipe)
    if changed:  # the config is the run's: config.yaml says so, and the schedule is planned from it
        dist.log0("resumed with this config's optimizer settings, not the checkpoint's: %s", "; ".join(changed))
    if saved_world == world:
        rank_state = read_agreed(lambda: read_rank_state(path, backend.env.rank, saved_world), share=False)[0]
        if loader is not None and rank_state["loader"] is not None:
            loader.load_state_dict(rank_state["loader"])
    else:  # every saved rank's data position, and rank 0's RNG state, on every rank
        saved = read_rank_states_shared(path, saved_world, rank=backend.env.rank, world=world)
        rank_state = saved[0]
        if loader is not None:
            _reshard(loader, [state["loader"] for state in saved if state["loader"] is not None], saved_world, world)
    restore_rng(rank_state["rng"], rank=backend.env.rank, own=saved_world == world)
    return meta["trainer"]


def _reshard(loader, saved: list[dict], saved_world: int, world: int) -> None:
    from toolkit import dist

    if loader.reshard(saved):
        dist.log0("resumed %s ranks -> %s: the data continues at the next global row", saved_world, world)
    else:
        dist.log0(
            "resumed %s ranks -> %s: the data stream starts a new pass (set data.virtual_readers for a global order "
            "that reshards)",
            saved_world,
            world,
            level=logging.WARNING,
        )


def read_rank_states_shared(path: Path, saved_world: int, *, rank: int, world: int) -> list[dict]:
    """Every saved rank_R.pt on every rank (collective): rank r reads files r, r+W, ... and one all-gather shares
    them (each rank read every file: 262,000 reads of the shared filesystem for a 512-rank resume). A file that
    fails on the rank reading it fails every rank alike, with its name."""

    def my_share() -> dict[int, dict]:
        return {r: read_rank_state(path, r, saved_world) for r in range(rank, saved_world, world)}

    merged: dict[int, dict] = {}
    for states in read_agreed(my_share, share=True):
        merged.update(states)
    return [merged[r] for r in range(saved_world)]


def read_agreed(read: Callable[[], Any], *, share: bool) -> list[Any]:
    """`read()` on every rank (collective): with `share`, every rank's result in rank order, else [this rank's].
    A read that fails on some ranks only (a garbled file that passed the zip check, a file holding code) fails
    every rank with the same error, the lowest failing rank's: the others waited in their next collective."""
    try:
        mine, failure = read(), None
    except UserError as exc:
        mine, failure = None, exc
    from toolkit import dist

    gathered = dist.all_gather_object((mine if share else None, failure))
    failed = next((f for _, f in gathered if f is not None), None)
    if failed is not None:
        raise failed
    return [m for m, _ in gathered] if share else [mine]


def restore_rng(state: dict[str, Any], *, rank: int, own: bool) -> None:
    """This rank's saved generators; after a world-size change every rank read rank 0's, so the rank is folded in
    (a seed drawn from that state, plus the rank): otherwise every rank drew the same dropout masks."""
    set_rng_state(state)
    if not own:
        from toolkit import dist

        dist.seed_everything(int(torch.randint(2**62, (1,)).item()) + rank)


def export_live(
    backend, model_cfg, out: Path, *, tokenizer_dir: str | None = None, notes: dict[str, dict] | None = None
) -> None:
    """Collective: gather the full fp32 weights on rank 0 (parameter by parameter, never the optimizer state)
    and write nanoVLM's format atomically (a temp folder renamed into place). `notes`: JSON files written
    into the folder with the weights (file name -> value)."""
    from toolkit import dist
    from toolkit.model.hub import write_nanovlm

    def write(tmp: Path) -> None:
        write_nanovlm(model_cfg, state, tmp, tokenizer_dir=tokenizer_dir)
        for name, value in (notes or {}).items():
            (tmp / name).write_text(json.dumps(value))

    state = backend.full_state_dict()
    if backend.env.is_main:
        out = Path(out)
        with explain_write(RunDir(out.parent.parent), None, folder=out.parent, what=f"exporting to {out}"):
            write_atomically(out, write)
    dist.barrier()


def write_atomically(out: Path, write) -> None:
    """`write(tmp)` into OUT.tmp, then swap it in for OUT: a reader sees the old folder or the new one, whole.

    What is written gets the modes the user's umask gives new files: a tokenizer copied from a read-only folder
    (a shared /models, the nanoVLM fixture) came out read-only, so the next export could not remove it and
    training's export/best failed for good; safetensors writes 0600, which colleagues could not read."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    old = out.with_name(out.name + ".old")
    remove_tree(tmp)
    write(tmp)
    _default_modes(tmp)
    remove_tree(old)  # left by an earlier swap that could not finish
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    try:
        remove_tree(old)
    except UserError as exc:  # the new export is in place; only the old copy is left
        log.warning("%s", exc)


def remove_tree(path: Path) -> None:
    """rmtree that also removes read-only entries (an earlier copy of a read-only folder); a UserError naming the
    folder if it still cannot (ignore_errors left such a tree behind, and the swap then failed on it)."""
    if not os.path.lexists(path):
        return

    def writable_then_retry(func, target, _exc) -> None:
        os.chmod(os.path.dirname(target), 0o700)
        if os.path.isdir(target) and not os.path.islink(target):
            os.chmod(target, 0o700)
        func(target)

    handler = {"onexc" if sys.version_info >= (3, 12) else "onerror": writable_then_retry}
    try:
        shutil.rmtree(path, **handler) if os.path.isdir(path) else os.unlink(path)
    except OSError as exc:
        raise UserError(f"cannot remove {path} ({exc.strerror or exc}): remove it yourself and run again") from exc


def _default_modes(root: Path) -> None:
    """Every folder and file under `root` (and root) to the modes the umask gives new ones: rw for the owner
    always, and what the umask lets the group and others have. A folder is opened up before it is listed."""
    umask = os.umask(0)
    os.umask(umask)
    folders = [str(root)]
    while folders:
        folder = folders.pop()
        os.chmod(folder, 0o777 & ~umask | 0o700)
        for entry in os.scandir(folder):
            if entry.is_dir(follow_symlinks=False):
                folders.append(entry.path)
            elif not entry.is_symlink():
                os.chmod(entry.path, 0o666 & ~umask | 0o600)


# ---------------------------------------------------------------- offline export (no process group)


def find_checkpoint(path: str | Path) -> Path:
    """A run folder (its latest checkpoint), its checkpoints/ folder, or one step_N folder."""
    path = Path(path)
    found = _locate(path) if path.exists() else None
    if found is None and path.is_dir() and re.fullmatch(r"step_\d+", path.name):  # said "neither ... nor step_N"
        raise FileNotFoundError(
            f"{path} is an incomplete checkpoint (its save never finished: no trainer.json); export another step, or "
            f"the run folder {path.parent.parent} (its latest complete checkpoint)"
        )
    if found is None:
        raise FileNotFoundError(f"{path} is neither a run folder with a checkpoint nor a checkpoint folder (step_N)")
    return found


def offline_state_dict(ckpt: Path, model_cfg) -> dict[str, torch.Tensor]:
    """Full model weights from any backend's checkpoint, in one process, without the training ranks; checked
    against `model_cfg`'s shapes, since the weights are written beside a config.json made from it."""
    from toolkit.model import VisionLanguageModel
    from toolkit.train.backends import backend_class

    try:
        meta = read_trainer_meta(ckpt)
        cls = backend_class(meta["backend"], field=f"{ckpt / 'trainer.json'}: backend")
        if not cls.capabilities.offline_weights:
            raise UserError(f"{ckpt} is a {cls.name} checkpoint, which cannot be read offline: export while training")
        model = VisionLanguageModel(model_cfg)
        state = cls.read_full_weights(ckpt / "model", model)
        problem = weights_mismatch(model, state)
    except CheckpointFileError as exc:
        raise damaged(exc, ckpt, verb="export") from exc
    except WeightsMismatchError as exc:
        problem = str(exc)
    if problem:
        raise WeightsMismatchError(
            f"{ckpt} holds weights that do not fit {ckpt.parent.parent / 'config.yaml'} ({problem}): the config was "
            "changed after this checkpoint was written (a refused resume with other model.* values used to rewrite "
            "it); set its model.* fields back to the values the checkpoint was trained with, then export again"
        )
    return state


def checkpoint_weights(src: str | Path) -> tuple[Path, Any, dict[str, torch.Tensor], str | None]:
    """A run folder or checkpoint on disk -> (checkpoint, the run's ModelConfig, fp32 weights, tokenizer folder)."""
    from toolkit.config import Config, apply_mapping

    ckpt = find_checkpoint(src).resolve()  # a linked step folder belongs to the run it points into, not the link's
    run_root = ckpt.parent.parent
    config_file = run_root / "config.yaml"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: export needs the run folder the checkpoint belongs to")
    import yaml

    cfg = Config()
    apply_mapping(cfg, yaml.safe_load(config_file.read_text()), origin=str(config_file))
    cfg.validate()
    state = {k: v.float() if v.is_floating_point() else v for k, v in offline_state_dict(ckpt, cfg.model).items()}
    return ckpt, cfg.model, state, _run_tokenizer(cfg, run_root)


def _run_tokenizer(cfg, run_root: Path) -> str | None:
    """The run's tokenizer folder. A relative model.tokenizer was relative to where training ran, which is the run
    folder minus its relative train.run_dir: an export from another folder dropped the tokenizer without a word,
    and one from a folder holding another tokenizer at that relative path shipped that one (checked first). The
    current folder's is taken only where the run's own place has none (a run folder moved), with a warning."""
    tok = Path(cfg.model.tokenizer_path)
    run_dir = Path(cfg.train.run_dir)
    if tok.is_absolute() or run_dir.is_absolute():
        return str(tok) if tok.is_dir() else None
    base = run_root.resolve()
    for _ in run_dir.parts:
        base = base.parent
    if (base / tok).is_dir():
        return str(base / tok)
    if tok.is_dir():
        log.warning("the run's tokenizer %s is not beside the run (%s); exporting %s from the current folder, "
                    "check that it is the one training used", tok, base / tok, tok.resolve())  # fmt: skip
        return str(tok)
    return None
