"""The garbage collector's freeze, scoped to the runtimes that are open.

A runtime freezes the collector (``gc.freeze()``) while it serves: the model's many long-lived objects leave the
collector's reach, so the collections that decoding's short-lived arrays trigger stay short (on the H100 the spec
decode ran ~10 % faster with gc off). The freeze is process-wide, so it is counted: the last runtime to close
unfreezes, and what was frozen goes back to the oldest generation, collectable once unreachable.

A runtime freezes at its first request, not at open: in ``for ...: async with Runtime.open(ck) as rt:`` the
previous runtime is still named by ``rt`` while the next one loads, and freezing then kept its (cyclic) garbage
out of the collector's reach for good (~51 MB a cycle on the demo model, docs/benchmarks.md).
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_frozen_by = 0  # open runtimes that froze the collector


def gc_freeze() -> None:
    """Collects, then freezes what is alive (once per runtime, at its first request)."""
    global _frozen_by
    with _lock:
        _frozen_by += 1
    gc.collect()
    gc.freeze()


def gc_unfreeze() -> None:
    """Undoes one runtime's freeze; the last one unfreezes the collector."""
    global _frozen_by
    with _lock:
        _frozen_by -= 1
        last = _frozen_by == 0
    if last:
        gc.unfreeze()
