"""Causal attention that keeps packed samples apart, with the kernel chosen by device.

A packed row holds several samples; `position_ids` restart at 0 where each one begins, so the sample ("document")
of every token is `cumsum(position_ids == 0)`. That is the only packing signal the model needs: it survives
slicing, needs no extra tensor in the batch contract, and is what HF's varlen paths use too.

Kernels, picked once per forward and shared by every block:
- `causal`: plain SDPA `is_causal` when nothing is packed or padded (generation prefill, nanoVLM parity).
- `dense`:  SDPA with a (B, 1, Q, K) boolean mask. Used on CPU and with a KV cache; O(S^2) memory.
- `flex`:   FlexAttention with a document block mask; on CUDA it never materialises an S x S mask.
- `varlen`: a flash varlen kernel over cu_seqlens (CUDA, bf16/fp16): flash-attn's when installed, else torch's own
            `torch.nn.attention.varlen` (torch >= 2.10, no dropout). Each sample is attended alone, so no block
            of a row's other samples is ever visited; the 2026-11-28 H200 profile had FlexAttention's forward at
            4x its own backward and a fifth of the step.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from toolkit.errors import UserError

try:  # FlexAttention exists from torch 2.5; CPU runs it eagerly (slow, exact), CUDA compiles it.
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch
    create_block_mask = flex_attention = None

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

try:  # torch's own flash varlen op: no extra package, but no dropout
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
except ImportError:  # pragma: no cover - torch < 2.10
    torch_varlen_attn = None

KERNELS = ("auto", "causal", "dense", "flex", "varlen")


@dataclass
class AttentionPlan:
    """What every attention layer of one forward needs; built once by `plan_attention`."""

    kind: str
    mask: torch.Tensor | None = None  # dense: (B, 1, Q, K) bool, True = may attend
    block_mask: object | None = None  # flex
    cu_seqlens: torch.Tensor | None = None  # varlen: (docs + 1,) int32 over the flattened batch
    max_seqlen: int = 0  # varlen: an upper bound on any sample's length (the row length: no sync, no recompiles)


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) positions -> (B, S) sample index within the row; a new sample starts wherever the position is 0."""
    return (position_ids == 0).cumsum(dim=-1)


def _dense_mask(
    q_len: int, kv_len: int, docs: torch.Tensor | None, key_valid: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    offset = kv_len - q_len  # queries are the last q_len positions of the kv sequence
    q_idx = torch.arange(q_len, device=device)[:, None] + offset
    k_idx = torch.arange(kv_len, device=device)[None, :]
    mask = (k_idx <= q_idx)[None, None]  # (1, 1, Q, K)
    if docs is not None:
        mask = mask & (docs[:, None, -q_len:, None] == docs[:, None, None, :])
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :].bool()
    # A query always sees itself, so a fully padded row yields its own value instead of NaN.
    return mask | (k_idx == q_idx)[None, None]


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _flex_block_mask(docs: torch.Tensor, key_valid: torch.Tensor | None):
    batch, seq = docs.shape
    valid = key_valid.bool() if key_valid is not None else torch.ones_like(docs, dtype=torch.bool)

    def mask_mod(b, h, q_idx, kv_idx):
        same = docs[b, q_idx] == docs[b, kv_idx]
        return (q_idx >= kv_idx) & same & (valid[b, kv_idx] | (q_idx == kv_idx))

    return create_block_mask(mask_mod, B=batch, H=None, Q_LEN=seq, KV_LEN=seq, device=docs.device)


def sample_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) positions -> lengths of every packed sample (padding tails included), row by row."""
    docs = document_ids(position_ids)
    batch, seq = docs.shape
    flat = (docs + torch.arange(batch, device=docs.device)[:, None] * (seq + 1)).flatten()
    return torch.unique_consecutive(flat, return_counts=True)[1]


def _cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """Sample boundaries over the flattened (B*S) batch, as the flash varlen kernels want them."""
    return F.pad(sample_lengths(position_ids).cumsum(0), (1, 0)).to(torch.int32)


# Head sizes the fused kernels accept: flash wants a multiple of 8 up to 256; FlexAttention's Triton template
# refuses fewer than 16 ("embedding dimension ... must be at least 16"), seen on an H200 with torch 2.11.
FLEX_MIN_HEAD_DIM = 16


def varlen_available(dropout: float = 0.0) -> bool:
    """A flash varlen kernel exists: flash-attn's (any dropout) or torch's (none)."""
    return flash_attn_varlen_func is not None or (torch_varlen_attn is not None and dropout == 0.0)


def check_kernel(kernel: str, device: torch.device | None, head_dim: int, dropout: float = 0.0) -> None:
    """Refuse, before training starts, a forced kernel that this machine or model cannot run. `device=None`: the
    run's device is not known here (`train --check` on a host without the run's GPU): the model's rules only,
    which hold on CUDA, where both kernels run (the device's and this torch's rules wait for the run itself)."""
    if device is not None and kernel == "varlen":
        if device.type != "cuda":
            raise UserError("train.attention_kernel=varlen runs on CUDA only; use auto or dense on this machine")
        if not varlen_available(dropout):
            raise UserError(
                "train.attention_kernel=varlen needs torch >= 2.10 with model.lm_dropout=0, or flash-attn "
                "(`pip install flash-attn`); or use auto"
            )
    if device is not None and kernel == "flex" and device.type != "cuda":  # torch: no FlexAttention backward on CPU
        raise UserError("train.attention_kernel=flex trains on CUDA only (no backward on the CPU); use auto or dense")
    if kernel == "varlen" and (head_dim % 8 or head_dim > 256):
        raise UserError(f"train.attention_kernel=varlen: flash needs heads a multiple of 8 up to 256; {head_dim}")
    if kernel == "flex" and head_dim < FLEX_MIN_HEAD_DIM:
        raise UserError(
            f"train.attention_kernel=flex: FlexAttention needs heads of at least {FLEX_MIN_HEAD_DIM} on CUDA, "
            f"this model's are {head_dim}; use auto or dense"
        )


def choose_kernel(
    device: torch.device, dtype: torch.dtype, packed: bool, cached: bool, head_dim: int = 64, dropout: float = 0.0
) -> str:
    """The fastest kernel that handles this call; the dense SDPA mask is the fallback every shape supports.

    `dtype` is what the attention will compute in: the autocast dtype under autocast.
    """
    if cached or not packed:
        return "dense"
    if device.type == "cuda":
        flash_ok = head_dim % 8 == 0 and head_dim <= 256 and dtype in (torch.bfloat16, torch.float16)
        if flash_ok and varlen_available(dropout):
            return "varlen"
        if flex_attention is not None and head_dim >= FLEX_MIN_HEAD_DIM:
            return "flex"
    return "dense"


def plan_attention(
    *,
    q_len: int,
    kv_len: int,
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
    kernel: str = "auto",
    head_dim: int = 64,
    dropout: float = 0.0,
) -> AttentionPlan:
    """Decide once per forward how every layer attends. `position_ids` given means: honour packed samples."""
    packed = position_ids is not None
    cached = kv_len != q_len
    if not packed and attention_mask is None and not cached:
        return AttentionPlan("causal")
    if kernel == "auto":
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)  # q, k and v come out of autocast's matmuls in it
        kernel = choose_kernel(device, dtype, packed, cached, head_dim, dropout)
    docs = document_ids(position_ids) if packed else None
    if kernel == "flex" and docs is not None and not cached:
        return AttentionPlan("flex", block_mask=_flex_block_mask(docs, attention_mask))
    if kernel == "varlen" and docs is not None and not cached and attention_mask is None:
        return AttentionPlan("varlen", cu_seqlens=_cu_seqlens(position_ids), max_seqlen=q_len)
    return AttentionPlan("dense", mask=_dense_mask(q_len, kv_len, docs, attention_mask, device))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, dropout: float) -> torch.Tensor:
    """q (B, H, Q, hd), k/v (B, Hkv, K, hd) -> (B, H, Q, hd). GQA heads are shared, never copied."""
    if plan.kind == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, dropout_p=dropout, enable_gqa=True)
    if plan.kind == "dense":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, dropout_p=dropout, enable_gqa=True)
    if plan.kind == "flex":
        # inside a compiled block dynamo compiles flex_attention with the block; eager CUDA calls need it compiled
        fn = _compiled_flex() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
        return fn(q, k, v, block_mask=plan.block_mask, enable_gqa=True)
    return _varlen(q, k, v, plan, dropout)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, dropout: float) -> torch.Tensor:
    b, h, s, hd = q.shape
    # (B, H, S, hd) views of (B, S, H, hd) projections: flattening to (B*S, heads, hd) copies nothing
    flat = [t.transpose(1, 2).reshape(b * s, t.shape[1], hd) for t in (q, k, v)]
    cu, longest = plan.cu_seqlens, plan.max_seqlen
    if flash_attn_varlen_func is not None:
        out = flash_attn_varlen_func(*flat, cu, cu, longest, longest, dropout_p=dropout, causal=True)
    else:
        if dropout:
            raise UserError("torch's varlen attention has no dropout: set model.lm_dropout=0 or install flash-attn")
        out = torch_varlen_attn(*_share_kv_heads(*flat), cu, cu, longest, longest, **TORCH_VARLEN_OPTIONS)
    return out.reshape(b, s, h, hd).transpose(1, 2)


def varlen_options(fn) -> dict:
    """Causal and GQA as this torch's varlen_attn spells them: 2.10 has `is_causal`; 2.11 a causal
    `window_size=(-1, 0)` (seen on the H200); 2.12 adds `enable_gqa`."""
    params = inspect.signature(fn).parameters
    options = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "enable_gqa" in params:
        options["enable_gqa"] = True
    return options


# Read once here: compiled blocks then see a plain constant, with nothing for dynamo to trace or guard on.
TORCH_VARLEN_OPTIONS = varlen_options(torch_varlen_attn) if torch_varlen_attn is not None else {}


def _share_kv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(T, heads, hd) triples; repeats GQA's key/value heads only for a varlen_attn without `enable_gqa`."""
    if k.shape[1] == q.shape[1] or "enable_gqa" in TORCH_VARLEN_OPTIONS:
        return q, k, v
    group = q.shape[1] // k.shape[1]
    return q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
