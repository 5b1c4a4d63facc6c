"""Short `python -m toolkit train` runs in the test process: tiny synthetic data, CPU, fp32, a checkpoint a step."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from toolkit import __main__ as cli
from toolkit.data.prepare.synthetic import write_synth


def logged(run: Path) -> dict[int, dict]:
    """A run's metrics.jsonl by step."""
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def write_data(out: Path) -> Path:
    write_synth(str(out), samples=48, val_samples=8, seed=0)
    return out


def train_args(synth: Path, run: Path, *extra: str, steps: int = 2) -> list[str]:
    """`train` arguments for `steps` steps of the tiny preset on `synth`; `extra` overrides come last and win."""
    return [
        "train", "--config", "tiny", "backend.device=cpu", "backend.precision=fp32",
        f"model.tokenizer={synth / 'tokenizer'}", f"data.train_shards={synth / 'train'}",
        f"data.val_shards={synth / 'val'}", "data.num_workers=0", "data.shuffle_buffer=8", "train.batch_size=2",
        f"train.max_training_steps={steps}", "train.eval_interval=0", "train.export_best=false",
        "train.checkpoint_interval=1", "train.keep_checkpoints=2", f"train.run_dir={run}", "train.log_interval=1",
        *extra,
    ]  # fmt: skip


def train(args: list[str]) -> int:
    """The CLI's exit status; the signal handlers a run installs are put back even when it fails."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return cli.main(args)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
