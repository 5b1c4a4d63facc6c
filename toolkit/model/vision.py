"""SigLIP-style vision transformer, laid out like nanoVLM's so checkpoints map name for name.

Each tile is encoded on its own (bidirectional attention inside a tile, nothing across tiles), so a batch of
tiles is just a batch: packing never reaches the vision side. q/k/v live in one fused `qkv_proj` because that is
nanoVLM's parameter layout; importing a SigLIP tower concatenates HF's separate projections into it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.config import ModelConfig


class PatchConv(nn.Conv2d):
    """A stride = kernel convolution (non-overlapping patches) computed as one matrix product.

    Same parameters and state-dict keys as nn.Conv2d (nanoVLM's `patch_embedding.conv`), and the same result up to
    summation order. Why: on an H200 (torch 2.11, bf16) cuDNN ran the 16x16 patch convolution of 512 px tiles as an
    implicit GEMM at ~16 TFLOP/s; as a matmul it is an ordinary (N*h*w, 3*p*p) x (3*p*p, D) product. It stays a
    module called by its parent so that ZeRO-3 still gathers its weight in its own forward hook.
    """

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        n, c, height, width = pixels.shape
        p = self.kernel_size[0]
        h, w = height // p, width // p
        patches = pixels[:, :, : h * p, : w * p].reshape(n, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5)
        out = F.linear(patches.reshape(n, h * w, c * p * p), self.weight.flatten(1), self.bias)  # (N, h*w, D)
        return out.view(n, h, w, -1).permute(0, 3, 1, 2)  # (N, D, h, w) as nn.Conv2d returns, a view: no copy


class PatchEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cls_flag = cfg.vit_cls_flag
        self.num_patches = (cfg.vit_img_size // cfg.vit_patch_size) ** 2
        self.conv = PatchConv(3, cfg.vit_hidden_dim, kernel_size=cfg.vit_patch_size, stride=cfg.vit_patch_size)
        n_pos = self.num_patches + (1 if self.cls_flag else 0)
        if self.cls_flag:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.vit_hidden_dim))
        self.position_embedding = nn.Parameter(torch.zeros(1, n_pos, cfg.vit_hidden_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv(pixels)  # (N, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (N, h*w, D), row-major patches
        if self.cls_flag:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position_embedding


class ViTAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.vit_n_heads
        self.head_dim = cfg.vit_hidden_dim // cfg.vit_n_heads
        self.dropout = cfg.vit_dropout
        self.qkv_proj = nn.Linear(cfg.vit_hidden_dim, 3 * cfg.vit_hidden_dim, bias=True)
        self.out_proj = nn.Linear(cfg.vit_hidden_dim, cfg.vit_hidden_dim, bias=True)
        self.resid_dropout = nn.Dropout(cfg.vit_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv_proj(x).view(n, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (N, H, T, hd)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.resid_dropout(self.out_proj(y.transpose(1, 2).reshape(n, t, d)))


class ViTMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.vit_hidden_dim, cfg.vit_inter_dim)
        self.fc2 = nn.Linear(cfg.vit_inter_dim, cfg.vit_hidden_dim)
        self.dropout = nn.Dropout(cfg.vit_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class ViTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)
        self.attn = ViTAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)
        self.mlp = ViTMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """Tiles (N, 3, H, W) in [0, 1] as nanoVLM feeds them -> patch features (N, T, D)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cls_flag = cfg.vit_cls_flag
        self.patch_embedding = PatchEmbeddings(cfg)
        self.dropout = nn.Dropout(cfg.vit_dropout)
        self.blocks = nn.ModuleList([ViTBlock(cfg) for _ in range(cfg.vit_n_blocks)])
        self.layer_norm = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.patch_embedding(pixels))
        for block in self.blocks:
            x = block(x)
        if self.cls_flag:
            return self.layer_norm(x[:, 0])
        return self.layer_norm(x)
