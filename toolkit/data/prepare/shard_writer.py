"""shard-data: a Hugging Face dataset (or JSONL + an image folder) -> WebDataset tar shards + manifest.json.

Design choices, and what they buy:

- The shard boundaries are planned from the source before anything is written: fixed runs of source rows in
  sample mode ("1000"), or runs whose estimated size (string and binary bytes, read from Arrow offsets without
  decoding anything) reaches the target in byte mode ("256MB"). Each shard is then a pure function of its row
  range, so the shards' names, contents and bytes are identical for any --workers, and a resumed run rewrites
  exactly what an uninterrupted one would have written. The price: skipped rows leave a shard short of its
  target, and a byte-mode shard can differ from the target by the estimate's error (images stored as a path
  only count zero bytes in the estimate).
- A sample is `KEY.json` plus `KEY.img0.<ext>`, ... with the image's original encoded bytes; only an image given
  as a decoded PIL object without a file behind it is encoded, losslessly as PNG. KEY is the row's index in the
  concatenated source, zero-padded, so a key names its source row.
- Every image is fully decoded once here, so a corrupt image is found while converting (and counted by reason in
  the manifest) rather than in the middle of a training run. The run never stops for a bad row.
- Crash safety: a shard is written under a hidden temporary name, fsynced, its stats are recorded in
  `.progress/`, and only then is it renamed into place; `manifest.json` says `"complete": false` (with the plan
  and no shard list) until the last shard is in. `--resume` checks that the source and settings match the plan
  and writes only the missing shards; a rerun without it refuses, so two runs never mix silently.
- A shard whose rows were all skipped is left out of the manifest and removed at the end: shard names can have
  gaps, and a reader is never handed a shard with nothing in it.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from toolkit.config import ModelConfig
from toolkit.data.format import FORMAT, MANIFEST, image_member, json_member, shard_name
from toolkit.data.prepare.samples import SkipRow, encode_row, nothing_written
from toolkit.data.prepare.sources import ListSource as ListSource  # re-exported: callers build rows from here
from toolkit.data.prepare.sources import ShardDataError, Source, open_source
from toolkit.data.prepare.splits import Subset, holdout_count, holdout_rows
from toolkit.data.prepare.token_stats import TokenCounter, TokenSpec, resolve_token_spec, token_histogram

log = logging.getLogger(__name__)

PROGRESS_DIR = ".progress"
_TAR_MTIME = 946684800  # fixed (2000-01-01) so that shard bytes depend on content only
_LOGGED_PER_REASON = 3


class OutMismatchError(ShardDataError):
    """OUT holds a run made from another source or with other settings."""


@dataclass(frozen=True)
class ShardSize:
    """Target shard size: `unit` is "samples" (source rows per shard) or "bytes" (estimated encoded bytes)."""

    unit: str
    target: int

    def to_json(self) -> dict[str, int]:
        return {self.unit: self.target}


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_shard_size(text: str | int) -> ShardSize:
    """Samples per shard ("1000") or a byte target ("256MB", "512KiB", "1000B"; KB = 1000, KiB = 1024)."""
    raw = str(text).strip()
    if raw.isdigit():
        size = ShardSize("samples", int(raw))
    else:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]+)", raw)
        unit = m.group(2).lower() if m else None
        if unit not in _SIZE_UNITS:
            raise ShardDataError(
                f"--shard-size {text!r} is not a size; give samples per shard (1000) or bytes (256MB, 512KiB, 1000B)"
            )
        size = ShardSize("bytes", int(float(m.group(1)) * _SIZE_UNITS[unit]))
    if size.target < 1:
        raise ShardDataError(f"--shard-size {text!r} must be at least 1 sample or 1 byte")
    return size


# ---------------------------------------------------------------------------------------------------------------
# Writing one shard.


@dataclass
class ShardJob:
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return shard_name(self.index)


_LOGGED: Counter = Counter()  # skips logged by this process, per reason


def _log_skip(index: int, label: str, skip: SkipRow) -> None:
    """Log the first few skips per reason and process, so a million bad rows do not flood the log."""
    _LOGGED[skip.reason] += 1
    if _LOGGED[skip.reason] <= _LOGGED_PER_REASON:
        last = " (further ones are only counted)" if _LOGGED[skip.reason] == _LOGGED_PER_REASON else ""
        log.warning("skipping row %d of %s: %s%s", index, label, skip, last)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _TAR_MTIME
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _fill_shard(
    tar: tarfile.TarFile, source: Source, job: ShardJob, counter: TokenCounter | None, progress: Callable[[int], None]
) -> tuple[int, Counter, list[int]]:
    """The job's rows into `tar`: (samples written, skip reasons counted, token lengths when counted)."""
    skips: Counter = Counter()
    lengths: list[int] = []
    samples = 0
    for index, label, row in source.rows(job.start, job.stop):
        progress(1)
        try:
            sample = encode_row(index, label, row)
        except SkipRow as skip:
            skips[skip.reason] += 1
            _log_skip(index, label, skip)
            continue
        _add_member(tar, json_member(sample.key), sample.json)
        for i, (ext, data) in enumerate(sample.images):
            _add_member(tar, image_member(sample.key, i, ext), data)
        if counter is not None:
            lengths.append(counter(sample))
        samples += 1
    return samples, skips, lengths


def write_shard(
    source: Source, job: ShardJob, out: Path, *, counter: TokenCounter | None, progress: Callable[[int], None]
) -> dict:
    """Write one shard atomically and record its stats in .progress/ before it appears under its final name."""
    tmp = out / f".{job.name}.tmp"
    try:
        with open(tmp, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
                samples, skips, lengths = _fill_shard(tar, source, job, counter, progress)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:  # a stopped or failed writer leaves no temp file (resume would rewrite it anyway)
        tmp.unlink(missing_ok=True)
        raise
    stats = {
        "name": job.name,
        "rows": [job.start, job.stop],
        "samples": samples,
        "bytes": tmp.stat().st_size,
        "skipped": dict(skips),
        "token_lengths": lengths if counter is not None else None,
    }
    _write_json_atomic(out / PROGRESS_DIR / f"{job.name}.json", stats)
    os.replace(tmp, out / job.name)
    return stats


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(value, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Parallel writers.

_WORKER: dict[str, Any] = {}


class Interrupted(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`) or SIGINT (Ctrl-C) stopped the run: finished shards stay, --resume goes on."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Stopped(Exception):
    """A writer gave up its shard: the parent asked it to stop, or died (write_shard removes its temp file)."""


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM raises Interrupted in the main thread, as Ctrl-C raises KeyboardInterrupt, so the writers are told
    to stop and the pool is shut down: `kill PID` left the spawned writers running, orphaned, for minutes."""

    def stop(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _init_worker(source: Source, spec: TokenSpec | None, rows_done: Any, stop: Any, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides, once
    _WORKER.update(
        source=source, counter=TokenCounter(spec) if spec else None, rows_done=rows_done, stop=stop, parent=parent
    )


def _worker_write(job: ShardJob, out: Path) -> dict:
    pending = 0

    def progress(n: int) -> None:
        nonlocal pending
        pending += n
        if pending >= 16:
            flush()
        if _WORKER["stop"].is_set() or os.getppid() != _WORKER["parent"]:  # per row: a parent SIGKILLed too
            raise _Stopped(job.name)

    def flush() -> None:
        nonlocal pending
        with _WORKER["rows_done"].get_lock():
            _WORKER["rows_done"].value += pending
        pending = 0

    try:
        return write_shard(_WORKER["source"], job, out, counter=_WORKER["counter"], progress=progress)
    finally:
        flush()


def _run_jobs(source: Source, jobs: list[ShardJob], out: Path, counter: TokenCounter | None, workers: int) -> None:
    """Write `jobs`, in this process (workers=1) or in a spawned pool; one progress bar over source rows.

    Results are read back from .progress/ afterwards, the same way for fresh, parallel and resumed shards."""
    spec = counter.spec if counter else None
    bar = tqdm(total=sum(j.stop - j.start for j in jobs), unit="row", desc=f"shard-data {out.name}", mininterval=1)
    with bar:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                write_shard(source, job, out, counter=counter, progress=bar.update)
            return
        # spawn, not fork: the parent may hold tokenizer and Arrow threads, which a fork would copy mid-flight.
        ctx = mp.get_context("spawn")
        rows_done, stop = ctx.Value("q", 0), ctx.Event()
        args = (source, spec, rows_done, stop, os.getpid())
        pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker, initargs=args)
        try:
            pending = {pool.submit(_worker_write, job, out) for job in jobs}
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()  # a writer's exception stops the run; finished shards stay resumable
                bar.update(rows_done.value - bar.n)
        except BaseException:
            stop.set()  # the others give up their shards at the next row rather than finishing them
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------------------------
# The run: plan, OUT state, resume, manifest.


def plan_shards(num_rows: int, size: ShardSize, row_sizes: np.ndarray | None = None) -> list[ShardJob]:
    """Cut rows 0..num_rows-1 into contiguous shards: fixed row counts, or greedy runs up to the byte target."""
    if size.unit == "samples":
        bounds = [(s, min(s + size.target, num_rows)) for s in range(0, num_rows, size.target)]
    else:
        bounds, start, acc = [], 0, 0.0
        for i, nbytes in enumerate(row_sizes if row_sizes is not None else np.zeros(num_rows)):
            if i > start and acc + nbytes > size.target:
                bounds.append((start, i))
                start, acc = i, 0.0
            acc += float(nbytes)
        if num_rows > start:
            bounds.append((start, num_rows))
    return [ShardJob(i, a, b) for i, (a, b) in enumerate(bounds)]


def _occupied(out: Path) -> bool:
    if out.exists() and not out.is_dir():
        raise ShardDataError(f"OUT {out} is a file; give a folder for the shards")
    return out.exists() and any(out.iterdir())


def _prepare_out(
    out: Path, settings: dict, jobs: list[ShardJob], resume: bool, histogram: dict | None
) -> tuple[dict | None, set[int]]:
    """Start a fresh OUT, or (with resume) check it matches this run and find the shards already complete.

    Returns (complete manifest or None, indices of finished shards)."""
    plan = [[j.start, j.stop] for j in jobs]
    if not _occupied(out):
        (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
        _write_json_atomic(out / MANIFEST, _incomplete_manifest(settings, plan, histogram))
        return None, set()
    if not resume:
        if not (out / MANIFEST).exists():
            raise ShardDataError(f"{out} is not empty and holds no {MANIFEST}; choose a new or empty OUT folder")
        state = "a complete" if _read_manifest(out).get("complete") else "an interrupted"
        raise ShardDataError(
            f"{out} already holds {state} shard-data run. Pass --resume to continue it (with the same arguments; "
            "a complete run is left as it is), or choose a new OUT folder."
        )
    manifest = _read_manifest(out)
    if manifest.get("settings") != settings:
        diff = sorted(k for k in settings if manifest.get("settings", {}).get(k) != settings[k])
        raise OutMismatchError(
            f"{out} was written from a different source or settings (differs in: {', '.join(diff)}); --resume only "
            "continues a run with the same SRC, subsets, split, shard size and tokenizer. Use a new OUT folder."
        )
    if manifest.get("complete"):
        return manifest, set(range(len(jobs)))
    if manifest.get("plan") != plan:
        raise OutMismatchError(f"{out}: the shard plan differs from the interrupted run's; use a new OUT folder")
    (out / PROGRESS_DIR).mkdir(exist_ok=True)
    for tmp in out.glob(".*.tmp"):
        tmp.unlink()
    return None, {j.index for j in jobs if _finished(out, j) is not None}


def _read_manifest(out: Path) -> dict:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ShardDataError(
            f"{out} holds files but no readable {MANIFEST} ({exc}), so it cannot be resumed safely; "
            "choose a new OUT folder or delete this one"
        ) from exc
    if manifest.get("format") != FORMAT:
        raise ShardDataError(f"{out}/{MANIFEST} is not a {FORMAT} manifest; choose a new OUT folder")
    return manifest


def _finished(out: Path, job: ShardJob) -> dict | None:
    """A shard's stats when it was completed by an earlier run: its tar is in place and matches its record."""
    try:
        stats = json.loads((out / PROGRESS_DIR / f"{job.name}.json").read_text())
        ok = stats["rows"] == [job.start, job.stop] and stats["bytes"] == (out / job.name).stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return stats if ok else None


def _incomplete_manifest(settings: dict, plan: list[list[int]], histogram: dict | None) -> dict:
    # No shard list until the run is complete, so a reader that ignores "complete" still reads nothing.
    # `histogram` keeps what the final token histogram needs, so `--merge` writes the manifest one run would.
    return {
        "format": FORMAT,
        "complete": False,
        "source": settings["source"],
        "settings": settings,
        "plan": plan,
        "histogram": histogram,
        "shards": [],
    }


def _histogram_meta(spec: TokenSpec | None) -> dict | None:
    return None if spec is None else {"include_images": spec.include_images, "origin": spec.origin}


def _final_manifest(settings: dict, stats: list[dict], histogram: dict | None, rows: int) -> dict:
    skipped: Counter = Counter()
    for s in stats:
        skipped.update(s["skipped"])
    manifest = {
        "format": FORMAT,
        "complete": True,
        "source": settings["source"],
        "subsets": settings["subsets"],
        "split": settings.get("split"),
        "settings": settings,
        "rows": rows,
        "samples": sum(s["samples"] for s in stats),
        "skipped": {k: skipped[k] for k in sorted(skipped)},
        "shards": [{"name": s["name"], "samples": s["samples"], "bytes": s["bytes"]} for s in stats if s["samples"]],
    }
    if histogram is not None:
        lengths = [n for s in stats for n in s["token_lengths"]]
        manifest["token_histogram"] = token_histogram(lengths, **histogram)
    return manifest


def _check_holdout_out(out: Path) -> None:
    """With --holdout, OUT holds OUT/train and OUT/val only. A plain run's shards beside them were accepted, and
    `data.train_shards=OUT` then read that run, held-out rows included."""
    others = sorted(p.name for p in out.iterdir() if p.name not in ("train", "val")) if out.is_dir() else []
    if others:
        what = "a shard-data run without --holdout" if MANIFEST in others else f"other files ({', '.join(others[:3])})"
        raise ShardDataError(
            f"{out} already holds {what}; --holdout writes {out}/train and {out}/val only: choose a new or empty OUT"
        )


def write_shards(
    source: Source,
    out: str | Path,
    *,
    shard_size: str | int = "256MB",
    workers: int = 1,
    token_spec: TokenSpec | None = None,
    resume: bool = False,
    settings: dict | None = None,
    part: tuple[int, int] | None = None,
) -> dict:
    """Write `source` into OUT as tar shards and return the manifest (see the module docstring for guarantees).

    `part=(i, n)` writes only the shards whose index is i mod n, one machine of n: the plan, names and bytes are
    the whole run's, OUT's incomplete manifest is shared, and `merge_parts(OUT)` writes the manifest at the end."""
    if workers < 1:
        raise ShardDataError(f"--workers {workers} must be at least 1")
    out = Path(out)
    size = parse_shard_size(shard_size)
    if source.num_rows == 0:
        raise ShardDataError(f"{source.name} has no rows to write; check SRC, --subsets and --split")
    jobs = plan_shards(source.num_rows, size, source.row_sizes() if size.unit == "bytes" else None)
    settings = {
        "source": source.name,
        "subsets": list(source.subsets),
        "shard_size": size.to_json(),
        "tokenizer": token_spec.model.tokenizer_path if token_spec else None,
        "rows": source.num_rows,
        "fingerprint": source.fingerprint(),
        **(settings or {}),
    }
    settings = json.loads(json.dumps(settings))  # compare as it will read back from disk
    counter = TokenCounter(token_spec) if token_spec else None  # a tokenizer that cannot load fails before any write
    histogram = _histogram_meta(token_spec)
    complete, done = _prepare_out(out, settings, jobs, resume or part is not None, histogram)
    if complete is not None:
        log.info("%s is already complete; nothing to do", out)
        return complete
    mine = [j for j in jobs if part is None or j.index % part[1] == part[0]]
    if done:
        log.info("resuming %s: %d of %d shards already written", out, len(done & {j.index for j in mine}), len(mine))
    _run_jobs(source, [j for j in mine if j.index not in done], out, counter, workers)
    if part is not None:
        written = sum(_finished(out, j) is not None for j in mine)
        log.info("%s: part %d/%d wrote its %d shards; run `shard-data --merge %s` when every part is done",
                 out, part[0], part[1], written, out)  # fmt: skip
        return {**_read_manifest(out), "part": f"{part[0]}/{part[1]}", "part_shards": written}
    return _finish(out, settings, jobs, histogram, source)


def _finish(
    out: Path, settings: dict, jobs: list[ShardJob], histogram: dict | None, source: Source | None = None
) -> dict:
    """Every shard is in place: the final manifest replaces the incomplete one, the progress records go. A run
    that wrote no sample at all stays incomplete and fails (nothing can train on it): it exited 0 with a complete
    manifest of 0 samples, and training failed later with 'no samples in a whole epoch'."""
    stats = [_finished(out, job) for job in jobs]
    missing = [job.name for job, st in zip(jobs, stats, strict=True) if st is None]
    if missing:
        raise ShardDataError(
            f"{out}: {len(missing)} of {len(jobs)} shards are not written yet ({', '.join(missing[:3])} ...); "
            "rerun with --resume (with --part i/N: run the parts that write them, shard index mod N = i)"
        )
    manifest = _final_manifest(settings, stats, histogram, settings["rows"])
    error = nothing_written(manifest, source)
    if error is not None:
        raise error
    _write_json_atomic(out / MANIFEST, manifest)
    _drop_empty_shards(out, stats)
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    return manifest


def _drop_empty_shards(out: Path, stats: list[dict]) -> None:
    """Remove the tars of shards whose rows were all skipped (the manifest already leaves them out). They were
    listed and kept: a loader reader whose shards were all empty failed with "no samples in a whole epoch", and
    one reading the folder without the manifest globbed empty tars. Runs after the manifest is written, so a
    stop in between leaves a complete manifest and a stray empty tar that nothing reads."""
    empty = [s["name"] for s in stats if s["samples"] == 0]
    for name in empty:
        (out / name).unlink(missing_ok=True)
    if empty:
        log.info("%s: %d shards whose rows were all skipped were left out (%s ...)", out, len(empty), empty[0])


def merge_parts(out: str | Path) -> dict:
    """`shard-data --merge OUT`: after every `--part i/N` run into OUT, write the manifest one run would have."""
    out = Path(out)
    if not (out / MANIFEST).exists():
        raise ShardDataError(f"{out} holds no {MANIFEST}: run `shard-data SRC {out} --part i/N` on each machine first")
    manifest = _read_manifest(out)
    if manifest.get("complete"):
        return manifest
    jobs = [ShardJob(i, a, b) for i, (a, b) in enumerate(manifest["plan"])]
    return _finish(out, manifest["settings"], jobs, manifest.get("histogram"))


def shard_data(
    src: str,
    out: str,
    *,
    subsets: list[str] | None = None,
    shard_size: str | int = "256MB",
    workers: int = 1,
    tokenizer: str | None = None,
    images: str | None = None,
    split: str = "train",
    resume: bool = False,
    model_config: ModelConfig | None = None,
    holdout: str | None = None,
    part: tuple[int, int] | None = None,
) -> dict:
    """`python -m toolkit shard-data`: read SRC (see open_source), write OUT/shard-*.tar and OUT/manifest.json.

    `model_config` (a ModelConfig whose tokenizer to use) overrides the config found from `tokenizer`. With
    `holdout` ("5000" rows or "0.01"), OUT/val gets those rows and OUT/train the rest; the train manifest is
    returned, with the val one under "holdout". `part=(i, n)`: see write_shards."""
    source = open_source(src, subsets=list(subsets or []), split=split, images=images)
    spec = None
    if model_config is not None:
        spec = TokenSpec(model_config, True, "given model config")
    elif tokenizer:
        spec = resolve_token_spec(tokenizer)
    log.info("%s: %d rows from %s", out, source.num_rows, source.name)
    kw = {"shard_size": shard_size, "workers": workers, "token_spec": spec, "resume": resume, "part": part}
    if not holdout:
        return write_shards(source, out, settings={"split": split}, **kw)
    _check_holdout_out(Path(out))
    count = holdout_count(holdout, source.num_rows)
    val = holdout_rows(source.num_rows, count)
    train = np.setdiff1d(np.arange(source.num_rows, dtype=np.int64), val)
    held = {"split": split, "holdout": {"rows": count, "of": source.num_rows}}
    val_manifest = write_shards(Subset(source, val, "val"), Path(out) / "val", settings={**held, "as": "val"}, **kw)
    manifest = write_shards(Subset(source, train, "train"), Path(out) / "train", settings={**held, "as": "train"}, **kw)
    return {**manifest, "holdout": val_manifest}
