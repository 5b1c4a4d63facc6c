"""Held-out samples for answer accuracy: what cannot be read is counted, and the table names each figure once."""

from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest
import shardgen
import torch
from PIL import Image
from shardgen import Spec, make_tokenizer, write_shard

from tests.conftest import tiny_model_config
from toolkit.data.tokenizer import VLMTokenizer, load_tokenizer
from toolkit.evaluate import Accuracy, answer_accuracy, answer_from, generate_batch, iter_eval_samples, prompt_inputs
from toolkit.model import VisionLanguageModel


def test_unreadable_held_out_samples_are_counted_not_dropped_silently(tmp_path: Path, caplog) -> None:
    good = shardgen.good("g0")
    typed = shardgen.good("g1")
    typed.meta["question_type"] = "color"
    broken = Spec("b0", shardgen.good("b0").meta, [("img0.jpg", shardgen.corrupt_jpeg())])
    write_shard(tmp_path / "shard-000000.tar", [good, broken, typed])
    write_shard(tmp_path / "shard-000001.tar", [shardgen.good("t0"), shardgen.good("t1")], truncate_in="t1")
    with caplog.at_level(logging.WARNING, logger="toolkit.evaluate"):
        samples = list(iter_eval_samples(str(tmp_path)))
    assert [s["question_type"] for s in samples] == ["all questions", "color", "all questions"]  # g0, g1, t0
    assert [len(s["images"]) for s in samples] == [1, 1, 1]
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "skipped 2 held-out samples" in warning and ":b0 (" in warning  # the bad image and the cut shard


def test_accuracy_table_lists_question_types_only_when_there_are_several() -> None:
    one = Accuracy()
    for ok in (True, False, True, True):
        one.add("all questions", ok)
    assert one.table() == {"all": 0.75}  # was {"all questions": 0.75, "all": 0.75}: the same figure twice
    two = Accuracy()
    for kind, ok in [("color", True), ("color", False), ("shape", True)]:
        two.add(kind, ok)
    assert two.table() == {"color": 0.5, "shape": 1.0, "all": 2 / 3}


def test_held_out_samples_whose_members_are_apart_in_the_tar_are_counted(tmp_path: Path, caplog) -> None:
    """`tar cf x.tar *.json *.png` puts each JSON away from its image: answering the JSON half would ask about an
    image the model never sees."""
    a, b = shardgen.good("a"), shardgen.good("b")
    halves = [Spec("a", a.meta), Spec("b", b.meta), Spec("a", None, a.images), Spec("b", None, b.images)]
    write_shard(tmp_path / "shard-000000.tar", [*halves, shardgen.good("c")])
    with caplog.at_level(logging.WARNING, logger="toolkit.evaluate"):
        samples = list(iter_eval_samples(str(tmp_path)))
    assert [s["texts"][0]["assistant"] for s in samples] == ["it is c"]
    assert "skipped 4 held-out samples" in "\n".join(r.getMessage() for r in caplog.records)


def test_questions_without_a_reference_word_are_left_out_not_counted_right() -> None:
    """An empty reference answer matched an empty generated one: shards without answers scored 100%."""
    import torch

    from toolkit.evaluate import answer_accuracy

    samples = [{"images": [], "texts": [{"user": "q", "assistant": " ... "}]} for _ in range(3)]
    acc, shown = answer_accuracy(torch.nn.Module(), None, samples)  # nothing to answer: the model is never asked
    assert (acc.unanswerable, dict(acc.total), shown) == (3, {}, [])


def test_generate_refuses_an_empty_prompt_in_one_line_before_reading_anything(tmp_path, capsys) -> None:
    """`--prompt ""` (an unset shell variable, most often) was answered: the user's turn held the image tokens
    alone, a turn training never asks (an image-caption pair is asked data.caption_prompt). The error names that
    prompt, and comes before the checkpoint and the image are looked at (neither exists here)."""
    from toolkit.__main__ import main
    from toolkit.config import DataConfig

    for prompt in ("", " \n\t"):
        argv = ["generate", "--checkpoint", str(tmp_path / "none"), "--image", str(tmp_path / "x.png"), "--prompt"]
        assert main([*argv, prompt]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --prompt is empty") and err.count("\n") == 1, err
        assert f'--prompt "{DataConfig().caption_prompt}"' in err


# -- the model's context (lm_max_length, image tokens included) --


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[VisionLanguageModel, VLMTokenizer]:
    """A random tiny model whose head never favours a special or blank token: its answers run to the token limit
    and decode to text, so a cap shows in their length."""
    tok_dir, base = make_tokenizer(tmp_path_factory.mktemp("evaluate") / "tok")
    cfg = tiny_model_config(lm_base_vocab_size=base, lm_vocab_size=base + 66, tokenizer=tok_dir)
    torch.manual_seed(3)
    model = VisionLanguageModel(cfg).eval()
    tok = load_tokenizer(cfg)
    blank = [i for i in range(base) if not tok.decode([i], skip_special_tokens=True).strip()]
    with torch.no_grad():
        model.decoder.head.weight[base:] = 0
        model.decoder.head.weight[blank] = 0
    return model, tok


def picture(size: tuple[int, int]) -> list[Image.Image]:
    return [Image.new("RGB", size, (30, 200, 30))]


def spy_generate(model: VisionLanguageModel, monkeypatch) -> list[tuple[int, int]]:
    """Records (max_new_tokens asked, tokens given) of every model.generate call."""
    calls, original = [], model.generate

    def generate(*args, max_new_tokens: int, **kwargs) -> torch.Tensor:
        out = original(*args, max_new_tokens=max_new_tokens, **kwargs)
        calls.append((max_new_tokens, out.shape[1]))
        return out

    monkeypatch.setattr(model, "generate", generate)
    return calls


def test_answers_stop_at_the_models_context(tiny, monkeypatch) -> None:
    """A prompt 3 tokens short of the context was given all 8 tokens asked: 5 were decoded past every position
    the model was trained at, without a word. Now 3, the first 3 of the answer the full context gives."""
    model, tok = tiny
    ids, pixels = prompt_inputs(model, tok, picture((64, 30)), "colour?")
    free = generate_batch(model, tok, [(ids, pixels)], max_new_tokens=8)[0]
    whole = answer_from(model, tok, ids, pixels, max_new_tokens=8)
    assert len(free) == 8 and tok.eos_token_id not in free, "the set-up: the answer runs to the limit"
    monkeypatch.setattr(model.cfg, "lm_max_length", len(ids) + 3)
    calls = spy_generate(model, monkeypatch)
    assert generate_batch(model, tok, [(ids, pixels)], max_new_tokens=8) == [free[:3]]
    capped = answer_from(model, tok, ids, pixels, max_new_tokens=8)
    assert calls == [(3, 3), (3, 3)]
    assert capped == tok.decode(free[:3], skip_special_tokens=True).strip() and capped and capped != whole


def test_a_prompt_that_fills_the_context_is_answered_empty_without_decoding(tiny, monkeypatch) -> None:
    """No room left: "" and [] (generate() itself cannot give no tokens), for a prompt that fills the context
    exactly and for one longer than it; the model is never run."""
    model, tok = tiny
    ids, pixels = prompt_inputs(model, tok, picture((60, 60)), "what is in picture s001x002?")
    calls = spy_generate(model, monkeypatch)
    for context in (len(ids), len(ids) - 1):
        monkeypatch.setattr(model.cfg, "lm_max_length", context)
        assert answer_from(model, tok, ids, pixels, max_new_tokens=8) == ""
        assert generate_batch(model, tok, [(ids, pixels), (ids, pixels)], max_new_tokens=8) == [[], []]
    assert calls == []


def test_batched_answers_equal_one_at_a_time_when_rows_meet_the_context(tiny, monkeypatch) -> None:
    """Row 0 fills the context (no tokens, and its tiles must not reach the others), row 1 has room for all 16
    tokens asked, row 2 for fewer: each row gets what it gets alone."""
    model, tok = tiny
    prompts = [prompt_inputs(model, tok, picture((60, 60)), "what is in picture s001x002?"),
               prompt_inputs(model, tok, [], "what is it?"),
               prompt_inputs(model, tok, picture((64, 30)), "colour?")]  # fmt: skip
    lengths = [len(ids) for ids, _ in prompts]
    context = lengths[0]
    assert lengths[1] + 16 <= context and 0 < context - lengths[2] < 16  # the set-up
    monkeypatch.setattr(model.cfg, "lm_max_length", context)
    batched = generate_batch(model, tok, prompts, max_new_tokens=16)
    assert batched == [generate_batch(model, tok, [p], max_new_tokens=16)[0] for p in prompts]
    assert [len(tokens) for tokens in batched] == [0, 16, context - lengths[2]]


def test_answer_accuracy_counts_questions_that_fill_the_context_and_warns_once(tiny, monkeypatch, caplog) -> None:
    """A held-out question longer than the context was answered past it and scored. Now it is left out of the
    figures, counted in `too_long` beside `unanswerable`, and one warning names the count and the first."""
    model, tok = tiny
    long_q, longer_q = "what is in picture s001x002?", "what is in picture s002x003?"
    samples = [
        {"images": picture((60, 60)), "texts": [{"user": long_q, "assistant": "green"}]},
        {"images": [], "texts": [{"user": "what is it?", "assistant": "green"}]},
        {"images": picture((60, 60)), "texts": [{"user": longer_q, "assistant": "green"}]},
        {"images": [], "texts": [{"user": "what is it?", "assistant": "..."}]},
    ]
    context = len(prompt_inputs(model, tok, picture((60, 60)), long_q)[0])
    monkeypatch.setattr(model.cfg, "lm_max_length", context)
    with caplog.at_level(logging.WARNING, logger="toolkit.evaluate"):
        acc, shown = answer_accuracy(model, tok, samples)
    assert (acc.too_long, acc.unanswerable, sum(acc.total.values())) == (2, 1, 1)
    assert [row["question"] for row in shown] == ["what is it?"]
    (warned,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned.startswith("answer accuracy left out 2 questions whose prompt fills the model's context")
    assert f"lm_max_length {context}" in warned and repr(long_q) in warned and longer_q not in warned


def test_eval_prints_the_questions_left_out_for_the_context(monkeypatch, capsys) -> None:
    """`python -m toolkit eval --shards` prints the too-long count beside the unanswerable one."""
    import toolkit.data.shards
    from toolkit import evaluate
    from toolkit.__main__ import main

    acc = Accuracy(too_long=3)
    acc.add("all questions", True)
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(lm_max_length=64))
    monkeypatch.setattr(toolkit.data.shards, "resolve_sets", lambda *a, **k: None)
    monkeypatch.setattr(evaluate, "load_for_inference", lambda *a, **k: (model, None))
    monkeypatch.setattr(evaluate, "heldout_totals", lambda *a, **k: (1.0, 10))
    monkeypatch.setattr(evaluate, "iter_eval_samples", lambda *a, **k: [])
    monkeypatch.setattr(evaluate, "answer_accuracy", lambda *a, **k: (acc, []))
    assert main(["eval", "--checkpoint", "ckpt", "--shards", "val"]) == 0
    out = capsys.readouterr().out
    assert "accuracy: 3 questions left out, their prompt fills the model's context (lm_max_length 64" in out
    assert "no question was scored" not in out
