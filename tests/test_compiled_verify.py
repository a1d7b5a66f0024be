"""The compiled verify forward (engine/specdec/compiled_verify.py): bitwise equal to the model's own forward
(logits, captured hidden states, caches) across cycles with rollbacks and buffer growth; used by the engine for
verify blocks and nothing else; greedy output unchanged; off where it does not apply."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mach_runtime import BlockSpecDecEngine, BlockSpecDecEngineConfig, load_moe
from mach_runtime.assets import demo_model_path
from mach_runtime.engine.specdec import compiled_verify as CV
from mach_runtime.engine.specdec.draft import load_dflash_draft
from mach_runtime.engine.specdec.target import TargetOps
from tests.family_helpers import FAMILIES
from tests.helpers import greedy

DEMO = demo_model_path()
DRAFT = DEMO.parent / "demo-qwen3-moe-dflash"
PROMPT = list(range(40, 100))


@pytest.fixture(scope="module")
def demo():
    model, tok, _, _ = load_moe(DEMO, expert_residency="stacked")
    return model, tok


def test_compiled_forward_equals_the_models_forward_across_cycles(demo):
    model, _ = demo
    ops = TargetOps(model)
    ops.tap((1, 4, 7))
    cv = CV.CompiledVerify(ops)
    assert cv.enabled
    plain, fast = ops.make_cache(True), ops.make_cache(True)
    ops.prefill(PROMPT, plain, 512)
    ops.prefill(PROMPT, fast, 512)
    blocks = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3], [2, 7, 1, 8], [1, 6, 1, 8, 0, 3, 3, 9]]
    # 60 + 3 cycles x up to 16 tokens crosses the 64 bucket and grows the buffer past its first capacity
    for cycle in range(9):
        block = mx.array(blocks[cycle % 3], dtype=mx.uint32)
        assert cv.applies(block, fast, "all")
        la, ha = ops.forward(block, plain, (1, 4, 7))
        lb, hb = cv.forward(block, fast, (1, 4, 7))
        mx.eval(la, ha, lb, hb)
        assert mx.array_equal(la, lb).item() and mx.array_equal(ha, hb).item()
        keep = 1 + cycle % block.size  # a rollback of the rejected part, as the engine does
        for c in plain + fast:
            c.trim(block.size - keep)
        for a, b in zip(plain, fast):
            assert a.offset == b.offset
            assert mx.array_equal(a.keys[..., : a.offset, :], b.keys[..., : b.offset, :]).item()
            assert mx.array_equal(a.values[..., : a.offset, :], b.values[..., : b.offset, :]).item()
    assert fast[0].keys.shape[2] > 128  # the buffer grew while compiled graphs were in use
    assert len(cv._fns) >= 2  # several (block length, span) graphs


def test_engine_uses_it_for_verifies_and_stays_lossless(demo, monkeypatch):
    model, tok = demo
    ref = greedy(model, PROMPT, 40)
    calls = []
    real = CV.CompiledVerify.forward

    def counting(self, tokens, cache, capture=()):
        calls.append(int(tokens.size))
        return real(self, tokens, cache, capture)

    monkeypatch.setattr(CV.CompiledVerify, "forward", counting)
    draft = load_dflash_draft(DRAFT)
    for compiled in (True, False):  # two engines over the module's model (one load, its compiled MoE blocks shared)
        calls.clear()
        eng = BlockSpecDecEngine(model, tok, draft,
                                 config=BlockSpecDecEngineConfig(block_size=8, policy="fixed", compile_verify=compiled))
        out = [t for ch in eng.generate(PROMPT, max_tokens=40, ignore_eos=True) for t in ch.token_ids]
        assert out == ref
        cycles = eng.stats()["specdec_cycles"]
        if compiled:
            assert cycles > 0 and len(calls) == cycles and all(1 < n <= 8 for n in calls)
        else:
            assert calls == []


def test_it_stays_off_where_it_does_not_apply(demo):
    model, _ = demo
    ops = TargetOps(model)
    cv = CV.CompiledVerify(ops)
    block = mx.array([1, 2, 3], dtype=mx.uint32)
    plain = ops.make_cache(False)  # mlx-lm's own KVCache (bucket_kv=False)
    ops.prefill(PROMPT, plain, 512)
    assert not cv.applies(block, plain, "all")
    bucketed = ops.make_cache(True)
    assert not cv.applies(block, bucketed, "all")  # empty cache: before the prefill
    ops.prefill(PROMPT, bucketed, 512)
    assert cv.applies(block, bucketed, "all")
    assert not cv.applies(block, bucketed, "none") and not cv.applies(block[:1], bucketed, "all")
    hybrid, _, _, _ = load_moe(FAMILIES["qwen3_5_moe"], expert_residency="stacked")
    assert not CV.CompiledVerify(TargetOps(hybrid)).enabled  # GatedDeltaNet layers: the generic path
    streaming, _, store, _ = load_moe(DEMO, expert_residency="streaming", expert_slots=8)
    try:
        assert not CV.CompiledVerify(TargetOps(streaming)).enabled  # experts fetched on the host mid-forward
    finally:
        store.close()
