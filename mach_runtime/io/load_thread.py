"""The one thread that runs ``load_moe``'s background reads (``non_experts.Prefetch``), for the life of the process.

A thread that runs MLX ops leaves an OS thread of MLX's behind when it ends (the worker of the per-thread stream
MLX gave it; ``mx.clear_streams`` does not stop it). Measured on the CPU build and on MLX CUDA: a fresh thread per
``load_moe`` added one OS thread per load (``bench/open_close_leaks.py``: 58 -> 65 over 8 runtimes on an H200).
So every load's read runs on this one thread, started at the first load and parked between them; at exit it
releases its MLX streams while Python still runs (``backend/mlx_streams.py``). Jobs run one at a time in
submission order: two loads at once read one after the other (they share a disk anyway).
"""

from __future__ import annotations

import atexit
import queue
import threading

from mach_runtime.backend.mlx_streams import release_streams

NAME = "mach-load-reader"
_lock = threading.Lock()
_jobs: queue.SimpleQueue | None = None
_thread: threading.Thread | None = None


def _run(jobs: queue.SimpleQueue) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        job()  # a job hands its own errors to its caller (Prefetch keeps them); nothing escapes here


def submit(job) -> None:
    """Runs ``job()`` on the reader thread, after the jobs submitted before it."""
    global _jobs, _thread
    with _lock:
        if _thread is None:
            _jobs = queue.SimpleQueue()
            _thread = threading.Thread(target=_run, args=(_jobs,), name=NAME, daemon=True)
            _thread.start()
            atexit.register(_stop)
        _jobs.put(job)


def wait_idle(timeout: float) -> bool:
    """Whether every job submitted so far has finished within ``timeout`` seconds: jobs run in order, so a marker
    job submitted now runs once they have."""
    reached = threading.Event()
    submit(reached.set)
    return reached.wait(timeout)


def _stop() -> None:
    """At exit: the thread releases its MLX streams and ends (bounded: a read still running is not waited for)."""
    global _thread
    with _lock:
        thread, jobs, _thread = _thread, _jobs, None
    if thread is None or not thread.is_alive():
        return
    import mlx.core as mx

    jobs.put(lambda: release_streams(mx.cpu))  # it reads into host arrays: never make it a GPU stream
    jobs.put(None)
    thread.join(timeout=5)
