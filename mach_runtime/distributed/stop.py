"""Stopping a distributed group cleanly, whichever process is told to stop.

The group ends one way: rank 0's runtime closes (mach-serve: after uvicorn's graceful drain), its last step
exchange carries a ``Shutdown`` and every follower ends with exit status 0 (``actors/distributed.py``). This
module routes every other stop to that path:

* **A follower signalled** (SIGTERM, or SIGINT: Ctrl-C reaches every process of the launcher's group):
  ``follow_signals`` turns the first signal into a stop request; the follower keeps following, and its next step
  exchange carries the request to rank 0 (a status byte, ``StepSync``), which stops as if signalled itself
  (``stop_leader``). A second signal ends the follower at once.
* **Rank 0 told by a follower** (or its launcher gone): ``stop_leader`` sends its own process SIGTERM, once
  (mach-serve: uvicorn drains in-flight requests, ``--shutdown-timeout``, then closes the runtime; a Python
  program without a SIGTERM handler ends, and its followers exit when the group breaks).
* **The launcher gone** (SIGTERM or SIGKILL to ``mlx.launch`` alone: it forwards no signal to the ranks, so they
  would run on as orphans, rank 0 still serving): ``watch_launcher`` notices the parent process change (mlx.launch
  execs each rank as its direct child; over ssh, the remote shell's end has the same effect), points stdout and
  stderr at /dev/null when they were pipes to the launcher (nobody reads them any more; a write would raise), and
  stops the rank as above.

Signals can only be handled on the main thread: ``follow_signals`` returns False elsewhere (the rank then keeps
Python's default handling).
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import threading
import time

_requested = threading.Event()
_reason: list[str] = []
_leader_stopping = threading.Event()
_watching = threading.Event()


def say(msg: str) -> None:
    """A line on stderr that never raises (the launcher reading our stderr may be gone)."""
    try:
        print(msg, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def request(why: str) -> None:
    """Asks the group to stop (a follower: rank 0 hears of it at the next step exchange)."""
    if not _requested.is_set():
        _reason.append(why)
        _requested.set()


def requested() -> bool:
    return _requested.is_set()


def reason() -> str | None:
    return _reason[0] if _reason else None


def follow_signals(rank: int) -> bool:
    """A follower's SIGTERM / SIGINT: the first asks rank 0 to stop the group, a second ends this process now.
    Returns whether the handlers are installed (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return False

    def handler(sig, frame):
        name = signal.Signals(sig).name
        if _requested.is_set():  # a second signal: no more waiting for rank 0
            say(f"[mach] distributed rank {rank}: {name} again: ending now")
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
            return
        request(f"{name} received")
        say(f"[mach] distributed rank {rank}: {name}: asking rank 0 to shut the group down (send it again to end "
            "this rank at once)")

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    return True


def stop_leader(why: str) -> None:
    """Rank 0: SIGTERM to its own process, once (the graceful shutdown its signal handler runs)."""
    if _leader_stopping.is_set():
        return
    _leader_stopping.set()
    say(f"[mach] distributed rank 0: {why}: shutting the group down")
    os.kill(os.getpid(), signal.SIGTERM)


def _quiet_pipes() -> None:
    """stdout / stderr that were pipes to the (gone) launcher -> /dev/null."""
    null = None
    for fd in (1, 2):
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                if null is None:
                    null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, fd)
        except OSError:
            pass
    if null is not None:
        os.close(null)


def watch_launcher(on_gone, poll: float = 0.5) -> bool:
    """Under mlx.launch: a daemon thread that calls ``on_gone(why)`` once when this process's parent (the launcher)
    is gone. Once per process; returns whether it watches."""
    from ..config import launched_rank

    if launched_rank() is None or _watching.is_set():
        return False
    parent = os.getppid()
    if parent <= 1:  # already orphaned (or a container's init): nothing to watch
        return False
    _watching.set()

    def run():
        while os.getppid() == parent:
            time.sleep(poll)
        _quiet_pipes()
        on_gone(f"the launcher (pid {parent}) is gone")

    threading.Thread(target=run, name="mach-dist-launcher-watch", daemon=True).start()
    return True
