"""Benchmarks behind `python -m toolkit bench NAME`: each measures its baseline in the same run.

A shared, noisy machine makes absolute seconds meaningless from one run to the next; a ratio against a baseline
timed in the same process, interleaved with the candidate, is what carries over. Every benchmark returns
`{"name", "rows": [...], "headline": {...}}`; `run()` prints the rows as a table and writes JSON to runs/bench/.
"""

from __future__ import annotations

import datetime
import importlib
import json
import platform
from pathlib import Path

BENCHES = (
    "packing",
    "pipeline",
    "overhead",
    "memory",
    "gpu",
    "balance",
    "shard-data",
    "checkpoint",
    "loss",
    "comm",
)


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def run(name: str, *, out_dir: str | Path = "runs/bench", as_json: bool = False, label: str = "", **kwargs) -> dict:
    """Run benchmark `name` with `kwargs`, print its table (or JSON) and write runs/bench/(label or name).json."""
    if name not in BENCHES:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHES)}")
    import torch  # here, not at import: the CLI reads BENCHES for its --help without paying for torch

    module = importlib.import_module(f"toolkit.bench.{name.replace('-', '_')}")
    result = module.run(**kwargs)
    result["meta"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{label or name}.json"
    skipped = "skipped" in result.get("headline", {})
    kept = skipped and path.exists()  # `bench gpu` on a login node (`make bench`) replaced the GPU's results
    if not kept:
        path.write_text(json.dumps(result, indent=1))
    if as_json:
        print(json.dumps(result))
    else:
        print(f"# bench {name} ({result['meta']['date']}, {result['meta']['device']})")
        print(format_table(result["rows"]))
        for k, v in result.get("headline", {}).items():
            print(f"{k}: {_fmt(v)}")
        print(f"{path} kept: a skipped run does not replace a measured one" if kept else f"written to {path}")
    return result
