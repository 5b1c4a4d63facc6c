"""Reading checkpoint files without running code from them.

Checkpoints are downloaded and shared, and a pickle can run any code while it loads. Everything the toolkit
writes beside the engine's shards is plain data (tensors, numbers, strings, lists, dicts), so it is read with
`torch.load(weights_only=True)`, torch's restricted unpickler, and a file that needs anything more is refused.

The one addition to torch's allowlist is what rebuilds a numpy array: checkpoints written before the RNG state was
stored as plain data hold numpy's generator state, and an array is data (its dtype and bytes), not code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.errors import UserError

# What pickle needs to rebuild a uint32 numpy array (numpy's legacy RNG state); nothing that calls user code.
_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 / numpy 1
_NUMPY_ARRAY_GLOBALS = [_multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class UnsafeCheckpointError(UserError):
    """A checkpoint file holds Python objects beyond plain data; it was not loaded."""


def load_plain(path: str | Path, *, what: str) -> Any:
    """torch.load of a plain-data file (weights_only), with an error that names the file and says what to do."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = [line.strip() for line in str(exc).splitlines() if "Unsupported global" in line]
        raise UnsafeCheckpointError(
            f"{path} ({what}) holds Python objects, not only tensors and plain values, so it was not loaded: "
            f"unpickling it could run code ({found[0] if found else 'not a plain-data file'}). nanoVLM-scale never "
            "writes such a file: this one was replaced or comes from elsewhere. Use a checkpoint you wrote yourself."
        ) from None
