"""Sources for shard-data: anything that can hand out rows by index range and estimate their encoded size.

One job: reading the input. A Source knows how many rows there are, yields them in order for any index range (so a
shard is a pure function of its row range), estimates each row's encoded bytes for byte-sized shards, and gives a
fingerprint so a resume can tell whether the input changed. open_source turns SRC (a folder, a file, JSONL or a
cached hub name) into one. Turning a row into a sample is samples.py's job; this module only hands rows out, and
marks a row it cannot even parse as a BadRow instead of failing.

ShardDataError, the user-facing error of shard-data, lives here because opening a source is the first thing that
raises it; the modules above import it from here. The sample's JSON encoding (_is_json, _encode_json) lives here as
well, not in samples.py, because ListSource's size estimate and fingerprint use it and samples.py imports BadRow
from here: keeping both in this lower module keeps imports one-way.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from toolkit.data.format import INVALID_JSON
from toolkit.errors import UserError

_ROW_OVERHEAD = 1024  # tar headers and JSON punctuation per row, for the byte estimate
_READ_BATCH = 64  # rows read from Arrow at once: bounds memory when rows hold large images


class ShardDataError(UserError):
    """The source, OUT or an argument cannot be used as given; the message says what to do instead. Not a
    ConfigError: the CLI labelled `--shard-size 10XB` a "config error" though no config was involved."""


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
            paths = row_images(json.loads(line))
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
                    yield index, self.name, BadRow(INVALID_JSON, str(exc))
                    continue
                if isinstance(row, dict):
                    self._resolve(row)
                yield index, self.name, row

    def _resolve(self, row: dict) -> None:
        """Image paths relative to the image folder, under `images` or LLaVA's singular `image` (a path or list)."""
        for key in IMAGE_KEYS:
            value = row.get(key)
            if isinstance(value, str):
                row[key] = str(self.images / value)
            elif isinstance(value, list):
                row[key] = [str(self.images / p) if isinstance(p, str) else p for p in value]

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
        try:
            parts = [_encode_json(_json_part(row))]
        except UnicodeEncodeError:  # a lone surrogate: encode_row skips the row (wrong_type); still count its text
            parts = [repr(_json_part(row)).encode()]
        for image in row_images(row):
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


def _json_part(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in IMAGE_KEYS and _is_json(v)}


IMAGE_KEYS = ("images", "image")  # a row's image list, or LLaVA's (and many hub datasets') one image


def row_images(row: dict) -> list:
    """The row's images for sizing and fingerprints: its `images` list, or its singular `image` as one. A row
    with both, or with a value of the wrong type, is refused by encode_row; here it counts what it can."""
    images = row.get("images")
    if images is None and row.get("image") is not None:
        images = [row["image"]]
    return list(images) if isinstance(images, (list, tuple)) else []


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _encode_json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


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
        _one_split(src, split, "a JSONL file")
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
        if path.suffix in (".arrow", ".parquet"):
            _one_split(path, split, f"a single .{path.suffix[1:]} file")
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
    if data.split is None or str(data.split) != split:  # a saved Dataset knows the split it was cut from, if any
        _one_split(where, split, f"a saved Dataset{f' of split {str(data.split)!r}' if data.split else ''}")
    return data


def _one_split(where: Any, split: str, kind: str) -> None:
    """A source of one split cannot choose one: `--split validation` wrote its (training) rows labelled
    "validation", so a run validated on its own training data. The default ("train") reads it as it is."""
    if split != "train":
        raise ShardDataError(
            f"{where} is {kind}, one split with no name to choose, so --split {split} would label its rows "
            f"{split!r}; shard a held-out file by passing it as SRC without --split, or hold rows out of this one "
            "with --holdout"
        )


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
