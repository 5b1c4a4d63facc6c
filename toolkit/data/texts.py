"""A shard sample's members -> its conversation turns: `texts`, nanoVLM's rating filter, or a caption pair.

Kept apart from shards.py (tar reading, splitting, accounting) because it is the one place that reads what a
sample *says*, and three sources of turns meet here: the toolkit's own `texts`, FineVision's per-turn ratings
that filter them, and img2dataset's image-caption pairs that have no turns at all.
"""

from __future__ import annotations

import json
from typing import Any

from toolkit.data.format import (
    BAD_JSON,
    BAD_TEXT,
    BAD_TYPES,
    CAPTION_EXT,
    CAPTION_FIELD,
    CAPTION_IMAGE_EXTS,
    JSON_EXT,
    NO_JSON,
    NO_TEXTS,
    NO_TURNS_LEFT,
)


class Skip(Exception):
    """A sample that cannot be trained on; `reason` is the counter it goes to."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def parse_texts(
    files: dict[str, bytes], *, caption_prompt: str | None = None, min_ratings: tuple[tuple[str, int], ...] = ()
) -> list[dict]:
    """The sample's turns [{user, assistant}, ...], or `Skip`.

    `caption_prompt` turns an image-caption pair into one turn (user = the prompt, assistant = the caption);
    None refuses such pairs as `no_texts`. `min_ratings` = ((field, minimum), ...) drops turns as nanoVLM does.
    """
    meta = _meta(files, allow_missing=caption_prompt is not None and CAPTION_EXT in files)
    texts = meta.get("texts")
    if not texts:
        caption = _caption(files, meta) if caption_prompt is not None else None
        if caption is None:
            raise Skip(NO_TEXTS, "the JSON has no 'texts'")
        return _encodable([{"user": caption_prompt, "assistant": caption}])
    if not isinstance(texts, list) or not all(
        isinstance(t, dict) and isinstance(t.get("user"), str) and isinstance(t.get("assistant"), str) for t in texts
    ):
        raise Skip(BAD_TYPES, "'texts' must be a list of {user: str, assistant: str}")
    kept = rated_turns(meta, texts, min_ratings)
    if not kept:
        raise Skip(NO_TURNS_LEFT, f"all {len(texts)} turns rated below {dict(min_ratings)}")
    return _encodable(kept)


def _encodable(turns: list[dict]) -> list[dict]:
    """The turns, or BAD_TEXT if one is not valid Unicode.

    JSON may escape half of a UTF-16 pair (`"\\ud83d"`, a cut emoji, common in scraped text); Python's json reads
    it into a str that no UTF-8 codec accepts, and the tokenizer would fail on it deep inside (a TypeError that
    stops the run) instead of the sample being skipped here."""
    for i, turn in enumerate(turns):
        for role in ("user", "assistant"):
            try:
                turn[role].encode("utf-8")
            except UnicodeEncodeError as exc:
                bad = turn[role][exc.start : exc.end].encode("unicode_escape").decode()
                raise Skip(
                    BAD_TEXT,
                    f"turn {i}'s {role} text holds a lone UTF-16 surrogate ({bad}, half of a character): fix the "
                    "text at its source (or drop the sample) and rewrite the shard",
                ) from exc
    return turns


def _meta(files: dict[str, bytes], *, allow_missing: bool) -> dict:
    if JSON_EXT not in files:
        if allow_missing:
            return {}
        raise Skip(NO_JSON, "the sample has no .json member")
    try:
        meta = json.loads(files[JSON_EXT])
    except ValueError as exc:
        raise Skip(BAD_JSON, str(exc)) from exc
    return meta if isinstance(meta, dict) else {}


def _caption(files: dict[str, bytes], meta: dict) -> str | None:
    """img2dataset's caption: KEY.txt, else the JSON's `caption`; only for a sample in that layout (KEY.jpg ...)."""
    if not any(ext.lower() in CAPTION_IMAGE_EXTS for ext in files):
        return None
    if CAPTION_EXT in files:
        text = files[CAPTION_EXT].decode("utf-8", errors="replace").strip()
    else:
        text = meta.get(CAPTION_FIELD)
    return text if isinstance(text, str) and text.strip() else None


def rated_turns(meta: dict, texts: list[dict], min_ratings: tuple[tuple[str, int], ...]) -> list[dict]:
    """nanoVLM's rule (data/datasets.py `_get_messages`): the fields are checked in order and a turn goes at the
    first rating below its field's minimum; a missing list or a None entry passes that field, and an entry that
    cannot be read (a list too short, not a number) ends the checks with the turn kept, as nanoVLM's `except` does.
    The image string then goes to the first kept turn."""
    return [turn for i, turn in enumerate(texts) if not _dropped(meta, i, min_ratings)]


def _dropped(meta: dict, index: int, min_ratings: tuple[tuple[str, int], ...]) -> bool:
    for field, minimum in min_ratings:
        ratings: Any = meta.get(field)
        if ratings is None:
            continue
        try:
            value = ratings[index]
            if value is not None and value < minimum:
                return True
        except (IndexError, KeyError, TypeError):
            return False
    return False
