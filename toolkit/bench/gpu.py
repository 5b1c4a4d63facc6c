"""`bench gpu`: tokens/s, MFU and peak memory of nanovlm-450m on one GPU under each backend, vs a plain loop.

The model has random weights (speed does not depend on their values) and trains on synthetic packs of
`model.lm_max_length` (4096) tokens: samples of 0-2 images of 1-17 tiles of 64 tokens each plus ~200 text tokens,
packed by the toolkit's own packer (>99% full), with random pixels. Every variant sees the same few batches in the
same order; warm-up steps (compilation, allocator growth, the first recompile on a new tile count) are not timed.

Per variant: real (non-padding) tokens/s; MFU = (vision + projector + language FLOPs of the step, as
`toolkit.train.metrics.step_flops` counts them, excluding recomputation) / (step time x the device's bf16 peak,
989 TFLOP/s on an H100/H200); and the peak memory the variant allocated on top of what was allocated before it
started. The baseline is a plain PyTorch loop of the same model and batches (autocast bf16 over fp32 weights,
AdamW, clipping, LambdaLR). Variants: the `single`, DDP, ZeRO-1, ZeRO-2, ZeRO-3 and FSDP2 backends at world size
1, each with and without activation checkpointing (the preset's `language` setting) and torch.compile, ordered so
that a time budget cuts the most expensive (compiled) ones first; a variant that does not fit the budget, or fails
(an out-of-memory error, say), becomes a row that says so and the rest still run. `--largest-batch VARIANTS` adds,
for each, the largest micro-batch that trains with the chunked loss and with the dense one (largest_batch.py).

Without CUDA the benchmark prints one "skipped: needs CUDA" row. `device="cpu"` with a tiny config runs every code
path on the CPU; that is what the tests do, and it says nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolkit.bench.largest_batch import LOSSES, search_rows
from toolkit.config import Config, load_config
from toolkit.data.batch import Batch, BatchStats, ModelInputs
from toolkit.errors import UserError

log = logging.getLogger(__name__)


BACKENDS = ("single", "ddp", "zero1", "zero2", "zero3", "fsdp")


@dataclass(frozen=True)
class Variant:
    backend: str  # plain (the baseline loop), or one of BACKENDS
    checkpointing: str = "none"  # train.activation_checkpointing
    compile: bool = False

    @property
    def label(self) -> str:
        extras = [f"ac={self.checkpointing}"] if self.checkpointing != "none" else []
        return " ".join([self.backend, *extras, *(["compile"] if self.compile else [])])


def default_variants(checkpointing: str = "language") -> list[Variant]:
    """The baseline, then every backend eager, then with checkpointing, compiled, and both: cheapest first."""
    out = [Variant("plain")]
    for ac, compiled in (("none", False), (checkpointing, False), ("none", True), (checkpointing, True)):
        out += [Variant(b, ac, compiled) for b in BACKENDS]
    return out


def parse_variants(text: str, checkpointing: str = "language") -> list[Variant]:
    """'plain,single,zero3+ac,fsdp+ac+compile' -> variants; `+ac` sets train.activation_checkpointing=checkpointing."""
    out = []
    for label in filter(None, (t.strip() for t in text.split(","))):
        backend, *flags = label.split("+")
        if backend not in ("plain", *BACKENDS) or set(flags) - {"ac", "compile"}:
            raise ValueError(
                f"variant {label!r}: expected BACKEND[+ac][+compile], BACKEND one of plain, {', '.join(BACKENDS)}"
            )
        out.append(Variant(backend, checkpointing if "ac" in flags else "none", "compile" in flags))
    return out


def bench_config(preset: str, variant: Variant, *, batch_size: int | None, device: str, overrides: list[str]) -> Config:
    """The preset with this variant's backend, checkpointing and compile; bf16, world size 1, no accumulation."""
    backend = {
        "plain": ["backend.name=single"],
        "single": ["backend.name=single"],
        "ddp": ["backend.name=ddp"],
        "fsdp": ["backend.name=fsdp"],
    }.get(variant.backend, ["backend.name=deepspeed", f"backend.ds_config=ds_configs/{variant.backend}.json"])
    settings = [
        *backend,
        "backend.precision=bf16",
        f"backend.device={device}",
        "train.gradient_accumulation_steps=1",
        f"train.activation_checkpointing={variant.checkpointing}",
        f"train.compile={variant.compile}",
    ]
    if batch_size is not None:
        settings.append(f"train.batch_size={batch_size}")
    return load_config(preset, [*settings, *overrides])


def synthetic_samples(n: int, seed: int, *, max_tokens: int, tokens_per_tile: int) -> list[tuple[int, int, int]]:
    """(tiles, text tokens, images) per sample: mostly one image of 1-17 tiles, some none or two, ~200 text tokens."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        images = rng.choices((0, 1, 2), weights=(5, 85, 10))[0]
        tiles = sum(rng.randint(1, 17) for _ in range(images))
        text = min(max(int(rng.lognormvariate(5.2, 0.5)), 16), 1500)
        if tiles * tokens_per_tile + text <= max_tokens:
            out.append((tiles, text, images))
    return out


def synthetic_batches(cfg: Config, n_batches: int, *, seed: int, device: torch.device) -> list[dict[str, Any]]:
    """`n_batches` batches of train.batch_size full packs each, on `device`, with their real tokens and FLOPs."""
    from toolkit.data.packing import pack_stream

    m, rows_per_batch = cfg.model, cfg.train.batch_size
    tpt = m.mp_image_token_length
    wanted = n_batches * rows_per_batch
    samples = synthetic_samples(
        (wanted + 2 * cfg.data.buffer_packs) * 16, seed, max_tokens=m.lm_max_length, tokens_per_tile=tpt
    )
    packs = pack_stream(
        samples,
        length=lambda s: s[0] * tpt + s[1],
        images=lambda s: s[2],
        capacity=m.lm_max_length,
        max_images=cfg.data.max_images_per_knapsack,
        buffer_packs=cfg.data.buffer_packs,
    )
    rows = [row for row, _ in zip(packs, range(wanted))]  # the first packs: built from a full buffer
    gen = torch.Generator().manual_seed(seed)
    return [make_batch(cfg, rows[i : i + rows_per_batch], gen, device) for i in range(0, wanted, rows_per_batch)]


def make_batch(
    cfg: Config, rows: list[list[tuple[int, int, int]]], gen: torch.Generator, device: torch.device
) -> Batch:
    """Packed rows -> the batch contract: each sample is a start token, its image tokens, then text with targets."""
    m = cfg.model
    seq, tpt = m.lm_max_length, m.mp_image_token_length
    image_id = m.lm_base_vocab_size + list(m.vlm_extra_tokens).index("image_token")
    ids = torch.randint(0, m.lm_base_vocab_size, (len(rows), seq), generator=gen)  # (B, S)
    labels = torch.full((len(rows), seq), -100, dtype=torch.long)  # (B, S)
    position_ids = torch.zeros((len(rows), seq), dtype=torch.long)  # (B, S)
    tiles, lengths = 0, []
    for r, row in enumerate(rows):
        at = 0
        for n_tiles, text, _ in row:
            length, image_end = n_tiles * tpt + text, at + 1 + n_tiles * tpt
            ids[r, at + 1 : image_end] = image_id
            labels[r, image_end : at + length - 1] = ids[r, image_end + 1 : at + length]
            position_ids[r, at : at + length] = torch.arange(length)
            at, tiles = at + length, tiles + n_tiles
            lengths.append(length)
        position_ids[r, at:] = torch.arange(seq - at)  # the padding tail: a segment of its own
    side = m.vit_img_size
    pixels = torch.rand(tiles, 3, side, side, generator=gen)  # (N, 3, H, W)
    inputs = ModelInputs(ids, labels, position_ids, pixels).with_indices(image_id).to(device)
    stats = BatchStats(
        rows=len(rows),
        samples=len(lengths),
        images=sum(1 for row in rows for n_tiles, _, _ in row if n_tiles),
        tiles=tiles,
        tokens=sum(lengths),
        targets=int((labels != -100).sum()),
        sample_lengths=lengths,
    )
    return Batch(inputs, stats)


def batch_flops(cfg: Config, batch: Batch) -> float:
    """Model FLOPs of one training step on `batch` (vision tiles + decoder tokens and attention)."""
    from toolkit.train.metrics import step_flops

    lengths = batch.stats.sample_lengths
    sum_sq = float(sum(n * n for n in lengths))
    return step_flops(cfg.model, n_tokens=batch.stats.tokens, sum_sq_lengths=sum_sq, n_tiles=batch.stats.tiles)


def make_step(variant: Variant, cfg: Config, device: torch.device, seed: int) -> tuple[Callable[[Batch], float], Any]:
    """A step function for the variant and what to close afterwards: the plain loop or backend + Trainer."""
    from toolkit.bench.overhead import new_model, plain_step
    from toolkit.train.backends import build_backend
    from toolkit.train.optim import param_groups
    from toolkit.train.schedule import schedule_from_config
    from toolkit.train.trainer import Trainer

    if variant.backend == "plain":
        step, _ = plain_step(cfg, seed, device)
        return step, None
    model = new_model(cfg, seed, device)
    backend = build_backend(cfg, device=device)
    backend.setup(model, param_groups(model, cfg.train), schedule_from_config(cfg.train))
    trainer = Trainer(backend, cfg)
    return (lambda batch: trainer.train_step([batch])["loss"]), backend


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(
    variant: Variant,
    cfg: Config,
    batches: list[Batch],
    *,
    steps: int,
    warmup: int,
    device: torch.device,
    seed: int,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    """Warm up, then time `steps` steps; real tokens/s, FLOP/s and the peak memory this variant added.

    With `profile_to`, two more steps run under torch.profiler afterwards (outside the timing) and the kernels
    that took the most device time are written there: where the next speed-up is.
    """
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    step, backend = make_step(variant, cfg, device, seed)
    try:
        for i in range(warmup):
            step(batches[i % len(batches)])
        sync_device(device)
        timed = [batches[(warmup + i) % len(batches)] for i in range(steps)]
        start = time.perf_counter()
        for batch in timed:
            loss = step(batch)
        sync_device(device)
        elapsed = time.perf_counter() - start
        if profile_to is not None:
            _profile(step, timed[:2], device, profile_to)
    finally:
        if backend is not None:
            backend.close()
    peak = torch.cuda.max_memory_allocated(device) - before if cuda else None
    return {
        "step_s": elapsed / steps,
        "tokens_per_s": sum(b.stats.tokens for b in timed) / elapsed,
        "flops_per_s": sum(batch_flops(cfg, b) for b in timed) / elapsed,
        "peak_GB": peak / 1e9 if peak is not None else "-",
        "last_loss": loss,
    }


def _profile(step: Callable[[Batch], float], batches: list[Batch], device: torch.device, path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for batch in batches:
            step(batch)
        sync_device(device)
    # By device time: which kernels to speed up. Then by host time: a step whose GPU waits on Python (hooks,
    # DTensor dispatch, per-tensor loops) shows it here, not in the kernels.
    sorts = (["self_cuda_time_total"] if device.type == "cuda" else []) + ["self_cpu_time_total"]
    events = prof.key_averages()
    tables = [f"sorted by {s}:\n" + events.table(sort_by=s, row_limit=40, max_name_column_width=70) for s in sorts]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(tables))


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(
    *,
    device: str | None = None,
    preset: str = "nanovlm-450m",
    steps: int = 10,
    warmup: int = 3,
    budget_s: float = 300.0,
    batch_size: int | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    variants: list[Variant] | None = None,
    n_batches: int = 2,
    seed: int = 0,
    peak_flops: float | None = None,
    profile: list[Variant] | tuple[Variant, ...] = (),
    profile_dir: str | Path = "runs/bench",
    calibrate: str | Path | None = None,
    largest_batch: list[Variant] | tuple[Variant, ...] = (),
    largest_limit: int = 32,
) -> dict:
    """Every variant on one device within `budget_s` seconds; `device=None` means CUDA, or skip without it.

    Variants in `profile` also write their top kernels to `profile_dir`/gpu_profile_LABEL.txt; for each variant in
    `largest_batch`, two more rows give the largest micro-batch (up to `largest_limit` rows) that trains with the
    chunked and with the dense loss, within the same budget. With `calibrate`,
    only the `single` backend runs: seconds per tile and per token are measured and written to that file
    (toolkit/bench/calibrate.py) for `data.cost_calibration`.
    """
    if steps < 1 or warmup < 0 or n_batches < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0 and n_batches >= 1, got {steps}, {warmup}, {n_batches}")
    if device is None and not torch.cuda.is_available():
        if calibrate:  # exit 0 without the file: the run that reads it was refused later, far from the cause
            raise UserError(f"bench gpu --calibrate needs CUDA (no GPU visible to torch); {calibrate} not written")
        row = {"variant": "-", "status": "skipped: needs CUDA (no GPU visible to torch)"}
        return {"name": "gpu", "rows": [row], "headline": {"skipped": "needs CUDA"}, "config": {"preset": preset}}
    from toolkit import dist
    from toolkit.train.metrics import device_peak_flops

    dev = torch.device(device or "cuda")
    if dev.type == "cuda" and dev.index is None:  # torch.cuda.set_device (in init_distributed) needs an index
        dev = torch.device("cuda", torch.cuda.current_device())
    own_group = not dist.is_distributed()
    dist.init_distributed(dev, dist.DistEnv())  # world size 1: ZeRO and FSDP2 still need a process group
    settings = {"batch_size": batch_size, "device": dev.type, "overrides": list(overrides)}
    try:
        if calibrate:
            from toolkit.bench import calibrate as calibration

            cfg = bench_config(preset, Variant("single"), **settings)
            result = calibration.run(cfg, dev, calibrate, seed=seed, warmup=warmup, repeats=steps)
            result["config"] = {"preset": preset, "warmup": warmup, "repeats": steps, **settings}
            return result
        plain_cfg = bench_config(preset, Variant("plain"), **settings)
        batches = synthetic_batches(plain_cfg, n_batches, seed=seed, device=dev)
        peak = peak_flops or device_peak_flops(dev)  # None (no MFU) for a device whose peak is unknown
        kw = {"steps": steps, "warmup": warmup, "device": dev, "seed": seed, "peak": peak}
        jobs: list[tuple[str, Callable[[], dict[str, Any]]]] = []
        for v in variants or default_variants():
            to = Path(profile_dir) / f"gpu_profile_{v.label.replace(' ', '_')}.txt" if v in profile else None
            cfg = bench_config(preset, v, **settings)
            jobs.append((v.label, functools.partial(_measure, v, cfg, batches, profile_to=to, **kw)))
        for v in largest_batch:
            for loss in LOSSES:
                job = functools.partial(
                    _largest_row, v, loss, preset, settings, dev, limit=largest_limit, seed=seed, peak=peak
                )
                jobs.append((f"{v.label}, {loss} loss", job))
        with _recompile_headroom():
            rows = _run_jobs(jobs, budget_s, dev)
    finally:
        if own_group:
            dist.destroy_distributed()
    config = {"preset": preset, "steps": steps, "warmup": warmup, "budget_s": budget_s, "n_batches": n_batches}
    config.update(batch_size=plain_cfg.train.batch_size, seq=plain_cfg.model.lm_max_length, peak_flops=peak)
    return {"name": "gpu", "rows": _relative(rows), "headline": _headline(rows), "config": config}


def _recompile_headroom() -> contextlib.AbstractContextManager:
    """Dynamo's per-function recompile limit raised for the bench's duration.

    Every variant compiles the same two block forwards in this one process, and each backend adds its own cache
    entries for them (a wrapped class, other parameter dtypes, dynamic shapes). At the default limit of 8 a later
    variant could silently fall back to eager blocks, and its row would measure that instead.
    """
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    return dynamo_config.patch(**{name: max(getattr(dynamo_config, name), RECOMPILE_LIMIT)})


RECOMPILE_LIMIT = 64


def _run_jobs(jobs: list[tuple[str, Callable[[], dict[str, Any]]]], budget_s: float, dev: torch.device) -> list[dict]:
    """Each job's row in turn; once `budget_s` has passed, the rest are rows that say they were skipped."""
    rows, started = [], time.perf_counter()
    held = _allocated_gb(dev)
    for label, job in jobs:
        if time.perf_counter() - started > budget_s:
            rows.append({"variant": label, "status": f"skipped: time budget ({budget_s:.0f} s)"})
            continue
        rows.append(job())
        _release(dev)
        log.info("bench gpu: %s", {k: v for k, v in rows[-1].items() if k != "last_loss"})  # survives a kill
        now = _allocated_gb(dev)
        if now > held + LEFT_BEHIND_GB:
            log.warning(
                "bench gpu: %.1f GB stay allocated after %s (a model it did not free): every later row, the largest "
                "micro-batch searches included, has that much less memory",
                now - held,
                label,
            )
            held = now
    return rows


LEFT_BEHIND_GB = 0.5  # more than this still allocated after a variant is worth a warning


def _allocated_gb(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def _measure(variant: Variant, cfg: Config, batches: list[Batch], *, peak: float | None, **kw: Any) -> dict[str, Any]:
    """One table row; a failure (out of memory, a compile error) is reported in the row, not raised."""
    row: dict[str, Any] = {"variant": variant.label, "status": "ok"}
    try:
        result = time_variant(variant, cfg, batches, **kw)
    except Exception as exc:  # one broken variant must not hide the others' figures
        return _failed(variant.label, exc)
    row.update(result)
    row["mfu"] = _mfu(result, peak)
    return row


def _mfu(result: dict[str, Any], peak: float | None) -> float | str:
    """A timed step's model FLOPs utilisation, or "-" on a device whose peak is unknown."""
    return result["flops_per_s"] / peak if peak else "-"


def _failed(label: str, exc: Exception) -> dict[str, Any]:
    """A row for a variant or search that raised (out of memory, a compile error): logged, and its first line."""
    log.exception("bench gpu: %s failed", label)
    return {
        "variant": label,
        "status": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}",
    }


def _largest_row(
    variant: Variant,
    loss: str,
    preset: str,
    settings: dict[str, Any],
    dev: torch.device,
    *,
    limit: int,
    seed: int,
    peak: float | None,
) -> dict[str, Any]:
    """The largest micro-batch of `variant` with the chunked or dense loss, and its timed step's figures."""

    def measure(rows: int) -> dict[str, Any]:
        cfg = bench_config(
            preset, variant, **{**settings, "batch_size": rows, "overrides": [*settings["overrides"], LOSSES[loss]]}
        )
        batches = synthetic_batches(cfg, 1, seed=seed, device=dev)  # one batch on the device, as in training
        result = time_variant(variant, cfg, batches, steps=1, warmup=1, device=dev, seed=seed)
        return {**result, "mfu": _mfu(result, peak)}

    label = f"{variant.label}, {loss} loss"
    try:
        return search_rows(label, measure, limit=limit, release=lambda: _release(dev))
    except Exception as exc:  # as in _measure: a broken search must not hide the other rows
        return _failed(label, exc)


COLUMNS = ("variant", "status", "batch_rows", "step_s", "tokens_per_s", "mfu", "peak_GB", "vs_plain", "last_loss")


def _relative(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with every column (for the table) and tokens/s relative to the plain loop's."""
    plain = next((r["tokens_per_s"] for r in rows if r["variant"] == "plain" and r["status"] == "ok"), None)
    out = []
    for r in rows:
        full = {c: r.get(c, "-") for c in COLUMNS}
        if plain and r["status"] == "ok":
            full["vs_plain"] = r["tokens_per_s"] / plain
        out.append(full)
    return out


def _headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == "ok"]
    largest = {r["variant"]: r["batch_rows"] for r in rows if r.get("batch_rows") is not None}
    if not ok and not largest:
        return {"error": "no variant ran"}
    plain = next((r for r in ok if r["variant"] == "plain"), None)
    best = max((r for r in ok if r["variant"] != "plain"), key=lambda r: r["tokens_per_s"], default=None)
    head: dict[str, Any] = {"largest_batch_rows": largest} if largest else {}
    if plain:
        head.update(plain_tokens_per_s=plain["tokens_per_s"], plain_mfu=plain["mfu"])
    if best:
        head.update(best=best["variant"], best_tokens_per_s=best["tokens_per_s"], best_mfu=best["mfu"])
        if plain:
            head["best_vs_plain"] = best["tokens_per_s"] / plain["tokens_per_s"]
    return head


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    """`python -m toolkit.bench.gpu [--steps N] [--budget-s S] ...`: the knobs `bench gpu` keeps at their defaults."""
    from toolkit.bench import run as run_bench

    p = argparse.ArgumentParser(prog="python -m toolkit bench gpu", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--steps", type=_at_least(1), default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=_at_least(0), default=3, help="untimed steps per variant (compiling)")
    p.add_argument("--budget-s", type=float, default=300.0, help="start no new variant after this many seconds")
    p.add_argument("--batch-size", type=int, default=None, help="packs per step (default: the preset's)")
    p.add_argument("--preset", default="nanovlm-450m")
    p.add_argument("--device", default=None, help="default: cuda, or skip without it; cpu runs the code paths only")
    p.add_argument("--variants", default="", help="e.g. plain,single,zero3+ac,fsdp+compile (default: all 25)")
    p.add_argument(
        "--largest-batch",
        default="",
        help="variants (as in --variants) whose largest micro-batch to find, chunked loss against dense",
    )
    p.add_argument("--largest-limit", type=int, default=32, help="--largest-batch: try at most this many rows")
    p.add_argument("--profile", default="", help="variants (as in --variants) whose top kernels to write out")
    p.add_argument(
        "--peak-flops", type=float, default=None, help="bf16 FLOP/s of one device, if torch's name is unknown"
    )
    p.add_argument(
        "--calibrate",
        default=None,
        metavar="FILE",
        help="instead of the variants: time seconds per tile and per token (single backend; --steps = repeats per "
        "point) and write them to FILE for data.cost_calibration",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="section.field=value applied to every variant")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    kw = {"steps": a.steps, "warmup": a.warmup, "budget_s": a.budget_s, "batch_size": a.batch_size}
    kw["peak_flops"] = a.peak_flops
    try:  # one line each, not a traceback
        kw["variants"] = parse_variants(a.variants) if a.variants else None
        kw["profile"] = parse_variants(a.profile)
        kw["largest_batch"], kw["largest_limit"] = parse_variants(a.largest_batch), a.largest_limit
        if a.device is not None:
            torch.device(a.device)
    except (ValueError, RuntimeError) as exc:
        p.error(str(exc))
    if a.calibrate:
        kw = {"warmup": a.warmup, "steps": a.steps, "batch_size": a.batch_size, "calibrate": a.calibrate}
    run_bench(
        "gpu",
        label="gpu_calibration" if a.calibrate else "",
        as_json=a.json,
        preset=a.preset,
        device=a.device,
        overrides=a.overrides,
        **kw,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
