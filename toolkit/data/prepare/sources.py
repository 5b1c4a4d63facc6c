"""Sources for shard-data: anything that can hand out rows by index range and estimate their encoded size.

One job: reading the input. A Source knows how many rows there are, yields them in order for any index range (so a
shard is a pure function of its row range), estimates each row's encoded bytes for byte-sized shards, and gives a
fingerprint so a resume can tell whether the input changed. open_source turns SRC (a folder, a file, JSONL, a
JSON list of rows or a cached hub name) into one, with relative image paths resolved against the source's folder
or --images. Turning a row into a sample is samples.py's job; this module only hands rows out, and
marks a row it cannot even parse as a BadRow instead of failing.

ShardDataError, the user-facing error of shard-data, lives here because opening a source is the first thing that
raises it; the modules above import it from here. The sample's JSON encoding (_is_json, _encode_json) lives here as
well, not in samples.py, because ListSource's size estimate and fingerprint use it and samples.py imports BadRow
from here: keeping both in this lower module keeps imports one-way.
"""

from __future__ import annotations

import codecs
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
    """One or more `datasets.Dataset`s (subsets), concatenated in the given order as nanoVLM does.

    `images` holds, per part, the folder its relative image paths are read from (a string column of paths, or an
    Image feature stored as a path only); they were read from the current directory, so every such row of a
    parquet file beside its image folder was counted missing_image. None leaves the paths as they are."""

    def __init__(self, name: str, parts: list[tuple[str, Any]], images: list[Path | None] | None = None) -> None:
        for label, ds in parts:
            _check_columns(label or name, ds.column_names)
        self.name = name
        self.subsets = [label for label, _ in parts if label]
        self.parts = [(label, ds.with_format("arrow")) for label, ds in parts]
        self.bases = list(images) if images is not None else [None] * len(parts)
        self.num_rows = sum(len(ds) for _, ds in self.parts)

    def rows(self, start: int, stop: int) -> Iterator[tuple[int, str, Any]]:
        offset = 0
        for (label, ds), base in zip(self.parts, self.bases, strict=True):
            lo, hi = max(start - offset, 0), min(stop - offset, len(ds))
            for a in range(lo, hi, _READ_BATCH):
                batch = ds[a : min(a + _READ_BATCH, hi)].to_pylist()
                for i, row in enumerate(batch):
                    if base is not None:
                        resolve_images(row, base)
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


def _check_columns(label: str, columns: list[str]) -> None:
    """A dataset needs a column of images and one of turns, under any of the names encode_row reads; without an
    image column every row would be written text-only, so a column under another name is refused, not ignored."""
    missing = [" or ".join(keys) for keys in (IMAGE_KEYS, TURN_KEYS) if not set(keys) & set(columns)]
    if missing:
        raise ShardDataError(
            f"{label} has no column {' and no '.join(missing)} (columns: {', '.join(columns)}); shard-data reads "
            "images from `images` (a list) or `image` (one), and turns from `texts` ([{user, assistant}]: nanoVLM, "
            "the_cauldron, FineVision), `conversations` (LLaVA: [{from: human|gpt, value}]) or `messages` (chat: "
            "[{role: user|assistant, content}]); rename the columns to these (datasets' rename_column)"
        )


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
        self._scan(digest)
        self.num_rows = len(self.offsets)
        self._fingerprint = digest.hexdigest()

    def _scan(self, digest: Any) -> None:
        """Record every row's (byte offset, length) and size estimate, so rows() can seek to any row range."""
        with open(self.path, "rb") as fh:
            pos = 0
            for line in fh:
                digest.update(line)
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError:
                        row = None  # rows() yields it as a BadRow; the estimate does not matter
                    self._add(pos, len(line), row)
                pos += len(line)

    def _add(self, pos: int, length: int, row: Any) -> None:
        self.offsets.append((pos, length))
        self._sizes.append(length + self._image_bytes(row) + _ROW_OVERHEAD)

    def _image_bytes(self, row: Any) -> int:
        try:
            return sum(os.path.getsize(self.images / p) for p in row_images(row) if isinstance(p, str))
        except (AttributeError, TypeError, OSError):
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
                    resolve_images(row, self.images)
                yield index, self.name, row

    def row_sizes(self) -> np.ndarray:
        return np.asarray(self._sizes, dtype=np.float64)

    def fingerprint(self) -> str:
        return self._fingerprint


class JsonArraySource(JsonlSource):
    """A .json file whose top level is a list of row objects (LLaVA's llava_v1_5_mix665k.json), read as JSONL is.

    It was refused ("expected a .parquet, .arrow or .jsonl"), and converting it to JSONL first was the user's job.
    A JSON document has no lines to seek to, so the whole file is parsed once here to find where each row starts
    and ends (the text is held in memory meanwhile); rows() then reads one row's bytes at a time, as for JSONL, so
    the source stays cheap to hand to writer processes. An invalid document fails as a whole: unlike a JSONL line,
    one bad row leaves no way to find where the next one starts."""

    def _scan(self, digest: Any) -> None:
        data = self.path.read_bytes()
        digest.update(data)
        start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
        try:
            text = data[start:].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ShardDataError(f"{self.path} is not UTF-8 text ({exc}); save it as UTF-8 JSON") from None
        del data
        try:
            objects = self._elements(text, start)
        except json.JSONDecodeError as exc:
            raise ShardDataError(
                f"{self.path} is not valid JSON ({exc}); fix it, or give the rows as JSONL (one object per line), "
                "where a bad line is skipped and counted rather than failing the file"
            ) from None
        if self.offsets and not objects:
            raise ShardDataError(
                f"{self.path} is a JSON list of no objects; shard-data reads a list of row objects, each with "
                "images and turns ({'image': ..., 'conversations': [...]}, or 'images' + 'texts' or 'messages')"
            )

    def _elements(self, text: str, base: int) -> int:
        """Record each element of the top-level list; returns how many are objects. `base` + the bytes of the
        elements seen so far turn a character position into a byte offset (only elements hold non-ASCII)."""
        decoder, shift, objects = json.JSONDecoder(), base, 0
        i = _skip_space(text, 0)
        if text[i : i + 1] != "[":
            decoder.raw_decode(text, i)  # not JSON at all: raises with its position
            raise ShardDataError(
                f"{self.path} holds one JSON {_JSON_KINDS.get(text[i], 'value')}, not a list of rows; shard-data reads "
                "a .json file whose top level is a list of row objects (LLaVA's format), or JSONL (one object per "
                "line). A save_to_disk folder's own .json files are read by passing the folder as SRC"
            )
        i = _skip_space(text, i + 1)
        while text[i : i + 1] != "]":
            row, end = decoder.raw_decode(text, i)
            length = len(text[i:end].encode("utf-8"))
            self._add(i + shift, length, row)
            objects += isinstance(row, dict)
            shift += length - (end - i)
            i = _skip_space(text, end)
            if text[i : i + 1] == ",":
                i = _skip_space(text, i + 1)
                if text[i : i + 1] == "]":
                    raise json.JSONDecodeError("Trailing comma before ']'", text, i)
            elif text[i : i + 1] != "]":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, i)
        if _skip_space(text, i + 1) != len(text):
            raise json.JSONDecodeError("Extra data after the list", text, _skip_space(text, i + 1))
        return objects


_JSON_KINDS = {"{": "object", '"': "string"}


def _skip_space(text: str, i: int) -> int:
    """The first position at or after `i` that is not JSON whitespace."""
    while i < len(text) and text[i] in " \t\n\r":
        i += 1
    return i


def resolve_images(row: dict, folder: Path) -> None:
    """Image paths in the row made relative to `folder` (an absolute path stays as it is): under `images` or
    LLaVA's singular `image`, as a path string, a list of them, or datasets' {bytes: None, path} of an Image
    stored as a path only. Paths were read from the current directory, wherever SRC was."""
    for key in IMAGE_KEYS:
        value = row.get(key)
        if isinstance(value, list):
            row[key] = [_resolved(item, folder) for item in value]
        elif value is not None:
            row[key] = _resolved(value, folder)


def _resolved(item: Any, folder: Path) -> Any:
    if isinstance(item, str) and item:
        return str(folder / item)
    if isinstance(item, dict) and item.get("bytes") is None and isinstance(item.get("path"), str) and item["path"]:
        return {**item, "path": str(folder / item["path"])}
    return item


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
TURN_KEYS = ("texts", "conversations", "messages")  # nanoVLM's turns, LLaVA's, chat templates' (read in order)


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
    """SRC (folder, file, JSONL, a JSON list of rows or cached hub name) and its subsets -> a Source of
    concatenated rows. Relative image paths in the rows are read from `images` when given, else from the folder
    of SRC's file, SRC itself (a folder) or each subset's folder; a hub dataset's are left as they are."""
    path = Path(src)
    folder = _image_folder(images)
    suffix = path.suffix.lower()  # `DATA.JSONL` was not JSONL, and fell through to a confusing refusal
    if suffix in (".jsonl", ".json") and path.is_file():
        kind = "a JSONL file" if suffix == ".jsonl" else "a JSON file"
        if subsets:
            raise ShardDataError(f"--subsets does not apply to {kind}; run shard-data once per file")
        _one_split(src, split, kind)
        reader = JsonlSource if suffix == ".jsonl" else JsonArraySource
        return reader(path.resolve(), folder or path.parent.resolve())
    with _offline():
        if path.exists():
            if subsets and not path.is_dir():
                raise ShardDataError(f"--subsets needs SRC to be a folder of sub-folders; {src} is a file")
            parts = [(s, _open_local(path / s, split)) for s in subsets or [""]]
            bases = [folder or _own_folder(path / s) for s in subsets or [""]]
            return ArrowSource(str(path.resolve()), parts, bases)
        parts = [(s, _open_hub(src, s or None, split)) for s in (subsets or [""])]
        return ArrowSource(src, parts, [folder] * len(parts))


def _image_folder(images: str | None) -> Path | None:
    """--images, checked: the folder relative image paths start from, for any source (it was JSONL's only, and a
    parquet file's relative paths were read from the current directory)."""
    if not images:
        return None
    folder = Path(images)
    if not folder.is_dir():
        raise ShardDataError(
            f"--images {folder} is not a folder; point it at the folder the rows' relative image paths start from"
        )
    return folder.resolve()


def _own_folder(path: Path) -> Path:
    """Where a local source's relative image paths start by default: a file's folder, or the folder itself."""
    return (path.parent if path.is_file() else path).resolve()


def _open_local(path: Path, split: str) -> Any:
    import datasets

    if not path.exists():
        siblings = sorted(p.name for p in path.parent.iterdir() if p.is_dir()) if path.parent.is_dir() else []
        raise ShardDataError(f"subset folder {path} does not exist; sub-folders of {path.parent}: {siblings}")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".arrow", ".parquet"):
            _one_split(path, split, f"a single {suffix} file")
        if suffix == ".arrow":
            return datasets.Dataset.from_file(str(path))
        if suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(path), split="train")
        raise ShardDataError(
            f"{path}: expected a .parquet or .arrow file or a folder here; a .jsonl file, or a .json file holding a "
            "list of rows, is read when given as SRC itself (without --subsets)"
        )
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _pick_split(datasets.load_from_disk(str(path)), split, path)
    for kind in ("parquet", "arrow"):
        # Files beside each other or under data/ (the Hub's layout) are one dataset; deeper ones are subsets.
        if _holds(path, kind):
            try:
                return datasets.load_dataset(kind, data_dir=str(path), split=split)
            except ValueError as exc:
                raise ShardDataError(f"{path}: cannot read split {split!r} ({exc}); choose one with --split") from exc
    subs = sorted(p.name for p in path.iterdir() if p.is_dir())
    raise ShardDataError(
        f"{path} is not a datasets folder (no state.json or dataset_dict.json) and holds no .parquet/.arrow files"
        + (f"; to read its sub-folders pass --subsets {','.join(subs)}" if subs else "")
    )


def _holds(folder: Path, kind: str) -> bool:
    """Whether `folder` holds .kind files beside each other or under data/, the suffix in any case: a folder of
    `*.PARQUET` files (which datasets reads) was refused as holding none."""
    files = [*folder.iterdir(), *(folder / "data").rglob("*")] if (folder / "data").is_dir() else folder.iterdir()
    return any(f.suffix.lower() == f".{kind}" and f.is_file() for f in files)


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
