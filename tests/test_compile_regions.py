"""`train.compile` compiles each block's forward and nothing of the backends: their module hooks stay plain Python.

Compiling the block's whole call (`block.compile()`) took the hooks ZeRO-3 puts on every block into dynamo, which
specialised them on each block's id and recompiled them block after block until its recompile limit. Dynamo is
run here with its "eager" backend (tracing, no code generation), which is what decides which frames are compiled.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.convert_frame import register_bytecode_hook

from toolkit import __main__ as cli
from toolkit.data.prepare.synthetic import write_synth
from toolkit.model.language import DecoderBlock
from toolkit.model.vision import ViTBlock
from toolkit.train import checkpoint as ckpt

BACKEND_CODE = ("deepspeed", "torch/distributed")  # where the backends' hooks live


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synth(str(out), samples=32, val_samples=4, seed=0)
    return out


@pytest.fixture
def compiled_frames(monkeypatch):
    """Every frame dynamo compiles while the test runs, as (file, function); dynamo's caches empty around it."""
    real_compile = torch.compile
    frames: list[tuple[str, str]] = []

    def eager_compile(fn, **kwargs):
        return real_compile(fn, **{**kwargs, "backend": "eager"})

    def record(code, new_code):
        frames.append((code.co_filename, code.co_name))

    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    handle = register_bytecode_hook(record)
    try:
        yield frames
    finally:
        handle.remove()
        torch._dynamo.reset()


@pytest.mark.parametrize(
    "backend",
    [
        ["backend.name=single"],
        ["backend.name=fsdp"],
        ["backend.name=deepspeed", "backend.ds_config=ds_configs/zero3.json"],
    ],
    ids=["single", "fsdp", "zero3"],
)
def test_only_the_block_forwards_are_compiled(backend, compiled_frames, synth, tmp_path):
    run = tmp_path / "run"
    args = [
        "train", "--config", "tiny", "backend.device=cpu", "backend.precision=fp32", "train.compile=true",
        f"model.tokenizer={synth / 'tokenizer'}", f"data.train_shards={synth / 'train'}", "data.val_shards=",
        "data.num_workers=0", "data.shuffle_buffer=8", "train.batch_size=2", "train.max_training_steps=2",
        "train.eval_interval=0", "train.export_best=false", f"train.run_dir={run}", *backend,
    ]  # fmt: skip
    assert cli.main(args) == 0
    assert ckpt.RunDir(run).latest().name == "step_2"
    names = {name for _, name in compiled_frames}
    blocks = {ViTBlock.forward.__code__, DecoderBlock.forward.__code__}
    assert {(c.co_filename, c.co_name) for c in blocks} <= set(compiled_frames), names  # both towers compiled
    assert [f for f in compiled_frames if any(part in f[0] for part in BACKEND_CODE)] == []


def test_compile_with_checkpointing_and_a_frozen_vision_tower_trains(synth, tmp_path):
    """The usual projector-alignment stage: inductor failed at step 1 on the frozen tower's checkpointed blocks
    ("does not support RNG ops in recompute regions"); a tower fed pixels whose weights are frozen keeps no
    activations for a backward, so its blocks are no longer checkpointed. The loss is the uncheckpointed run's."""
    from cli_runs import train, train_args

    runs = {}
    for ac in ("all", "none"):
        run = tmp_path / ac
        args = train_args(synth, run, "backend.name=single", "train.compile=true", "train.lr_vision_backbone=0",
                          f"train.activation_checkpointing={ac}", steps=1)  # fmt: skip
        assert train(args) == 0
        runs[ac] = (run / "metrics.jsonl").read_text().splitlines()[0]
    loss = {ac: json.loads(line)["loss"] for ac, line in runs.items()}
    assert loss["all"] == pytest.approx(loss["none"], rel=1e-6)
