"""`bench shard-data`: samples/s per core of shard-data, 1 and 2 writer processes, against webdataset's ShardWriter.

Both sides write the same samples (one 512 x 384 JPEG and a two-turn conversation each) into tar shards of 100
samples, alternating runs in one process. The baseline only copies bytes into tars; shard-data also decodes
every image once (so a broken image is found while converting, not mid-run), validates the texts, and writes
atomically with a progress record per shard: the ratio says what that safety costs. Scaling is the 2-worker
speed over the 1-worker speed; on a machine with 2 cores the second worker shares them with the parent.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def make_rows(samples: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(samples):
        pixels = rng.integers(0, 256, (384, 512, 3), dtype=np.uint8) // 4 + np.uint8(i % 64)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=85)
        texts = [{"user": f"What is in image {i}?", "assistant": "Noise."}, {"user": "Sure?", "assistant": "Yes."}]
        rows.append({"images": [{"bytes": buf.getvalue()}], "texts": texts, "source": "bench"})
    return rows


def toolkit_write(src: Path, out: Path, workers: int) -> None:
    """shard-data from a parquet file, as users convert: the writers open it themselves. (Rows held in Python, a
    ListSource, were pickled whole into each spawned writer, 120 MB here, and 2 workers ran at 0.38x of 1.)"""
    from toolkit.data.prepare.shard_writer import shard_data

    shard_data(str(src), str(out), shard_size="100", workers=workers)


def write_parquet(rows: list[dict], path: Path) -> Path:
    import datasets

    columns = {key: [row[key] for row in rows] for key in ("images", "texts", "source")}
    features = datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "texts": datasets.List({"user": datasets.Value("string"), "assistant": datasets.Value("string")}),
            "source": datasets.Value("string"),
        }
    )
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))
    return path


def shardwriter_write(rows: list[dict], out: Path) -> None:
    """webdataset's own writer, the way its docs write samples: key, JSON, image bytes."""
    import webdataset as wds

    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=100, verbose=0) as sink:
        for i, row in enumerate(rows):
            meta = {"texts": row["texts"], "source": row["source"]}
            sink.write(
                {"__key__": f"{i:010d}", "json": json.dumps(meta).encode(), "img0.jpg": row["images"][0]["bytes"]}
            )


def run(samples: int = 6000, repeats: int = 3) -> dict[str, Any]:
    """6000 samples: at 1200 (about 2 s a run) the writers' start-up (spawned processes importing the toolkit)
    outweighed the work and 2 workers ran at 0.54x of 1; at 6000, 1.14x (2026-12-07, 2 cores)."""
    rows = make_rows(samples)
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = write_parquet(rows, Path(tmp) / "rows.parquet")
        variants = {
            "webdataset ShardWriter": lambda out: shardwriter_write(rows, out),
            "shard-data, 1 worker": lambda out: toolkit_write(src, out, 1),
            "shard-data, 2 workers": lambda out: toolkit_write(src, out, 2),
        }
        times = {name: [] for name in variants}
        for r in range(repeats):  # interleaved, so load on the machine falls on every variant alike
            for name, write in variants.items():
                start = time.perf_counter()
                write(Path(tmp) / f"{r}-{len(times[name])}-{name.split()[-1]}")
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    base = samples / median["webdataset ShardWriter"]
    rows_out = []
    for name, seconds in median.items():
        cores = 2 if name.endswith("2 workers") else 1
        rate = samples / seconds
        rows_out.append(
            {"writer": name, "samples_per_s": rate, "per_core": rate / cores, "vs_shardwriter": rate / base}
        )
    one, two = rows_out[1]["samples_per_s"], rows_out[2]["samples_per_s"]
    headline = {"per_core_1_worker": rows_out[1]["per_core"], "scaling_1_to_2_workers": two / one}
    headline["shardwriter_per_core"] = base
    meta = {"samples": samples, "repeats": repeats, "cores": os.cpu_count()}
    return {"name": "shard-data", "rows": rows_out, "headline": headline, "config": meta}
