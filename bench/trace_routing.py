"""Replaying a recorded routing trace in a live model (bench helper, not a benchmark itself).

``apply_trace(model, trace, tokens, segment=0)`` replaces the router (``mlp.gate``) of every routed MoE block of a
loaded checkpoint by a ``TraceGate``: logits that select, at token position p, exactly the experts the trace
recorded for that layer at token p of the chosen segment (value ``HIT_LOGIT`` for them, 0 for the others, so the
block's own softmax / top-k picks them). A ``TracePositions`` hook on the text model sets every gate's positions
before each forward from the KV cache's offset (``cache[0].offset`` .. + the forward's tokens), so:

* the routing is a pure function of the token position: a streaming forward rolled back and redone after a miss
  routes exactly as the first time, and stacked and streaming residency route alike (same sampled tokens);
* the positions are module arrays of the gates (not Python constants), so a block run through ``mx.compile``
  (stacked residency's compiled MoE blocks take the block's arrays as implicit inputs) sees each forward's own.

The trace's layers map onto the model's MoE layers in order; a model with fewer MoE layers takes evenly spaced
trace layers (say so when reporting). The trace's expert count and top-k must equal the model's.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mach_runtime.analysis.trace_replay import RoutingTrace
from mach_runtime.engine.compiled_moe import compile_moe_blocks
from mach_runtime.engine.hooks import ModuleHook, install, remove_hooks

HIT_LOGIT = 8.0  # softmax weight of a traced expert vs an untraced one: e^8 ~ 3000x


class TraceGate(nn.Module):
    """A router whose logits at token position p are row p of ``table`` ([T, E])."""

    def __init__(self, table: mx.array):
        super().__init__()
        self.table = table
        self.pos = mx.zeros((1,), dtype=mx.int32)

    def __call__(self, x: mx.array) -> mx.array:
        rows = self.table[self.pos]  # [L, E]: the forward's L token positions
        return mx.broadcast_to(rows, (*x.shape[:-1], rows.shape[-1])).astype(x.dtype)


class TracePositions(ModuleHook):
    """On the text model: sets each ``TraceGate``'s positions from the cache offset before the forward."""

    kind = "trace_positions"

    def __init__(self, inner, gates: list, length: int):
        super().__init__(inner)
        self.hook_gates = gates
        self.hook_length = length

    def __call__(self, *args, **kwargs):
        inputs = args[0] if args else kwargs.get("inputs")
        cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
        emb = kwargs.get("input_embeddings", args[2] if len(args) > 2 else None)
        n = int((inputs if inputs is not None else emb).shape[1])
        start = int(cache[0].offset) if cache is not None and cache[0] is not None else 0
        if start + n > self.hook_length:
            raise ValueError(f"trace replay: this forward covers token positions {start}..{start + n - 1} but the "
                             f"trace segment holds {self.hook_length} tokens: decode fewer tokens or pick a longer "
                             "segment")
        pos = mx.arange(start, start + n, dtype=mx.int32)
        for g in self.hook_gates:
            g.pos = pos
        return self.inner(*args, **kwargs)


def moe_blocks(model) -> list[tuple[int, nn.Module]]:
    """(decoder layer index, routed MoE block) in model order."""
    return [(i, layer.mlp) for i, layer in enumerate(model.layers)
            if hasattr(getattr(layer, "mlp", None), "gate") and hasattr(layer.mlp, "switch_mlp")]


def segment_steps(trace: RoutingTrace, segment: int) -> tuple[dict[int, list[tuple[int, ...]]], int]:
    """Per trace layer, the experts of each token of ``segment``; and the segment's length in tokens."""
    if trace.granularity != "token":
        raise ValueError("trace replay needs a token-granular trace (one step per token and layer)")
    starts = sorted(set(trace.segments) | {0})
    if not 0 <= segment < len(starts):
        raise ValueError(f"the trace has {len(starts)} segments; --trace-segment {segment} is out of range")
    per = trace.per_layer()
    total = trace.tokens
    lo, hi = starts[segment], (starts[segment + 1] if segment + 1 < len(starts) else total)
    return {layer: steps[lo:hi] for layer, steps in per.items()}, hi - lo


def map_layers(trace_layers: list[int], n_model: int) -> list[int]:
    """Which trace layer drives each of the model's ``n_model`` MoE layers: all in order when the counts match,
    else evenly spaced ones."""
    n = len(trace_layers)
    if n_model > n:
        raise ValueError(f"the trace records {n} MoE layers; the model has {n_model}: record a trace of a model with "
                         "at least as many MoE layers")
    if n_model == n:
        return list(trace_layers)
    return [trace_layers[round(i * (n - 1) / max(1, n_model - 1))] for i in range(n_model)]


def apply_trace(model, trace: RoutingTrace, tokens: int, segment: int = 0) -> dict:
    """Routes ``model`` by ``trace`` (see the module docstring) for token positions 0 .. tokens-1 of ``segment``.
    Returns what was mapped (for the benchmark's JSON)."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("trace replay: found no routed MoE block (mlp.gate + mlp.switch_mlp) in the model")
    top_k = getattr(blocks[0][1], "top_k", trace.top_k)
    n_experts = getattr(blocks[0][1], "num_experts", trace.num_experts)
    if (n_experts, top_k) != (trace.num_experts, trace.top_k):
        raise ValueError(f"the trace routes {trace.num_experts} experts top-{trace.top_k}; the model has {n_experts} "
                         f"top-{top_k}")
    per, length = segment_steps(trace, segment)
    if tokens > length:
        raise ValueError(f"trace segment {segment} holds {length} tokens; the run needs {tokens}")
    mapping = map_layers(trace.layers, len(blocks))
    gates = []
    for (_, mlp), src in zip(blocks, mapping):
        table = [[0.0] * trace.num_experts for _ in range(tokens)]
        for t, experts in enumerate(per[src][:tokens]):
            for e in experts:
                table[t][e] = HIT_LOGIT
        gate = TraceGate(mx.array(table, dtype=mx.float32))
        mlp.gate = gate  # through a hook when one is installed: the hook mirrors the write to the original
        gates.append(gate)
    text_path = "language_model.model" if "language_model" in model else "model"
    install(model, text_path, TracePositions, gates, tokens)
    if remove_hooks(model, "compiled_moe"):  # fresh compiled functions: none traced with the old routers
        compile_moe_blocks(model)
    return {"segment": segment, "segment_tokens": length, "tokens": tokens,
            "layer_map": {str(i): src for (i, _), src in zip(blocks, mapping)}}
