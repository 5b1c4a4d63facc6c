"""Resumed runs draw the random numbers the uninterrupted run draws (dropout), and ranks never share a stream."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_runs import logged, train, train_args, write_data

from toolkit.train.checkpoint import restore_rng, rng_state


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("synth"))


def losses(run: Path) -> dict[int, float]:
    return {step: record["loss"] for step, record in logged(run).items()}


def test_a_resume_with_dropout_is_exact(synth, tmp_path) -> None:
    """Making the loader's iterator drew from torch's global generator: the resumed run made it after restoring
    the RNG, the uninterrupted one long before, so every dropout mask after the resume differed."""
    dropout = ["backend.name=single", "model.lm_dropout=0.1", "model.vit_dropout=0.1"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train(train_args(synth, whole, *dropout, steps=4)) == 0
    assert train(train_args(synth, cut, *dropout, "train.stop_at_step=2", steps=4)) == 0
    assert train(train_args(synth, cut, *dropout, steps=4)) == 0
    assert losses(cut) == losses(whole)
    off = tmp_path / "off"  # dropout is on: the same run without it trains to other losses
    assert train(train_args(synth, off, "backend.name=single", steps=4)) == 0
    assert losses(off)[3] != losses(whole)[3]


def test_after_a_world_size_change_ranks_draw_their_own_numbers() -> None:
    """Every rank reads rank 0's saved state when the world size changed; it used to keep it as it was."""
    saved = rng_state()
    draws = []
    for rank in (0, 1, 1):
        restore_rng(saved, rank=rank, own=False)
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1]) and torch.equal(draws[1], draws[2])  # distinct, and reproducible
    restore_rng(saved, rank=1, own=True)  # the same world size: the rank's own state, as saved
    restored = torch.rand(4)
    torch.set_rng_state(saved["torch"])
    assert torch.equal(restored, torch.rand(4))
