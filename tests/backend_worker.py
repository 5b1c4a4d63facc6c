"""2-rank backend checks: launched by tests/test_backends.py under torchrun (gloo, CPU, tiny model).

Starting ranks and importing DeepSpeed cost seconds, so one launch runs every scenario (ddp, ZeRO 0-3, FSDP2,
hybrid FSDP2, frozen groups, activation checkpointing, bf16) on the same global batches and writes, per scenario,
the per-step losses, grad norms, LRs and skip flags to results.json and the final fp32 weights to NAME.pt. The
pytest side runs `single` in-process on the same batches and compares. It also checks exact resume: each fp32
scenario saves after step 4, and a fresh backend loaded from that checkpoint must replay steps 5-9 bit for bit.

The batches are built to be awkward: micro-batches with very different target counts, packed rows
(position_ids restart), a step where rank 1 has no image at all (the ZeRO-3/FSDP hang case), a micro-batch
with an empty pixel tensor, and one step with NaN pixels that every backend must skip.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from conftest import tiny_model_config  # noqa: E402

from toolkit import dist  # noqa: E402
from toolkit.config import Config, ModelConfig  # noqa: E402
from toolkit.data.batch import Batch, ModelInputs  # noqa: E402
from toolkit.model import VisionLanguageModel  # noqa: E402
from toolkit.train.backends import build_backend  # noqa: E402
from toolkit.train.optim import param_groups  # noqa: E402
from toolkit.train.schedule import schedule_from_config  # noqa: E402
from toolkit.train.trainer import Trainer  # noqa: E402

WORLD = 2
MICRO_PER_RANK = 2  # g: accumulation per rank; `single` runs 2g
STEPS = 9  # optimizer steps run; step NAN_STEP is skipped, so 8 updates
MAX_STEPS = 10  # schedule length (warmup 0.2 x 10 = 2 whole steps)
SAVE_AFTER = 4
NAN_AT = (5, 1)  # (step, global micro index): NaN pixels
NO_IMAGE = {(1, 2): "none", (1, 3): "empty", (3, 0): "none"}  # step 1: rank 1 has no image at all
PEAKS = {"lr_mp": 3e-3, "lr_vision_backbone": 1e-3, "lr_language_backbone": 2e-3}
MAX_GRAD_NORM = 1.3  # between the steps' norms (1.22-1.36): some steps clip, some do not
SEED = 0

SCENARIOS: dict[str, dict[str, Any]] = {
    "ddp": {"backend": "ddp", "resume": True},
    "zero0": {"backend": "deepspeed", "ds": "zero0", "resume": True},
    "zero1": {"backend": "deepspeed", "ds": "zero1", "resume": True},
    "zero2": {"backend": "deepspeed", "ds": "zero2", "resume": True},
    "zero3": {"backend": "deepspeed", "ds": "zero3", "resume": True},
    "zero3_offload": {"backend": "deepspeed", "ds": "zero3_offload", "resume": True},
    "fsdp": {"backend": "fsdp", "resume": True},
    "fsdp_hybrid": {"backend": "fsdp", "sharding": "hybrid", "defer": False},
    "ddp_ac_frozen": {"backend": "ddp", "ac": "language", "frozen": True},
    "zero2_frozen": {"backend": "deepspeed", "ds": "zero2", "frozen": True},
    "zero3_ac_frozen": {"backend": "deepspeed", "ds": "zero3", "ac": "all", "frozen": True},
    "fsdp_ac_frozen": {"backend": "fsdp", "ac": "all", "frozen": True},
    "ddp_bf16": {"backend": "ddp", "bf16": True},
    "zero0_bf16": {"backend": "deepspeed", "ds": "zero0", "bf16": True},
    "zero2_bf16": {"backend": "deepspeed", "ds": "zero2", "bf16": True},
    "zero3_bf16": {"backend": "deepspeed", "ds": "zero3", "bf16": True},
    "fsdp_bf16": {"backend": "fsdp", "bf16": True},
}


def make_config(
    backend: str = "single",
    *,
    accumulation: int = MICRO_PER_RANK,
    ds_config: str = "",
    bf16: bool = False,
    ac: str = "none",
    frozen: bool = False,
    sharding: str = "full",
    defer: bool = True,
) -> Config:
    cfg = Config(model=tiny_model_config())
    tc = cfg.train
    tc.batch_size, tc.gradient_accumulation_steps, tc.max_training_steps = 2, accumulation, MAX_STEPS
    tc.warmup_ratio, tc.weight_decay, tc.max_grad_norm, tc.max_bad_steps = 0.2, 0.01, MAX_GRAD_NORM, 3
    for key, value in PEAKS.items():
        setattr(tc, key, value)
    if frozen:
        tc.lr_vision_backbone = 0.0
    tc.activation_checkpointing = ac
    cfg.backend.name, cfg.backend.device = backend, "cpu"
    cfg.backend.precision = "bf16" if bf16 else "fp32"
    cfg.backend.fsdp_sharding, cfg.backend.fsdp_defer_grad_sync = sharding, defer
    if ds_config:
        cfg.backend.ds_config = ds_config
    return cfg.validate()


def synthetic_batch(cfg: ModelConfig, gen: torch.Generator, *, tiles: int, target_frac: float) -> ModelInputs:
    """2 packed rows of 24 tokens; row 0 carries `tiles` images' worth of image tokens in its first sample."""
    rows, seq = 2, 24
    image_token = cfg.lm_base_vocab_size + list(cfg.vlm_extra_tokens).index("image_token")
    ids = torch.randint(0, cfg.lm_base_vocab_size, (rows, seq), generator=gen)
    labels = torch.randint(0, cfg.lm_base_vocab_size, (rows, seq), generator=gen)
    labels[torch.rand(rows, seq, generator=gen) >= target_frac] = -100
    n_image = tiles * cfg.mp_image_token_length
    ids[0, 1 : 1 + n_image] = image_token
    labels[0, 1 : 1 + n_image] = -100
    pos = torch.stack([torch.cat([torch.arange(s), torch.arange(seq - s)]) for s in (seq // 2 + 1, seq // 2 - 3)])
    side = cfg.vit_img_size
    return ModelInputs(ids, labels, pos, torch.rand(tiles, 3, side, side, generator=gen))


def make_batches(cfg: ModelConfig, *, steps: int = STEPS, per_step: int = WORLD * MICRO_PER_RANK) -> list[list[Batch]]:
    """Global micro-batches per step; rank r of `per_step // g` ranks takes indices [r*g, (r+1)*g)."""
    gen = torch.Generator().manual_seed(1234)
    out = []
    for step in range(steps):
        row = []
        for i in range(per_step):
            kind = NO_IMAGE.get((step, i))
            frac = (0.95, 0.08, 0.6, 0.25)[(step + i) % 4]  # very different target counts per micro-batch
            batch = synthetic_batch(cfg, gen, tiles=0 if kind else 1 + (step + i) % 2, target_frac=frac)
            if kind == "none":
                batch.pixel_values = None
            if (step, i) == NAN_AT:
                batch.pixel_values.fill_(float("nan"))
            row.append(Batch.of(batch))
        out.append(row)
    return out


def rank_stream(batches: list[list[Batch]], rank: int, per_rank: int, steps: range) -> list[Batch]:
    return [mb for s in steps for mb in batches[s][rank * per_rank : (rank + 1) * per_rank]]


class Endless(list):
    """Batches that say they never run out, as the toolkit's training loader does: the trainer then reads each
    step's counts with its loss instead of before its forward. The scenarios train their first steps on one, the
    rest on a plain list, so the parity tests check both ways against the single-process run."""

    endless = True


def new_backend(cfg: Config):
    dist.seed_everything(SEED)
    model = VisionLanguageModel(cfg.model)
    backend = build_backend(cfg)
    backend.setup(model, param_groups(model, cfg.train), schedule_from_config(cfg.train))
    return backend


def ds_config_for_test(name: str, tmp: Path) -> str:
    """The shipped ZeRO file; under ZeRO-3 with persistence 0 so even the tiny model's parameters are sharded."""
    raw = json.loads((HERE.parent / "ds_configs" / f"{name}.json").read_text())
    if raw["zero_optimization"]["stage"] == 3:
        raw["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp / f"{name}.rank{dist.get_rank()}.json"  # ranks write at the same time: one file each
    path.write_text(json.dumps(raw))
    return str(path)


def _sum_over_ranks(value: float) -> list[float]:
    t = torch.zeros(WORLD, dtype=torch.float64)
    t[dist.get_rank()] = value
    return dist.all_reduce_sum(t).tolist()


def _leaf_blocks(backend) -> int:
    """How many vision/decoder blocks ZeRO-3 hooks as one unit (none outside ZeRO-3)."""
    if getattr(backend, "stage", None) != 3:
        return 0
    from deepspeed.utils import z3_leaf_module

    return sum(z3_leaf_module(block) for block in backend.module.blocks())


def _frozen_clean(backend) -> bool:
    """Every vision parameter has requires_grad False and no gradient, on every rank."""
    bad = sum(
        1
        for n, p in backend.module.named_parameters()
        if n.startswith("vision_encoder.") and (p.requires_grad or p.grad is not None)
    )
    return _sum_over_ranks(float(bad)) == [0.0] * WORLD


def run_scenario(name: str, spec: dict, batches: list[list[Batch]], out: Path) -> dict:
    saved = os.environ.get("LOCAL_WORLD_SIZE", "")
    if spec.get("sharding") == "hybrid":
        os.environ["LOCAL_WORLD_SIZE"] = "1"  # pretend one rank per node: a 2 x 1 (replicate x shard) mesh
    try:
        return _run_scenario(name, spec, batches, out)
    finally:
        os.environ["LOCAL_WORLD_SIZE"] = saved


def _run_scenario(name: str, spec: dict, batches: list[list[Batch]], out: Path) -> dict:
    rank = dist.get_rank()
    cfg = make_config(
        spec["backend"],
        ds_config=ds_config_for_test(spec["ds"], out) if "ds" in spec else "",
        bf16=spec.get("bf16", False),
        ac=spec.get("ac", "none"),
        frozen=spec.get("frozen", False),
        sharding=spec.get("sharding", "full"),
        defer=spec.get("defer", True),
    )
    started = time.perf_counter()
    backend = new_backend(cfg)
    trainer = Trainer(backend, cfg)
    trainer.fit(Endless(rank_stream(batches, rank, MICRO_PER_RANK, range(SAVE_AFTER))), max_steps=SAVE_AFTER)
    ckpt = out / f"ckpt_{name}"
    if spec.get("resume"):
        backend.save(ckpt, {"trainer": trainer.state_dict()})
    trainer.fit(rank_stream(batches, rank, MICRO_PER_RANK, range(SAVE_AFTER, STEPS)), max_steps=STEPS)
    evaluated = evaluate(backend, rank_stream(batches, rank, MICRO_PER_RANK, range(1, 2)))
    weights = backend.full_state_dict()
    decoder = backend.module.decoder
    result = {
        "tied": decoder.head.weight is decoder.token_embedding.weight,  # still one parameter after wrapping
        "eval": evaluated,
        "losses": [h["loss"] for h in trainer.history],
        "grad_norms": [h["grad_norm"] for h in trainer.history],
        "lrs": [h["lr"] for h in trainer.history],
        "skipped": [h["skipped"] for h in trainer.history],
        # Issue 14: each rank's own forward + backward seconds, gathered here (test side) to check the trainer's
        # imbalance figures, which every rank must report alike.
        "fwd_bwd_by_rank": [_sum_over_ranks(h["fwd_bwd_s"]) for h in trainer.history],
        "forward_by_rank": [_sum_over_ranks(h["forward_s"]) for h in trainer.history],
        "time_imbalance_by_rank": [_sum_over_ranks(h["rank_time_imbalance"]) for h in trainer.history],
        "cost_imbalance_by_rank": [_sum_over_ranks(h["rank_cost_imbalance"]) for h in trainer.history],
        "optimizer_state_numel": _sum_over_ranks(backend.optimizer_state_numel()),
        "fused": all(g["fused"] for g in backend.optimizer.param_groups),  # the AdamW inside every wrapper
        "leaf_blocks": _leaf_blocks(backend),
        "frozen_clean": _frozen_clean(backend) if spec.get("frozen") else None,
        "seconds": time.perf_counter() - started,
    }
    if rank == 0:
        torch.save(weights, out / f"{name}.pt")
    backend.close()
    if spec.get("resume"):
        result["resume"] = check_resume(cfg, ckpt, batches, trainer, weights)
    return result


def evaluate(backend, micro_batches: list[Batch]) -> list[float]:
    """[sum of token losses, targets] over all ranks; step 1's batches leave rank 1 without an image."""
    sums = torch.zeros(2, dtype=torch.float64)
    for mb in micro_batches:
        loss_sum, n_targets = backend.eval_loss(mb)
        sums += torch.tensor([float(loss_sum), float(n_targets)], dtype=torch.float64)
    return dist.all_reduce_sum(sums).tolist()


def check_resume(cfg: Config, ckpt: Path, batches: list[list[Batch]], reference: Trainer, weights: dict | None) -> dict:
    """A fresh backend loaded from the step-4 checkpoint replays steps 5-9: losses and weights must be identical."""
    backend = new_backend(cfg)
    trainer = Trainer(backend, cfg)
    trainer.load_state_dict(backend.load(ckpt)["trainer"])
    trainer.fit(rank_stream(batches, dist.get_rank(), MICRO_PER_RANK, range(SAVE_AFTER, STEPS)), max_steps=STEPS)
    replay = [h["loss"] for h in trainer.history]
    original = [h["loss"] for h in reference.history[SAVE_AFTER:]]
    lrs_equal = [h["lr"] for h in trainer.history] == [h["lr"] for h in reference.history[SAVE_AFTER:]]
    resumed = backend.full_state_dict()
    backend.close()
    weight_diff = None
    if resumed is not None:
        weight_diff = max(float((resumed[k] - weights[k]).abs().max()) for k in weights)
    return {
        "replay": replay,
        "original": original,
        "lrs_equal": lrs_equal,
        "weight_diff": weight_diff,
        "step": trainer.state.step,
    }


def _count_gradient_exchanges(backend) -> list[int]:
    """Count DDP bucket all-reduces (a comm hook) or FSDP2 reduce-scatters (a wrapper) from now on."""
    calls = [0]
    if backend.name == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):  # no annotations: DDP checks them, and this file's are strings
            calls[0] += 1
            return allreduce_hook(None, bucket)

        backend.model.register_comm_hook(None, hook)
    else:
        original = getattr(torch.distributed, FSDP_REDUCE_SCATTER)

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            return original(*args, **kwargs)

        setattr(torch.distributed, FSDP_REDUCE_SCATTER, counted)
    return calls


# FSDP2's gradient reduce-scatter: `reduce_scatter_single` in torch 2.13, `reduce_scatter_tensor` in torch 2.11
# (torch 2.11, the GPU machines' version, has no `reduce_scatter_single`).
FSDP_REDUCE_SCATTER = (
    "reduce_scatter_single" if hasattr(torch.distributed, "reduce_scatter_single") else "reduce_scatter_tensor"
)


def gradient_exchanges(batches: list[list[Batch]]) -> dict[str, list[int]]:
    """Gradient collectives of one optimizer step at accumulation 1 and 2: equal when micro-steps defer sync."""
    original = getattr(torch.distributed, FSDP_REDUCE_SCATTER)
    rank, out = dist.get_rank(), {}
    for name, backend, defer in (("ddp", "ddp", True), ("fsdp", "fsdp", True), ("fsdp_no_defer", "fsdp", False)):
        out[name] = []
        for accumulation in (1, 2):
            cfg = make_config(backend, accumulation=accumulation, defer=defer)
            trainer = Trainer(new_backend(cfg), cfg)
            calls = _count_gradient_exchanges(trainer.backend)
            try:
                trainer.train_step(batches[0][rank * 2 : rank * 2 + accumulation])
            finally:
                setattr(torch.distributed, FSDP_REDUCE_SCATTER, original)
                trainer.backend.close()
            out[name].append(calls[0])
    return out


SLOW_S = 0.2  # seconds rank 1 sleeps in its first decoder block's forward, once per micro-batch


def slow_rank(batches: list[list[Batch]], out_dir: Path) -> dict[str, list[float]]:
    """rank_time_imbalance and each rank's forward_s when rank 1 is slower (a sleep in a block's forward, twice a
    step), per backend: the forward + backward seconds it was taken from read 1.00 under DDP and FSDP2, the fast
    rank waiting out the slow one in the backward's gradient exchange (and under FSDP2/ZeRO-3 at each gather)."""
    rank, out = dist.get_rank(), {}
    for name, backend, ds in (("ddp", "ddp", ""), ("zero2", "deepspeed", "zero2"), ("zero3", "deepspeed", "zero3"),
                              ("fsdp", "fsdp", "")):  # fmt: skip
        cfg = make_config(backend, ds_config=ds_config_for_test(ds, out_dir) if ds else "")
        trainer = Trainer(new_backend(cfg), cfg)
        if rank == 1:
            block = trainer.backend.module.language_blocks()[0]
            forward = block.forward
            block.forward = lambda *a, _f=forward, **k: time.sleep(SLOW_S) or _f(*a, **k)
        for step in range(2):  # the first step's lazy set-up (FSDP2's, DeepSpeed's) is not the rank's work
            metrics = trainer.train_step(rank_stream(batches, rank, MICRO_PER_RANK, range(step, step + 1)))
        out[name] = [metrics["rank_time_imbalance"], *_sum_over_ranks(metrics["forward_s"])]
        trainer.backend.close()
    return out


def local_shard_update(batches: list[list[Batch]], steps: int = 3) -> dict[str, Any]:
    """FSDP2's AdamW update on the local shards (the backend's) against torch's own on the DTensors: `steps` steps
    from the same start; the largest difference of any parameter or AdamW moment shard, and how many compared."""
    rank, shards = dist.get_rank(), {}
    for path in ("dtensor", "local"):
        cfg = make_config("fsdp")
        trainer = Trainer(new_backend(cfg), cfg)
        backend = trainer.backend
        if path == "dtensor":
            backend._update = backend.optimizer.step
        for step in range(steps):
            trainer.train_step(rank_stream(batches, rank, MICRO_PER_RANK, range(step, step + 1)))
        named = dict(backend.module.named_parameters())
        shards[path] = {n: p._local_tensor.clone() for n, p in named.items()}
        shards[path].update({f"{n}.{k}": backend.optimizer.state[p][k]._local_tensor.clone()
                             for n, p in named.items() for k in ("exp_avg", "exp_avg_sq")})  # fmt: skip
        backend.close()
    pairs = [(shards["dtensor"][k], shards["local"][k]) for k in shards["dtensor"]]
    diffs = [float((a - b).abs().max()) for a, b in pairs if a.numel()]  # a rank's shard of a short tensor is empty
    return {"max_diff": max(diffs), "compared": len(diffs)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args()
    out = Path(args.out)
    dist.init_distributed(torch.device("cpu"), timeout_s=180)  # a hang fails within minutes, not the default 30
    batches = make_batches(tiny_model_config())
    results = {}
    for name in args.scenarios.split(","):
        results[name] = run_scenario(name, SCENARIOS[name], batches, out)
        dist.log0("%s done in %.1fs", name, results[name]["seconds"])
    exchanges = gradient_exchanges(batches)
    local_update = local_shard_update(batches)
    slow = slow_rank(batches, out)
    dist.barrier()
    if dist.get_rank() == 0:
        (out / "slow_rank.json").write_text(json.dumps(slow))
        (out / "exchanges.json").write_text(json.dumps(exchanges))
        (out / "local_update.json").write_text(json.dumps(local_update))
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.destroy_distributed()


if __name__ == "__main__":
    main()
