"""The draft's ring context cache (engine/specdec/draft_cache.py) and the compiled draft pass
(engine/specdec/compiled_draft.py), against dflash-mlx's own sink + window cache and draft forward: same logits
through wraps of the ring, same drafts compiled, trims that keep what dflash-mlx keeps; the engine uses the
compiled pass and stays lossless."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from dflash_mlx.model import ContextOnlyDraftKVCache

from mach_runtime import BlockSpecDecEngine, BlockSpecDecEngineConfig, BlockSpecDecEngineMode, load_moe
from mach_runtime.engine.specdec.compiled_draft import CompiledDraft
from mach_runtime.engine.specdec.draft import DFlashDrafter, DraftState
from mach_runtime.engine.specdec.draft_cache import RingDraftCache
from mach_runtime.engine.specdec.target import TargetOps
from tests.helpers import greedy
from tests.test_specdec import random_draft

SINK, WINDOW = 4, 24


@pytest.fixture(scope="module")
def target(tiny_dir):
    model, tok, _, _ = load_moe(tiny_dir, expert_residency="stacked")
    return model, tok


def drafters(model, compiled: bool):
    ops = TargetOps(model)
    draft = random_draft(len(model.layers), [0, 1], block=8)
    ref = DFlashDrafter(draft, ops, SINK, WINDOW)
    ref.cache = [ContextOnlyDraftKVCache(SINK, WINDOW) for _ in draft.layers]  # dflash-mlx's own cache
    ours = DFlashDrafter(draft, ops, SINK, WINDOW)
    ours.start([])
    if compiled:
        ours.compiled = CompiledDraft(ours, pad=8, any_device=True)
    return ref, ours, 2 * ops.hidden_size


def cycles(n_cycles: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n_cycles):
        rows = 30 if i == 0 else int(rng.integers(1, 9))  # a prompt's rows first, then 1..8 committed per cycle
        yield mx.array(rng.standard_normal((rows, width)).astype(np.float32)), int(rng.integers(0, 500)), int(
            rng.choice([1, 3, 7]))


def test_ring_cache_gives_dflash_mlx_logits_through_wraps(target):
    ref, ours, width = drafters(target[0], compiled=False)
    for hidden, staged, n in cycles(14, width):
        ref.observe(hidden)
        ours.observe(hidden)
        a, b = ref.draft_logits(staged, n), ours.draft_logits(staged, n)
        assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item()
        c_ref, c_ours = ref.cache[0], ours.cache[0]
        assert c_ours.cache_length() == c_ref.cache_length() and c_ours.offset == c_ref.offset
        assert sorted(np.array(c_ours.positions).tolist()) == np.array(c_ref.positions).tolist()
    assert ours.cache[0].rows > SINK + 2 * WINDOW  # the ring wrapped more than once


def test_compiled_drafts_equal_dflash_mlx_drafts(target):
    ref, ours, width = drafters(target[0], compiled=True)
    for hidden, staged, n in cycles(14, width, seed=1):
        ref.observe(hidden)
        ours.observe(hidden)
        assert ours.compiled.applies()
        want = mx.argmax(ref.draft_logits(staged, n), axis=-1).tolist()
        got = ours.propose([], staged, n)
        assert got.dtype == mx.uint32 and got.tolist() == want
        assert sorted(np.array(ours.cache[0].positions).tolist()) == np.array(ref.cache[0].positions).tolist()
    assert ours.cache[0].rows > SINK + 2 * WINDOW
    assert len(ours.compiled._fns) == 1  # one graph: every pass drafts the draft's whole block (masks(n))


def test_short_proposals_are_the_prefix_of_a_whole_block_pass(target):
    """A proposal of n < block_size − 1 tokens is the first n of a draft pass over the draft's whole block (the
    shape a DFlash draft is trained on), op by op and compiled, against dflash-mlx's own forward and cache; a pass
    over a block of only n masks would give other logits (the block attends to itself bidirectionally)."""
    model = target[0]
    ops = TargetOps(model)
    draft = random_draft(len(model.layers), [0, 1], block=8)
    hidden = mx.array(np.random.default_rng(5).standard_normal((12, 2 * ops.hidden_size)).astype(np.float32))
    staged, n, mask = 77, 3, int(draft.mask_token_id)

    def reference(masks):
        cache = [ContextOnlyDraftKVCache(SINK, WINDOW) for _ in draft.layers]
        noise = ops.embed(mx.array([[staged] + [mask] * masks], dtype=mx.uint32))
        ctx = draft.project_target_hidden(hidden[None])
        return ops.head(draft.forward_projected_context(noise_embedding=noise, draft_context=ctx, cache=cache)[0, 1:])

    whole, short = reference(7)[:n], reference(n)
    assert not mx.allclose(whole, short, atol=1e-3).item()
    want = mx.argmax(whole, axis=-1).tolist()
    for compiled in (False, True):
        d = DFlashDrafter(draft, ops, SINK, WINDOW)
        d.start([])
        if compiled:
            d.compiled = CompiledDraft(d, pad=16, any_device=True)
        d.observe(hidden)
        assert d.masks(n) == 7 and d.masks(9) == 9
        assert mx.array(d.propose([], staged, n)).tolist() == want


def test_trim_keeps_the_rows_before_the_cut(target):
    ref, ours, width = drafters(target[0], compiled=True)
    for hidden, staged, n in cycles(9, width, seed=2):
        ref.observe(hidden)
        ours.observe(hidden)
        ref.draft_logits(staged, n)
        ours.propose([], staged, n)
    covered = ours.cache[0].offset
    cut = covered - 5
    state = ours.snapshot(covered)
    state.trim(cut)
    kept = sorted(np.array(state.cache[0].positions).tolist())
    before = [p for p in np.array(ref.cache[0].positions).tolist() if p < cut]
    assert kept == before and state.cache[0].offset == cut and state.n_tokens == cut
    # the trimmed ring continues like dflash-mlx's cache trimmed the same way
    for c in ref.cache:
        keep = int(mx.sum(c.positions < cut).item())
        c.keys, c.values, c.positions, c.offset = c.keys[:, :, :keep], c.values[:, :, :keep], c.positions[:keep], cut
    ours.start([])
    assert ours.resume(state, cut)
    for hidden, staged, n in cycles(6, width, seed=3):
        ref.observe(hidden[:5])
        ours.observe(hidden[:5])
        assert ours.propose([], staged, n).tolist() == mx.argmax(ref.draft_logits(staged, n), axis=-1).tolist()


def test_draft_state_type_is_kept():
    c = RingDraftCache(SINK, WINDOW)
    assert isinstance(c, ContextOnlyDraftKVCache) and c.fetch() == (None, None) and c.cache_length() == 0
    with pytest.raises(AttributeError):
        c.positions = mx.array([1])
    assert DraftState(None, [c], [], 0).n_tokens == 0


@pytest.mark.parametrize("compile_draft", [True, False])
def test_engine_uses_the_compiled_draft_and_stays_lossless(target, compile_draft, monkeypatch):
    model, tok = target
    prompt = [5, 17, 99, 3, 250, 77, 12, 40, 41]
    ref = greedy(model, prompt, 40)
    engine = BlockSpecDecEngine(model, tok, random_draft(len(model.layers), [0, 1], block=8),
                                config=BlockSpecDecEngineConfig(block_size=8, policy="fixed",
                                                                compile_draft=compile_draft))
    drafter = engine._drafters[BlockSpecDecEngineMode.NATIVE_V7]
    assert (drafter.compiled is not None) == compile_draft
    if compile_draft:  # on by default on a GPU only (module docstring): here forced on
        assert drafter.compiled.enabled == (mx.default_device() == mx.gpu)
        drafter.compiled = CompiledDraft(drafter, pad=8, any_device=True)
    calls = []
    real = CompiledDraft.propose
    monkeypatch.setattr(CompiledDraft, "propose", lambda self, *a: calls.append(a) or real(self, *a))
    out = [t for c in engine.generate(prompt, max_tokens=40, ignore_eos=True) for t in c.token_ids]
    assert out == ref
    assert bool(calls) == compile_draft
    assert engine.stats()["specdec_cycles"] > 0


def test_graph_cache_keeps_the_most_recent_graphs():
    from mach_runtime.engine.graph_cache import GraphCache

    built = []

    def build(k):
        def make():
            built.append(k)
            return lambda x: x * k
        return make

    g = GraphCache(2, [])
    for k in (2, 3, 2, 5, 3):
        assert g.get(k, build(k))(mx.array(1.0)).item() == k
    assert built == [2, 3, 5, 3] and len(g) == 2  # 3 was evicted by 5 (2 had been used since), then rebuilt


def test_ring_append_beyond_the_window_is_refused():
    c = RingDraftCache(SINK, WINDOW)
    kv = mx.zeros((1, 2, SINK + WINDOW + 1, 16))
    with pytest.raises(ValueError, match="sink \\+ window"):
        c.append_context(kv, kv, SINK + WINDOW + 1)
