"""`bench pipeline`: samples/s per core from tar shards to packed batches, against nanoVLM's `datasets` path.

Both pipelines start from the same synthetic samples (written into a temporary folder: shapes-VQA by `write_synth`
with the tiny preset, or with `--photos` photo-sized JPEGs with nanovlm-450m's image settings) and end in the same
batch dicts (`collate`), so what differs is exactly what the toolkit changed:

- toolkit: tar shards -> bounded shuffle -> JSON + image header (grid only) -> tokenize -> streaming packer ->
  full image decode + resize/tile at collate time (`build_loader`, `num_workers=0`: one core).
- nanoVLM: a Hugging Face `datasets` table with an `Image` feature (saved to disk and memory-mapped, as the hub
  cache is), shuffled by index; per row `datasets` decodes the PIL image, then resize/tile, tokenize, nanoVLM's
  balanced greedy knapsack (`toolkit.bench.packing.nanovlm_knapsack`) and the same collate.

Per core means one thread: torch is pinned to 1 thread, tokenizers' parallelism is off, and rates are samples per
CPU-second of this process (`time.process_time`), which a busy shared machine does not distort the way it does
wall time; the wall-clock ratio is printed too. Stage costs are measured separately on the same samples (CPU time,
best of a few repeats) and shown as shares of the toolkit's end-to-end CPU time, so the next optimisation is the
biggest share. The two pipelines run in alternating rounds and each reports its median round.
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import tempfile
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from PIL import Image

from toolkit.bench.packing import nanovlm_knapsack
from toolkit.config import Config, load_config
from toolkit.data.collate import Encoded, collate
from toolkit.data.conversation import encode_sample
from toolkit.data.images import process_image, to_rgb
from toolkit.data.packing import Packer
from toolkit.data.shards import DecodeSpec, ShardScan, image_grid, image_members, resolve_shards
from toolkit.data.texts import parse_texts
from toolkit.data.tokenizer import VLMTokenizer, load_tokenizer

Row = dict  # {"texts": [...], "images": [bytes, ...]}: one sample as both pipelines receive it


def make_data(root: Path, *, samples: int, seed: int, photos: bool = False) -> Config:
    """Synthetic shards + tokenizer under `root`, and the config that reads them in one loader process.

    Default: shapes-VQA with the tiny preset (32 px tiles). `photos`: photo-sized JPEGs (640x480 to 1600x1200) with
    nanovlm-450m's image settings (512 px tiles up to 2048 px), where image work dominates; only the decoder's
    vocabulary is the synthetic tokenizer's.
    """
    from toolkit.data.prepare.synthetic import write_synth

    with contextlib.redirect_stderr(io.StringIO()):  # the shard writer's progress bars are noise here
        write_synth(root, samples=1 if photos else samples, val_samples=1, seed=seed)
        if photos:
            write_photos(root / "photos", samples=samples, seed=seed)
    shards = root / ("photos" if photos else "train")
    overrides = [f"data.train_shards={shards}", f"model.tokenizer={root / 'tokenizer'}", "data.num_workers=0"]
    overrides.append(f"data.seed={seed}")
    if not photos:
        return load_config("tiny", overrides)
    tiny = load_config("tiny", overrides).model  # the vocabulary that fits the synthetic tokenizer
    vocab = [f"model.lm_base_vocab_size={tiny.lm_base_vocab_size}", f"model.lm_vocab_size={tiny.lm_vocab_size}"]
    return load_config("nanovlm-450m", [*overrides, *vocab])


PHOTO_SIZES = ((1024, 768), (800, 600), (1280, 960), (640, 480), (1600, 1200), (768, 1024))


def write_photos(out: Path, *, samples: int, seed: int) -> None:
    """`samples` one-image samples: smooth gradients with sensor-like noise, saved as JPEG (quality 90)."""
    import numpy as np

    from toolkit.data.prepare.shard_writer import ListSource, write_shards

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(samples):
        w, h = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * rng.uniform(0.1, 0.3) + yy * rng.uniform(0.1, 0.3)) % 256 for _ in range(3)], -1)
        pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        answer = "It is a photo of a gradient, brighter towards the lower right. " * 3
        rows.append({"images": [{"bytes": buf.getvalue()}], "texts": [{"user": "Describe it.", "assistant": answer}]})
    write_shards(ListSource("photos", rows), out, shard_size="32")


def read_rows(shards: str) -> list[Row]:
    """Every sample of the shards as (texts, encoded image bytes): the tar read stage, and the table's source."""
    rows = []
    for shard in resolve_shards(shards):
        for _, _, files in ShardScan(shard.path):
            rows.append({"texts": parse_texts(files), "images": image_members(files)})
    return rows


def build_table(rows: list[Row], out: Path):
    """The samples as nanoVLM stores them: a `datasets` table with a list-of-Image column, saved and memory-mapped."""
    import datasets

    features = datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "texts": datasets.List({"user": datasets.Value("string"), "assistant": datasets.Value("string")}),
        }
    )
    table = {
        "images": [[{"bytes": b, "path": None} for b in r["images"]] for r in rows],
        "texts": [r["texts"] for r in rows],
    }
    with contextlib.redirect_stderr(io.StringIO()):  # datasets' "Saving the dataset" progress bar
        datasets.Dataset.from_dict(table, features=features).save_to_disk(str(out))
    return datasets.load_from_disk(str(out))


def knapsack_rows(
    samples: Iterable[Encoded], *, capacity: int, max_images: int, buffer_packs: int
) -> Iterator[list[Encoded]]:
    """nanoVLM's knapsack over real samples: it packs (tokens, images) pairs, and samples with equal pairs are
    interchangeable for packing, so each emitted pair takes the oldest pending sample of that shape."""
    pending: dict[tuple[int, int], deque[Encoded]] = defaultdict(deque)

    def keys() -> Iterator[tuple[int, int]]:
        for s in samples:
            key = (len(s.input_ids), s.images)
            pending[key].append(s)
            yield key

    for pack in nanovlm_knapsack(keys(), capacity=capacity, max_images=max_images, buffer_packs=buffer_packs):
        yield [pending[key].popleft() for key in pack]


def batched(rows: Iterable[list[Encoded]], *, cfg: Config, pad_id: int) -> Iterator[dict]:
    """Rows -> batches of train.batch_size rows through the toolkit's own collate (both pipelines end here)."""
    size, group = cfg.train.batch_size, []
    for row in rows:
        group.append(row)
        if len(group) == size:
            yield collate(group, capacity=cfg.model.lm_max_length, pad_id=pad_id, tile=cfg.model.vit_img_size)
            group = []
    if group:
        yield collate(group, capacity=cfg.model.lm_max_length, pad_id=pad_id, tile=cfg.model.vit_img_size)


def encode_row(texts: list[dict], images: list[Image.Image], tok: VLMTokenizer, spec: DecodeSpec) -> Encoded | None:
    """nanoVLM's per-row work on decoded images: resize/tile, image string + chat template + ids; None if too long."""
    tiles, grids = [], []
    for img in images:
        t, grid = process_image(img, tile=spec.tile, max_side=spec.max_side, resize_to_max=spec.resize_to_max)
        tiles.append(t)
        grids.append(grid)
    input_ids, labels = encode_sample(tok, texts, grids, spec.tokens_per_tile)
    if len(input_ids) > spec.max_length:
        return None
    pixels = torch.cat(tiles) if tiles else torch.empty(0, 3, spec.tile, spec.tile)
    return Encoded(input_ids, labels, pixels, images=len(images))


def nanovlm_pass(table, cfg: Config, tok: VLMTokenizer) -> int:
    """One epoch the nanoVLM way; returns the samples that reached a batch."""
    spec = DecodeSpec.from_config(cfg)

    def encoded() -> Iterator[Encoded]:
        for i in range(len(table)):
            row = table[i]  # datasets decodes the images to PIL here
            sample = encode_row(row["texts"], row["images"], tok, spec)
            if sample is not None:
                yield sample

    return sum(b.stats.samples for b in batched(_knapsack(encoded(), cfg), cfg=cfg, pad_id=tok.pad_token_id))


def toolkit_pass(cfg: Config, tok: VLMTokenizer) -> int:
    """One epoch through the toolkit's loader (no worker processes); returns the samples that reached a batch."""
    from toolkit.data.loader import build_loader

    loader = build_loader(cfg, rank=0, world=1, tokenizer=tok, finite=True)
    return sum(batch.stats.samples for batch in loader)


def cpu_seconds(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(CPU seconds of this process, wall seconds, result) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return time.process_time() - cpu, time.perf_counter() - wall, result


def best_cpu(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Least CPU seconds over `repeats` calls (noise only ever adds time) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        cpu, _, result = cpu_seconds(fn)
        best = min(best, cpu)
    return best, result


def stage_costs(cfg: Config, tok: VLMTokenizer, table, *, repeats: int) -> dict[str, float]:
    """CPU seconds of each stage over the same samples, each stage fed the previous stage's output."""
    spec = DecodeSpec.from_config(cfg)
    cost: dict[str, float] = {}
    cost["tar read + JSON"], rows = best_cpu(lambda: read_rows(cfg.data.train_shards), repeats)
    images = [b for r in rows for b in r["images"]]
    cost["image header probe"], _ = best_cpu(lambda: [image_grid(b, spec) for b in images], repeats)
    cost["image decode"], decoded = best_cpu(lambda: [_decode(b) for b in images], repeats)
    # Timed dropping each image's tiles as they are made, as the loader streams them: holding every photo's
    # tiles (GBs of fresh pages, twice over between repeats) charged this stage page faults the loader never pays.
    cost["resize/tile"], _ = best_cpu(lambda: [_tile(img, spec)[1] for img in decoded], repeats)
    tiled = [_tile(img, spec) for img in decoded]
    per_row = _regroup(tiled, [len(r["images"]) for r in rows])  # [[(tiles, grid), ...] per sample]
    cost["tokenize"], ids = best_cpu(lambda: _tokenize(rows, per_row, tok, spec), repeats)
    two_pass = tok.two_pass()
    cost["tokenize (two passes)"], slow_ids = best_cpu(lambda: _tokenize(rows, per_row, two_pass, spec), repeats)
    if slow_ids != ids:
        raise RuntimeError("one-pass and two-pass tokenization disagree on this data; the one-pass check is wrong")
    samples = [
        Encoded(input_ids, labels, torch.cat([t for t, _ in row_tiles]), images=len(row_tiles))
        for (input_ids, labels), row_tiles in zip(ids, per_row)
    ]
    cost["pack + collate"], _ = best_cpu(
        lambda: _drain(batched(_toolkit_rows(samples, cfg), cfg=cfg, pad_id=0)), repeats
    )
    cost["knapsack + collate"], _ = best_cpu(
        lambda: _drain(batched(_knapsack(samples, cfg), cfg=cfg, pad_id=0)), repeats
    )
    cost["datasets row + PIL decode"], _ = best_cpu(lambda: [table[i] for i in range(len(table))], repeats)
    return cost


def _tile(img: Image.Image, spec: DecodeSpec) -> tuple[torch.Tensor, tuple[int, int]]:
    return process_image(img, tile=spec.tile, max_side=spec.max_side, resize_to_max=spec.resize_to_max)


def _regroup(flat: list, sizes: list[int]) -> list[list]:
    out, at = [], 0
    for n in sizes:
        out.append(flat[at : at + n])
        at += n
    return out


def _tokenize(rows: list[Row], per_row: list[list], tok: VLMTokenizer, spec: DecodeSpec) -> list[tuple[list, list]]:
    return [
        encode_sample(tok, r["texts"], [g for _, g in row_tiles], spec.tokens_per_tile)
        for r, row_tiles in zip(rows, per_row)
    ]


def _knapsack(samples: Iterable[Encoded], cfg: Config) -> Iterator[list[Encoded]]:
    d = cfg.data
    return knapsack_rows(
        samples, capacity=cfg.model.lm_max_length, max_images=d.max_images_per_knapsack, buffer_packs=d.buffer_packs
    )


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return to_rgb(img)


def _drain(it: Iterable) -> int:
    return sum(1 for _ in it)


def _toolkit_rows(samples: list[Encoded], cfg: Config) -> Iterator[list[Encoded]]:
    d = cfg.data
    packer: Packer[Encoded] = Packer(
        length=lambda s: len(s.input_ids),
        images=lambda s: s.images,
        capacity=cfg.model.lm_max_length,
        max_images=d.max_images_per_knapsack,
        buffer_packs=d.buffer_packs,
    )
    for s in samples:
        yield from packer.add(s)
    yield from packer.flush()


TOOLKIT_STAGES = ("tar read + JSON", "image header probe", "image decode", "resize/tile", "tokenize", "pack + collate")
NANOVLM_STAGES = ("datasets row + PIL decode", "resize/tile", "tokenize (two passes)", "knapsack + collate")


def interleaved(cfg: Config, tok: VLMTokenizer, table, rounds: int) -> dict[str, dict[str, float]]:
    """Alternate whole passes of the two pipelines (after an untimed one each): median CPU and wall seconds, samples.

    The nanoVLM pass tokenizes as nanoVLM does (`tok.two_pass()`); the toolkit's loader, one pass per turn.
    """
    two_pass = tok.two_pass()
    passes = {"toolkit": lambda: toolkit_pass(cfg, tok), "nanovlm": lambda: nanovlm_pass(table, cfg, two_pass)}
    runs: dict[str, list[tuple[float, float, object]]] = {name: [] for name in passes}
    for fn in passes.values():  # warm-up, not timed: page cache, tokenizer and datasets' first-access costs
        fn()
    for _ in range(rounds):
        for name, fn in passes.items():
            runs[name].append(cpu_seconds(fn))
    counts = {n for r in runs.values() for _, _, n in r}
    if len(counts) != 1:
        raise RuntimeError(
            f"the pipelines delivered different sample counts {sorted(counts)}; they must see the same data"
        )
    return {
        name: {
            "cpu": statistics.median(c for c, _, _ in r),
            "wall": statistics.median(w for _, w, _ in r),
            "samples": int(r[0][2]),
        }
        for name, r in runs.items()
    }


def table_rows(timed: dict[str, dict[str, float]], stages: dict[str, float]) -> list[dict]:
    """One end-to-end row per pipeline, then its stages as shares of its end-to-end CPU time (rest = 'other')."""
    rows = []
    for name, names in (("toolkit", TOOLKIT_STAGES), ("nanovlm", NANOVLM_STAGES)):
        total, n = timed[name]["cpu"], timed[name]["samples"]
        rows.append(
            {"pipeline": name, "stage": "end to end", "samples_per_s": n / total, "us_per_sample": 1e6 * total / n}
        )
        rows[-1]["share"] = 1.0
        for stage in names:
            rows.append(_stage_row(name, stage, stages[stage], total, n))
        rows.append(_stage_row(name, "other (loop, buffers, copies)", total - sum(stages[s] for s in names), total, n))
    return rows


def _stage_row(pipeline: str, stage: str, seconds: float, total: float, n: int) -> dict:
    return {
        "pipeline": pipeline,
        "stage": stage,
        "samples_per_s": "-",
        "us_per_sample": 1e6 * seconds / n,
        "share": seconds / total,
    }


def run(samples: int | None = None, rounds: int = 3, repeats: int = 2, seed: int = 0, photos: bool = False) -> dict:
    """Write synthetic samples (3000; 120 `photos`), time both pipelines in alternating rounds, then the stages."""
    samples = samples or (120 if photos else 3000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
            cfg = make_data(Path(tmp) / "synth", samples=samples, seed=seed, photos=photos)
            tok = load_tokenizer(cfg.model)
            table = build_table(read_rows(cfg.data.train_shards), Path(tmp) / "table").shuffle(seed=seed)
            timed = interleaved(cfg, tok, table, rounds)
            stages = stage_costs(cfg, tok, table, repeats=repeats)
    finally:
        torch.set_num_threads(threads)
    ours, base = timed["toolkit"], timed["nanovlm"]
    biggest = max(TOOLKIT_STAGES, key=stages.__getitem__)
    return {
        "name": "pipeline",
        "rows": table_rows(timed, stages),
        "headline": {
            "samples_per_s_per_core": ours["samples"] / ours["cpu"],
            "nanovlm_samples_per_s_per_core": base["samples"] / base["cpu"],
            "ratio": base["cpu"] / ours["cpu"],
            "ratio_wall": base["wall"] / ours["wall"],
            "largest_stage": f"{biggest} ({stages[biggest] / ours['cpu']:.0%} of the toolkit's time)",
        },
        "config": {
            "samples": samples,
            "rounds": rounds,
            "repeats": repeats,
            "seed": seed,
            "data": "photo-sized JPEGs, nanovlm-450m image settings" if photos else "shapes-VQA, tiny preset",
        },
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m toolkit bench pipeline [--photos] [--samples N]`."""
    import argparse

    from toolkit.bench import run as run_bench

    p = argparse.ArgumentParser(prog="python -m toolkit bench pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--photos", action="store_true", help="photo-sized JPEGs with nanovlm-450m's image settings")
    p.add_argument("--samples", type=int, default=None, help="samples to write (default 3000; 120 with --photos)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    label = "pipeline_photos" if a.photos else "pipeline"  # its own JSON beside the default run's
    run_bench("pipeline", as_json=a.json, label=label, samples=a.samples, photos=a.photos)
    return 0
