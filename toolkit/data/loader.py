"""The per-rank data loader: shards -> shuffle -> decode -> pack -> collate, resumable bit for bit.

Every loader worker runs one `_Stream` (its own reader slot, see shards.py) and yields whole batches of
`train.batch_size` packed rows, so torchdata's StatefulDataLoader runs with `batch_size=None` and only has to
remember which worker is next and each worker's stream state after its last delivered batch. A stream's state is
small and independent of how far the run is: reader cursors, draw counters, the skip counters, and the samples
sitting in the shuffle buffer, the packer and the finished-but-unbatched rows as (set, shard, ordinal)
references. Restoring re-reads and re-decodes only those samples, never the epoch so far.

Validation (`split="val"`) is finite: one pass over `data.val_shards`, no shuffle, the last batch padded with empty
rows to keep the shape. Note that readers (and so ranks) can end a finite pass after different numbers of batches.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch.utils.data import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from toolkit.config import Config
from toolkit.data.batch import Batch
from toolkit.data.collate import Encoded, collate
from toolkit.data.cost import SampleCost, sample_cost
from toolkit.data.order import owned_readers
from toolkit.data.packing import Packer, PackerState
from toolkit.data.shards import (
    DecodeSpec,
    Mixture,
    RawSample,
    ReaderSlot,
    Sample,
    SetReader,
    ShardError,
    ShardSet,
    ShuffleBuffer,
    Skip,
    SkipCounter,
    decode_sample,
    fingerprint,
    load_tiles,
    read_refs,
    reader_slot,
    resolve_sets,
    same_data,
    worker_layout,
)
from toolkit.data.tokenizer import VLMTokenizer, load_tokenizer
from toolkit.data.workers import exit_with, start_helpers, worker_context

STATE_FORMAT = "nanovlm-scale-stream/1"
TURNS_FORMAT = "nanovlm-scale-turns/1"
MAX_SKIPS_IN_A_ROW = 10_000
OTHER_DATA = (
    "the loader state to resume refers to other shards or weights than data.*_shards now name; resume with the "
    "same data, or set train.resume_data=false to start the new data's stream afresh (the model, optimizer and "
    "schedule continue)"
)


@dataclass(frozen=True)
class StreamSpec:
    """What one stream needs, resolved once in the main process and shipped to the workers."""

    sets: tuple[ShardSet, ...]
    seed: int
    finite: bool
    shuffle: int
    buffer_packs: int
    capacity: int
    max_images: int
    batch_rows: int
    pad_id: int
    decode: DecodeSpec
    virtual_readers: int = 0  # 0: one reader per (rank, worker); V: the global order of toolkit/data/order.py
    cost: SampleCost | None = None  # data.balance: rows of near-equal compute under this cost model


class EndOfPass:
    """The last item of a finite stream, dropped by StreamLoader's iterator: callers never see it.

    torchdata hands a worker's stream state to the main process only along with an item the worker yields, so
    without it the skips after a worker's last batch (all of them, when no sample survives) would never be counted.
    """


class _Stream:
    """One reader's whole pipeline, as objects whose state can be read between any two batches."""

    def __init__(self, spec: StreamSpec, tok: VLMTokenizer, slot: ReaderSlot) -> None:
        self.spec, self.tok, self.slot = spec, tok, slot
        self.counter = SkipCounter()
        self.readers = [
            SetReader(s, i, slot=slot, seed=spec.seed, finite=spec.finite, counter=self.counter)
            for i, s in enumerate(spec.sets)
        ]
        self.mixture = Mixture(self.readers, [s.weight for s in spec.sets], seed=spec.seed, slot=slot)
        self.shuffle = ShuffleBuffer(self.mixture.next, spec.shuffle, seed=spec.seed, slot=slot)
        self.packer: Packer[Sample] = Packer(
            length=lambda s: len(s.input_ids),
            images=lambda s: len(s.images),
            tiles=lambda s: s.tiles,
            capacity=spec.capacity,
            max_images=spec.max_images,
            max_tiles=spec.decode.max_tiles,
            buffer_packs=spec.buffer_packs,
            cost=(lambda s: spec.cost(tokens=len(s.input_ids), tiles=s.tiles)) if spec.cost else None,
        )
        self.ready: list[list[Sample]] = []  # rows built but not yet handed out in a batch
        self.set_streaks = [0] * len(spec.sets)  # header skips in a row per set (not saved, as in_a_row is not)
        self.ended = False
        # Samples in a row whose pixels failed at collate: their headers read fine, so _next_sample's own count
        # never sees them (not saved: a resumed stream counts afresh, as it does for header skips)
        self.pixel_fails_in_a_row = 0

    def batches(self) -> Iterator[Batch | EndOfPass]:
        while rows := self._next_rows():
            yield self._collate(rows)
        if self.spec.finite:
            yield EndOfPass()

    def _next_rows(self) -> list[list[Sample]]:
        while len(self.ready) < self.spec.batch_rows and not self.ended:
            sample = self._next_sample()
            if sample is None:
                self.ready.extend(self.packer.flush())
                self.ended = True
            else:
                self.ready.extend(self.packer.add(sample))
        rows = self.ready[: self.spec.batch_rows]
        del self.ready[: self.spec.batch_rows]
        return rows

    def _next_sample(self) -> Sample | None:
        in_a_row = 0
        while (raw := self.shuffle.next()) is not None:
            try:
                sample = decode_sample(raw, self.tok, self.spec.decode)
                self.set_streaks[raw.ref[0]] = 0
                return sample
            except Skip as exc:
                self.counter.skip(exc.reason, raw.where, exc.detail)
            in_a_row += 1
            self._check_streak(in_a_row)
            self._check_set_streak(raw.ref[0])
        return None

    def _check_streak(self, in_a_row: int) -> None:
        """An endless stream whose every sample is skipped would never yield (or yield only empty rows): stop."""
        if in_a_row >= MAX_SKIPS_IN_A_ROW and not self.spec.finite:
            raise ShardError(
                f"the last {in_a_row} samples were all skipped ({self.counter.skipped}); check "
                "data.max_sample_length, data.max_images_per_example and the shards (`toolkit data-stats`)"
            )

    def _check_set_streak(self, index: int) -> None:
        """A mixture set none of whose samples can be used (all too long, say) kept its weight in the draw while
        every draw of it was skipped: its share went to the other sets, with a per-sample warning only. The
        streak of the whole stream never stopped it, the other sets' samples breaking it each time."""
        self.set_streaks[index] += 1
        if self.set_streaks[index] >= MAX_SKIPS_IN_A_ROW and len(self.spec.sets) > 1 and not self.spec.finite:
            shard_set = self.spec.sets[index]
            share = shard_set.weight / sum(s.weight for s in self.spec.sets)
            raise ShardError(
                f"the last {self.set_streaks[index]} samples of {shard_set.pattern!r} (weight {shard_set.weight:g}, "
                f"{share:.0%} of the mixture) were all skipped ({self.counter.skipped}); its share would go to the "
                "other sets. Check data.max_sample_length, data.max_images_per_example and that set's shards "
                "(`toolkit data-stats`), or drop it from the mixture"
            )

    def _collate(self, rows: list[list[Sample]]) -> Batch:
        """Decode the pixels only now, so buffers hold encoded bytes; a sample whose image fails leaves its row."""
        encoded = []
        for row in rows:
            out = []
            for s in row:
                try:
                    pixels = load_tiles(s, self.spec.decode)  # (tiles, 3, tile, tile)
                except Skip as exc:
                    self.counter.skip(exc.reason, s.where, exc.detail)
                    self.pixel_fails_in_a_row += 1
                    self._check_streak(self.pixel_fails_in_a_row)
                    continue
                self.pixel_fails_in_a_row = 0
                out.append(Encoded(s.input_ids, s.labels, pixels, images=len(s.images), key=s.where))
            encoded.append(out)
        batch = collate(
            encoded,
            capacity=self.spec.capacity,
            pad_id=self.spec.pad_id,
            tile=self.spec.decode.tile,
            batch_rows=self.spec.batch_rows,
        )
        batch.stats.reader = self.slot.index
        return batch

    def state_dict(self) -> dict:
        packer = self.packer.state()
        return {
            "format": STATE_FORMAT,
            "slot": [self.slot.index, self.slot.count],
            "data": fingerprint(list(self.spec.sets)),
            "readers": [r.state() for r in self.readers],
            "mixture_draws": self.mixture.draws,
            "shuffle_draws": self.shuffle.draws,
            "shuffle": [list(r.ref) for r in self.shuffle.items],
            "packer": [list(s.ref) for s in packer.items],
            "packer_born": list(packer.born),
            "packer_built": packer.built,
            "packer_balance": list(packer.balance),
            "ready": [[list(s.ref) for s in row] for row in self.ready],
            "ended": self.ended,
            "counts": self.counter.state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._check(state)
        for reader, st in zip(self.readers, state["readers"], strict=True):
            reader.restore(st)
        self.mixture.draws, self.shuffle.draws = state["mixture_draws"], state["shuffle_draws"]
        refs = [tuple(r) for r in state["shuffle"] + state["packer"] + [r for row in state["ready"] for r in row]]
        raw = read_refs(list(self.spec.sets), refs)
        self.shuffle.items = [raw[tuple(r)] for r in state["shuffle"]]
        items = [self._redecode(raw[tuple(r)]) for r in state["packer"]]
        balance = tuple(state.get("packer_balance", ()))  # absent from states saved before data.balance
        self.packer.restore(PackerState(items, list(state["packer_born"]), state["packer_built"], balance))
        self.ready = [[self._redecode(raw[tuple(r)]) for r in row] for row in state["ready"]]
        self.ended = state["ended"]
        self.counter.restore(state["counts"])

    def _check(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ShardError(f"loader state has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        if state["slot"] != [self.slot.index, self.slot.count]:
            raise ShardError(
                f"loader state was saved by reader {state['slot'][0]} of {state['slot'][1]} (ranks x data.num_workers) "
                f"but this is reader {self.slot.index} of {self.slot.count}; resume with the same world size and "
                "data.num_workers"
            )
        if not same_data(state["data"], list(self.spec.sets)):
            raise ShardError(OTHER_DATA)

    def _redecode(self, raw: RawSample) -> Sample:
        try:
            return decode_sample(raw, self.tok, self.spec.decode)
        except Skip as exc:
            raise ShardError(
                f"{raw.where} decoded before the checkpoint but not now ({exc}); the shards, "
                "tokenizer or data settings changed since it was saved"
            ) from exc


class _Turns:
    """A worker's virtual readers, one batch from each in turn; its state is theirs plus whose turn is next."""

    def __init__(self, streams: list[_Stream]) -> None:
        self.streams, self.turn = streams, 0

    def batches(self) -> Iterator[Batch | EndOfPass]:
        live = [s.batches() for s in self.streams]
        while any(it is not None for it in live):
            it = live[self.turn]
            item = None if it is None else next(it, None)
            if isinstance(item, EndOfPass) or (item is None and it is not None):
                live[self.turn] = None
            self.turn = (self.turn + 1) % len(live)  # before the yield: the state handed out with it is "after"
            if isinstance(item, Batch):
                yield item
        if self.streams and self.streams[0].spec.finite:
            yield EndOfPass()

    def state_dict(self) -> dict:
        return {"format": TURNS_FORMAT, "turn": self.turn, "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        by_slot = {tuple(st["slot"]): st for st in stream_states(state)}
        for stream in self.streams:
            stream.load_state_dict(by_slot[(stream.slot.index, stream.slot.count)])
        self.turn = state.get("turn", 0)


class PackedStream(IterableDataset):
    """The IterableDataset the loader wraps; each worker builds its own `_Stream` (or `_Turns`) on `iter()`."""

    def __init__(self, spec: StreamSpec, tokenizer: VLMTokenizer, *, rank: int, world: int) -> None:
        self.spec, self.tok, self.rank, self.world = spec, tokenizer, rank, world
        self._stream: _Stream | _Turns | None = None
        self._pending: dict | None = None
        self.resharded: dict[int, dict] | None = None  # virtual reader -> state, from a checkpoint of another layout

    def __iter__(self) -> Iterator[Batch | EndOfPass]:
        if self.spec.virtual_readers:
            stream = self._virtual()
        else:
            stream = _Stream(self.spec, self.tok, reader_slot(self.rank, self.world))
        if self._pending:
            stream.load_state_dict(self._pending)
            self._pending = None
        self._stream = stream
        return stream.batches()

    def _virtual(self) -> _Turns:
        workers, worker = worker_layout()
        count = self.spec.virtual_readers
        mine = owned_readers(count, rank=self.rank, world=self.world, worker=worker, workers=workers)
        turns = _Turns([_Stream(self.spec, self.tok, ReaderSlot(v, count)) for v in mine])
        if self.resharded is not None:
            turns.load_state_dict({"turn": 0, "streams": [self.resharded[v] for v in mine]})
        return turns

    def state_dict(self) -> dict:
        if self._stream is not None:
            return self._stream.state_dict()
        return dict(self._pending or {})

    def load_state_dict(self, state: dict) -> None:
        self._pending, self._stream = (state or None), None

    def __getstate__(self) -> dict:
        """The tokenizer's compiled template does not pickle (spawned workers); ship its parts instead."""
        state = dict(self.__dict__, _stream=None)
        tok = state.pop("tok")
        state["_tok_parts"] = (tok.hf, tok.extra, tok.chat_template)
        return state

    def __setstate__(self, state: dict) -> None:
        hf, extra, template = state.pop("_tok_parts")
        self.__dict__.update(state)
        self.tok = VLMTokenizer(hf=hf, extra=extra, chat_template=template)


def stream_states(state: object) -> list[dict]:
    """Every stream state inside a StatefulDataLoader state, wherever torchdata nests the worker snapshots."""
    if isinstance(state, dict):
        if state.get("format") == STATE_FORMAT:
            return [state]
        return [s for v in state.values() for s in stream_states(v)]
    if isinstance(state, list):
        return [s for v in state for s in stream_states(v)]
    return []


class StreamLoader(StatefulDataLoader):
    """A StatefulDataLoader over a `PackedStream`, plus the counters the trainer logs.

    A plain StatefulDataLoader starts over on every `iter()`. A training stream instead continues where the last
    delivered batch left it (through its own state), so a loop that breaks out for evaluation and iterates again
    neither repeats nor skips data. A finite (validation) stream starts over, as a new pass should, and each of its
    readers ends with an `EndOfPass` that is dropped here, so that `counts()` is exact after the pass.
    """

    def __iter__(self) -> Iterator[Batch]:
        finite = self.dataset.spec.finite
        if not finite and self._iterator is not None:
            self.load_state_dict(self.state_dict())
        # torch's iterator draws its base seed from the global generator when it is made: a resumed run makes it
        # after restoring the RNG, the uninterrupted run long before, so every later dropout mask differed.
        with torch.random.fork_rng(devices=[]):
            items = super().__iter__()
        return (item for item in items if not isinstance(item, EndOfPass)) if finite else items

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state. One saved under another `data.num_workers` would fail deep inside torchdata
        (its layout differs between 0 workers and some); with virtual readers it reshards instead, since a rank's
        readers do not depend on its worker count; without, the error says which count to resume with."""
        sets = list(self.dataset.spec.sets)
        # Checked now, not at the first batch: a refused resume must fail before the run rewrites its config.yaml
        if not all(same_data(st["data"], sets) for st in stream_states(state)):
            raise ShardError(OTHER_DATA)
        saved = saved_workers(state)
        if saved is None or saved == self.num_workers:
            super().load_state_dict(state)
            return
        if self.reshard([state]):
            return
        raise ShardError(
            f"the loader state was saved with data.num_workers={saved} and this run has {self.num_workers}; resume "
            f"with data.num_workers={saved} (set data.virtual_readers in a new run for a data order that survives "
            "such a change)"
        )

    @property
    def endless(self) -> bool:
        """A training stream never ends: each reader starts another epoch, and raises on data it cannot read. The
        trainer relies on it to read a step's counts with its loss rather than before its forward."""
        return not self.dataset.spec.finite

    def reshard(self, saved: list[dict]) -> bool:
        """Continue the global order from the loader states every rank of another layout saved (at a step
        boundary); before iterating. False when this stream has no virtual readers: it cannot be resharded."""
        count = self.dataset.spec.virtual_readers
        if not count:
            return False
        states = {tuple(st["slot"]): st for state in saved for st in stream_states(state)}
        mine = owned_readers(count, rank=self.dataset.rank, world=self.dataset.world)
        missing = [v for v in mine if (v, count) not in states]
        if missing:
            raise ShardError(
                f"the checkpoint holds no state for virtual readers {missing[:5]} of {count}: it was written with "
                "another data.virtual_readers (or none); resume with the checkpoint's data settings"
            )
        self.dataset.resharded = {v: states[v, count] for v in mine}
        return True

    def empty_batch(self) -> Batch:
        """A batch of padding only (no targets, no tiles), shaped like every other batch: what a rank whose finite
        pass ended first can feed while other ranks finish theirs, so sharded backends do not wait forever."""
        s = self.dataset.spec
        return collate([], capacity=s.capacity, pad_id=s.pad_id, tile=s.decode.tile, batch_rows=s.batch_rows)

    def counts(self) -> dict:
        """{'read': samples read, 'skipped': {reason: n}} of this rank's readers, as of the batches delivered; after a
        finite pass, of the whole pass (the end of each reader's pass delivers its final counts)."""
        state = self.state_dict() if self._iterator is not None else self.next_iter_state  # loaded, not yet iterated
        return sum_counts([st["counts"] for st in stream_states(state or {})])


def saved_workers(state: object) -> int | None:
    """The `num_workers` a StatefulDataLoader state was saved with (None: not such a state, e.g. empty)."""
    if not isinstance(state, dict):
        return None
    if "_snapshot" in state:
        return len(state["_snapshot"].get("_worker_snapshots", {}))
    return 0 if "_num_yielded" in state else None


def sum_counts(counts: list[dict]) -> dict:
    """{'read', 'skipped': {reason: n}} dicts (of readers, or of ranks' `counts()`) summed into one."""
    read, skipped = 0, {}
    for c in counts:
        read += c["read"]
        for reason, n in c["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    return {"read": read, "skipped": dict(sorted(skipped.items()))}


def stream_spec(cfg: Config, sets: list[ShardSet], tok: VLMTokenizer, *, finite: bool, shuffle: bool) -> StreamSpec:
    d = cfg.data
    return StreamSpec(
        sets=tuple(sets),
        seed=d.seed,
        finite=finite,
        shuffle=d.shuffle_buffer if shuffle else 1,
        buffer_packs=d.buffer_packs,
        capacity=cfg.model.lm_max_length,
        max_images=d.max_images_per_knapsack,
        batch_rows=cfg.train.batch_size,
        pad_id=tok.pad_token_id,
        decode=DecodeSpec.from_config(cfg),
        virtual_readers=d.virtual_readers if shuffle else 0,  # the training data's global order only
        cost=sample_cost(cfg.model, d.cost_calibration) if d.balance else None,
    )


def build_loader(
    cfg: Config,
    *,
    rank: int,
    world: int,
    tokenizer: VLMTokenizer | None = None,
    split: str = "train",
    finite: bool | None = None,
) -> StreamLoader:
    """This rank's loader; `rank`/`world` are the data-parallel rank and size (every rank reads different samples).

    `split='train'` streams `data.train_shards` forever (each epoch reshuffles); `split='val'` makes one pass over
    `data.val_shards`; `finite` overrides the mode (data-stats reads the training data once). Each batch is the
    dict of `collate()` with `train.batch_size` rows of `model.lm_max_length` tokens. Save `loader.state_dict()`
    per rank with the checkpoint and give it to `load_state_dict()` before iterating to continue bit for bit;
    `loader.counts()` gives the samples read and skipped by reason. Missing shards raise `ShardError` here.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world}")
    spec_value = cfg.data.train_shards if split == "train" else cfg.data.val_shards
    if split == "val" and not spec_value:
        raise ShardError("data.val_shards is empty; set it to held-out shards to validate")
    sets = resolve_sets(spec_value, name=f"data.{split}_shards")  # missing shards fail here, before any worker
    tok = tokenizer or load_tokenizer(cfg.model)
    finite = (split == "val") if finite is None else finite
    spec = stream_spec(cfg, sets, tok, finite=finite, shuffle=split == "train")
    workers = cfg.data.num_workers
    context = worker_context(cfg.data.worker_start, [type(tok.hf).__module__]) if workers > 0 else None
    if workers > 0:
        start_helpers()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers each tokenize on one thread
    with warnings.catch_warnings():  # torchdata 0.11 calls a torch API that torch 2.13 deprecates
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StreamLoader(
            PackedStream(spec, tok, rank=rank, world=world),
            batch_size=None,
            num_workers=workers,
            multiprocessing_context=context,
            worker_init_fn=exit_with(os.getpid()) if workers > 0 else None,
            prefetch_factor=cfg.data.prefetch_factor if workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
        )


def data_stats(cfg: Config, max_packs: int = 0) -> dict:
    """One pass of the training data through the whole pipeline (no model): counts, skips, fill and speed. With
    `max_packs`, the first that many packs exactly: batches of one pack each (the packer's packs do not depend on
    how many a batch holds, so they are training's first packs); a batch of train.batch_size packs overshot."""
    if max_packs:
        cfg = replace(cfg, train=replace(cfg.train, batch_size=1))
    loader = build_loader(cfg, rank=0, world=1, finite=True)
    totals = dict.fromkeys(("rows", "samples", "images", "tiles", "tokens", "targets"), 0)
    sets = loader.dataset.spec.sets
    owner = {shard.path: i for i, shard_set in enumerate(sets) for shard in shard_set.shards}
    packed = [0] * len(sets)
    start = time.perf_counter()
    for batch in loader:
        for k in totals:
            totals[k] += getattr(batch.stats, k)
        for key in (key for row in batch.stats.keys for key in row):
            packed[owner[key.rsplit(":", 1)[0]]] += 1
        if max_packs and totals["rows"] >= max_packs:
            break
    seconds = time.perf_counter() - start
    counts = loader.counts()
    packs = max(totals["rows"], 1)
    stats = {
        "samples_read": counts["read"],
        "samples_packed": totals["samples"],
        "skipped": counts["skipped"],
        "packs": totals["rows"],
        "fill": round(totals["tokens"] / (packs * cfg.model.lm_max_length), 4),
        "samples_per_pack": round(totals["samples"] / packs, 2),
        "images_per_pack": round(totals["images"] / packs, 2),
        "tiles_per_pack": round(totals["tiles"] / packs, 2),
        "target_tokens": totals["targets"],
        "seconds": round(seconds, 2),
        "samples_per_s": round(totals["samples"] / max(seconds, 1e-9), 1),
    }
    if len(sets) > 1:  # each set read once here whatever its weight: what each gave the packs (the counts were
        # pooled, so a set none of whose samples could be packed, which stops a training stream, did not show)
        stats["sets"] = [_set_stats(shard_set, n) for shard_set, n in zip(sets, packed, strict=True)]
    return stats


def _set_stats(shard_set: ShardSet, packed: int) -> dict:
    listed = [shard.samples for shard in shard_set.shards]
    samples = sum(listed) if all(n is not None for n in listed) else None  # a manifest's count, when there is one
    return {"pattern": shard_set.pattern, "weight": shard_set.weight, "samples": samples, "packed": packed}
