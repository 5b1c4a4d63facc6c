"""One source row -> one shard sample: validate the row, read and fully decode its images, encode its JSON part.

One job: the sample format. encode_row either returns a Sample (the `KEY.json` bytes plus each image's original
encoded bytes and size) or raises SkipRow with one of format.WRITE_SKIPS, so the writer can count bad rows by reason and
keep going. Every image is decoded here once, so a corrupt image is found while converting, not while training.
It reads nothing from disk beyond image paths named in the row; where rows come from is sources.py's job.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from toolkit.data.format import MISSING_IMAGE, NO_TEXTS, PLACEHOLDER_MISMATCH, UNREADABLE_IMAGE, WRONG_TYPE
from toolkit.data.images import to_rgb, upright_size
from toolkit.data.prepare.sources import IMAGE_KEYS, BadRow, _encode_json, _is_json

_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


class SkipRow(Exception):
    """A row that cannot become a sample; `reason` is one of format.WRITE_SKIPS (the manifest counts them)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Sample:
    key: str
    meta: dict
    json: bytes  # meta, encoded as it goes into the tar
    images: list[tuple[str, bytes]]  # (extension, original encoded bytes)
    sizes: list[tuple[int, int]]  # (width, height) per image


LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _llava_turns(conversations: Any) -> list[dict[str, str]]:
    """LLaVA's `conversations` ([{from: human, value}, {from: gpt, value}, ...]) as nanoVLM's texts. Such rows
    were counted as no_texts with no word of why. A system message or a turn out of order is refused, not
    guessed at."""
    if not isinstance(conversations, (list, tuple)):
        raise SkipRow(WRONG_TYPE, f"conversations is a {type(conversations).__name__}, not a list")
    roles, values = [], []
    for message in conversations:
        role = LLAVA_ROLES.get(message.get("from")) if isinstance(message, dict) else None
        if role is None or not isinstance(message.get("value"), str):
            raise SkipRow(WRONG_TYPE, f"conversations message {message!r:.80} is not {{from: human|gpt, value: str}}")
        roles.append(role)
        values.append(message["value"])
    if roles != ["user", "assistant"] * (len(roles) // 2):  # an odd count fails it too: one role short
        raise SkipRow(WRONG_TYPE, f"conversations go {'/'.join(roles)[:80]}; give human/gpt pairs, human first")
    return [{"user": values[i], "assistant": values[i + 1]} for i in range(0, len(values), 2)]


def _check_texts(texts: Any, conversations: Any = None) -> list[dict[str, str]]:
    if texts is None and conversations is not None:
        texts = _llava_turns(conversations)
    if texts is None or (isinstance(texts, (list, tuple)) and not texts):
        raise SkipRow(NO_TEXTS)
    if not isinstance(texts, (list, tuple)):
        raise SkipRow(WRONG_TYPE, f"texts is a {type(texts).__name__}, not a list of {{user, assistant}}")
    turns = []
    for turn in texts:
        if not (isinstance(turn, dict) and all(isinstance(turn.get(k), str) for k in ("user", "assistant"))):
            raise SkipRow(WRONG_TYPE, f"turn {turn!r:.80} is not {{user: str, assistant: str}}")
        turns.append({"user": turn["user"], "assistant": turn["assistant"]})
    return turns


def _read_path(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SkipRow(MISSING_IMAGE, str(exc)) from exc


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
    raise SkipRow(WRONG_TYPE, f"image entry of type {type(item).__name__} has neither bytes nor a path")


def _inspect_image(data: bytes) -> tuple[str, tuple[int, int]]:
    """Decode fully (a truncated file only fails on load) and convert as the reader will (images.to_rgb: a 16-bit
    or float image is scaled to 8 bits, not clipped to white), so what fails in training fails here first; return
    (extension, (width, height))."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            to_rgb(img)
            return _EXTENSIONS.get(img.format or "", (img.format or "bin").lower()), upright_size(img)
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError ...
        raise SkipRow(UNREADABLE_IMAGE, f"{type(exc).__name__}: {exc}") from exc


def _row_items(row: dict) -> list:
    """The row's images: its `images` list, or its singular `image` (LLaVA's JSONL key, a column of many hub
    datasets) as one image, which was ignored and left an image row to be written as a text-only sample."""
    images, image = row.get("images"), row.get("image")
    if images is not None and image is not None:
        raise SkipRow(WRONG_TYPE, "the row has both 'images' and 'image'; give its images in one of them")
    if images is None:
        return [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
    if not isinstance(images, (list, tuple)):
        raise SkipRow(WRONG_TYPE, f"images is a {type(images).__name__}, not a list")
    return list(images)


PLACEHOLDER = "<image>"  # LLaVA's mark for where an image goes in the text
_PLACEHOLDER_RE = re.compile(r"[ \t]*<image>[ \t]*\n?")


def _placeholders(turns: list[dict[str, str]], images: int) -> list[dict[str, str]]:
    """The turns without LLaVA-style `<image>` placeholders; PLACEHOLDER_MISMATCH when their count is not the
    number of images.

    The toolkit writes the image tokens itself (nanoVLM's image string before the first turn), so a placeholder
    left in the text would train as the plain words `<image>`; nanoVLM / FineVision texts hold none, LLaVA's do.
    One placeholder per image is stripped, with the space and newline around it ("<image>\\nWhat is it?" ->
    "What is it?"). A count that disagrees (two placeholders for one image, one for none) means the row's text and
    images do not belong together, or images are missing: the row is counted, not guessed at."""
    count = sum(turn[role].count(PLACEHOLDER) for turn in turns for role in ("user", "assistant"))
    if count == 0:
        return turns
    if count != images:
        raise SkipRow(
            PLACEHOLDER_MISMATCH,
            f"the text holds {count} {PLACEHOLDER} placeholders for {images} images; give one per image (they are "
            "stripped: the toolkit places the image tokens itself), or none",
        )
    return [{role: _PLACEHOLDER_RE.sub(" ", text).strip() for role, text in turn.items()} for turn in turns]


def encode_row(index: int, label: str, row: Any) -> Sample:
    """Validate one source row and turn it into a Sample; raises SkipRow with the reason when it cannot."""
    if isinstance(row, BadRow):
        raise SkipRow(row.reason, row.detail)
    if not isinstance(row, dict):
        raise SkipRow(WRONG_TYPE, f"row is a {type(row).__name__}, not an object")
    texts = _check_texts(row.get("texts"), row.get("conversations"))
    items = _row_items(row)
    texts = _placeholders(texts, len(items))
    images, sizes = [], []
    for item in items:
        data = _image_bytes(item)
        ext, size = _inspect_image(data)
        images.append((ext, data))
        sizes.append(size)
    source = row.get("source") if isinstance(row.get("source"), str) else label
    meta = {"texts": texts, "source": source}
    meta.update(
        {k: v for k, v in row.items() if k not in (*IMAGE_KEYS, "texts", "conversations", "source") and _is_json(v)}
    )
    try:
        encoded = _encode_json(meta)
    except ValueError as exc:  # e.g. a lone surrogate from a JSONL escape: not encodable as UTF-8
        raise SkipRow(WRONG_TYPE, f"text is not valid Unicode ({exc})") from exc
    return Sample(key=f"{index:010d}", meta=meta, json=encoded, images=images, sizes=sizes)
