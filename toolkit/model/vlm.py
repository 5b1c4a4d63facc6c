"""VisionLanguageModel: ViT -> pixel-shuffle projector -> image features spliced into the decoder's input.

Image tokens (`<|image|>`) in `input_ids` are replaced, in order, by the projected features of the tiles in
`pixel_values`; the batch contract puts every tile of every image in token order, so a flat splice is exact.
Training calls run the vision encoder even when a micro-batch has no image (a dummy tile whose output is
multiplied by 0): under ZeRO-3 and FSDP every rank must take part in every parameter gather, or ranks hang.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from toolkit.config import ModelConfig
from toolkit.model.language import LanguageModel
from toolkit.model.loss import dense_cross_entropy
from toolkit.model.projector import ModalityProjector
from toolkit.model.vision import ViT


class VLMOutput(NamedTuple):
    """A tuple, so engines that hook module outputs (DeepSpeed ZeRO-3) see every tensor in it."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None  # mean over target tokens (nanoVLM's loss)
    loss_sum: torch.Tensor | None = None  # sum over target tokens: what token-weighted accumulation needs
    n_targets: torch.Tensor | None = None


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_encoder = ViT(cfg)
        self.MP = ModalityProjector(cfg)
        self.decoder = LanguageModel(cfg)
        self.image_token_id = cfg.lm_base_vocab_size + list(cfg.vlm_extra_tokens).index("image_token")
        self.apply(_init_weights)

    # -- construction and checkpoints (hub.py does the work; these keep nanoVLM's call sites) --
    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> VisionLanguageModel:
        from toolkit.model.hub import load_nanovlm

        return load_nanovlm(path, **kwargs)

    def save_pretrained(self, path: str, tokenizer_dir: str | None = None) -> None:
        from toolkit.model.hub import save_nanovlm

        save_nanovlm(self, path, tokenizer_dir=tokenizer_dir)

    def blocks(self) -> list[nn.Module]:
        """The units backends shard (FSDP2 `fully_shard`) and checkpoint one by one: ViT blocks, then decoder blocks."""
        return [*self.vision_encoder.blocks, *self.decoder.blocks]

    def vision_blocks(self) -> list[nn.Module]:
        return list(self.vision_encoder.blocks)

    def language_blocks(self) -> list[nn.Module]:
        return list(self.decoder.blocks)

    # -- forward --
    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings with image features written over the image-token positions.

        `image_index` (flat positions of the image tokens, found on the host) makes the splice an index copy whose
        size is known without reading the device; without it the image tokens are counted on the device.
        """
        embeds = self.decoder.token_embedding(input_ids)  # (B, S, D)
        if pixel_values is None or pixel_values.shape[0] == 0:
            if not self.training:
                return embeds
            side = self.cfg.vit_img_size
            dummy = torch.zeros(1, 3, side, side, device=embeds.device, dtype=embeds.dtype)
            return embeds + 0.0 * self.MP(self.vision_encoder(dummy)).sum()  # in the graph, zero weight
        feats = self.MP(self.vision_encoder(pixel_values.to(embeds.dtype)))  # (N, tokens_per_tile, D)
        flat = feats.reshape(-1, feats.shape[-1]).to(embeds.dtype)  # (N * tokens_per_tile, D)
        is_image = None if image_index is not None else input_ids == self.image_token_id
        n_slots = image_index.shape[0] if image_index is not None else int(is_image.sum())
        if n_slots != flat.shape[0]:
            raise ValueError(
                f"input_ids hold {n_slots} image tokens but pixel_values give {feats.shape[0]} tiles x "
                f"{feats.shape[1]} = {flat.shape[0]} features; the image string and the tiling disagree"
            )
        if is_image is not None:
            return embeds.masked_scatter(is_image[..., None], flat)
        return embeds.reshape(-1, embeds.shape[-1]).index_copy(0, image_index, flat).view_as(embeds)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_logits: bool = False,
        image_index: torch.Tensor | None = None,
        target_index: torch.Tensor | None = None,
    ) -> VLMOutput:
        """input_ids (B, S); pixel_values (N, 3, H, W); labels (B, S) already next-token aligned, -100 = no loss.

        With labels the loss is computed chunk by chunk over the target tokens (toolkit/model/loss.py) and no
        (B, S, V) logits exist; `return_logits=True` also returns them (and computes the loss from them densely).
        `image_index` / `target_index`: the flat positions of the image and target tokens, when the caller found
        them on the host (`ModelInputs.with_indices`); the result is the same, without two device -> host syncs.
        """
        x = self.embed(input_ids, pixel_values, image_index)
        hidden, _ = self.decoder(x, position_ids=position_ids, attention_mask=attention_mask)
        if labels is None:
            return VLMOutput(logits=self.decoder.head(hidden))  # (B, S, V)
        n_targets = (labels != -100).sum()
        logits = None
        if return_logits:
            logits = self.decoder.head(hidden)
            loss_sum = dense_cross_entropy(logits, labels)
        else:
            loss_sum = self.decoder.head(hidden, labels, target_index)
        loss = loss_sum / n_targets.clamp(min=1)
        return VLMOutput(logits=logits, loss=loss, loss_sum=loss_sum, n_targets=n_targets)

    # -- generation --
    def _step_logits(self, x, position_ids, attention_mask, cache, use_cache):
        hidden, cache = self.decoder(
            x, position_ids=position_ids, attention_mask=attention_mask, kv_cache=cache, use_cache=use_cache
        )
        return self.decoder.head(hidden[:, -1]).float(), cache

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        *,
        greedy: bool = True,
        top_k: int = 50,
        top_p: float = 0.9,
        temperature: float = 0.5,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decode up to max_new_tokens (B, T); rows that emitted EOS are padded with EOS after it."""
        b = input_ids.shape[0]
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding does not shift positions
        x = self.embed(input_ids, pixel_values)
        logits, cache = self._step_logits(x, pos, mask, None, use_cache)
        out, done = [], torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            token = sample_next(
                logits, greedy=greedy, top_k=top_k, top_p=top_p, temperature=temperature, generator=generator
            )
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, eos_token_id), token)
                done |= token == eos_token_id
            out.append(token)
            if done.all() or len(out) == max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
            emb = self.decoder.token_embedding(token[:, None])
            if use_cache:
                logits, cache = self._step_logits(emb, pos[:, -1:], mask, cache, True)
            else:
                x = torch.cat([x, emb], dim=1)
                logits, _ = self._step_logits(x, pos, mask, None, False)
        return torch.stack(out, dim=1)


def _init_weights(module: nn.Module) -> None:
    """nanoVLM's initialisation for training from scratch: N(0, 0.02) weights, zero biases, unit norms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif hasattr(module, "position_embedding") and isinstance(module.position_embedding, nn.Parameter):
        nn.init.normal_(module.position_embedding, mean=0.0, std=0.02)


def sample_next(
    logits: torch.Tensor,
    *,
    greedy: bool,
    top_k: int,
    top_p: float,
    temperature: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens: argmax, or top-k then nucleus (top-p) sampling at a temperature."""
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits / max(temperature, 1e-5)
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
