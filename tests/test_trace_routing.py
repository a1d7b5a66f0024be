"""Routing traces as benchmark input: the gzip trace file, the Gini statistic, and replaying a recorded trace in a
live model (bench/trace_routing.py, which bench/p2_streaming.py --trace uses) in stacked (compiled MoE blocks)
and streaming residency."""

import random
import sys
from pathlib import Path

import pytest

from mach_runtime.analysis.trace_replay import RoutingTrace, replay, routing_stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def _trace(E=16, k=4, layers=(0, 1), tokens=40, seed=0, segments=(0, 20)) -> RoutingTrace:
    rng = random.Random(seed)
    steps = [(layer, tuple(sorted(rng.sample(range(E), k)))) for _ in range(tokens) for layer in layers]
    return RoutingTrace(E, k, list(layers), steps, segments=list(segments), meta={"source": "test"})


def test_gzip_trace_round_trip_is_deterministic(tmp_path):
    tr = _trace()
    gz, plain = tr.save(tmp_path / "t.json.gz"), tr.save(tmp_path / "t.json")
    assert gz.read_bytes()[:2] == b"\x1f\x8b" and plain.read_bytes()[:1] == b"{"
    assert RoutingTrace.load(gz) == tr == RoutingTrace.load(plain)
    assert tr.save(tmp_path / "again.json.gz").read_bytes() == gz.read_bytes()  # no name or time in the header


def test_gini_of_expert_loads():
    one = routing_stats(RoutingTrace(4, 1, [0], [(0, (0,))] * 8))
    assert one["layers"][0]["gini"] == pytest.approx(0.75)  # (n-1)/n: one expert takes every selection
    even = routing_stats(RoutingTrace(4, 1, [0], [(0, (e,)) for e in range(4)] * 2))
    assert even["layers"][0]["gini"] == 0.0
    assert even["mean"]["gini"] == 0.0 and even["uniform"]["gini"] == 0.0


def _generate(model, cache, n_new, prompt):
    from mach_runtime.engine.generate import generate_tokens, make_sampler

    return list(generate_tokens(model, prompt, cache, make_sampler(1.0, seed=0), n_new))


def test_trace_routing_replays_the_recorded_experts(tiny_dir):
    """Segment 1 of a random 16-expert top-4 trace drives a tiny qwen3_moe: streaming through a 6-slot bank (misses,
    rollbacks and redone forwards) records exactly the trace's experts at every position, and stacked residency
    with compiled MoE blocks routes alike (the same sampled tokens, and each gate's top-k at a position is the
    trace's); a forward past the segment is refused."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mach_runtime import load_moe
    from mach_runtime.engine.compiled_moe import compile_moe_blocks
    from trace_routing import apply_trace, moe_blocks

    tr = _trace()
    prompt, n_new = [5, 6, 7], 10
    need = len(prompt) + n_new
    per = {layer: steps[20:] for layer, steps in tr.per_layer().items()}  # segment 1 = tokens 20..39

    model, _, store, cache = load_moe(str(tiny_dir), expert_residency="streaming", expert_slots=6)
    try:
        info = apply_trace(model, tr, need, segment=1)
        assert info["layer_map"] == {"0": 0, "1": 1} and info["segment_tokens"] == 20
        store.start_trace()
        streamed = _generate(model, cache, n_new, prompt)
        s = store.stats()
        assert s.misses > 0 and s.evictions > 0  # the bank really had to stream
        got = {0: [], 1: []}
        for layer, experts in store.trace:
            got[layer].append(tuple(sorted(int(e) for e in experts)))
        positions = len(prompt) + n_new - 1  # the last sampled token is never fed back
        for layer in (0, 1):
            # prefill: all but the last prompt token in one step (their union; split into one step per token when
            # the union exceeds the bank), then one step per token
            head = tuple(sorted(set(per[layer][0]) | set(per[layer][1])))
            head = [head] if len(head) <= 6 else per[layer][:2]
            assert got[layer] == head + per[layer][2:positions]
        assert replay(RoutingTrace.from_store(store, granularity="mixed"), 6, s.eviction_policy).hits == s.hits
    finally:
        store.close()

    model, _, store, _ = load_moe(str(tiny_dir), expert_residency="stacked")
    try:
        assert compile_moe_blocks(model) == 2
        apply_trace(model, tr, need, segment=1)
        assert _generate(model, make_prompt_cache(model), n_new, prompt) == streamed
        for layer, mlp in moe_blocks(model):
            for p in (0, 7, need - 1):
                mlp.gate.pos = mx.array([p], dtype=mx.int32)
                logits = mlp.gate(mx.zeros((1, 1, 64)))
                assert tuple(sorted(mx.argpartition(-logits[0, 0], kth=3)[:4].tolist())) == per[layer][p]
        with pytest.raises(ValueError, match="trace segment holds"):
            model(mx.array([[1] * (need + 1)]), cache=make_prompt_cache(model))
        with pytest.raises(ValueError, match="top-4"):
            apply_trace(model, _trace(E=8, k=2), 4)
    finally:
        store.close()
