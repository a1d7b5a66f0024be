"""Quantized attention KV (``kv_bits``) in every lane, with mlx-lm's semantics, and its batched form.

mlx-lm's ``generate`` keeps a request's attention KV in a ``KVCache`` until it holds ``quantized_kv_start`` tokens,
then replaces it by ``KVCache.to_quantized(kv_group_size, kv_bits)`` (``maybe_quantize_kv_cache``, checked after
every forward: each prefill chunk and each decode step); from then on ``mlx_lm.models.base.scaled_dot_product_attention``
sees a cache with ``bits`` and attends with ``mx.quantized_matmul``. mlx-lm has no batched quantized cache (its
server does not batch requests with ``--kv-bits``); these classes give one:

* ``PendingQuantKV``: a request's ``KVCache`` that quantizes itself at the start of the first update after it holds
  ``quantized_kv_start`` tokens, i.e. after the forward that reached it, exactly where mlx-lm converts (the object
  stays the one the cache list holds; its class becomes ``QuantKV``, as mlx-lm's list entry becomes a
  ``QuantizedKVCache``);
* ``QuantKV``: mlx-lm's ``QuantizedKVCache`` that can merge into a batch (``merge``) and reports ``size``;
* ``PendingBatchQuantKV`` / ``BatchQuantKV``: mlx-lm's ``BatchKVCache`` (left-padded rows, one write index) before
  and after quantization: ``merge`` / ``extract`` / ``filter`` / ``extend`` / ``prepare`` / ``finalize`` /
  ``trim``, the quantized one holding ``(packed, scales, biases)`` triples as ``QuantizedKVCache`` does.

Attention: mlx-lm's ``scaled_dot_product_attention`` takes its quantized path (``mx.quantized_matmul``) for a cache
with a ``bits`` attribute. Where the backend lacks those kernels (MLX 0.32.4 CUDA: ``io.backend_faults.
quantized_kv_attention_missing``, probed once) the quantized classes hide ``bits`` and hand attention their K/V
dequantized, for the ordinary fused attention: storage, snapshots and batch moves stay quantized; on the CPU (and
Metal) nothing changes.

Quantization is per token (groups along the head dimension), so a token's quantized K/V do not depend on when its
cache was converted: merging, extracting, snapshotting and restoring never change values. What the conversion time
changes is which forwards attend over quantized K/V. A batch holds one array per layer, so it converts as a whole
when its longest row reaches ``quantized_kv_start`` (and a row joining a quantized batch is quantized): with
``quantized_kv_start=0`` every row follows its solo schedule (plain first forward, quantized after); with a larger
start a shorter row in a batch is quantized from the step its longest neighbour reached the start.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache, _BaseCache, dynamic_roll

from ..io.backend_faults import quantized_kv_attention_missing

KV_BITS = (2, 3, 4, 5, 6, 8)  # mx.quantize's affine bit widths (mlx-lm's --kv-bits)
KV_GROUP_SIZES = (32, 64, 128)


def _quantize(x, group_size: int, bits: int) -> tuple:
    return tuple(mx.quantize(x, group_size=group_size, bits=bits))


def _zeros(B: int, H: int, T: int, dim: int, dtype, group_size: int, bits: int) -> tuple:
    """Empty (packed, scales, biases) for ``T`` tokens of ``dim`` values."""
    return (mx.zeros((B, H, T, dim * bits // 32), dtype=mx.uint32),
            mx.zeros((B, H, T, dim // group_size), dtype=dtype), mx.zeros((B, H, T, dim // group_size), dtype=dtype))


class _Knobs:
    kv_bits: int
    kv_group_size: int
    quantized_kv_start: int

    def _set_knobs(self, bits: int, group_size: int, start: int):
        self.kv_bits, self.kv_group_size, self.quantized_kv_start = bits, group_size, start
        return self

    def knobs(self) -> tuple[int, int, int]:
        return self.kv_bits, self.kv_group_size, self.quantized_kv_start

    @classmethod
    def merge(cls, caches):
        return merge_quant(caches)


class _Quantized(_Knobs):
    """What attention reads of a quantized cache: ``bits`` / ``group_size`` (mlx-lm's SDPA takes its quantized path
    when ``bits`` exists) and the fetched K/V, dequantized where the backend lacks the quantized kernels."""

    @property
    def bits(self) -> int:
        if self.dequantized():
            raise AttributeError("bits (hidden: this backend attends over dequantized K/V)")
        return self.kv_bits

    @bits.setter
    def bits(self, v) -> None:
        self.kv_bits = int(v)

    @property
    def group_size(self) -> int:
        return self.kv_group_size

    @group_size.setter
    def group_size(self, v) -> None:
        self.kv_group_size = int(v)

    def dequantized(self) -> bool:
        return quantized_kv_attention_missing(self.kv_bits, self.kv_group_size)

    def _fetched(self, keys: tuple, values: tuple):
        if not self.dequantized():
            return keys, values
        return tuple(mx.dequantize(*parts, group_size=self.kv_group_size, bits=self.kv_bits)
                     for parts in (keys, values))


def _write(cache, prev: int, keys, values) -> None:
    """Grows ``cache.keys`` / ``values`` (packed, scales, biases) to hold ``prev + n`` rows in whole steps and writes
    the quantized ``keys`` / ``values`` at rows ``[prev, prev + n)``."""
    B, H, n, dk = keys.shape
    g, b = cache.kv_group_size, cache.kv_bits
    if cache.keys is None or prev + n > cache.keys[0].shape[2]:
        grow = (cache.step + n - 1) // cache.step * cache.step
        new_k = _zeros(B, H, grow, dk, keys.dtype, g, b)
        new_v = _zeros(B, H, grow, values.shape[3], values.dtype, g, b)
        if cache.keys is None:
            cache.keys, cache.values = new_k, new_v
        else:
            cat = lambda old, new: tuple(mx.concatenate([o[..., :prev, :], z], axis=2)  # noqa: E731
                                         for o, z in zip(old, new))
            cache.keys, cache.values = cat(cache.keys, new_k), cat(cache.values, new_v)
    for dst, src in zip(cache.keys + cache.values, _quantize(keys, g, b) + _quantize(values, g, b)):
        dst[..., prev : prev + n, :] = src


# -- one request -----------------------------------------------------------------------------------------------
class PendingQuantKV(_Knobs, KVCache):
    """A request's attention KV before quantization (see the module doc)."""

    def __init__(self, bits: int, group_size: int, start: int):
        KVCache.__init__(self)
        self._set_knobs(bits, group_size, start)

    def due(self) -> bool:
        return self.offset > 0 and self.offset >= self.quantized_kv_start

    def quantize(self) -> "QuantKV":
        """Becomes a ``QuantKV`` over the same tokens (in place; returns self)."""
        n = self.offset
        keys, values = self.keys[..., :n, :], self.values[..., :n, :]
        self.keys = _quantize(keys, self.kv_group_size, self.kv_bits)
        self.values = _quantize(values, self.kv_group_size, self.kv_bits)
        self.__class__ = QuantKV
        return self

    def update_and_fetch(self, keys, values):
        if self.due():  # the previous forward reached the start: mlx-lm converts right after it
            return self.quantize().update_and_fetch(keys, values)
        return KVCache.update_and_fetch(self, keys, values)


class QuantKV(_Quantized, QuantizedKVCache):
    """mlx-lm's ``QuantizedKVCache`` (same layout: 256-row steps, ``offset``) that merges into a ``BatchQuantKV``."""

    def __init__(self, bits: int, group_size: int, start: int):
        QuantizedKVCache.__init__(self, group_size=group_size, bits=bits)
        self._set_knobs(bits, group_size, start)

    def update_and_fetch(self, keys, values):
        _write(self, self.offset, keys, values)
        self.offset += keys.shape[2]
        return self._fetched(*self.keys_and_values())

    @property
    def state(self):
        return self.keys, self.values, self.offset, self.kv_group_size, self.kv_bits

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.kv_group_size, self.kv_bits = v

    def size(self) -> int:
        return self.offset


# -- a batch ---------------------------------------------------------------------------------------------------
def merge_quant(caches) -> "PendingBatchQuantKV | BatchQuantKV":
    """Single-request caches (``PendingQuantKV`` / ``QuantKV``, one per request) -> one batch cache: plain while
    every one is, else quantized (plain ones are quantized first: values unchanged)."""
    knobs = caches[0].knobs()
    if not any(isinstance(c, QuantizedKVCache) for c in caches):
        merged = BatchKVCache.merge(caches)
        merged.__class__ = PendingBatchQuantKV
        return merged._set_knobs(*knobs)
    caches = [c.quantize() if isinstance(c, PendingQuantKV) and c.offset > 0 else c for c in caches]
    lengths = [c.offset if c.keys is not None else 0 for c in caches]
    L = max(lengths)
    padding = [L - n for n in lengths]
    out = BatchQuantKV(padding, *knobs)
    ref = next(c for c in caches if isinstance(c, QuantizedKVCache) and c.keys is not None)
    B, H = len(caches), ref.keys[0].shape[1]
    keys = tuple(mx.zeros((B, H, L, p.shape[-1]), p.dtype) for p in ref.keys)
    values = tuple(mx.zeros((B, H, L, p.shape[-1]), p.dtype) for p in ref.values)
    for i, (pad, n, c) in enumerate(zip(padding, lengths, caches)):
        if n == 0:
            continue
        for dst, src in zip(keys + values, tuple(c.keys) + tuple(c.values)):
            dst[i : i + 1, :, pad : pad + n] = src[..., :n, :]
    out.keys, out.values = keys, values
    out.offset = out.offset + L
    out._idx = L
    return out


class PendingBatchQuantKV(_Knobs, BatchKVCache):
    """mlx-lm's ``BatchKVCache`` before quantization: converts (in place, into ``BatchQuantKV``) at the first update
    after its longest row holds ``quantized_kv_start`` tokens."""

    def due(self) -> bool:
        return self._idx > 0 and self._idx >= self.quantized_kv_start

    def quantize(self) -> "BatchQuantKV":
        if self.keys is not None:
            n = self._idx
            self.keys = _quantize(self.keys[..., :n, :], self.kv_group_size, self.kv_bits)
            self.values = _quantize(self.values[..., :n, :], self.kv_group_size, self.kv_bits)
        self.__class__ = BatchQuantKV
        return self

    def update_and_fetch(self, keys, values):
        if self.due():
            return self.quantize().update_and_fetch(keys, values)
        return BatchKVCache.update_and_fetch(self, keys, values)

    def extend(self, other):
        if isinstance(other, BatchQuantKV):
            return self.quantize().extend(other)
        return BatchKVCache.extend(self, other)

    def extract(self, idx):
        c = BatchKVCache.extract(self, idx)
        c.__class__ = PendingQuantKV
        return c._set_knobs(*self.knobs())


class BatchQuantKV(_Quantized, _BaseCache):
    """mlx-lm's ``BatchKVCache`` (left-padded rows, write index ``_idx``, per-row ``offset``) over quantized K/V:
    ``keys`` / ``values`` are ``(packed, scales, biases)`` as in ``QuantizedKVCache``."""

    step = 256

    def __init__(self, left_padding, bits: int, group_size: int, start: int):
        self.keys = self.values = None
        self.left_padding = mx.array(left_padding)
        self.offset = mx.array([-p for p in left_padding])
        self._idx = 0
        self._right_padding = None
        self._set_knobs(bits, group_size, start)

    def update_and_fetch(self, keys, values):
        n = keys.shape[2]
        _write(self, self._idx, keys, values)
        self._idx += n
        self.offset = self.offset + n
        return self._fetched(*self.keys_and_values())

    def keys_and_values(self):
        cut = lambda parts: tuple(p[..., : self._idx, :] for p in parts)  # noqa: E731
        return cut(self.keys), cut(self.values)

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        if left_padding is not None:
            if self.keys is not None:
                raise ValueError("left padding can only be added to an empty cache")
            left_padding = mx.array(left_padding)
            self.left_padding += left_padding
            self.offset = self.offset - left_padding
        if right_padding is not None and max(right_padding) > 0:
            self._right_padding = mx.array(right_padding)

    def finalize(self):
        if self._right_padding is not None:
            pad = self._right_padding
            roll = lambda parts: tuple(dynamic_roll(p, pad[:, None], axis=2) for p in parts)  # noqa: E731
            self.keys, self.values = roll(self.keys), roll(self.values)
            self.offset = self.offset - pad
            self.left_padding += pad
            self._right_padding = None

    @property
    def state(self):
        return self.keys, self.values, self.offset, self.left_padding, self._idx

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.left_padding, self._idx = v

    def is_trimmable(self):
        return True

    def trim(self, n):
        n = min(self._idx, n)
        self._idx -= n
        self.offset = self.offset - n
        return n

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs)

    def filter(self, batch_indices):
        if self.keys is not None:
            self.keys = tuple(p[batch_indices] for p in self.keys)
            self.values = tuple(p[batch_indices] for p in self.values)
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift = min(self.left_padding.tolist())
        if shift > 0:
            if self.keys is not None:
                self.keys = tuple(p[..., shift:, :] for p in self.keys)
                self.values = tuple(p[..., shift:, :] for p in self.values)
            self._idx -= shift
            self.left_padding -= shift

    def extend(self, other):
        if isinstance(other, PendingBatchQuantKV):
            other.quantize()
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        ref = self if self.keys is not None else other
        width = max(self._idx, other._idx)
        size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)

        def pad(c):
            parts = c.keys + c.values if c.keys is not None else tuple(
                mx.zeros((c.offset.shape[0], p.shape[1], 0, p.shape[3]), p.dtype) for p in ref.keys + ref.values)
            left = width - c._idx
            right = size - parts[0].shape[2] - left
            if right < 0:
                parts = tuple(p[..., :right, :] for p in parts)
                right = 0
            if left or right:
                parts = tuple(mx.pad(p, [(0, 0), (0, 0), (left, right), (0, 0)]) for p in parts)
            return parts, c.offset, c.left_padding + left

        (a, a_off, a_lp), (b, b_off, b_lp) = pad(self), pad(other)
        joined = tuple(mx.concatenate([x, y]) for x, y in zip(a, b))
        k = len(joined) // 2
        self.keys, self.values = joined[:k], joined[k:]
        self.offset = mx.concatenate([a_off, b_off])
        self.left_padding = mx.concatenate([a_lp, b_lp])
        self._idx = width

    def extract(self, idx):
        mx.eval(self.left_padding)
        pad = self.left_padding.tolist()[idx]
        c = QuantKV(*self.knobs())
        take = lambda parts: tuple(mx.contiguous(p[idx : idx + 1, :, pad : self._idx]) for p in parts)  # noqa: E731
        c.keys, c.values = take(self.keys), take(self.values)
        c.offset = self._idx - pad
        return c

    def size(self):
        return self._idx

    def empty(self):
        return self.keys is None

    @property
    def nbytes(self):
        if self.keys is None:
            return 0
        return sum(p.nbytes for p in self.keys + self.values)


def quantizing_cache(base: list, bits: int, group_size: int, start: int) -> list:
    """``base`` (a model's ``make_cache()``) with every plain ``KVCache`` replaced by a ``PendingQuantKV``."""
    return [PendingQuantKV(bits, group_size, start) if type(c) is KVCache else c for c in base]


def quantized_parts(c: PendingQuantKV) -> tuple[tuple, tuple]:
    """The (keys, values) triples ``c`` will hold once quantized (lazy; ``c`` is not changed)."""
    n = c.offset
    return (_quantize(c.keys[..., :n, :], c.kv_group_size, c.kv_bits),
            _quantize(c.values[..., :n, :], c.kv_group_size, c.kv_bits))
