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
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from toolkit.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

FORMAT = "nanovlm-scale-shards/1"
MANIFEST = "manifest.json"
PROGRESS_DIR = ".progress"
#: Why a row can be skipped; the manifest's "skipped" counts these.
SKIP_REASONS = ("no_texts", "wrong_type", "unreadable_image", "missing_image", "invalid_json")
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
_TAR_MTIME = 946684800  # fixed (2000-01-01) so that shard bytes depend on content only
_ROW_OVERHEAD = 1024  # tar headers and JSON punctuation per row, for the byte estimate
_READ_BATCH = 64  # rows read from Arrow at once: bounds memory when rows hold large images
_LOGGED_PER_REASON = 3


class ShardDataError(ConfigError):
    """The source or OUT cannot be used as given; the message says what to do instead."""


class OutMismatchError(ShardDataError):
    """OUT holds a run made from another source or with other settings."""


class SkipRow(Exception):
    """A row that cannot become a sample; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


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
# Sources: anything that can hand out rows by index range and estimate their encoded size.


@dataclass
class BadRow:
    """A row the source could not even parse (e.g. a JSONL line that is not JSON)."""

    reason: str
    detail: str = ""


class Source:
    """Rows of the concatenated input. Subclasses must pickle cheaply: writer processes receive a copy."""

    name: str
    subsets: list[str]
    num_rows: int

    def rows(self, start: int, stop: int) -> Iterator[tuple[int, str, Any]]:
        """Yield (global index, source label, row dict or BadRow) for rows start..stop-1, in order."""
        raise NotImplementedError

    def row_sizes(self) -> np.ndarray:
        """Estimated encoded bytes of every row (float64, length num_rows), for byte-sized shards."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Changes when the rows change; a resume refuses when it differs from the interrupted run's."""
        raise NotImplementedError


class ArrowSource(Source):
    """One or more `datasets.Dataset`s (subsets), concatenated in the given order as nanoVLM does."""

    def __init__(self, name: str, parts: list[tuple[str, Any]]) -> None:
        missing = [(label, sorted({"images", "texts"} - set(ds.column_names))) for label, ds in parts]
        missing = [(label, cols) for label, cols in missing if cols]
        if missing:
            label, cols = missing[0]
            columns = dict(parts)[label].column_names
            raise ShardDataError(
                f"{label or name} has no column {', '.join(cols)} (columns: {', '.join(columns)}); "
                "shard-data reads the nanoVLM / the_cauldron / FineVision schema: images (list), texts (list of "
                "{user, assistant})"
            )
        self.name = name
        self.subsets = [label for label, _ in parts if label]
        self.parts = [(label, ds.with_format("arrow")) for label, ds in parts]
        self.num_rows = sum(len(ds) for _, ds in self.parts)

    def rows(self, start: int, stop: int) -> Iterator[tuple[int, str, Any]]:
        offset = 0
        for label, ds in self.parts:
            lo, hi = max(start - offset, 0), min(stop - offset, len(ds))
            for a in range(lo, hi, _READ_BATCH):
                batch = ds[a : min(a + _READ_BATCH, hi)].to_pylist()
                for i, row in enumerate(batch):
                    yield offset + a + i, label or self.name, row
            offset += len(ds)

    def row_sizes(self) -> np.ndarray:
        sizes = []
        for _, ds in self.parts:
            for table in ds.iter(batch_size=8192):
                per_row = np.full(table.num_rows, float(_ROW_OVERHEAD))
                for column in table.columns:  # chunk by chunk: combining chunks would copy the image bytes
                    if column.num_chunks:
                        per_row += np.concatenate([payload_bytes(chunk) for chunk in column.chunks])
                sizes.append(per_row)
        return np.concatenate(sizes) if sizes else np.zeros(0)

    def fingerprint(self) -> str:
        parts = []
        for label, ds in self.parts:
            files = [os.path.getsize(f["filename"]) for f in ds.cache_files if os.path.exists(f["filename"])]
            parts.append([label, len(ds), getattr(ds, "_fingerprint", ""), files])
        return _digest(parts)


def payload_bytes(arr: Any) -> np.ndarray:
    """Bytes of all strings and binaries in each row of a (nested) Arrow array.

    Only offset buffers are read, never the image data, so estimating a large memory-mapped table is cheap."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = arr.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = payload_bytes(arr.flatten())
        parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
        return np.bincount(parents, weights=inner, minlength=len(arr)).astype(np.float64)
    if pa.types.is_struct(t):
        total = np.zeros(len(arr))
        for child in arr.flatten():
            total += payload_bytes(child)
        return total
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return pc.binary_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.float64)
    return np.full(len(arr), 8.0)


class JsonlSource(Source):
    """A JSONL file, one sample per line: {"images": [paths relative to the image folder], "texts": [...]}."""

    def __init__(self, path: Path, images: Path) -> None:
        self.name = str(path)
        self.subsets = []
        self.path = path
        self.images = images
        self.offsets: list[tuple[int, int]] = []
        self._sizes: list[float] = []
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            pos = 0
            for line in fh:
                digest.update(line)
                if line.strip():
                    self.offsets.append((pos, len(line)))
                    self._sizes.append(len(line) + self._image_bytes(line) + _ROW_OVERHEAD)
                pos += len(line)
        self.num_rows = len(self.offsets)
        self._fingerprint = digest.hexdigest()

    def _image_bytes(self, line: bytes) -> int:
        try:
            paths = json.loads(line).get("images") or []
            return sum(os.path.getsize(self.images / p) for p in paths if isinstance(p, str))
        except (ValueError, AttributeError, TypeError, OSError):
            return 0  # the row will be skipped when written; the estimate does not matter

    def rows(self, start: int, stop: int) -> Iterator[tuple[int, str, Any]]:
        with open(self.path, "rb") as fh:
            for index in range(start, stop):
                pos, length = self.offsets[index]
                fh.seek(pos)
                try:
                    row = json.loads(fh.read(length))
                except ValueError as exc:
                    yield index, self.name, BadRow("invalid_json", str(exc))
                    continue
                if isinstance(row, dict) and isinstance(row.get("images"), list):
                    row["images"] = [str(self.images / p) if isinstance(p, str) else p for p in row["images"]]
                yield index, self.name, row

    def row_sizes(self) -> np.ndarray:
        return np.asarray(self._sizes, dtype=np.float64)

    def fingerprint(self) -> str:
        return self._fingerprint


class ListSource(Source):
    """Rows already in memory, made by Python code; images as {"bytes": ...}, raw bytes, paths or PIL images."""

    def __init__(self, name: str, rows: list[dict]) -> None:
        self.name = name
        self.subsets = []
        self.rows_ = rows
        self.num_rows = len(rows)

    def rows(self, start: int, stop: int) -> Iterator[tuple[int, str, Any]]:
        for index in range(start, stop):
            yield index, self.name, self.rows_[index]

    def _parts(self, row: Any) -> list[bytes]:
        """The row's JSON part and its images' bytes (pixels for a PIL image): what size and identity depend on."""
        if not isinstance(row, dict):
            return [repr(row).encode()]
        parts = [_encode_json(_json_part(row))]
        for image in row.get("images") or []:
            data = image.get("bytes") if isinstance(image, dict) else image
            if isinstance(data, Image.Image):
                data = data.tobytes()
            parts.append(bytes(data) if isinstance(data, (bytes, bytearray)) else repr(data).encode())
        return parts

    def row_sizes(self) -> np.ndarray:
        return np.asarray([sum(map(len, self._parts(r))) + _ROW_OVERHEAD for r in self.rows_], dtype=np.float64)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for row in self.rows_:
            for part in self._parts(row):
                digest.update(hashlib.sha256(part).digest())
        return digest.hexdigest()


def _json_part(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "images" and _is_json(v)}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Opening SRC.


@contextmanager
def _offline() -> Iterator[None]:
    """Make `datasets` and the Hub client use the local cache only, even if they were imported already."""
    import datasets
    import huggingface_hub.constants as hub

    saved = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"))
    flags = (datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE)
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = flags
        for key, value in zip(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"), saved):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def open_source(src: str, *, subsets: list[str], split: str, images: str | None) -> Source:
    """SRC (folder, file, JSONL or cached hub name) and its subsets -> a Source of concatenated rows."""
    path = Path(src)
    if path.suffix == ".jsonl" and path.is_file():
        if subsets:
            raise ShardDataError("--subsets does not apply to JSONL input; run shard-data once per JSONL file")
        folder = Path(images) if images else path.parent
        if not folder.is_dir():
            raise ShardDataError(f"--images {folder} is not a folder; point it at the JSONL's image folder")
        return JsonlSource(path.resolve(), folder.resolve())
    if images:
        raise ShardDataError(f"--images applies to JSONL input (a .jsonl file) only; {src} is not one")
    with _offline():
        if path.exists():
            if subsets and not path.is_dir():
                raise ShardDataError(f"--subsets needs SRC to be a folder of sub-folders; {src} is a file")
            parts = [(s, _open_local(path / s, split)) for s in subsets or [""]]
            return ArrowSource(str(path.resolve()), parts)
        return ArrowSource(src, [(s, _open_hub(src, s or None, split)) for s in (subsets or [""])])


def _open_local(path: Path, split: str) -> Any:
    import datasets

    if not path.exists():
        siblings = sorted(p.name for p in path.parent.iterdir() if p.is_dir()) if path.parent.is_dir() else []
        raise ShardDataError(f"subset folder {path} does not exist; sub-folders of {path.parent}: {siblings}")
    if path.is_file():
        if path.suffix == ".arrow":
            return datasets.Dataset.from_file(str(path))
        if path.suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(path), split="train")
        raise ShardDataError(f"{path}: expected a .parquet, .arrow or .jsonl file or a folder")
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _pick_split(datasets.load_from_disk(str(path)), split, path)
    for kind in ("parquet", "arrow"):
        # Files beside each other or under data/ (the Hub's layout) are one dataset; deeper ones are subsets.
        if any(path.glob(f"*.{kind}")) or any(path.glob(f"data/**/*.{kind}")):
            try:
                return datasets.load_dataset(kind, data_dir=str(path), split=split)
            except ValueError as exc:
                raise ShardDataError(f"{path}: cannot read split {split!r} ({exc}); choose one with --split") from exc
    subs = sorted(p.name for p in path.iterdir() if p.is_dir())
    raise ShardDataError(
        f"{path} is not a datasets folder (no state.json or dataset_dict.json) and holds no .parquet/.arrow files"
        + (f"; to read its sub-folders pass --subsets {','.join(subs)}" if subs else "")
    )


def _pick_split(data: Any, split: str, where: Any) -> Any:
    import datasets

    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ShardDataError(f"{where} has splits {sorted(data)}, not {split!r}; choose one with --split")
        return data[split]
    return data


def _open_hub(name: str, subset: str | None, split: str) -> Any:
    import datasets

    try:
        return _pick_split(datasets.load_dataset(name, subset, split=split), split, name)
    except ShardDataError:
        raise
    except Exception as exc:  # datasets raises many types here; all mean "not usable offline"
        what = f"{name} (subset {subset})" if subset else name
        call = ", ".join(repr(a) for a in (name, subset) if a)
        raise ShardDataError(
            f"{what} is not a local file or folder and could not be loaded from the local Hugging Face cache "
            f"(shard-data never downloads; {type(exc).__name__}: {exc}). Fetch it first on a machine with network, "
            f"e.g. `datasets.load_dataset({call}).save_to_disk(DIR)`, and pass DIR as SRC."
        ) from exc


# ---------------------------------------------------------------------------------------------------------------
# One row -> one sample.


@dataclass
class Sample:
    key: str
    meta: dict
    json: bytes  # meta, encoded as it goes into the tar
    images: list[tuple[str, bytes]]  # (extension, original encoded bytes)
    sizes: list[tuple[int, int]]  # (width, height) per image


def _is_json(value: Any) -> bool:
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return bool(np.isfinite(value))
    if isinstance(value, (list, tuple)):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


def _check_texts(texts: Any) -> list[dict[str, str]]:
    if texts is None or (isinstance(texts, (list, tuple)) and not texts):
        raise SkipRow("no_texts")
    if not isinstance(texts, (list, tuple)):
        raise SkipRow("wrong_type", f"texts is a {type(texts).__name__}, not a list of {{user, assistant}}")
    turns = []
    for turn in texts:
        if not (isinstance(turn, dict) and all(isinstance(turn.get(k), str) for k in ("user", "assistant"))):
            raise SkipRow("wrong_type", f"turn {turn!r:.80} is not {{user: str, assistant: str}}")
        turns.append({"user": turn["user"], "assistant": turn["assistant"]})
    return turns


def _read_path(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SkipRow("missing_image", str(exc)) from exc


def _image_bytes(item: Any) -> bytes:
    """An image in any of the forms datasets, JSONL or Python hand us -> its encoded bytes."""
    if isinstance(item, Image.Image):
        filename = getattr(item, "filename", "")
        if filename and os.path.isfile(filename):
            return _read_path(filename)
        buf = io.BytesIO()
        item.save(buf, format="PNG")  # lossless: nothing is lost that the caller gave us
        return buf.getvalue()
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, str) and item:
        return _read_path(item)
    if isinstance(item, dict):
        data, path = item.get("bytes"), item.get("path")
        if isinstance(data, (bytes, bytearray, memoryview)):
            return bytes(data)
        if data is None and isinstance(path, str) and path:
            return _read_path(path)
    raise SkipRow("wrong_type", f"image entry of type {type(item).__name__} has neither bytes nor a path")


def _inspect_image(data: bytes) -> tuple[str, tuple[int, int]]:
    """Decode fully (a truncated file only fails on load) and return (extension, (width, height))."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _EXTENSIONS.get(img.format or "", (img.format or "bin").lower()), img.size
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError ...
        raise SkipRow("unreadable_image", f"{type(exc).__name__}: {exc}") from exc


def encode_row(index: int, label: str, row: Any) -> Sample:
    """Validate one source row and turn it into a Sample; raises SkipRow with the reason when it cannot."""
    if isinstance(row, BadRow):
        raise SkipRow(row.reason, row.detail)
    if not isinstance(row, dict):
        raise SkipRow("wrong_type", f"row is a {type(row).__name__}, not an object")
    texts = _check_texts(row.get("texts"))
    items = row.get("images")
    if items is None:
        items = []
    if not isinstance(items, (list, tuple)):
        raise SkipRow("wrong_type", f"images is a {type(items).__name__}, not a list")
    images, sizes = [], []
    for item in items:
        data = _image_bytes(item)
        ext, size = _inspect_image(data)
        images.append((ext, data))
        sizes.append(size)
    source = row.get("source") if isinstance(row.get("source"), str) else label
    meta = {"texts": texts, "source": source}
    meta.update({k: v for k, v in row.items() if k not in ("images", "texts", "source") and _is_json(v)})
    try:
        encoded = _encode_json(meta)
    except ValueError as exc:  # e.g. a lone surrogate from a JSONL escape: not encodable as UTF-8
        raise SkipRow("wrong_type", f"text is not valid Unicode ({exc})") from exc
    return Sample(key=f"{index:010d}", meta=meta, json=encoded, images=images, sizes=sizes)


def _encode_json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


# ---------------------------------------------------------------------------------------------------------------
# Token lengths.


@dataclass
class TokenSpec:
    """How to count a sample's tokens: the model config whose tokenizer and image tiling to use."""

    model: ModelConfig
    include_images: bool
    origin: str  # where the model config came from, for the manifest


class TokenCounter:
    """Tokens of the encoded conversation, image string included, exactly as the training stream builds it."""

    def __init__(self, spec: TokenSpec) -> None:
        from toolkit.data.tokenizer import TokenizerError, load_tokenizer

        self.spec = spec
        try:
            self.tok = load_tokenizer(spec.model)
        except TokenizerError as exc:
            raise ShardDataError(f"--tokenizer: {exc} (model config from {spec.origin})") from exc

    def __call__(self, sample: Sample) -> int:
        from toolkit.data.conversation import encode_sample
        from toolkit.data.images import target_size

        cfg = self.spec.model
        grids = []
        if self.spec.include_images:
            for w, h in sample.sizes:
                th, tw = target_size(
                    h, w, tile=cfg.vit_img_size, max_side=cfg.max_img_size, resize_to_max=cfg.resize_to_max_side_len
                )
                grids.append((th // cfg.vit_img_size, tw // cfg.vit_img_size))
        ids, _ = encode_sample(self.tok, sample.meta["texts"], grids, cfg.mp_image_token_length)
        return len(ids)


def resolve_token_spec(tokenizer: str) -> TokenSpec:
    """--tokenizer DIR -> the model config to count with.

    A nanoVLM config.json in DIR (a checkpoint folder; its lm_tokenizer is resolved against DIR and its parent,
    unless DIR holds the tokenizer itself) or in DIR's parent (a tokenizer inside a checkpoint) gives exact counts
    with image tokens. Otherwise only the conversation's text tokens are counted, and the manifest says so."""
    from toolkit.config import config_from_dict

    path = Path(tokenizer).resolve() if Path(tokenizer).exists() else Path(tokenizer)  # same OUT from any cwd
    for candidate in (path / "config.json", path.parent / "config.json"):
        fields = _nanovlm_fields(candidate)
        if fields is not None:
            if candidate.parent == path and not (path / "tokenizer_config.json").exists():
                name = fields.get("lm_tokenizer", "")
                found = [d / name for d in (path, path.parent) if name and (d / name).is_dir()]
                fields["tokenizer"] = str(found[0]) if found else name
            else:
                fields["tokenizer"] = str(path)
            return TokenSpec(config_from_dict({"model": fields}).model, True, str(candidate))
    from transformers import AutoTokenizer

    try:
        base = len(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
    except (OSError, ValueError) as exc:
        raise ShardDataError(f"--tokenizer {tokenizer}: not a tokenizer folder or cached tokenizer ({exc})") from exc
    model = ModelConfig(lm_base_vocab_size=base, lm_vocab_size=base + ModelConfig().extra_token_amount)
    model.tokenizer = str(path)
    return TokenSpec(model, False, "text only: no nanoVLM config.json beside the tokenizer")


def _nanovlm_fields(path: Path) -> dict | None:
    import dataclasses

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not {"vit_img_size", "lm_base_vocab_size"} <= set(data):
        return None
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return {k: v for k, v in data.items() if k in names}


def token_histogram(lengths: list[int], spec: TokenSpec, bins: int = 32) -> dict:
    """Power-of-two-wide bins covering the shortest to the longest sample, plus the quantiles that help choose
    data.max_sample_length. Bin i counts lengths in [bin_edges[i], bin_edges[i + 1])."""
    arr = np.asarray(lengths, dtype=np.int64)
    low, top = (int(arr.min()), int(arr.max())) if len(arr) else (0, 0)
    width = 1
    while width * bins <= top - low:
        width *= 2
    edges = list(range(low // width * width, (top // width + 2) * width, width))
    counts, _ = np.histogram(arr, bins=edges)
    q = {f"p{p}": int(np.percentile(arr, p, method="higher")) if len(arr) else 0 for p in (50, 90, 99)}
    return {
        "bin_edges": edges,
        "counts": [int(c) for c in counts],
        "min": low,
        "max": top,
        "mean": round(float(arr.mean()), 2) if len(arr) else 0.0,
        **q,
        "includes_image_tokens": spec.include_images,
        "model_config": spec.origin,
    }


# ---------------------------------------------------------------------------------------------------------------
# Writing one shard.


@dataclass
class ShardJob:
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"shard-{self.index:06d}.tar"


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


def write_shard(
    source: Source, job: ShardJob, out: Path, *, counter: TokenCounter | None, progress: Callable[[int], None]
) -> dict:
    """Write one shard atomically and record its stats in .progress/ before it appears under its final name."""
    tmp = out / f".{job.name}.tmp"
    skips: Counter = Counter()
    lengths: list[int] = []
    samples = 0
    with open(tmp, "wb") as fh:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for index, label, row in source.rows(job.start, job.stop):
                progress(1)
                try:
                    sample = encode_row(index, label, row)
                except SkipRow as skip:
                    skips[skip.reason] += 1
                    _log_skip(index, label, skip)
                    continue
                _add_member(tar, f"{sample.key}.json", sample.json)
                for i, (ext, data) in enumerate(sample.images):
                    _add_member(tar, f"{sample.key}.img{i}.{ext}", data)
                if counter is not None:
                    lengths.append(counter(sample))
                samples += 1
        fh.flush()
        os.fsync(fh.fileno())
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


def _init_worker(source: Source, spec: TokenSpec | None, rows_done: Any) -> None:
    _WORKER.update(source=source, counter=TokenCounter(spec) if spec else None, rows_done=rows_done)


def _worker_write(job: ShardJob, out: Path) -> dict:
    pending = 0

    def progress(n: int) -> None:
        nonlocal pending
        pending += n
        if pending >= 16:
            flush()

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
        rows_done = ctx.Value("q", 0)
        pool = ProcessPoolExecutor(
            min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker, initargs=(source, spec, rows_done)
        )
        try:
            pending = {pool.submit(_worker_write, job, out) for job in jobs}
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()  # a writer's exception stops the run; finished shards stay resumable
                bar.update(rows_done.value - bar.n)
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


def _prepare_out(out: Path, settings: dict, jobs: list[ShardJob], resume: bool) -> tuple[dict | None, set[int]]:
    """Start a fresh OUT, or (with resume) check it matches this run and find the shards already complete.

    Returns (complete manifest or None, indices of finished shards)."""
    plan = [[j.start, j.stop] for j in jobs]
    if not _occupied(out):
        (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
        _write_json_atomic(out / MANIFEST, _incomplete_manifest(settings, plan))
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


def _incomplete_manifest(settings: dict, plan: list[list[int]]) -> dict:
    # No shard list until the run is complete, so a reader that ignores "complete" still reads nothing.
    return {
        "format": FORMAT,
        "complete": False,
        "source": settings["source"],
        "settings": settings,
        "plan": plan,
        "shards": [],
    }


def _final_manifest(settings: dict, stats: list[dict], spec: TokenSpec | None, rows: int) -> dict:
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
        "shards": [{"name": s["name"], "samples": s["samples"], "bytes": s["bytes"]} for s in stats],
    }
    if spec is not None:
        lengths = [n for s in stats for n in s["token_lengths"]]
        manifest["token_histogram"] = token_histogram(lengths, spec)
    return manifest


def write_shards(
    source: Source,
    out: str | Path,
    *,
    shard_size: str | int = "256MB",
    workers: int = 1,
    token_spec: TokenSpec | None = None,
    resume: bool = False,
    settings: dict | None = None,
) -> dict:
    """Write `source` into OUT as tar shards and return the manifest (see the module docstring for guarantees)."""
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
    complete, done = _prepare_out(out, settings, jobs, resume)
    if complete is not None:
        log.info("%s is already complete; nothing to do", out)
        return complete
    if done:
        log.info("resuming %s: %d of %d shards already written", out, len(done), len(jobs))
    _run_jobs(source, [j for j in jobs if j.index not in done], out, counter, workers)
    stats = [_finished(out, job) for job in jobs]
    if any(s is None for s in stats):
        raise ShardDataError(f"{out}: some shards are missing after writing; rerun with --resume")
    manifest = _final_manifest(settings, stats, token_spec, source.num_rows)
    _write_json_atomic(out / MANIFEST, manifest)
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    return manifest


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
) -> dict:
    """`python -m toolkit shard-data`: read SRC (see open_source), write OUT/shard-*.tar and OUT/manifest.json.

    `model_config` (a ModelConfig whose tokenizer to use) overrides the config found from `tokenizer`."""
    source = open_source(src, subsets=list(subsets or []), split=split, images=images)
    spec = None
    if model_config is not None:
        spec = TokenSpec(model_config, True, "given model config")
    elif tokenizer:
        spec = resolve_token_spec(tokenizer)
    log.info("%s: %d rows from %s", out, source.num_rows, source.name)
    return write_shards(
        source, out, shard_size=shard_size, workers=workers, token_spec=spec, resume=resume, settings={"split": split}
    )
