"""`make demo`: shapes-VQA from nothing to a trained model, with before/after answer accuracy.

Writes the synthetic dataset (once), measures the untrained model, trains the tiny preset through the real CLI
(`python -m toolkit train`, CUDA when present), measures the best export, and prints an accuracy table by question
type, a few generations next to their images' descriptions, and where the run's outputs are.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from toolkit.config import load_config
from toolkit.data.prepare.synthetic import write_synth
from toolkit.data.tokenizer import load_tokenizer
from toolkit.evaluate import answer_accuracy, iter_eval_samples, load_for_inference
from toolkit.model import VisionLanguageModel


def accuracy_of(model, tok, shards: str, n: int):
    return answer_accuracy(model, tok, iter_eval_samples(shards), max_samples=n)


def print_table(before: dict[str, float], after: dict[str, float]) -> None:
    print(f"\n{'question type':>14} | {'before':>7} | {'after':>7}")
    print(f"{'-' * 14}-+-{'-' * 7}-+-{'-' * 7}")
    for kind in after:
        print(f"{kind:>14} | {before.get(kind, 0.0):7.1%} | {after[kind]:7.1%}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m toolkit.demo", description=__doc__)
    p.add_argument("--data", default="data/synth")
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--samples", type=int, default=6000)
    p.add_argument("--eval-samples", type=int, default=400)
    p.add_argument("overrides", nargs="*", help="extra train overrides, section.field=value")
    args = p.parse_args(argv)
    data = Path(args.data)
    write_synth(str(data), samples=args.samples, val_samples=args.eval_samples, seed=0)  # a no-op when done
    overrides = [
        f"model.tokenizer={data / 'tokenizer'}", f"data.train_shards={data / 'train'}",
        f"data.val_shards={data / 'val'}", f"train.run_dir={args.run}", "train.resume=none", *args.overrides,
    ]  # fmt: skip
    cfg = load_config("tiny", overrides)
    tok = load_tokenizer(cfg.model)
    torch.manual_seed(cfg.train.seed)
    untrained = VisionLanguageModel(cfg.model).eval()
    before, _ = accuracy_of(untrained, tok, cfg.data.val_shards, args.eval_samples)
    print(f"untrained model: {before.table()['all']:.1%} of held-out questions right", flush=True)
    if Path(args.run).exists():
        import shutil

        shutil.rmtree(args.run)  # the demo always trains from scratch
    cmd = [sys.executable, "-m", "toolkit", "train", "--config", "tiny", *overrides]
    print("training:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    model, tok = load_for_inference(args.run)
    after, shown = accuracy_of(model, tok, cfg.data.val_shards, args.eval_samples)
    print_table(before.table(), after.table())
    print("\nsample generations:")
    for s in shown[:6]:
        mark = "ok " if s["correct"] else "BAD"
        print(f"  [{mark}] {s['description']}")
        print(f"        Q: {s['question']}  A: {s['answer']!r} (expected {s['expected']!r})")
    run = Path(args.run)
    print(f"\ncheckpoints: {run / 'checkpoints'}\nexport (nanoVLM format): {run / 'export' / 'best'}")
    print(f"TensorBoard: tensorboard --logdir {run / 'tb'}\nmetrics: {run / 'metrics.jsonl'}")
    print(f"plots: .venv/bin/python -m toolkit report {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
