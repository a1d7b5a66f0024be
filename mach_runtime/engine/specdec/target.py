"""The target side of the cycle: a forward that also returns the hidden states after chosen layers, the
embedding and LM head the draft borrows, and exact cache rollback.

Capture without re-implementing any forward: each tapped decoder layer's class is swapped, per instance, for a
subclass whose ``__call__`` calls the original and, while a capture is armed, records its output. The model's
own ``__call__`` (its own mask creation: causal for attention, SSM masks for GatedDeltaNet layers, caches, MoE
blocks, streamed experts) runs unchanged, so this works for any family whose decoder layers return the hidden
state. Parameter names do not change (same instance, same children) and an unarmed tap is a pass-through.

Rollback per cache type (mlx-lm caches):
* trimmable caches (``KVCache``, ``RotatingKVCache`` inside its window): ``trim`` the rejected tokens;
* everything else (GatedDeltaNet ``ArraysCache`` conv + recurrent state): snapshot before verify; after a
  partial acceptance restore the snapshot, trim the attention caches back to the cycle start and re-run the
  accepted tokens (one extra target forward over <= block tokens, counted in ``specdec_rerun_tokens``). Exact
  by construction: the state is the one a forward over exactly the committed tokens produces. A tape replay of
  the recurrence (dflash-mlx's ``RecurrentRollbackCache``) would save that forward; not done yet.
"""

from __future__ import annotations

import mlx.core as mx

from ...errors import ConfigError

_ARMED: dict[int, dict] = {}  # id(layer) -> {"index": i, "out": recorded output} while a capture is armed
_TAPPED: dict[type, type] = {}


def _tapped_class(cls: type) -> type:
    if getattr(cls, "_mach_tap_base", None) is not None:
        return cls
    if cls not in _TAPPED:

        def __call__(self, *args, **kwargs):
            out = cls.__call__(self, *args, **kwargs)
            slot = _ARMED.get(id(self))
            if slot is not None:
                slot["out"] = out
            return out

        _TAPPED[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "_mach_tap_base": cls, "__module__": cls.__module__})
    return _TAPPED[cls]


class TargetOps:
    """Forward-with-capture, embedding/LM head and rollback for one loaded target model."""

    def __init__(self, model):
        self.model = model
        self.owner = getattr(model, "language_model", model)  # holds lm_head and the text args
        self.inner = getattr(self.owner, "model", None)
        if self.inner is None or not hasattr(self.inner, "embed_tokens") or not hasattr(self.inner, "layers"):
            raise ConfigError(
                f"{type(model).__module__}: speculative decoding needs a text model with .model.embed_tokens and "
                ".model.layers (qwen3_moe, qwen3_5_moe); this family is not supported yet"
            )
        self.layers = list(self.inner.layers)
        args = getattr(self.owner, "args", None)
        self.tied = bool(getattr(args, "tie_word_embeddings", False)) or not hasattr(self.owner, "lm_head")
        self.hidden_size = int(self.inner.embed_tokens.weight.shape[-1])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def tap(self, layer_ids) -> None:
        for i in layer_ids:
            if not 0 <= i < len(self.layers):
                raise ConfigError(f"target_layer_ids: layer {i} is outside the target's {len(self.layers)} layers")
            layer = self.layers[i]
            layer.__class__ = _tapped_class(type(layer))

    # -- the pieces the draft borrows -----------------------------------------------------------------------
    def embed(self, tokens: mx.array) -> mx.array:
        return self.inner.embed_tokens(tokens)

    def head(self, hidden: mx.array) -> mx.array:
        if self.tied:
            return self.inner.embed_tokens.as_linear(hidden)
        return self.owner.lm_head(hidden)

    # -- forwards -------------------------------------------------------------------------------------------
    def forward(self, tokens: mx.array, cache, capture=(), logits: str = "all"):
        """tokens [T] → (logits [T, V] or [1, V] for ``logits="last"`` or None for "none", hidden [T, n*H] or None).

        ``capture``: layer ids whose outputs are concatenated (in order) into the returned hidden states.
        """
        slots = {}
        for i in capture:
            slots[id(self.layers[i])] = {"index": i, "out": None}
        _ARMED.update(slots)
        try:
            h = self.inner(tokens[None], cache)
        finally:
            for k in slots:
                _ARMED.pop(k, None)
        hidden = None
        if capture:
            outs = [slots[id(self.layers[i])]["out"] for i in capture]
            if any(o is None for o in outs):
                raise RuntimeError("a tapped layer produced no output; call TargetOps.tap(layer_ids) first")
            hidden = mx.concatenate(outs, axis=-1)[0]
        if logits == "none":
            return None, hidden
        out = h[0, -1:] if logits == "last" else h[0]
        return self.head(out), hidden

    def prefill(self, tokens: list[int], cache, step: int, capture=(), on_hidden=None) -> mx.array:
        """All prompt tokens through the target, in chunks; returns the logits [V] of the last one.
        ``on_hidden(h [T, n*H])`` receives each chunk's captured hidden states (when ``capture``)."""
        arr = mx.array(tokens, dtype=mx.uint32)
        start = 0
        while arr.size - start > 1:
            n = min(step, arr.size - 1 - start)
            _, h = self.forward(arr[start : start + n], cache, capture, logits="none")
            mx.eval([c.state for c in cache] + ([h] if h is not None else []))
            if h is not None and on_hidden is not None:
                on_hidden(h)
            start += n
        logits, h = self.forward(arr[start:], cache, capture, logits="last")
        mx.eval(logits, h)
        if h is not None and on_hidden is not None:
            on_hidden(h)
        return logits[0]


# -- rollback ---------------------------------------------------------------------------------------------
def _copy_state(state):
    if isinstance(state, (list, tuple)):
        return type(state)(_copy_state(s) for s in state)
    return state  # mx.array (immutable) or scalars


class Checkpoint:
    """What a partial acceptance needs to undo one verify forward on ``cache``."""

    def __init__(self, cache):
        self.snapshots = {}
        for i, c in enumerate(cache):
            if not c.is_trimmable():
                meta = getattr(c, "meta_state", None)
                self.snapshots[i] = (_copy_state(c.state), meta)

    @property
    def needs_rerun(self) -> bool:
        return bool(self.snapshots)


def rollback(cache, checkpoint: Checkpoint | None, verified: int, keep: int) -> bool:
    """Undoes the last ``verified - keep`` tokens of a verify. Returns True if the caller must re-run the
    ``keep`` accepted tokens (recurrent state restored to the cycle start, attention trimmed to it too)."""
    if keep >= verified:
        return False
    if checkpoint is None or not checkpoint.needs_rerun:
        for c in cache:
            c.trim(verified - keep)
        return False
    for i, c in enumerate(cache):
        if i in checkpoint.snapshots:
            state, meta = checkpoint.snapshots[i]
            c.state = _copy_state(state)
            if meta:
                c.meta_state = meta
        else:
            c.trim(verified)
    return True


# -- static shapes for multi-token forwards ----------------------------------------------------------------

KV_BUCKET = 64  # multi-token forwards attend over the KV length rounded up to a multiple of this


def _bucketed_kv_class():
    from mlx_lm.models.cache import KVCache

    class BucketedKVCache(KVCache):
        """A ``KVCache`` whose multi-token forwards (prefill chunks, verify blocks) attend over the KV length
        rounded up to ``KV_BUCKET``, with the padding masked out.

        Every verify lands at a new KV length (the cache grows by the accepted count). On MLX's CUDA backend a
        multi-row attention at a KV length not seen before cost ~47 ms against 3.6 ms at a repeated one
        (H100, demo target), so exact lengths made every cycle pay that. Rounding up keeps the shapes to a few
        buckets. Single-token decode is unchanged (its kernel has no per-length cost).
        """

        def _bucket(self, n: int) -> int:
            return -(-(self.offset + n) // KV_BUCKET) * KV_BUCKET

        def make_mask(self, N, return_array=False, window_size=None):
            if N == 1 or window_size is not None:
                return super().make_mask(N, return_array=return_array, window_size=window_size)
            q = mx.arange(self.offset, self.offset + N)[:, None]
            return mx.arange(self._bucket(N))[None] <= q  # causal, and nothing past the last new token

        def update_and_fetch(self, keys, values):
            n = keys.shape[2]
            if n == 1:
                return super().update_and_fetch(keys, values)
            length = self._bucket(n)
            super().update_and_fetch(keys, values)
            short = length - self.keys.shape[2]
            if short > 0:  # the buffer grows in steps of 256 and may end short of the bucket
                pad = lambda a: mx.concatenate([a, mx.zeros((*a.shape[:2], short, a.shape[3]), a.dtype)], axis=2)
                self.keys, self.values = pad(self.keys), pad(self.values)
            return self.keys[..., :length, :], self.values[..., :length, :]

    return BucketedKVCache


_BUCKETED = None


def bucket_kv_caches(cache) -> None:
    """Switches the plain ``KVCache`` layers of a prompt cache to bucketed multi-token attention (in place)."""
    global _BUCKETED
    from mlx_lm.models.cache import KVCache

    if _BUCKETED is None:
        _BUCKETED = _bucketed_kv_class()
    for c in cache:
        if type(c) is KVCache:
            c.__class__ = _BUCKETED
