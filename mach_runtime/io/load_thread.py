"""The one thread that runs ``load_moe``'s background reads (``non_experts.Prefetch``), for the life of the process.

A thread that runs MLX ops leaves an OS thread of MLX's behind when it ends (``backend/worker_thread.py``). A fresh
thread per ``load_moe`` added one OS thread per load (``bench/open_close_leaks.py``: 58 -> 65 over 8 runtimes on
an H200). So every load's read runs on this one ``WorkerThread``, started at the first load and parked between
them; at exit it releases its MLX streams (the CPU's: it reads into host arrays and never computes on the GPU)
while Python still runs. Jobs run one at a time in submission order: two loads at once read one after the other
(they share a disk anyway).
"""

from __future__ import annotations

import atexit
import threading

from mach_runtime.backend.worker_thread import WorkerThread

NAME = "mach-load-reader"
_lock = threading.Lock()
_worker: WorkerThread | None = None


def submit(job) -> None:
    """Runs ``job()`` on the reader thread, after the jobs submitted before it (a job hands its own errors to its
    caller: Prefetch keeps them)."""
    global _worker
    with _lock:
        if _worker is None:
            import mlx.core as mx

            _worker = WorkerThread(NAME, sync=mx.cpu)
            atexit.register(_stop)
        _worker.submit(job)


def wait_idle(timeout: float) -> bool:
    """Whether every job submitted so far has finished within ``timeout`` seconds: jobs run in order, so a marker
    job submitted now runs once they have."""
    reached = threading.Event()
    submit(reached.set)
    return reached.wait(timeout)


def _stop() -> None:
    """At exit: the thread releases its MLX streams and ends (bounded: a read still running is not waited for)."""
    global _worker
    with _lock:
        worker, _worker = _worker, None
    if worker is not None and worker.is_alive():
        worker.stop(timeout=5)
