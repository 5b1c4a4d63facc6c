"""Starts loader-style child processes while C threads keep entering Python; prints how many never started.

A C thread's first call into Python makes its thread state under the interpreter's thread-list lock without holding
the GIL. A fork at that moment copies the lock held, and on Python 3.11 and older the child blocks on it before it
runs a line (CPython gh-112275): how a training process with gloo and engine threads could fork a data-loader
worker that never starts. Run: python tests/fork_storm.py METHOD N (METHOD as data.worker_start).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit.data.workers import worker_context

ENTER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(lambda _: None)  # a ctypes callback: PyGILState_Ensure
LIBC = ctypes.CDLL(None)
LIBC.pthread_create.argtypes = [ctypes.POINTER(ctypes.c_ulong), ctypes.c_void_p, type(ENTER), ctypes.c_void_p]
LIBC.pthread_join.argtypes = [ctypes.c_ulong, ctypes.c_void_p]


def storm(stop: threading.Event) -> None:
    """C threads, one after another, each entering Python once."""
    while not stop.is_set():
        tid = ctypes.c_ulong()
        LIBC.pthread_create(ctypes.byref(tid), None, ENTER, None)
        LIBC.pthread_join(tid.value, None)


def started(queue) -> None:
    queue.put(1)


def main(method: str, n: int) -> int:
    context = worker_context(method) or multiprocessing.get_context("fork")
    stop = threading.Event()
    threads = [threading.Thread(target=storm, args=(stop,), daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    hung = 0
    try:
        for _ in range(n):
            queue = context.Queue()
            child = context.Process(target=started, args=(queue,))
            child.start()
            child.join(10)
            if child.is_alive():
                hung += 1
                child.kill()
                child.join()
    finally:
        stop.set()
    print(f"{method}: {hung} of {n} children never started")
    return hung


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
