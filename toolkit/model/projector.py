"""Modality projector: pixel shuffle then one linear map, as in nanoVLM.

Pixel shuffle folds each f x f neighbourhood of patch features into one token, cutting image tokens by f^2
while keeping every feature; the linear layer then maps to the decoder width.
"""

from __future__ import annotations

import torch
from torch import nn

from toolkit.config import ModelConfig


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, T, D) with T a square grid -> (N, T / f^2, D * f^2), neighbourhoods in nanoVLM's order."""
    n, t, d = x.shape
    side = round(t**0.5)
    if side * side != t or side % factor:
        raise ValueError(f"pixel shuffle needs a square patch grid divisible by {factor}, got {t} patches")
    out = side // factor
    x = x.reshape(n, out, factor, out, factor, d)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, out_h, out_w, f_h, f_w, D)
    return x.reshape(n, out * out, d * factor * factor)


class ModalityProjector(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.factor = cfg.mp_pixel_shuffle_factor
        self.proj = nn.Linear(cfg.vit_hidden_dim * self.factor**2, cfg.lm_hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_shuffle(x, self.factor))
