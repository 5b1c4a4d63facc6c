"""lmms-eval adapter: benchmark a toolkit checkpoint (or nanoVLM's own) on lmms-eval's tasks.

Two ways in, both with lmms-eval installed beside the toolkit (`pip install lmms-eval`; not a dependency):
- `python -m toolkit eval CHECKPOINT --lmms-tasks mme,ai2d [--lmms-limit N]` builds the model here and hands it
  to `lmms_eval.evaluator.simple_evaluate`;
- `python -m lmms_eval --model nanovlm_scale --model_args pretrained=CHECKPOINT --tasks mme`: setup.py declares
  the `lmms_eval.models` entry point that lmms-eval 0.7+ reads at start-up.

The model is a "simple" lmms-eval model: a request carries the task's question text (its `<image>` placeholders
are dropped, since the prompt puts each image's tokens before the question, as nanoVLM does) and a function that
returns the document's images. Both request kinds are answered: `generate_until` (greedy unless the task asks
for sampling, cut at the first stop string) and `loglikelihood` (the continuation's summed log-probability given
the prompt, and whether greedy decoding would have produced it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from toolkit.errors import UserError
from toolkit.evaluate import load_for_inference, prompt_inputs

try:  # the registry checks that the class is an lmms subclass; without lmms-eval the adapter still works alone
    from lmms_eval.api.model import lmms as _LMMSBase
except ImportError:  # pragma: no cover - exercised where lmms-eval is absent, i.e. in CI
    _LMMSBase = object

MODEL_ID = "nanovlm_scale"
IMAGE_PLACEHOLDER = "<image>"


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


class NanoVLMScale(_LMMSBase):
    """A nanoVLM-format model (a run folder, an export or nanoVLM's own checkpoint) answering lmms-eval requests.

    `self.task_dict[task][split][doc_id]` is the document; lmms-eval fills it before the first request.
    """

    is_simple = True

    def __init__(self, pretrained: str, device: str = "auto", max_new_tokens: int = 256, **ignored: Any) -> None:
        super().__init__()
        if not hasattr(self, "task_dict"):  # lmms' own __init__ sets it; without lmms-eval nobody does
            self.task_dict = {}
        self.pretrained = str(pretrained)
        self.model, self.tok = load_for_inference(Path(pretrained), device=device)
        self.device = next(self.model.parameters()).device
        self.max_new_tokens = int(max_new_tokens)

    # -- request plumbing --
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _prompt(self, context: str, images: list[Image.Image]) -> tuple[list[int], torch.Tensor | None]:
        return prompt_inputs(self.model, self.tok, images, context.replace(IMAGE_PLACEHOLDER, "").strip())

    # -- the lmms interface --
    @torch.no_grad()
    def generate_until(self, requests: list) -> list[str]:
        out = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            images = _images(doc_to_visual(self._doc(task, split, doc_id)))
            out.append(self._generate(context, images, dict(gen_kwargs or {})))
        return out

    def _generate(self, context: str, images: list[Image.Image], gen: dict[str, Any]) -> str:
        ids, pixels = self._prompt(context, images)
        temperature = float(gen.get("temperature", 0.0) or 0.0)
        sample = bool(gen.get("do_sample", False)) and temperature > 0
        tokens = self.model.generate(
            torch.tensor([ids], device=self.device),
            pixels,
            max_new_tokens=int(gen.get("max_new_tokens", self.max_new_tokens)),
            greedy=not sample,
            temperature=temperature if sample else 1.0,
            top_p=float(gen.get("top_p", 1.0) or 1.0),
            eos_token_id=self.tok.eos_token_id,
        )
        text = self.tok.decode(tokens[0].tolist(), skip_special_tokens=True)
        return cut_at_stop(text, gen.get("until"))

    @torch.no_grad()
    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        out = []
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            target = doc_to_target(doc) if callable(doc_to_target) else doc_to_target
            if isinstance(target, list):  # some tasks give the answer as a one-element list
                target = target[0]
            out.append(self._score(context, _images(doc_to_visual(doc)), str(target)))
        return out

    def _score(self, context: str, images: list[Image.Image], continuation: str) -> tuple[float, bool]:
        """log p(continuation | prompt, images) summed over its tokens, and whether each token is the argmax."""
        ids, pixels = self._prompt(context, images)
        cont = self.tok.encode(continuation)
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
) -> dict:
    """lmms-eval's `simple_evaluate` on this checkpoint; its per-task results dict.

    `include_path` is a folder of your own task YAMLs, as lmms-eval's `--include_path` takes.
    """
    try:
        from lmms_eval.evaluator import simple_evaluate
        from lmms_eval.tasks import TaskManager
    except ImportError as exc:
        raise UserError(
            "--lmms-tasks needs lmms-eval: `pip install lmms-eval` in this environment (it is not a dependency)"
        ) from exc
    model = NanoVLMScale(checkpoint, device=device)
    manager = TaskManager(include_path=include_path) if include_path else None
    results = simple_evaluate(
        model=model, tasks=tasks, limit=limit, batch_size=1, log_samples=False, task_manager=manager
    )
    return (results or {}).get("results", {})
