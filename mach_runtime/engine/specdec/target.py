"""The target side of the cycle: a forward that also returns the hidden states after chosen layers, the
embedding and LM head the draft borrows, and exact cache rollback.

Capture without re-implementing any forward: each tapped decoder layer's class is swapped, per instance, for a
subclass whose ``__call__`` calls the original and, while a capture is armed, records its output (the first
element when a layer returns a tuple: gemma4's ``(h, shared_kv, offset)``). The model's own ``__call__`` (its
own mask creation: causal / sliding-window for attention, SSM masks for GatedDeltaNet layers, caches, MoE
blocks, streamed experts) runs unchanged, so this works for any family whose decoder layers return the hidden
state. Parameter names do not change (same instance, same children) and an unarmed tap is a pass-through.

Which families may speculate, and whether their layers can be tapped, is their capability table
(``io.adapter.Capabilities``). Structure is read off the model: an ``embed_scale`` (gemma4's ``sqrt(hidden)``) and
a final logit softcap are applied where the model has them, an ``hc_head`` (deepseek_v4's residual streams)
collapses the hidden state before the final norm, layers past ``num_hidden_layers`` (MTP blocks) are not run.

Rollback per cache type:
* trimmable caches (``KVCache``; sliding-window ``RotatingKVCache``, whose trim ``make_cache`` makes exact
  whether or not the window has wrapped, see ``_exact_rotating_class``): ``trim`` the rejected tokens;
* everything else (GatedDeltaNet ``ArraysCache`` conv + recurrent state; deepseek_v4's ``CompressedKVCache``
  through its own ``snapshot``/``restore``): snapshot before verify; after a partial acceptance restore the
  snapshot, trim the attention caches back to the cycle start and re-run the accepted tokens (one extra target
  forward over <= block tokens, counted in ``specdec_rerun_tokens``). Exact by construction: the state is the one
  a forward over exactly the committed tokens produces.
* GatedDeltaNet layers recorded by a ``gdn_tape.GDNTape`` during the verify skip that re-run: their state after
  the accepted tokens is recomputed from the snapshot by the recurrence alone (``rollback(..., tape=)``).
"""

from __future__ import annotations

import mlx.core as mx

from ...errors import ConfigError
from ...io.arch_registry import capabilities_of
from ..call_override import override_call

_ARMED: dict[int, dict] = {}  # id(layer) -> {"index": i, "out": recorded output} while a capture is armed


def _tap_call(cls: type):
    def __call__(self, *args, **kwargs):
        out = cls.__call__(self, *args, **kwargs)
        slot = _ARMED.get(id(self))
        if slot is not None:
            slot["out"] = out[0] if isinstance(out, tuple) else out  # gemma4: (h, shared_kv, offset)
        return out

    return __call__


class TargetOps:
    """Forward-with-capture, embedding/LM head and rollback for one loaded target model."""

    def __init__(self, model):
        self.model = model
        self.caps = capabilities_of(model)
        self.family = self.caps.family
        self.owner = getattr(model, "language_model", model)  # holds lm_head and the text args
        self.inner = getattr(self.owner, "model", None)
        if (not self.caps.speculate or self.inner is None or not hasattr(self.inner, "embed_tokens")
                or not hasattr(self.inner, "layers")):
            raise ConfigError(f"{self.family}: this family's capabilities rule out speculative decoding")
        self.layers = list(self.inner.layers)
        args = getattr(self.owner, "args", None)
        n_main = getattr(args, "num_hidden_layers", None)
        if n_main is not None and len(self.layers) > int(n_main):
            self.layers = self.layers[: int(n_main)]  # its MTP blocks follow the main layers
        self.tied = bool(getattr(args, "tie_word_embeddings", False)) or not hasattr(self.owner, "lm_head")
        self.hidden_size = int(self.inner.embed_tokens.weight.shape[-1])
        self.embed_scale = getattr(self.inner, "embed_scale", None)
        self.softcap = getattr(self.owner, "final_logit_softcapping", None)
        self._final = None  # applied to the text model's output before the head
        self.compiled = None  # a ``compiled_verify.CompiledVerify`` for the verify forwards it covers
        if hasattr(self.inner, "hc_head"):  # hyper-connections (deepseek_v4): streams collapsed before the norm
            self._final = lambda h: self.inner.norm(self.inner.hc_head(h))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def tap(self, layer_ids) -> None:
        if not self.caps.hidden_taps:
            raise ConfigError(
                f"{self.family}: hidden-state drafts (NATIVE_V7 / DFlash) are not supported: its decoder layers do "
                "not output the [T, H] hidden states a DFlash draft reads (capabilities: hidden_taps=False); "
                "use PROMPT_LOOKUP or TARGET_ONLY"
            )
        for i in layer_ids:
            if not 0 <= i < len(self.layers):
                raise ConfigError(f"target_layer_ids: layer {i} is outside the target's {len(self.layers)} layers")
            layer = self.layers[i]
            layer.__class__ = override_call(type(layer), "tap", _tap_call)

    # -- the pieces the draft borrows -----------------------------------------------------------------------
    def embed(self, tokens: mx.array) -> mx.array:
        e = self.inner.embed_tokens(tokens)
        return e if self.embed_scale is None else e * self.embed_scale

    def head(self, hidden: mx.array) -> mx.array:
        """Logits from final-normed hidden states: exactly what the model applies after its text model."""
        if self.tied:
            out = self.inner.embed_tokens.as_linear(hidden)
        else:
            out = self.owner.lm_head(hidden)
        if self.softcap:
            out = mx.tanh(out / self.softcap) * self.softcap
        return out

    # -- forwards -------------------------------------------------------------------------------------------
    def make_cache(self, bucket_kv: bool = True) -> list:
        """The model's prompt cache, made for verify + rollback: sliding-window caches trim exactly
        (``exact_rotating_caches``) and, with ``bucket_kv``, full-attention caches attend over bucketed lengths."""
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        exact_rotating_caches(cache)
        if bucket_kv:
            bucket_kv_caches(cache)
        return cache

    def forward(self, tokens: mx.array, cache, capture=(), logits: str = "all"):
        """tokens [T] → (logits [T, V] or [1, V] for ``logits="last"`` or None for "none", hidden [T, n*H] or None).

        ``capture``: layer ids whose outputs are concatenated (in order) into the returned hidden states.
        Verify-shaped forwards go through ``self.compiled`` where it applies (same results, one compiled graph).
        """
        if self.compiled is not None and self.compiled.applies(tokens, cache, logits):
            return self.compiled.forward(tokens, cache, capture)
        out, hidden = self.forward_batch(tokens[None], cache, capture, logits)
        return (None if out is None else out[0]), (None if hidden is None else hidden[0])

    def forward_batch(self, tokens: mx.array, cache, capture=(), logits: str = "all"):
        """The batched ``forward``: tokens [B, T] over batch caches (mlx-lm's ``BatchKVCache`` / batched
        ``ArraysCache``) → (logits [B, T, V], [B, 1, V] for ``logits="last"`` or None for "none",
        hidden [B, T, n*H] or None). Used by ``batched.BatchedSpecDecoder`` to verify every row's block at once."""
        slots = {}
        for i in capture:
            slots[id(self.layers[i])] = {"index": i, "out": None}
        _ARMED.update(slots)
        try:
            h = self.inner(tokens, cache)
        finally:
            for k in slots:
                _ARMED.pop(k, None)
        hidden = None
        if capture:
            outs = [slots[id(self.layers[i])]["out"] for i in capture]
            if any(o is None for o in outs):
                raise RuntimeError("a tapped layer produced no output; call TargetOps.tap(layer_ids) first")
            hidden = mx.concatenate(outs, axis=-1)
        if logits == "none":
            return None, hidden
        if logits == "last":
            h = h[:, -1:]
        if self._final is not None:
            h = self._final(h)
        return self.head(h), hidden

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


class _ObjectSnapshot:
    """A cache's own ``snapshot()`` (deepseek_v4's ``CompressedKVCache``), put back with ``restore``."""

    __slots__ = ("snap",)

    def __init__(self, snap):
        self.snap = snap


class Checkpoint:
    """What a partial acceptance needs to undo one verify forward on ``cache``.

    Caches that cannot trim are kept as ``(state, meta_state)`` or, where the cache has ``snapshot``/``restore``
    (deepseek_v4), as its own snapshot (its state has no setter). The state keeps references, not copies: a
    multi-token verify replaces a cache's arrays (concatenation) rather than writing into them. (mlx-lm's
    single-token updates do write in place, into the very array objects a snapshot holds; a verify always has
    two tokens or more.)"""

    def __init__(self, cache):
        self.snapshots = {}
        for i, c in enumerate(cache):
            if not c.is_trimmable():
                if callable(getattr(c, "snapshot", None)) and callable(getattr(c, "restore", None)):
                    self.snapshots[i] = _ObjectSnapshot(c.snapshot())
                else:
                    meta = getattr(c, "meta_state", None)
                    self.snapshots[i] = (_copy_state(c.state), meta)

    @property
    def needs_rerun(self) -> bool:
        return bool(self.snapshots)


def rollback(cache, checkpoint: Checkpoint | None, verified: int, keep: int, tape=None) -> bool:
    """Undoes the last ``verified - keep`` tokens of a verify. Returns True if the caller must re-run the
    ``keep`` accepted tokens (recurrent state restored to the cycle start, attention trimmed to it too).

    ``tape``: a ``gdn_tape.GDNTape`` that recorded the verify forward. When it can replay every cache the
    checkpoint snapshotted (GatedDeltaNet layers), those are set to their state after ``keep`` tokens by
    replaying the recurrence alone, the others are trimmed, and nothing needs re-running (returns False)."""
    if keep >= verified:
        return False
    if checkpoint is None or not checkpoint.needs_rerun:
        for c in cache:
            c.trim(verified - keep)
        return False
    if tape is not None and all(tape.can_replay(cache[i], verified) for i in checkpoint.snapshots):
        for i, c in enumerate(cache):
            if i in checkpoint.snapshots:
                tape.replay(c, keep)
            else:
                c.trim(verified - keep)
        return False
    for i, c in enumerate(cache):
        if i in checkpoint.snapshots:
            snap = checkpoint.snapshots[i]
            if isinstance(snap, _ObjectSnapshot):
                c.restore(snap.snap)
                continue
            state, meta = snap
            c.state = _copy_state(state)
            if meta:
                c.meta_state = meta
        else:
            c.trim(verified)
    return True


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


def exact_rotating_caches(cache) -> None:
    """Switches the plain ``RotatingKVCache`` layers of a prompt cache to the exact trim (in place; idempotent)."""
    global _EXACT_ROTATING
    from mlx_lm.models.cache import RotatingKVCache

    for c in cache:
        if type(c) is RotatingKVCache:
            if _EXACT_ROTATING is None:
                _EXACT_ROTATING = _exact_rotating_class()
            c.__class__ = _EXACT_ROTATING


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
        multi-row attention at a KV length (or K/V strides) not seen before costs 50-100 ms against ~3 ms at a
        repeated one (H100, demo target), so exact lengths made every cycle pay that. Rounding up keeps the
        shapes to a few buckets (``kv_bucket``), and a buffer that only grows, geometrically and in whole steps,
        keeps each bucket's strides fixed.
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
    """Switches the plain ``KVCache`` layers of a prompt cache to bucketed multi-token attention (in place)."""
    global _BUCKETED
    from mlx_lm.models.cache import KVCache

    if _BUCKETED is None:
        _BUCKETED = _bucketed_kv_class()
    for c in cache:
        if type(c) is KVCache:
            c.__class__ = _BUCKETED


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
    """Switches the plain ``BatchKVCache`` layers of batch caches to bucketed multi-token attention (in place;
    a buffer already there is padded to whole steps)."""
    global _BUCKETED_BATCH
    from mlx_lm.models.cache import BatchKVCache

    if _BUCKETED_BATCH is None:
        _BUCKETED_BATCH = _bucketed_batch_kv_class()
    for c in cache:
        if type(c) is BatchKVCache:
            c.__class__ = _BUCKETED_BATCH
            c.reserve(-(-c.capacity // c.step) * c.step)


def drop_front(c, n: int) -> None:
    """Removes the first ``n`` columns of a batch KV cache (``BatchKVCache`` or bucketed), which every row holds
    as left padding (``filter`` does this for the rows it keeps); a bucketed buffer keeps its capacity."""
    cap = c.keys.shape[2]
    c.keys, c.values = c.keys[..., n:, :], c.values[..., n:, :]
    c._idx -= n
    c.left_padding = c.left_padding - n
    if _BUCKETED_BATCH is not None and type(c) is _BUCKETED_BATCH:
        c.reserve(cap)
