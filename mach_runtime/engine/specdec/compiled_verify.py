"""The verify forward as one compiled graph (qwen3_moe, stacked residency, bucketed KV caches).

A speculative cycle on a GPU is bound by the host: building the verify's graph in Python and MLX encoding one
CUDA-graph node per primitive. ``mx.compile`` of the whole verify forward, with each layer's KV buffer as explicit
state, replays the traced graph without Python and fuses its elementwise chains (timings: docs/benchmarks.md,
"Measurements the code's design rests on"). The logits, captured hidden states and caches equal those of the
model's own forward (tests/test_compiled_verify.py).

What makes the forward compilable: the cache offset enters as an array (RoPE takes array offsets, the K/V rows are
written with ``mx.slice_update`` at an array start), and every shape is static per (block length, attended span):
``BucketedKVCache`` attends over ``kv_bucket(offset + T)`` rows of a buffer that only grows. One compiled function
per (block length, span, captured layers), at most ``MAX_GRAPHS`` kept; a new buffer capacity retraces inside it.

Scope: mlx-lm's qwen3_moe decoder layers (attention with q/k norms, RoPE, no sliding window; an MoE or dense MLP)
with every cache a ``BucketedKVCache`` that already holds rows (after the prefill), a multi-token forward that
wants all logits. Everything else (other families, prefill chunks, streaming residency, whose experts are fetched
on the host mid-forward) takes ``TargetOps``' generic path. The model's parameters are the compiled functions'
implicit inputs, so later weight updates are seen.
"""

from __future__ import annotations

import mlx.core as mx

from ...io.disk_switch_glu import DiskSwitchGLU
from ..graph_cache import GraphCache
from . import verify_cache as _vc

MAX_GRAPHS = 64


def _attention_ok(layer) -> bool:
    a = getattr(layer, "self_attn", None)
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "rope", "n_heads", "n_kv_heads", "scale")
    if a is None or not all(hasattr(a, n) for n in needed):
        return False
    if getattr(a, "sliding_window", None) or not hasattr(layer, "mlp"):
        return False
    try:  # the RoPE variant must accept an array offset and give what an int offset gives
        x = mx.arange(2 * 3 * a.q_norm.weight.shape[0], dtype=mx.float32).reshape(1, 2, 3, -1) / 100
        return bool(mx.array_equal(a.rope(x, offset=5), a.rope(x, offset=mx.array(5, dtype=mx.int32))).item())
    except Exception:  # pragma: no cover - a RoPE that cannot take array offsets
        return False


class CompiledVerify:
    """``forward(tokens [T], cache, capture)`` -> (logits [T, V], hidden [T, n*H] or None) through a compiled
    graph, for the forwards ``applies`` accepts."""

    def __init__(self, target_ops):
        self.ops = target_ops
        self.inner = target_ops.inner
        self._fns = GraphCache(MAX_GRAPHS, target_ops.model)
        self.enabled = (target_ops.caps.compiled_verify and target_ops._final is None
                        and not any(isinstance(m, DiskSwitchGLU) for _, m in target_ops.model.named_modules())
                        and all(_attention_ok(layer) for layer in target_ops.layers))

    def applies(self, tokens: mx.array, cache, logits: str) -> bool:
        if not self.enabled or logits != "all" or tokens.size < 2 or len(cache) != len(self.ops.layers):
            return False
        bucketed = _vc._BUCKETED
        return bucketed is not None and all(type(c) is bucketed and c.keys is not None for c in cache)

    def forward(self, tokens: mx.array, cache, capture=()):
        T = int(tokens.size)
        offset = cache[0].offset
        span = _vc.kv_bucket(offset + T)
        capture = tuple(capture)
        for c in cache:
            c.reserve(span, c.keys, c.values)
        fn = self._graph(T, span, capture)
        kv = [a for c in cache for a in (c.keys, c.values)]
        logits, hidden, *new = fn(tokens.reshape(1, T), mx.array(offset, dtype=mx.int32), *kv)
        for i, c in enumerate(cache):
            c.keys, c.values, c.offset = new[2 * i], new[2 * i + 1], offset + T
        return logits[0], (hidden[0] if capture else None)

    def _graph(self, T: int, span: int, capture: tuple):
        return self._fns.get((T, span, capture), lambda: self._builder(T, span, capture))

    def _builder(self, T: int, span: int, capture: tuple):
        inner, head, layers = self.inner, self.ops.head, self.ops.layers
        wanted = set(capture)

        def verify(tokens, offset, *kv):
            h = inner.embed_tokens(tokens)
            mask = mx.arange(span)[None] <= (offset + mx.arange(T))[:, None]  # = BucketedKVCache.make_mask
            start = offset.reshape(1)
            taps, new = {}, []
            for i, layer in enumerate(layers):
                a = layer.self_attn
                x = layer.input_layernorm(h)
                q = a.q_norm(a.q_proj(x).reshape(1, T, a.n_heads, -1)).transpose(0, 2, 1, 3)
                k = a.k_norm(a.k_proj(x).reshape(1, T, a.n_kv_heads, -1)).transpose(0, 2, 1, 3)
                v = a.v_proj(x).reshape(1, T, a.n_kv_heads, -1).transpose(0, 2, 1, 3)
                q, k = a.rope(q, offset=offset), a.rope(k, offset=offset)
                keys = mx.slice_update(kv[2 * i], k, start, axes=(2,))
                values = mx.slice_update(kv[2 * i + 1], v, start, axes=(2,))
                new += [keys, values]
                o = mx.fast.scaled_dot_product_attention(q, keys[..., :span, :], values[..., :span, :],
                                                         scale=a.scale, mask=mask)
                h = h + a.o_proj(o.transpose(0, 2, 1, 3).reshape(1, T, -1))
                h = h + layer.mlp(layer.post_attention_layernorm(h))
                if i in wanted:
                    taps[i] = h
            hidden = mx.concatenate([taps[i] for i in capture], axis=-1) if capture else mx.zeros((1, T, 0))
            return (head(inner.norm(h)), hidden, *new)

        return verify
