"""Compiled MoE blocks (engine/compiled_moe.py) and the small-experts sort threshold (io/gather_switch_glu.py).

The compiled path must give bitwise the same logits as the model's own code on every family (prefill, one-token
steps, a 16-token verify block), actually run for small forwards, step aside for large ones and for streaming
residency's sync path, and see parameter updates made after compilation."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mach_runtime import load_moe
from mach_runtime.engine.compiled_moe import compile_moe_blocks, moe_blocks
from mach_runtime.io.gather_switch_glu import (
    SMALL_EXPERTS_SORT_THRESHOLD, SORT_THRESHOLD, GatherSwitchGLU, switch_glu,
)
from tests.family_helpers import FAMILIES
from tests import tolerances as tol
from tests.helpers import small_forwards
from mach_runtime.assets import demo_model_path

DEMO = demo_model_path()
MODELS = {"qwen3_moe": DEMO, **FAMILIES}
PROMPT = [5, 17, 99, 3, 250, 77, 12, 40, 41, 8, 9, 10]


def _forwards(model) -> list:
    return small_forwards(model, PROMPT)


class _Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a):
        self.calls += 1
        return self.fn(*a)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_compiled_blocks_equal_the_models_own_code(family):
    model, _, _, _ = load_moe(MODELS[family], expert_residency="stacked")
    ref = _forwards(model)
    n = compile_moe_blocks(model, max_rows=8)
    blocks = moe_blocks(model)
    assert n == len(blocks) > 0
    assert compile_moe_blocks(model, max_rows=8) == n  # idempotent: no double wrapping
    counters = []
    for b in blocks:
        c = _Counting(b.hook_fn)
        b.hook_fn = c
        counters.append(c)
    got = _forwards(model)
    for a, b in zip(ref, got):  # bitwise on the CPU; a GPU's compiled kernels fuse multiply-adds (tolerances.py)
        bound = tol.reorder_in(a.dtype, tol.EXACT)
        tol.assert_close(np.array(b.astype(mx.float32)), np.array(a.astype(mx.float32)), bound)
    # the 12-token prefill (> 8 rows) ran the original code; the steps and the 6-token block the compiled one
    assert all(c.calls == 3 for c in counters), [c.calls for c in counters]


def test_compiled_block_sees_parameter_updates():
    model, _, _, _ = load_moe(DEMO, expert_residency="stacked")
    compile_moe_blocks(model)
    block = moe_blocks(model)[0]
    x = mx.random.normal((1, 4, model.args.hidden_size), key=mx.random.key(0)).astype(mx.float32)
    before = block(x)
    glu = next(c for c in block.children().values() if isinstance(c, GatherSwitchGLU))
    glu.down.weight = glu.down.weight * 0  # after compilation: the compiled function must read the new array
    assert mx.abs(before).max().item() > 0
    assert mx.abs(block(x)).max().item() == 0


def test_streaming_blocks_compile_the_hit_path_and_equal_the_models_own_code():
    """Streaming residency, every expert resident: the optimistic forwards run the compiled block (one routing
    check per forward, recorded from the compiled function's output); the result equals the uncompiled model's
    bitwise (the same primitives), and the prefill, larger than max_rows, runs the original block."""
    import numpy as np

    model, _, store, _ = load_moe(DEMO, expert_residency="streaming", expert_slots=32)
    try:
        for bank in store.banks:
            store.ensure(bank, np.arange(bank.source.num_experts))
        ref = _forwards(model)
        n = compile_moe_blocks(model, max_rows=8)
        blocks = moe_blocks(model)
        assert n == len(blocks) == len(store.banks) > 0
        counters = []
        for b in blocks:
            c = _Counting(b.hook_fn)
            b.hook_fn = c
            counters.append(c)
        s0 = store.stats()
        got = _forwards(model)
        for a, b in zip(ref, got):
            assert a.shape == b.shape and mx.array_equal(a, b).item()
        assert all(c.calls == 3 for c in counters), [c.calls for c in counters]
        s1 = store.stats()
        assert s1.misses == s0.misses and s1.redone_forwards == s0.redone_forwards
        assert s1.host_syncs - s0.host_syncs == 4  # one per forward (the 12-row prefill is optimistic, uncompiled)
    finally:
        store.close()


def test_small_experts_sort_only_large_calls_and_both_paths_agree():
    model, _, _, _ = load_moe(DEMO, expert_residency="stacked")
    glu = next(c for b in moe_blocks(model) for c in b.children().values() if isinstance(c, GatherSwitchGLU))
    assert glu._sort_threshold == SMALL_EXPERTS_SORT_THRESHOLD > SORT_THRESHOLD  # 2 MB of experts per layer
    E = glu.gate_up.weight.shape[0]
    x = mx.random.normal((1, 40, glu.gate_up.weight.shape[-1]), key=mx.random.key(1))
    idx = mx.random.randint(0, E, (1, 40, 4), key=mx.random.key(2))
    sorted_y = switch_glu(x, idx, glu.gate_up, glu.down, glu._activation, glu.inter, sort_threshold=1)
    plain_y = switch_glu(x, idx, glu.gate_up, glu.down, glu._activation, glu.inter, sort_threshold=10**9)
    assert sorted_y.shape == plain_y.shape == (1, 40, 4, x.shape[-1])
    assert mx.allclose(sorted_y, plain_y, atol=1e-5, rtol=1e-4).item()
