"""Config: presets load, overrides parse, and every bad value fails early with one message naming the field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from toolkit.config import ConfigError, load_config


@pytest.mark.parametrize("preset", ["tiny", "nanovlm-222m", "nanovlm-450m"])
def test_presets_load_and_validate(preset):
    cfg = load_config(preset)
    m = cfg.model
    assert m.mp_image_token_length == (m.vit_img_size // m.vit_patch_size // m.mp_pixel_shuffle_factor) ** 2


def test_450m_preset_has_nanovlm_published_shapes():
    m = load_config("nanovlm-450m").model
    assert (m.vit_hidden_dim, m.vit_n_blocks, m.vit_patch_size, m.vit_img_size) == (768, 12, 16, 512)
    assert (m.lm_hidden_dim, m.lm_inter_dim, m.lm_n_heads, m.lm_n_kv_heads, m.lm_n_blocks) == (960, 2560, 15, 5, 32)
    assert (m.mp_pixel_shuffle_factor, m.mp_image_token_length, m.lm_vocab_size) == (4, 64, 49218)


def test_overrides_are_typed():
    cfg = load_config("tiny", ["train.lr_mp=1e-3", "train.compile=true", "data.num_workers=0", "backend.name=fsdp"])
    assert cfg.train.lr_mp == 1e-3 and cfg.train.compile is True
    assert cfg.data.num_workers == 0 and cfg.backend.name == "fsdp"
    mix = load_config("tiny", ["data.train_shards=[{pattern: 'a/{0..3}.tar', weight: 2}, {pattern: b}]"])
    assert mix.data.train_shards[0] == {"pattern": "a/{0..3}.tar", "weight": 2}


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["model.lm_n_headz=4"], r"unknown field 'model\.lm_n_headz'.*Did you mean 'lm_n_heads'"),
        (["modle.lm_n_heads=4"], r"unknown config section 'modle'"),
        (["model.lm_n_heads=5"], r"model\.lm_n_heads must divide model\.lm_hidden_dim"),
        (["model.lm_n_kv_heads=3"], r"model\.lm_n_kv_heads must divide model\.lm_n_heads"),
        (["backend.name=horovod"], r"backend\.name='horovod' is not allowed; choose one of single, ddp, deepspeed"),
        (["train.activation_checkpointing=some"], r"train\.activation_checkpointing='some'.*none, vision, language"),
        (["train.batch_size=two"], r"train\.batch_size='two' must be of type int"),
        (["train.batch_size=0"], r"train\.batch_size must be positive"),
        (["model.mp_image_token_length=5"], r"model\.mp_image_token_length must be .* = 4"),
        (["train.lr_mp"], r"must look like section\.field=value"),
    ],
)
def test_bad_config_names_the_field(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("tiny", overrides)


def test_unknown_field_in_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown field 'train\.learning_rate'"):
        load_config(str(bad))


def test_cli_help_lists_every_subcommand_and_config_errors_exit_cleanly():
    help_text = subprocess.run(
        [sys.executable, "-m", "toolkit", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("train", "shard-data", "synth", "data-stats", "eval", "generate", "export", "bench", "report"):
        assert f"    {name}" in help_text
    assert "train.lr_mp" in help_text
    bad = subprocess.run(
        [sys.executable, "-m", "toolkit", "data-stats", "--config", "tiny", "model.lm_n_heads=5"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "model.lm_n_heads must divide model.lm_hidden_dim" in bad.stderr
    assert "Traceback" not in bad.stderr
