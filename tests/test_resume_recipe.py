"""A resume trains with the config it is given: the schedule, peak LRs and weight decay are the config's, not the
checkpoint's. Measured before: a run extended from 4 to 8 steps trained steps 5-8 at the old 4-step curve's floor
(lr_mp 0.0003) with the old peaks and weight decay, while its config.yaml showed the new values."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from cli_runs import logged, train, train_args, write_data

from toolkit.train.schedule import WarmupCosine
from toolkit.train.trainer import Trainer


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("synth"))


@pytest.mark.parametrize(
    "backend",
    [
        ["backend.name=single"],
        ["backend.name=fsdp"],
        ["backend.name=deepspeed", "backend.ds_config=ds_configs/zero2.json"],
    ],
    ids=["single", "fsdp", "zero2"],
)
def test_a_resume_with_a_longer_run_and_new_peaks_trains_on_the_new_recipe(
    backend, synth, tmp_path, caplog, monkeypatch
) -> None:
    run = tmp_path / "run"
    assert train(train_args(synth, run, *backend, "train.weight_decay=0.01", steps=4)) == 0
    new = ["train.lr_mp=0.01", "train.lr_language_backbone=0.002", "train.weight_decay=0.2"]
    decays = []  # the weight decay each resumed step's optimizer holds (the log line alone proved nothing)
    step = Trainer._run_step

    def run_step(self, *args, **kwargs):
        decays.append({group["weight_decay"] for group in self.backend.optimizer.param_groups})
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_run_step", run_step)
    with caplog.at_level(logging.INFO, logger="toolkit"):
        assert train(train_args(synth, run, *backend, *new, steps=8)) == 0
    assert decays == [{0.2}] * 4
    said = [r.getMessage() for r in caplog.records if "not the checkpoint's" in r.getMessage()]
    assert len(said) == 1 and "train.max_training_steps 4 -> 8" in said[0] and "weight decay 0.01 -> 0.2" in said[0], (
        said
    )
    schedule = WarmupCosine(8)
    for step in range(5, 9):  # the LR each step trained with: the 8-step curve at the new peaks
        lr = logged(run)[step]["lr"]
        assert lr["mp"] == pytest.approx(0.01 * schedule(step - 1), rel=1e-12), (step, lr)
        assert lr["language"] == pytest.approx(0.002 * schedule(step - 1), rel=1e-12), (step, lr)
        assert lr["vision"] == pytest.approx(1e-3 * schedule(step - 1), rel=1e-12), (step, lr)  # the preset's peak


def test_an_unchanged_resume_changes_nothing(synth, tmp_path, caplog) -> None:
    """The same config: no line, and the LRs the uninterrupted run had (the same product, bit for bit)."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train(train_args(synth, whole, "backend.name=single", steps=4)) == 0
    assert train(train_args(synth, cut, "backend.name=single", "train.stop_at_step=2", steps=4)) == 0
    with caplog.at_level(logging.INFO, logger="toolkit"):
        assert train(train_args(synth, cut, "backend.name=single", steps=4)) == 0
    assert not [r for r in caplog.records if "not the checkpoint's" in r.getMessage()]
    assert [logged(cut)[s]["lr"] for s in (3, 4)] == [logged(whole)[s]["lr"] for s in (3, 4)]
    assert [logged(cut)[s]["loss"] for s in (3, 4)] == [logged(whole)[s]["loss"] for s in (3, 4)]
