"""Shapes-VQA: a small synthetic vision-language dataset that a tiny model can learn in minutes on a CPU.

Each 64x64 image holds saturated shapes (circle, square, triangle, cross) in five far-apart colours on a light,
plain or lightly noisy background, and each sample asks one question with a one-word answer. The question types
are balanced by index (colour, shape, count, position, colour, ...), and each type gets a layout that makes its
answer unambiguous: colour and shape questions show one shape nearly filling the image; count questions put one
small shape in each of 1-4 distinct quadrants (so every 32 px tile holds at most one shape); position questions
put one shape against the middle of an edge, clear of the centre lines.

Every sample is a pure function of (seed, split, index), so the dataset is identical for any sample count prefix
and any machine. The tokenizer is trained on every sentence the generator can produce (not on the drawn sample),
so it is the same for every seed and size, and always reaches exactly the tiny preset's `lm_base_vocab_size`.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from toolkit.data.prepare.shard_writer import OutMismatchError, ShardDataError, Source, TokenSpec, write_shards

IMAGE_SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (20, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 200, 0),
    "purple": (140, 40, 185),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("left", "right", "top", "bottom")
NUMBERS = ("one", "two", "three", "four")
QUESTION_TYPES = ("colour", "shape", "count", "position")
TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the shape?", "What colour is the {shape}?", "What color is it?"),
    "shape": ("What shape is it?", "What shape is the {colour} object?", "Which shape is shown?"),
    "count": ("How many shapes are there?", "How many shapes can you see?", "Count the shapes."),
    "position": ("Where is the {shape}?", "Where is the {colour} {shape}?", "On which side is the {colour} shape?"),
}
QUADRANTS = {(0, 0): "top left", (1, 0): "top right", (0, 1): "bottom left", (1, 1): "bottom right"}
_WHERE = {
    "middle": "in the middle",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
SOURCE = "synth-shapes"
VERSION = 2  # bump when the generator changes, so an old OUT is never mistaken for the new one
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_SPLITS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cx: float  # centre, pixels
    cy: float
    size: float  # side or diameter, pixels


def draw(shapes: list[Shape], rng: np.random.Generator, noisy: bool) -> Image.Image:
    """Render shapes over a light background; noise (if any) stays on the background so colours stay exact."""
    level = int(rng.integers(225, 251))
    bg = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), level, dtype=np.int16)
    if noisy:
        bg += rng.integers(-6, 7, size=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.int16)
    img = Image.fromarray(bg.clip(0, 255).astype(np.uint8), "RGB")
    pen = ImageDraw.Draw(img)
    for s in shapes:
        r, fill = s.size / 2, COLOURS[s.colour]
        box = (s.cx - r, s.cy - r, s.cx + r, s.cy + r)
        if s.kind == "circle":
            pen.ellipse(box, fill=fill)
        elif s.kind == "square":
            pen.rectangle(box, fill=fill)
        elif s.kind == "triangle":
            pen.polygon([(s.cx, s.cy - r), (s.cx + r, s.cy + r), (s.cx - r, s.cy + r)], fill=fill)
        else:  # cross: two bars a third of the size thick
            t = s.size / 6
            pen.rectangle((s.cx - t, s.cy - r, s.cx + t, s.cy + r), fill=fill)
            pen.rectangle((s.cx - r, s.cy - t, s.cx + r, s.cy + t), fill=fill)
    return img


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _centred(rng: np.random.Generator) -> Shape:
    # Nearly filling the image, of nearly one size and barely moved: the image tokens of the four corner 16 px
    # cells then differ per shape (square full, circle a third, triangle bottom only, cross empty), which a
    # small model trained from scratch picks up within minutes; smaller shapes differ only inside a token.
    size = float(rng.uniform(55, 58))
    cx, cy = (float(IMAGE_SIZE / 2 + rng.uniform(-1, 1)) for _ in range(2))
    return Shape(_pick(rng, SHAPES), _pick(rng, list(COLOURS)), cx, cy, size)


def _at_side(rng: np.random.Generator, side: str) -> Shape:
    size = float(rng.uniform(16, 22))
    r = size / 2
    near = float(rng.uniform(r + 2, IMAGE_SIZE / 2 - r - 2))  # wholly on its side of the centre line
    along = float(IMAGE_SIZE / 2 + rng.uniform(-6, 6))
    cx, cy = {
        "left": (near, along),
        "right": (IMAGE_SIZE - near, along),
        "top": (along, near),
        "bottom": (along, IMAGE_SIZE - near),
    }[side]
    return Shape(_pick(rng, SHAPES), _pick(rng, list(COLOURS)), cx, cy, size)


def _in_quadrants(rng: np.random.Generator, n: int) -> list[Shape]:
    cells = list(QUADRANTS)
    order = rng.permutation(len(cells))[:n]
    shapes = []
    for i in sorted(int(k) for k in order):
        qx, qy = cells[i]
        size = float(rng.uniform(14, 20))
        cx = qx * 32 + 16 + float(rng.uniform(-4, 4))
        cy = qy * 32 + 16 + float(rng.uniform(-4, 4))
        shapes.append(Shape(_pick(rng, SHAPES), _pick(rng, list(COLOURS)), cx, cy, size))
    return shapes


def _quadrant(s: Shape) -> str:
    return QUADRANTS[(int(s.cx >= IMAGE_SIZE / 2), int(s.cy >= IMAGE_SIZE / 2))]


def describe(shapes: list[Shape], question_type: str, noisy: bool) -> str:
    """A human-readable account of the image, for the demo's printout."""
    background = "a lightly noisy background" if noisy else "a plain background"
    if question_type == "count":
        items = ", ".join(f"a {s.colour} {s.kind} at the {_quadrant(s)}" for s in shapes)
        return f"{NUMBERS[len(shapes) - 1]} shape{'s' if len(shapes) > 1 else ''} on {background}: {items}"
    s = shapes[0]
    where = _WHERE["middle" if question_type in ("colour", "shape") else _side(s)]
    return f"a {s.colour} {s.kind} {where}, on {background}"


def _side(s: Shape) -> str:
    dx, dy = s.cx - IMAGE_SIZE / 2, s.cy - IMAGE_SIZE / 2
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def make_sample(seed: int, split: str, index: int) -> dict:
    """One shapes-VQA row in the shard writer's schema, a pure function of (seed, split, index)."""
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    if qtype == "count":
        shapes = _in_quadrants(rng, int(rng.integers(1, 5)))
        answer = NUMBERS[len(shapes) - 1]
    elif qtype == "position":
        side = _pick(rng, POSITIONS)
        shapes = [_at_side(rng, side)]
        answer = side
    else:
        shapes = [_centred(rng)]
        answer = shapes[0].colour if qtype == "colour" else shapes[0].kind
    question = _pick(rng, TEMPLATES[qtype]).format(shape=shapes[0].kind, colour=shapes[0].colour)
    noisy = bool(rng.integers(2))
    buf = io.BytesIO()
    draw(shapes, rng, noisy).save(buf, format="PNG")
    return {
        "images": [{"bytes": buf.getvalue(), "path": None}],
        "texts": [{"user": question, "assistant": answer}],
        "source": SOURCE,
        "question_type": qtype,
        "description": describe(shapes, qtype, noisy),
    }


def corpus() -> list[str]:
    """Every sentence the generator can write, roles included as the chat template lays them out.

    Answer lines are repeated until they outweigh the questions, so that the merges make every one-word answer
    (and "assistant") a single token; a few descriptions, never trained on, only add common English words."""
    questions = [
        f"user\n{template.format(shape=kind, colour=c)}"
        for templates in TEMPLATES.values()
        for template in templates
        for kind in SHAPES
        for c in COLOURS
    ]
    answers = [f"assistant\n{a}" for a in (*COLOURS, *SHAPES, *NUMBERS, *POSITIONS)]
    lines = questions + answers * math.ceil(4 * len(questions) / len(answers))
    for bg, kind, c in zip(("a plain background", "a lightly noisy background") * 2, SHAPES, COLOURS):
        lines.extend(f"a {c} {kind} {where}, on {bg}" for where in _WHERE.values())
        lines.extend(f"{n} shapes on {bg}: a {c} {kind} at the {q}" for n in NUMBERS for q in QUADRANTS.values())
    return lines


def train_tokenizer(out: str | Path, vocab_size: int) -> Path:
    """A byte-level BPE tokenizer with exactly `vocab_size` tokens, saved in Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ShardDataError(
            f"the shapes corpus yields {tok.get_vocab_size()} BPE tokens, not {vocab_size}; "
            "set model.lm_base_vocab_size to that number or extend synthetic.corpus()"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[1],
        "eos_token": SPECIAL_TOKENS[2],
        "unk_token": SPECIAL_TOKENS[0],
        "model_max_length": 1 << 20,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


class ShapesSource(Source):
    """Rows made on demand: the generator is pure, so writer processes need nothing but (seed, split, n)."""

    def __init__(self, seed: int, split: str, num_rows: int) -> None:
        self.name = f"{SOURCE} seed={seed} split={split}"
        self.subsets = []
        self.seed, self.split, self.num_rows = seed, split, num_rows

    def rows(self, start: int, stop: int) -> Iterator[tuple[int, str, Any]]:
        for index in range(start, stop):
            yield index, SOURCE, make_sample(self.seed, self.split, index)

    def fingerprint(self) -> str:
        return f"{VERSION}:{self.seed}:{self.split}:{self.num_rows}"


def _shard_size(n: int) -> str:
    """8 shards (so 2 ranks x 2 loader workers each get whole shards), at most 1000 samples each."""
    return str(max(1, min(1000, math.ceil(n / 8))))


def write_synth(out: str | Path, *, samples: int = 4000, val_samples: int = 400, seed: int = 0) -> dict:
    """`python -m toolkit synth OUT`: OUT/tokenizer, OUT/train and OUT/val shards; returns both manifests.

    Rerunning with the same arguments is a no-op (or finishes an interrupted run); other arguments refuse."""
    from toolkit.config import load_config

    if samples < 1 or val_samples < 1:
        raise ShardDataError("synth needs --samples and --val-samples of at least 1")
    out = Path(out)
    model = load_config("tiny").model
    model.tokenizer = str(train_tokenizer(out / "tokenizer", model.lm_base_vocab_size))
    spec = TokenSpec(model, True, "tiny preset")
    manifests = {}
    for split, n in (("train", samples), ("val", val_samples)):
        try:
            manifests[split] = write_shards(
                ShapesSource(seed, split, n),
                out / split,
                shard_size=_shard_size(n),
                token_spec=spec,
                resume=True,
                settings={"split": split, "tokenizer": "../tokenizer"},  # inside OUT: keep OUT relocatable
            )
        except OutMismatchError as exc:
            raise ShardDataError(
                f"{out / split} holds shapes data made with other arguments; delete {out} or choose another OUT"
            ) from exc
    return manifests
