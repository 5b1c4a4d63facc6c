"""CUDA checks (skipped without a GPU): bf16, the fused packed-attention kernel, NCCL under every backend."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import CPU_ENV, PYTHONPATH, tiny_model_config
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


# The backends as `toolkit train` names them; `single` is the reference the others are held to.
BACKENDS: dict[str, list[str]] = {
    "single": ["backend.name=single"],
    "ddp": ["backend.name=ddp"],
    "fsdp": ["backend.name=fsdp"],
    "zero2": ["backend.name=deepspeed", "backend.ds_config=ds_configs/zero2.json"],
    "zero3": ["backend.name=deepspeed", "backend.ds_config=ds_configs/zero3.json"],
}
STEPS = 6


def peak_lrs(scale: float) -> list[str]:
    """The tiny preset's peak LRs (3e-3 projector, 1e-3 vision and language) times `scale`."""
    return [f"train.lr_mp={3e-3 * scale:g}", f"train.lr_vision_backbone={1e-3 * scale:g}",
            f"train.lr_language_backbone={1e-3 * scale:g}"]  # fmt: skip


# At 3x the preset's LRs the tiny model's loss falls from 6.21 to 4.73 in 6 steps, and each step's loss is mostly
# the updates' doing: with the LRs at ~0 it stays at 6.21-6.22. Measured on the 2-core CPU box (gloo, bf16, these
# settings; the same figures on every rerun): ddp reproduces single's losses exactly (the same autocast arithmetic);
# fsdp, zero2 and zero3 (bf16 weights and activations where single autocasts from fp32) differ by at most 5.6e-4
# relative at any step, the validation loss by 5.8e-4 and the gradient norm by 3.2e-3. `single` at half the LRs
# differs by 1.8e-2 at step 2 and 9.6e-2 at step 6. LOSS_BOUND is 5x the bf16 spread measured and a sixth of the
# half-LR run's smallest difference, which the test checks again on the device it runs on (CONTROL); CUDA's and
# NCCL's own bf16 kernels, not measurable on the CPU box, have that 5x margin. Broken on purpose on the CPU, one
# backend failed it with 0.95x the LRs (loss 9.7e-3 off by step 6), with its 3rd update dropped (4.9e-2 from step 4)
# and with its last one dropped (the validation loss after it, 1.0e-2). A gradient scaled by a wrong factor leaves
# the losses alone (AdamW is invariant to it, and every step here clips its norm of 4-6 to 1): the logged norm,
# taken before clipping, shows it (2x: 1.0 off), and NORM_BOUND is 6x that norm's measured spread.
LR_SCALE = 3.0
LOSS_BOUND = 3e-3
NORM_BOUND = 2e-2
CONTROL = "single_at_half_lr"


def _relative(got: list[float], want: list[float]) -> list[float]:
    """|got - want| / |want| per step: losses (~5) and norms (~4) are far from 0, so relative is well defined."""
    return [abs(g - w) / abs(w) for g, w in zip(got, want, strict=True)]


def backends_against_single(
    device: str, root: Path, extra: dict[str, list[str]] | None = None
) -> dict[str, dict[str, list[float]]]:
    """Train every backend and CONTROL side by side (`extra`: more overrides for some of them, to break one on
    purpose) and hold each backend's per-step losses, gradient norms and validation losses to single's; CONTROL
    must stay out of LOSS_BOUND from step 2 on, or the comparison could not tell a wrong update from a right one.
    Returns each run's relative deviations from single, per step."""
    extra = extra or {}
    runs = {name: [*args, *peak_lrs(LR_SCALE), *extra.get(name, [])] for name, args in BACKENDS.items()}
    runs[CONTROL] = [*BACKENDS["single"], *peak_lrs(LR_SCALE / 2), *extra.get(CONTROL, [])]
    records = train_concurrently(device, root, runs)
    steps = {name: [r for r in recs if "loss" in r] for name, recs in records.items()}
    for name, recs in steps.items():
        assert [r["step"] for r in recs] == list(range(1, STEPS + 1)), (name, [r["step"] for r in recs])
        bad = [r["step"] for r in recs if r["skipped"] or None in (r["loss"], r["grad_norm"], r.get("val_loss", 0))]
        assert not bad, f"{name} skipped steps or lost values at {bad} (metrics.jsonl writes NaN as null)"
    ref = steps["single"]
    batches = [(r["batch_digest"], r["n_targets"]) for r in ref]
    deviations = {}
    for name, recs in steps.items():
        assert [(r["batch_digest"], r["n_targets"]) for r in recs] == batches, f"{name} trained on other batches"
        deviations[name] = {
            key: _relative([r[key] for r in recs if key in r], [r[key] for r in ref if key in r])
            for key in ("loss", "grad_norm", "val_loss")
        }
    table = "\n".join(f"{n}: " + ", ".join(f"{k} {max(v):.2e}" for k, v in d.items()) for n, d in deviations.items())
    print(f"worst relative deviation from single, {device} bf16:\n{table}")
    for name in BACKENDS:
        dev = deviations[name]
        assert max(dev["loss"]) <= LOSS_BOUND, f"{name} loss per step: {dev['loss']}\n{table}"
        assert max(dev["val_loss"]) <= LOSS_BOUND, f"{name} validation loss: {dev['val_loss']}\n{table}"
        assert max(dev["grad_norm"]) <= NORM_BOUND, f"{name} grad norm per step: {dev['grad_norm']}\n{table}"
    control = deviations[CONTROL]["loss"][1:]
    assert min(control) > 2 * LOSS_BOUND, f"half the LRs barely moves the losses: {control}; the bound cannot tell"
    return deviations


def test_each_backend_trains_on_one_gpu_over_nccl(tmp_path: Path) -> None:
    """Every backend, one rank over NCCL in bf16, takes single's steps: its losses, norms and validation losses
    within the bf16 bounds above (finite losses alone passed a wrong gradient scale or a missed update)."""
    backends_against_single("cuda", tmp_path)
    for name in BACKENDS:
        records = (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
        assert json.loads(records[-1])["peak_memory_gb"] > 0, name


def train_concurrently(
    device: str, root: Path, runs: dict[str, list[str]], timeout_s: float = 300
) -> dict[str, list[dict]]:
    """One one-rank torchrun of `toolkit train` per run, all started before any is waited for, so that the runs
    take about one run's wall time (a GPU call gives this stage ~90 s). Each has its own run folder (root/NAME/run)
    and master port; all train the same synthetic data in bf16. Returns each run's metrics.jsonl records."""
    from toolkit.data.prepare.synthetic import write_synth

    data = root / "data"
    write_synth(str(data), samples=64, val_samples=8, seed=0)
    common = [
        "--config", "tiny", f"backend.device={device}", "backend.precision=bf16",
        f"model.tokenizer={data / 'tokenizer'}", f"data.train_shards={data / 'train'}",
        f"data.val_shards={data / 'val'}", f"train.max_training_steps={STEPS}", "train.eval_interval=3",
    ]  # fmt: skip
    # The CPU check: DeepSpeed's CPU accelerator, no GPU, as in the other multi-rank tests. Either way the runs share
    # the cores: one OpenMP thread each, as torchrun gives each rank of a multi-rank launch.
    env = {**os.environ, **(CPU_ENV if device == "cpu" else {"PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1"})}
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    try:
        for (name, args), port in zip(runs.items(), _distinct_free_ports(len(runs)), strict=True):
            folder = root / name
            folder.mkdir()
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                   f"--master_port={port}", "-m", "toolkit", "train", *common, *args,
                   f"train.run_dir={folder / 'run'}"]  # fmt: skip
            with open(folder / "train.log", "w") as log:  # a file, not a pipe: a full pipe would stall the run
                procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True), folder)  # fmt: skip
        deadline = time.monotonic() + timeout_s
        for name, (proc, folder) in procs.items():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} still training after {timeout_s} s:\n{(folder / 'train.log').read_text()[-4000:]}")
            assert proc.returncode == 0, f"{name} exit {proc.returncode}:\n{(folder / 'train.log').read_text()[-4000:]}"
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:  # torchrun and its worker: each run was started as its own process group
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return {name: [json.loads(ln) for ln in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
            for name, (_, folder) in procs.items()}  # fmt: skip


def _distinct_free_ports(n: int) -> list[int]:
    """n free local ports, all held while they are picked: conftest's free_port() called n times may hand one
    port out twice, and two torchruns on one port would rendezvous with each other."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


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
