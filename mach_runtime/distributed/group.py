"""The distributed group: MLX's own ``mx.distributed`` (started by ``mlx.launch``), the backend choice, the one
host-bytes collective the runtime needs (``exchange``), and the watchdog that keeps a lost rank from hanging it.

Backends: "auto" takes the one mlx.launch prepared for this process (its environment says which: ring, nccl,
jaccl or mpi; ``config.launched_backend``). "nccl" on an MLX without CUDA falls back to the ring backend with a
message saying so (``choose_backend``). Not launched at all, the group is this process alone (size 1).

``exchange``: rank 0's step payload to every rank, and every rank's status back to rank 0, in ONE
``mx.distributed.all_sum`` over a uint8 buffer (each byte is written by exactly one rank, the others add zeros);
a payload longer than the inline part takes a second all_sum of its remainder. No transport of our own.

What a dead peer does to MLX's collectives (measured, ring backend, CPU, MLX 0.32.4: docs/distributed.md): a
killed process closes its sockets, and its neighbours' pending collective usually fails with an exception within
milliseconds, but not always (in 3 of 5 test runs it kept waiting until the watchdog's timeout). A peer that stops
without closing (a frozen host, a cut cable) leaves the collective blocked for good. The ``Watchdog`` covers both:
a thread that sees a guarded section (a step, an exchange) run longer than the timeout and calls ``on_timeout`` —
rank 0 fails every request in flight with ``DistributedError``; a follower exits the process.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import ConfigError, DistributedError

INLINE = 4096  # payload bytes carried by the first all_sum of an exchange
STATUS = 32  # status bytes per rank


def cuda_build() -> bool:
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)
    try:
        return bool(cuda is not None and cuda.is_available())
    except Exception:  # pragma: no cover - an MLX without the query
        return False


def choose_backend(requested: str, launched: str | None, cuda: bool) -> tuple[str, str | None]:
    """(backend to init, a note for the user or None). ``requested``: the setting ("auto" or a name);
    ``launched``: the backend mlx.launch prepared (None: not launched); ``cuda``: MLX is a CUDA build."""
    if requested == "auto":
        if launched is not None:
            return launched, None
        return ("nccl" if cuda else "ring"), None
    if requested == "nccl" and not cuda:
        return "ring", ("backend 'nccl' needs MLX's CUDA build (pip install 'mach-runtime[cuda]') and NVIDIA GPUs; "
                        "this MLX has no CUDA, so the ring backend (TCP) is used instead: launch with "
                        "`mlx.launch --backend ring ...`")
    if launched is not None and requested != launched:
        return requested, (f"backend {requested!r} requested but mlx.launch prepared {launched!r}; the group may "
                           f"fail to form: launch with `mlx.launch --backend {requested} ...`")
    return requested, None


@dataclass
class Group:
    """One process's view of the group: ``rank``, ``size``, ``backend`` and MLX's group object (``mx``)."""

    mx_group: object
    rank: int
    size: int
    backend: str

    @property
    def leader(self) -> bool:
        return self.rank == 0


_GROUP: Group | None = None


def init(backend: str = "auto") -> Group:
    """Joins the group mlx.launch started (once per process; later calls return it). Call on the MLX thread."""
    global _GROUP
    if _GROUP is not None:
        return _GROUP
    import mlx.core as mx

    from ..config import launched_backend

    launched = launched_backend()
    chosen, note = choose_backend(backend, launched, cuda_build())
    if note:
        print(f"[mach] distributed: {note}", file=sys.stderr)
    if launched is None:
        print("[mach] distributed: not started by mlx.launch: this process is a group of one (launch with "
              "`mlx.launch -n N --backend ring ...` or a hostfile to use N processes)", file=sys.stderr)
        g = mx.distributed.init(strict=False, backend="ring")
    else:
        try:
            g = mx.distributed.init(strict=True, backend=chosen)
        except Exception as e:
            raise ConfigError(f"cannot join the {chosen} group mlx.launch prepared ({type(e).__name__}: {e}); check "
                              "the hostfile / --backend given to mlx.launch") from None
    _GROUP = Group(g, g.rank(), g.size(), chosen if launched is not None else "single")
    return _GROUP


def current() -> Group | None:
    return _GROUP


def all_sum(x, group: Group):
    import mlx.core as mx

    return mx.distributed.all_sum(x, group=group.mx_group)


def exchange(group: Group, payload: bytes | None, status: bytes) -> tuple[bytes, list[bytes]]:
    """Rank 0 passes ``payload`` (others None) and every rank its ``status`` (at most STATUS bytes); returns
    (rank 0's payload, every rank's status), on every rank. Blocks until every rank has called it."""
    import mlx.core as mx
    import numpy as np

    if len(status) > STATUS:
        raise ValueError(f"status of {len(status)} bytes > {STATUS}")
    n = group.size
    head = 8 + STATUS * n
    buf = np.zeros(head + INLINE, dtype=np.uint8)
    if group.rank == 0:
        data = payload or b""
        buf[:8] = np.frombuffer(len(data).to_bytes(8, "little"), dtype=np.uint8)
        first = data[:INLINE]
        buf[head:head + len(first)] = np.frombuffer(first, dtype=np.uint8)
    s = 8 + STATUS * group.rank
    buf[s:s + len(status)] = np.frombuffer(status, dtype=np.uint8)
    out = np.array(all_sum(mx.array(buf), group))
    length = int.from_bytes(out[:8].tobytes(), "little")
    statuses = [out[8 + STATUS * r: 8 + STATUS * (r + 1)].tobytes() for r in range(n)]
    data = out[head:head + min(length, INLINE)].tobytes()
    if length > INLINE:
        rest = np.zeros(length - INLINE, dtype=np.uint8)
        if group.rank == 0:
            rest[:] = np.frombuffer(payload[INLINE:], dtype=np.uint8)
        data += np.array(all_sum(mx.array(rest), group)).tobytes()
    return data, statuses


# how MLX's backends word a failed collective (ring, measured: RuntimeError "[ring] connection to a peer was lost"
# ~0.1 s after the peer's process was killed)
_BACKEND_TAGS = ("[ring]", "[nccl]", "[jaccl]", "[mpi]")


def collective_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because the group broke (not a fault of one request)."""
    return isinstance(e, DistributedError) or (isinstance(e, RuntimeError) and str(e).lstrip().startswith(_BACKEND_TAGS))


LOST_FIX = "A rank died or stopped answering; restart every rank (mlx.launch)"


def lost_error(group: Group, what: str, cause: BaseException | str, fix: str = LOST_FIX) -> DistributedError:
    """The error in-flight requests get when the group is lost."""
    return DistributedError(
        f"the distributed group is lost (rank {group.rank} of {group.size}, {group.backend} backend): {what}: "
        f"{cause}. {fix}")


class Watchdog:
    """A daemon thread that calls ``on_timeout(what, seconds)`` once when a ``guard(what)`` section has been open
    longer than ``timeout`` seconds (the MLX thread stuck in a collective whose peer is gone)."""

    def __init__(self, timeout: float, on_timeout, poll: float = 0.2):
        self.timeout = float(timeout)
        self.on_timeout = on_timeout
        self.poll = poll
        self._open: tuple[str, float, float] | None = None  # (what, since, limit)
        self._fired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mach-dist-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def guard(self, what: str, timeout: float | None = None):
        self._open = (what, time.monotonic(), self.timeout if timeout is None else float(timeout))
        try:
            yield
        finally:
            self._open = None

    @property
    def fired(self) -> bool:
        return self._fired

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            cur = self._open
            if cur is None or self._fired:
                continue
            what, since, limit = cur
            elapsed = time.monotonic() - since
            if elapsed > limit:
                self._fired = True
                try:
                    self.on_timeout(what, elapsed)
                except Exception as e:  # pragma: no cover - reported, never raised into the thread
                    print(f"[mach] distributed watchdog: {type(e).__name__}: {e}", file=sys.stderr)
