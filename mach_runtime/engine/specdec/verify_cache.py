"""Verify-ready KV caches: the cache classes a speculative cycle's multi-token forwards and rollbacks need.

* ``ExactRotatingKVCache``: mlx-lm's sliding-window ``RotatingKVCache`` with a ``trim`` that is exact whether or
  not the window has wrapped (a rejected verify tail is trimmed, never re-derived);
* ``BucketedKVCache`` / ``BucketedBatchKVCache``: multi-token forwards attend over KV lengths rounded up to a few
  buckets (``kv_bucket``) in buffers that only grow, so a GPU backend meets few shapes.

They are built over an mlx-lm cache's state as new objects (``exact_rotating_caches``, ``bucket_kv_caches``,
``bucket_batch_caches`` replace the entries of a cache list) and turned back into mlx-lm's own classes for a batch
to merge (``plain_caches``); no object changes class.
"""

from __future__ import annotations

import mlx.core as mx


# -- sliding windows: an exact trim for mlx-lm's RotatingKVCache --------------------------------------------------


def _exact_rotating_class():
    from mlx_lm.models.cache import RotatingKVCache

    class ExactRotatingKVCache(RotatingKVCache):
        """mlx-lm's ``RotatingKVCache`` with a ``trim`` that is exact after any multi-token update.

        mlx-lm's ``trim`` only moves ``offset`` and ``_idx`` back and leaves the rejected rows in the buffer,
        and its ``is_trimmable`` is ``offset < max_size``, checked *before* the verify. A verify that starts
        inside the window and ends past it (offset 2, window 4, 8 tokens: the concatenated buffer holds 10
        rows) then trims into a state the next single-token update mishandles: it keeps the *last* ``max_size``
        rows of the buffer, the rejected ones. Once wrapped, trimming is refused altogether, so every partial
        acceptance would cost a re-run.

        Here ``trim(n)`` puts the rows in temporal order and drops the last n, leaving a buffer whose length
        equals its write index (the layout ``_update_concat`` itself leaves), which both update paths handle.
        A multi-token update keeps the ``max_size - 1`` previous rows plus the new ones, so trimming any part
        of it still leaves every row the next token's window needs: trimming is exact whether or not the window
        has wrapped, and the engine never needs a snapshot for these caches. A trim that would cut into the
        window (more than one token after a single-token update of a wrapped buffer) raises.
        """

        def is_trimmable(self):
            return True

        def update_and_fetch(self, keys, values):
            if keys.shape[2] == 1 and self.keys is not None and self.keys.shape[2] < self.max_size <= self.offset:
                # a whole multi-token update trimmed from a wrapped window leaves max_size - 1 rows past the
                # window; mlx-lm's single-token path would try to grow the buffer by max_size - offset (< 0) rows.
                # Appending (the multi-token path) gives the max_size rows this token attends to.
                return self._update_concat(keys, values)
            return super().update_and_fetch(keys, values)

        def trim(self, n):
            n = min(self.offset, n)
            if n <= 0 or self.keys is None:
                return 0
            keys, values = self._temporal_order(self.keys), self._temporal_order(self.values)
            rows = keys.shape[2] - n
            offset = self.offset - n
            if rows < min(offset, self.max_size - 1):
                raise RuntimeError(
                    f"RotatingKVCache: trimming {n} tokens would cut into the window (only {keys.shape[2]} rows "
                    f"held at offset {self.offset}, window {self.max_size})"
                )
            self.keys, self.values = keys[..., :rows, :], values[..., :rows, :]
            self.offset, self._idx = offset, rows
            return n

    return ExactRotatingKVCache


_EXACT_ROTATING = None


def _rebuilt(cls: type, c):
    """A new cache of class ``cls`` (a subclass or the base of ``type(c)``: same state layout) over ``c``'s state:
    its attributes, the arrays themselves (not copies). ``c`` is not changed; the caller replaces it."""
    new = cls.__new__(cls)
    new.__dict__.update(vars(c))
    return new


def exact_rotating_caches(cache) -> None:
    """Replaces the plain ``RotatingKVCache`` entries of a prompt cache (a list) by ``ExactRotatingKVCache``s over
    the same state (idempotent)."""
    global _EXACT_ROTATING
    from mlx_lm.models.cache import RotatingKVCache

    for i, c in enumerate(cache):
        if type(c) is RotatingKVCache:
            if _EXACT_ROTATING is None:
                _EXACT_ROTATING = _exact_rotating_class()
            cache[i] = _rebuilt(_EXACT_ROTATING, c)


# -- static shapes for multi-token forwards ----------------------------------------------------------------

KV_BUCKET = 64  # multi-token forwards attend over the KV length rounded up to a multiple of this (or coarser)


def kv_bucket(length: int) -> int:
    """The KV length a multi-token forward over ``length`` cached + new tokens attends over: a multiple of
    ``KV_BUCKET`` up to 512, then of a quarter of the power of two below (640, 768, 896, 1024, 1280, …), so a
    context of n tokens meets O(log n) distinct shapes (each one compiled once on a GPU backend) and the
    masked padding stays under 25 % of the length."""
    granule = KV_BUCKET if length <= 512 else 1 << (length.bit_length() - 3)
    return -(-length // granule) * granule


def _grown(cap: int, span: int, step: int) -> int:
    """The capacity a KV buffer of ``cap`` rows grows to for ``span`` rows: geometric (x1.5 at least), in whole
    ``step``s, so a growing context meets few capacities (each a set of K/V strides compiled for once)."""
    return -(-max(span, cap + cap // 2) // step) * step


def _bucketed_kv_class():
    from mlx_lm.models.cache import KVCache

    class BucketedKVCache(KVCache):
        """A ``KVCache`` whose multi-token forwards (prefill chunks, verify blocks) attend over the KV length
        rounded up to ``KV_BUCKET``, with the padding masked out.

        Every verify lands at a new KV length (the cache grows by the accepted count). On MLX's CUDA backend a
        multi-row attention at a KV length (or K/V strides) not seen before costs far more than at a repeated one
        (docs/benchmarks.md, "Measurements the code's design rests on"), so exact lengths made every cycle pay
        that. Rounding up keeps the shapes to a few buckets (``kv_bucket``), and a buffer that only grows,
        geometrically and in whole steps, keeps each bucket's strides fixed.
        Single-token decode attends over the exact length (its kernel has no per-length cost).
        """

        def _bucket(self, n: int) -> int:
            return kv_bucket(self.offset + n)

        def make_mask(self, N, return_array=False, window_size=None):
            if N == 1 or window_size is not None:
                return super().make_mask(N, return_array=return_array, window_size=window_size)
            q = mx.arange(self.offset, self.offset + N)[:, None]
            return mx.arange(self._bucket(N))[None] <= q  # causal, and nothing past the last new token

        def reserve(self, span: int, keys, values) -> None:
            """Makes the buffer hold at least ``span`` rows (``keys``/``values``: an update, for shapes and dtypes).
            Capacity grows in whole steps and never shrinks (mlx-lm's KVCache cuts its buffer back to the offset
            after a trim, then regrows it to odd lengths), so a bucket's K/V view has the same strides every
            time: the attention kernels compiled for it are reused."""
            cap = 0 if self.keys is None else self.keys.shape[2]
            if span > cap:
                new_cap = _grown(cap, span, self.step)  # geometric: few capacities
                B, H, _, dk = keys.shape
                grow_k = mx.zeros((B, H, new_cap - cap, dk), keys.dtype)
                grow_v = mx.zeros((B, H, new_cap - cap, values.shape[3]), values.dtype)
                if self.keys is None:
                    self.keys, self.values = grow_k, grow_v
                else:
                    self.keys = mx.concatenate([self.keys, grow_k], axis=2)
                    self.values = mx.concatenate([self.values, grow_v], axis=2)

        def update_and_fetch(self, keys, values):
            prev, n = self.offset, keys.shape[2]
            end = prev + n
            span = end if n == 1 else self._bucket(n)  # the rows this forward attends over
            self.reserve(span, keys, values)
            self.keys[..., prev:end, :] = keys
            self.values[..., prev:end, :] = values
            self.offset = end
            return self.keys[..., :span, :], self.values[..., :span, :]

    return BucketedKVCache


_BUCKETED = None


def bucket_kv_caches(cache) -> None:
    """Replaces the plain ``KVCache`` entries of a prompt cache (a list) by ``BucketedKVCache``s over the same
    state: bucketed multi-token attention."""
    global _BUCKETED
    from mlx_lm.models.cache import KVCache

    if _BUCKETED is None:
        _BUCKETED = _bucketed_kv_class()
    for i, c in enumerate(cache):
        if type(c) is KVCache:
            cache[i] = _rebuilt(_BUCKETED, c)


def _bucketed_batch_kv_class():
    from mlx_lm.models.cache import BatchKVCache

    class BucketedBatchKVCache(BatchKVCache):
        """``BucketedKVCache`` for a batch (mlx-lm's ``BatchKVCache``: left-padded rows, one write index ``_idx``):
        multi-token forwards attend over ``kv_bucket(_idx + n)`` columns with the columns past the last new token
        and each row's left padding masked; single-token steps attend over the exact length. The buffer only
        grows, geometrically and in whole steps, and keeps its capacity through ``filter``, ``extend`` and
        ``drop_front``, so a bucket's K/V view keeps its strides (``batched.BatchedSpecDecoder``)."""

        @property
        def capacity(self) -> int:
            return 0 if self.keys is None else self.keys.shape[2]

        def _span(self, n: int) -> int:
            return self._idx + n if n == 1 else kv_bucket(self._idx + n)

        def reserve(self, cap: int) -> None:
            """Pads the buffer at its end to ``cap`` rows (never cuts)."""
            short = cap - self.capacity
            if short > 0 and self.keys is not None:
                pad = lambda a: mx.concatenate([a, mx.zeros((*a.shape[:2], short, a.shape[3]), a.dtype)], axis=2)
                self.keys, self.values = pad(self.keys), pad(self.values)

        def make_mask(self, N: int, return_array: bool = False, **kwargs):
            if N == 1 or kwargs.get("window_size") is not None:
                return super().make_mask(N, return_array=return_array, **kwargs)
            q = mx.arange(self._idx, self._idx + N)[:, None]
            k = mx.arange(self._span(N))[None]
            return (k <= q)[None, None] & (self.left_padding[:, None, None, None] <= k)  # [B, 1, N, span]

        def update_and_fetch(self, keys, values):
            prev, n = self._idx, keys.shape[2]
            span = self._span(n)
            if self.keys is None:
                B, H = keys.shape[:2]
                self.keys = mx.zeros((B, H, 0, keys.shape[3]), keys.dtype)
                self.values = mx.zeros((B, H, 0, values.shape[3]), values.dtype)
            if span > self.capacity:
                self.reserve(_grown(self.capacity, span, self.step))
            self.keys[..., prev : prev + n, :] = keys
            self.values[..., prev : prev + n, :] = values
            self._idx += n
            self.offset = self.offset + n
            return self.keys[..., :span, :], self.values[..., :span, :]

        def filter(self, batch_indices):
            cap = self.capacity
            super().filter(batch_indices)  # slices the rows' common left padding off the front
            self.reserve(cap)

        def extend(self, other):
            cap = max(self.capacity, other.keys.shape[2] if other.keys is not None else 0)
            super().extend(other)
            self.reserve(-(-cap // self.step) * self.step)

    return BucketedBatchKVCache


_BUCKETED_BATCH = None


def bucket_batch_caches(cache) -> None:
    """Replaces the plain ``BatchKVCache`` entries of batch caches (a list) by ``BucketedBatchKVCache``s over the
    same state: bucketed multi-token attention (a buffer already there is padded to whole steps)."""
    global _BUCKETED_BATCH
    from mlx_lm.models.cache import BatchKVCache

    if _BUCKETED_BATCH is None:
        _BUCKETED_BATCH = _bucketed_batch_kv_class()
    for i, c in enumerate(cache):
        if type(c) is BatchKVCache:
            c = cache[i] = _rebuilt(_BUCKETED_BATCH, c)
            c.reserve(-(-c.capacity // c.step) * c.step)


def plain_caches(cache) -> list:
    """The verify-ready caches of ``cache`` as mlx-lm's own classes, over the same state (a new list; the engine's
    classes are only for its own forwards: a batch merges and continues mlx-lm's)."""
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    out = []
    for c in cache:
        if _BUCKETED is not None and type(c) is _BUCKETED:
            c = _rebuilt(KVCache, c)  # same state; the buffer may run past ``offset`` (never read)
        elif _EXACT_ROTATING is not None and type(c) is _EXACT_ROTATING:
            c = _rebuilt(RotatingKVCache, c)
            rows = c.keys.shape[2] if c.keys is not None else 0
            short = min(c.offset, c.max_size) - rows
            if short > 0 and c._idx == rows:
                # a wrapped window trimmed after a multi-token update holds max_size - 1 rows in temporal order;
                # mlx-lm's class (and BatchRotatingKVCache.merge) expects max_size once wrapped. A zero row in the
                # oldest slot is never read: the next token overwrites it before attending.
                pad = lambda a: mx.concatenate(
                    [a[..., : c.keep, :], mx.zeros((*a.shape[:2], short, a.shape[3]), a.dtype), a[..., c.keep :, :]],
                    axis=2)
                c.keys, c.values = pad(c.keys), pad(c.values)
                c._idx = c.keys.shape[2]
        out.append(c)
    return out


def drop_front(c, n: int) -> None:
    """Removes the first ``n`` columns of a batch KV cache (``BatchKVCache``, bucketed or quantized), which every row holds
    as left padding (``filter`` does this for the rows it keeps); a bucketed buffer keeps its capacity."""
    if isinstance(c.keys, tuple):  # kv_bits: ``quantized_kv.BatchQuantKV``'s (packed, scales, biases)
        c.keys, c.values = (tuple(p[..., n:, :] for p in parts) for parts in (c.keys, c.values))
    else:
        cap = c.keys.shape[2]
        c.keys, c.values = c.keys[..., n:, :], c.values[..., n:, :]
    c._idx -= n
    c.left_padding = c.left_padding - n
    if _BUCKETED_BATCH is not None and type(c) is _BUCKETED_BATCH:
        c.reserve(cap)
