"""Tar shards -> decoded samples: shard lists, the reader split, shuffling, tar reading and bad-sample accounting.

Each stage is a small object with a `next()` and an explicit, JSON-friendly state, not a chain of generators:
the loader must be able to say, between any two batches, exactly where every stage stands, and a generator's
position cannot be saved. State stays O(buffers): a reader's cursor is (epoch, shard position, sample ordinal),
buffered samples are saved as (set, shard, ordinal) references and re-read on restore, and randomness is a pure
function of (seed, reader, draw counter), so no RNG state needs saving.

Split. Readers are (rank, loader worker) pairs. With at least as many shards as readers, each reader takes every
`readers`-th shard of the epoch's order; with fewer, every reader walks all shards and keeps the samples whose
running index falls to it (reading only the tar headers of the others), so no reader idles or hangs.

Bad data never stops a run: a truncated or unreadable tar, an undecodable image, a JSON without texts or with wrong
types is skipped, counted by reason and logged once with its shard and key. Only a shard that is missing when
the run starts is an error, because that is a wrong path, not bad data.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import io
import json
import logging
import os
import random
import re
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image, ImageFile

from toolkit.config import Config, ConfigError
from toolkit.data.conversation import encode_sample
from toolkit.data.format import (
    BAD_IMAGE,
    BAD_TAR,
    BAD_TEXT,
    FORMAT,
    MANIFEST,
    RATING_FIELDS,
    SHARD_SUFFIX,
    SPLIT_SAMPLE,
    TOO_LONG,
    TOO_MANY_IMAGES,
    TOO_MANY_TILES,
    TRUNCATED_TAR,
    UNPLACED_IMAGE,
    UNREADABLE_SHARD,
    place_images,
    split_member,
)
from toolkit.data.images import process_image, target_size, tile_count, upright_size
from toolkit.data.streams import PipeStream, ShardStalled, UrlStream
from toolkit.data.texts import Skip, parse_texts
from toolkit.data.tokenizer import VLMTokenizer

log = logging.getLogger(__name__)

MAX_LOGGED = 100  # distinct bad samples logged per reader; later ones are only counted
REMOTE_RETRIES = 3  # a failed remote shard is opened again this many times before it is counted
RETRY_DELAY_S = 1.0  # then 2, 4 ...: back-off between tries


class ShardError(ConfigError):
    """The shard list cannot be read as configured; the message names the path and what to do."""


# ---------------------------------------------------------------------------------------------- shard lists


@dataclass(frozen=True)
class Shard:
    path: str
    samples: int | None = None  # from the manifest when there is one; lets a silently short tar be noticed
    bytes: int | None = None  # from the manifest too: with the name and count, tells one dataset from another


@dataclass(frozen=True)
class ShardSet:
    pattern: str
    shards: tuple[Shard, ...]
    weight: float = 1.0


def expand_braces(pattern: str) -> list[str]:
    """'a-{000..002}.tar' -> a-000.tar, a-001.tar, a-002.tar; '{x,y}' lists too; several groups multiply."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end() :], m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [p for opt in options for p in expand_braces(head + opt + tail)]


def _read_manifest(path: Path, name: str) -> list[Shard]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ShardError(f"{name}: cannot read {path} ({exc}); rerun shard-data or point at the .tar files") from exc
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{name}: {path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("complete") is not True:
        raise ShardError(
            f"{name}: {path} is from a shard-data run that did not finish (stopped, or it wrote no sample): run the "
            "same shard-data command again with --resume (after --part runs: shard-data --merge), or see its last error"
        )
    try:
        shards = [
            Shard(str(path.parent / s["name"]), int(s["samples"]), int(s["bytes"]) if "bytes" in s else None)
            for s in manifest.get("shards", [])
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise ShardError(f"{name}: {path} lists a shard without name/samples ({exc}); rerun shard-data") from exc
    if not any(sh.samples for sh in shards):  # shard-data wrote such runs before it refused them
        skipped = manifest.get("skipped") or {}
        raise ShardError(
            f"{name}: {path} holds no sample (of {manifest.get('rows', '?')} rows, skipped: {skipped or 'none'}); "
            "shard the data again (shard-data now says why each row was skipped)"
        )
    return shards


def is_remote(path: str) -> bool:
    """A `pipe:CMD` (WebDataset's convention) or a URL (fsspec: s3://, gs://, hf://, memory:// ...)."""
    return path.startswith("pipe:") or "://" in path


def open_shard(path: str) -> IO[bytes]:
    """The shard's bytes: a local file, or a pipe's output or a URL's (fsspec) bytes, each read with a deadline."""
    if path.startswith("pipe:"):
        return PipeStream(path)  # type: ignore[return-value]  # read/close are all tarfile's stream mode uses
    if "://" in path:
        try:
            import fsspec
        except ImportError as exc:
            raise ShardError(f"{path} is a URL: `pip install fsspec` and its backend (s3fs, gcsfs ...)") from exc
        return UrlStream(path, lambda url: fsspec.open(url, "rb").open())  # type: ignore[return-value]
    return open(path, "rb")


def resolve_shards(spec: str, *, name: str = "data.train_shards") -> list[Shard]:
    """A brace pattern, a glob, a folder (its manifest.json, else its *.tar), a manifest.json, or one .tar;
    `pipe:CMD` and URLs take brace patterns and are opened only when read (they cannot be listed or checked)."""
    if not spec:
        raise ShardError(
            f"{name} is empty; set it to a shard folder (written by `python -m toolkit shard-data` or `synth`)"
        )
    if is_remote(spec):
        return [Shard(p) for p in expand_braces(spec)]
    path = Path(spec)
    if path.is_dir():
        if (path / MANIFEST).exists():
            shards = _read_manifest(path / MANIFEST, name)
        else:
            shards = [Shard(p) for p in sorted(glob.glob(str(path / f"*{SHARD_SUFFIX}")))]
    elif spec.endswith(".json"):
        shards = _read_manifest(path, name)
    elif "{" in spec:
        shards = [Shard(p) for p in expand_braces(spec)]
    elif any(c in spec for c in "*?["):
        shards = [Shard(p) for p in sorted(glob.glob(spec))]
    elif path.exists():
        shards = [Shard(spec)]
    else:
        raise ShardError(f"{name}={spec!r} does not exist; give a shard folder, a manifest.json or a brace pattern")
    if not shards:
        raise ShardError(f"{name}={spec!r} matched no shards; check the path (a folder, manifest.json or pattern)")
    missing = missing_files([s.path for s in shards])
    if missing:
        listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ShardError(
            f"{name}={spec!r}: {len(missing)} of {len(shards)} shards are missing: {listed}. "
            "Fix the pattern's range or path, or rerun shard-data to write them."
        )
    return shards


LIST_FROM = 16  # a folder holding at least this many of the paths is listed once instead of stat-ing each path


def missing_files(paths: list[str]) -> list[str]:
    """The paths that are not files (in order), by listing each folder that holds many of them once.

    Every rank resolves the shard lists twice at start (preflight, loader) and the validation set at each
    validation: a stat per shard made 10 million stats at once for 10,000 shards on 512 ranks, on Lustre or GPFS
    each a round trip to the metadata server (and the size from the storage servers) that slows every job on the
    cluster. A listing is a few calls per folder; an entry whose type it does not give (a link, some filesystems)
    is stat-ed. A folder with few of the paths (one .tar in a large one), or one that cannot be listed, is stat-ed
    per path."""
    by_folder: dict[str, set[str]] = {}
    for path in paths:
        by_folder.setdefault(os.path.dirname(path), set()).add(os.path.basename(path))
    files: set[tuple[str, str]] = set()
    for folder, names in by_folder.items():
        if len(names) < LIST_FROM:
            continue
        with contextlib.suppress(OSError), os.scandir(folder or ".") as entries:
            files.update((folder, e.name) for e in entries if e.name in names and e.is_file())
    return [p for p in paths if (os.path.dirname(p), os.path.basename(p)) not in files and not os.path.isfile(p)]


def resolve_sets(spec: str | list, *, name: str = "data.train_shards") -> list[ShardSet]:
    """One set for a string; several weighted sets for a list of {pattern, weight}."""
    if isinstance(spec, str):
        return [ShardSet(spec, tuple(resolve_shards(spec, name=name)))]
    sets = []
    for i, entry in enumerate(spec):
        shards = resolve_shards(entry["pattern"], name=f"{name}[{i}].pattern")
        sets.append(ShardSet(entry["pattern"], tuple(shards), float(entry.get("weight", 1.0))))
    if not sets:
        raise ShardError(f"{name} is an empty list; give at least one {{pattern, weight}}")
    return sets


def fingerprint(sets: list[ShardSet], *, legacy: bool = False) -> str:
    """Identifies the shard lists a saved state refers to, so a state is never applied to other data. File names,
    not paths: a run may resume on another machine with the same shards copied elsewhere. With a manifest, each
    shard's bytes too: shard-data names every dataset's shards alike, and with a shard size in samples two
    datasets of as many shards had one fingerprint. `legacy`: without the bytes, as states saved before them."""

    def entry(sh: Shard) -> str:
        size = "" if legacy or sh.bytes is None else f":{sh.bytes}"
        return f"{Path(sh.path).name}:{sh.samples}{size}"

    text = "\n".join(f"{s.weight}|" + "|".join(entry(sh) for sh in s.shards) for s in sets)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def same_data(saved: str, sets: list[ShardSet]) -> bool:
    """A saved state's fingerprint names these sets (either form: a run saved before the bytes counted resumes;
    the legacy form is hashed only when the current one differs)."""
    return saved == fingerprint(sets) or saved == fingerprint(sets, legacy=True)


# ---------------------------------------------------------------------------------------------- split, randomness


@dataclass(frozen=True)
class ReaderSlot:
    """Reader `index` of `count`: one (rank, loader worker) pair of the whole job."""

    index: int = 0
    count: int = 1


def worker_layout() -> tuple[int, int]:
    """(loader workers, this worker's index) from torch; (1, 0) outside a worker."""
    info = torch.utils.data.get_worker_info()
    return (info.num_workers, info.id) if info is not None else (1, 0)


def reader_slot(rank: int, world: int) -> ReaderSlot:
    """Rank and world come from the caller (testable without a process group); the worker from torch."""
    workers, worker = worker_layout()
    return ReaderSlot(index=rank * workers + worker, count=world * workers)


def uniform(*key: object) -> float:
    """A float in [0, 1) that depends only on `key`: randomness that needs no saved RNG state."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def shard_order(n: int, *, seed: int, set_index: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"shards/{seed}/{set_index}/{epoch}").shuffle(order)
    return order


# ---------------------------------------------------------------------------------------------- tar reading


@dataclass
class RawSample:
    """One sample's tar members, undecoded. `ref` = (set, shard, ordinal) finds it again after a resume.
    `split`: its key's members are not together in the tar, so these are only some of them (SPLIT_SAMPLE)."""

    ref: tuple[int, int, int]
    key: str
    shard: str
    files: dict[str, bytes]
    split: bool = False

    @property
    def where(self) -> str:
        return f"{self.shard}:{self.key}"


class ShardScan:
    """The samples of one tar from ordinal `start` on (only those `keep` accepts have their data read).

    After iteration, `groups` is how many complete samples the tar held and `error` is (reason, message) if it
    could not be read to the end. A tar ends early (`truncated_tar`) when it is cut inside a member, or when its
    last member is not followed by the two zero blocks that end a POSIX tar (tarfile's next() returns None for a
    missing or cut end as for a real one, so the end is checked here); the sample in progress at the cut is
    dropped, as it may lack images. A streamed shard that stalls past its deadline (toolkit/data/streams.py) is
    `unreadable_shard`.

    A sample is the run of members with one key, so a tar written as `tar cf x.tar *.json *.png` holds each
    sample as two groups: a JSON without its images, then images without their JSON. `split` holds the keys met
    again after another key; callers skip each of their groups as SPLIT_SAMPLE. A local tar's headers are read
    first (once per process, and not for a shard-data shard, which is grouped by construction), so both parts
    are known before either is handed out; a stream cannot be read twice, so there only the parts after the
    first are caught. `check_grouping=False` skips the header pass.
    """

    def __init__(
        self, path: str, *, start: int = 0, keep: Callable[[int], bool] | None = None, check_grouping: bool = True
    ) -> None:
        self.path, self.start, self.keep = path, start, keep
        self.groups = 0
        self.error: tuple[str, str] | None = None
        self.split: set[str] = set()
        self.check_grouping = check_grouping and not is_remote(path)

    def __iter__(self) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        try:
            if self.check_grouping:
                self.split = set(split_keys(self.path, os.stat(self.path).st_mtime_ns))
            fh = open_shard(self.path)
        except (OSError, ValueError) as exc:
            self.error = (UNREADABLE_SHARD, str(exc))
            return
        try:
            yield from self._read(fh)
        finally:
            try:
                fh.close()  # a pipe's command is waited for here: a failed command is an unreadable shard
            except Exception as exc:
                self.error = self.error or (UNREADABLE_SHARD, str(exc))

    def _read(self, fh: IO[bytes]) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        try:  # a stream (pipe, remote file) is read in order, without seeking back
            tar = tarfile.open(fileobj=fh, mode="r|*" if is_remote(self.path) else "r:*")  # noqa: SIM115
        except ShardStalled as exc:
            self.error = (UNREADABLE_SHARD, str(exc))
            return
        except (tarfile.TarError, EOFError, OSError) as exc:
            self.error = (BAD_TAR, str(exc))
            return
        tar.fileobj = tap = _LastRead(tar.fileobj)
        yield from self._samples(tar, tap)

    def _samples(self, tar: tarfile.TarFile, tap: _LastRead) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        key, ordinal, files, wanted, seen = None, -1, {}, False, set()
        try:
            while (member := tar.next()) is not None:
                tar.members.clear()  # only next() is used; the member list would grow with the shard
                if not member.isfile():
                    continue
                k, ext = split_member(member.name)
                if k != key:
                    if wanted:
                        yield ordinal, key, files
                    if k in seen:  # keys only, not data: memory stays O(samples in the shard) small strings
                        self.split.add(k)
                    seen.add(k)
                    key, ordinal, files = k, ordinal + 1, {}
                    wanted = ordinal >= self.start and (self.keep is None or self.keep(ordinal))
                if wanted:
                    files[ext] = tar.extractfile(member).read()
            _check_end(tar, tap)
            if wanted:
                yield ordinal, key, files
            self.groups = ordinal + 1
        except ShardStalled as exc:
            self.error = (UNREADABLE_SHARD, f"{exc} (in sample #{ordinal}; the samples before it are kept)")
            self.groups = max(ordinal, 0)
        except (tarfile.TarError, EOFError, OSError) as exc:
            self.error = (TRUNCATED_TAR, f"{exc} (in sample #{ordinal}; the samples before it are kept)")
            self.groups = max(ordinal, 0)


@functools.lru_cache(maxsize=1024)
def split_keys(path: str, mtime_ns: int) -> frozenset[str]:
    """The keys of a local tar whose members are not all in one run, from its headers alone (cached per file
    version: a reader visits its shards every epoch). A tar that cannot be read to the end gives what was found;
    the data pass reports the error."""
    runs, last, split = set(), None, set()
    with contextlib.suppress(tarfile.TarError, EOFError, OSError), tarfile.open(path, "r:*") as tar:
        while (member := tar.next()) is not None:
            tar.members.clear()
            if not member.isfile():
                continue
            key = split_member(member.name)[0]
            if key != last:
                (split if key in runs else runs).add(key)
                last = key
    return frozenset(split)


class _LastRead:
    """A tar's file object, passed through, that remembers its last read and where that read began.

    When tarfile's next() returns None, its last read was its try at the next header block, so the end can be
    checked without seeking back (which would make a compressed stream decompress itself again from the start)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.at, self.data = raw, -1, b""

    def read(self, size: int = -1) -> bytes:
        self.at = self.raw.tell()
        self.data = self.raw.read(size)
        return self.data

    def __getattr__(self, name: str) -> Any:  # seek, tell, seekable, close: the file's own
        return getattr(self.raw, name)


def _check_end(tar: tarfile.TarFile, tap: _LastRead) -> None:
    """Raise ReadError unless two zero blocks follow the last member, where tarfile stopped reading headers."""
    block = tarfile.BLOCKSIZE
    if tap.at == tar.offset:
        end = tap.data + tap.read(block)
    else:  # no header was read through the tap: a tar without members, whose first block was read on opening
        tap.seek(tar.offset)
        end = tap.read(2 * block)
    if len(end) < 2 * block:
        raise tarfile.ReadError(f"the file ends at byte {tar.offset + len(end)}, before the end-of-archive blocks")
    if end.count(0) != len(end):
        raise tarfile.ReadError(f"byte {tar.offset} holds neither a member header nor the end-of-archive blocks")


# ---------------------------------------------------------------------------------------------- accounting


@dataclass
class SkipCounter:
    """Samples read and skipped by reason on one reader; logs each bad (reason, shard:key) once."""

    read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    _logged: set = field(default_factory=set, repr=False)

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if (reason, where) in self._logged or len(self._logged) > MAX_LOGGED:
            return
        self._logged.add((reason, where))
        more = " (further bad samples are counted, not logged)" if len(self._logged) > MAX_LOGGED else ""
        log.warning("skipped %s: %s %s%s", where, reason, detail, more)

    def state(self) -> dict:
        return {"read": self.read, "skipped": dict(self.skipped)}

    def restore(self, state: dict) -> None:
        self.read, self.skipped = int(state["read"]), dict(state["skipped"])


# ---------------------------------------------------------------------------------------------- readers


class SetReader:
    """Raw samples of one shard set for one reader: epochs of shuffled shard order, resumable at any sample."""

    def __init__(
        self, shard_set: ShardSet, set_index: int, *, slot: ReaderSlot, seed: int, finite: bool, counter: SkipCounter
    ) -> None:
        self.set, self.set_index, self.slot = shard_set, set_index, slot
        self.seed, self.finite, self.counter = seed, finite, counter
        self.by_sample = len(shard_set.shards) < slot.count
        self.epoch = self.pos = self.ordinal = self.offset = self.kept = 0
        self.retries = 0  # of the current remote shard; not saved: a resumed reader tries afresh
        self.done = False
        self._scan: ShardScan | None = None
        self._iter: Iterator | None = None
        self._plan_epoch, self._plan = -1, []

    def state(self) -> dict:
        keys = ("epoch", "pos", "ordinal", "offset", "kept", "done")
        return {k: getattr(self, k) for k in keys}

    def restore(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self._scan = self._iter = None

    def plan(self) -> list[int]:
        """Shard indices this reader visits in the current epoch."""
        if self._plan_epoch != self.epoch:
            order = shard_order(len(self.set.shards), seed=self.seed, set_index=self.set_index, epoch=self.epoch)
            self._plan = order if self.by_sample else order[self.slot.index :: self.slot.count]
            self._plan_epoch = self.epoch
        return self._plan

    def next(self) -> RawSample | None:
        while not self.done:
            if self._iter is None:
                if self.pos >= len(self.plan()):
                    self._end_epoch()
                    continue
                self._open()
            item = next(self._iter, None)
            if item is None:
                self._close()
                continue
            ordinal, key, files = item
            self.ordinal = ordinal + 1
            self.kept += 1
            self.counter.read += 1
            shard_index = self.plan()[self.pos]
            path, split = self.set.shards[shard_index].path, key in self._scan.split
            return RawSample((self.set_index, shard_index, ordinal), key, path, files, split)
        return None

    def _open(self) -> None:
        offset, slot = self.offset, self.slot
        keep = (lambda o: (offset + o) % slot.count == slot.index) if self.by_sample else None
        shard = self.set.shards[self.plan()[self.pos]]
        # a shard-data shard (its manifest gave its sample count) is grouped by construction: no header pass
        self._scan = ShardScan(shard.path, start=self.ordinal, keep=keep, check_grouping=shard.samples is None)
        self._iter = iter(self._scan)

    def _close(self) -> None:
        """End of a shard: account for a broken or short tar (once per job, not once per reader).

        A remote shard (pipe or URL) that failed is opened again from the next sample, with back-off, up to
        REMOTE_RETRIES times: a network error is usually gone the next time. Only then is it counted."""
        scan, shard = self._scan, self.set.shards[self.plan()[self.pos]]
        counts_events = not self.by_sample or self.pos % self.slot.count == self.slot.index
        if scan.error is None and shard.samples is not None and scan.groups < shard.samples:
            scan.error = (TRUNCATED_TAR, f"{scan.groups} of the {shard.samples} samples the manifest lists")
        if scan.error and is_remote(shard.path) and self.retries < REMOTE_RETRIES:
            time.sleep(RETRY_DELAY_S * 2**self.retries)
            self.retries += 1
            log.warning("retrying %s (%d of %d): %s", shard.path, self.retries, REMOTE_RETRIES, scan.error[1])
            self._open()
            return
        self.retries = 0
        if scan.error and counts_events:
            self.counter.skip(scan.error[0], shard.path, scan.error[1])
        self.offset += scan.groups
        self.pos += 1
        self.ordinal = 0
        self._scan = self._iter = None

    def _end_epoch(self) -> None:
        if self.finite:
            self.done = True
            return
        if self.kept == 0:
            raise ShardError(
                f"shard set {self.set.pattern!r} gave reader {self.slot.index} of {self.slot.count} no samples in a "
                f"whole epoch (all shards unreadable, or fewer samples than readers); check the shards "
                f"(`python -m toolkit data-stats`) or lower data.num_workers"
            )
        self.epoch += 1
        self.pos = self.offset = self.kept = 0


def read_refs(sets: list[ShardSet], refs: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], RawSample]:
    """Re-read buffered samples after a resume: one scan per shard, reading only the wanted samples' data."""
    by_shard: dict[tuple[int, int], set[int]] = {}
    for s, sh, o in refs:
        by_shard.setdefault((s, sh), set()).add(o)
    found: dict[tuple[int, int, int], RawSample] = {}
    for (s, sh), ordinals in by_shard.items():
        shard = sets[s].shards[sh]
        path = shard.path
        scan = ShardScan(path, keep=ordinals.__contains__, check_grouping=shard.samples is None)
        for ordinal, key, files in scan:
            found[(s, sh, ordinal)] = RawSample((s, sh, ordinal), key, path, files, key in scan.split)
            if all((s, sh, o) in found for o in ordinals):
                break
        lost = [o for o in ordinals if (s, sh, o) not in found]
        if lost:
            raise ShardError(
                f"{path} no longer holds sample #{lost[0]} that the saved loader state refers to; shards must not "
                "change under a run: restore them, or resume with a fresh data stream"
            )
    return found


class Mixture:
    """Picks the set of the next sample with probability proportional to its weight; counter-based, so resumable."""

    def __init__(self, readers: list[SetReader], weights: list[float], *, seed: int, slot: ReaderSlot) -> None:
        self.readers, self.weights, self.seed, self.slot = readers, weights, seed, slot
        self.draws = 0

    def next(self) -> RawSample | None:
        while True:
            active = [i for i, r in enumerate(self.readers) if not r.done]
            if not active:
                return None
            choice = active[0]
            if len(active) > 1:
                u = uniform("mix", self.seed, self.slot.index, self.draws) * sum(self.weights[i] for i in active)
                self.draws += 1
                for choice in active:
                    u -= self.weights[choice]
                    if u < 0:
                        break
            raw = self.readers[choice].next()
            if raw is not None:
                return raw


class ShuffleBuffer:
    """Bounded sample shuffle: keep `size` raw samples, hand out a random one, refill from the source."""

    def __init__(self, source: Callable[[], RawSample | None], size: int, *, seed: int, slot: ReaderSlot) -> None:
        self.source, self.size, self.seed, self.slot = source, size, seed, slot
        self.items: list[RawSample] = []
        self.draws = 0

    def next(self) -> RawSample | None:
        while len(self.items) < self.size:
            raw = self.source()
            if raw is None:
                break
            self.items.append(raw)
        if not self.items:
            return None
        j = int(uniform("shuffle", self.seed, self.slot.index, self.draws) * len(self.items))
        self.draws += 1
        self.items[j], self.items[-1] = self.items[-1], self.items[j]
        return self.items.pop()


# ---------------------------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class DecodeSpec:
    """Everything decoding needs from the config, in one picklable value."""

    tile: int
    max_side: int
    resize_to_max: bool
    tokens_per_tile: int
    max_length: int  # min(data.max_sample_length, model.lm_max_length): longer samples could never be packed
    max_images: int  # min(data.max_images_per_example, data.max_images_per_knapsack)
    max_tiles: int = 0
    caption_prompt: str | None = None  # image-caption pairs become one turn asking this (None: refused)
    min_ratings: tuple[tuple[str, int], ...] = ()  # (ratings field, minimum): nanoVLM's per-turn filter

    @classmethod
    def from_config(cls, cfg: Config) -> DecodeSpec:
        m, d = cfg.model, cfg.data
        return cls(
            tile=m.vit_img_size,
            max_side=m.max_img_size,
            resize_to_max=m.resize_to_max_side_len,
            tokens_per_tile=m.mp_image_token_length,
            max_length=min(d.max_sample_length, m.lm_max_length),
            max_images=min(d.max_images_per_example, d.max_images_per_knapsack),
            max_tiles=d.max_tiles_per_knapsack,
            caption_prompt=d.caption_prompt,
            min_ratings=tuple((f, getattr(d, f.replace("_ratings", "_min_rating"))) for f in RATING_FIELDS),
        )


@dataclass
class Sample:
    """A decoded sample as the packer holds it: tokens and the images' *encoded* bytes (pixels come at collate)."""

    ref: tuple[int, int, int]
    where: str
    input_ids: list[int]
    labels: list[int]
    images: list[bytes]
    grids: list[tuple[int, int]]
    tiles: int


def image_members(files: dict[str, bytes]) -> list[bytes]:
    """The image members' bytes, img0.*, img1.*, ... in index order; `Skip` (UNPLACED_IMAGE) when a member looks
    like an image but the format cannot say which image it is, rather than train the sample without it."""
    placed, unplaced = place_images(files)
    if unplaced:
        raise Skip(
            UNPLACED_IMAGE,
            f"members {', '.join('KEY.' + e for e in unplaced)} look like images but the shard format cannot place "
            "them: name a sample's images KEY.img0.EXT, KEY.img1.EXT ... (or one KEY.jpg|png|... beside a caption), "
            "as `python -m toolkit shard-data` writes them",
        )
    return [files[ext] for ext in placed]


def image_grid(data: bytes, spec: DecodeSpec) -> tuple[int, int]:
    """Tile grid from the image header alone; the full decode waits until the sample is collated."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = upright_size(img)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise Skip(BAD_IMAGE, str(exc)) from exc
    th, tw = target_size(h, w, tile=spec.tile, max_side=spec.max_side, resize_to_max=spec.resize_to_max)
    return th // spec.tile, tw // spec.tile


def decode_sample(raw: RawSample, tok: VLMTokenizer, spec: DecodeSpec) -> Sample:
    """Raw tar members -> tokens and labels (nanoVLM's chat template and image string), or `Skip`."""
    if raw.split:
        raise Skip(
            SPLIT_SAMPLE,
            f"the members of {raw.key} are not next to each other in the tar (other samples' members come between "
            "them), so neither part is trained on; write each sample's members together: `tar --sort=name` or "
            "`python -m toolkit shard-data`",
        )
    images = image_members(raw.files)  # first: images it cannot place are the reason, whatever the text holds
    texts = parse_texts(raw.files, caption_prompt=spec.caption_prompt, min_ratings=spec.min_ratings)
    texts = without_markers(texts, tok)
    if len(images) > spec.max_images:
        raise Skip(TOO_MANY_IMAGES, f"{len(images)} images > {spec.max_images}")
    grids = [image_grid(data, spec) for data in images]
    tiles = sum(tile_count(g) for g in grids)
    if spec.max_tiles and tiles > spec.max_tiles:
        raise Skip(TOO_MANY_TILES, f"{tiles} tiles > data.max_tiles_per_knapsack={spec.max_tiles}")
    input_ids, labels = encode_sample(tok, texts, grids, spec.tokens_per_tile)
    if len(input_ids) > spec.max_length:
        raise Skip(TOO_LONG, f"{len(input_ids)} tokens > {spec.max_length}")
    if input_ids.count(tok.image_token_id) != tiles * spec.tokens_per_tile:
        raise Skip(BAD_TEXT, "the text itself contains image tokens")
    return Sample(raw.ref, raw.where, input_ids, labels, images, grids, tiles)


def without_markers(texts: list[dict[str, str]], tok: VLMTokenizer) -> list[dict[str, str]]:
    """The turns without nanoVLM's own markers (`<|image|>`, `<global_img>`, `<row_1_col_1>` ...), which only the
    toolkit places. nanoVLM strips the image token from a text and trains the sample; a marker left in would be
    tokenized as the special token, so an image token without an image. The sample was dropped as bad_text at
    load, after shard-data had counted it as good."""
    roles = ("user", "assistant")
    if not any(tok.markers.search(turn[role]) for turn in texts for role in roles):
        return texts
    return [{**turn, **{role: tok.markers.sub("", turn[role]) for role in roles}} for turn in texts]


@contextlib.contextmanager
def truncated_images_refused() -> Iterator[None]:
    """PIL's process-wide LOAD_TRUNCATED_IMAGES off while we decode, whoever set it: lmms-eval sets it on import
    (so does other code), and with it on a cut JPEG decodes into grey rows and trains as an image instead of
    being counted as bad_image. Restored afterwards for the code that wanted it."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def load_tiles(sample: Sample, spec: DecodeSpec) -> torch.Tensor:
    """Full decode and nanoVLM tiling of every image: (tiles, 3, tile, tile) in token order, or `Skip`."""
    out = []
    for data, grid in zip(sample.images, sample.grids, strict=True):
        try:
            with truncated_images_refused(), Image.open(io.BytesIO(data)) as img:
                tiles, got = process_image(
                    img, tile=spec.tile, max_side=spec.max_side, resize_to_max=spec.resize_to_max
                )
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise Skip(BAD_IMAGE, str(exc)) from exc
        if got != grid:
            raise Skip(BAD_IMAGE, f"decoded grid {got} differs from the header's {grid}")
        out.append(tiles)
    if not out:
        return torch.empty(0, 3, spec.tile, spec.tile)
    return out[0] if len(out) == 1 else torch.cat(out)  # most samples have one image: no copy of its tiles here
