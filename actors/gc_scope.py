"""The garbage collector's freeze, scoped to the runtimes that are open.

A runtime freezes the collector (``gc.freeze()``) while it serves: the model's many long-lived objects leave the
collector's reach, so the collections that decoding's short-lived arrays trigger stay short (on the H100 the spec
decode ran ~10 % faster with gc off). The freeze is process-wide, so it is counted: the last runtime to close
unfreezes, and what was frozen goes back to the oldest generation, collectable once unreachable.

Before, the freeze was never undone: in ``for ...: async with Runtime.open(ck) as rt:`` the previous runtime is
still named by ``rt`` while the next one loads, so each freeze kept the previous runtime out of the collector's
reach for good (~51 MB a cycle on the demo model, docs/benchmarks.md). Now a closed runtime has dropped its model
and KV (freed by reference counting, frozen or not), and what the freeze kept of it becomes collectable once the
runtimes that froze it have closed: at most one closed runtime's shell waits, however many cycles run.
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_frozen_by = 0  # open runtimes that froze the collector


def gc_freeze() -> None:
    """Collects, then freezes what is alive (once per runtime, after it loaded)."""
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
