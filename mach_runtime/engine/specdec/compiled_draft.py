"""The DFlash draft pass as one compiled graph: context append + block forward + LM head + argmax.

Each cycle the draft appends the hidden states of the tokens the last verify committed to its context (projection,
K/V, RoPE per draft layer), then runs its layers over ``[staged, MASK × n]`` and the target's head. Built op by
op, that is dozens of small kernels per draft layer: on a GPU the host building and encoding them is the cost,
not the arithmetic (docs/benchmarks.md, "Measurements the code's design rests on"). ``CompiledDraft`` traces it
once per block length with every shape static:

* the context lives in ``RingDraftCache`` buffers of fixed capacity (``draft_cache.py``); the rows to append are
  padded to ``pad`` rows, the valid count, the ring's row count and the token offset enter as arrays, and padded
  rows are written to the ring's trash slot;
* attention runs over all sink + window ring rows plus the block, with the rows past the valid count masked: one
  graph per block length for the whole request (a span that grew with the context would compile a new graph
  every 64 tokens; attending over ~1K masked rows costs the GPU next to nothing).

The drafts equal the op-by-op pass's up to float rounding (masked padding changes the reduction length); they are
only proposals, verified by the target, so output is unchanged either way (tests/test_compiled_draft.py).

Scope: dflash-mlx's full-attention draft layers with plain RoPE (what ``batchable_dflash`` accepts) and a context
to append of at most ``pad`` rows (after a prefill the drafter appends the prompt's rows op by op first), on a GPU
only: MLX's CPU matmuls cost in proportion to their rows, so there the padded rows cost more than the graph saves.
"""

from __future__ import annotations

import mlx.core as mx

from ..graph_cache import GraphCache
from .draft_cache import RingDraftCache, ring_index

MAX_GRAPHS = 32


class CompiledDraft:
    def __init__(self, drafter, pad: int = 16, *, any_device: bool = False):
        """``any_device``: also on a CPU (tests; see the module docstring)."""
        self.d = drafter
        self.pad = max(int(pad), 1)
        draft = drafter.draft
        self._fns = GraphCache(MAX_GRAPHS, [draft, drafter.target.model])
        self.enabled = (any_device or mx.default_device() == mx.gpu) and all(
            getattr(layer.self_attn, "sliding_window", None) is None and type(layer.self_attn.rope).__name__ == "RoPE"
            for layer in draft.layers)

    def applies(self) -> bool:
        """True when the drafter's context is ring caches that take a ``pad``-row append (the caller appends a
        longer pending context op by op first)."""
        d = self.d
        return (self.enabled and d.cache is not None and all(type(c) is RingDraftCache for c in d.cache)
                and self.pad <= d.cache[0].window_size)

    def propose(self, staged: int, n: int) -> mx.array:
        """The ``n`` draft tokens after ``staged`` ([n] uint32, unevaluated); appends the pending context."""
        d, caches = self.d, self.d.cache
        c0 = caches[0]
        m = d.pending_rows
        if m < self.pad:
            width = len(d.capture_layer_ids) * d.target.hidden_size
            dtype = d.pending[0].dtype if d.pending else d.dtype
            rows = [*d.pending, mx.zeros((self.pad - m, width), dtype)]
        else:
            rows = d.pending
        hidden = (mx.concatenate(rows, axis=0) if len(rows) > 1 else rows[0])[None]
        d.pending = []
        if c0.keys is None:
            a = d.draft.layers[0].self_attn
            for c in caches:
                c.allocate(a.n_kv_heads, a.head_dim, d.dtype)
        fn = self._graph(n + 1, c0.sink_size, c0.window_size, c0.trash)
        ints = mx.array([m, c0.rows, c0.offset, staged], dtype=mx.int32)
        bufs = [a for c in caches for a in (c.keys, c.values, c.pos)]
        tokens, *new = fn(hidden, ints, *bufs)
        for i, c in enumerate(caches):
            c.keys, c.values, c.pos = new[3 * i], new[3 * i + 1], new[3 * i + 2]
            c.rows += m
            c.offset += m
        return tokens

    def _graph(self, T: int, sink: int, window: int, trash: int):
        return self._fns.get((T, sink, window), lambda: self._builder(T, sink, window, trash))

    def _builder(self, T: int, sink: int, window: int, trash: int):
        d, P = self.d, self.pad
        draft, target, mask_id, dtype = d.draft, d.target, d.mask_token_id, d.dtype
        span = sink + window  # every ring row but the trash slot

        def draft_pass(hidden, ints, *bufs):
            m, rows, offset, staged = ints[0], ints[1], ints[2], ints[3]
            ctx = draft.project_target_hidden(hidden.astype(dtype))  # [1, P, H]
            valid = mx.arange(P) < m
            idx = mx.where(valid, ring_index(rows, P, sink, window), trash).astype(mx.int32)
            ctx_pos = (offset + mx.arange(P)).astype(mx.int32)
            q_off = offset + m
            key_ok = mx.concatenate([mx.arange(span) < mx.minimum(rows + m, span), mx.ones((T,), mx.bool_)])
            key_ok = key_ok.reshape(1, 1, 1, span + T)
            block = mx.concatenate([staged.reshape(1), mx.full((T - 1,), mask_id, mx.int32)])
            h = target.embed(block[None]).astype(dtype) * getattr(draft, "embed_scale", 1.0)
            i4 = idx.reshape(1, 1, P, 1)
            new = []
            for li, layer in enumerate(draft.layers):
                a = layer.self_attn
                kb, vb, pb = bufs[3 * li], bufs[3 * li + 1], bufs[3 * li + 2]
                ck = a.k_norm(a.k_proj(ctx).reshape(1, P, a.n_kv_heads, -1)).transpose(0, 2, 1, 3)
                cv = a.v_proj(ctx).reshape(1, P, a.n_kv_heads, -1).transpose(0, 2, 1, 3)
                kb = mx.put_along_axis(kb, i4, a.rope(ck, offset=offset).astype(kb.dtype), axis=2)
                vb = mx.put_along_axis(vb, i4, cv.astype(vb.dtype), axis=2)
                pb = mx.put_along_axis(pb, idx, ctx_pos, axis=0)
                new += [kb, vb, pb]
                x = layer.input_layernorm(h)
                q = a.q_norm(a.q_proj(x).reshape(1, T, a.n_heads, -1)).transpose(0, 2, 1, 3)
                k = a.k_norm(a.k_proj(x).reshape(1, T, a.n_kv_heads, -1)).transpose(0, 2, 1, 3)
                v = a.v_proj(x).reshape(1, T, a.n_kv_heads, -1).transpose(0, 2, 1, 3)
                q, k = a.rope(q, offset=q_off), a.rope(k, offset=q_off)
                keys = mx.concatenate([kb[:, :, :span], k.astype(kb.dtype)], axis=2)
                values = mx.concatenate([vb[:, :, :span], v.astype(vb.dtype)], axis=2)
                o = mx.fast.scaled_dot_product_attention(q, keys, values, scale=a.scale, mask=key_ok)
                h = h + a.o_proj(o.transpose(0, 2, 1, 3).reshape(1, T, -1))
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            logits = target.head(draft.norm(h)[0, 1:])
            return (mx.argmax(logits, axis=-1).astype(mx.uint32), *new)

        return draft_pass
