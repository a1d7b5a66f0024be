"""The garbage collector paused while a model loads.

Loading builds tens of thousands of objects (modules, arrays, index entries); in a process that imported mlx-lm
and transformers that triggers full collections over a heap of ~200k objects, 0.2-0.35 s of a 17 GB checkpoint's
streaming load on the dev VM (docs/benchmarks.md, P7). Paused, nothing is collected during the load; reference
counting still frees everything acyclic, and the collector runs again as usual afterwards. Counted, so loads on
several threads at once (a draft beside its target) resume it only when the last one ends, and a collector the
program had disabled itself stays disabled.
"""

from __future__ import annotations

import functools
import gc
import threading

_lock = threading.Lock()
_depth = 0
_resume = False  # whether the collector was enabled when the first pause began


def gc_paused(fn):
    """Decorates ``fn`` to run with the collector paused."""

    @functools.wraps(fn)
    def paused(*args, **kwargs):
        global _depth, _resume
        with _lock:
            if _depth == 0:
                _resume = gc.isenabled()
                gc.disable()
            _depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with _lock:
                _depth -= 1
                if _depth == 0 and _resume:
                    gc.enable()

    return paused
