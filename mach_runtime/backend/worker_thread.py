"""WorkerThread: one long-lived daemon thread that runs submitted jobs in order and, when stopped, releases the
MLX streams it created while Python still runs.

Why long-lived: a thread that runs MLX ops leaves an OS thread of MLX's behind when it ends (the worker of the
per-thread stream MLX gave it; ``mx.clear_streams`` does not stop it: ``bench/open_close_leaks.py``), so MLX work
goes to a few threads that live as long as the process. Why the release: MLX keeps per-thread streams, and left
to process exit they are torn down in an order that could abort the interpreter ("terminate called without an
active exception", ~1 exit in 4 of ``mach demo`` on the CPU build before this).

Users: the Decoder's MLX thread (``actors.decoder.MLXThread`` adds reuse across runtimes and an async ``call``)
and ``load_moe``'s reader (``io.load_thread``).
"""

from __future__ import annotations

import queue
import threading


def release_streams(sync=None) -> None:
    """Waits for the calling thread's queued MLX work on ``sync`` (a device or stream; None: the default stream)
    and destroys the streams it created."""
    import mlx.core as mx

    try:
        mx.synchronize() if sync is None else mx.synchronize(sync)
    finally:
        mx.clear_streams()


class WorkerThread:
    """A daemon thread running ``submit``-ted jobs one at a time, in submission order.

    ``sync`` is what the thread waits on before releasing its streams at ``stop``: None (its default stream) for a
    thread that computes on the default device, ``mx.cpu`` for one that only reads into host arrays (so that it
    never creates a GPU stream)."""

    def __init__(self, name: str, sync=None):
        self._sync = sync
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                release_streams(self._sync)
                return
            fn, done = job
            try:
                result, error = fn(), None
            except BaseException as e:  # reported to the submitter, never kills the thread
                result, error = None, e
            if done is not None:
                done(result, error)

    def submit(self, fn, done=None) -> None:
        """Runs ``fn()`` on the thread after the jobs submitted before it; then ``done(result, error)`` there."""
        self._jobs.put((fn, done))

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def stop(self, timeout: float = 30) -> None:
        """Releases the thread's MLX streams after the jobs queued before this and ends it; waits up to ``timeout``
        seconds (a job still running is not waited for longer) unless called from the thread itself."""
        self._jobs.put(None)
        if not self.is_current():
            self._thread.join(timeout=timeout)
