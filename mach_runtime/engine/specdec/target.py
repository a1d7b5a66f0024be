"""The target side of the cycle: a forward that also returns the hidden states after chosen layers, the
embedding and LM head the draft borrows, and exact cache rollback.

Capture without re-implementing any forward: each tapped decoder layer is wrapped in a ``TapHook``
(``engine/hooks.py``) whose ``__call__`` calls the layer and, while a capture is armed, records its output (the
first element when a layer returns a tuple: gemma4's ``(h, shared_kv, offset)``). The model's own ``__call__``
(its own mask creation: causal / sliding-window for attention, SSM masks for GatedDeltaNet layers, caches, MoE
blocks, streamed experts) runs unchanged, so this works for any family whose decoder layers return the hidden
state. Parameter names do not change (a hook carries the layer's tree) and an unarmed tap is a pass-through.

The verify-ready cache classes (exact sliding-window trim, bucketed KV lengths) live in ``verify_cache.py``.

Which families may speculate, and whether their layers can be tapped, is their capability table
(``io.adapter.Capabilities``). Structure is read off the model: an ``embed_scale`` (gemma4's ``sqrt(hidden)``) and
a final logit softcap are applied where the model has them, an ``hc_head`` (deepseek_v4's residual streams)
collapses the hidden state before the final norm, layers past ``num_hidden_layers`` (MTP blocks) are not run.

Rollback per cache type:
* trimmable caches (``KVCache``; sliding-window ``RotatingKVCache``, whose trim ``make_cache`` makes exact
  whether or not the window has wrapped, see ``verify_cache.py``): ``trim`` the rejected tokens;
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
from ..batch import prefill_chunks
from ..hooks import ModuleHook, find_hook
from ..model_head import ModelHead
from .verify_cache import bucket_kv_caches, exact_rotating_caches

_ARMED: dict[int, dict] = {}  # id(tap hook) -> {"index": i, "out": recorded output} while a capture is armed


class TapHook(ModuleHook):
    """A decoder layer whose output is recorded while a capture over it is armed (``TargetOps.forward_batch``)."""

    kind = "tap"

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        slot = _ARMED.get(id(self))
        if slot is not None:
            slot["out"] = out[0] if isinstance(out, tuple) else out  # gemma4: (h, shared_kv, offset)
        return out


class TargetOps:
    """Forward-with-capture, embedding/LM head and rollback for one loaded target model."""

    def __init__(self, model):
        self.model = model
        self.caps = capabilities_of(model)
        self.family = self.caps.family
        self._head = ModelHead(model)  # the text model and the head applied after it
        self.owner = self._head.owner  # holds lm_head and the text args
        self.inner = self._head.inner
        if (not self.caps.speculate or self.inner is None or not hasattr(self.inner, "embed_tokens")
                or not hasattr(self.inner, "layers")):
            raise ConfigError(f"{self.family}: this family's capabilities rule out speculative decoding")
        args = getattr(self.owner, "args", None)
        n_main = getattr(args, "num_hidden_layers", None)
        self._n_layers = len(self.inner.layers)
        if n_main is not None:
            self._n_layers = min(self._n_layers, int(n_main))  # MTP blocks (deepseek_v4) follow the main layers
        self.hidden_size = int(self.inner.embed_tokens.weight.shape[-1])
        self.embed_scale = getattr(self.inner, "embed_scale", None)
        self.tied, self.softcap = self._head.tied, self._head.softcap
        self._final = self._head.final  # deepseek_v4's hyper-connection streams collapsed before the norm, or None
        self.compiled = None  # a ``compiled_verify.CompiledVerify`` for the verify forwards it covers

    @property
    def layers(self) -> list:
        """The decoder layers as the model holds them now (a tapped layer is its ``TapHook``)."""
        return list(self.inner.layers[: self._n_layers])

    @property
    def num_layers(self) -> int:
        return self._n_layers

    def tap(self, layer_ids) -> None:
        if not self.caps.hidden_taps:
            raise ConfigError(
                f"{self.family}: hidden-state drafts (NATIVE_V7 / DFlash) are not supported: its decoder layers do "
                "not output the [T, H] hidden states a DFlash draft reads (capabilities: hidden_taps=False); "
                "use PROMPT_LOOKUP or TARGET_ONLY"
            )
        for i in layer_ids:
            if not 0 <= i < self._n_layers:
                raise ConfigError(f"target_layer_ids: layer {i} is outside the target's {self._n_layers} layers")
        for i in layer_ids:  # installs a TapHook in the model's layer list (idempotent; hooks.py)
            layers = self.inner.layers
            if find_hook(layers[i], TapHook) is None:
                layers[i] = TapHook(layers[i])

    # -- the pieces the draft borrows -----------------------------------------------------------------------
    def embed(self, tokens: mx.array) -> mx.array:
        e = self.inner.embed_tokens(tokens)
        return e if self.embed_scale is None else e * self.embed_scale

    def head(self, hidden: mx.array) -> mx.array:
        """Logits from final-normed hidden states: exactly what the model applies after its text model."""
        return self._head.head(hidden)

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
        layers = self.inner.layers
        for i in capture:
            slots[id(find_hook(layers[i], TapHook))] = {"index": i, "out": None}
        _ARMED.update(slots)
        try:
            h = self.inner(tokens, cache)
        finally:
            for k in slots:
                _ARMED.pop(k, None)
        hidden = None
        if capture:
            outs = [slots[id(find_hook(layers[i], TapHook))]["out"] for i in capture]
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

    def prefill_chunks(self, tokens: list[int], cache, step: int, capture=(), on_hidden=None):
        """Feeds ``tokens`` into ``cache``, one forward of ``step`` tokens per ``next`` (``batch.prefill_chunks``:
        the chunked prefill every lane uses). ``on_hidden(h [T, n*H])`` receives each chunk's captured hidden
        states (when ``capture``)."""
        return prefill_chunks(cache, [[int(t) for t in tokens]], step, self.chunk_forward(cache, capture, on_hidden))

    def chunk_forward(self, cache, capture=(), on_hidden=None):
        """The ``forward(rows [1, T], start)`` of ``batch.prefill_chunks`` over one request's ``cache``."""
        def forward(rows, start):
            _, h = self.forward(rows[0], cache, capture, logits="none")
            if h is not None and on_hidden is not None:
                on_hidden(h)
            return h

        return forward

    def prompt_forward(self, cache, width: int, out: dict, capture=(), on_hidden=None):
        """``chunk_forward`` over a prompt's ``width`` uncached tokens, except that the chunk holding its last token
        also computes that token's logits [1, V] (``out["logits"]``): the first token is drawn from them, with no
        forward of its own."""
        chunk = self.chunk_forward(cache, capture, on_hidden)

        def forward(rows, start):
            if start + rows.shape[1] < width:
                return chunk(rows, start)
            out["logits"], h = self.forward(rows[0], cache, capture, logits="last")
            if h is not None and on_hidden is not None:
                on_hidden(h)
            return [out["logits"]] + ([h] if h is not None else [])

        return forward

    def prefill(self, tokens: list[int], cache, step: int, capture=(), on_hidden=None) -> mx.array:
        """All prompt tokens through the target in chunks (``prompt_forward``: the last chunk also gives the last
        token's logits); returns those logits [V]."""
        out, tokens = {}, [int(t) for t in tokens]
        forward = self.prompt_forward(cache, len(tokens), out, capture, on_hidden)
        for _ in prefill_chunks(cache, [tokens], step, forward):
            pass
        return out["logits"][0]


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
