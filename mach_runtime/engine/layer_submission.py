"""Decode forwards handed to the MLX stream layer by layer (``SubmittingCaches``), an option of the batch engine
(``BatchEngine(submit_layers=)``, ``MACH_SUBMIT_LAYERS``; off by default: docs/benchmarks.md, "The CPU decode
step's host side")."""

from __future__ import annotations

import mlx.core as mx


def _state_arrays(cache) -> list:
    """The arrays a layer's cache holds after the layer queued its update (keys and values, or a recurrent state)."""
    out, todo = [], [getattr(cache, n, None) for n in ("keys", "values", "cache")]
    while todo:
        x = todo.pop()
        if isinstance(x, mx.array):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
    return out


class SubmittingCaches(list):
    """The per-layer batch caches as a decode forward gets them when ``submit_layers`` is on (``MACH_SUBMIT_LAYERS``,
    off by default): when the forward takes layer i+1's cache (``zip(layers, cache)``), layer i's queued work is
    submitted (``mx.async_eval`` of its cache's new state), so the stream computes layer i while Python builds
    layer i+1.

    Why it exists: ``mx.async_eval`` lets the calling thread run at most ~100 CPU ops ahead of the stream's worker
    (MLX's back-pressure: more than 10 active tasks of 10 dispatches and the caller waits), so it returns only once
    the submitted step is nearly computed; a decode step of the demo model is ~1,400 ops, and the next step's graph
    is built while the worker has ~1 ms of work left. Submitted layer by layer, each layer's build overlaps the
    computation of the ones before. Why it is off: on the 2-core CPU at load ~2 it cost ~2 ms more CPU per step
    (more, shorter submissions: the Python thread and the worker each) and the worker was never short of work, so
    steps were ~12 % slower (docs/benchmarks.md); it can only pay where a core is idle while Python builds
    (``bench/decode_step.py`` measures both). The graph, and so every result, is the same either way. A forward
    that does not iterate its caches gets no submissions."""

    def __iter__(self):
        prev = None
        for c in list.__iter__(self):
            if prev is not None:
                arrays = _state_arrays(prev)
                if arrays:
                    mx.async_eval(*arrays)
            yield c
            prev = c
