"""The shard format, defined once: what `shard-data` writes and the training stream reads.

A dataset folder holds tar shards and `manifest.json`. A sample is the members `KEY.json`, `KEY.img0.EXT`,
`KEY.img1.EXT`, ... in a row; KEY is a member's path up to the first dot of its file name (WebDataset's
convention), so the images of a sample need no list in its JSON. The skip reasons are the names under which
samples and rows that cannot be used are counted: the reader's by the loader and data-stats, the writer's in the
manifest's "skipped". Both sides import them from here, so a reason cannot be renamed on one side only.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable

FORMAT = "nanovlm-scale-shards/1"  # the manifest's "format"
MANIFEST = "manifest.json"
SHARD_SUFFIX = ".tar"
JSON_EXT = "json"
IMAGE_EXT = re.compile(r"^img(\d+)\.\w+$")  # a member's extension (the part after KEY.) that holds image i


def shard_name(index: int) -> str:
    return f"shard-{index:06d}{SHARD_SUFFIX}"


def json_member(key: str) -> str:
    return f"{key}.{JSON_EXT}"


def image_member(key: str, index: int, ext: str) -> str:
    """`ext` is the image's own file extension (jpg, png, ...): its bytes are stored as they were encoded."""
    return f"{key}.img{index}.{ext}"


def split_member(name: str) -> tuple[str, str]:
    """A member name -> (KEY, extension): the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def image_exts(exts: Iterable[str]) -> list[str]:
    """The image extensions among a sample's member extensions, in image order (img0, img1, ..., img10); for an
    image-caption pair in img2dataset's layout (`KEY.jpg` ...), its one image."""
    return place_images(exts)[0]


def looks_like_image(ext: str) -> bool:
    """A member extension that ends in an image file type (`gif`, `0.jpg`, `seg.png` ...)."""
    return ext.rpartition(".")[2].lower() in IMAGE_FILE_EXTS


def place_images(exts: Iterable[str]) -> tuple[list[str], list[str]]:
    """(the image members in image order, the image-like members the format cannot place).

    The second list is what would otherwise be dropped without a word and leave an image sample training as
    text-only: `KEY.0.jpg` (not `KEY.img0.jpg`), a second `KEY.img0.*`, or two caption-layout images (`KEY.jpg`
    + `KEY.png`: which one goes with the caption?). The reader skips such a sample as UNPLACED_IMAGE."""
    exts = list(exts)
    indexed = sorted((int(m.group(1)), ext) for ext in exts if (m := IMAGE_EXT.match(ext)))
    loose = [ext for ext in exts if looks_like_image(ext) and not IMAGE_EXT.match(ext)]
    if indexed:
        placed, twice = [indexed[0][1]], []
        for (before, _), (index, ext) in itertools.pairwise(indexed):
            (twice if index == before else placed).append(ext)
        return placed, twice + loose
    caption = [ext for ext in loose if ext.lower() in CAPTION_IMAGE_EXTS]
    if len(caption) == 1:
        return caption, [ext for ext in loose if ext != caption[0]]
    return [], loose


# The image file types a sample may hold: what PIL decodes and datasets ship (a GIF trains on its first frame).
IMAGE_FILE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
# img2dataset's image-caption layout: KEY.jpg|png|webp (or another IMAGE_FILE_EXTS) with KEY.txt and/or
# KEY.json {"caption": ...}.
CAPTION_IMAGE_EXTS = IMAGE_FILE_EXTS
CAPTION_EXT = "txt"
CAPTION_FIELD = "caption"

# FineVision's per-turn ratings, one list per field in the sample's JSON (nanoVLM's names); filtered at load time.
RATING_FIELDS = ("relevance_ratings", "image_correspondence_ratings", "visual_dependency_ratings", "formatting_ratings")


# Why the reader skips a sample (or a whole shard, for the last three).
NO_JSON = "no_json"
BAD_JSON = "bad_json"
NO_TEXTS = "no_texts"
BAD_TYPES = "bad_types"
TOO_MANY_IMAGES = "too_many_images"
TOO_MANY_TILES = "too_many_tiles"
TOO_LONG = "too_long"
BAD_TEXT = "bad_text"
BAD_IMAGE = "bad_image"
TRUNCATED_TAR = "truncated_tar"  # the tar ends early: its samples before the cut are kept
BAD_TAR = "bad_tar"
UNREADABLE_SHARD = "unreadable_shard"
NO_TURNS_LEFT = "no_turns_left"  # every turn was below a data.*_min_rating
UNPLACED_IMAGE = "unplaced_image"  # image-like members the format cannot place (KEY.0.jpg, KEY.jpg + KEY.png)
SPLIT_SAMPLE = "split_sample"  # a key whose members are not together in the tar (each part is skipped)
READ_SKIPS = (
    NO_TURNS_LEFT,
    NO_JSON,
    BAD_JSON,
    NO_TEXTS,
    BAD_TYPES,
    TOO_MANY_IMAGES,
    TOO_MANY_TILES,
    TOO_LONG,
    BAD_TEXT,
    BAD_IMAGE,
    UNPLACED_IMAGE,
    SPLIT_SAMPLE,
    TRUNCATED_TAR,
    BAD_TAR,
    UNREADABLE_SHARD,
)

# Why shard-data skips a source row (NO_TEXTS above is shared).
WRONG_TYPE = "wrong_type"
UNREADABLE_IMAGE = "unreadable_image"
MISSING_IMAGE = "missing_image"
INVALID_JSON = "invalid_json"
PLACEHOLDER_MISMATCH = "placeholder_mismatch"  # LLaVA-style <image> placeholders that do not match the images
WRITE_SKIPS = (NO_TEXTS, WRONG_TYPE, UNREADABLE_IMAGE, MISSING_IMAGE, INVALID_JSON, PLACEHOLDER_MISMATCH)
