"""The batch the loader hands the trainer: the model's inputs, kept apart from what the loader knows about them.

Only `inputs` goes to the device and into the model; `stats` stays on the host for metrics, the step's token
counts and resume checks. Keeping them apart means a backend never has to guess which keys the model takes,
and the trainer reads packed-sample lengths from the loader instead of re-deriving them from position ids.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class ModelInputs:
    """Exactly the keyword arguments of `VisionLanguageModel.forward` for training and validation."""

    input_ids: torch.Tensor  # (B, S)
    labels: torch.Tensor  # (B, S), already next-token aligned, -100 = no loss
    position_ids: torch.Tensor  # (B, S), restarting at 0 in every packed sample
    pixel_values: torch.Tensor | None = None  # (N, 3, tile, tile): every tile of every image, in token order
    # Flat positions (into the B*S tokens) of the image tokens and of the target tokens (labels != -100), found on
    # the host by `with_indices`: with them the model splices image features and picks the loss's rows by index,
    # where it would otherwise read a count back from the device (a sync) before it could size either.
    image_index: torch.Tensor | None = None  # (n_image_tokens,)
    target_index: torch.Tensor | None = None  # (n_targets,)

    def with_indices(self, image_token_id: int) -> ModelInputs:
        """These inputs with image_index and target_index filled in, when the tensors are still on the host (on a
        device, finding them would be the very sync they save)."""
        if self.input_ids.device.type != "cpu" or (self.image_index is not None and self.target_index is not None):
            return self
        image_index = (self.input_ids.reshape(-1) == image_token_id).nonzero().squeeze(1)
        target_index = (self.labels.reshape(-1) != -100).nonzero().squeeze(1)
        return replace(self, image_index=image_index, target_index=target_index)

    def to(self, device: torch.device) -> ModelInputs:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return ModelInputs(**{k: v.to(device, non_blocking=True) if v is not None else None for k, v in moved.items()})

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def pin_memory(self) -> ModelInputs:
        return ModelInputs(**{k: v.pin_memory() for k, v in self.as_kwargs().items()})


@dataclass
class BatchStats:
    """What the loader knows about a batch: counts for metrics and the step's token weighting, and sample keys."""

    rows: int  # packed rows that hold samples (the rest of the batch is padding rows)
    samples: int
    images: int
    tiles: int
    tokens: int  # real tokens (not padding)
    targets: int  # tokens with a loss
    sample_lengths: list[int] = field(default_factory=list)  # tokens of every packed sample, row by row
    keys: list[list[str]] = field(default_factory=list)  # "shard:key" of every sample, row by row
    reader: int | None = None  # the reader slot that built the batch


@dataclass
class Batch:
    inputs: ModelInputs
    stats: BatchStats

    @property
    def slots(self) -> int:
        """Token slots of the batch (rows x row length), padding included."""
        return self.inputs.input_ids.numel()

    def pin_memory(self) -> Batch:
        """torch's pin-memory thread calls this: only the model inputs are pinned."""
        return replace(self, inputs=self.inputs.pin_memory())

    @classmethod
    def of(cls, inputs: ModelInputs) -> Batch:
        """A batch built by hand (tests, benchmarks): stats from the tensors, each position-0 restart a sample."""
        ids, labels, pos = inputs.input_ids, inputs.labels, inputs.position_ids
        starts = [[*(row == 0).nonzero().flatten().tolist(), row.numel()] for row in pos]
        lengths = [b - a for row in starts for a, b in itertools.pairwise(row)]
        tiles = 0 if inputs.pixel_values is None else int(inputs.pixel_values.shape[0])
        stats = BatchStats(
            rows=int(ids.shape[0]),
            samples=len(lengths),
            images=0,
            tiles=tiles,
            tokens=int(ids.numel()),
            targets=int((labels != -100).sum()),
            sample_lengths=lengths,
        )
        return cls(inputs, stats)
