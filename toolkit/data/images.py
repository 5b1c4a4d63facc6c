"""nanoVLM's image processing: resize to a multiple of the tile size, split into tiles, add a global tile.

Resizing is PIL bicubic (what torchvision's resize does on a PIL image) and the global tile is a bilinear,
antialiased downscale of the resized image (what torchvision does on a tensor), so pixel values match
nanoVLM's own processor without depending on torchvision. Values stay in [0, 1]: nanoVLM does not normalise.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def target_size(h: int, w: int, *, tile: int, max_side: int, resize_to_max: bool) -> tuple[int, int]:
    """nanoVLM's DynamicResize: long side to max_side (or up to the next tile multiple within it), short side
    scaled alike and rounded up to a tile multiple, never below one tile."""
    long, short = (w, h) if w >= h else (h, w)
    target_long = max_side if resize_to_max else min(max_side, math.ceil(long / tile) * tile)
    scale = target_long / long
    target_short = max(math.ceil(short * scale / tile) * tile, tile)
    return (target_short, target_long) if w >= h else (target_long, target_short)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def split_tiles(x: torch.Tensor, tile: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(3, H, W) -> tiles (n, 3, tile, tile) row-major, plus a leading global tile when there is more than one."""
    c, h, w = x.shape
    rows, cols = h // tile, w // tile
    tiles = x.view(c, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(rows * cols, c, tile, tile)
    if (rows, cols) == (1, 1):
        return tiles, (rows, cols)
    whole = F.interpolate(x[None], size=(tile, tile), mode="bilinear", align_corners=False, antialias=True)
    return torch.cat([whole, tiles], dim=0), (rows, cols)


def process_image(
    img: Image.Image, *, tile: int, max_side: int, resize_to_max: bool
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decoded image -> (tiles (n, 3, tile, tile), (rows, cols)) exactly as nanoVLM's processor."""
    img = img.convert("RGB")
    w, h = img.size
    new_h, new_w = target_size(h, w, tile=tile, max_side=max_side, resize_to_max=resize_to_max)
    if (new_h, new_w) != (h, w):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    return split_tiles(to_tensor(img), tile)


def tile_count(grid: tuple[int, int]) -> int:
    rows, cols = grid
    return 1 if (rows, cols) == (1, 1) else rows * cols + 1
