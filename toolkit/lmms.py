"""lmms-eval adapter: benchmark a toolkit checkpoint (or nanoVLM's own) on lmms-eval's tasks.

Two ways in, both with lmms-eval beside the toolkit (`make install` puts 0.7.3 in .venv with --no-deps and the
`lmms` extra; see setup.py):
- `python -m toolkit eval CHECKPOINT --lmms-tasks mme,ai2d [--lmms-limit N]` builds the model here and hands it
  to `lmms_eval.evaluator.simple_evaluate`;
- `python -m lmms_eval --model nanovlm_scale --model_args pretrained=CHECKPOINT --tasks mme`: setup.py declares
  the `lmms_eval.models` entry point that lmms-eval 0.7+ reads at start-up.

The model is a "simple" lmms-eval model: a request carries the task's question text (its `<image>` placeholders
are dropped, since the prompt puts each image's tokens before the question, as nanoVLM does) and a function that
returns the document's images. The question is rewritten per benchmark as nanoVLM HEAD's lmms-eval adapter does
(`PROMPT_FORMATS`: answer-with-a-letter for multiple choice, short-answer instructions for the VQA sets). Both
request kinds are answered: `generate_until` (greedy unless the task asks for sampling, cut at the first stop
string; batch_size requests per batched decode, answers equal to batch 1) and `loglikelihood` (the continuation's
summed log-probability given the prompt, and whether greedy decoding would have produced it; one request at a
time: lmms-eval 0.7.3 cannot score those results anyway, see tests/test_lmms.py).

Nothing is decoded or scored past the model's context (lm_max_length, image tokens included), where the model
runs at positions it was never trained at without an error: a prompt that fills the context is answered with an
empty string, an answer stops at the context, and a prompt and continuation longer than it get log-likelihood
-inf. Each such request is counted, and each call warns once, at its end, with the count and the first of them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from toolkit.errors import UserError
from toolkit.evaluate import context_room, generate_batch, load_for_inference, prompt_inputs

try:  # the registry checks that the class is an lmms subclass; without lmms-eval the adapter still works alone
    from lmms_eval.api.model import lmms as _LMMSBase
except ImportError:  # pragma: no cover - exercised where lmms-eval is absent, i.e. in CI
    _LMMSBase = object

MODEL_ID = "nanovlm_scale"
LMMS_MISSING = (
    "--lmms-tasks needs lmms-eval: `make install` puts it in .venv (the `lmms` extra), or "
    "`pip install --no-deps lmms-eval==0.7.3` then `pip install -e '.[lmms]'` in this environment"
)
IMAGE_PLACEHOLDER = "<image>"
REFUSED = (float("-inf"), False)  # loglikelihood's answer for a request longer than the model's context

log = logging.getLogger(__name__)


def model_manifest() -> Any:
    """Entry point for lmms-eval 0.7+ (`lmms_eval.models` group): where to find the model class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.NanoVLMScale")


def _images(visuals: Any) -> list[Image.Image]:
    """lmms-eval's visuals (a list of PIL images; None for text-only tasks) -> RGB images, or a clear error."""
    out = []
    for v in visuals or []:
        if not isinstance(v, Image.Image):
            raise UserError(
                f"nanovlm_scale takes images only, got a {type(v).__name__} (a video or audio task?); "
                "pick an image task"
            )
        out.append(v.convert("RGB"))
    return out


@dataclass(frozen=True)
class PromptFormat:
    """How nanoVLM HEAD's lmms-eval adapter rewrites one benchmark's question (eval/lmms_eval_wrapper.py)."""

    replacements: tuple[tuple[str, str], ...] = ()  # applied in order, after user_prefix is put in front
    user_prefix: str = ""
    user_suffix: str = ""
    assistant_prefix: str = ""  # the start of the assistant's turn, after the chat template's generation prompt


_LETTER = PromptFormat(
    replacements=(
        ("\nOptions:", "\nChoices:"),
        ("\nA. ", "\nChoices:\nA. "),
        ("Please select the correct answer from the options above.", "Answer with the letter."),
        ("Answer with the option's letter from the given choices directly", "Answer with the letter directly"),
    ),
    assistant_prefix="Answer:",
)
_MMMU = PromptFormat(
    replacements=(
        ("Question:", ""),
        ("Answer with the option's letter from the given choices directly.", "Answer with the letter directly."),
        ("\nA. ", "\nChoices:\nA. "),
    ),
    assistant_prefix="Answer:",
)
_DOCVQA = PromptFormat(
    user_prefix="Give a short and terse answer to the following question. Do not paraphrase or reformat the text you "
    "see in the image. Do not include any full stops. Just give the answer without additional explanation. Question: "
)
_CHART = PromptFormat(
    user_prefix="For the question below, follow the following instructions:\n"
    "-The answer should contain as few words as possible.\n"
    "-Don't paraphrase or reformat the text you see in the image.\n"
    "-Answer a binary question with Yes or No.\n"
    "-When asked to give a numerical value, provide a number like 2 instead of Two.\n"
    "-If the final answer has two or more items, provide it in the list format like [1, 2].\n"
    "-When asked to give a ratio, give out the decimal value like 0.25 instead of 1:4.\n"
    "-When asked to give a percentage, give out the whole value like 17 instead of decimal like 0.17%.\n"
    "-Don't include any units in the answer.\n"
    "-Do not include any full stops at the end of the answer.\n"
    "-Try to include the full label from the graph when asked about an entity.\n"
    "Question: "
)
_TEXTVQA = PromptFormat(
    user_prefix="Answer the following question about the image using as few words as possible. "
    "Follow these additional instructions:\n"
    "-Always answer a binary question with Yes or No.\n"
    "-When asked what time it is, reply with the time seen in the image.\n"
    "-Do not put any full stops at the end of the answer.\n"
    "-Do not put quotation marks around the answer.\n"
    "-An answer with one or two words is favorable.\n"
    "-Do not apply common sense knowledge. The answer can be found in the image.\n"
    "Question: "
)
_BRIEF = PromptFormat(user_suffix="\nGive a very brief answer.")

# Task name (as lmms-eval names it in a request) -> format; other tasks are asked as they come. HEAD keys the
# chart instructions by "chartvqa", a name lmms-eval has no task for, so its chartqa runs unformatted there; the
# same key is kept here so that scores compare with HEAD's (pass the name to prompt_format() to see it).
PROMPT_FORMATS: dict[str, PromptFormat] = {
    **dict.fromkeys(("ai2d", "mmstar", "seedbench", "scienceqa"), _LETTER),
    **dict.fromkeys(("docvqa_val", "docvqa_test"), _DOCVQA),
    "chartvqa": _CHART,
    **dict.fromkeys(("textvqa_val", "textvqa_test"), _TEXTVQA),
    **dict.fromkeys(("mmmu_val", "mmmu_test"), _MMMU),
    **dict.fromkeys(("infovqa_val", "mme", "ocrbench"), _BRIEF),
}


def prompt_format(task: str) -> PromptFormat:
    return PROMPT_FORMATS.get(task, PromptFormat())


def format_question(context: str, task: str) -> tuple[str, str]:
    """lmms-eval's question text for `task` -> (the user's text as nanoVLM asks it, the assistant's first words).

    HEAD's order: prefix in front, then the replacements over the whole text, then the suffix. A task's `<image>`
    placeholders are then dropped with the whitespace they leave at either end (each image's tokens go in front
    of the question instead); HEAD would ask them as text. Text without one is asked exactly as HEAD asks it.
    """
    fmt = prompt_format(task)
    text = fmt.user_prefix + context
    for old, new in fmt.replacements:
        text = text.replace(old, new)
    text += fmt.user_suffix
    if IMAGE_PLACEHOLDER in text:
        text = text.replace(IMAGE_PLACEHOLDER, "").strip()
    return text, fmt.assistant_prefix


@dataclass
class ContextMisses:
    """Requests of one generate_until / loglikelihood call that met the model's context, counted as they come and
    warned about once at the end: one line per kind for a whole benchmark, not one per document (or none)."""

    what: str  # what became of such a request, for the warning
    seen: list[str] = field(default_factory=list)

    def add(self, task: str, split: str, doc_id: int, tokens: str) -> None:
        self.seen.append(f"{task} {split} document {doc_id}, {tokens}")

    def warn(self, total: int, context: int) -> None:
        if self.seen:
            log.warning("nanovlm_scale: %d of %d requests %s (lm_max_length is %d tokens, image tokens included; the "
                        "first: %s)", len(self.seen), total, self.what, context, self.seen[0])  # fmt: skip


NO_ROOM = (
    "have a prompt that fills the model's context: each is answered with an empty string, which scores as wrong; "
    "fewer or smaller images (max_img_size) or a model with a longer lm_max_length would answer them"
)
CUT = "reached the model's context before their end of sequence: those answers stop there"
TOO_LONG = (
    "have a prompt and continuation longer than the model's context: each gets log-likelihood -inf (never the "
    "most likely choice), not greedy"
)


class NanoVLMScale(_LMMSBase):
    """A nanoVLM-format model (a run folder, an export or nanoVLM's own checkpoint) answering lmms-eval requests.

    `self.task_dict[task][split][doc_id]` is the document; lmms-eval fills it before the first request.
    `batch_size` requests with the same generation settings are answered by one batched decode (lmms-eval passes
    its `--batch_size`, or `batch_size=` in model_args); answers equal those of batch_size 1.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = "auto",
        max_new_tokens: int = 256,
        batch_size: int | str = 1,
        **ignored: Any,
    ) -> None:
        super().__init__()
        if not hasattr(self, "task_dict"):  # lmms' own __init__ sets it; without lmms-eval nobody does
            self.task_dict = {}
        self.pretrained = str(pretrained)
        self.model, self.tok = load_for_inference(Path(pretrained), device=device or "auto")
        self.device = next(self.model.parameters()).device
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise UserError(f"nanovlm_scale: batch_size must be >= 1, got {batch_size}")

    @property
    def batch_size_per_gpu(self) -> int:
        return self.batch_size

    @property
    def context(self) -> int:
        """The longest sequence the model was trained at (lm_max_length): prompt, image tokens and answer."""
        return self.model.cfg.lm_max_length

    # -- request plumbing --
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _prompt(self, context: str, images: list[Image.Image], task: str) -> tuple[list[int], torch.Tensor | None]:
        question, answer_prefix = format_question(context, task)
        return prompt_inputs(self.model, self.tok, images, question, answer_prefix=answer_prefix, image_tags=False)

    # -- the lmms interface --
    @torch.no_grad()
    def generate_until(self, requests: list) -> list[str]:
        """Answers in request order. Requests are grouped by generation settings and taken longest question
        first (less padding), batch_size at a time; only one batch's images are decoded and tiled at once. Requests
        that met the model's context are warned about once, at the end (see ContextMisses)."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(_settings_key(request.args[1]), []).append(i)
        full, cut = ContextMisses(NO_ROOM), ContextMisses(CUT)
        for members in groups.values():
            members.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                for i, text in zip(chunk, self._generate([requests[i].args for i in chunk], full, cut), strict=True):
                    out[i] = text
        for misses in (full, cut):
            misses.warn(len(requests), self.context)
        return out  # type: ignore[return-value]

    def _generate(self, args: list[tuple], full: ContextMisses, cut: ContextMisses) -> list[str]:
        """One batch of requests that share their generation settings -> their answers.

        A row adds tokens up to the model's context only (generate_batch's rule, as `toolkit generate`'s): a row
        with no room gets an empty answer, a row with less room than asked stops at the context; both kinds are
        noted in `full` and `cut`."""
        gen = dict(args[0][1] or {})
        asked = int(gen.get("max_new_tokens", self.max_new_tokens))
        prompts = [self._prompt(c, _images(visual(self._doc(task, split, doc_id))), task)
                   for c, _, visual, doc_id, task, split in args]  # fmt: skip
        decoded = self._decode(prompts, gen, asked)
        answers = []
        for (ids, _), tokens, (_, _, _, doc_id, task, split) in zip(prompts, decoded, args, strict=True):
            n = len(ids)
            space = self.context - n
            room = context_room(self.model, n, asked)  # a task asking for 0 new tokens gets "" unwarned
            if space <= 0:
                full.add(task, split, doc_id, f"a {n}-token prompt")
            elif room < asked and len(tokens) == room and self.tok.eos_token_id not in tokens:
                cut.add(task, split, doc_id, f"{room} new tokens of {asked} after a {n}-token prompt")
            answers.append(cut_at_stop(self.tok.decode(tokens, skip_special_tokens=True), gen.get("until")))
        return answers

    def _decode(self, prompts: list[tuple], gen: dict, max_new_tokens: int) -> list[list[int]]:
        """One batched decode under the task's generation settings: greedy unless it asks for sampling."""
        temperature = float(gen.get("temperature", 0.0) or 0.0)
        sample = bool(gen.get("do_sample", False)) and temperature > 0
        return generate_batch(
            self.model,
            self.tok,
            prompts,
            max_new_tokens=max_new_tokens,
            greedy=not sample,
            temperature=temperature if sample else 1.0,
            top_p=float(gen.get("top_p", 1.0) or 1.0),
        )

    @torch.no_grad()
    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        """Scores in request order. A prompt and continuation longer than the model's context are refused (REFUSED,
        counted, one warning at the end), not cut: lmms-eval 0.7.3's own image models (llava, llava_hf,
        llava_onevision, qwen_vl, fuyu ...) neither cut nor check, they feed the whole sequence (the left_truncate_len
        of their tok_encode, lm-eval-harness's left truncation, is never passed), and cutting from the left here
        would cut the image tokens that open the prompt first: they would no longer match the tiles."""
        out = []
        too_long = ContextMisses(TOO_LONG)
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            target = doc_to_target(doc) if callable(doc_to_target) else doc_to_target
            if isinstance(target, list):  # some tasks give the answer as a one-element list
                target = target[0]
            ids, pixels = self._prompt(context, _images(doc_to_visual(doc)), task)
            cont = self.tok.encode(str(target))
            if cont and len(ids) + len(cont) > self.context:
                too_long.add(task, split, doc_id, f"{len(ids)} prompt + {len(cont)} continuation tokens")
                out.append(REFUSED)
                continue
            out.append(self._score(ids, pixels, cont))
        too_long.warn(len(requests), self.context)
        return out

    def _score(self, ids: list[int], pixels: torch.Tensor | None, cont: list[int]) -> tuple[float, bool]:
        """log p(continuation | prompt, images) summed over its tokens, and whether each token is the argmax."""
        if not cont:
            return 0.0, True
        full = torch.tensor([ids + cont], device=self.device)
        logits = self.model(input_ids=full, pixel_values=pixels).logits[0, len(ids) - 1 : -1].float()  # (T, V)
        logprobs = logits.log_softmax(-1)
        target = torch.tensor(cont, device=self.device)
        total = logprobs.gather(-1, target[:, None]).sum().item()
        return total, bool((logits.argmax(-1) == target).all())

    def generate_until_multi_round(self, requests: list) -> list[str]:
        raise UserError("nanovlm_scale answers single-round tasks only; multi-round tasks are not supported")


def _settings_key(gen_kwargs: Any) -> str:
    """Requests batched together must decode alike: same length limit, stop strings and sampling settings."""
    return json.dumps(dict(gen_kwargs or {}), sort_keys=True, default=repr)


def cut_at_stop(text: str, until: Any) -> str:
    """The text up to the first of the task's stop strings (one string, a list, or none)."""
    stops = [until] if isinstance(until, str) else list(until or [])
    for stop in stops:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text.strip()


def run_tasks(
    checkpoint: str,
    tasks: list[str],
    *,
    limit: int | None = None,
    include_path: str | None = None,
    device: str = "auto",
    batch_size: int = 1,
) -> dict:
    """lmms-eval's `simple_evaluate` on this checkpoint; its per-task results dict.

    `include_path` is a folder of your own task YAMLs, as lmms-eval's `--include_path` takes.
    """
    try:
        from lmms_eval.evaluator import simple_evaluate
        from lmms_eval.tasks import TaskManager
    except ImportError as exc:
        raise UserError(LMMS_MISSING) from exc
    model = NanoVLMScale(checkpoint, device=device, batch_size=batch_size)
    manager = _task_manager(TaskManager, include_path, tasks)
    with _one_process():
        results = simple_evaluate(
            model=model, tasks=tasks, limit=limit, batch_size=batch_size, log_samples=False, task_manager=manager
        )
    return (results or {}).get("results", {})


# What accelerate (which lmms-eval's evaluate builds) reads to decide that this process is a rank of a group.
GROUP_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # fmt: skip


@contextlib.contextmanager
def _one_process() -> Iterator[None]:
    """Scoring runs in this one process. A LOCAL_RANK left in the environment (by a launcher, or by an earlier
    in-process run) would make accelerate join a process group that does not exist (it fails for want of
    MASTER_ADDR), so outside an initialised group the rank variables are hidden meanwhile, restored after."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    saved = {k: os.environ.pop(k) for k in GROUP_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _task_manager(manager_cls: Any, include_path: str | None, tasks: list[str]) -> Any:
    """lmms-eval's task index. Indexing its own ~3,200 task YAMLs takes it 50 s on a 2-core machine (pure-Python
    YAML), so when `include_path` alone defines every task asked for, only that folder is indexed."""
    if not include_path:
        return None  # simple_evaluate builds the default index
    own = manager_cls(include_path=include_path, include_defaults=False)
    if all(task in own.all_tasks for task in tasks):
        return own
    return manager_cls(include_path=include_path)


def scalar_scores(results: dict) -> dict[str, dict[str, float]]:
    """lmms-eval's results -> {task: {metric: value}}, numbers only and no standard errors.

    lmms-eval names a metric "<metric>,<filter>"; the filter is dropped when it is lmms-eval's "none" (nanoVLM
    HEAD drops it always) and joined with "_" otherwise, so two filters of one metric stay apart.
    """
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or "_stderr" in metric:
                continue
            out.setdefault(task, {})[metric if filt in ("", "none") else f"{metric}_{filt}"] = float(value)
    return out
