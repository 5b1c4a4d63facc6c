"""nanoVLM's LR schedule as a LambdaLR multiplier, and the per-module parameter groups with frozen groups."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model_config

from toolkit.config import TrainConfig
from toolkit.model import VisionLanguageModel
from toolkit.train.optim import ParamGroup, build_optimizer, freeze_frozen_groups, group_lrs, param_groups
from toolkit.train.schedule import WarmupCosine, build_scheduler, schedule_from_config


def nanovlm_get_lr(it: int, max_lr: float, max_steps: int) -> float:
    """nanoVLM's train.py get_lr, transcribed: 3% warmup, cosine to 10% of the peak, held after the end."""
    min_lr = max_lr * 0.1
    warmup_steps = max_steps * 0.03
    if it < warmup_steps:
        return max_lr * (it + 1) / warmup_steps
    if it > max_steps:
        return min_lr
    decay_ratio = (it - warmup_steps) / (max_steps - warmup_steps)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (max_lr - min_lr)


@pytest.mark.parametrize("max_steps", [100, 200, 1000, 5000])
def test_multiplier_is_nanovlm_formula(max_steps: int) -> None:
    assert (max_steps * 0.03).is_integer()  # whole warmup: nanoVLM never overshoots, so no cap is involved
    schedule = WarmupCosine(max_steps)
    for peak in (5e-3, 5e-5):
        for it in range(max_steps + 20):
            assert schedule(it) * peak == pytest.approx(nanovlm_get_lr(it, peak, max_steps), rel=1e-12), it


def test_shape_warmup_peak_floor() -> None:
    s = WarmupCosine(200)  # 6 warmup steps
    assert [s(i) for i in range(6)] == pytest.approx([(i + 1) / 6 for i in range(6)])
    assert s(6) == 1.0
    assert all(s(i) > s(i + 1) for i in range(6, 200))
    assert s(200) == pytest.approx(0.1) and s(201) == s(10_000) == 0.1


def test_fractional_warmup_is_capped_at_the_peak() -> None:
    """50 x 0.03 = 1.5 warmup steps: nanoVLM's step 1 would run at 2 / 1.5 = 1.33x the peak; ours at the peak."""
    s = WarmupCosine(50)
    assert nanovlm_get_lr(1, 1.0, 50) == pytest.approx(4 / 3)
    assert s(1) == 1.0
    for it in [0, *range(2, 60)]:
        assert s(it) == pytest.approx(nanovlm_get_lr(it, 1.0, 50), rel=1e-12)


def test_config_fields_drive_the_schedule() -> None:
    s = schedule_from_config(TrainConfig(max_training_steps=10, warmup_ratio=0.2, min_lr_ratio=0.25))
    assert [s(0), s(1), s(2)] == pytest.approx([0.5, 1.0, 1.0])
    assert s(10) == pytest.approx(0.25) and s(11) == 0.25


def _tiny(**train) -> tuple[VisionLanguageModel, TrainConfig]:
    torch.manual_seed(0)
    fields = {"lr_mp": 3e-3, "lr_vision_backbone": 1e-4, "lr_language_backbone": 2e-4, "max_training_steps": 100}
    cfg = TrainConfig(**{**fields, **train})
    return VisionLanguageModel(tiny_model_config()), cfg


def test_groups_partition_the_parameters() -> None:
    model, cfg = _tiny()
    groups = param_groups(model, cfg)
    assert [(g.name, g.lr) for g in groups] == [("mp", 3e-3), ("vision", 1e-4), ("language", 2e-4)]
    names = [n for g in groups for n in g.param_names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each once; tied head not twice
    assert "decoder.head.weight" not in names and "decoder.token_embedding.weight" in names
    prefixes = {"mp": "MP.", "vision": "vision_encoder.", "language": "decoder."}
    assert all(n.startswith(prefixes[g.name]) for g in groups for n in g.param_names)


def test_untied_head_is_a_language_parameter() -> None:
    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_model_config(lm_tie_weights=False))
    language = next(g for g in param_groups(model, TrainConfig()) if g.name == "language")
    assert "decoder.head.weight" in language.param_names


def test_lambdalr_keeps_each_groups_peak() -> None:
    """One multiplier, three peaks: DeepSpeed's WarmupCosineLR would have put one LR into every group."""
    model, cfg = _tiny()
    groups = param_groups(model, cfg)
    opt = build_optimizer(model, groups, weight_decay=0.0)
    sched = build_scheduler(opt, schedule_from_config(cfg))
    for it in range(110):
        lrs = group_lrs(opt.param_groups, groups)
        for g in groups:
            assert lrs[g.name] == pytest.approx(nanovlm_get_lr(it, g.lr, 100), rel=1e-12)
        opt.step()
        sched.step()


def test_scheduler_state_resumes() -> None:
    model, cfg = _tiny()
    groups = param_groups(model, cfg)
    opt = build_optimizer(model, groups, weight_decay=0.0)
    sched = build_scheduler(opt, schedule_from_config(cfg))
    for _ in range(37):
        opt.step()
        sched.step()
    state, opt_state = sched.state_dict(), opt.state_dict()
    opt2 = build_optimizer(model, groups, weight_decay=0.0)
    sched2 = build_scheduler(opt2, schedule_from_config(cfg))
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(state)
    for _ in range(5):
        assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()


def test_frozen_group_gets_no_gradient_and_no_state() -> None:
    model, cfg = _tiny(lr_vision_backbone=0.0)
    groups = param_groups(model, cfg)
    freeze_frozen_groups(model, groups)
    opt = build_optimizer(model, groups, weight_decay=0.1)
    assert [g["name"] for g in opt.param_groups] == ["mp", "language"]
    assert group_lrs(opt.param_groups, groups)["vision"] == 0.0
    vision = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("vision_encoder.")}
    ids = torch.randint(0, 384, (2, 16))
    ids[0, 1:5] = 384  # one tile's image tokens
    out = model(input_ids=ids, labels=ids, pixel_values=torch.rand(1, 3, 32, 32))
    out.loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        if name in vision:
            assert not p.requires_grad and p.grad is None and p not in opt.state
            assert torch.equal(p, vision[name])  # weight decay did not touch it either
        else:
            assert p.requires_grad and p in opt.state


def test_all_groups_frozen_is_an_error() -> None:
    model, cfg = _tiny(lr_mp=0.0, lr_vision_backbone=0.0, lr_language_backbone=0.0)
    with pytest.raises(ValueError, match="every parameter group has LR 0"):
        build_optimizer(model, param_groups(model, cfg), weight_decay=0.0)


def test_fused_adamw_by_default_takes_the_per_tensor_steps() -> None:
    """build_optimizer asks for torch's fused AdamW wherever it applies (here: CPU tensors); the steps it takes
    are the per-tensor loop's, which is what torch does on a CPU without it."""
    torch.manual_seed(0)
    models = [torch.nn.Linear(64, 64) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    groups = [ParamGroup(name="language", param_names=["weight", "bias"], lr=1e-2)]
    fused, loop = (build_optimizer(m, groups, weight_decay=0.1, fused=f) for m, f in zip(models, (None, False)))
    assert fused.param_groups[0]["fused"] and not loop.param_groups[0]["fused"]
    x = torch.randn(16, 64)
    for _ in range(3):
        for model, opt in zip(models, (fused, loop)):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(*(m.parameters() for m in models)):
        assert (a - b).abs().max().item() <= 1e-6


def test_the_norm_read_with_the_loss_clips_as_a_step_that_reads_it_itself() -> None:
    """The trainer asks for the norm tensor, reads it with the loss and passes the value to step(); a caller of
    step() alone has the step read it. Same norm, same clipped update, bit for bit, with the clip active."""
    from toolkit.bench.memory import synthetic_batch
    from toolkit.bench.overhead import toolkit_trainer
    from toolkit.config import load_config

    settings = ["backend.device=cpu", "backend.precision=fp32"]
    cfg = load_config("tiny", [*settings, "train.max_grad_norm=0.05"])
    ours, theirs = toolkit_trainer(cfg, seed=0).backend, toolkit_trainer(cfg, seed=0).backend
    unclipped = toolkit_trainer(load_config("tiny", [*settings, "train.max_grad_norm=0"]), seed=0).backend
    batch = synthetic_batch(cfg.model, seed=1)
    for backend in (ours, theirs, unclipped):
        for _ in range(backend.accumulation):
            backend.forward_backward(batch, 1e-2)
    read = ours.step(grad_norm=float(ours.grad_norm()))
    alone = theirs.step()
    unclipped.step(grad_norm=float(unclipped.grad_norm()))
    assert read.grad_norm == alone.grad_norm > 0.05 and not read.skipped
    # AdamW's first update barely sees a uniform scale of the gradients; its first moment is the clipped gradient
    moments = [[b.optimizer.state[p]["exp_avg"] for p in b.module.parameters()] for b in (ours, theirs, unclipped)]
    assert all(torch.equal(a, b) for a, b in zip(moments[0], moments[1], strict=True))
    assert not any(torch.equal(a, c) for a, c in zip(moments[0], moments[2], strict=True) if a.any())
    params = [list(b.module.parameters()) for b in (ours, theirs)]
    assert all(torch.equal(a, b) for a, b in zip(params[0], params[1], strict=True))
    for _ in range(ours.accumulation):
        ours.forward_backward(batch, 1e-2)
    with pytest.raises(RuntimeError, match="grad_norm"):  # a value that no grad_norm() tensor gave
        ours.step(grad_norm=1.0)
