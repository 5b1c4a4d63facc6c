"""`export` replaces OUT whole: it must never take a folder that is not an earlier export."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cli_runs import train, train_args, write_data

from toolkit import __main__ as cli


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export_out")
    assert train(train_args(write_data(root / "synth"), root / "run", "backend.name=single")) == 0
    return root / "run"


def test_export_refuses_an_out_that_is_not_an_earlier_export(run, tmp_path, capsys) -> None:
    """Measured before: each of these exited 0 and deleted what was there (the run's checkpoints, notes, a step)."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    (tmp_path / "file.txt").write_text("keep me too")
    for out in [notes, run, run / "checkpoints" / "step_2", tmp_path / "file.txt"]:
        assert cli.main(["export", str(run), str(out)]) == 2, out
        assert "Traceback" not in capsys.readouterr().err
    assert (notes / "todo.txt").read_text() == "keep me" and (tmp_path / "file.txt").read_text() == "keep me too"
    assert (run / "checkpoints" / "step_2" / "trainer.json").is_file() and (run / "metrics.jsonl").is_file()
    for fmt in ("nanovlm", "hf"):  # an earlier export of either format is replaced, as before
        out = tmp_path / fmt
        for _ in range(2):
            assert cli.main(["export", str(run), str(out), "--format", fmt]) == 0
        assert (out / "config.json").is_file()


def test_a_transformers_export_is_not_read_as_a_nanovlm_folder(run, tmp_path, capsys) -> None:
    """It has config.json and model.safetensors too: export wrote a default-shaped config beside its weights."""
    assert cli.main(["export", str(run), str(tmp_path / "hf"), "--format", "hf"]) == 0
    capsys.readouterr()
    assert cli.main(["export", str(tmp_path / "hf"), str(tmp_path / "again")]) == 2
    assert "is a transformers export" in capsys.readouterr().err and not (tmp_path / "again").exists()
    image = tmp_path / "red.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 0, 0)).save(image)
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "hf"), "--image", str(image), "--prompt", "hi"]) == 2
    assert "is a transformers export" in capsys.readouterr().err


def test_an_export_from_another_folder_keeps_the_runs_relative_tokenizer(tmp_path, monkeypatch) -> None:
    """model.tokenizer relative to where training ran: exported from elsewhere, the tokenizer was dropped silently
    (and generate then asked for a setting it does not take)."""
    monkeypatch.chdir(tmp_path)
    write_data(tmp_path / "synth")
    args = train_args(Path("synth"), Path("runs") / "rel", "backend.name=single", steps=1)
    assert train(args) == 0
    monkeypatch.chdir(tmp_path / "synth")  # anywhere else
    assert cli.main(["export", str(tmp_path / "runs" / "rel"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tokenizer").is_dir()
    # From a folder that holds another tokenizer at the run's relative path: the run's own, not that one.
    other = tmp_path / "elsewhere"
    (other / "synth").mkdir(parents=True)
    shutil.copytree(tmp_path / "synth" / "tokenizer", other / "synth" / "tokenizer")
    (other / "synth" / "tokenizer" / "marker.txt").write_text("not the run's")
    monkeypatch.chdir(other)
    assert cli.main(["export", str(tmp_path / "runs" / "rel"), str(tmp_path / "out2")]) == 0
    assert not (tmp_path / "out2" / "tokenizer" / "marker.txt").exists()


def test_generate_takes_every_image_and_a_bounded_token_count(run, tmp_path, capsys, monkeypatch) -> None:
    from PIL import Image

    from toolkit import evaluate

    out = tmp_path / "export"
    assert cli.main(["export", str(run), str(out)]) == 0
    paths = []
    for i, colour in enumerate([(200, 0, 0), (0, 0, 200)]):
        paths += ["--image", str(tmp_path / f"{i}.png")]
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{i}.png")
    seen, prompts, asked = [], [], []
    real_inputs = evaluate.prompt_inputs

    def inputs(model, tok, images, question):
        seen.append(len(images))
        prompts.append(real_inputs(model, tok, images, question)[0])
        return prompts[-1], None

    monkeypatch.setattr(evaluate, "prompt_inputs", inputs)
    monkeypatch.setattr(evaluate, "answer_from", lambda *a, max_new_tokens, **k: asked.append(max_new_tokens) or "ok")
    base = ["generate", "--checkpoint", str(out), *paths, "--prompt", "hi"]
    assert cli.main(base) == 0 and seen == [2]  # a repeated --image was silently the last one only
    capsys.readouterr()
    for tokens in ("0", "100000"):  # 0 crashed inside generate; 100000 decoded for hours past the context
        assert cli.main([*base, "--max-new-tokens", tokens]) == 2
        assert "--max-new-tokens" in capsys.readouterr().err
    # The prompt and its answer within the context: a longer prompt was decoded past every trained length.
    context = evaluate.load_for_inference(out)[0].cfg.lm_max_length
    assert cli.main([*base, "--max-new-tokens", str(context)]) == 0
    assert asked[-1] == context - len(prompts[-1]) < context  # capped, with a warning
    assert cli.main([*base[:-1], "hi " * context]) == 2
    assert f"the prompt is {len(prompts[-1])} tokens (2 images' tokens included)" in capsys.readouterr().err


def test_eval_on_shards_with_nothing_to_score_and_on_a_missing_device_says_so(run, tmp_path, capsys) -> None:
    """A pass that read no sample printed `validation loss: 0.0000` and exited 0; --device gpu was a torch error."""
    import shardgen

    out = tmp_path / "export"
    assert cli.main(["export", str(run), str(out)]) == 0
    images_only = tmp_path / "images_only"
    images_only.mkdir()
    shardgen.write_shard(images_only / "shard-000000.tar", [shardgen.Spec("k0", None, shardgen.good("k0").images)])
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(out), "--shards", str(images_only)]) == 2
    assert "no held-out sample with an answer" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(out), "--shards", str(images_only), "--device", "gpu"]) == 2
    assert "--device gpu" in capsys.readouterr().err


def test_generate_on_a_training_checkpoint_says_to_export_it(run, tmp_path, capsys) -> None:
    (tmp_path / "x.png").write_bytes(b"")
    step = run / "checkpoints" / "step_2"
    assert cli.main(["generate", "--checkpoint", str(step), "--image", str(tmp_path / "x.png"), "--prompt", "hi"]) == 2
    assert f"{step} holds a training checkpoint" in capsys.readouterr().err  # it said: no nanoVLM checkpoint


def test_export_takes_only_a_tokenizer_folder_that_fits_the_model(run, tmp_path, capsys) -> None:
    """--tokenizer was copied into OUT whatever it held (a notes folder, a file's path), with exit 0."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("not a tokenizer")
    for given, said in [(notes, "holds no tokenizer"), (notes / "todo.txt", "is not a folder")]:
        out = tmp_path / f"out_{given.name}"
        assert cli.main(["export", str(run), str(out), "--tokenizer", str(given)]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err and not out.exists()
    synth_tokenizer = run.parent / "synth" / "tokenizer"  # the one the run trained with: taken
    assert cli.main(["export", str(run), str(tmp_path / "good"), "--tokenizer", str(synth_tokenizer)]) == 0
    assert (tmp_path / "good" / "tokenizer" / "tokenizer.json").is_file()


def test_an_export_of_a_read_only_tokenizer_can_be_replaced_and_others_can_read_it(run, tmp_path) -> None:
    """The tokenizer copy kept a read-only source's modes (a shared /models folder, the nanoVLM fixture), so a
    user other than root could not replace the export: training's export/best failed at its second update, on
    every resume. safetensors wrote the weights 0600. A stale OUT.old (an interrupted swap) failed the swap."""
    import os
    import shutil
    import stat

    tokenizer = tmp_path / "shared_tokenizer"
    shutil.copytree(run.parent / "synth" / "tokenizer", tokenizer)
    for path in [*tokenizer.iterdir(), tokenizer]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    out = tmp_path / "export"
    out.with_name("export.old").mkdir()
    (out.with_name("export.old") / "config.json").write_text("{}")
    umask = os.umask(0o022)
    try:
        for _ in range(2):
            assert cli.main(["export", str(run), str(out), "--tokenizer", str(tokenizer)]) == 0
    finally:
        os.umask(umask)
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes["model.safetensors"] == modes["tokenizer/tokenizer.json"] == 0o644, modes
    assert modes["tokenizer"] == modes["."] == 0o755, modes
    assert not out.with_name("export.old").exists() and not out.with_name("export.tmp").exists()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_zero0_run_exports_offline_what_it_exported_live(precision, tmp_path) -> None:
    """ZeRO-0 writes no ZeRO shards: offline export crashed in DeepSpeed's zero_to_fp32 (NoneType not iterable).
    Under bf16 both exports are the fp32 masters (the live one was the bf16 working copy, rounded)."""
    import torch
    from safetensors.torch import load_file

    run = tmp_path / "run"
    args = train_args(write_data(tmp_path / "synth"), run, "backend.name=deepspeed",
                      "backend.ds_config=ds_configs/zero0.json", "train.export_interval=2")  # fmt: skip
    assert train([*args, f"backend.precision={precision}"]) == 0
    assert cli.main(["export", str(run), str(tmp_path / "offline")]) == 0
    live = load_file(str(run / "export" / "step_2" / "model.safetensors"))
    offline = load_file(str(tmp_path / "offline" / "model.safetensors"))
    assert live.keys() == offline.keys() and all(torch.equal(live[k], offline[k]) for k in live)
    proj = live["MP.proj.weight"]
    assert proj.dtype == torch.float32 and not torch.equal(proj.bfloat16().float(), proj)  # masters, not bf16


def test_a_run_folder_as_checkpoint_finds_the_readmes_export_final(run, tmp_path) -> None:
    """README exports to RUN/export/final and then generates from it; `--checkpoint RUN` said the run had "no
    exports" (only best and step_N were looked for). Best comes first, else the newest export of any name."""
    import os
    import shutil

    from toolkit.evaluate import nanovlm_folder

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export"))
    assert cli.main(["export", str(copy), str(copy / "export" / "final")]) == 0
    assert nanovlm_folder(copy) == copy / "export" / "final"
    assert cli.main(["export", str(copy), str(copy / "export" / "step_2")]) == 0
    os.utime(copy / "export" / "final" / "config.json", (2e9, 2e9))  # written later than step_2
    assert nanovlm_folder(copy) == copy / "export" / "final"
    shutil.copytree(copy / "export" / "step_2", copy / "export" / "best")
    assert nanovlm_folder(copy) == copy / "export" / "best"


def test_a_resume_to_an_earlier_step_sets_aside_the_left_branchs_best_export(tmp_path, caplog) -> None:
    """export/best kept step 3's model after a resume from step 1, and the run then logged 'best validation loss
    ... at step 1, exported to export/best' over it. Each best export records its step; a resume to an earlier
    step moves it out of export/ (kept), and the end-of-run line says where the best step's model is."""
    import json
    import logging
    import shutil

    from toolkit.train import best_export
    from toolkit.train.checkpoint import RunDir

    run = tmp_path / "run"
    args = train_args(write_data(tmp_path / "synth"), run, "train.eval_interval=1", "train.export_best=true",
                      "train.keep_checkpoints=5", steps=3)  # fmt: skip
    assert train(args) == 0
    vals = {m["step"]: m["val_loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    best_step = min(vals, key=vals.get)
    assert best_step > 1  # the tiny run's validation loss falls
    assert best_export.read_note(run / "export" / "best") == {"step": best_step, "val_loss": vals[best_step]}
    with caplog.at_level(logging.WARNING):
        assert train([*args, f"train.resume={run}/checkpoints/step_1", "train.stop_at_step=1"]) == 0
    aside = run / best_export.LEFT / f"best_step_{best_step}"
    assert not (run / "export" / "best").exists() and best_export.read_note(aside)["step"] == best_step
    assert f"export/best held step {best_step}'s model" in caplog.text and str(aside) in caplog.text
    line = best_export.where_best_is(RunDir(run), 1)
    assert "its export was replaced" in line and str(run / "checkpoints" / "step_1") in line
    # Training on from step 1 (an exact resume) recomputes the same best step with the same loss: export/best is
    # that model again, and the copy set aside, the same model, goes (one copy per crash piled up).
    assert train([*args, f"train.resume={run}/checkpoints/step_1"]) == 0
    assert best_export.read_note(run / "export" / "best") == {"step": best_step, "val_loss": vals[best_step]}
    assert not (run / best_export.LEFT).exists()
    assert best_export.where_best_is(RunDir(run), best_step) == f", exported to {run / 'export' / 'best'}"
    # Another loss at that step is another model: kept.
    shutil.copytree(run / "export" / "best", aside)
    (aside / best_export.NOTE).write_text(json.dumps(best_export.note(best_step, vals[best_step] + 0.5)))
    best_export.drop_recomputed(RunDir(run), best_step, vals[best_step])
    assert aside.is_dir()


def test_a_source_whose_tokenizer_is_not_here_is_refused_unless_one_is_given(reference_dir, tmp_path, capsys) -> None:
    """nanoVLM's checkpoint copied without the tokenizer beside it: the export exited 0 with a config naming
    'tokenizer', a folder that is not there, and generate then failed on it. A Hub id is kept as it is."""
    from toolkit.export.run import check_named_tokenizer

    shutil.copytree(reference_dir / "checkpoint", tmp_path / "alone")
    assert cli.main(["export", str(tmp_path / "alone"), str(tmp_path / "out")]) == 2
    assert "tokenizer 'tokenizer' is not a folder here" in capsys.readouterr().err and not (tmp_path / "out").exists()
    given = ["--tokenizer", str(reference_dir / "tokenizer")]
    assert cli.main(["export", str(tmp_path / "alone"), str(tmp_path / "out"), *given]) == 0
    assert (tmp_path / "out" / "tokenizer").is_dir()
    check_named_tokenizer("HuggingFaceTB/SmolLM2-360M-Instruct")  # fetched where the export is loaded


def test_an_out_it_cannot_write_is_one_line(run, tmp_path, capsys, monkeypatch) -> None:
    """Under a file, or a place it may not write: a 10-frame traceback (NotADirectoryError, PermissionError)."""
    from toolkit.model import hub

    (tmp_path / "img.png").write_bytes(b"x")
    assert cli.main(["export", str(run), str(tmp_path / "img.png" / "out")]) == 2
    err = capsys.readouterr().err
    assert "lies under" in err and "is a file" in err and "Traceback" not in err

    def refused(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro" / "out.tmp"))

    monkeypatch.setattr(hub, "write_nanovlm", refused)
    assert cli.main(["export", str(run), str(tmp_path / "ro" / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the export to" in err and "Permission denied" in err and "Traceback" not in err


def test_a_linked_step_folder_exports_with_its_own_run_and_a_tying_change_is_named(run, tmp_path, capsys) -> None:
    """A step folder linked from elsewhere took the link's parent for its run ('config.yaml not found'; inside
    another run, that run's config silently). A config.yaml whose lm_tie_weights was changed ended in safetensors'
    'shared tensors' traceback instead of the weights-do-not-fit message."""
    import json
    import os

    (tmp_path / "links").mkdir()
    os.symlink(run / "checkpoints" / "step_2", tmp_path / "links" / "step_2")
    assert cli.main(["export", str(tmp_path / "links" / "step_2"), str(tmp_path / "out")]) == 0
    assert cli.main(["export", str(run / "checkpoints" / "step_2"), str(tmp_path / "direct")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == json.loads((tmp_path / "direct" / "config.json").read_text())
    capsys.readouterr()
    untied = tmp_path / "untied"
    shutil.copytree(run, untied)
    text = (untied / "config.yaml").read_text()
    assert "lm_tie_weights: true" in text
    (untied / "config.yaml").write_text(text.replace("lm_tie_weights: true", "lm_tie_weights: false"))
    assert cli.main(["export", str(untied), str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "do not fit" in err and "one tensor in the checkpoint, two here" in err and "Traceback" not in err


def test_an_incomplete_step_folder_is_named_as_one(run, tmp_path, capsys) -> None:
    """A step folder whose save never finished (no trainer.json) was 'neither a run folder ... nor a checkpoint
    folder (step_N)', though it is named step_N; the resume path calls it an incomplete checkpoint."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "step_2" / "trainer.json").unlink()
    assert cli.main(["export", str(copy / "checkpoints" / "step_2"), str(tmp_path / "out")]) == 2
    assert "is an incomplete checkpoint (its save never finished" in capsys.readouterr().err


def test_a_tokenizer_named_by_its_hub_id_is_taken_from_the_local_cache(run, tmp_path, capsys, monkeypatch) -> None:
    """--tokenizer took a folder only: a checkpoint naming a Hub tokenizer that training had cached needed its
    snapshot folder dug out by hand for --format hf. A Hub id not in the cache is still refused."""
    import json

    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someorg--tok" / "snapshots" / "0123abcd"
    shutil.copytree(run.parent / "synth" / "tokenizer", snapshot)
    (cache / "models--someorg--tok" / "refs").mkdir()
    (cache / "models--someorg--tok" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "hf"
    assert cli.main(["export", str(run), str(out), "--format", "hf", "--tokenizer", "someorg/tok"]) == 0
    vocab = [json.loads((d / "tokenizer.json").read_text())["model"]["vocab"] for d in (out, snapshot)]
    assert vocab[0] == vocab[1]  # the cached tokenizer's (the export adds nanoVLM's extra tokens beside it)
    capsys.readouterr()
    assert cli.main(["export", str(run), str(tmp_path / "no"), "--format", "hf", "--tokenizer", "someorg/none"]) == 2
    assert "nor a Hub id in the local Hugging Face cache" in capsys.readouterr().err
