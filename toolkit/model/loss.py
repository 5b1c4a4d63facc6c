"""The training loss without the (B, S, V) logits: the output head and cross-entropy, a chunk of rows at a time.

A 4096-token row at SmolLM2's 49,218-token vocabulary has 201M logits: 0.8 GB in fp32, and the dense path keeps
that and its softmax for the backward pass (3.2 GB measured). Here the head's matmul and the cross-entropy run on
`CHUNK_ROWS` token rows at a time under activation checkpointing: the forward keeps only each chunk's summed loss,
and the backward recomputes one chunk's logits at a time to get its gradients. Peak memory for the loss is then one
chunk's logits, at the price of doing the head's forward matmul twice (about 4% of a 450m step's FLOPs).

Only target rows (labels != -100) go through the head: image tokens, prompts and padding have no loss, so their
logits are never computed at all. The result equals the dense `F.cross_entropy(logits.float(), reduction="sum")`:
the logits of each chunk are upcast to fp32 before the log-softmax, exactly as the dense path upcasts all of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CHUNK_ROWS = 256  # token rows per chunk: 256 x 49,218 fp32 logits = 50 MB (the backward holds about 4 such)


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()  # (c, V): only this chunk's, and only while it is needed
    return F.cross_entropy(logits, labels, reduction="sum")


def dense_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over target tokens of the cross-entropy of (..., V) logits, upcast to fp32 first (nanoVLM's loss)."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="sum")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_rows: int = CHUNK_ROWS,
    target_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over target tokens of -log softmax(hidden @ weight.T)[label]; hidden (..., D), labels (...) with -100
    for no loss. The same value and gradients as the dense head + cross-entropy, without its (B, S, V) logits.

    `target_index` (the flat positions of labels != -100, found on the host) spares the `nonzero` that would
    otherwise read the count of targets back from the device to size the chunks.
    """
    flat_labels = labels.reshape(-1)
    keep = target_index if target_index is not None else (flat_labels != -100).nonzero().squeeze(1)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)  # (T, D): the target tokens only
    targets = flat_labels.index_select(0, keep)
    total = hidden.new_zeros((), dtype=torch.float32)
    if rows.shape[0] == 0:
        return total + 0.0 * hidden.sum() + 0.0 * weight.sum()  # still in the graph: every rank reduces grads
    for start in range(0, rows.shape[0], chunk_rows):
        part = slice(start, start + chunk_rows)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, rows[part], weight, targets[part], use_reentrant=False)
        else:
            total = total + _chunk_loss(rows[part], weight, targets[part])
    return total


class OutputHead(nn.Linear):
    """The decoder's output projection (tied to the token embedding or not). With labels it returns the summed
    loss instead of logits: the chunked loss runs inside this module's forward, so engines that gather a module's
    parameters around its forward (DeepSpeed ZeRO-3, FSDP2) have the head's weight in place for it."""

    chunked = True  # train.chunked_loss; False: the dense logits + cross-entropy, kept for comparison

    def forward(
        self, hidden: torch.Tensor, labels: torch.Tensor | None = None, target_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        if labels is None:
            return F.linear(hidden, self.weight)
        if self.chunked:
            return linear_cross_entropy(hidden, self.weight, labels, target_index=target_index)
        return dense_cross_entropy(F.linear(hidden, self.weight), labels)
