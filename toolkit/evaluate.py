"""Evaluation: validation loss over held-out shards and answer accuracy by greedy generation.

Answer accuracy compares the first word of the generated answer with the reference answer, case- and
punctuation-insensitively: the shapes-VQA questions (and most VQA benchmarks) have one-word answers, and a
model that says "Red." for "red" is right. Results are grouped by the sample's `question_type` when present.

Nothing is generated past the model's context (lm_max_length, image tokens included): RoPE takes any position,
so decoding there raises no error and writes text the model was never trained to write. `answer_from` and
`generate_batch` stop each answer at the context and give a prompt that fills it no tokens; each caller keeps its
own policy on top (`toolkit generate` refuses, lmms-eval and answer accuracy count and warn once).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from toolkit.config import Config, DataConfig
from toolkit.data.conversation import image_string
from toolkit.data.format import SPLIT_SAMPLE
from toolkit.data.images import process_image, to_rgb
from toolkit.data.shards import ShardScan, image_members, resolve_shards
from toolkit.data.texts import Skip, parse_texts
from toolkit.data.tokenizer import VLMTokenizer, load_tokenizer
from toolkit.errors import UserError
from toolkit.model import VisionLanguageModel

log = logging.getLogger(__name__)
ANSWER_TOKENS = 16  # new tokens per answer-accuracy question: the answer's first word is all that is compared


def normalise(text: str) -> str:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[0] if words else ""


@dataclass
class Accuracy:
    correct: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    total: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    unanswerable: int = 0  # questions whose reference answer has no word to compare: left out of the figures
    too_long: int = 0  # questions whose prompt fills the model's context: never seen whole, left out of the figures

    def add(self, kind: str, ok: bool) -> None:
        self.correct[kind] += int(ok)
        self.total[kind] += 1

    def table(self) -> dict[str, float]:
        """Accuracy per question type, when there are several, and over all questions (`all`)."""
        kinds = sorted(self.total) if len(self.total) > 1 else []
        out = {k: self.correct[k] / self.total[k] for k in kinds}
        n = sum(self.total.values())
        out["all"] = sum(self.correct.values()) / n if n else 0.0
        return out


def context_room(model: VisionLanguageModel, prompt_length: int, max_new_tokens: int) -> int:
    """How many tokens may follow a prompt: at most `max_new_tokens`, and none past the model's context
    (lm_max_length), the longest sequence it was trained at; 0 when the prompt fills it."""
    return max(0, min(max_new_tokens, model.cfg.lm_max_length - prompt_length))


def tiles_for(model: VisionLanguageModel, images: list[Image.Image]) -> tuple[torch.Tensor | None, list]:
    cfg = model.cfg
    processed = [
        process_image(img, tile=cfg.vit_img_size, max_side=cfg.max_img_size, resize_to_max=cfg.resize_to_max_side_len)
        for img in images
    ]
    if not processed:
        return None, []
    return torch.cat([t for t, _ in processed]), [g for _, g in processed]


@torch.no_grad()
def answer(
    model: VisionLanguageModel,
    tok: VLMTokenizer,
    images: list[Image.Image],
    question: str,
    *,
    max_new_tokens: int = ANSWER_TOKENS,
    greedy: bool = True,
) -> str:
    """One question about one sample's images -> the decoded answer, stopped at the model's context."""
    ids, pixels = prompt_inputs(model, tok, images, question)
    return answer_from(model, tok, ids, pixels, max_new_tokens=max_new_tokens, greedy=greedy)


@torch.no_grad()
def answer_from(
    model: VisionLanguageModel,
    tok: VLMTokenizer,
    ids: list[int],
    pixels: torch.Tensor | None,
    *,
    max_new_tokens: int,
    greedy: bool = True,
) -> str:
    """prompt_inputs' (ids, tiles) -> the decoded answer: at most `max_new_tokens`, and none past the model's
    context, so a prompt that fills it is answered "" (see context_room). A caller that must refuse or report such
    a prompt checks its length first."""
    room = context_room(model, len(ids), max_new_tokens)
    if room == 0:  # generate() cannot give no tokens, and any token here would be past the context
        return ""
    ids_t = torch.tensor([ids], device=next(model.parameters()).device)
    out = model.generate(ids_t, pixels, max_new_tokens=room, greedy=greedy, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0].tolist(), skip_special_tokens=True).strip()


def prompt_inputs(
    model: VisionLanguageModel,
    tok: VLMTokenizer,
    images: list[Image.Image],
    question: str,
    *,
    answer_prefix: str = "",
    image_tags: bool = True,
) -> tuple[list[int], torch.Tensor | None]:
    """A question with its images -> (prompt ids up to the assistant's turn, tiles on the model's device or None).

    `answer_prefix` is text the assistant's turn starts with (nanoVLM's lmms-eval prompts put "Answer:" there);
    it is rendered into the same string before encoding, as nanoVLM does. `image_tags=False` writes each image's
    tokens without the `<image: i>` tag that several images get in training (nanoVLM's lmms-eval adapter builds
    each image's string alone).
    """
    pixels, grids = tiles_for(model, images)
    n = model.cfg.mp_image_token_length
    images_text = image_string(tok, grids, n) if image_tags else "".join(image_string(tok, [g], n) for g in grids)
    question = tok.markers.sub("", question)  # nanoVLM's markers are the toolkit's to place, as in training
    text = tok.render([{"role": "user", "content": images_text + question}], add_generation_prompt=True)
    ids = tok.encode(text + answer_prefix)
    return ids, pixels.to(next(model.parameters()).device) if pixels is not None else None


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of unequal length -> (input_ids, attention_mask) (B, S), padded on the left so every row's last
    token is at the same place: the next token of every row is then read from one column."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, longest - len(p) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_batch(
    model: VisionLanguageModel,
    tok: VLMTokenizer,
    prompts: list[tuple[list[int], torch.Tensor | None]],
    *,
    max_new_tokens: int,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[list[int]]:
    """(prompt ids, tiles) pairs -> each row's generated tokens, in one batched decode.

    Rows are left-padded with an attention mask, so positions and attention see only each row's own tokens and a
    row's greedy tokens equal those of the same prompt alone. A row gets at most `max_new_tokens` and none past the
    model's context (see context_room): the batch decodes to its roomiest row's limit and each row is cut at its
    own, which is what that row alone gives; a row whose prompt fills the context is not decoded and gets [].
    Each row ends at its first EOS (kept, as a lone prompt's `generate` keeps it).
    """
    rooms = [context_room(model, len(ids), max_new_tokens) for ids, _ in prompts]
    live = [row for row, room in enumerate(rooms) if room > 0]
    rows: list[list[int]] = [[] for _ in prompts]
    if not live:
        return rows
    decoded = _decode_rows(model, tok, [prompts[row] for row in live], max(rooms[row] for row in live),
                           greedy=greedy, temperature=temperature, top_p=top_p)  # fmt: skip
    for row, tokens in zip(live, decoded, strict=True):
        tokens = tokens[: rooms[row]]  # a roomier row decoded further: what lies past this row's context goes
        if tok.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tok.eos_token_id) + 1]
        rows[row] = tokens
    return rows


def _decode_rows(
    model: VisionLanguageModel,
    tok: VLMTokenizer,
    prompts: list[tuple[list[int], torch.Tensor | None]],
    max_new_tokens: int,
    *,
    greedy: bool,
    temperature: float,
    top_p: float,
) -> list[list[int]]:
    """One left-padded `generate` over `prompts`: each row's max_new_tokens tokens, finished rows padded with EOS
    until the longest row is done."""
    device = next(model.parameters()).device
    ids, mask = left_pad([p for p, _ in prompts], tok.pad_token_id, device)
    tiles = [t for _, t in prompts if t is not None]
    pixels = torch.cat(tiles) if tiles else None  # every row's tiles in row order: the order of its image tokens
    out = model.generate(ids, pixels, mask, max_new_tokens=max_new_tokens, greedy=greedy,
                         temperature=temperature, top_p=top_p, eos_token_id=tok.eos_token_id)  # fmt: skip
    return out.tolist()


def answer_accuracy(
    model: VisionLanguageModel, tok: VLMTokenizer, samples: Iterable[dict], *, max_samples: int = 0
) -> tuple[Accuracy, list[dict]]:
    """samples: dicts with `images` (PIL), `texts` (first turn is asked), optional `question_type`.

    A question whose prompt (image tokens included) fills the model's context is left out of the figures and
    counted in `too_long`, as one without a reference word is in `unanswerable`: the model never saw it whole, so
    its empty answer would score the context, not the model. One warning per call gives their count and the first.
    An answer that reaches the context is stopped there and scored as it stands (its first word is compared).
    """
    acc, shown, first_too_long = Accuracy(), [], ""
    model.eval()
    for i, sample in enumerate(samples):
        if max_samples and i >= max_samples:
            break
        turn = sample["texts"][0]
        if not normalise(turn["assistant"]):  # no word to compare: an empty answer would match an empty one
            acc.unanswerable += 1
            continue
        ids, pixels = prompt_inputs(model, tok, sample["images"], turn["user"])
        if context_room(model, len(ids), ANSWER_TOKENS) == 0:
            acc.too_long += 1
            first_too_long = first_too_long or f"{len(ids)} tokens, {turn['user'][:80]!r}"
            continue
        said = answer_from(model, tok, ids, pixels, max_new_tokens=ANSWER_TOKENS)
        ok = normalise(said) == normalise(turn["assistant"])
        acc.add(sample.get("question_type", "all questions"), ok)
        shown.append(
            {
                "question": turn["user"],
                "expected": turn["assistant"],
                "answer": said,
                "correct": ok,
                "description": sample.get("description", ""),
            }
        )
    if acc.too_long:
        _warn_too_long(acc.too_long, first_too_long, model.cfg.lm_max_length)
    return acc, shown


def _warn_too_long(count: int, first: str, context: int) -> None:
    """One line per answer_accuracy call, not one per question: a held-out set of long prompts would flood the log."""
    log.warning("answer accuracy left out %d questions whose prompt fills the model's context (lm_max_length %d, "
                "image tokens included), the first %s; fewer or smaller images (model.max_img_size) or a model with "
                "a longer lm_max_length would answer them", count, context, first)  # fmt: skip


def nanovlm_folder(path: str | Path) -> Path:
    """A nanoVLM-format folder itself, or a run folder's best export (else its newest export)."""
    from toolkit.export.run import refuse_hf_export

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path} does not exist; give an export, nanoVLM's checkpoint or a run")
    refuse_hf_export(path, "this command")
    if (path / "config.json").exists():
        return path
    exports = path / "export"
    # Every export under RUN/export (best, step_N, the README's `export RUN RUN/export/final` ...): best first,
    # then the newest written. Only best and step_N were looked for: RUN/export/final was "no exports".
    made = [p for p in exports.glob("*") if (p / "config.json").is_file() and p.name != "best"]
    candidates = [exports / "best"] if (exports / "best" / "config.json").is_file() else []
    candidates += sorted(made, key=lambda p: (p / "config.json").stat().st_mtime, reverse=True)
    if not candidates:
        kind = "a training checkpoint" if (path / "trainer.json").is_file() else "no nanoVLM checkpoint (config.json)"
        raise FileNotFoundError(
            f"{path} holds {kind} and no exports; run `python -m toolkit export {path} OUT` first and pass OUT"
        )
    log.info("--checkpoint %s: using its export %s", path, candidates[0])  # best, else the newest
    return candidates[0]


def load_for_inference(checkpoint: str | Path, device: str = "auto") -> tuple[VisionLanguageModel, VLMTokenizer]:
    """A nanoVLM-format folder (an export, nanoVLM's own checkpoint) or a run folder -> eval model + tokenizer."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith(("cuda", "cpu")) or (device.startswith("cuda") and not torch.cuda.is_available()):
        raise UserError(f"--device {device}: give cpu, or cuda / cuda:N on a machine with a GPU (or auto)")
    model = VisionLanguageModel.from_pretrained(str(nanovlm_folder(checkpoint))).to(device).eval()
    return model, load_tokenizer(model.cfg)


@torch.no_grad()
def heldout_totals(
    model: VisionLanguageModel, tok: VLMTokenizer, shards: str, *, max_batches: int = 0
) -> tuple[float, int]:
    """(token-mean loss, the target tokens it is over) of one model in this process over one pass of `shards` (the
    toolkit's own pipeline): 0 targets means nothing was scored, not a perfect model."""
    from toolkit.data.loader import build_loader

    cfg = Config(model=model.cfg)
    cfg.data.val_shards, cfg.data.num_workers = shards, 0
    cfg.data.max_sample_length = model.cfg.lm_max_length
    cfg.data.max_images_per_example = cfg.data.max_images_per_knapsack
    total, n_targets = 0.0, 0
    device = next(model.parameters()).device
    for i, batch in enumerate(build_loader(cfg, rank=0, world=1, tokenizer=tok, split="val")):
        if max_batches and i >= max_batches:
            break
        out = model(**batch.inputs.to(device).as_kwargs())
        total += float(out.loss_sum)
        n_targets += int(out.n_targets)
    return total / max(n_targets, 1), n_targets


def iter_eval_samples(shards: str, *, caption_prompt: str | None = None) -> Iterable[dict]:
    """Raw held-out samples (PIL images, texts, question_type, description) in shard order. A sample that cannot
    be read is skipped and, at the end of the pass, counted in a warning that names the first. An image-caption
    pair (img2dataset's layout) is one turn asking `caption_prompt` (data.caption_prompt's default), as the loss
    reads it: such shards were all skipped here while the loss scored them."""
    import io
    import json

    skipped: list[str] = []
    for shard in resolve_shards(shards, name="--shards"):
        scan = ShardScan(shard.path)
        for _, key, files in scan:
            try:
                if key in scan.split:
                    raise Skip(SPLIT_SAMPLE, "its members are not together in the tar")
                texts = parse_texts(files, caption_prompt=caption_prompt or DataConfig().caption_prompt)
                images = [to_rgb(Image.open(io.BytesIO(b))) for b in image_members(files)]
                meta = json.loads(files["json"]) if "json" in files else {}  # a caption pair may have only .txt
            except (Skip, OSError, ValueError) as exc:
                skipped.append(f"{shard.path}:{key} ({exc})")
                continue
            yield {
                "texts": texts,
                "images": images,
                "question_type": meta.get("question_type", "all questions"),
                "description": meta.get("description", ""),
            }
        if scan.error is not None:  # the shard's unread rest, or all of it: at least one sample each
            skipped.append(f"{shard.path} ({scan.error[0]}: {scan.error[1]})")
    if skipped:
        log.warning("answer accuracy skipped %d held-out samples it could not read, first %s", len(skipped), skipped[0])
