"""The one MLX thread, and waking async code from it.

MLX is not thread-safe and its streams are thread-local, so every ``mx`` call of the process runs on one
long-lived thread: the model is loaded there and the Decoder's loop runs there. Async code hands it work with
``await mlx.call(fn)``; the thread answers by scheduling a callback on the caller's event loop, which works the
same under asyncio and trio (``call_soon``). anyio's worker-thread pool is never used for MLX.

A runtime takes its MLX thread with ``MLXThread.acquire()`` and hands it back with ``release()`` when it closes:
the thread then waits, idle, for the next runtime of the process. Ending it instead would leak an OS thread per
open/close: MLX (0.32.4) starts a worker thread for every stream a thread uses, and ``mx.clear_streams()`` does
not end it (measured: each short-lived thread that evaluates one op leaves one OS thread behind). Reusing the
thread reuses its streams, so a process that opens and closes runtimes in a loop keeps a flat thread count; at
most as many MLX threads exist as runtimes were ever open at once. Idle threads release their streams at exit.
"""

from __future__ import annotations

import atexit
import queue
import threading

import anyio
import anyio.lowlevel


def loop_token():
    """The running event loop's native token (asyncio loop or TrioToken); call from async code."""
    return anyio.lowlevel.current_token().native_token


def call_soon(token, fn, *args) -> bool:
    """Schedules ``fn(*args)`` on the event loop of ``token`` from any thread, without waiting.

    Returns False if that loop is gone (the runtime already shut down).
    """
    try:
        if hasattr(token, "call_soon_threadsafe"):  # asyncio event loop
            token.call_soon_threadsafe(fn, *args)
        else:  # trio.lowlevel.TrioToken
            token.run_sync_soon(fn, *args)
        return True
    except RuntimeError:  # loop closed / trio run finished
        return False


def _release_streams() -> None:
    """Waits for this thread's queued MLX work and destroys the streams it created, while Python still runs.
    MLX keeps per-thread streams (and their worker threads); left to process exit they are torn down in an
    order that could abort the interpreter ("terminate called without an active exception", ~1 exit in 4 of
    ``mach demo`` on the CPU build before this)."""
    import mlx.core as mx

    try:
        mx.synchronize()
    finally:
        mx.clear_streams()


class MLXThread:
    """A single daemon thread running submitted jobs in order."""

    _idle: list["MLXThread"] = []  # threads of closed runtimes, waiting for the next one (see the module doc)
    _idle_lock = threading.Lock()

    @classmethod
    def acquire(cls) -> "MLXThread":
        """An idle MLX thread of a closed runtime, or a new one."""
        with cls._idle_lock:
            while cls._idle:
                t = cls._idle.pop()
                if t._thread.is_alive():
                    return t
        return cls()

    def release(self, idle: bool = False) -> None:
        """Hands the thread back for reuse: at once if the caller knows it is ``idle`` (its last job returned),
        else once every job queued on it has run (a thread stuck in a job never comes back: the next runtime
        then starts its own)."""
        if idle:
            self._park()
        else:
            self.submit(self._park)

    def _park(self) -> None:
        with self._idle_lock:
            self._idle.append(self)

    @classmethod
    def _stop_idle(cls) -> None:
        """At exit: idle threads release their MLX streams while Python still runs."""
        with cls._idle_lock:
            idle, cls._idle[:] = list(cls._idle), []
        for t in idle:
            t.stop()

    def __init__(self, name: str = "mach-mlx"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                _release_streams()
                return
            fn, done = job
            try:
                result, error = fn(), None
            except BaseException as e:  # reported to the submitter, never kills the thread
                result, error = None, e
            if done is not None:
                done(result, error)

    def submit(self, fn, done=None) -> None:
        """Runs ``fn()`` on the thread; then ``done(result, error)`` on the thread."""
        self._jobs.put((fn, done))

    async def call(self, fn):
        """Runs ``fn()`` on the MLX thread and returns its result (or raises its exception)."""
        token, event, box = loop_token(), anyio.Event(), {}

        def done(result, error):
            box["result"], box["error"] = result, error
            call_soon(token, event.set)

        self.submit(fn, done)
        with anyio.CancelScope(shield=True):  # the job runs to completion anyway: wait for its answer
            await event.wait()
        if box["error"] is not None:
            raise box["error"]
        return box["result"]

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def stop(self) -> None:
        self._jobs.put(None)
        if not self.is_current():
            self._thread.join(timeout=30)


atexit.register(MLXThread._stop_idle)
