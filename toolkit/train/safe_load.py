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


class CheckpointFileError(UserError):
    """A checkpoint file that is missing, truncated or not in its format (a disk that filled up, a copy cut short).

    Raised where the file is read, so the message names it; `restore_checkpoint` and export add which checkpoint it
    belongs to and which earlier ones are kept, since only they know the run folder.
    """

    def __init__(self, file: str | Path, what: str, reason: str) -> None:
        self.file, self.what, self.reason = Path(file), what, reason
        super().__init__(f"{self.file} ({what}) cannot be read: {reason}")

    def __reduce__(self) -> tuple:
        """Picklable (its arguments are not its message): one rank's failure is gathered and raised on all."""
        return (type(self), (self.file, self.what, self.reason))


class WeightsMismatchError(UserError):
    """A checkpoint's weights do not fit the model its run's config describes; the message says how."""


def read_failure(exc: BaseException) -> str | None:
    """What went wrong, in one line, when `exc` is what torch, pickle or the OS raise for a missing, truncated or
    garbled file; None for anything else (a bug, an interrupt), which callers let through unchanged."""
    if isinstance(exc, FileNotFoundError):
        return "the file is missing"
    if isinstance(exc, EOFError | OSError):  # torch.load of a cut file: EOFError, or OSError EINVAL from its mmap
        return f"the file ends early or cannot be read ({type(exc).__name__}: {_first_line(exc)})"
    if isinstance(exc, pickle.UnpicklingError) and "global" not in str(exc).lower():  # a GLOBAL is code: unsafe
        return f"its contents are garbled or cut short ({_unpickler_reason(exc)})"
    if isinstance(exc, RuntimeError) and "PytorchStreamReader" in str(exc):  # torch's zip reader on a cut file
        return f"the file is truncated or not a torch checkpoint ({_first_line(exc)})"
    return None


def _unpickler_reason(exc: BaseException) -> str:
    """torch's restricted unpickler puts its own reason ("Unsupported operand 103") after paragraphs of advice."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    found = [line for line in lines if line.startswith(("Unsupported", "WeightsUnpickler"))]
    return (found[-1] if found else _first_line(exc))[:160]


def _first_line(exc: BaseException) -> str:
    """The start of a library's message: torch's run to paragraphs of advice that do not apply here."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". ")[0][:160]


def load_plain(path: str | Path, *, what: str) -> Any:
    """torch.load of a plain-data file (weights_only), with an error that names the file and says what to do:
    UnsafeCheckpointError for a file holding code, CheckpointFileError for one that is missing or damaged."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, OSError, RuntimeError, pickle.UnpicklingError) as exc:
        reason = read_failure(exc)
        if reason is not None:
            raise CheckpointFileError(path, what, reason) from exc
        if not isinstance(exc, pickle.UnpicklingError):
            raise
        found = [line.strip() for line in str(exc).splitlines() if "global" in line.lower()]
        raise UnsafeCheckpointError(
            f"{path} ({what}) holds Python objects, not only tensors and plain values, so it was not loaded: "
            f"unpickling it could run code ({found[0] if found else 'not a plain-data file'}). nanoVLM-scale never "
            "writes such a file: this one was replaced or comes from elsewhere. Use a checkpoint you wrote yourself."
        ) from None


def weights_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """How `state` (weights read from a checkpoint) fails to fit `model` (built from the config written beside
    them): parameters it lacks, names the model has not, shapes that differ; None when it fits. A tied weight may
    be stored under either of its names. Buffers are not required: an engine's reader may leave them out."""
    expected = model.state_dict()
    aliases: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), set()).add(name)
    missing = sorted(n for names in aliases.values() if not names & state.keys() for n in names)
    unexpected = sorted(k for k in state if k not in expected)
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
              if k in expected and tuple(v.shape) != tuple(expected[k].shape)]  # fmt: skip
    parts = [
        f"{label} {len(names)}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
        for label, names in (("missing", missing), ("not in the model", unexpected), ("shape differs for", shapes),
                             ("tied here, not in the checkpoint", _untied(aliases, state)),
                             ("one tensor in the checkpoint, two here", _tied(aliases, state)))
        if names
    ]  # fmt: skip
    return "; ".join(parts) or None


def _untied(aliases: dict[int, set[str]], state: dict[str, torch.Tensor]) -> list[str]:
    """Names the model ties (model.lm_tie_weights) that the checkpoint holds as different values."""
    out = []
    for names in aliases.values():
        held = [state[n] for n in sorted(names & state.keys())]
        if any(not torch.equal(held[0], other) for other in held[1:]):
            out.append(", ".join(sorted(names)))
    return out


def _tied(aliases: dict[int, set[str]], state: dict[str, torch.Tensor]) -> list[str]:
    """Names that are separate parameters of the model but one tensor in the checkpoint (it was trained tied):
    the export then failed deep in safetensors ('shared tensors')."""
    owner = {name: key for key, names in aliases.items() for name in names}
    seen: dict[tuple[int, int], str] = {}
    shared = []
    for name, value in state.items():
        if name not in owner or not value.numel():
            continue
        where = (value.untyped_storage().data_ptr(), value.storage_offset())
        if where in seen and owner[seen[where]] != owner[name]:
            shared.append(f"{seen[where]} = {name}")
        seen.setdefault(where, name)
    return shared
