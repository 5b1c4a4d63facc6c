"""What a run reports: FLOPs and MFU, TensorBoard, metrics.jsonl, optional Weights & Biases and a progress bar, all
from rank 0.

MFU counts the model FLOPs a step needs (vision + projector + language, forward and backward, attention over
each packed sample's own length since packed samples do not attend to each other) against the device's peak.
It does not count recomputation from activation checkpointing: MFU measures useful work, not work done.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from toolkit.config import ModelConfig
from toolkit.data.cost import SampleCost, flop_terms, vit_tile_flops
from toolkit.train.wandb_log import WandbSink, import_wandb, wandb_enabled

log = logging.getLogger(__name__)

# Dense bf16 peak per device, FLOP/s (no sparsity). Unknown devices report no MFU rather than a wrong one.
# Dense bf16 FLOP/s by a part of torch's device name, the more specific first: "H100" alone also matched the
# PCIe card, whose peak is 756 TFLOP/s, and put its MFU about 24% low.
PEAK_BF16 = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H800 PCIe": 756e12,
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None (no MFU): not CUDA, or a card not in PEAK_BF16."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak
    return None


def mfu_peak(device: torch.device, precision: str) -> tuple[float | None, str]:
    """The peak a training run's MFU is taken against, or None and why not on a GPU (for the log): a card missing
    from the table logged no `mfu` without a word, and an fp32 run's was measured against the bf16 peak."""
    peak = device_peak_flops(device)
    if device.type == "cuda" and peak is None:
        return None, f"the bf16 peak of {torch.cuda.get_device_name(device)} is not in toolkit/train/metrics.py"
    if peak is not None and precision != "bf16":
        return None, f"MFU is taken against the bf16 peak, and backend.precision={precision}"
    return peak, ""


def vision_flops_per_tile(cfg: ModelConfig) -> float:
    """Forward + backward FLOPs of the ViT and projector for one tile."""
    return vit_tile_flops(cfg)


def language_flops(cfg: ModelConfig, n_tokens: int, sum_sq_lengths: float) -> float:
    """Forward + backward FLOPs of the decoder over n_tokens whose samples have the given sum of squared lengths."""
    return SampleCost.from_model(cfg).total(tokens=n_tokens, sum_sq_lengths=sum_sq_lengths, tiles=0)


def step_flops(
    cfg: ModelConfig,
    *,
    n_tokens: int,
    sum_sq_lengths: float,
    n_tiles: int,
    head_tokens: int | None = None,
    frozen: frozenset[str] = frozenset(),
) -> float:
    """The step's model FLOPs: with every part trained and the head on every token, the sample cost model of
    toolkit/data/cost.py summed over the step's samples (what balanced packing counts); `frozen` parts and the
    chunked loss's `head_tokens` (its targets) take out the work the step does not do."""
    t = flop_terms(cfg, frozen)
    head = n_tokens if head_tokens is None else head_tokens
    return n_tiles * t.tile + n_tokens * t.token + head * t.head_token + sum_sq_lengths * t.token_sq


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(value, (int, float)):  # a bool too: `skipped` as 0/1, so TensorBoard shows which steps were
        out[prefix] = float(value)


def strict_json(value: Any) -> Any:
    """`value` with NaN and infinities as None: json.dumps writes them as the bare words NaN and Infinity, which
    strict JSON readers (jq, JavaScript, most log shippers) refuse, and a skipped step logs a NaN loss."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _quiet_tensorboard_thread_errors() -> None:
    """TensorBoard writes from a thread that stores its OSError (a full disk) for the next add_scalar, flush or
    close to raise, where training says it in one line, and then lets it escape: threading's hook printed a
    7-line traceback ahead of that line. This hook drops those, and only those (installed once per process)."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        stored = getattr(args.thread, "exception", None)  # raised again in the training thread, which explains it
        tensorboards = type(args.thread).__name__ == "_AsyncWriterThread" and stored is args.exc_value
        if not (tensorboards and isinstance(args.exc_value, OSError)):
            previous(args)

    hook.quiets_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _lines_up_to(path: Path, step: int) -> list[str]:
    """metrics.jsonl's lines of steps up to `step`. A line that is not a step's JSON (the last one, cut by a full
    disk or a node's crash mid-write) is dropped with a warning: it failed every resume with a JSONDecodeError."""
    kept, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            logged = int(record["step"])
        except (ValueError, TypeError, KeyError):  # JSONDecodeError is a ValueError
            bad += line.strip() != ""
            continue
        if logged <= step:
            kept.append(line)
    if bad:
        log.warning("%s: dropped %d line(s) that are not a step's JSON (a write cut short)", path, bad)
    return kept


class _Window:
    """The steps since the last console line: finite losses and the tokens trained, from `since`."""

    def __init__(self, since: float) -> None:
        self.since, self.losses, self.tokens, self.steps = since, [], 0, 0

    def add(self, m: dict[str, Any]) -> None:
        self.steps += 1
        self.tokens += int(m.get("tokens", 0))
        if math.isfinite(m.get("loss", float("nan"))):  # a skipped step's NaN is not averaged in
            self.losses.append(float(m["loss"]))

    def means(self, now: float, *, fallback: dict[str, Any]) -> tuple[float, float]:
        """(mean loss, tokens/s); the first step after a (re)start has no span of its own: its own figures."""
        loss = sum(self.losses) / len(self.losses) if self.losses else float("nan")
        if self.steps <= 1 or now <= self.since:
            return (loss if self.losses else fallback.get("loss", float("nan"))), fallback.get("tokens_per_s", 0.0)
        return loss, self.tokens / (now - self.since)


class MetricsWriter:
    """Rank 0 writes; other ranks hold a no-op writer so call sites never ask which rank they are on."""

    def __init__(
        self,
        run_root: Path,
        *,
        rank: int,
        total_steps: int,
        log_interval: int = 1,
        resume_step: int = 0,
        wandb_project: str = "",
        wandb_mode: str = "online",
        run_config: dict[str, Any] | None = None,
    ) -> None:
        """resume_step > 0: continue a run from that step; what was logged after it (steps redone after a
        crash) is dropped from metrics.jsonl and TensorBoard, so each step appears once (W&B keeps them: see
        WandbSink). wandb_project (unless wandb_mode is disabled): also log to W&B, with run_config (the resolved
        config) attached to the W&B run."""
        self.active = rank == 0
        self.total = total_steps
        self.log_interval = max(1, log_interval)
        self.started = time.monotonic()
        self.first_step: int | None = None
        self._jsonl = self._tb = self._bar = None
        self._wandb: WandbSink | None = None
        if not self.active:
            return
        use_wandb = wandb_enabled(wandb_project, wandb_mode)
        if use_wandb:
            import_wandb(wandb_project)  # first: a missing wandb is refused before any file is written
        run_root.mkdir(parents=True, exist_ok=True)
        if use_wandb:  # before the files below are opened: a start that W&B refuses leaves none open
            self._wandb = WandbSink(run_root, project=wandb_project, mode=wandb_mode, config=run_config)
        path = run_root / "metrics.jsonl"
        kept = _lines_up_to(path, resume_step) if resume_step and path.exists() else []
        tmp = path.with_name(f".{path.name}.tmp")  # replaced whole: a crash here leaves the old file, not half
        tmp.write_text("".join(ln + "\n" for ln in kept))
        tmp.replace(path)
        self._jsonl = open(path, "a")  # noqa: SIM115 - kept open for the run
        from torch.utils.tensorboard import SummaryWriter

        _quiet_tensorboard_thread_errors()
        # From step 1 on a fresh start too: a restart before the first checkpoint (or train.resume=none into the
        # same folder) left the earlier attempt's events, and TensorBoard showed those steps twice.
        self._tb = SummaryWriter(str(run_root / "tb"), purge_step=resume_step + 1)
        if sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One optimizer step's metrics: a JSON line, TensorBoard (and W&B) scalars, and the progress display.
        `step` may be earlier than steps already logged (scores that arrive late are logged at the step they
        belong to)."""
        if not self.active:
            return
        record = {"step": step, **metrics}
        self._jsonl.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
        self._jsonl.flush()
        flat: dict[str, float] = {}
        _flatten("", metrics, flat)
        for key, value in flat.items():
            self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(step, flat)
        if "loss" in metrics:
            self._progress(step, metrics)

    def _progress(self, step: int, m: dict[str, Any]) -> None:
        """The console line: the mean loss and the token rate over the steps since the last line (one step's
        figures, printed every log_interval steps, swung by 7x between neighbours on a busy machine)."""
        now = time.monotonic()
        if self.first_step is None:
            self.first_step, self.started = step, now
            self._window = _Window(now)
        self._window.add(m)
        done = step - self.first_step
        rate = done / max(now - self.started, 1e-9)
        eta = f"{(self.total - step) / rate / 60:.1f} min" if rate > 0 else "unknown yet"  # one step: no rate
        loss, tokens_per_s = self._window.means(now, fallback=m)
        text = f"loss {loss:.4f} tok/s {tokens_per_s:,.0f} eta {eta}"
        line_due = step % self.log_interval == 0 or step == self.total
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(text, refresh=True)
        elif line_due:
            log.info("step %d/%d %s", step, self.total, text)
        if line_due or done == 0:  # the first step's time is before the window's start
            self._window = _Window(now)

    def flush(self) -> None:
        if self.active:
            self._jsonl.flush()
            self._tb.flush()

    def close(self) -> None:
        """Closes the files and finishes the W&B run; called from a `finally`, so an exception in flight marks the
        W&B run as failed."""
        if not self.active:
            return
        self._jsonl.close()
        self._tb.close()
        if self._wandb is not None:
            self._wandb.close(failed=sys.exc_info()[0] is not None)
        if self._bar is not None:
            self._bar.close()
