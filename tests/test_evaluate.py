"""Held-out samples for answer accuracy: what cannot be read is counted, and the table names each figure once."""

from __future__ import annotations

import logging
from pathlib import Path

import shardgen
from shardgen import Spec, write_shard

from toolkit.evaluate import Accuracy, iter_eval_samples


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
