"""hf_inputs: nanoVLM's exact prompt ids and tiles for an exported Idefics3 model.

Idefics3's stock processor lays an image out its own way (tiles first and the global image last, each behind
`<fake_token_around_image>` and a `<row_i_col_j>` text tag, its own `<image>` token), which the exported model
never saw in training. This builds what nanoVLM's processor builds (the global tile first, then each tile's
`<row_i_col_j>` token and image tokens, the chat template rendered up to the assistant's turn), reading the layout
from the export's image processor config, so `model.generate(**hf_inputs(img, prompt, processor))` answers as
the toolkit's own `generate` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from toolkit.data.conversation import encode_prompt
from toolkit.data.images import process_image, to_rgb
from toolkit.data.tokenizer import VLMTokenizer
from toolkit.errors import UserError
from toolkit.export.hf import LAYOUT_KEY


def _layout(processor: Any) -> dict[str, Any]:
    found = getattr(getattr(processor, "image_processor", None), LAYOUT_KEY, None)
    if not isinstance(found, dict):
        raise UserError(
            f"the processor has no {LAYOUT_KEY} in its image processor config: load one written by "
            "`python -m toolkit export SRC OUT --format hf` (AutoProcessor.from_pretrained(OUT))"
        )
    return found


def visible_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """Idefics3 drops an input image whose every value is exactly 0 as batch padding, so a black tile would vanish
    and its image tokens would have no features. Its first value becomes the smallest normal float: the patch
    embedding's sum then changes by ~1e-38 times a weight, below fp32 rounding of the bias it is added to."""
    black = (tiles == 0).flatten(1).all(dim=1)
    if black.any():
        tiles = tiles.clone()
        tiles[black, 0, 0, 0] = torch.finfo(tiles.dtype).tiny
    return tiles


ImageLike = Image.Image | str | Path


def hf_inputs(image: ImageLike | list[ImageLike] | None, prompt: str, processor: Any) -> dict[str, torch.Tensor]:
    """One user turn (its images first, as nanoVLM prompts) -> input_ids, attention_mask (1, S) and, with images,
    pixel_values (1, tiles, 3, tile, tile) for the exported model's forward or generate. An image is a PIL image
    or a file's path (a path failed with "'str' object has no attribute 'mode'")."""
    lay = _layout(processor)
    images = [] if image is None else [image] if isinstance(image, (Image.Image, str, Path)) else list(image)
    tiles, grids = [], []
    for img in map(_opened, images):
        t, grid = process_image(
            img, tile=lay["tile"], max_side=lay["max_side"], resize_to_max=lay["resize_to_max_side_len"]
        )
        tiles.append(t)
        grids.append(grid)
    template = getattr(processor, "chat_template", None) or processor.tokenizer.chat_template
    tok = VLMTokenizer(hf=processor.tokenizer, extra=dict(lay["extra_tokens"]), chat_template=template)
    ids = torch.tensor([encode_prompt(tok, prompt, grids, lay["tokens_per_tile"])])
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if tiles:
        out["pixel_values"] = visible_tiles(torch.cat(tiles))[None]
    return out


def _opened(image: Any) -> Image.Image:
    if isinstance(image, (str, Path)):
        with Image.open(image) as img:
            return to_rgb(img)  # decoded now, while the file is open; upright as training reads it
    if not isinstance(image, Image.Image):
        raise TypeError(f"hf_inputs takes PIL images or image file paths, not {type(image).__name__}")
    return image
