"""The DFlash draft's context cache as a fixed ring: the same rows as dflash-mlx's sink + window cache, no copies.

dflash-mlx's ``ContextOnlyDraftKVCache`` keeps the K/V of the first ``sink`` context rows plus the latest
``window`` rows, and concatenates every append onto the arrays it holds (a copy of the whole context per draft
layer per cycle, and a new shape every cycle). ``RingDraftCache`` holds the same set of rows in buffers of fixed
capacity ``sink + window + 1``: row r (the r-th context row appended) lives at index r while r < sink, else at
``sink + (r - sink) mod window``, so a new row overwrites exactly the row the window drops. The last index is a
trash slot that padded rows of a fixed-shape append (``compiled_draft.py``) write to; it is never attended.

Draft attention has no positional mask (DFlash attends to all of its context; the positions are baked into the
keys by RoPE at append time), so the order of the rows does not matter and ``fetch`` returns the valid prefix of
the buffers as they lie. It is a ``ContextOnlyDraftKVCache`` (same attributes and methods), so dflash-mlx's
draft layers, their context projection and our batched draft pass use it unchanged.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ...errors import ConfigError

try:
    from dflash_mlx.model import ContextOnlyDraftKVCache
except ImportError:  # the [dflash] extra is not installed: nothing can load a DFlash draft to use this with
    ContextOnlyDraftKVCache = object


def ring_index(rows, n: int, sink: int, window: int):
    """Buffer indices of context rows ``rows .. rows + n - 1`` (``rows``: an int or an int32 array)."""
    r = rows + (np.arange(n) if isinstance(rows, int) else mx.arange(n))
    if isinstance(rows, int):
        return np.where(r < sink, r, sink + (r - sink) % window)
    return mx.where(r < sink, r, sink + (r - sink) % window)


class RingDraftCache(ContextOnlyDraftKVCache):
    """``keys`` / ``values`` [1, H, capacity, D] and ``pos`` [capacity] (token positions) are allocated by the first
    append; ``rows`` counts the context rows ever appended, ``offset`` the token positions covered (as in
    dflash-mlx: they differ when a request resumes without the earlier context)."""

    def __init__(self, sink_size: int = 64, window_size: int = 1024):
        if ContextOnlyDraftKVCache is object:
            raise ConfigError("a DFlash draft context needs dflash-mlx: pip install 'mach_runtime[dflash]'")
        super().__init__(sink_size, window_size)
        self.capacity = self.sink_size + self.window_size + 1  # + the trash slot
        self.rows = 0
        self.pos = None

    @property
    def trash(self) -> int:
        return self.capacity - 1

    def cache_length(self) -> int:
        return min(self.rows, self.sink_size + self.window_size)

    def fetch(self):
        if self.keys is None or self.rows == 0:
            return None, None
        n = self.cache_length()
        return self.keys[:, :, :n], self.values[:, :, :n]

    def position_indices(self):
        return None if self.pos is None or self.rows == 0 else self.pos[: self.cache_length()]

    @property
    def positions(self):  # dflash-mlx's attribute, read-only here
        return self.position_indices()

    @positions.setter
    def positions(self, value):
        if value is not None:
            raise AttributeError("RingDraftCache positions are kept by append_context / trim")

    def allocate(self, heads: int, head_dim: int, dtype) -> None:
        shape = (1, heads, self.capacity, head_dim)
        self.keys, self.values = mx.zeros(shape, dtype), mx.zeros(shape, dtype)
        self.pos = mx.zeros((self.capacity,), mx.int32)

    def append_context(self, context_keys, context_values, num_positions, *, positions=None,
                       advance_positions=None) -> None:
        """dflash-mlx's append: ``context_keys`` [1, H, n, D] already RoPE'd at ``positions``; the window is
        applied by where the rows land."""
        if context_keys is None or context_values is None or int(num_positions) <= 0:
            return
        n = int(context_keys.shape[2])
        advance = int(advance_positions if advance_positions is not None else num_positions)
        if n > 0:
            if n > self.window_size + (self.sink_size if self.rows == 0 else 0):
                raise ValueError(f"draft context append of {n} rows exceeds the sink + window "
                                 f"({self.sink_size} + {self.window_size})")  # dflash-mlx selects spans first
            if self.keys is None:
                self.allocate(context_keys.shape[1], context_keys.shape[3], context_keys.dtype)
            if positions is None:
                positions = mx.arange(self.offset, self.offset + n, dtype=mx.int32)
            idx = mx.array(ring_index(self.rows, n, self.sink_size, self.window_size), dtype=mx.int32)
            self.write(idx, context_keys, context_values, positions.astype(mx.int32))
            self.rows += n
        self.offset += advance

    def write(self, idx, keys, values, positions) -> None:
        i4 = idx.reshape(1, 1, -1, 1)
        self.keys = mx.put_along_axis(self.keys, i4, keys.astype(self.keys.dtype), axis=2)
        self.values = mx.put_along_axis(self.values, i4, values.astype(self.values.dtype), axis=2)
        self.pos = mx.put_along_axis(self.pos, idx, positions, axis=0)

    def _apply_window(self) -> None:  # the ring applies it
        pass

    def trim(self, n_tokens: int) -> None:
        """Drops every row at token position >= ``n_tokens``; the kept rows are laid out again in position order
        (a valid ring state for their count). Rare: a reused prefix shorter than the context."""
        if self.rows and self.pos is not None:
            n = self.cache_length()
            pos = np.array(self.pos[:n])
            order = np.argsort(pos, kind="stable")
            keep = order[pos[order] < n_tokens]
            if len(keep) < n or not np.array_equal(keep, np.arange(n)):
                k = mx.array(keep.astype(np.int32))
                kept_k, kept_v, kept_p = self.keys[:, :, k], self.values[:, :, k], self.pos[k]
                heads, dim, dtype = self.keys.shape[1], self.keys.shape[3], self.keys.dtype
                self.allocate(heads, dim, dtype)
                self.rows = 0
                if len(keep):
                    self.write(mx.arange(len(keep), dtype=mx.int32), kept_k, kept_v, kept_p)
                    self.rows = len(keep)
        self.offset = min(self.offset, n_tokens)
