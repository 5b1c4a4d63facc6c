"""The loader's worker processes: how they start, and how they end with the rank that owns them.

A scheduler's preemption signal (SLURM's `scancel --signal`, a job-wide SIGTERM or SIGUSR1) reaches every process
of the job, not only the ranks. The rank asks its trainer to finish the step and checkpoint; a loader worker, the
fork server and multiprocessing's resource tracker died of it instead (torch's worker handler ends a worker that
anyone but its parent signals; SIGUSR1's default action ends a process), so the rank's next batch failed with
"DataLoader worker exited unexpectedly" before the checkpoint, and the steps since the last one were lost. They
ignore both signals now: they end with their rank, which their owner watch and torch's shutdown see to.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing import resource_tracker

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def stop_signals_ignored() -> Iterator[None]:
    """Ignore the stop signals while helper processes start: an ignored signal stays ignored through exec, so the
    fork server and the resource tracker started here outlive a job-wide SIGTERM or SIGUSR1. A signal arriving in
    this short window is lost; outside the main thread (where handlers cannot change) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def start_helpers() -> None:
    """The resource tracker (shared-memory batches register with it) started now, ignoring the stop signals,
    rather than on first use with the rank's handlers reset to the default by exec."""
    with stop_signals_ignored():
        resource_tracker.ensure_running()


def worker_context(method: str, preload: Sequence[str] = ()) -> multiprocessing.context.BaseContext | None:
    """How loader workers start (data.worker_start); None is torch's default, fork.

    A training process has threads (gloo's, the engines', TensorBoard's). On Python 3.11 and older, a fork made
    while a C++ thread was entering Python inherits the interpreter's thread-list lock held, and the child blocks on
    it before running a line (CPython gh-112275, fixed in 3.12): seen here as a ZeRO-3 rank stuck forever starting
    its validation loader's worker while the other rank waited in a collective. A fork server is one process of
    its own, started without those threads, that forks every worker. It imports this module and `preload` (the
    tokenizer's module: unpickling the tokenizer would import transformers in every worker) once, when it starts,
    so that a worker starts in tens of milliseconds. As with spawn, a worker imports the main module again unless
    it was run with `-m` (`python -m toolkit train`, torchrun's `-m toolkit`): scripts need the `__main__` guard.
    """
    if method == "auto":
        method = "fork" if sys.version_info >= (3, 12) else "forkserver"
    if method == "fork":
        return None
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["toolkit.data.loader", *preload])
        with stop_signals_ignored():  # the server, not only its workers, must outlive a job-wide SIGTERM
            multiprocessing.forkserver.ensure_running()  # its imports overlap the model's set-up, not the batch
    return context


def exit_with(pid: int) -> Callable[[int], None]:
    """A worker_init_fn that ends the worker when process `pid` (the rank that owns the loader) ends, and that
    leaves the stop signals to the rank (see the module's docstring).

    A fork-server worker is the server's child, and torch's workers only watch their parent: a rank killed with
    SIGKILL (an elastic restart, a lost node's peer) would leave its workers, and with them the server, waiting
    forever, holding memory and the rank's output pipes. The worker watches the rank through a pidfd instead (Linux
    5.3+; elsewhere it polls the pid every second).
    """
    return functools.partial(_watch_owner, pid)


def _watch_owner(pid: int, worker_id: int) -> None:
    for sig in STOP_SIGNALS:  # after torch's own SIGTERM handler, which ends a worker signalled by anyone else
        signal.signal(sig, signal.SIG_IGN)

    def watch() -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            os._exit(1)
        except (AttributeError, OSError):  # no pidfd here: poll
            while _alive(pid):
                time.sleep(1.0)
            os._exit(1)
        select.select([fd], [], [])  # readable once the process has ended
        os._exit(1)

    threading.Thread(target=watch, name=f"owner-watch-{worker_id}", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        pass
    return True
