"""One source row -> one shard sample: validate the row, read and fully decode its images, encode its JSON part.

One job: the sample format. encode_row either returns a Sample (the `KEY.json` bytes plus each image's original
encoded bytes and size) or raises SkipRow with one of format.WRITE_SKIPS, so the writer can count bad rows by reason and
keep going. Every image is decoded here once, so a corrupt image is found while converting, not while training.
It reads nothing from disk beyond image paths named in the row; where rows come from is sources.py's job.
A row's turns come from nanoVLM's `texts`, LLaVA's `conversations` or the chat format's `messages`, whatever
the source type. nothing_written turns a run that wrote no sample into an error saying why, for the writer.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from toolkit.data.format import MISSING_IMAGE, NO_TEXTS, PLACEHOLDER_MISMATCH, UNREADABLE_IMAGE, WRONG_TYPE
from toolkit.data.images import to_rgb, upright_size
from toolkit.data.prepare.sources import (
    IMAGE_KEYS,
    TURN_KEYS,
    BadRow,
    ShardDataError,
    Source,
    _encode_json,
    _is_json,
)

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
CHAT_ROLES = ("user", "assistant")


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
    return _paired("conversations", roles, values, "human/gpt")


def _chat_turns(messages: Any) -> list[dict[str, str]]:
    """The chat format of OpenAI and transformers' chat templates (`messages`: [{role: user, content}, {role:
    assistant, content}, ...]) as nanoVLM's texts; such rows were counted as no_texts with no word of why. As
    for LLaVA's conversations, a system message or a turn out of order is refused, not guessed at."""
    if not isinstance(messages, (list, tuple)):
        raise SkipRow(WRONG_TYPE, f"messages is a {type(messages).__name__}, not a list")
    roles, values = [], []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in CHAT_ROLES:
            raise SkipRow(
                WRONG_TYPE, f"messages entry {message!r:.80} is not {{role: user|assistant, content}} (no system role)"
            )
        roles.append(role)
        values.append(_chat_content(message.get("content")))
    return _paired("messages", roles, values, "user/assistant")


def _chat_content(content: Any) -> str:
    """A message's content as one string: a string as it is, or a list of parts as transformers' chat templates
    take them ([{type: image}, {type: text, text}]), the texts joined as those templates join them (nothing
    between) and each image part as LLaVA's `<image>\\n`, so _placeholders checks and strips it as it does
    LLaVA's. Another part type (image_url, video ...) is refused: its image is not among the row's images."""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise SkipRow(WRONG_TYPE, f"message content is a {type(content).__name__}, not a string or a list of parts")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            pieces.append(PLACEHOLDER + "\n")
        elif kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            raise SkipRow(
                WRONG_TYPE,
                f"message part {part!r:.80} is not {{type: text, text: str}} or {{type: image}} (the row's images "
                "go under 'images')",
            )
    return "".join(pieces)


def _paired(key: str, roles: list[str], values: list[str], names: str) -> list[dict[str, str]]:
    """Alternating user/assistant messages as turns; an odd count fails too (a question without its answer)."""
    if roles != ["user", "assistant"] * (len(roles) // 2):
        raise SkipRow(WRONG_TYPE, f"{key} go {'/'.join(roles)[:80]}; give {names} pairs, {names.split('/')[0]} first")
    return [{"user": values[i], "assistant": values[i + 1]} for i in range(0, len(values), 2)]


def _row_turns(row: dict) -> list[dict[str, str]]:
    """The row's turns from the one of TURN_KEYS it fills: nanoVLM's texts, LLaVA's conversations or the chat
    format's messages. A row filling two is refused, as one with both `images` and `image` is: the first was taken
    and the other's turns dropped without a word. A None or empty one beside them (a column of another part of a
    concatenated dataset) does not count."""
    given = [k for k in TURN_KEYS if row.get(k) is not None]
    filled = [k for k in given if not (isinstance(row[k], (list, tuple)) and not row[k])]
    if len(filled) > 1:
        raise SkipRow(WRONG_TYPE, f"the row has both {' and '.join(map(repr, filled))}; give its turns in one of them")
    key = (filled or given or [None])[0]
    if key is None:
        raise SkipRow(NO_TEXTS, _no_turns(row))
    readers = {"texts": lambda texts: texts, "conversations": _llava_turns, "messages": _chat_turns}
    texts = readers[key](row[key])
    if isinstance(texts, (list, tuple)) and not texts:
        raise SkipRow(NO_TEXTS, f"its '{key}' is empty")
    return _check_texts(texts)


def _no_turns(row: dict) -> str:
    """What a row without turns has, and what shard-data reads: a source in another format (a `question` and
    `answer` column, say) was skipped row by row as no_texts with no word of which keys were looked for."""
    keys = [f"{k} (null)" if v is None else k for k, v in row.items()]
    shown = ", ".join(keys[:20]) + (f" ... ({len(keys)} keys)" if len(keys) > 20 else "")
    return (
        f"the row has no turns; its keys: {shown or 'none'}. shard-data reads turns from 'texts' ([{{user, "
        "assistant}]), 'conversations' (LLaVA: [{from: human|gpt, value}]) or 'messages' (chat: [{role: "
        "user|assistant, content}]), and images from 'images' (a list) or 'image' (one): rename the row's keys "
        "to these"
    )


def _check_texts(texts: Any) -> list[dict[str, str]]:
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
    if isinstance(item, np.ndarray):  # (H, W) or (H, W, 3|4) pixels, as numpy and many loaders hand them over
        try:
            item = Image.fromarray(item)
        except (TypeError, ValueError) as exc:
            raise SkipRow(WRONG_TYPE, f"an array of shape {item.shape} and {item.dtype} is not an image") from exc
    if isinstance(item, Image.Image):
        return _pil_bytes(item)
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


PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")


def _pil_bytes(item: Image.Image) -> bytes:
    """A PIL image's bytes: its file's when it holds these very pixels (no re-encoding of a JPEG), else lossless
    PNG of its pixels. The file was taken whenever the image had one, so an image changed in place after opening
    (thumbnail, paste) was written as the original; a mode PNG cannot hold (CMYK ...) stopped the whole run."""
    filename = getattr(item, "filename", "")
    if filename and os.path.isfile(filename) and _same_pixels(item, filename):
        return _read_path(filename)
    buf = io.BytesIO()
    (item if item.mode in PNG_MODES else to_rgb(item)).save(buf, format="PNG")
    return buf.getvalue()


def _same_pixels(item: Image.Image, filename: str) -> bool:
    try:
        with Image.open(filename) as disk:
            return disk.size == item.size and disk.mode == item.mode and disk.tobytes() == item.tobytes()
    except Exception:  # an unreadable file: the in-memory pixels are what there is
        return False


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
    texts = _row_turns(row)
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
    meta.update({k: v for k, v in row.items() if k not in (*IMAGE_KEYS, *TURN_KEYS, "source") and _is_json(v)})
    try:
        encoded = _encode_json(meta)
    except ValueError as exc:  # e.g. a lone surrogate from a JSONL escape: not encodable as UTF-8
        raise SkipRow(WRONG_TYPE, f"text is not valid Unicode ({exc})") from exc
    return Sample(key=f"{index:010d}", meta=meta, json=encoded, images=images, sizes=sizes)


def nothing_written(manifest: dict, source: Source | None = None) -> ShardDataError | None:
    """The error for a run in which no row became a sample, or None when some did (or there were no rows).

    Such a run finished with exit 0 and a complete manifest of `"samples": 0`, the reason only a count (e.g.
    no_texts: 5) and its detail a few log lines up. shard_writer decides whether to raise it; this says why: the
    counts, and with `source`, the first row's own skip message (encoded again: only that row is read)."""
    rows, skipped = manifest.get("rows") or 0, manifest.get("skipped") or {}
    if manifest.get("samples") or not rows:
        return None
    counts = ", ".join(f"{skipped[reason]} {reason}" for reason in sorted(skipped))
    first = ""
    for index, label, row in source.rows(0, 1) if source is not None else ():
        try:
            encode_row(index, label, row)
        except SkipRow as skip:
            first = f"; row {index}, for one: {skip}"
    return ShardDataError(
        f"none of the {rows} rows of {manifest.get('source')} became a sample (skipped: {counts}){first}. Fix the "
        "rows (or --images, when images are missing) and write into a new OUT"
    )
