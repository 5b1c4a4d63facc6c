"""CUDA checks (skipped without a GPU): bf16, the fused packed-attention kernel, NCCL under every backend."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import PYTHONPATH, tiny_model_config, torchrun
from toolkit.model import VisionLanguageModel, attention
from toolkit.train.backends.base import compile_block

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.gpu


def _packed_batch(cfg, device):
    gen = torch.Generator().manual_seed(0)
    lengths, ids, pos = [40, 90, 126], [], []
    for n in lengths:
        ids.append(torch.randint(0, cfg.lm_base_vocab_size, (n,), generator=gen))
        pos.append(torch.arange(n))
    ids[0][:4] = cfg.lm_base_vocab_size  # one tile's image tokens at the start of the first sample
    tiles = torch.rand(1, 3, cfg.vit_img_size, cfg.vit_img_size, generator=gen)
    return torch.cat(ids)[None].to(device), torch.cat(pos)[None].to(device), tiles.to(device)


@pytest.mark.parametrize(
    "lm_hidden_dim,kernel", [(64, "auto"), (64, "varlen"), (64, "flex"), (48, "auto")]
)  # heads of 16 (the fused kernels) and of 12 (the dense fallback)
def test_fused_packed_attention_matches_sdpa_reference_in_bf16(lm_hidden_dim, kernel):
    cfg = tiny_model_config(lm_max_length=256, lm_hidden_dim=lm_hidden_dim)
    model = VisionLanguageModel(cfg).cuda().eval()
    ids, pos, tiles = _packed_batch(cfg, "cuda")
    head_dim = lm_hidden_dim // cfg.lm_n_heads
    with torch.autocast("cuda", dtype=torch.bfloat16):  # fp32 activations in, bf16 attention: auto sees bf16
        plan = attention.plan_attention(
            q_len=256, kv_len=256, position_ids=pos, attention_mask=None, device=pos.device,
            dtype=torch.float32, kernel=kernel, head_dim=head_dim,
        )  # fmt: skip
    expected = {"auto": "dense" if head_dim < 16 else "varlen"}.get(kernel, kernel)  # torch >= 2.10 has varlen
    assert plan.kind == expected
    with torch.no_grad():
        model.decoder.attention_kernel = "dense"
        reference = model(input_ids=ids, pixel_values=tiles, position_ids=pos).logits.float()
        model.decoder.attention_kernel = kernel
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fused = model(input_ids=ids, pixel_values=tiles, position_ids=pos).logits.float()
    assert (fused - reference).abs().max().item() <= 5e-2  # bf16 against an fp32 reference


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("kernel", ["varlen", "flex"])
def test_fused_packed_attention_gradients_match_the_dense_mask(kernel, compiled):
    """Training runs the kernel's backward too: every gradient against the eager dense mask's, both in bf16;
    compiled as `train.compile` compiles it (each block), since that is the fastest setting in `bench gpu`."""
    cfg = tiny_model_config(lm_max_length=256, lm_hidden_dim=64)
    model = VisionLanguageModel(cfg).cuda().train()
    ids, pos, tiles = _packed_batch(cfg, "cuda")
    grads = {}
    for name in ("dense", kernel):
        model.zero_grad()
        model.decoder.attention_kernel = name
        if compiled and name == kernel:
            for block in model.blocks():
                compile_block(block)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids, pixel_values=tiles, position_ids=pos).logits
        logits.float().logsumexp(-1).mean().backward()
        grads[name] = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[kernel].keys() == grads["dense"].keys()
    for n, ref in grads["dense"].items():
        err = (grads[kernel][n] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err.item() <= 5e-2, (n, err.item())


@pytest.mark.parametrize(
    "backend",
    [["backend.name=single"], ["backend.name=ddp"], ["backend.name=fsdp"],
     ["backend.name=deepspeed", "backend.ds_config=ds_configs/zero2.json"],
     ["backend.name=deepspeed", "backend.ds_config=ds_configs/zero3.json"]],
)  # fmt: skip
def test_each_backend_trains_on_one_gpu_over_nccl(backend, tmp_path):
    from toolkit.data.prepare.synthetic import write_synth

    write_synth(str(tmp_path / "data"), samples=64, val_samples=8, seed=0)
    args = [
        "--config", "tiny", *backend, "backend.device=cuda", "backend.precision=bf16",
        f"model.tokenizer={tmp_path / 'data' / 'tokenizer'}", f"data.train_shards={tmp_path / 'data' / 'train'}",
        f"data.val_shards={tmp_path / 'data' / 'val'}", "train.max_training_steps=4", "train.eval_interval=2",
        f"train.run_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    cmd = torchrun(1, "-m", "toolkit", "train", *args)
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    steps = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s]
    assert len(losses) == 4 and all(x == x for x in losses)
    assert steps[-1]["peak_memory_gb"] > 0


def test_patch_matmul_matches_the_convolution_on_cuda_in_bf16():
    from toolkit.model.vision import PatchConv

    torch.manual_seed(0)
    conv = PatchConv(3, 768, kernel_size=16, stride=16).cuda()
    pixels = torch.rand(8, 3, 512, 512, device="cuda")
    reference = torch.nn.functional.conv2d(pixels, conv.weight, conv.bias, stride=16)  # fp32 cuDNN
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = conv(pixels).float()
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= 0.02 * reference.abs().max().item()  # bf16 inputs, fp32 sums


def test_fused_adamw_takes_the_same_steps_as_foreach():
    from toolkit.train.optim import ParamGroup, build_optimizer

    torch.manual_seed(0)
    models = [torch.nn.Linear(256, 256).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    names = [n for n, _ in models[0].named_parameters()]
    groups = [ParamGroup(name="language", param_names=names, lr=1e-3)]
    optimizers = [build_optimizer(m, groups, weight_decay=0.01, fused=f) for m, f in zip(models, (True, False))]
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    for step in range(3):
        x = torch.randn(32, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(step))
        for model, opt in zip(models, optimizers):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert (a - b).abs().max().item() <= 1e-6


def _chunked_against_dense_in_bf16(device: torch.device) -> dict[str, tuple]:
    """A 4096-token row at nanovlm-450m's width and vocabulary under bf16 autocast, the dense loss and the chunked
    one: the loss, both gradients and the peak memory the row added (CUDA only; 0 elsewhere). As `bench loss`
    does, a short row goes first, so the gradients and allocator pools exist and the peak is the row's own."""
    import torch.nn.functional as F

    from toolkit.model.loss import dense_cross_entropy, linear_cross_entropy

    gen = torch.Generator(device).manual_seed(0)
    vocab, width, tokens = 49218, 960, 4096
    hidden = torch.randn(tokens, width, device=device, generator=gen).requires_grad_()
    weight = torch.randn(vocab, width, device=device, generator=gen).mul_(0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    labels[::3] = -100
    losses = {
        "dense": lambda rows: dense_cross_entropy(F.linear(hidden[:rows], weight), labels[:rows]),
        "chunked": lambda rows: linear_cross_entropy(hidden[:rows], weight, labels[:rows]),
    }
    out = {}
    for name, loss_fn in losses.items():
        cuda = device.type == "cuda"
        hidden.grad = weight.grad = None
        for rows in (512, tokens):  # the short row: gradients allocated; then the full row's peak
            if hidden.grad is not None:
                hidden.grad.zero_()
                weight.grad.zero_()
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device) if cuda else 0
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = loss_fn(rows)
            loss.backward()
        peak = torch.cuda.max_memory_allocated(device) - before if cuda else 0
        out[name] = (loss.item(), [hidden.grad.clone(), weight.grad.clone()], peak)
    return out


def test_chunked_loss_in_bf16_on_cuda_is_within_its_bound_and_adds_at_most_400_mb():
    """Issue 15: the bound stated for bf16 (1e-3 relative on the loss, 2e-2 of the largest gradient entry) holds on
    CUDA's bf16 matmuls, and one 4096-token row's loss adds at most 400 MB of peak memory at the 450m vocabulary,
    where the dense path's (the control) adds over 1 GB."""
    result = _chunked_against_dense_in_bf16(torch.device("cuda"))
    (want, want_grads, dense_peak), (got, got_grads, chunked_peak) = result["dense"], result["chunked"]
    assert got == pytest.approx(want, rel=1e-3)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert (g - w).abs().max().item() <= 2e-2 * w.abs().max().item()
    assert chunked_peak <= 400e6 < 1e9 < dense_peak, (chunked_peak, dense_peak)
