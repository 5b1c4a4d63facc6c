"""A bad run is refused before step 1, and no checkpoint file can run code when it is loaded (issue 12)."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit import __main__ as cli
from toolkit.data.prepare.synthetic import write_synth
from toolkit.train import checkpoint as ckpt
from toolkit.train.trainer import Trainer


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synth(str(out), samples=48, val_samples=8, seed=0)
    return out


def base_args(synth: Path, run: Path, steps: int = 2) -> list[str]:
    return [
        "train", "--config", "tiny", "backend.device=cpu", "backend.precision=fp32",
        f"model.tokenizer={synth / 'tokenizer'}", f"data.train_shards={synth / 'train'}",
        f"data.val_shards={synth / 'val'}", "data.num_workers=0", "data.shuffle_buffer=8", "train.batch_size=2",
        f"train.max_training_steps={steps}", "train.eval_interval=0", "train.export_best=false",
        f"train.run_dir={run}", "train.log_interval=1",
    ]  # fmt: skip


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = cli.main(args)
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- before step 1


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["data.val_shards=/nowhere/val"], "data.val_shards"),
        (["model.tokenizer=/nowhere/tok"], "model.tokenizer"),
        (["model.vision_backbone=/nowhere/siglip"], "model.vision_backbone"),
        (["model.language_backbone=EMPTY_DIR"], "model.language_backbone"),
        (["backend.name=deepspeed", "backend.ds_config=/nowhere/zero2.json"], "backend.ds_config"),
        (["data.val_shards=", "train.eval_interval=1"], "train.eval_interval"),
        (["data.val_shards=", "train.eval_accuracy_samples=4"], "train.eval_accuracy_samples"),
        (["train.eval_max_batches=-1"], "train.eval_max_batches"),
        (["train.run_dir=A_FILE/run"], "train.run_dir"),
    ],
)
def test_bad_setting_exits_before_any_step_and_writes_nothing(overrides, field, synth, tmp_path, capsys, monkeypatch):
    fits = []
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: fits.append(1) or [])
    (tmp_path / "A_FILE").write_text("not a folder")
    (tmp_path / "EMPTY_DIR").mkdir()
    run = tmp_path / "run"
    args = base_args(synth, run) + [o.replace("EMPTY_DIR", str(tmp_path / "EMPTY_DIR")) for o in overrides]
    args = [a.replace("A_FILE", str(tmp_path / "A_FILE")) for a in args]
    code, err = run_cli(args, capsys)
    assert code == 2, err
    assert field in err.strip().splitlines()[-1]
    assert fits == []  # the loop was never entered: no optimizer step
    assert not run.exists()  # nothing written to the run folder


def test_good_settings_pass_the_same_checks(synth, tmp_path, capsys, monkeypatch):
    """The control: the same arguments without the bad override reach the loop."""
    fits = []
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: fits.append(1) or [])
    code, err = run_cli(base_args(synth, tmp_path / "run"), capsys)
    assert code == 0, err
    assert fits == [1]


# ---------------------------------------------------------------------------------------------- no unpickling


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(file: Path, marker: Path) -> None:
    """Replace `file` with a pickle whose loading would run code (torch.save format for .pt, raw for DCP's)."""
    if file.suffix == ".pt":
        torch.save({"model": Payload(marker)}, file)
    else:
        file.write_bytes(pickle.dumps(Payload(marker)))


@pytest.fixture(scope="module")
def trained_runs(synth, tmp_path_factory) -> dict[str, Path]:
    """A 2-step run of single and of fsdp (one rank), each with its checkpoint at step 2."""
    runs = {}
    for name in ("single", "fsdp"):
        run = tmp_path_factory.mktemp(name) / "run"
        assert cli.main([*base_args(synth, run), f"backend.name={name}"]) == 0
        runs[name] = run
    return runs


FILES = {
    "single": ["rank_0.pt", "model/state.pt"],
    "fsdp": ["rank_0.pt", "model/fsdp_extra.pt", "model/.metadata"],
}
EXPORT_READS = {"model/state.pt", "model/.metadata"}  # offline export needs the weights only


@pytest.mark.parametrize(("name", "member"), [(n, m) for n, files in FILES.items() for m in files])
def test_planted_pickle_is_refused_by_resume_and_export(name, member, trained_runs, synth, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_runs[name], run)
    step = ckpt.RunDir(run).latest()
    assert (step / member).exists()
    marker = tmp_path / "payload-ran"
    plant(step / member, marker)
    code, err = run_cli([*base_args(synth, run, steps=3), f"backend.name={name}"], capsys)
    assert code == 2 and "was not loaded" in err and str(step / member) in err, err
    if member in EXPORT_READS:
        code, err = run_cli(["export", str(run), str(tmp_path / "out")], capsys)
        assert code == 2 and "was not loaded" in err, err
        assert not (tmp_path / "out").exists()
    assert not marker.exists()


@pytest.mark.parametrize("name", list(FILES))
def test_untouched_checkpoints_still_resume_and_export(name, trained_runs, synth, tmp_path, capsys):
    """The control for the test above: the same copies, unplanted, resume to step 3 and export."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_runs[name], run)
    code, err = run_cli([*base_args(synth, run, steps=3), f"backend.name={name}"], capsys)
    assert code == 0, err
    assert ckpt.RunDir(run).latest().name == "step_3"
    assert run_cli(["export", str(run), str(tmp_path / "out")], capsys)[0] == 0
    assert (tmp_path / "out" / "model.safetensors").exists()


ZERO = "backend.name=deepspeed"


@pytest.mark.parametrize(
    "backend",
    [
        ["backend.name=single"],
        ["backend.name=ddp"],
        ["backend.name=fsdp"],
        [ZERO, "backend.ds_config=ds_configs/zero2.json"],
        [ZERO, "backend.ds_config=ds_configs/zero3.json"],
        [ZERO, "backend.ds_config=ds_configs/zero3.json", "train.compile=true"],
    ],
    ids=["single", "ddp", "fsdp", "zero2", "zero3", "zero3_compile"],
)
def test_a_run_gives_back_the_signal_handlers_and_frees_its_model_before_returning(
    backend, synth, tmp_path, monkeypatch
):
    """`train` asks the trainer to stop on SIGTERM/SIGUSR1 for the run only. A handler left installed kept the
    trainer, the FSDP model and its process group alive into the interpreter's teardown, where a rank once
    aborted ("terminate called without an active exception"); the model's reference cycles are collected before
    the process group is destroyed, not whenever the collector next runs. ZeRO-3 also kept every model in two
    DeepSpeed globals after destroy(), which the backend's close() now clears: a second run in one process
    (a sweep, a notebook) held both models, and on a GPU their memory. With compile too (inductor, what
    train.compile uses; under dynamo's debugging "eager" backend ZeRO-3's model does stay alive, a case this test
    catches)."""
    from toolkit.model import VisionLanguageModel

    models = []
    real_init = VisionLanguageModel.__init__

    def recorded(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        models.append(weakref.ref(self))

    monkeypatch.setattr(VisionLanguageModel, "__init__", recorded)
    ours = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        assert cli.main([*base_args(synth, tmp_path / "run"), *backend]) == 0
        assert {sig: signal.getsignal(sig) for sig in ours} == dict.fromkeys(ours, signal.default_int_handler)
    finally:
        for sig, handler in ours.items():
            signal.signal(sig, handler)
    assert len(models) == 1 and models[0]() is None  # freed by the time main returned


def test_a_second_deepspeed_run_in_the_same_process_trains(synth, tmp_path):
    """DeepSpeed caches its own groups; destroying the process group through torch alone left them cached, and
    the next engine in the process (a sweep, a notebook) failed on a destroyed group ("... is not registered")."""
    for stage in (2, 3):
        run = tmp_path / f"zero{stage}"
        assert cli.main([*base_args(synth, run), ZERO, f"backend.ds_config=ds_configs/zero{stage}.json"]) == 0
        assert ckpt.RunDir(run).latest().name == "step_2"


def test_rank_state_of_the_previous_layout_still_loads(tmp_path):
    """Checkpoints written before the plain format kept numpy's RNG state as an array: they still resume."""
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"loader": {"cursor": 7}, "rng": old}, tmp_path / "rank_0.pt")
    want = (random.random(), float(np.random.rand()), float(torch.rand(())))
    state = ckpt.read_rank_state(tmp_path, 0)
    ckpt.set_rng_state(state["rng"])
    assert state["loader"] == {"cursor": 7}
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == want


def test_rng_state_is_plain_data(tmp_path):
    """What the toolkit writes loads with torch's restricted unpickler and nothing added to it."""
    np.random.seed(5)
    ckpt.write_rank_state(tmp_path, 0, {"cursor": 1})
    state = torch.load(tmp_path / "rank_0.pt", weights_only=True)
    want = float(np.random.rand())
    ckpt.set_rng_state(state["rng"])
    assert float(np.random.rand()) == want


# ---------------------------------------------------------------------------------------------- skips in validation


def textless_set(folder: Path, good: int, textless: int) -> None:
    """One shard: `good` trainable samples, then `textless` image-caption pairs without `texts`."""
    import shardgen

    folder.mkdir()
    captions = [
        shardgen.Spec(f"c{i:03d}", {"caption": "a picture"}, shardgen.good("x").images) for i in range(textless)
    ]
    shardgen.write_shard(
        folder / "shard-000000.tar", [shardgen.good(f"g{i:03d}", seed=i) for i in range(good)] + captions
    )


def strict_loads(line: str):
    """json.loads as jq and JavaScript read: the bare words NaN and Infinity are not JSON."""

    def refuse(word: str):
        raise ValueError(f"{word} is not strict JSON: {line}")

    return json.loads(line, parse_constant=refuse)


@pytest.mark.parametrize("good", [3, 0], ids=["some-survive", "none-survive"])
def test_validation_counts_skips_as_data_stats_does(good, synth, tmp_path, capsys):
    from toolkit.config import load_config
    from toolkit.data.loader import data_stats

    textless_set(tmp_path / "val", good, 60)
    run = tmp_path / "run"
    args = [*base_args(synth, run, steps=1), f"data.val_shards={tmp_path / 'val'}", "train.export_best=true"]
    assert run_cli(args, capsys)[0] == 0
    record = [strict_loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    overrides = [a for a in args[3:] if a.startswith(("model.", "data."))] + [f"data.train_shards={tmp_path / 'val'}"]
    stats = data_stats(load_config("tiny", overrides))
    assert record["val_samples"] == {"read": stats["samples_read"], "skipped": stats["skipped"]}
    assert record["val_samples"] == {"read": good + 60, "skipped": {"no_texts": 60}}
    if good:
        assert record["val_loss"] > 0 and (run / "export" / "best").is_dir()
    else:  # nothing to score: no loss of 0, no "best" export
        assert record["val_loss"] is None and not (run / "export" / "best").exists()  # strict JSON: null, not NaN
