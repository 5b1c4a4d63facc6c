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
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from toolkit.config import Config
from toolkit.data.collate import Encoded, collate
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
)
from toolkit.data.tokenizer import VLMTokenizer, load_tokenizer

STATE_FORMAT = "nanovlm-scale-stream/1"
MAX_SKIPS_IN_A_ROW = 10_000


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
        )
        self.ready: list[list[Sample]] = []  # rows built but not yet handed out in a batch
        self.ended = False

    def batches(self) -> Iterator[dict]:
        while rows := self._next_rows():
            yield self._collate(rows)

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
                return decode_sample(raw, self.tok, self.spec.decode)
            except Skip as exc:
                self.counter.skip(exc.reason, raw.where, exc.detail)
            in_a_row += 1
            if in_a_row >= MAX_SKIPS_IN_A_ROW and not self.spec.finite:  # an endless stream would never yield
                raise ShardError(
                    f"the last {in_a_row} samples were all skipped ({self.counter.skipped}); check "
                    "data.max_sample_length, data.max_images_per_example and the shards (`toolkit data-stats`)"
                )
        return None

    def _collate(self, rows: list[list[Sample]]) -> dict:
        """Decode the pixels only now, so buffers hold encoded bytes; a sample whose image fails leaves its row."""
        encoded = []
        for row in rows:
            out = []
            for s in row:
                try:
                    pixels = load_tiles(s, self.spec.decode)  # (tiles, 3, tile, tile)
                except Skip as exc:
                    self.counter.skip(exc.reason, s.where, exc.detail)
                    continue
                out.append(Encoded(s.input_ids, s.labels, pixels, images=len(s.images), key=s.where))
            encoded.append(out)
        batch = collate(
            encoded,
            capacity=self.spec.capacity,
            pad_id=self.spec.pad_id,
            tile=self.spec.decode.tile,
            batch_rows=self.spec.batch_rows,
        )
        batch["stats"]["reader"] = self.slot.index
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
        self.packer.restore(PackerState(items, list(state["packer_born"]), state["packer_built"]))
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
                "data.num_workers, or start the data stream afresh"
            )
        if state["data"] != fingerprint(list(self.spec.sets)):
            raise ShardError(
                "loader state refers to other shards or weights than data.*_shards now name; "
                "resume with the same data, or start the data stream afresh"
            )

    def _redecode(self, raw: RawSample) -> Sample:
        try:
            return decode_sample(raw, self.tok, self.spec.decode)
        except Skip as exc:
            raise ShardError(
                f"{raw.where} decoded before the checkpoint but not now ({exc}); the shards, "
                "tokenizer or data settings changed since it was saved"
            ) from exc


class PackedStream(IterableDataset):
    """The IterableDataset the loader wraps; each worker builds its own `_Stream` on `iter()`."""

    def __init__(self, spec: StreamSpec, tokenizer: VLMTokenizer, *, rank: int, world: int) -> None:
        self.spec, self.tok, self.rank, self.world = spec, tokenizer, rank, world
        self._stream: _Stream | None = None
        self._pending: dict | None = None

    def __iter__(self) -> Iterator[dict]:
        stream = _Stream(self.spec, self.tok, reader_slot(self.rank, self.world))
        if self._pending:
            stream.load_state_dict(self._pending)
            self._pending = None
        self._stream = stream
        return stream.batches()

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
    return []


class StreamLoader(StatefulDataLoader):
    """A StatefulDataLoader over a `PackedStream`, plus the counters the trainer logs.

    A plain StatefulDataLoader starts over on every `iter()`. A training stream instead continues where the last
    delivered batch left it (through its own state), so a loop that breaks out for evaluation and iterates again
    neither repeats nor skips data. A finite (validation) stream starts over, as a new pass should.
    """

    def __iter__(self) -> Iterator[dict]:
        if not self.dataset.spec.finite and self._iterator is not None:
            self.load_state_dict(self.state_dict())
        return super().__iter__()

    def empty_batch(self) -> dict:
        """A batch of padding only (no targets, no tiles), shaped like every other batch: what a rank whose finite
        pass ended first can feed while other ranks finish theirs, so sharded backends do not wait forever."""
        s = self.dataset.spec
        return collate([], capacity=s.capacity, pad_id=s.pad_id, tile=s.decode.tile, batch_rows=s.batch_rows)

    def counts(self) -> dict:
        """{'read': samples read, 'skipped': {reason: n}} of this rank's readers, as of the batches delivered."""
        read, skipped = 0, {}
        state = self.state_dict() if self._iterator is not None else self.next_iter_state  # loaded, not yet iterated
        if state:
            for st in stream_states(state):
                read += st["counts"]["read"]
                for reason, n in st["counts"]["skipped"].items():
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
    if workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers each tokenize on one thread
    with warnings.catch_warnings():  # torchdata 0.11 calls a torch API that torch 2.13 deprecates
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StreamLoader(
            PackedStream(spec, tok, rank=rank, world=world),
            batch_size=None,
            num_workers=workers,
            prefetch_factor=cfg.data.prefetch_factor if workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
        )


def data_stats(cfg: Config, max_packs: int = 0) -> dict:
    """One pass of the training data through the whole pipeline (no model): counts, skips, fill and speed."""
    loader = build_loader(cfg, rank=0, world=1, finite=True)
    totals = dict.fromkeys(("rows", "samples", "images", "tiles", "tokens", "targets"), 0)
    start = time.perf_counter()
    for batch in loader:
        for k in totals:
            totals[k] += batch["stats"][k]
        if max_packs and totals["rows"] >= max_packs:
            break
    seconds = time.perf_counter() - start
    counts = loader.counts()
    packs = max(totals["rows"], 1)
    return {
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
