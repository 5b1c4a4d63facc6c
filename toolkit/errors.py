"""Errors a user can fix: the CLI prints their message and one line of what to do, never a traceback."""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator


class UserError(RuntimeError):
    """Something about the machine, files or launch that the message says how to fix."""


class OtherRankFailed(RuntimeError):
    """This rank is fine, another rank failed (its own log says why): one line, exit 1, like a crash."""


OOM_HINT = (
    "out of memory on {device}: lower train.batch_size (packs per rank per micro-step) and raise "
    "train.gradient_accumulation_steps to keep the global batch, or set train.activation_checkpointing=language "
    "(or all); with DeepSpeed, ds_configs/zero3.json shards parameters too"
)

PEER_LOST = (
    "another rank stopped first (it crashed, was killed, or lost its network), so this rank's collective failed "
    "({detail}); that rank's own log says why. A restarted run resumes from its latest checkpoint (`latest`)"
)

TIMED_OUT = (
    "a collective waited past backend.collective_timeout_s for another rank ({detail}): a rank is stuck (a hung "
    "filesystem, a paused or deadlocked process) or never started; the other ranks' logs say which. A restarted "
    "run resumes from its latest checkpoint (`latest`)"
)
# gloo's "Timed out waiting 15000ms for send", the store's "Timed out after 1801 seconds waiting for clients",
# NCCL's watchdog "... ran for 1800000 milliseconds before timing out"
COLLECTIVE_TIMEOUT = re.compile(
    r"Timed out waiting \d+ ?ms|Timed out after \d+ seconds|before timing out|Socket Timeout", re.IGNORECASE
)

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")

# What the survivor's collective raises once a peer is gone: gloo (the peer's socket closed or reset), NCCL (the
# communicator aborted, or ncclRemoteError), and the TCP store when its host is gone. Timeouts are left out: a
# rank that waits in another collective than the others (a bug) times out too.
PEER_LOSS = re.compile(
    r"Connection closed by peer|Connection reset by peer|NCCL communicator was aborted"
    r"|remote process exited or there was a network error|Failed to recv, got 0 bytes",
    re.IGNORECASE,
)


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, what it was raised from or while handling, and the per-rank failures a DCP CheckpointException
    gathered, each once."""
    seen: set[int] = set()
    stack: list[object] = [exc]
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [e.__context__, e.__cause__]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint: {rank: (exception, stack summary)}
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) and f else f for f in failures.values()]


def os_error(exc: BaseException, codes: frozenset[int]) -> OSError | None:
    """The first OSError in `exc`'s chain whose errno is one of `codes`."""
    return next((e for e in causes(exc) if isinstance(e, OSError) and e.errno in codes), None)


def disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT anywhere in the chain, or its text (C++ writers and DCP's gathered tracebacks)."""
    if os_error(exc, DISK_FULL_ERRNOS) is not None:
        return True
    return any(text in str(e) for e in causes(exc) for text in DISK_FULL_TEXT)


def peer_loss(exc: BaseException) -> str | None:
    """The first line of the error that says a peer rank is gone, or None when nothing in the chain says so."""
    for e in causes(exc):
        if isinstance(e, RuntimeError):  # DistBackendError, DistNetworkError and gloo's RuntimeError all are
            text = str(e)
            match = PEER_LOSS.search(text)
            if match:
                return _one_line(text, match)
    return None


def collective_timeout(exc: BaseException) -> str | None:
    """The line that says a collective or the rendezvous timed out waiting for a rank, or None."""
    for e in causes(exc):
        if isinstance(e, RuntimeError):  # DistBackendError, DistStoreError and gloo's RuntimeError all are
            match = COLLECTIVE_TIMEOUT.search(str(e))
            if match:
                return _one_line(str(e), match)
    return None


def _one_line(text: str, match: re.Match) -> str:
    """The line that matched, without gloo's source-file prefix `[/path/pair.cc:553] ` and its advice."""
    start = text.rfind("\n", 0, match.start()) + 1
    end = text.find("\n", match.end())
    line = text[start : end if end >= 0 else len(text)].strip()
    line = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", line)
    return line.split(". This is typically caused", 1)[0].rstrip(".")
