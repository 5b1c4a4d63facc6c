"""Run folder mechanics that need no process group: atomic latest, keep-last-k, FLOPs accounting."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import tiny_model_config
from toolkit.config import ConfigError
from toolkit.model import VisionLanguageModel
from toolkit.train import checkpoint as ckpt
from toolkit.train.checkpoint import DamagedCheckpointError
from toolkit.train.metrics import language_flops, vision_flops_per_tile
from toolkit.train.safe_load import CheckpointFileError


def _save(run: ckpt.RunDir, step: int, keep: int = 2) -> None:
    path = run.step_dir(step)
    ckpt.prepare_step_dir(path)
    ckpt.write_rank_state(path, 0, {"cursor": step})
    ckpt.commit(run, step, {"step": step}, keep=keep)


def test_latest_is_last_complete_and_pruning_keeps_k(tmp_path):
    run = ckpt.RunDir(tmp_path)
    assert run.latest() is None
    for step in (10, 20, 30):
        _save(run, step)
    assert run.latest() == run.step_dir(30)
    assert sorted(p.name for p in run.checkpoints.glob("step_*")) == ["step_20", "step_30"]
    # A save killed before commit leaves step_40 without trainer.json: latest stays, resume uses step_30.
    ckpt.prepare_step_dir(run.step_dir(40))
    ckpt.write_rank_state(run.step_dir(40), 0, {"cursor": 40})
    assert run.latest() == run.step_dir(30)
    assert ckpt.resolve_resume(run, "auto") == run.step_dir(30)
    assert ckpt.read_rank_state(run.latest(), 0)["loader"] == {"cursor": 30}
    _save(run, 50)
    assert sorted(p.name for p in run.checkpoints.glob("step_*")) == ["step_30", "step_50"]
    assert json.loads((run.latest() / "trainer.json").read_text()) == {"step": 50}


def test_a_resumed_branch_keeps_its_own_newest_and_a_failed_saves_leftover_goes_first(tmp_path):
    """Resumed from step_20 while step_30 existed, the new branch's saves counted step_30 as one of the kept: its
    step_24 was deleted and step_30 stayed. And a save that failed (a full disk) left its half-written step behind
    until the next commit, so the next save after a restart had no room either."""
    run = ckpt.RunDir(tmp_path)
    for step in (10, 20, 30):
        _save(run, step, keep=3)
    (run.checkpoints / "latest").write_text("step_20")  # resume from step_20: the branch goes on from there
    for step in (22, 24, 26):
        _save(run, step, keep=2)
    assert sorted(p.name for p in run.checkpoints.glob("step_*")) == ["step_24", "step_26", "step_30"]
    ckpt.prepare_step_dir(run.step_dir(28))  # a save that failed: no trainer.json
    (run.step_dir(28) / "model.pt").write_bytes(b"half")
    ckpt.prepare_step_dir(run.step_dir(27))  # the restart's next save: the leftover goes before it writes
    assert not run.step_dir(28).exists() and run.step_dir(27).is_dir()
    _save(run, 30, keep=2)  # the branch reaches the old one's step: that checkpoint is replaced
    assert json.loads((run.latest() / "trainer.json").read_text()) == {"step": 30}
    assert sorted(p.name for p in run.checkpoints.glob("step_*")) == ["step_26", "step_30"]  # 27 never committed


def test_resume_none_and_explicit_paths(tmp_path):
    run = ckpt.RunDir(tmp_path)
    _save(run, 5)
    assert ckpt.resolve_resume(run, "none") is None
    assert ckpt.resolve_resume(run, str(run.step_dir(5))) == run.step_dir(5)
    assert ckpt.resolve_resume(run, str(tmp_path)) == run.step_dir(5)
    with pytest.raises(ConfigError, match=r"nowhere: no such file or folder; give auto .*none .*step_N"):
        ckpt.resolve_resume(run, str(tmp_path / "nowhere"))
    ckpt.prepare_step_dir(run.step_dir(6))  # a save that never finished
    with pytest.raises(ConfigError, match="step_6 is an incomplete checkpoint"):
        ckpt.resolve_resume(run, str(run.step_dir(6)))


def test_missing_rank_state_explains_world_size(tmp_path):
    run = ckpt.RunDir(tmp_path)
    _save(run, 1)
    with pytest.raises(FileNotFoundError, match="written by 1 ranks"):
        ckpt.read_rank_state(run.latest(), 1)
    (run.latest() / "rank_0.pt").unlink()  # a rank the checkpoint had: a lost file, not another world size
    with pytest.raises(CheckpointFileError, match=r"rank_0.pt .* the file is missing .*written by 1 rank"):
        ckpt.read_rank_state(run.latest(), 0, saved_world=1)


def test_a_cut_or_garbled_file_is_named_where_it_is_read(tmp_path):
    """load_plain turns torch's read errors (zip reader, EOF, mmap's EINVAL, restricted unpickler) into one error
    naming the file; what preflight's zip check lets through (a garbled file of the right shape) still gets it."""
    ckpt.write_rank_state(tmp_path, 0, {"cursor": 1})
    file = tmp_path / "rank_0.pt"
    whole = file.read_bytes()
    for size in (0, 100, len(whole) - 100):
        file.write_bytes(whole[:size])
        with pytest.raises(CheckpointFileError, match=f"{file} .* cannot be read: the file"):
            ckpt.read_rank_state(tmp_path, 0)
    file.write_bytes(b"garbage" * 100)
    with pytest.raises(CheckpointFileError, match=r"garbled or cut short .*Unsupported operand"):
        ckpt.read_rank_state(tmp_path, 0)


def test_damaged_trainer_json_and_latest_name_the_file_and_the_kept_checkpoints(tmp_path):
    run = ckpt.RunDir(tmp_path)
    for step in (1, 2, 3):
        _save(run, step, keep=3)
    (run.step_dir(3) / "trainer.json").write_text('{"step": 3}')  # not what a save writes
    with pytest.raises(CheckpointFileError, match=r"trainer.json .* it has no backend, world_size, trainer"):
        ckpt.read_trainer_meta(run.step_dir(3))
    assert ckpt.alternatives(run.checkpoints, run.step_dir(3), verb="resume") == (
        f"use a kept checkpoint instead: train.resume={run.step_dir(2)} (kept: step_1, step_2)"
    )
    (run.checkpoints / "latest").write_text("")
    with pytest.raises(DamagedCheckpointError, match=f"names 'nothing'.*train.resume={run.step_dir(3)}"):
        run.latest()


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = (torch.rand(3), torch.randint(0, 100, (2,)))
    ckpt.set_rng_state(state)
    b = (torch.rand(3), torch.randint(0, 100, (2,)))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def _counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _matmul_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, enable_gqa=False, scale=None):
    """SDPA spelled out in matmuls, so FlopCounterMode (which counts CPU SDPA as 0) sees attention's FLOPs."""
    if enable_gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if is_causal:
        attn_mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1) @ v


def test_flop_formulas_match_counted_matmuls(monkeypatch):
    """MFU's numerator against torch's own FLOP counter (forward + backward, matmuls and convs)."""
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _matmul_attention)
    cfg = tiny_model_config()
    model = VisionLanguageModel(cfg).eval()  # eval: no dummy vision tile in the text-only count
    tile = torch.rand(1, 3, cfg.vit_img_size, cfg.vit_img_size)
    counted = _counted_flops(lambda: model.MP(model.vision_encoder(tile)).sum().backward())
    assert counted == pytest.approx(vision_flops_per_tile(cfg), rel=0.02)
    seq = 64
    ids = torch.randint(0, 300, (1, seq))
    counted = _counted_flops(lambda: model(input_ids=ids).logits.sum().backward())
    # The counter charges SDPA for the full S x S square; our formula charges causal halves, so pass 2 S^2.
    assert counted == pytest.approx(language_flops(cfg, seq, 2 * seq * seq), rel=0.02)


@pytest.mark.parametrize("frozen", [(), ("vision",), ("vision", "mp"), ("mp",), ("language",), ("mp", "language")])
def test_a_steps_flops_with_frozen_parts_and_the_chunked_head_match_counted_matmuls(monkeypatch, frozen):
    """A frozen part computes no weight gradient, and no input gradient without a trained part upstream; MFU
    counted the full backward, so freezing the vision tower (less work) raised it. The chunked loss runs the head
    on the target tokens only."""
    from toolkit.train.metrics import step_flops
    from toolkit.train.optim import GROUP_PREFIXES

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _matmul_attention)
    cfg = tiny_model_config()
    model = VisionLanguageModel(cfg).eval()
    for name, param in model.named_parameters():
        param.requires_grad_(next(g for pre, g in GROUP_PREFIXES.items() if name.startswith(pre)) not in frozen)
    seq, n = 64, cfg.mp_image_token_length
    ids = torch.randint(0, 300, (1, seq))
    ids[0, 4 : 4 + n] = model.image_token_id
    tile = torch.rand(1, 3, cfg.vit_img_size, cfg.vit_img_size)
    counted = _counted_flops(lambda: model(input_ids=ids, pixel_values=tile).logits.sum().backward())
    expected = step_flops(cfg, n_tokens=seq, sum_sq_lengths=2 * seq * seq, n_tiles=1, frozen=frozenset(frozen))
    assert counted == pytest.approx(expected, rel=0.02)
    labels = torch.full_like(ids, -100)
    labels[0, 40:50] = ids[0, 41:51]  # 10 target tokens: the chunked loss's head sees these rows only
    counted = _counted_flops(lambda: model(input_ids=ids, pixel_values=tile, labels=labels).loss.backward())
    expected = step_flops(cfg, n_tokens=seq, sum_sq_lengths=2 * seq * seq, n_tiles=1, head_tokens=10,
                          frozen=frozenset(frozen))  # fmt: skip
    recomputed = 2 * cfg.lm_hidden_dim * cfg.lm_vocab_size * 10  # the chunks' head forward, again in the backward
    assert counted == pytest.approx(expected + recomputed, rel=0.02)  # MFU leaves recomputation out


def test_a_world_size_change_under_zero0_names_zero0_not_deepspeed(tmp_path):
    """The refusal said "backend deepspeed cannot reshard", though ZeRO-1 to 3 do."""
    from tests.backend_worker import make_config
    from toolkit.dist import DistEnv
    from toolkit.train.backends import build_backend

    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1)
    backend = build_backend(make_config("deepspeed", ds_config="ds_configs/zero0.json"), env=env,
                            device=torch.device("cpu"))  # fmt: skip
    with pytest.raises(ConfigError, match="deepspeed with ZeRO-0 cannot reshard its checkpoint: resume on 2 ranks"):
        ckpt.check_resumable(tmp_path, {"backend": "deepspeed", "world_size": 2}, backend=backend)


def test_mfu_peak_tells_the_h100_cards_apart_and_says_why_there_is_none(monkeypatch):
    """The name "H100" matched the PCIe card (756 TFLOP/s, not 989): its MFU read about 24% low. A card not in
    the table, or an fp32 run (measured against the bf16 peak), logged no mfu without a word."""
    from toolkit.train.metrics import mfu_peak

    cuda = torch.device("cuda")
    for name, peak in [("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 NVL", 835e12)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_, n=name: n)
        assert mfu_peak(cuda, "bf16") == (peak, ""), name
    assert mfu_peak(cuda, "fp32")[0] is None and "backend.precision=fp32" in mfu_peak(cuda, "fp32")[1]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA RTX 9090")
    assert mfu_peak(cuda, "bf16") == (None, "the bf16 peak of NVIDIA RTX 9090 is not in toolkit/train/metrics.py")
    assert mfu_peak(torch.device("cpu"), "bf16") == (None, "")
