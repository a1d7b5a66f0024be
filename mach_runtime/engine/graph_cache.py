"""An LRU of ``mx.compile``d functions keyed by what makes their shapes static (block length, span, ...).

A compiled function retraces for every new input shape it meets and keeps each trace; keying one function per
static-shape key, and dropping the least recently used beyond ``max_graphs``, bounds what a long-running engine
keeps. ``inputs``: the modules whose parameters are the functions' implicit inputs (later weight updates are
seen)."""

from __future__ import annotations

from collections import OrderedDict

import mlx.core as mx


class GraphCache:
    def __init__(self, max_graphs: int, inputs):
        self.max_graphs = max_graphs
        self.inputs = inputs
        self._fns: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._fns)

    def get(self, key, build):
        """The compiled function for ``key``; ``build()`` gives the plain function the first time."""
        fn = self._fns.get(key)
        if fn is None:
            fn = mx.compile(build(), inputs=self.inputs)
            self._fns[key] = fn
            while len(self._fns) > self.max_graphs:
                self._fns.popitem(last=False)
        else:
            self._fns.move_to_end(key)
        return fn
