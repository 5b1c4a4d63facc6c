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
        """Forward + backward FLOPs: per tile, per token (the head's included) and per squared sample length."""
        terms = flop_terms(cfg)
        return cls(per_tile=terms.tile, per_token=terms.token + terms.head_token, per_token_sq=terms.token_sq)

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
    return flop_terms(cfg).tile


@dataclass(frozen=True)
class FlopTerms:
    """A training step's FLOPs per tile, per token without the output head, per token the head runs on, and per
    squared sample length (causal attention): the one place the formulas live, for the cost model and MFU."""

    tile: float
    token: float
    head_token: float
    token_sq: float


def flop_terms(cfg: ModelConfig, frozen: frozenset[str] = frozenset()) -> FlopTerms:
    """Forward FLOPs, plus the backward's weight gradients of the parts that train and its input gradients where
    a trained part lies upstream (pixels need none). `frozen` (of "vision", "mp", "language", the parts at LR 0):
    their weight gradients are not computed, and a frozen vision tower has no backward at all; counting them put
    MFU up as work went down. With nothing frozen each term is 3x its forward, the patch embedding's 2x."""
    vision, mp, language = (part not in frozen for part in ("vision", "mp", "language"))
    upstream = vision or mp or language  # some gradient flows back through the decoder
    patches = (cfg.vit_img_size // cfg.vit_patch_size) ** 2
    width = cfg.vit_hidden_dim
    weights = 4 * width * width + 2 * width * cfg.vit_inter_dim  # per block and patch: q, k, v, out; fc1, fc2
    blocks = cfg.vit_n_blocks * 2 * weights * patches  # forward FLOPs of the blocks' weights
    attention = cfg.vit_n_blocks * 4 * patches * patches * width  # forward: scores and weighted values, all pairs
    projector = 2 * cfg.mp_image_token_length * width * cfg.mp_pixel_shuffle_factor**2 * cfg.lm_hidden_dim
    embed = 2 * patches * 3 * cfg.vit_patch_size**2 * width
    tile = (blocks + attention) * (1 + 2 * vision) + projector * (1 + mp + vision) + embed * (1 + vision)
    kv_width = cfg.lm_n_kv_heads * (cfg.lm_hidden_dim // cfg.lm_n_heads)
    block = 2 * cfg.lm_hidden_dim * (cfg.lm_hidden_dim + kv_width) + 3 * cfg.lm_hidden_dim * cfg.lm_inter_dim  # MACs
    backward = 1 + language + upstream  # the decoder's forward, weight gradients, input gradients
    return FlopTerms(
        tile=float(tile),
        token=2.0 * cfg.lm_n_blocks * block * backward,
        head_token=2.0 * cfg.lm_hidden_dim * cfg.lm_vocab_size * backward,
        token_sq=2.0 * cfg.lm_n_blocks * cfg.lm_hidden_dim * (1 + 2 * upstream),  # causal: half of 4 L^2 W a block
    )


def sample_cost(cfg_model: ModelConfig, calibration: str = "") -> SampleCost:
    """The loader's cost model: measured times when a calibration file is given, else the model's FLOPs."""
    return SampleCost.from_calibration(calibration) if calibration else SampleCost.from_model(cfg_model)
