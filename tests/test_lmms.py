"""The lmms-eval adapter: its answers and scores equal the toolkit's own generation and loss on the same inputs.

Most tests give the adapter stand-in requests with the same `.args` layout as lmms-eval's. `make install` puts
the real lmms-eval 0.7.3 in .venv, and the `test_real_lmms_eval_*` tests run it on offline toy tasks (a datasets
folder and a task YAML); where it is absent, the registration and `eval --lmms-tasks` paths run against a stand-in
`lmms_eval` package in sys.modules instead.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import subprocess
import sys
import time
import types
from dataclasses import dataclass

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from tests.conftest import tiny_model_config
from tests.shardgen import make_tokenizer
from toolkit.data.conversation import encode_prompt
from toolkit.evaluate import answer, tiles_for
from toolkit.model import VisionLanguageModel


@dataclass
class Request:  # lmms_eval.api.instance.Instance, as far as a model sees it
    args: tuple


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("lmms")
    tok_dir, base = make_tokenizer(root / "tok")
    cfg = tiny_model_config(lm_base_vocab_size=base, lm_vocab_size=base + 66)
    torch.manual_seed(3)
    model = VisionLanguageModel(cfg)
    hf = AutoTokenizer.from_pretrained(tok_dir)
    blank = [i for i in range(base) if not hf.decode([i], skip_special_tokens=True).strip()]
    with torch.no_grad():  # random weights that never say a special or blank token: answers are not blank
        model.decoder.head.weight[base:] = 0
        model.decoder.head.weight[blank] = 0
    model.save_pretrained(str(root / "ckpt"), tokenizer_dir=tok_dir)
    return str(root / "ckpt")


@pytest.fixture(scope="module")
def adapter(checkpoint):
    from toolkit.lmms import NanoVLMScale

    model = NanoVLMScale(checkpoint, device="cpu", max_new_tokens=8)
    images = [Image.new("RGB", (40, 28), (200, 30, 30)), Image.new("RGB", (24, 24), (10, 200, 10))]
    model.task_dict = {"shapes": {"test": [{"image": images[0]}, {"image": images[1]}, {"image": None}]}}
    return model


def visuals(doc: dict) -> list | None:
    return [doc["image"]] if doc["image"] is not None else None


def test_generate_until_equals_the_toolkit_answer_cut_at_the_stop_string(adapter):
    model, tok = adapter.model, adapter.tok
    for doc_id in range(3):
        doc = adapter.task_dict["shapes"]["test"][doc_id]
        expected = answer(model, tok, visuals(doc) or [], "what is in picture s001x002?", max_new_tokens=8)
        gen = {"max_new_tokens": 8, "until": []}
        said = adapter.generate_until([Request(("<image>\nwhat is in picture s001x002?", gen, visuals, doc_id,
                                                "shapes", "test"))])  # fmt: skip
        assert said == [expected]
        assert expected, "a random tiny model still says something: the comparison above is not between two blanks"
        stop = expected[len(expected) // 2 :]
        cut = adapter.generate_until([Request(("what is in picture s001x002?", {"max_new_tokens": 8, "until": [stop]},
                                               visuals, doc_id, "shapes", "test"))])  # fmt: skip
        assert cut == [expected[: expected.index(stop)].strip()]


def test_loglikelihood_is_minus_the_models_own_loss_and_greedy_flag_is_right(adapter):
    model, tok = adapter.model, adapter.tok
    doc = adapter.task_dict["shapes"]["test"][0]
    question = "what is in picture s003x004?"
    pixels, grids = tiles_for(model, [doc["image"]])
    prompt = encode_prompt(tok, question, grids, model.cfg.mp_image_token_length)

    def greedy_tokens(n: int) -> list[int]:
        return model.generate(torch.tensor([prompt]), pixels, max_new_tokens=n)[0].tolist()

    flags = []
    for continuation in (tok.decode(greedy_tokens(3)), " it is a shape"):
        ((logprob, is_greedy),) = adapter.loglikelihood(
            [Request((f"<image> {question}", continuation, visuals, 0, "shapes", "test"))]
        )
        cont = tok.encode(continuation)
        ids = torch.tensor([prompt + cont])
        labels = torch.full_like(ids, -100)
        labels[0, len(prompt) - 1 : -1] = torch.tensor(cont)  # labels are next-token aligned
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=pixels, labels=labels)
        assert logprob == pytest.approx(-out.loss_sum.item(), rel=1e-5, abs=1e-5) and logprob < 0
        assert is_greedy == (greedy_tokens(len(cont)) == cont)
        flags.append(is_greedy)
    assert flags == [True, False]  # the model's own greedy answer, then a sentence it does not say


def test_video_visuals_are_refused_with_a_clear_error(adapter):
    from toolkit.errors import UserError

    with pytest.raises(UserError, match="images only"):
        adapter.generate_until([Request(("q", {}, lambda doc: ["clip.mp4"], 0, "shapes", "test"))])


# -- batched answers --


def shapes_docs() -> list[dict]:
    """Documents whose prompts differ in length: 1x1, 1x2, 2x2 tile grids (plus the global tile), no image."""
    sizes = [(24, 24), (64, 30), (60, 60), (40, 28), None, (30, 64)]
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), None, (90, 10, 160)]
    return [{"image": Image.new("RGB", size, c) if size else None} for size, c in zip(sizes, colours, strict=True)]


def shapes_requests(questions: list[str], gens: list[dict]) -> list[Request]:
    return [Request((q, g, visuals, i, "shapes", "test")) for i, (q, g) in enumerate(zip(questions, gens, strict=True))]


@pytest.fixture
def batch_adapter(checkpoint):
    from toolkit.lmms import NanoVLMScale

    model = NanoVLMScale(checkpoint, device="cpu", max_new_tokens=8, batch_size=3)
    model.task_dict = {"shapes": {"test": shapes_docs()}}
    return model


def spy_generate(model) -> list[torch.Tensor]:
    """Records the attention mask of every model.generate call (one per batch)."""
    masks, original = [], model.generate

    def generate(input_ids, pixel_values=None, attention_mask=None, *args, **kwargs):
        masks.append(attention_mask if attention_mask is not None else torch.ones_like(input_ids))
        return original(input_ids, pixel_values, attention_mask, *args, **kwargs)

    model.generate = generate
    return masks


def test_batched_generate_until_gives_the_answers_of_batch_1(batch_adapter):
    """6 requests, two generation settings: batches of at most 3 per setting, padded, and the answers of each
    request asked alone, in request order."""
    questions = ["what is in picture s001x002?", "colour?", "what is in picture s004x001? and where is it?",
                 "shape?", "what is it?", "is it s003x003?"]  # fmt: skip
    gens = [{"max_new_tokens": 8, "until": []}] * 4 + [{"max_new_tokens": 5, "until": ["zz"]}] * 2
    requests = shapes_requests(questions, gens)
    alone = []
    for request in requests:
        batch_adapter.batch_size = 1
        alone += batch_adapter.generate_until([request])
    batch_adapter.batch_size = 3
    masks = spy_generate(batch_adapter.model)
    try:
        batched = batch_adapter.generate_until(requests)
    finally:
        del batch_adapter.model.generate
    assert batched == alone
    assert sorted(m.shape[0] for m in masks) == [1, 2, 3]  # 4 requests of one setting = 3 + 1, then 2 of the other
    assert all((m == 0).any() for m in masks if m.shape[0] > 1)  # every batch of several was padded
    assert len({a for a in alone}) > 2, "the answers differ across documents: equal lists are not all one answer"


def test_generate_batch_stops_each_row_at_its_own_eos(batch_adapter):
    from toolkit.evaluate import generate_batch, prompt_inputs

    model, tok = batch_adapter.model, batch_adapter.tok
    docs = batch_adapter.task_dict["shapes"]["test"]
    prompts = [prompt_inputs(model, tok, visuals(d) or [], q) for d, q in zip(docs[:3], ["a?", "bb bb?", "c?"])]
    free = generate_batch(model, tok, prompts, max_new_tokens=6)
    # an end-of-sequence token that ends one row early and that another row never says
    eos = next(t for t in free[0][:5] if any(t not in row for row in free[1:]))
    stopper = types.SimpleNamespace(eos_token_id=eos, pad_token_id=tok.pad_token_id)
    stopped = generate_batch(model, stopper, prompts, max_new_tokens=6)
    for row, tokens in enumerate(free):
        cut = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
        assert stopped[row] == cut  # a row ends at its own EOS, kept; the others go on
        assert generate_batch(model, stopper, [prompts[row]], max_new_tokens=6) == [cut]  # = the row alone
    assert len(stopped[0]) < 6 and any(len(t) == 6 for t in stopped)


# -- the model's context (lm_max_length, image tokens included) --


@pytest.fixture
def short_context(checkpoint):
    """The checkpoint's model with its context made shorter (lm_max_length is read only to bound sequences): the
    tests set it to fit their prompts, and compare with `batch_adapter`, the same weights at the full context."""
    from toolkit.lmms import NanoVLMScale

    model = NanoVLMScale(checkpoint, device="cpu", max_new_tokens=8, batch_size=2)
    model.task_dict = {"shapes": {"test": shapes_docs()}}
    return model


def lmms_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "toolkit.lmms" and r.levelname == "WARNING"]


def test_generate_until_answers_within_the_models_context(short_context, batch_adapter, caplog):
    """A prompt that fills the context is answered "" (it was decoded past every trained position, without a
    word), an answer stops at the context as `toolkit generate`'s does, and each kind is warned about once with
    its count, across batches. Batched answers still equal those of one request at a time."""
    from toolkit.evaluate import answer_from

    picture = "what is in picture s001x002?"
    # doc 0 fills the context exactly, with its image tokens (its text alone is short); doc 1 leaves room for
    # fewer than the 8 tokens asked; doc 4 (no image) for all 8; doc 2 runs past the context
    asked = [(0, "what is it?"), (1, picture), (4, "what is it?"), (2, picture)]
    requests = [Request((q, {"max_new_tokens": 8, "until": []}, visuals, d, "shapes", "test")) for d, q in asked]
    prompts = [short_context._prompt(q, visuals(short_context.task_dict["shapes"]["test"][d]) or [], "shapes")
               for d, q in asked]  # fmt: skip
    lengths = [len(ids) for ids, _ in prompts]
    context = lengths[0]
    assert lengths[3] > context and 0 < context - lengths[1] < 8 and lengths[2] + 8 <= context  # the set-up
    assert len(short_context._prompt("what is it?", [], "shapes")[0]) < context  # the image tokens count
    short_context.model.cfg.lm_max_length = context
    model, tok = short_context.model, short_context.tok
    capped = answer_from(model, tok, *prompts[1], max_new_tokens=context - lengths[1])
    expected = ["", capped, answer_from(model, tok, *prompts[2], max_new_tokens=8), ""]
    assert capped and capped != batch_adapter.generate_until(requests[1:2])[0]  # the cap shortened a real answer
    with caplog.at_level(logging.WARNING, logger="toolkit.lmms"):
        batched = short_context.generate_until(requests)
    warned = lmms_warnings(caplog)
    assert batched == expected
    assert len(warned) == 2, warned  # once per kind, not once per batch or per request
    assert warned[0].startswith("nanovlm_scale: 2 of 4 requests have a prompt that fills the model's context")
    assert warned[1].startswith("nanovlm_scale: 1 of 4 requests reached the model's context")
    assert all(f"lm_max_length is {context} tokens" in w for w in warned)
    assert f"document 1, {context - lengths[1]} new tokens of 8 after a {lengths[1]}-token prompt" in warned[1]
    short_context.batch_size = 1
    assert [short_context.generate_until([r])[0] for r in requests] == expected


def test_loglikelihood_refuses_a_request_longer_than_the_context(short_context, batch_adapter, caplog):
    """Prompt + continuation within the context: the score at the full context. One token longer: (-inf, False),
    counted and warned once, never scored at positions the model was not trained at (nor cut, which would cut
    the image tokens that open the prompt)."""
    doc = short_context.task_dict["shapes"]["test"][1]
    requests = [Request(("what is it?", " it is red", visuals, d, "shapes", "test")) for d in (1, 4)]
    ids, _ = short_context._prompt("what is it?", visuals(doc), "shapes")
    fits = len(ids) + len(short_context.tok.encode(" it is red"))
    full = batch_adapter.loglikelihood(requests)
    assert all(score > float("-inf") for score, _ in full)
    short_context.model.cfg.lm_max_length = fits
    assert short_context.loglikelihood(requests) == full  # the same weights and inputs
    short_context.model.cfg.lm_max_length = fits - 1
    with caplog.at_level(logging.WARNING, logger="toolkit.lmms"):
        scores = short_context.loglikelihood(requests)
    assert scores == [(float("-inf"), False), full[1]]  # doc 4 (no image) still fits
    (warned,) = lmms_warnings(caplog)
    assert warned.startswith("nanovlm_scale: 1 of 2 requests have a prompt and continuation longer than")
    assert f"document 1, {len(ids)} prompt + {fits - len(ids)} continuation tokens" in warned


# -- nanoVLM HEAD's per-benchmark prompts (eval/lmms_eval_wrapper.py at 4e0c096, get_benchmark_formatting) --

LETTER = {"text_replacements": {"\nOptions:": "\nChoices:", "\nA. ": "\nChoices:\nA. ",
                                "Please select the correct answer from the options above.": "Answer with the letter.",
                                "Answer with the option's letter from the given choices directly":
                                    "Answer with the letter directly"},
          "assistant_prefix": "Answer:", "user_prefix": "", "user_suffix": ""}  # fmt: skip
HEAD_FORMATS = {
    ("ai2d", "mmstar", "seedbench", "scienceqa"): LETTER,
    ("docvqa_val", "docvqa_test"): {
        "text_replacements": {}, "assistant_prefix": "", "user_suffix": "",
        "user_prefix": "Give a short and terse answer to the following question. Do not paraphrase or reformat the "
                       "text you see in the image. Do not include any full stops. Just give the answer without "
                       "additional explanation. Question: "},
    ("chartvqa",): {
        "text_replacements": {}, "assistant_prefix": "", "user_suffix": "",
        "user_prefix": "For the question below, follow the following instructions:\n-The answer should contain as "
                       "few words as possible.\n-Don't paraphrase or reformat the text you see in the image.\n-Answer"
                       " a binary question with Yes or No.\n-When asked to give a numerical value, provide a number "
                       "like 2 instead of Two.\n-If the final answer has two or more items, provide it in the list "
                       "format like [1, 2].\n-When asked to give a ratio, give out the decimal value like 0.25 "
                       "instead of 1:4.\n-When asked to give a percentage, give out the whole value like 17 instead "
                       "of decimal like 0.17%.\n-Don't include any units in the answer.\n-Do not include any full "
                       "stops at the end of the answer.\n-Try to include the full label from the graph when asked "
                       "about an entity.\nQuestion: "},
    ("textvqa_val", "textvqa_test"): {
        "text_replacements": {}, "assistant_prefix": "", "user_suffix": "",
        "user_prefix": "Answer the following question about the image using as few words as possible. Follow these "
                       "additional instructions:\n-Always answer a binary question with Yes or No.\n-When asked what "
                       "time it is, reply with the time seen in the image.\n-Do not put any full stops at the end of "
                       "the answer.\n-Do not put quotation marks around the answer.\n-An answer with one or two "
                       "words is favorable.\n-Do not apply common sense knowledge. The answer can be found in the "
                       "image.\nQuestion: "},
    ("mmmu_val", "mmmu_test"): {
        "text_replacements": {"Question:": "", "Answer with the option's letter from the given choices directly.":
                              "Answer with the letter directly.", "\nA. ": "\nChoices:\nA. "},
        "assistant_prefix": "Answer:", "user_prefix": "", "user_suffix": ""},
    ("infovqa_val", "mme", "ocrbench"): {
        "text_replacements": {}, "assistant_prefix": "", "user_prefix": "",
        "user_suffix": "\nGive a very brief answer."},
}  # fmt: skip


def test_prompt_formats_equal_nanovlm_heads_table():
    from toolkit.lmms import PROMPT_FORMATS, prompt_format

    named = {task for tasks in HEAD_FORMATS for task in tasks}
    assert set(PROMPT_FORMATS) == named
    for tasks, head in HEAD_FORMATS.items():
        for task in tasks:
            fmt = prompt_format(task)
            assert dict(fmt.replacements) == head["text_replacements"] and len(fmt.replacements) == len(
                head["text_replacements"]
            )
            assert list(dict(fmt.replacements)) == list(head["text_replacements"])  # HEAD applies them in order
            assert (fmt.user_prefix, fmt.user_suffix, fmt.assistant_prefix) == (
                head["user_prefix"], head["user_suffix"], head["assistant_prefix"])  # fmt: skip
    assert prompt_format("chartqa") == prompt_format("some_task_of_yours")  # HEAD's key is "chartvqa"


# (task, lmms-eval's question text, the user text HEAD asks, the start of the assistant's turn)
WORKED = [
    ("mmstar", "Which shape is red?\nA. circle\nB. square\nAnswer with the option's letter from the given choices "
     "directly.", "Which shape is red?\nChoices:\nA. circle\nB. square\nAnswer with the letter directly.", "Answer:"),
    ("ai2d", "Which part is the leaf?\nOptions:\nA. top\nB. root\nPlease select the correct answer from the "
     "options above.", "Which part is the leaf?\nChoices:\nChoices:\nA. top\nB. root\nAnswer with the letter.",
     "Answer:"),  # HEAD's two replacements each write "Choices:" when "Options:" precedes "A. "
    ("mmmu_val", "Question: <image 1> What is drawn?\nA. a cat\nB. a dog\nAnswer with the option's letter from "
     "the given choices directly.", " <image 1> What is drawn?\nChoices:\nA. a cat\nB. a dog\nAnswer with the "
     "letter directly.", "Answer:"),
    ("mme", "Is there a cat in the image? Please answer yes or no.",
     "Is there a cat in the image? Please answer yes or no.\nGive a very brief answer.", ""),
    ("docvqa_val", "What is the date?\nAnswer the question using a single word or phrase.",
     "Give a short and terse answer to the following question. Do not paraphrase or reformat the text you see in "
     "the image. Do not include any full stops. Just give the answer without additional explanation. Question: "
     "What is the date?\nAnswer the question using a single word or phrase.", ""),
    ("chartqa", "What is the highest bar?", "What is the highest bar?", ""),
]  # fmt: skip


@pytest.mark.parametrize(("task", "context", "user", "assistant"), WORKED, ids=[w[0] for w in WORKED])
def test_a_benchmark_question_is_asked_as_nanovlm_head_asks_it(adapter, task, context, user, assistant):
    from toolkit.data.conversation import image_string
    from toolkit.evaluate import tiles_for
    from toolkit.lmms import format_question

    assert format_question(context, task) == (user, assistant)
    images = [Image.new("RGB", (64, 30), (1, 2, 3)), Image.new("RGB", (20, 20), (4, 5, 6))]
    ids, pixels = adapter._prompt(context, images, task)
    tiles, grids = tiles_for(adapter.model, images)
    n = adapter.model.cfg.mp_image_token_length
    # HEAD: each image's string alone (no "<image: i>" tags), then the question; "Answer:" after the template's
    # generation prompt, in one string encoded once
    content = image_string(adapter.tok, grids[:1], n) + image_string(adapter.tok, grids[1:], n) + user
    rendered = adapter.tok.render([{"role": "user", "content": content}], add_generation_prompt=True)
    assert "<image: " not in rendered and rendered.endswith("<|im_start|>assistant\n")
    assert ids == adapter.tok.encode(rendered + assistant)
    assert torch.equal(pixels, tiles) and grids[0] != (1, 1)


def test_eval_without_lmms_eval_or_shards_says_what_to_do(checkpoint, capsys):
    from toolkit.__main__ import main

    assert main(["eval", "--checkpoint", checkpoint]) == 2
    assert "--shards" in capsys.readouterr().err
    if importlib.util.find_spec("lmms_eval") is None:
        assert main(["eval", "--checkpoint", checkpoint, "--lmms-tasks", "mme"]) == 2
        assert "lmms-eval==0.7.3" in capsys.readouterr().err


# -- against the real lmms-eval (make install puts it in .venv; elsewhere these skip) --

TASK_YAML = """
task: toy_generate
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function toy_utils.doc_to_visual
doc_to_text: !function toy_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
TOY_UTILS = """
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return "<image>" + doc["question"]
"""


def write_toy_task(folder, rows: dict, name: str = "toy_generate") -> str:
    """An offline lmms-eval task: a datasets folder of `rows` (image, question, answer) and its task YAML."""
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(folder / f"{name}_data"))
    (folder / "toy_utils.py").write_text(TOY_UTILS)
    (folder / f"{name}.yaml").write_text(TASK_YAML.replace("toy_generate", name).format(data=folder / f"{name}_data"))
    return str(folder)


def test_real_lmms_eval_scores_a_checkpoint_as_computed_from_the_model(adapter, checkpoint, tmp_path, monkeypatch):
    """An offline lmms-eval task of 4 images whose reference answers are the model's own answer for 2 of them,
    through `eval --lmms-tasks ... --json-out`.

    Exact match must then be 0.5: lmms-eval loaded the task, asked the adapter with the document's image and text,
    and scored what came back. (lmms-eval 0.7.3 turns `loglikelihood` results into strings in
    `unwrap_generation_output`, so its multiple-choice tasks fail for every model; the adapter's log-likelihoods
    are checked against the model's own loss above.)

    A LOCAL_RANK left in the environment (as an earlier in-process run can leave it) does not make lmms-eval's
    accelerate join a process group: scoring runs in this one process, and the variable is back afterwards.
    """
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (make install installs it)")
    from toolkit.__main__ import main

    monkeypatch.setenv("LOCAL_RANK", "0")

    model, tok = adapter.model, adapter.tok
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    images = [Image.new("RGB", (32 + 8 * i, 32), c) for i, c in enumerate(colours)]
    question = "what is in picture s002x005?"
    said = [answer(model, tok, [img], question, max_new_tokens=8) for img in images]
    rows = {"image": images, "question": [question] * 4, "answer": [said[0], said[1] + " not", said[2], "no"]}
    include = write_toy_task(tmp_path, rows)
    out = tmp_path / "scores" / "step_7.json"
    argv = ["eval", "--checkpoint", checkpoint, "--lmms-tasks", "toy_generate", "--lmms-include", include,
            "--lmms-batch-size", "2", "--device", "cpu", "--json-out", str(out)]  # fmt: skip
    assert main(argv) == 0
    written = json.loads(out.read_text())
    assert written["scores"] == {"toy_generate": {"exact_match": pytest.approx(0.5)}}
    assert written["tasks"] == ["toy_generate"] and not (tmp_path / "scores" / "step_7.json.tmp").exists()
    assert os.environ["LOCAL_RANK"] == "0"


def test_real_lmms_eval_batched_answers_equal_batch_1(checkpoint, tmp_path):
    """lmms-eval's own requests for 6 documents of different prompt lengths (tile grids, question lengths, one
    without an image), answered 3 at a time: every document's response equals the batch-1 response."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (make install installs it)")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from toolkit.lmms import NanoVLMScale

    docs = [d for d in shapes_docs() if d["image"] is not None]
    questions = ["what is in picture s001x002?", "colour?", "what is in picture s004x001? and where is it?", "shape?",
                 "is it s003x003?"]  # fmt: skip
    rows = {"image": [d["image"] for d in docs], "question": questions, "answer": ["x"] * len(docs)}
    include = write_toy_task(tmp_path, rows)

    def responses(batch_size: int) -> tuple[list, list[torch.Tensor]]:
        model = NanoVLMScale(checkpoint, device="cpu", batch_size=batch_size)
        masks = spy_generate(model.model)
        out = simple_evaluate(model=model, tasks=["toy_generate"], batch_size=batch_size, log_samples=True,
                              task_manager=TaskManager(include_path=include, include_defaults=False))  # fmt: skip
        samples = sorted(out["samples"]["toy_generate"], key=lambda r: r["doc_id"])
        return [r["resps"] for r in samples], masks

    alone, masks1 = responses(1)
    batched, masks3 = responses(3)
    assert batched == alone and len(alone) == 5
    assert [m.shape[0] for m in masks1] == [1] * 5 and sorted(m.shape[0] for m in masks3) == [2, 3]
    assert all((m == 0).any() for m in masks3)  # both batches were padded
    assert len({str(r) for r in alone}) > 2, "the documents got different answers: the equality is not trivial"


def test_real_lmms_eval_registry_resolves_the_entry_point():
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (make install installs it)")
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from toolkit.lmms import NanoVLMScale, model_manifest

    registry = ModelRegistryV2()
    registry.register_manifest(model_manifest())
    assert registry.get_model_class("nanovlm_scale") is NanoVLMScale  # an lmms subclass, declared simple


# -- scoring while training: the watcher, with a stand-in scorer (the real one is in the training test below) --

FAKE_SCORER = """
import json, os, pathlib, sys, time
out, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
if mode == "fail":
    print("the scorer fell over")
    sys.exit(3)
while mode == "wait" and not out.with_suffix(".go").exists():
    time.sleep(0.05)
step = int(out.stem.split("_")[1])
scores = {"toy": {"exact_match": step / 10}, "env": {"rank_seen": float("RANK" in os.environ)}}
tmp = out.with_name(out.name + ".tmp")
tmp.write_text(json.dumps({"scores": scores}))
os.replace(tmp, out)
"""


class Writer:  # MetricsWriter as the watcher sees it
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log(self, step: int, metrics: dict) -> None:
        self.logged.append((step, metrics))


@pytest.fixture
def watch_env(tmp_path, monkeypatch):
    """A run folder with exports, a stand-in scorer whose behaviour is set per step, and a watcher factory."""
    from toolkit.config import TrainConfig
    from toolkit.train import lmms_watch

    modes: dict[int, str] = {}
    monkeypatch.setattr(lmms_watch, "check_can_score", lambda t: None)  # lmms-eval is not what is tested here
    monkeypatch.setattr(lmms_watch.LmmsWatch, "eval_command", lambda self, export, result: [
        sys.executable, "-c", FAKE_SCORER, str(result), modes.get(int(result.stem.split("_")[1]), "now")])  # fmt: skip
    monkeypatch.setattr(lmms_watch, "POLL_S", 0.05)
    monkeypatch.setenv("RANK", "0")  # a training rank's variables: the job script unsets them for the scorer
    run = tmp_path / "run"
    for step in (2, 4, 6):
        (run / "export" / f"lmms_step_{step}").mkdir(parents=True)
    t = TrainConfig(lmms_tasks="toy", lmms_interval=2, lmms_wait=60)

    def make(start_step: int = 0, **fields) -> tuple[lmms_watch.LmmsWatch, Writer]:
        writer = Writer()
        for k, v in fields.items():
            setattr(t, k, v)
        return lmms_watch.LmmsWatch(t, run, writer=writer, device="cpu", rank=0, start_step=start_step), writer

    return run, modes, make


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def ledger(run) -> dict[str, str]:
    return {s: j["state"] for s, j in json.loads((run / "lmms" / "ledger.json").read_text()).items()}


def test_watch_logs_each_score_once_at_its_step_also_one_that_finished_while_the_run_was_down(watch_env, caplog):
    run, modes, make = watch_env
    modes[2] = "wait"  # step 2's scorer is still going when the run stops
    watch, writer = make()
    assert [watch.due(s) for s in (1, 2, 3, 4)] == [False, True, False, True]
    watch.launch(2, run / "export" / "lmms_step_2")
    watch.launch(4, run / "export" / "lmms_step_4")
    watch.poll()
    assert ledger(run) == {"2": "running", "4": "queued"} and 4 not in watch.procs  # one scorer at a time
    with caplog.at_level("WARNING"):
        watch.finish(wait=False)  # a stop request: nothing waits
    assert "step(s) 2, 4 not finished" in caplog.text and writer.logged == []
    proc = watch.procs[2]
    (run / "lmms" / "step_2.go").touch()  # step 2's scorer finishes while the run is down
    proc.wait(timeout=60)
    again, writer2 = make(start_step=4)  # the resume logs it at step 2, then runs step 4's
    assert writer2.logged == [(2, {"lmms/toy/exact_match": 0.2, "lmms/env/rank_seen": 0.0})]
    wait_until(lambda: (again.poll(), len(writer2.logged) == 2)[1])
    assert writer2.logged[1] == (4, {"lmms/toy/exact_match": 0.4, "lmms/env/rank_seen": 0.0})
    again.poll()
    assert len(writer2.logged) == 2 and ledger(run) == {"2": "logged", "4": "logged"}  # each once
    assert (run / "lmms" / "step_2.rc").read_text().strip() == "0"


def test_a_failed_scoring_is_a_warning_that_names_its_log_and_is_never_logged(watch_env, caplog):
    run, modes, make = watch_env
    modes[2] = "fail"
    watch, writer = make()
    watch.launch(2, run / "export" / "lmms_step_2")
    with caplog.at_level("WARNING"):
        wait_until(lambda: (watch.poll(), ledger(run)["2"] == "failed")[1])
    log_file = run.resolve() / "lmms" / "step_2.log"
    assert f"see {log_file}" in caplog.text and "status 3" in caplog.text
    assert "the scorer fell over" in log_file.read_text() and writer.logged == []
    watch.poll()
    assert [r.levelname for r in caplog.records] == ["WARNING"]  # warned once


def test_resume_from_an_earlier_step_forgets_the_later_jobs_and_a_dead_job_is_started_again(watch_env):
    run, _, make = watch_env
    watch, _ = make()
    for step in (2, 6):
        watch.launch(step, run / "export" / f"lmms_step_{step}")
        watch.procs[step].wait(timeout=60)  # never polled: the ledger still says running
    assert ledger(run) == {"2": "running", "6": "running"}
    for kind in ("json", "rc"):  # as if step 2's scorer had died with the run: no result, no status
        watch.path(kind, 2).unlink()
    again, writer = make(start_step=4)  # 6 will be trained, exported and scored again; 2 is started again
    assert sorted(again.jobs) == [2] and not watch.path("json", 6).exists()
    wait_until(lambda: (again.poll(), writer.logged)[1])
    assert writer.logged == [(2, {"lmms/toy/exact_match": 0.2, "lmms/env/rank_seen": 0.0})]
    assert ledger(run) == {"2": "logged"}


def test_finish_waits_for_this_runs_scorings(watch_env, caplog):
    run, _, make = watch_env
    watch, writer = make(lmms_wait=60)
    watch.launch(2, run / "export" / "lmms_step_2")
    watch.launch(4, run / "export" / "lmms_step_4")  # queued behind step 2's
    with caplog.at_level("INFO"):
        watch.finish(wait=True)
    assert [s for s, _ in writer.logged] == [2, 4] and "waiting up to 60 s for lmms-eval scoring of step(s) 2, 4" in (
        caplog.text
    )


def test_slurm_launcher_submits_one_sbatch_job_per_export(watch_env, tmp_path, monkeypatch):
    """A stand-in sbatch on PATH that records its arguments and runs the script."""
    run, _, make = watch_env
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\nbash "$2" >/dev/null 2>&1 &\necho 777\n'
    )
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    watch, writer = make(lmms_launcher="slurm")
    watch.launch(2, run / "export" / "lmms_step_2")
    script = run.resolve() / "lmms" / "step_2.sh"
    assert (tmp_path / "calls").read_text().split() == ["--parsable", str(script)]
    assert watch.jobs[2].job_id == "777" and "#SBATCH --gpus-per-node=1" in script.read_text()
    assert f"#SBATCH --output={run.resolve() / 'lmms' / 'step_2.log'}" in script.read_text()
    assert "--device auto" not in script.read_text()  # the stand-in command; the real one is checked below
    wait_until(lambda: (watch.poll(), writer.logged)[1])
    assert writer.logged == [(2, {"lmms/toy/exact_match": 0.2, "lmms/env/rank_seen": 0.0})]


def test_slurm_launcher_without_sbatch_and_a_missing_include_are_refused(tmp_path, monkeypatch):
    from toolkit.config import TrainConfig
    from toolkit.errors import UserError
    from toolkit.train import lmms_watch

    monkeypatch.setattr(lmms_watch.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(lmms_watch.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="sbatch, which is not on PATH"):
        lmms_watch.check_can_score(TrainConfig(lmms_tasks="mme", lmms_interval=5, lmms_launcher="slurm"))
    with pytest.raises(UserError, match="not a folder"):
        lmms_watch.check_can_score(TrainConfig(lmms_tasks="mme", lmms_interval=5, lmms_include=str(tmp_path / "x")))
    monkeypatch.setattr(lmms_watch.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"lmms-eval==0\.7\.3"):
        lmms_watch.check_can_score(TrainConfig(lmms_tasks="mme", lmms_interval=5))


# -- a training run scored by real lmms-eval while it trains --

TRAIN_TASK_YAML = """
task: toy_train
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function toy_utils.doc_to_visual
doc_to_text: !function toy_utils.doc_to_text
doc_to_target: answer
process_results: !function toy_utils.process_results
generation_kwargs:
  max_new_tokens: 8
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: answer_chars
    aggregation: mean
    higher_is_better: true
"""
TRAIN_TOY_UTILS = """
import os
import time


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    time.sleep(float(os.environ.get("TOY_SLEEP", "0")))  # a slow scorer
    return "<image>" + doc["question"]


def process_results(doc, results):
    said = results[0]
    return {"exact_match": float(said == doc["answer"]), "answer_chars": float(len(said))}
"""


def talkative_start(synth, out) -> str:
    """A tiny-preset model with random weights that never says a special or blank token, for train.init_from (with
    small learning rates): four steps from nanoVLM's init teach the tiny model to say newlines only, which would
    score 0 at every step and make the comparison with lmms-eval's own scores one between zeros."""
    from toolkit.config import load_config

    cfg = load_config("tiny", [f"model.tokenizer={synth / 'tokenizer'}"]).model
    hf = AutoTokenizer.from_pretrained(str(synth / "tokenizer"))
    torch.manual_seed(5)
    model = VisionLanguageModel(cfg)
    blank = [i for i in range(cfg.lm_base_vocab_size) if not hf.decode([i], skip_special_tokens=True).strip()]
    with torch.no_grad():
        model.decoder.head.weight[cfg.lm_base_vocab_size :] = 0
        model.decoder.head.weight[blank] = 0
    model.save_pretrained(str(out), tokenizer_dir=str(synth / "tokenizer"))
    return str(out)


@pytest.mark.slow  # about 50 s on 2 cores: a training run and three lmms-eval runs
def test_real_lmms_eval_scores_two_exports_while_training_goes_on(tmp_path):
    """4 steps, lmms_interval 2: the exports of steps 2 and 4 are scored by background processes; their scores
    land in metrics.jsonl at steps 2 and 4, after the later training steps' lines (training did not wait), and
    equal lmms-eval's scores of those exports run here."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (make install installs it)")
    import datasets

    from tests.conftest import CPU_ENV, REPO
    from toolkit.data.prepare.synthetic import write_synth
    from toolkit.lmms import run_tasks, scalar_scores

    synth = tmp_path / "synth"
    write_synth(str(synth), samples=64, val_samples=8, seed=0)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    colours = [(220, 20, 20), (20, 220, 20), (20, 20, 220), (220, 220, 20)]
    rows = {"image": [Image.new("RGB", (32 + 16 * i, 40), c) for i, c in enumerate(colours)],
            "question": ["What colour is the shape?", "What shape is it?", "How many shapes?", "Where is it?"],
            "answer": ["red", "a circle", "two", "top left"]}  # fmt: skip
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tasks / "data"))
    (tasks / "toy_utils.py").write_text(TRAIN_TOY_UTILS)
    (tasks / "toy_train.yaml").write_text(TRAIN_TASK_YAML.format(data=tasks / "data"))
    run, start = tmp_path / "run", talkative_start(synth, tmp_path / "init")
    args = ["backend.precision=fp32", "backend.device=cpu", f"model.tokenizer={synth / 'tokenizer'}",
            f"data.train_shards={synth / 'train'}", f"data.val_shards={synth / 'val'}", "data.num_workers=0",
            "data.shuffle_buffer=16", "train.batch_size=2", "train.max_training_steps=4", "train.eval_interval=0",
            "train.checkpoint_interval=0", "train.export_best=false", f"train.run_dir={run}",
            "train.lmms_tasks=toy_train", "train.lmms_interval=2", f"train.lmms_include={tasks}",
            "train.lmms_batch_size=2", "train.lmms_wait=300", "train.lr_mp=1e-5", "train.lr_vision_backbone=1e-5",
            "train.lr_language_backbone=1e-5", f"train.init_from={start}"]  # fmt: skip
    env = {**os.environ, **CPU_ENV, "TOY_SLEEP": "0.5"}
    done = subprocess.run([sys.executable, "-m", "toolkit", "train", "--config", "tiny", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=400)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = {m["step"]: i for i, m in enumerate(lines) if "loss" in m}
    scored = {m["step"]: (i, m) for i, m in enumerate(lines) if any(k.startswith("lmms/") for k in m)}
    assert sorted(trained) == [1, 2, 3, 4] and sorted(scored) == [2, 4]  # each score once, at its export's step
    assert scored[2][0] > trained[4], "step 2's score came after steps 3 and 4 were trained: training went on"
    assert re.search(r"waiting up to 300 s for lmms-eval scoring of step\(s\) (2, )?4 ", done.stderr)
    for step in (2, 4):
        export = run / "export" / f"lmms_step_{step}"
        here = scalar_scores(run_tasks(str(export), ["toy_train"], include_path=str(tasks), device="cpu",
                                       batch_size=2))  # fmt: skip
        logged = {k: v for k, v in scored[step][1].items() if k != "step"}
        assert logged == {f"lmms/toy_train/{m}": pytest.approx(v) for m, v in here["toy_train"].items()}
        assert set(here["toy_train"]) == {"exact_match", "answer_chars"} and here["toy_train"]["answer_chars"] > 0
        assert json.loads((run / "lmms" / f"step_{step}.json").read_text())["checkpoint"] == str(export.resolve())
    assert json.loads((run / "lmms" / "ledger.json").read_text()).keys() == {"2", "4"}
