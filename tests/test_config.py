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
        (["model.lm_n_headz=4"], r"unknown field 'model\.lm_n_headz'.*Did you mean one of 'model\.lm_n_heads'"),
        (["modle.lm_n_heads=4"], r"unknown config section 'modle'"),
        (["model.lm_n_heads=5"], r"model\.lm_n_heads must divide model\.lm_hidden_dim"),
        (["model.lm_n_kv_heads=3"], r"model\.lm_n_kv_heads must divide model\.lm_n_heads"),
        (["backend.name=horovod"], r"backend\.name='horovod' is not allowed; choose one of single, ddp, deepspeed"),
        (["train.activation_checkpointing=some"], r"train\.activation_checkpointing='some'.*none, vision, language"),
        (["train.batch_size=two"], r"train\.batch_size='two' must be of type int"),
        (["train.batch_size=0"], r"train\.batch_size=0 must be >= 1: Packed rows per rank per micro-step"),
        (["model.mp_image_token_length=5"], r"model\.mp_image_token_length must be .* = 4"),
        (["train.lr_mp"], r"must look like section\.field=value"),
        (["train.lr_mp=0", "train.lr_vision_backbone=0", "train.lr_language_backbone=0"], r"freezes every weight"),
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


# -- values that passed validation and then crashed (ZeroDivisionError, torchdata's bare assert, a wrong stop) --


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        # 0 heads, patch or shuffle factor: a modulo by zero inside validate itself
        ("model.lm_n_heads=0", r"model\.lm_n_heads=0 must be >= 1: Query heads"),
        ("model.vit_n_heads=0", r"model\.vit_n_heads=0 must be >= 1"),
        ("model.lm_n_kv_heads=0", r"model\.lm_n_kv_heads=0 must be >= 1"),
        ("model.vit_patch_size=0", r"model\.vit_patch_size=0 must be >= 1"),
        ("model.mp_pixel_shuffle_factor=0", r"model\.mp_pixel_shuffle_factor=0 must be >= 1"),
        ("model.vit_inter_dim=0", r"model\.vit_inter_dim=0 must be >= 1"),
        ("model.lm_rms_eps=0", r"model\.lm_rms_eps=0.0 must be > 0"),
        ("model.lm_dropout=1", r"model\.lm_dropout=1.0 must be in \[0, 1\)"),
        # step % log_interval after step 1; torchdata's bare AssertionError; a stop after one good step
        ("train.log_interval=0", r"train\.log_interval=0 must be >= 1: Log a progress line every N steps"),
        ("data.prefetch_factor=0", r"data\.prefetch_factor=0 must be >= 1: Batches each worker prepares ahead"),
        ("train.max_bad_steps=0", r"train\.max_bad_steps=0 must be >= 1: Stop after this many skipped steps"),
        # a negative interval exported every step (step % -1 == 0); 0 is the documented "off"
        ("train.export_interval=-1", r"train\.export_interval=-1 must be >= 0: .*\(0 = never during training\)"),
        ("train.stop_at_step=-3", r"train\.stop_at_step=-3 must be >= 0"),
        ("data.max_tiles_per_knapsack=-1", r"data\.max_tiles_per_knapsack=-1 must be >= 0: .*\(0 = no limit"),
        ("train.lr_mp=.inf", r"train\.lr_mp=inf must be a finite number"),
        ("train.max_grad_norm=.nan", r"train\.max_grad_norm=nan must be a finite number"),
        ("train.run_dir=", r"train\.run_dir is empty; name the run's folder"),
        ("train.resume=None", r"train\.resume='None' would be read as a checkpoint path; write 'none'"),
    ],
)
def test_values_that_would_crash_later_are_refused_with_the_field_and_its_range(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("tiny", [override])


def test_every_numeric_field_declares_the_range_it_is_checked_against():
    """Each int/float field names its Range beside its default, so a new field cannot skip the range check."""
    import dataclasses
    import typing

    from toolkit.config import _SECTION_TYPES

    unchecked = [
        f"{section}.{f.name}"
        for section, cls in _SECTION_TYPES.items()
        for f in dataclasses.fields(cls)
        if typing.get_type_hints(cls)[f.name] in (int, float) and f.metadata.get("valid") is None
    ]
    assert unchecked == []


def test_a_nanovlm_config_json_with_zero_heads_is_a_config_error_not_a_zero_division(tmp_path):
    """read_nanovlm_config calls ModelConfig.validate() alone, without Config's type pass: ranges live there."""
    import json

    from toolkit.model.hub import read_nanovlm_config

    (tmp_path / "config.json").write_text(json.dumps({"lm_n_heads": 0}))
    with pytest.raises(ConfigError, match=r"model\.lm_n_heads=0 must be >= 1"):
        read_nanovlm_config(tmp_path)


def test_max_img_size_beyond_the_tile_tokens_is_refused():
    """A grid past r8c8 would fail on the first large image with a KeyError inside the data workers."""
    with pytest.raises(ConfigError, match=r"model\.max_img_size=512 allows grids of 16x16 tiles .* up to r8c8 only; "
                       r"lower max_img_size to 256"):  # fmt: skip
        load_config("tiny", ["model.max_img_size=512"])
    assert load_config("tiny", ["model.max_img_size=256"]).model.max_img_size == 256  # 8x8: every token exists


@pytest.mark.parametrize(
    ("mixture", "pattern"),
    [
        ("[{pattern: a, weight: abc}]", r"data\.train_shards\[0\]\.weight='abc' must be a number > 0"),
        ("[{pattern: a}, {pattern: b, weight: 0}]", r"data\.train_shards\[1\]\.weight=0 must be a number > 0"),
        ("[{pattern: a, weight: .inf}]", r"data\.train_shards\[0\]\.weight=inf must be a number > 0"),
        ("[{pattern: a, weight: true}]", r"data\.train_shards\[0\]\.weight=True must be a number > 0"),
        ("[{pattern: 5}]", r"data\.train_shards\[0\]\.pattern=5 must be a brace pattern, folder or manifest"),
        ("[]", r"data\.train_shards is an empty list; give at least one"),
    ],
)
def test_bad_mixture_entries_name_the_entry(mixture, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("tiny", [f"data.train_shards={mixture}"])


def test_bad_mixture_in_a_yaml_file_is_a_config_error(tmp_path):
    bad = tmp_path / "mix.yaml"
    bad.write_text("data:\n  train_shards:\n    - {pattern: a, weight: abc}\n")
    with pytest.raises(ConfigError, match=r"data\.train_shards\[0\]\.weight='abc'"):
        load_config(str(bad))
    good = load_config("tiny", ["data.train_shards=[{pattern: a, weight: '1e-3'}, {pattern: b, weight: 2}]"])
    assert [s["weight"] for s in good.data.train_shards] == ["1e-3", 2]  # the loader reads them with float()


# -- unknown names: the hint points at the key the user meant --


@pytest.mark.parametrize(
    ("override", "suggested"),
    [
        ("train.max_steps=5", ["train.max_training_steps"]),  # difflib alone said max_bad_steps
        ("train.lr=1e-3", ["train.lr_mp", "train.lr_vision_backbone", "train.lr_language_backbone"]),
        ("train.learning_rate=1e-3", ["train.lr_mp", "train.lr_vision_backbone", "train.lr_language_backbone"]),
        ("train.num_workers=2", ["data.num_workers"]),  # the right field in the wrong section
        ("train.precision=bf16", ["backend.precision"]),
        ("data.batch_size=2", ["train.batch_size"]),
        ("train.device=cpu", ["backend.device"]),
        ("train.gradient_clipping=1.0", ["train.max_grad_norm"]),  # DeepSpeed's name
        ("train.per_device_train_batch_size=2", ["train.batch_size"]),  # the HF Trainer's
        ("train.lr_vision=1e-4", ["train.lr_vision_backbone"]),  # a prefix
        ("modle.lm_n_heads=4", ["model.lm_n_heads"]),  # a section typo keeps the field
    ],
)
def test_unknown_key_suggests_what_was_meant(override, suggested):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    message = str(err.value)
    hint = message.split("Did you mean ", 1)[1].split("?")[0]
    assert [k.strip(" '") for k in hint.removeprefix("one of ").split(",")] == suggested, message


def test_hint_for_a_key_without_section_and_a_flat_yaml(tmp_path):
    from toolkit.config import SECTIONS, section_fields
    from toolkit.config_hints import suggest_keys

    with pytest.raises(ConfigError, match=r"must be section\.field.*Did you mean 'train\.lr_mp'\?"):
        load_config("tiny", ["lr_mp=1e-3"])
    flat = tmp_path / "flat.yaml"
    flat.write_text("max_training_steps: 10\n")  # nanoVLM's flat field names at the top level
    with pytest.raises(ConfigError, match=r"unknown config section 'max_training_steps'.*'train\.max_training_steps'"):
        load_config(str(flat))
    fields = {s: section_fields(s) for s in SECTIONS}
    assert suggest_keys("lm_n_headz", fields, "model")[0] == "model.lm_n_heads"


def test_resume_help_says_none_refuses_a_run_dir_with_checkpoints():
    from toolkit.config import describe_fields

    line = next(x for x in describe_fields().splitlines() if x.lstrip().startswith("train.resume ="))
    assert "'none' starts fresh and refuses a run_dir that already holds checkpoints" in line


def test_every_alias_points_at_an_existing_key():
    """A renamed field must not leave ALIASES suggesting a key that no longer exists."""
    from toolkit.config import SECTIONS, section_fields
    from toolkit.config_hints import ALIASES

    keys = {f"{s}.{f}" for s in SECTIONS for f in section_fields(s)}
    assert {k for targets in ALIASES.values() for k in targets} <= keys
    assert not set(ALIASES) & {k.split(".")[1] for k in keys}  # a field name is found as itself, never aliased


def test_an_accumulation_the_global_batch_replaces_is_said(caplog):
    """train.global_batch_size sets the accumulation; an explicit other one was replaced without a word."""
    import logging

    from toolkit.train.preflight import derive_accumulation

    cfg = load_config(
        "tiny", ["train.gradient_accumulation_steps=3", "train.global_batch_size=4", "train.batch_size=2"]
    )
    with caplog.at_level(logging.WARNING):
        derive_accumulation(cfg, 1)
    assert cfg.train.gradient_accumulation_steps == 2
    assert ["gradient_accumulation_steps=3 is replaced by 2" in r.getMessage() for r in caplog.records] == [True]
