"""Llama-style decoder (GQA, RoPE, RMSNorm, SwiGLU) with nanoVLM's parameter names.

It takes embeddings rather than token ids because the VLM splices image features into the sequence first.
Positions come from `position_ids` when given (packed rows restart them per sample) and from the cache length
otherwise; the same ids drive RoPE and the document mask, so the two can never disagree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.config import ModelConfig
from toolkit.model.attention import AttentionPlan, attend, plan_attention
from toolkit.model.loss import OutputHead

KVCache = list[dict[str, torch.Tensor]]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16's 8-bit mantissa loses the mean of squares over ~1k channels.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin for arbitrary per-token positions; frequencies shrink past lm_max_position_embeddings (nanoVLM)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dim = cfg.lm_hidden_dim // cfg.lm_n_heads
        inv_freq = 1.0 / (cfg.lm_re_base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)  # persistent: nanoVLM stores it in model.safetensors
        self.original_max_seq_len = cfg.lm_max_position_embeddings
        self.attention_scaling = cfg.lm_attn_scaling

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Scale without a host sync: max(1, longest / trained) stays a tensor.
        longest = (position_ids.max() + 1).float()
        scale = torch.clamp(longest / self.original_max_seq_len, min=1.0)
        inv_freq = self.inv_freq.float() / scale
        freqs = position_ids.float()[..., None] * inv_freq  # (B, S, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, hd); cos/sin (B, S, hd) in fp32."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


class GroupedQueryAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.lm_n_heads
        self.n_kv_heads = cfg.lm_n_kv_heads
        self.head_dim = cfg.lm_hidden_dim // cfg.lm_n_heads
        self.dropout = cfg.lm_dropout
        d = cfg.lm_hidden_dim
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.resid_dropout = nn.Dropout(cfg.lm_dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        plan: AttentionPlan,
        cache: dict[str, torch.Tensor] | None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, S, hd)
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k = torch.cat([cache["k"], k], dim=2)
            v = torch.cat([cache["v"], v], dim=2)
        y = attend(q, k, v, plan, self.dropout if self.training else 0.0)  # (B, H, S, hd)
        y = self.resid_dropout(self.out_proj(y.transpose(1, 2).reshape(b, s, -1)))
        if not use_cache:
            return y, None
        # Without a past, v is a view of v_proj's output (attention wants it so), and a block must not return a
        # view under FSDP2: an in-place op on it would skip the pre-backward all-gather. So the cache keeps a
        # copy, made only when a cache is asked for (generation), once per prompt; k is RoPE's fresh output.
        return y, {"k": k, "v": v if cache is not None else v.clone()}


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.lm_hidden_dim, cfg.lm_inter_dim, bias=False)
        self.up_proj = nn.Linear(cfg.lm_hidden_dim, cfg.lm_inter_dim, bias=False)
        self.down_proj = nn.Linear(cfg.lm_inter_dim, cfg.lm_hidden_dim, bias=False)
        self.dropout = nn.Dropout(cfg.lm_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.lm_hidden_dim, cfg.lm_rms_eps)
        self.attn = GroupedQueryAttention(cfg)
        self.norm2 = RMSNorm(cfg.lm_hidden_dim, cfg.lm_rms_eps)
        self.mlp = SwiGLU(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        plan: AttentionPlan,
        cache: dict[str, torch.Tensor] | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """-> (B, S, D) and, with `use_cache`, this layer's keys and values so far (else None)."""
        h, new_cache = self.attn(self.norm1(x), rope, plan, cache, use_cache)
        x = x + h
        return x + self.mlp(self.norm2(x)), new_cache


class LanguageModel(nn.Module):
    """Embeddings in, final-normed hidden states out; `head` maps them to logits (tied to the embedding or not)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.attention_kernel = "auto"
        self.token_embedding = nn.Embedding(cfg.lm_vocab_size, cfg.lm_hidden_dim)
        self.rotary_embd = RotaryEmbedding(cfg)
        self.blocks = nn.ModuleList([DecoderBlock(cfg) for _ in range(cfg.lm_n_blocks)])
        self.norm = RMSNorm(cfg.lm_hidden_dim, cfg.lm_rms_eps)
        self.head = OutputHead(cfg.lm_hidden_dim, cfg.lm_vocab_size, bias=False)
        if cfg.lm_tie_weights:
            self.head.weight = self.token_embedding.weight

    def forward(
        self,
        x: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, KVCache | None]:
        """x (B, S, D) embeddings -> hidden (B, S, D) and, with `use_cache`, the updated cache (else None).

        Training asks for no cache: its blocks then return only the hidden states, so no FSDP2 unit hands back
        a view and no layer's keys and values are held until the end of the forward.

        With `position_ids`, samples packed in a row never attend to each other. `attention_mask` (B, K) marks
        real keys (1) against padding (0) over the whole cached + new sequence.
        """
        b, s, _ = x.shape
        past = kv_cache[0]["k"].shape[2] if kv_cache else 0
        packed = position_ids if not kv_cache else None  # decode steps: causal over valid keys, no documents
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=x.device).expand(b, s)
        plan = plan_attention(
            q_len=s,
            kv_len=past + s,
            position_ids=packed,
            attention_mask=attention_mask,
            device=x.device,
            dtype=x.dtype,
            kernel=self.attention_kernel,
            head_dim=self.blocks[0].attn.head_dim,
            dropout=self.cfg.lm_dropout if self.training else 0.0,
        )
        rope = self.rotary_embd(position_ids)
        new_cache: KVCache = []
        for i, block in enumerate(self.blocks):
            x, layer_cache = block(x, rope, plan, kv_cache[i] if kv_cache else None, use_cache)
            new_cache.append(layer_cache)
        return self.norm(x), new_cache if use_cache else None
