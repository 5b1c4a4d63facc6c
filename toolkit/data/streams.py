"""The bytes of a shard that is not a local file: a `pipe:CMD` or a URL, each read with a deadline.

A stream that stops giving bytes must not hang a run: after READ_TIMEOUT_S (env NANOVLM_SHARD_READ_TIMEOUT_S;
0 waits forever) the read fails with ShardStalled, an OSError, which the reader retries and then counts as an
unreadable shard. While it waits, a warning names the shard every STALL_LOG_S seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO

log = logging.getLogger(__name__)

READ_TIMEOUT_ENV = "NANOVLM_SHARD_READ_TIMEOUT_S"
READ_TIMEOUT_S = float(os.environ.get(READ_TIMEOUT_ENV, "300"))
STALL_LOG_S = 30.0  # while a stream gives nothing, say so this often
PIPE_CLOSE_WAIT_S = 10.0  # a command still running when its shard is closed is killed after this
CHUNK = 1 << 20  # bytes taken from the pipe or the URL at once
READ_AHEAD = 4  # chunks a URL's reader thread fetches before the decoder asks: network overlaps decoding


class ShardStalled(OSError):
    """A streamed shard gave no data for READ_TIMEOUT_S: a failed read, retried and then counted as unreadable."""


def wait_for_data(path: str, ready: Callable[[float], bool]) -> None:
    """Return once `ready(seconds)` (which waits up to that long) says data came; ShardStalled past the deadline."""
    start = time.monotonic()
    while True:
        waited = time.monotonic() - start
        timeout = READ_TIMEOUT_S
        if timeout and waited >= timeout:
            raise ShardStalled(
                f"the stream gave no data for {waited:.0f} s; check it, or set {READ_TIMEOUT_ENV} (seconds, 0 = "
                "wait forever) if it is slow but alive"
            )
        if ready(STALL_LOG_S if not timeout else min(STALL_LOG_S, timeout - waited)):
            return
        if time.monotonic() - start >= STALL_LOG_S:
            log.warning(
                "waiting for %s: no data for %.0f s (a failed read after %s)",
                path,
                time.monotonic() - start,
                f"{timeout:g} s, {READ_TIMEOUT_ENV}" if timeout else f"ever: {READ_TIMEOUT_ENV}=0",
            )


class _Buffered:
    """read(size) over `_fill()`, which appends the next chunk to `buf` (b"" at the end): tarfile's stream mode
    reads 10 KiB at a time, so the deadline is paid once per chunk, not once per read."""

    def __init__(self) -> None:
        self.buf, self.ended, self.stalled = bytearray(), False, False

    def read(self, size: int = -1) -> bytes:
        """`size` bytes (all the rest for -1); fewer only at the end of the stream."""
        while not self.ended and (size < 0 or len(self.buf) < size):
            try:
                chunk = self._fill()
            except ShardStalled:
                self.stalled = True
                raise
            self.buf += chunk
            self.ended = not chunk
        size = len(self.buf) if size < 0 else min(size, len(self.buf))
        out = bytes(self.buf[:size])
        del self.buf[:size]
        return out

    def _fill(self) -> bytes:
        raise NotImplementedError


class PipeStream(_Buffered):
    """The output of `pipe:CMD` (WebDataset's convention), read with a deadline.

    webdataset's own pipe blocks in read() for as long as the command stays silent, so a stalled download hung
    the run without a word. Here every read waits with select(). The command runs in its own process group so
    that a stalled shell and its children are killed together (killing the shell alone leaves `sleep`, `aws` ...
    holding the pipe open)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.proc = subprocess.Popen(path[len("pipe:") :], shell=True, stdout=subprocess.PIPE, start_new_session=True)
        self.fd = self.proc.stdout.fileno()

    def _fill(self) -> bytes:
        wait_for_data(self.path, lambda seconds: bool(select.select([self.fd], [], [], seconds)[0]))
        return os.read(self.fd, CHUNK)

    def close(self) -> None:
        """Close our end and reap the command; OSError if it failed (exit status other than 0 or SIGPIPE's)."""
        if self.proc.stdout.closed:
            return
        self.proc.stdout.close()
        if self.stalled:
            self._kill()
        try:
            status = self.proc.wait(timeout=PIPE_CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            self._kill()
            status = self.proc.wait()
        if status not in (0, 128 + signal.SIGPIPE, -signal.SIGPIPE) and not self.stalled:
            raise OSError(f"{self.path}: the command exited with status {status}")

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


class UrlStream(_Buffered):
    """A URL's bytes through fsspec (s3://, gs://, http(s)://, hf:// ...), fetched ahead by a thread, with a deadline.

    Each fsspec backend has its own timeouts, or none: a connection that stays open but sends nothing could
    block read() for good. Here a daemon thread opens the URL and reads chunks into a bounded queue while the
    decoder works, and the decoder waits on that queue with the deadline. A stalled thread is abandoned: close()
    closes its file, which ends most blocked reads, and the thread stops at its next chunk."""

    def __init__(self, path: str, opener: Callable[[str], IO[bytes]]) -> None:
        super().__init__()
        self.path, self._closed = path, threading.Event()
        self._chunks: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=READ_AHEAD)
        self._file: IO[bytes] | None = None
        self._next: bytes | BaseException | None = None
        self._opened, self._open_error = threading.Event(), None
        threading.Thread(target=self._fetch, args=(opener,), name=f"shard {path}", daemon=True).start()
        try:  # the open's own failure (no such object, no access) or stall is the open's, not a read's
            wait_for_data(path, self._opened.wait)
        except ShardStalled:
            self.close()
            raise
        if self._open_error is not None:
            raise _as_read_error(self.path, self._open_error)

    def _fetch(self, opener: Callable[[str], IO[bytes]]) -> None:
        try:
            self._file = opener(self.path)
        except BaseException as exc:
            self._open_error = exc
            return
        finally:
            self._opened.set()
        if self._closed.is_set():  # given up on while it opened
            self.close()
            return
        try:
            while not self._closed.is_set():
                chunk = self._file.read(CHUNK)
                self._put(chunk)
                if not chunk:
                    return
        except BaseException as exc:  # handed to the decoder, which raises it as its own read's error
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._closed.is_set():
            with contextlib.suppress(queue.Full):
                self._chunks.put(item, timeout=0.5)
                return

    def _ready(self, seconds: float) -> bool:
        try:
            self._next = self._chunks.get(timeout=seconds)
        except queue.Empty:
            return False
        return True

    def _fill(self) -> bytes:
        wait_for_data(self.path, self._ready)
        item, self._next = self._next, None
        if isinstance(item, BaseException):
            raise _as_read_error(self.path, item)
        return item or b""

    def close(self) -> None:
        self._closed.set()
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()


def _as_read_error(path: str, exc: BaseException) -> BaseException:
    """The thread's error as the decoder's read's: OSError and ValueError (what the reader retries and counts)
    as they are, anything else (a backend's own exception class) as an OSError naming the shard."""
    if isinstance(exc, OSError | ValueError):
        return exc
    error = OSError(f"{path}: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error
