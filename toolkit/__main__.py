"""Command line: `python -m toolkit {train, shard-data, synth, data-stats, eval, generate, export, bench, report}`.

Each subcommand imports its implementation lazily, so `--help` answers instantly and a data-only command
never pays for importing DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

from toolkit.bench import BENCHES
from toolkit.config import ConfigError, describe_fields, load_config
from toolkit.errors import (
    DISK_FULL_ERRNOS,
    OOM_HINT,
    PEER_LOST,
    TIMED_OUT,
    OtherRankFailed,
    UserError,
    collective_timeout,
    disk_full,
    os_error,
    peer_loss,
)

log = logging.getLogger("toolkit")

COMMANDS = {
    "train": "Train a model: --config CFG [section.field=value ...]",
    "shard-data": "Convert a Hugging Face dataset or JSONL + images into WebDataset tar shards",
    "synth": "Write the shapes-VQA synthetic dataset and its tokenizer",
    "data-stats": "Run the data pipeline without a model and report counts, skips and fill rate",
    "eval": "Validation loss and answer accuracy of a checkpoint on held-out shards",
    "generate": "Answer a prompt about an image with a checkpoint",
    "export": "Write a run, checkpoint or nanoVLM folder in nanoVLM format, or for transformers (--format hf)",
    "bench": "Run a benchmark: packing, pipeline, overhead, memory, gpu, balance, shard-data, checkpoint, loss, comm",
    "report": "Plot a run's metrics.jsonl to a PNG: loss (log axis, smoothed, validation), LR per group, grad norm, "
    "tokens/s, MFU, data wait, rank imbalance, lmms-eval scores",
}


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="YAML file or preset name (tiny, nanovlm-222m, nanovlm-450m)")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.lr_mp=1e-3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m toolkit",
        description="nanoVLM-scale: train nanoVLM-family vision-language models on many GPUs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Config fields (set with section.field=value):\n" + describe_fields(),
    )
    # `deepspeed --module toolkit` inserts --local_rank=N before the subcommand; ranks come from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, description=text)
    p = sub.choices["train"]
    _config_args(p)
    p.add_argument(
        "--check", action="store_true", help="only check the config, paths and resume for --world ranks; start none"
    )
    p.add_argument("--world", type=int, default=None, help="ranks the checked run will have (with --check; default 1)")
    p = sub.choices["shard-data"]
    p.add_argument(
        "src",
        nargs="?",
        help="datasets folder (save_to_disk), parquet/arrow files, cached hub name, JSONL, or a .json list of rows",
    )
    p.add_argument("out", nargs="?", help="output folder for the shards and manifest.json")
    p.add_argument(
        "--holdout", default="", help="rows (5000) or a fraction (0.01) held out into OUT/val; rest OUT/train"
    )
    p.add_argument("--part", default="", help="i/N: write only this machine's shards (index mod N = i), then --merge")
    p.add_argument("--merge", default="", metavar="OUT", help="after every --part run into OUT: write its manifest")
    p.add_argument("--subsets", default="", help="comma-separated subsets (configs) to concatenate")
    p.add_argument("--shard-size", default="256MB", help="target shard size: bytes (256MB) or samples (1000)")
    p.add_argument("--workers", type=int, default=1, help="parallel writer processes")
    p.add_argument("--tokenizer", default="", help="tokenizer folder, for the token-length histogram")
    p.add_argument(
        "--config", default="", help="preset or YAML whose model shapes make the histogram count image tokens exactly"
    )
    p.add_argument(
        "--images",
        default="",
        help="folder that relative image paths in the rows start from (default: the folder of SRC's file, or SRC)",
    )
    p.add_argument("--split", default="train", help="dataset split to read")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run into the same OUT")
    p = sub.choices["synth"]
    p.add_argument("out", help="output folder: OUT/train, OUT/val, OUT/tokenizer")
    p.add_argument("--samples", type=int, default=4000, help="training samples")
    p.add_argument("--val-samples", type=int, default=400, help="held-out samples")
    p.add_argument("--seed", type=int, default=0)
    p = sub.choices["data-stats"]
    _config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--max-packs",
        type=int,
        default=0,
        help="stop after this many packs, training's first (0 = one full pass)",
    )
    p = sub.choices["eval"]
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--shards", default=None, help="held-out shards: validation loss and answer accuracy")
    p.add_argument(
        "--max-samples",
        type=int,
        default=0,
        help="answer accuracy over at most N questions (0: all); the loss reads all",
    )
    p.add_argument("--lmms-tasks", default=None, help="comma-separated lmms-eval tasks (needs lmms-eval installed)")
    p.add_argument("--lmms-limit", type=int, default=None, help="at most this many documents per lmms-eval task")
    p.add_argument("--lmms-include", default=None, help="a folder of your own lmms-eval task YAMLs")
    p.add_argument("--lmms-batch-size", type=int, default=64, help="lmms-eval requests answered together (nanoVLM: 64)")
    p.add_argument("--json-out", default=None, help="also write the lmms-eval scores to this JSON file (atomically)")
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (auto: cuda when there is one)")
    p = sub.choices["generate"]
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True, action="append", help="an image file; repeat for several images")
    p.add_argument(
        "--prompt",
        required=True,
        help="the question about the images; not empty: to have them described, ask as training asks an image-caption "
        'pair (data.caption_prompt, "Describe the image.")',
    )
    p.add_argument("--max-new-tokens", type=int, default=32, help="at most the model's lm_max_length")
    p.add_argument("--sample", action="store_true", help="top-k/top-p sampling instead of greedy")
    p = sub.choices["export"]
    p.add_argument("run_or_checkpoint", help="a run folder, a checkpoint (step_N) or a nanoVLM-format folder")
    p.add_argument("out")
    p.add_argument(
        "--format",
        default="nanovlm",
        choices=("nanovlm", "hf"),
        help="nanovlm: config.json + model.safetensors; hf: Idefics3 for AutoModelForImageTextToText + AutoProcessor",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, when the source has none beside it")
    p = sub.choices["bench"]
    p.add_argument("name", choices=BENCHES)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "options",
        nargs=argparse.REMAINDER,
        help="gpu, pipeline and overhead take options of their own (`bench NAME -h` lists them), e.g. gpu: "
        "--variants ..., --calibrate FILE; pipeline: --photos, --samples N; overhead: --backend NAME, --world 1,2",
    )
    p = sub.choices["report"]
    p.add_argument("run", nargs="+", help="a run folder (train.run_dir) with metrics.jsonl; several: compared")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN/report.png; several runs: compare.png)")
    return parser


def _say(line: str) -> None:
    """One error line in one write: print's separate newline let two ranks' lines merge into one on torchrun's
    shared stderr."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _not_yet(name: str) -> int:
    _say(f"`{name}` is not implemented in this version of nanoVLM-scale yet.")
    return 2


def _synth(args: argparse.Namespace) -> int:
    from toolkit.data.prepare.synthetic import write_synth

    write_synth(args.out, samples=args.samples, val_samples=args.val_samples, seed=args.seed)
    return 0


def _parse_part(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise UserError(f"--part {text!r}: give i/N with 0 <= i < N, e.g. --part 0/4 on the first of 4 machines")
    return int(i), int(n)


def _shard_data(args: argparse.Namespace) -> int:
    if args.merge:
        from toolkit.data.prepare.shard_writer import merge_parts

        print(json.dumps({k: v for k, v in merge_parts(args.merge).items() if k != "shards"}, indent=2))
        return 0
    if not (args.src and args.out):
        raise UserError("shard-data needs SRC and OUT (or --merge OUT after --part runs)")
    model_config = None
    if args.config:  # exact counts: the model's tiling and image tokens, with --tokenizer when given
        model_config = load_config(args.config, [f"model.tokenizer={args.tokenizer}"] if args.tokenizer else []).model
    from toolkit.data.prepare.shard_writer import interruptible, shard_data

    try:
        with interruptible():
            manifest = shard_data(
                args.src,
                args.out,
                subsets=[s for s in args.subsets.split(",") if s],
                shard_size=args.shard_size,
                workers=args.workers,
                tokenizer=args.tokenizer or None,
                images=args.images or None,
                split=args.split,
                resume=args.resume,
                model_config=model_config,
                holdout=args.holdout or None,
                part=_parse_part(args.part),
            )
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (shard_writer.Interrupted)
        signum = getattr(exc, "signum", signal.SIGINT)
        _say(
            f"shard-data stopped by {signal.Signals(signum).name}: the finished shards in {args.out} are kept; "
            "run the same command with --resume to write the rest"
        )
        return 128 + signum
    held = manifest.pop("holdout", None)
    summary = {k: v for k, v in manifest.items() if k not in ("shards", "plan")}
    if held is not None:
        summary["holdout"] = {k: v for k, v in held.items() if k not in ("shards", "plan")}
    print(_readable_json(summary))
    return 0


def _readable_json(value: Any) -> str:
    """Indented JSON whose lists of numbers stay on one line (the token-length histogram was 26 lines of one
    number each)."""
    text = json.dumps(value, indent=2)
    return re.sub(r"\[\s+([-+0-9.eE,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


def _data_stats(args: argparse.Namespace) -> int:
    if args.max_packs < 0:
        raise UserError(f"--max-packs {args.max_packs}: give 0 (one full pass) or a positive number of packs")
    cfg = load_config(args.config, args.overrides)  # config errors before the pipeline is even imported
    from toolkit.data.loader import data_stats

    stats = data_stats(cfg, max_packs=args.max_packs)
    if args.json:
        print(json.dumps(stats))
    else:
        for k, v in stats.items():
            if k != "sets":
                print(f"{k:>24}: {v}")
        for s in stats.get("sets", []):  # a mixture: one line per set
            listed = "?" if s["samples"] is None else s["samples"]
            print(f"{'set':>24}: {s['pattern']} (weight {s['weight']:g}): {s['packed']} of {listed} samples packed")
    advice = ("check data.max_sample_length, data.max_images_per_example and data.max_tiles_per_knapsack against "
              "the shards")  # fmt: skip
    if stats["samples_read"] and not stats["samples_packed"]:  # exit 0 with `packs: 0`; training then failed
        raise UserError(
            f"none of the {stats['samples_read']} samples read could be packed (skipped: {stats['skipped']}), so "
            f"training on this config would stop with 'all skipped'; {advice}"
        )
    empty = [s["pattern"] for s in stats.get("sets", []) if not s["packed"]]
    if empty and not args.max_packs:  # a whole pass: the set gave nothing, and a training stream stops on it
        raise UserError(f"no sample of {', '.join(empty)} could be packed, so training on this mixture would stop "
                        f"on it; {advice}, or drop it from data.train_shards")  # fmt: skip
    return 0


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # config errors before anything heavy is imported
    from toolkit.train.run import check_training, run_training
    from toolkit.train.trainer import TrainingDiverged

    if args.world is not None and not args.check:  # a run's ranks are the launcher's to start: was ignored silently
        raise UserError(
            f"--world {args.world} applies to `train --check` only; start {args.world} ranks with a launcher "
            f"(`NPROC_PER_NODE={args.world} launch/torchrun.sh ...` or torchrun --nproc_per_node {args.world})"
        )
    if args.check:
        args.world = 1 if args.world is None else args.world
        if args.world < 1:
            raise UserError(f"--world {args.world}: give the number of ranks the run will have (at least 1)")
        print(check_training(cfg, args.world))
        return 0

    try:
        run_training(cfg)
    except TrainingDiverged as exc:
        _say(f"training stopped: {exc}")
        return 1
    except (UserError, ConfigError):
        raise
    except Exception as exc:  # a write outside a checkpoint save (TensorBoard, metrics.jsonl) on a full disk
        if not disk_full(exc):  # not permissions: a shard this user cannot read is no write error
            raise
        from toolkit.train.checkpoint import RunDir
        from toolkit.train.write_errors import write_failure

        run_dir = Path(cfg.train.run_dir)
        problem = write_failure(exc, RunDir(run_dir), None, folder=run_dir, what=f"writing to {run_dir}")
        if problem is None:
            raise
        raise problem from exc
    return 0


def _read_image(path: str):
    """--image decoded in full (PIL opens lazily: a cut file fails only at convert) before the model loads, so a
    wrong path costs no load; a file that is missing or not an image PIL reads is one line naming it."""
    from PIL import Image, UnidentifiedImageError

    from toolkit.data.images import to_rgb

    try:
        with Image.open(path) as img:
            return to_rgb(img)  # upright, and a 16-bit image scaled, as training reads it
    except UnidentifiedImageError:
        raise UserError(f"--image {path} is not an image PIL can read; give a JPEG, PNG or WebP file") from None
    except Image.DecompressionBombError as exc:  # PIL's guard against images too large to decode safely
        raise UserError(f"--image {path} is too large to decode safely ({exc}); give a smaller image") from None
    except OSError as exc:  # missing, unreadable, or cut short ("image file is truncated")
        raise UserError(f"--image {path} cannot be read: {exc.strerror or exc}; give an image file") from None


def _generate(args: argparse.Namespace) -> int:
    from toolkit.evaluate import answer_from, load_for_inference, nanovlm_folder, prompt_inputs

    _check_prompt(args.prompt)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: give at least 1")
    nanovlm_folder(args.checkpoint)  # which checkpoint first (cheap), then the images, then the model loads
    images = [_read_image(path) for path in args.image]  # every --image: a repeat was silently the last one only
    model, tok = load_for_inference(args.checkpoint)
    if args.max_new_tokens > model.cfg.lm_max_length:  # a bound, not hours of decoding past the context
        raise UserError(
            f"--max-new-tokens {args.max_new_tokens} is more than the model's context (lm_max_length "
            f"{model.cfg.lm_max_length}); give at most that"
        )
    ids, pixels = prompt_inputs(model, tok, images, args.prompt)
    new_tokens = _context_left(len(ids), args.max_new_tokens, model.cfg.lm_max_length, len(images))
    print(answer_from(model, tok, ids, pixels, max_new_tokens=new_tokens, greedy=not args.sample))
    return 0


def _check_prompt(prompt: str) -> None:
    """An empty --prompt (an unset shell variable, most often) left the user's turn holding the image tokens alone,
    a turn training never asks: an image-caption pair is asked data.caption_prompt. Refused, naming that prompt."""
    from toolkit.config import DataConfig

    if not prompt.strip():
        raise UserError(f'--prompt is empty; ask a question, e.g. --prompt "{DataConfig().caption_prompt}" to have the '
                        "image described (what training asks of an image-caption pair)")  # fmt: skip


def _context_left(prompt: int, max_new: int, context: int, images: int) -> int:
    """How many tokens `generate` may add: a prompt (image tokens included) longer than the model's context was
    decoded anyway, past every length it was trained at, and a long answer ran past the context the same way."""
    if prompt >= context:
        raise UserError(
            f"the prompt is {prompt} tokens ({images} images' tokens included), and the model's context "
            f"(lm_max_length) is {context}; give a shorter prompt or fewer or smaller images"
        )
    if prompt + max_new > context:
        log.warning("the answer stops at the model's context: %d new tokens at most (%d asked), after the prompt's "
                    "%d of lm_max_length %d", context - prompt, max_new, prompt, context)  # fmt: skip
    return min(max_new, context - prompt)


def _export(args: argparse.Namespace) -> int:
    from toolkit.export import export

    what = export(args.run_or_checkpoint, args.out, fmt=args.format, tokenizer=args.tokenizer)
    kind = {
        "nanovlm": "nanoVLM format: config.json + model.safetensors",
        "hf": "transformers Idefics3: AutoModelForImageTextToText / AutoProcessor",
    }[args.format]
    print(f"exported {what} to {args.out} ({kind})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from toolkit.evaluate import answer_accuracy, heldout_totals, iter_eval_samples, load_for_inference

    if not args.shards and not args.lmms_tasks:
        raise UserError("eval needs --shards (held-out shards) or --lmms-tasks (lmms-eval benchmarks), or both")
    if args.shards:
        from toolkit.data.shards import resolve_sets

        resolve_sets(args.shards, name="--shards")  # before the model loads; named as the user gave it
        model, tok = load_for_inference(args.checkpoint, device=args.device)
        loss, targets = heldout_totals(model, tok, args.shards)
        if not targets:  # a loss of 0.0 over nothing read as a perfect model
            raise UserError(
                f"--shards {args.shards}: no held-out sample with an answer to score could be read; check them with "
                f"`python -m toolkit data-stats --config CFG data.train_shards={args.shards}`"
            )
        acc, _ = answer_accuracy(model, tok, iter_eval_samples(args.shards), max_samples=args.max_samples)
        print(f"validation loss: {loss:.4f}  ({targets} answer tokens)")
        for kind, value in (acc.table() if acc.total else {}).items():
            print(f"accuracy {kind:>14}: {value:6.1%}  ({acc.total.get(kind, sum(acc.total.values()))} questions)")
        if acc.unanswerable:
            print(f"accuracy: {acc.unanswerable} questions left out, their reference answer has no word to compare")
        if acc.too_long:
            print(f"accuracy: {acc.too_long} questions left out, their prompt fills the model's context (lm_max_length "
                  f"{model.cfg.lm_max_length}, image tokens included)")  # fmt: skip
        if not (acc.total or acc.unanswerable or acc.too_long):
            print("accuracy: no question was scored (the held-out samples hold none; see the warnings above)")
    if args.lmms_tasks:
        _eval_lmms(args)
    return 0


def _eval_lmms(args: argparse.Namespace) -> None:
    """lmms-eval's tasks on the checkpoint; printed, and with --json-out written where training's watcher looks."""
    from toolkit.lmms import run_tasks, scalar_scores

    if args.lmms_batch_size < 1:
        raise UserError(f"--lmms-batch-size must be >= 1, got {args.lmms_batch_size}")
    tasks = [t.strip() for t in args.lmms_tasks.split(",") if t.strip()]
    results = run_tasks(args.checkpoint, tasks, limit=args.lmms_limit, include_path=args.lmms_include,
                        device=args.device, batch_size=args.lmms_batch_size)  # fmt: skip
    scores = scalar_scores(results)
    for task, metrics in scores.items():
        print(f"lmms-eval {task}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"checkpoint": str(args.checkpoint), "tasks": tasks, "scores": scores}, indent=1))
        os.replace(tmp, out)  # a reader polling for the file never sees half of it


def _report(args: argparse.Namespace) -> int:
    from toolkit.report import read_series, write_report
    from toolkit.report_compare import format_summary, run_names, summary, write_comparison

    several = len(args.run) > 1
    name = "compare.png" if several else "report.png"
    out = Path(args.out) if args.out else (Path(name) if several else None)
    if out is not None and (out.is_dir() or (args.out or "").endswith(("/", os.sep))):
        out.mkdir(parents=True, exist_ok=True)
        out = out / name  # a folder: the report goes inside it, not over its name
    elif out is not None and out.suffix.lower() != ".png":
        raise UserError(f"--out {args.out}: the report is a PNG image; give a .png file or a folder")
    elif out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)  # a new folder for it: was a raw "[Errno 2]"
    if several:
        out, lines = write_comparison(args.run, out)
    else:
        run = Path(args.run[0])
        out = write_report(run, out)
        lines = [format_summary(run_names([run])[0], summary(read_series(run / "metrics.jsonl")))]
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from toolkit.bench import run

    as_json = args.json or "--json" in args.options  # after the name, --json lands among the options
    options = [o for o in args.options if o != "--json"]
    if args.name in ("gpu", "pipeline", "overhead"):  # flags of their own: time budget, variants, data, --backend
        module = importlib.import_module(f"toolkit.bench.{args.name}")
        return module.main([*options, *(["--json"] if as_json else [])])
    if options in (["-h"], ["--help"]):  # was refused as an option
        doc = (importlib.import_module(f"toolkit.bench.{args.name.replace('-', '_')}").__doc__ or "").strip()
        print(f"usage: python -m toolkit bench {args.name} [--json]\n\n{doc.splitlines()[0] if doc else ''}\n\n"
              f"It takes no options; results go to runs/bench/{args.name}.json under the current folder.")  # fmt: skip
        return 0
    if options:
        raise UserError(f"bench {args.name} takes no options ({' '.join(options)}); only gpu, pipeline and overhead do")
    run(args.name, as_json=as_json)
    return 0


HANDLERS = {
    "bench": _bench,
    "report": _report,
    "eval": _eval,
    "export": _export,
    "train": _train,
    "synth": _synth,
    "shard-data": _shard_data,
    "data-stats": _data_stats,
    "generate": _generate,
}


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _own_message(exc: BaseException) -> str:
    """`exc`'s message; for an error a DataLoader worker raised, which reaches here as "Caught X in DataLoader
    worker process N. Original Traceback ...", only the original error's own message."""
    text = str(exc)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return text
    cls = type(exc)
    for prefix in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
        at = text.rfind("\n" + prefix)
        if at >= 0:
            return text[at + 1 + len(prefix) :].strip()
    return text


def _is_shard_error(exc: BaseException) -> bool:
    shards = sys.modules.get("toolkit.data.shards")  # not imported: no ShardError can have been raised
    return shards is not None and isinstance(exc, shards.ShardError)


def _explain(exc: BaseException) -> int | None:
    """One line and an exit status for an error a user can act on that is not a UserError (out of memory, a peer
    rank that stopped, a full disk outside a checkpoint save); None for anything else, a bug: its traceback shows."""
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        _say(f"error: {OOM_HINT.format(device=_device_name())}")
        return 3
    if isinstance(exc, OtherRankFailed):
        _say(f"error: {exc}")
        return 1
    lost = peer_loss(exc)
    if lost is not None:  # a crash as far as the launcher goes: exit 1, and torchrun may restart the group
        _say(f"error: {PEER_LOST.format(detail=lost)}")
        return 1
    waited = collective_timeout(exc)
    if waited is not None:  # as a crash: exit 1, and torchrun may restart the group
        _say(f"error: {TIMED_OUT.format(detail=waited)}")
        return 1
    if disk_full(exc):  # train and checkpoint saves say more (their run folder); this is any other command
        full = os_error(exc, DISK_FULL_ERRNOS)
        where = f" writing {full.filename}" if full is not None and full.filename else ""
        _say(f"error: no space left on the device{where}: free space on that filesystem, or write to another one")
        return 2
    return None


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, taking overrides after an option too: `train --check a.b=1 --world 2 c.d=2` was refused
    ("unrecognized arguments: c.d=2"), argparse ending the overrides' list at the first option."""
    args, rest = parser.parse_known_args(argv)
    late = [a for a in rest if not a.startswith("-") and "=" in a]
    if late and isinstance(getattr(args, "overrides", None), list) and args.command != "bench":
        args.overrides.extend(late)
        rest = [a for a in rest if a not in late]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = _parse(parser, argv)
    if args.command is None:
        parser.print_help()
        return 0
    handler = HANDLERS.get(args.command)
    if handler is None:
        return _not_yet(args.command)
    try:
        return handler(args)
    except ConfigError as exc:
        label = "data error" if _is_shard_error(exc) else "config error"
        _say(f"{label}: {_own_message(exc)}")
        return 2
    except (UserError, FileNotFoundError, FileExistsError) as exc:
        _say(f"error: {_own_message(exc)}")
        return 2
    except BaseException as exc:  # DCP's CheckpointException derives from BaseException, not Exception
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        status = _explain(exc)
        if status is None:
            raise
        return status


if __name__ == "__main__":
    sys.exit(main())
