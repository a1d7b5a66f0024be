"""KV snapshots: a request's prompt cache as host arrays, and back.

A ``Snapshot`` holds what a request's per-layer caches contain after ``tokens`` (target KV: attention keys and
values, sliding-window rings, GatedDeltaNet conv + recurrent state, DeepSeek-V4 compressed caches; optionally the
DFlash draft's context and the last token's logits) as numpy arrays plus small JSON-able per-layer records.
The same object is the L1 entry (RAM) and what the L2 file stores, so a save is bytes only.

Threading: ``capture`` (lazy slices of the live caches), ``materialize`` (evaluates them; zero-copy numpy views
of the buffers) and ``restore`` (numpy -> fresh MLX caches) run on the MLX thread; ``copy_views`` (the host copy)
and everything else (indexing, writing, reading files) handle only numpy arrays, on any thread. ``to_host`` is
``materialize`` + ``copy_views`` in one go. A restore always builds new arrays, so a snapshot is never aliased by a
live request that later writes into its caches in place.

What each cache kind supports (``cuttable``: can serve any shorter prefix of its tokens by trimming):

* ``KVCache`` / ``QuantizedKVCache`` (qwen3_moe; attention layers everywhere): cuttable; under ``kv_bits`` the
  ``quantized_kv`` classes are recorded with their knobs and restored as themselves, and a cache due for
  quantization is stored quantized (L1 and L2 hold the packed arrays, scales and biases);
* ``RotatingKVCache`` (gpt_oss, gemma4 sliding windows): cuttable while its window has not wrapped; once it has,
  the evicted rows are gone and it serves exactly the tokens it covers;
* ``ArraysCache`` (qwen3_5_moe GatedDeltaNet conv + recurrent state): a state after exactly n tokens: exact only;
* ``CompressedKVCache`` (deepseek_v4): pooled windows + overlap state: exact only.

A snapshot is cuttable when every layer is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..backend.dtypes import dtype_name
from ..errors import ConfigError


class SnapshotUnsupported(ConfigError):
    """A cache class the snapshot format does not know (nothing is stored; the request is unaffected)."""


@dataclass
class LayerRecord:
    cls: str  # KVCache | QuantizedKVCache | RotatingKVCache | ArraysCache | CompressedKVCache | RingDraftCache
    meta: dict  # JSON-able scalars
    names: list  # array names of this layer, in order (None entries kept as absent names)


@dataclass
class Snapshot:
    tokens: np.ndarray  # uint32: the tokens the target caches cover
    layers: list  # LayerRecord per target layer
    arrays: dict  # name -> np.ndarray (mx.array until ``to_host``); bf16 stored as uint16
    dtypes: dict  # name -> dtype name ("bfloat16" where the host array is its uint16 view)
    logits: np.ndarray | None = None  # float32 [V]: logits after the last covered token, when known
    draft_layers: list = field(default_factory=list)  # LayerRecord per draft context layer (+ "pending")
    draft_tokens: int = 0  # tokens the draft context covers (== len(tokens) when present)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def cuttable(self) -> bool:
        return all(layer_cuttable(r.cls, r.meta) for r in self.layers)

    @property
    def nbytes(self) -> int:
        n = sum(int(a.nbytes) for a in self.arrays.values())
        return n + (int(self.logits.nbytes) if self.logits is not None else 0) + 4 * len(self.tokens)

    held: list = field(default_factory=list)  # evaluated MLX arrays the numpy views of ``materialize`` read

    # -- MLX thread -----------------------------------------------------------------------------------------
    def materialize(self) -> "Snapshot":
        """MLX thread, the minimum: evaluates the captured arrays and replaces each by a zero-copy numpy view of
        its buffer (bf16 through its uint16 view; logits as float32). The arrays stay in ``held`` until
        ``copy_views`` (any thread, bytes only) has copied the views; they are then freed on the MLX thread."""
        import mlx.core as mx

        out = {}
        for k, a in self.arrays.items():
            if isinstance(a, mx.array):
                self.dtypes[k] = dtype_name(a.dtype)
                out[k] = a.view(mx.uint16) if a.dtype == mx.bfloat16 else a
        logits = self.logits.astype(mx.float32).reshape(-1) if isinstance(self.logits, mx.array) else None
        held = list(out.values()) + ([logits] if logits is not None else [])
        if held:
            mx.eval(held)
        for k, a in out.items():  # (an empty array has no buffer to view: it is copied, which costs nothing)
            self.arrays[k] = np.asarray(memoryview(a)) if a.size else np.array(a)
        if logits is not None:
            self.logits = np.asarray(memoryview(logits))
        self.held = held
        return self

    def copy_views(self) -> list:
        """Any thread (numpy only): the views of ``materialize`` become arrays of their own, C-contiguous (an MLX
        slice may be strided; safetensors writes raw memory). Returns the MLX arrays to free on the MLX thread."""
        for k, a in self.arrays.items():
            self.arrays[k] = np.array(a, order="C", copy=True)
        if self.logits is not None:
            self.logits = np.array(self.logits, copy=True)
        held, self.held = self.held, []
        return held

    def to_host(self) -> "Snapshot":
        """Evaluates the captured arrays and copies them to numpy, all on this (the MLX) thread."""
        self.materialize().copy_views()
        return self

    def restore(self, n: int | None = None, draft_model=None):
        """(caches, n, draft_state): fresh MLX caches covering the first ``n`` tokens (default: all). ``n`` below
        ``n_tokens`` needs a cuttable snapshot. ``draft_state``: a ``DraftState`` for ``draft_model`` when the
        snapshot holds draft context, else None."""
        n = self.n_tokens if n is None else int(n)
        if n > self.n_tokens or (n < self.n_tokens and not self.cuttable):
            raise ValueError(f"a snapshot of {self.n_tokens} tokens cannot restore {n}")
        arr = self._mx_arrays()
        caches = [_restore_layer(r, arr) for r in self.layers]
        if n < self.n_tokens:
            for c in caches:
                c.trim(self.n_tokens - n)
        draft_state = None
        if draft_model is not None and self.draft_layers:
            from .specdec.draft import DraftState

            rec = self.draft_layers
            ring = [_restore_layer(r, arr) for r in rec[:-1]]
            pending = [arr[k] for k in rec[-1].names]
            draft_state = DraftState(draft_model, ring, pending, self.draft_tokens)
            draft_state.trim(n)
        return caches, n, draft_state

    def _mx_arrays(self) -> dict:
        import mlx.core as mx

        out = {}
        for k, a in self.arrays.items():
            if isinstance(a, mx.array):
                out[k] = mx.array(a)  # a new array object: in-place writes of the restored cache stay there
            else:
                x = mx.array(a)
                out[k] = x.view(mx.bfloat16) if self.dtypes.get(k) == "bfloat16" else x
        return out


def layer_cuttable(cls: str, meta: dict) -> bool:
    """Whether a layer's cache can be cut to a shorter prefix (see the module doc)."""
    if cls in ("KVCache", "QuantizedKVCache"):
        return True
    if cls == "RotatingKVCache":
        return meta["offset"] < meta["max_size"]
    return False


# -- capture ---------------------------------------------------------------------------------------------------
def capture(caches, tokens, *, logits=None, draft_state=None) -> Snapshot:
    """A snapshot of single-request ``caches`` covering ``tokens`` (lazy MLX slices; call ``to_host`` later, on the
    MLX thread). ``logits``: the last covered token's logits (any shape ending in V). ``draft_state``: a
    ``DraftState`` covering at least ``tokens`` (read, not consumed). Raises ``SnapshotUnsupported`` for a cache
    class it does not know."""
    arrays: dict = {}
    n = len(tokens)  # caches holding more (a prefill fed the prompt's last token too) are cut where they can be
    layers = [_cut_layer(r, n, arrays) for r in (_capture_layer(c, f"L{i}", arrays) for i, c in enumerate(caches))]
    snap = Snapshot(np.asarray(tokens, dtype=np.uint32), layers, arrays, {})
    if logits is not None:
        snap.logits = logits.reshape(-1)
    if draft_state is not None and draft_state.n_tokens >= len(tokens):
        snap.draft_layers = [_capture_layer(c, f"D{i}", arrays) for i, c in enumerate(draft_state.cache)]
        names = []
        for j, h in enumerate(draft_state.pending):
            arrays[f"P{j}"] = h
            names.append(f"P{j}")
        snap.draft_layers.append(LayerRecord("pending", {}, names))
        snap.draft_tokens = int(draft_state.n_tokens)
    return snap


def _cut_layer(r: LayerRecord, n: int, arrays: dict) -> LayerRecord:
    """``r`` covering only the first ``n`` tokens (lazy slices) when it holds more."""
    if not isinstance(r.meta.get("offset"), int) or r.meta["offset"] <= n:
        return r
    if not layer_cuttable(r.cls, r.meta):
        raise SnapshotUnsupported(f"a {r.cls} holding {r.meta['offset']} tokens cannot be cut to {n}")
    for name in r.names:
        if name is not None:
            arrays[name] = arrays[name][..., :n, :]
    meta = dict(r.meta, offset=n, **({"idx": n} if r.cls == "RotatingKVCache" else {}))
    return LayerRecord(r.cls, meta, r.names)


def _put(arrays: dict, prefix: str, name: str, a) -> str | None:
    if a is None:
        return None
    key = f"{prefix}.{name}"
    arrays[key] = a
    return key


def _capture_layer(c, p: str, arrays: dict) -> LayerRecord:
    from mlx_lm.models.cache import ArraysCache, KVCache, QuantizedKVCache, RotatingKVCache

    from ..models.deepseek_v4_attention import CompressedKVCache

    from .quantized_kv import PendingQuantKV, QuantKV, quantized_parts

    knobs = {}
    if isinstance(c, (PendingQuantKV, QuantKV)):  # kv_bits: restored as the same classes (``quantized_kv``)
        knobs = dict(zip(("kv_bits", "kv_group_size", "quantized_kv_start"), c.knobs()))
        if isinstance(c, PendingQuantKV) and c.due():  # quantized at its next update: store it quantized
            keys, values = quantized_parts(c)
            n = c.offset
            names = [_put(arrays, p, f"{side}{j}", a) for side, parts in (("k", keys), ("v", values))
                     for j, a in enumerate(parts)]
            return LayerRecord("QuantizedKVCache", {"offset": n, "group_size": c.kv_group_size, "bits": c.kv_bits,
                                                    **knobs}, names)
    if isinstance(c, QuantizedKVCache):
        n = c.offset
        names = []
        for side, parts in (("k", c.keys), ("v", c.values)):
            for j, a in enumerate(parts or ()):
                names.append(_put(arrays, p, f"{side}{j}", a[..., :n, :]))
        bits, group = (c.kv_bits, c.kv_group_size) if knobs else (c.bits, c.group_size)
        return LayerRecord("QuantizedKVCache", {"offset": n, "group_size": group, "bits": bits, **knobs}, names)
    if isinstance(c, RotatingKVCache):
        k, v, idx = c.keys, c.values, c._idx
        if k is not None and c.offset < c.max_size:  # not wrapped: rows [0, offset) in order
            k, v, idx = k[..., : c.offset, :], v[..., : c.offset, :], c.offset
        meta = {"offset": c.offset, "keep": c.keep, "max_size": c.max_size, "idx": idx}
        return LayerRecord("RotatingKVCache", meta, [_put(arrays, p, "k", k), _put(arrays, p, "v", v)])
    if isinstance(c, KVCache):
        n = c.offset
        k = c.keys[..., :n, :] if c.keys is not None else None
        v = c.values[..., :n, :] if c.values is not None else None
        return LayerRecord("KVCache", {"offset": n, **knobs}, [_put(arrays, p, "k", k), _put(arrays, p, "v", v)])
    if isinstance(c, ArraysCache):
        if c.left_padding is not None or c.lengths is not None:
            raise SnapshotUnsupported("a batched ArraysCache: extract the request's row first")
        names = [_put(arrays, p, f"s{j}", a) for j, a in enumerate(c.cache)]
        return LayerRecord("ArraysCache", {"size": len(c.cache)}, names)
    if isinstance(c, CompressedKVCache):
        meta = {"window": c.window, "compress_rate": c.compress_rate, "offset": c.offset,
                "entry_count": dict(c.entry_count)}
        names = [_put(arrays, p, "keys", c.keys)]
        for attr in ("buffer_kv", "buffer_gate", "compressed", "overlap_kv", "overlap_gate"):
            d = getattr(c, attr)
            meta[attr] = sorted(k for k, v in d.items() if v is not None)
            names += [_put(arrays, p, f"{attr}.{k}", d[k]) for k in meta[attr]]
        return LayerRecord("CompressedKVCache", meta, names)
    if type(c).__name__ == "RingDraftCache":
        meta = {"sink": c.sink_size, "window": c.window_size, "rows": c.rows, "offset": c.offset}
        return LayerRecord("RingDraftCache", meta,
                           [_put(arrays, p, "k", c.keys), _put(arrays, p, "v", c.values), _put(arrays, p, "pos", c.pos)])
    raise SnapshotUnsupported(f"cannot snapshot a {type(c).__name__} (no prefix caching for this cache class)")


def _restore_layer(r: LayerRecord, arr: dict):
    from mlx_lm.models.cache import ArraysCache, KVCache, QuantizedKVCache, RotatingKVCache

    get = lambda name: arr[name] if name is not None else None  # noqa: E731
    m = r.meta
    from .quantized_kv import PendingQuantKV, QuantKV

    knobs = (m["kv_bits"], m["kv_group_size"], m["quantized_kv_start"]) if "kv_bits" in m else None
    if r.cls == "KVCache":
        c = KVCache() if knobs is None else PendingQuantKV(*knobs)
        c.keys, c.values = get(r.names[0]), get(r.names[1])
        c.offset = m["offset"]
        return c
    if r.cls == "QuantizedKVCache":
        c = QuantizedKVCache(group_size=m["group_size"], bits=m["bits"]) if knobs is None else QuantKV(*knobs)
        parts = [get(n) for n in r.names]
        if parts:
            half = len(parts) // 2
            c.keys, c.values = tuple(parts[:half]), tuple(parts[half:])
        c.offset = m["offset"]
        return c
    if r.cls == "RotatingKVCache":
        c = RotatingKVCache(max_size=m["max_size"], keep=m["keep"])
        c.keys, c.values = get(r.names[0]), get(r.names[1])
        c.offset, c._idx = m["offset"], m["idx"]
        return c
    if r.cls == "ArraysCache":
        c = ArraysCache(m["size"])
        c.cache = [get(n) for n in r.names]
        return c
    if r.cls == "CompressedKVCache":
        from ..models.deepseek_v4_attention import CompressedKVCache

        c = CompressedKVCache(m["window"], m["compress_rate"])
        c.keys, c.offset = get(r.names[0]), m["offset"]
        c.entry_count = dict(m["entry_count"])
        i = 1
        for attr in ("buffer_kv", "buffer_gate", "compressed", "overlap_kv", "overlap_gate"):
            d = getattr(c, attr)
            for k in m[attr]:
                d[k] = get(r.names[i])
                i += 1
        return c
    if r.cls == "RingDraftCache":
        from .specdec.draft_cache import RingDraftCache

        c = RingDraftCache(m["sink"], m["window"])
        c.keys, c.values, c.pos = get(r.names[0]), get(r.names[1]), get(r.names[2])
        c.rows, c.offset = m["rows"], m["offset"]
        return c
    raise SnapshotUnsupported(f"unknown cache class {r.cls!r} in a snapshot")
