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
    cfg = load_config("tiny", ["train.lr_mp=1e-3", "train.compile=true", "data.num_workers=3", "backend.name=fsdp"])
    assert cfg.train.lr_mp == 1e-3 and cfg.train.compile is True
    assert cfg.data.num_workers == 3 and cfg.backend.name == "fsdp"
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


# nanoVLM HEAD (4e0c096) models/config.py, VLMConfig's defaults, copied here by hand from that file.
NANOVLM_HEAD_VLMCONFIG = {
    "vit_hidden_dim": 768, "vit_inter_dim": 4 * 768, "vit_patch_size": 16, "vit_img_size": 512, "vit_n_heads": 12,
    "vit_dropout": 0.0, "vit_n_blocks": 12, "vit_ln_eps": 1e-6, "vit_cls_flag": False,
    "vit_model_type": "google/siglip2-base-patch16-512",
    "lm_hidden_dim": 960, "lm_inter_dim": 2560, "lm_rms_eps": 1e-5, "lm_re_base": 100000,
    "lm_max_position_embeddings": 8192, "lm_base_vocab_size": 49152, "extra_token_amount": 66,
    "lm_vocab_size": 49152 + 66, "lm_n_heads": 15, "lm_n_kv_heads": 5, "lm_dropout": 0.0, "lm_n_blocks": 32,
    "lm_attn_scaling": 1.0, "lm_max_length": 4096, "lm_use_tokens": False, "lm_tie_weights": True,
    "lm_model_type": "HuggingFaceTB/SmolLM2-360M-Instruct", "lm_tokenizer": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "lm_chat_template": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
                        "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' "
                        "}}{% endif %}",
    "mp_pixel_shuffle_factor": 4, "mp_image_token_length": 64, "max_img_size": 2048, "resize_to_max_side_len": True,
    "vlm_extra_tokens": {"image_token": "<|image|>", "global_image_token": "<|global_image|>",
                         **{f"r{r}c{c}": f"<row_{r}_col_{c}>" for r in range(1, 9) for c in range(1, 9)}},
    "vlm_load_backbone_weights": True, "vlm_checkpoint_path": "checkpoints", "hf_repo_name": "nanoVLM",
}  # fmt: skip
TOOLKIT_ONLY = {"vision_backbone": "", "language_backbone": "", "tokenizer": ""}  # paths nanoVLM has no field for


def test_model_config_defaults_are_nanovlm_heads_field_for_field():
    from dataclasses import asdict

    from toolkit.config import ModelConfig

    defaults = asdict(ModelConfig())
    assert defaults == {**NANOVLM_HEAD_VLMCONFIG, **TOOLKIT_ONLY}
    assert list(defaults["vlm_extra_tokens"]) == list(NANOVLM_HEAD_VLMCONFIG["vlm_extra_tokens"])  # id order


def test_a_nanovlm_config_json_missing_fields_reads_heads_defaults(tmp_path):
    """A config.json written before HEAD added a field (resize_to_max_side_len, say) reads HEAD's default."""
    import json

    from toolkit.model.hub import read_nanovlm_config

    (tmp_path / "config.json").write_text(json.dumps({"lm_hidden_dim": 960, "max_img_size": 1024}))
    cfg = read_nanovlm_config(tmp_path)
    assert cfg.resize_to_max_side_len is True and cfg.max_img_size == 1024
    assert cfg.mp_pixel_shuffle_factor == 4 and cfg.vlm_load_backbone_weights is True


def test_450m_preset_follows_nanovlm_heads_recipe():
    cfg = load_config("nanovlm-450m")
    assert cfg.model.resize_to_max_side_len is True
    assert (cfg.train.batch_size, cfg.train.gradient_accumulation_steps, cfg.train.lr_mp) == (2, 8, 0.00512)
    assert (cfg.train.lr_vision_backbone, cfg.train.lr_language_backbone, cfg.train.max_grad_norm) == (5e-5, 5e-5, 1.0)
    assert (cfg.data.max_images_per_example, cfg.data.max_images_per_knapsack) == (4, 18)
