"""Bad resumes, damaged checkpoints and runs that could never do what they ask end in one line (exit 2) that names
the file or field and what to do, and leave the run folder as it was: no config.yaml rewritten, no folder made.

One 2-step run per backend (single, and fsdp on one rank) is trained in this process; every case works on a copy.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from cli_runs import train_args, write_data

from toolkit import __main__ as cli
from toolkit.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("synth"))


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def runs(synth, tmp_path_factory) -> dict[str, Path]:
    """Checkpoints step_1 and step_2 of `single` and of `fsdp`, an export of the single run, and what the single
    run logged (it validates at its last step, with train.export_best=false)."""
    root = tmp_path_factory.mktemp("runs")
    out: dict[str, Path] = {}
    handler, root_logger = Lines(), logging.getLogger()
    level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.INFO)  # under pytest's own handlers the CLI's basicConfig sets no level
    try:
        for name in ("single", "fsdp"):
            assert cli.main(train_args(synth, root / name, f"backend.name={name}")) == 0
            out[name] = root / name
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(level)
    assert cli.main(["export", str(out["single"]), str(root / "export")]) == 0
    out["export"] = root / "export"
    out["log"] = root / "log.txt"
    out["log"].write_text("\n".join(handler.lines))
    return out


def copy_run(runs: dict[str, Path], name: str, tmp_path: Path) -> Path:
    run = tmp_path / name
    shutil.copytree(runs[name], run)
    return run


def refused(args: list[str], capsys, *, code: int = 2) -> str:
    """The command's exit code is `code` and its stderr ends in one line without a traceback; that line."""
    assert cli.main(args) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run folder that a refused resume must leave as it was (but .lock, which names the last
    process that claimed the folder)."""
    files = (p for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock")
    return {str(p.relative_to(run)): p.read_bytes() for p in files}


def test_resume_with_another_model_backend_or_frozen_group_is_refused_before_anything_is_written(
    runs, synth, tmp_path, capsys
):
    run = copy_run(runs, "single", tmp_path)
    before = snapshot(run)
    cases = {
        "model.lm_n_blocks=3": ["model.lm_n_blocks: checkpoint 2 vs now 3", "same model.* values"],
        "backend.name=fsdp": ["written by backend single", "resume with backend.name=single", "train.init_from"],
        "train.lr_mp=0": ["train.lr_mp", "frozen", "train.init_from"],
    }
    for override, says in cases.items():
        line = refused(train_args(synth, run, override, steps=3), capsys)
        assert line.startswith("config error:") and all(s in line for s in says), line
        assert snapshot(run) == before, override  # config.yaml, metrics.jsonl, checkpoints: byte for byte


def test_a_config_yaml_that_no_longer_fits_its_weights_is_refused_by_resume_and_export(runs, synth, tmp_path, capsys):
    """A run whose config.yaml an older version rewrote on a failed resume (3 blocks, weights of 2): resuming
    with that config, and exporting it, name the weights missing instead of pairing them with the wrong config."""
    run = copy_run(runs, "single", tmp_path)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("lm_n_blocks: 2", "lm_n_blocks: 3"))
    before = snapshot(run)
    line = refused(train_args(synth, run, "model.lm_n_blocks=3", steps=3), capsys)
    assert "state.pt does not hold this run's model" in line and "decoder.blocks.2" in line, line
    line = refused(["export", str(run), str(tmp_path / "out")], capsys)
    assert "do not fit" in line and str(config) in line and "decoder.blocks.2" in line, line
    assert not (tmp_path / "out").exists() and snapshot(run) == before


SINGLE_DAMAGE = {  # file under checkpoints/step_2, what is done to it, what the message says
    "model/state.pt": ("cut", "cut short"),
    "rank_0.pt": ("cut", "cannot be read"),
    "trainer.json": ('{"backend": "single"', "Expecting"),
}


def damage(file: Path, how: str) -> None:
    if how == "cut":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 3])
    elif how == "rm":
        file.unlink()
    else:
        file.write_text(how)


def test_a_damaged_file_in_the_latest_checkpoint_names_it_and_the_kept_one_to_resume(runs, synth, tmp_path, capsys):
    for member, (how, says) in [*SINGLE_DAMAGE.items(), ("rank_0.pt", ("rm", "file is missing"))]:
        run = tmp_path / f"{member.replace('/', '_')}_{how[:3]}"
        shutil.copytree(runs["single"], run)
        damage(run / "checkpoints" / "step_2" / member, how)
        before = snapshot(run)
        line = refused(train_args(synth, run, steps=3), capsys)
        assert str(run / "checkpoints" / "step_2" / member) in line and says in line, line
        assert f"train.resume={run / 'checkpoints' / 'step_1'}" in line and "kept: step_1" in line, line
        assert snapshot(run) == before, member
    # The advice works: resuming from the kept checkpoint trains on, and `latest` moves past the damaged one.
    assert cli.main(train_args(synth, run, f"train.resume={run / 'checkpoints' / 'step_1'}", steps=3)) == 0
    assert ckpt.RunDir(run).latest().name == "step_3"


FSDP_DAMAGE = {
    "model/__0_0.distcp": ("cut", "cut short"),
    "model/.metadata": ("rm", "file is missing"),
}


@pytest.mark.parametrize("member", list(FSDP_DAMAGE))
def test_a_damaged_fsdp_shard_is_named_by_resume_and_export(member, runs, synth, tmp_path, capsys):
    run = copy_run(runs, "fsdp", tmp_path)
    how, says = FSDP_DAMAGE[member]
    damage(run / "checkpoints" / "step_2" / member, how)
    line = refused(["export", str(run), str(tmp_path / "out")], capsys)
    assert str(run / "checkpoints" / "step_2" / member) in line and says in line, line
    assert f"toolkit export {run / 'checkpoints' / 'step_1'} OUT" in line and not (tmp_path / "out").exists()
    if member.endswith(".distcp"):  # the same check on the resume path (a process group of one rank)
        before = snapshot(run)
        line = refused(train_args(synth, run, "backend.name=fsdp", steps=3), capsys)
        assert str(run / "checkpoints" / "step_2" / member) in line and "train.resume=" in line, line
        assert snapshot(run) == before


def test_a_bad_latest_pointer_and_bad_train_resume_values_list_what_to_give(runs, synth, tmp_path, capsys):
    run = copy_run(runs, "single", tmp_path)
    (run / "checkpoints" / "latest").write_text("step_9\n")
    line = refused(train_args(synth, run, steps=3), capsys)
    assert "names 'step_9'" in line and f"train.resume={run / 'checkpoints' / 'step_2'}" in line, line
    fresh = tmp_path / "fresh"
    for value, says in {
        "latest": "no such file or folder",
        str(tmp_path / "nowhere"): "no such file or folder",
        str(synth): "neither a run folder with checkpoints nor a checkpoint folder",
    }.items():
        line = refused(train_args(synth, fresh, f"train.resume={value}"), capsys)
        assert line.startswith(f"config error: train.resume={value}") and says in line, line
        assert "auto" in line and "none" in line and "checkpoints/step_N" in line, line
    line = refused(train_args(synth, fresh, f"train.resume={runs['export']}"), capsys)  # weights only: init_from
    assert f"train.init_from={runs['export']}" in line and "nanoVLM-format" in line, line
    assert not fresh.exists()


def test_runs_that_could_not_do_what_they_ask_leave_no_run_folder(runs, synth, tmp_path, capsys, monkeypatch):
    import importlib.util

    from toolkit.train import lmms_watch

    cut = tmp_path / "cut_export"
    shutil.copytree(runs["export"], cut)
    damage(cut / "model.safetensors", "cut")
    fresh = tmp_path / "fresh"
    line = refused(train_args(synth, fresh, f"train.init_from={cut}"), capsys)
    assert str(cut / "model.safetensors") in line and "cut short" in line, line
    line = refused(train_args(synth, fresh, "train.lmms_tasks=mme"), capsys)
    assert "train.lmms_interval" in line, line
    if importlib.util.find_spec("lmms_eval") is not None:  # otherwise "lmms-eval is not installed" comes first
        monkeypatch.setattr(lmms_watch.shutil, "which", lambda name: None)
        line = refused(train_args(synth, fresh, "train.lmms_tasks=mme", "train.lmms_interval=1",
                                  "train.lmms_launcher=slurm"), capsys)  # fmt: skip
        assert "sbatch" in line, line
    assert not fresh.exists()


def test_best_validation_loss_mentions_an_export_only_when_there_is_one(runs):
    lines = runs["log"].read_text().splitlines()
    best = [line for line in lines if line.startswith("best validation loss")]
    assert len(best) == 2 and not any("exported" in line for line in best), best
    assert not (runs["single"] / "export").exists()


DEEPSPEED_DAMAGE = {
    "model/deepspeed/mp_rank_00_model_states.pt": ("cut", "cut short"),
    "model/deepspeed/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt": ("rm", "file is missing"),
}


@pytest.fixture(scope="module")
def zero2_run(synth, tmp_path_factory) -> Path:
    """A 2-step ZeRO-2 run (bf16: DeepSpeed's bf16_ optimizer shards) on one rank, in this process."""
    run = tmp_path_factory.mktemp("zero2") / "run"
    args = train_args(synth, run, "backend.name=deepspeed", "backend.ds_config=ds_configs/zero2.json")
    assert cli.main([*args, "backend.precision=bf16"]) == 0
    return run


@pytest.mark.parametrize("member", list(DEEPSPEED_DAMAGE))
def test_a_damaged_deepspeed_file_is_named_by_resume_and_export(member, zero2_run, synth, tmp_path, capsys):
    """DeepSpeed's own load fails on these with torch's message or a bare AssertionError, naming no file."""
    run = tmp_path / "run"
    shutil.copytree(zero2_run, run)
    file = run / "checkpoints" / "step_2" / member
    assert file.is_file(), sorted(p.name for p in file.parent.iterdir())  # DeepSpeed's names are what we expect
    damage(file, DEEPSPEED_DAMAGE[member][0])
    says = DEEPSPEED_DAMAGE[member][1]
    line = refused(["export", str(run), str(tmp_path / "out")], capsys)
    assert str(file) in line and says in line and not (tmp_path / "out").exists(), line
    before = snapshot(run)
    args = train_args(synth, run, "backend.name=deepspeed", "backend.ds_config=ds_configs/zero2.json", steps=3)
    line = refused([*args, "backend.precision=bf16"], capsys)
    assert str(file) in line and f"train.resume={run / 'checkpoints' / 'step_1'}" in line, line
    assert snapshot(run) == before


def test_a_resume_under_another_zero_partitioning_is_refused_in_one_line(zero2_run, synth, tmp_path, capsys):
    """ZeRO-2 <-> ZeRO-3 died in DeepSpeed's check_ckpt_list with a bare AssertionError on every rank."""
    run = tmp_path / "run"
    shutil.copytree(zero2_run, run)
    before = snapshot(run)
    args = train_args(synth, run, "backend.name=deepspeed", "backend.ds_config=ds_configs/zero3.json", steps=3)
    line = refused([*args, "backend.precision=bf16"], capsys)
    assert "written under ZeRO-2" in line and "is ZeRO-3" in line and "train.init_from" in line, line
    assert snapshot(run) == before


def test_a_resume_under_another_data_seed_is_refused_unless_the_stream_starts_afresh(runs, synth, tmp_path, capsys):
    """data.seed shuffles the order the saved stream position counts in; a changed one was taken silently."""
    run = copy_run(runs, "single", tmp_path)
    before = snapshot(run)
    line = refused(train_args(synth, run, "data.seed=5", steps=3), capsys)
    assert "data.seed=5" in line and "train.resume_data=false" in line, line
    assert snapshot(run) == before
    assert cli.main(train_args(synth, run, "data.seed=5", "train.resume_data=false", steps=3)) == 0
    assert ckpt.RunDir(run).latest().name == "step_3"


def _architecture(model: dict) -> dict:
    from toolkit.train.preflight import ARCHITECTURE_FIELDS

    return {f: model[f] for f in (*ARCHITECTURE_FIELDS, "vit_model_type", "lm_model_type")}


def test_init_from_sets_the_architecture_a_config_file_gave_and_logs_each_change(runs, synth, tmp_path, caplog):
    """A preset's or config file's shape fields yield to the folder's config.json (they were refused, with the
    overrides to paste); the run trains, its config.yaml holds the folder's architecture, the log names each change."""
    import json

    import yaml

    preset = yaml.safe_load((Path(cli.__file__).parent / "configs" / "tiny.yaml").read_text())
    preset["model"].update(lm_hidden_dim=32, vit_inter_dim=96, lm_model_type="preset-lm")
    config = tmp_path / "other-shape.yaml"
    config.write_text(yaml.safe_dump(preset))
    args = train_args(synth, tmp_path / "run", f"train.init_from={runs['export']}", steps=1)
    args[args.index("tiny")] = str(config)
    with caplog.at_level(logging.INFO):
        assert cli.main(args) == 0
    folder = json.loads((runs["export"] / "config.json").read_text())
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]
    assert _architecture(saved) == _architecture(folder)
    line = next(r.getMessage() for r in caplog.records if "sets the architecture" in r.getMessage())
    changed = sorted(part.split("=")[0] for part in line.split(": ", 1)[1].split(", "))
    assert changed == ["model.lm_hidden_dim", "model.lm_model_type", "model.vit_inter_dim"], line


def test_init_from_refuses_a_command_line_shape_that_differs_and_names_it(runs, synth, tmp_path, capsys):
    """A shape set on the command line is the user's word, not a default: refused, naming the override to drop;
    the same value as the folder's is accepted."""
    same = "model.vit_inter_dim=128"  # the folder's own value
    args = train_args(synth, tmp_path / "run", f"train.init_from={runs['export']}", "model.lm_hidden_dim=32", same)
    line = refused(args, capsys)
    assert line.endswith("drop model.lm_hidden_dim=32 from the command line"), line
    assert not (tmp_path / "run").exists()
    assert cli.main([a for a in args if a != "model.lm_hidden_dim=32"]) == 0


def test_init_from_nanovlms_own_checkpoint_under_the_tiny_preset_needs_no_shape_overrides(synth, tmp_path, caplog):
    """nanoVLM's tiny checkpoint differs from the tiny preset in four widths: it trains under the preset as it is,
    with the checkpoint's architecture in config.yaml. Its own tokenizer maps 125 of its 384 ids differently from
    the run's: that is warned about (it trained on re-mapped ids without a word), and not with its own."""
    import json

    import yaml
    from conftest import REFERENCE, REFERENCE_HINT

    folder = REFERENCE / "checkpoint"
    if not (folder / "model.safetensors").exists():
        pytest.skip(f"nanoVLM reference fixture not found at {REFERENCE}: {REFERENCE_HINT}")
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        assert cli.main(train_args(synth, run, f"train.init_from={folder}", steps=1)) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert _architecture(saved) == _architecture(json.loads((folder / "config.json").read_text()))
    warned = [r.getMessage() for r in caplog.records if "whose ids differ" in r.getMessage()]
    assert len(warned) == 1 and str((REFERENCE / "tokenizer").resolve()) in warned[0], warned
    caplog.clear()
    own = f"model.tokenizer={REFERENCE / 'tokenizer'}"
    with caplog.at_level(logging.WARNING):
        assert cli.main(train_args(synth, tmp_path / "own", f"train.init_from={folder}", own, steps=1)) == 0
    assert not [r for r in caplog.records if "whose ids differ" in r.getMessage()]


def test_a_kernel_this_device_cannot_train_with_is_refused_before_the_run_folder(synth, tmp_path, capsys):
    """attention_kernel=flex on a CPU failed at the first backward, after the run folder was written, and
    `train --check` passed it."""
    run = tmp_path / "run"
    args = train_args(synth, run, "train.attention_kernel=flex", steps=1)
    assert "CUDA only" in refused(args, capsys) and not run.exists()
    assert "CUDA only" in refused(["train", "--check", "--world", "2", *args[1:], "backend.name=ddp"], capsys)


def test_a_stage_started_from_a_folder_keeps_its_tower_names(runs, synth, tmp_path):
    """vit_model_type and lm_model_type (descriptive) came from the run's preset, not from the folder whose
    weights the run continues: an export of a stage started from nanoVLM's checkpoint named the preset's towers."""
    import json

    import yaml

    start = tmp_path / "start"
    shutil.copytree(runs["export"], start)
    config = json.loads((start / "config.json").read_text())
    config.update(vit_model_type="acme/vision-tower", lm_model_type="acme/decoder")
    (start / "config.json").write_text(json.dumps(config))
    run = tmp_path / "run"
    assert cli.main(train_args(synth, run, f"train.init_from={start}", "train.export_interval=1", steps=1)) == 0
    exported = json.loads((run / "export" / "step_1" / "config.json").read_text())
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    for names in (exported, saved):
        assert (names["vit_model_type"], names["lm_model_type"]) == ("acme/vision-tower", "acme/decoder")


def test_a_metrics_line_cut_short_does_not_block_the_resume(runs, synth, tmp_path, caplog):
    """A full disk or a node's crash can cut metrics.jsonl's last line; every resume then failed with a
    JSONDecodeError on rank 0 (and a torchrun restart repeated it). The line is dropped with a warning, the run
    resumes, and each step is logged once."""
    import json

    run = copy_run(runs, "single", tmp_path)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        assert cli.main(train_args(synth, run, steps=3)) == 0
    assert any("dropped 1 line(s)" in r.getMessage() for r in caplog.records)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3]


@pytest.mark.multiproc
def test_a_single_gpu_run_continues_under_ddp_and_back(runs, synth, tmp_path):
    """`single` and `ddp` write the same files, yet a single-GPU run moved to torchrun was refused ("written by
    backend single") and pointed at init_from, which drops the optimizer, schedule and data position. Continued
    under DDP on one rank it trains the very steps `single` trains (bit for bit); on two ranks it trains, and its
    checkpoint continues under `single` again."""
    import json
    import subprocess

    from conftest import CPU_ENV, REPO, torchrun

    def ddp(run: Path, nproc: int, steps: int) -> None:
        args = train_args(synth, run, "backend.name=ddp", steps=steps)
        done = subprocess.run(torchrun(nproc, "-m", "toolkit", *args), env={**os.environ, **CPU_ENV}, cwd=REPO,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]

    def losses(run: Path) -> dict[int, float]:
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {m["step"]: m["loss"] for m in lines if "loss" in m}

    alone, one, two = (copy_run(runs, "single", tmp_path / name) for name in ("alone", "one", "two"))
    assert cli.main(train_args(synth, alone, steps=4)) == 0
    ddp(one, 1, 4)
    assert losses(one) == losses(alone) and len(losses(alone)) == 4
    ddp(two, 2, 3)
    assert ckpt.RunDir(two).latest().name == "step_3"
    assert cli.main(train_args(synth, two, steps=4)) == 0 and sorted(losses(two)) == [1, 2, 3, 4]


def test_a_resume_that_changes_the_global_batch_says_so(runs, synth, tmp_path, caplog):
    """Resumed on fewer ranks (here: fewer micro-steps) without train.global_batch_size, the rows per optimizer
    step changed under the same learning rates without a word. A warning names both and the setting that keeps it;
    the same batch resumes without one."""
    run = copy_run(runs, "single", tmp_path)
    with caplog.at_level(logging.WARNING):
        assert cli.main(train_args(synth, run, "train.gradient_accumulation_steps=2", steps=3)) == 0
    said = [r.getMessage() for r in caplog.records if "rows per optimizer step" in r.getMessage()]
    assert len(said) == 1 and "with 4 rows" in said[0] and "train.global_batch_size=2" in said[0], said
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert cli.main(train_args(synth, run, "train.gradient_accumulation_steps=2", steps=4)) == 0
    assert not [r for r in caplog.records if "rows per optimizer step" in r.getMessage()]
