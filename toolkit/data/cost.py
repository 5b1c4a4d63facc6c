"""What one sample costs the model to train on: the per-sample terms of a step's FLOPs, for balanced packing.

A step's FLOPs are vision tiles x the ViT's FLOPs per tile plus the decoder's FLOPs over the step's tokens, whose
attention grows with each packed sample's squared length. Every term adds over samples, so a sample's share is
`per_tile x tiles + per_token x tokens + per_token_sq x tokens^2`. This module is the one place those formulas
live: the packer balances with them, the trainer reports each rank's cost with them, and MFU (`step_flops` in
toolkit/train/metrics.py) counts a step's FLOPs with them (tests/test_run_lifecycle.py checks them against
torch's FLOP counter). A calibration file of measured seconds per tile and per token replaces them where kernels
make FLOPs a poor guide to time (`bench gpu --calibrate` writes one).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from toolkit.config import ModelConfig


@dataclass(frozen=True)
class SampleCost:
    """Cost of one sample: linear in its tiles and tokens, plus the attention term in its length squared."""

    per_tile: float
    per_token: float
    per_token_sq: float = 0.0

    def __call__(self, *, tokens: int, tiles: int) -> float:
        return self.per_tile * tiles + (self.per_token + self.per_token_sq * tokens) * tokens

    def total(self, *, tokens: int, sum_sq_lengths: float, tiles: int) -> float:
        """Cost of many samples at once, from their summed tokens, tiles and squared lengths (a step, a batch)."""
        return self.per_tile * tiles + self.per_token * tokens + self.per_token_sq * sum_sq_lengths

    def unusable(self) -> str | None:
        """Why these costs cannot balance anything, or None. A fit that noise ruined gives them: zero costs balance
        nothing and negative ones chase the wrong rows. The calibration's writer and its reader both ask."""
        terms = (self.per_tile, self.per_token, self.per_token_sq)
        if all(math.isfinite(t) and t >= 0 for t in terms) and self.per_tile + self.per_token > 0:
            return None
        return (
            f"holds unusable times (per tile {terms[0]}, per token {terms[1]}, per squared token {terms[2]}): they "
            "must be finite and >= 0, and per tile and per token not both zero"
        )

    @classmethod
    def from_model(cls, cfg: ModelConfig) -> SampleCost:
        """Forward + backward FLOPs: per tile, per token and per squared sample length."""
        attention = 6.0 * cfg.lm_n_blocks * cfg.lm_hidden_dim  # causal: half of 4 x length^2 x width per block
        return cls(per_tile=vit_tile_flops(cfg), per_token=6.0 * _decoder_flops_per_token(cfg), per_token_sq=attention)

    @classmethod
    def from_calibration(cls, path: str | Path) -> SampleCost:
        """Measured seconds: a JSON object with `seconds_per_tile`, `seconds_per_token` and optionally
        `seconds_per_token_sq` (the attention term), e.g. from timing the model on a GPU."""
        try:
            data = json.loads(Path(path).read_text())
            cost = cls(
                per_tile=float(data["seconds_per_tile"]),
                per_token=float(data["seconds_per_token"]),
                per_token_sq=float(data.get("seconds_per_token_sq", 0.0)),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"data.cost_calibration={path} is not a readable JSON object with seconds_per_tile and "
                f"seconds_per_token ({exc}); fix the file or set data.cost_calibration='' to use the model's FLOPs"
            ) from exc
        problem = cost.unusable()
        if problem:
            raise ValueError(
                f"data.cost_calibration={path} {problem}. Rerun `bench gpu --calibrate` on an idle device with more "
                "--steps, or set data.cost_calibration='' to use the model's FLOPs"
            )
        return cost


def vit_tile_flops(cfg: ModelConfig) -> float:
    """Forward + backward FLOPs of one tile through the ViT and the projector, every part trained."""
    return _tile_flops(cfg, _Trained())


@dataclass(frozen=True)
class _Trained:
    """Which of the model's three parts train (a part at LR 0 is frozen: toolkit/train/optim.py)."""

    vision: bool = True
    mp: bool = True
    language: bool = True


def _tile_flops(cfg: ModelConfig, t: _Trained) -> float:
    """One tile's FLOPs through the ViT and projector: the forward, plus the backward's weight gradients of the
    parts that train and its input gradients where a trained part lies upstream (pixels need none)."""
    patches = (cfg.vit_img_size // cfg.vit_patch_size) ** 2
    width = cfg.vit_hidden_dim
    weights = 4 * width * width + 2 * width * cfg.vit_inter_dim  # per block and patch: q, k, v, out; fc1, fc2
    blocks = cfg.vit_n_blocks * 2 * weights * patches  # forward FLOPs of the blocks' weights
    attention = cfg.vit_n_blocks * 4 * patches * patches * width  # forward: scores and weighted values, all pairs
    projector = 2 * cfg.mp_image_token_length * width * cfg.mp_pixel_shuffle_factor**2 * cfg.lm_hidden_dim
    embed = 2 * patches * 3 * cfg.vit_patch_size**2 * width
    v = float(t.vision)
    return blocks * (1 + 2 * v) + attention * (1 + 2 * v) + projector * (1 + t.mp + v) + embed * (1 + v)


def _decoder_flops_per_token(cfg: ModelConfig) -> float:
    """Forward multiply-adds per token of the decoder's weights and output head (x2 for FLOPs, x3 with backward)."""
    return cfg.lm_n_blocks * _decoder_block_macs(cfg) + _head_macs(cfg)


def _decoder_block_macs(cfg: ModelConfig) -> float:
    width = cfg.lm_hidden_dim
    kv_width = cfg.lm_n_kv_heads * (width // cfg.lm_n_heads)
    return 2 * width * width + 2 * width * kv_width + 3 * width * cfg.lm_inter_dim  # q, out; k, v; SwiGLU


def _head_macs(cfg: ModelConfig) -> float:
    return cfg.lm_hidden_dim * cfg.lm_vocab_size


def trained_step_flops(
    cfg: ModelConfig,
    *,
    tokens: int,
    sum_sq_lengths: float,
    tiles: int,
    head_tokens: int | None = None,
    frozen: frozenset[str] = frozenset(),
) -> float:
    """The FLOPs a training step computes, for MFU: SampleCost.from_model's count when every part trains and the
    head sees every token. `frozen` (of "vision", "mp", "language"): those parts' weight gradients are not
    computed, nor input gradients with no trained part upstream (a frozen vision tower has no backward at all);
    counting them put MFU up as work went down. `head_tokens`: the tokens the output head runs on (the chunked
    loss runs it on target tokens only)."""
    t = _Trained(*(part not in frozen for part in ("vision", "mp", "language")))
    upstream = t.vision or t.mp or t.language  # some gradient flows back through the decoder
    body = 2 * cfg.lm_n_blocks * _decoder_block_macs(cfg) * (1 + t.language + upstream)
    head = 2 * _head_macs(cfg) * (1 + t.language + upstream)
    attention = 2 * cfg.lm_n_blocks * cfg.lm_hidden_dim * (1 + 2 * upstream)  # causal halves, per squared length
    head_tokens = tokens if head_tokens is None else head_tokens
    return tiles * _tile_flops(cfg, t) + tokens * body + head_tokens * head + sum_sq_lengths * attention


def sample_cost(cfg_model: ModelConfig, calibration: str = "") -> SampleCost:
    """The loader's cost model: measured times when a calibration file is given, else the model's FLOPs."""
    return SampleCost.from_calibration(calibration) if calibration else SampleCost.from_model(cfg_model)
