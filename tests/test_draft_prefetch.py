"""Draft-informed expert prefetch (engine/specdec/prefetch.py): lossless, the store's stats reconcile with the
prefetcher's, the per-token routing table learns and stays bounded, staging stays bounded."""

from __future__ import annotations

import numpy as np
import pytest

from mach_runtime import BlockSpecDecEngine, BlockSpecDecEngineConfig, load_moe
from mach_runtime.engine.specdec.prefetch import DraftPrefetcher, TokenRoutingTable
from tests.helpers import greedy
from tests.test_specdec import PROMPT, OracleDrafter, random_draft

N = 40
SLOTS = 6  # of 16 experts, top-4: a block-8 verify splits into token groups and misses often


@pytest.fixture(scope="module")
def ref(tiny_dir):
    model, _, _, _ = load_moe(tiny_dir, expert_residency="stacked")
    return greedy(model, PROMPT, N)


_STORES: list = []  # streaming stores ``_engine`` opened: closed after each test (their I/O threads with them)


@pytest.fixture(autouse=True)
def _close_stores():
    yield
    while _STORES:
        _STORES.pop().close()


def _engine(path, ref, prefetch: bool, block: int = 8, slots: int = SLOTS, layers=(0, 1), **config):
    model, tok, store, _ = load_moe(path, expert_residency="streaming", expert_slots=slots)
    _STORES.append(store)
    draft = random_draft(len(model.layers), list(layers))
    cfg = BlockSpecDecEngineConfig(block_size=block, policy=config.pop("policy", "fixed"), draft_prefetch=prefetch,
                                   **config)
    probe = BlockSpecDecEngine(model, tok, draft, config=BlockSpecDecEngineConfig(block_size=block), store=store)
    # oracle drafts (the reference with one token corrupted in most blocks): partial acceptance, and the rejected
    # tails come back in later blocks, so the table has seen many of the drafted tokens
    drafter = OracleDrafter(draft, probe.target, ref, len(PROMPT), corrupt=0.8, seed=3)
    return BlockSpecDecEngine(model, tok, draft, config=cfg, store=store, drafter=drafter)


def _run(engine):
    return [t for c in engine.generate(PROMPT, max_tokens=N, ignore_eos=True) for t in c.token_ids]


def test_prefetch_is_lossless_and_stats_reconcile(tiny_dir, ref):
    off = _engine(tiny_dir, ref, prefetch=False)
    assert off.prefetcher is None
    assert _run(off) == ref
    on = _engine(tiny_dir, ref, prefetch=True)
    assert on.prefetcher is not None
    assert _run(on) == ref  # greedy: token-identical with prefetch on and off (and to plain greedy decoding)

    s0, s1, p = off.store.stats(), on.store.stats(), on.prefetcher.stats()
    eb = s1.expert_bytes
    # prefetch changes only where bytes come from: the same blocks make the same bank decisions
    assert (s1.hits, s1.misses, s1.evictions) == (s0.hits, s0.misses, s0.evictions)
    assert s0.bytes_read == s0.misses * eb and s0.prefetched == 0
    assert s1.bytes_read == (s1.misses - s1.prefetch_used + s1.prefetched) * eb
    # the prefetcher is the store's only prefetcher: its bookkeeping mirrors the store's
    assert s1.prefetched == p["issued"] > 0 and p["prefetched_bytes"] == p["issued"] * eb
    assert s1.prefetch_used == p["hits"] + p["used_elsewhere"]
    assert 0 < p["hits"] <= min(p["issued"], p["verify_misses"])
    assert p["wasted_bytes"] == (p["issued"] - p["hits"]) * eb
    assert p["demand_misses"] == p["verify_misses"] - p["hits"]
    assert p["predicted_used"] <= min(p["predicted"], p["needed"])
    assert len(on.store._staged) <= on.store.max_staged
    # the engine's per-cycle bytes (what residency-aware sees) include the prefetch reads
    assert on.stats()["expert_bytes_read"] == s1.bytes_read


def _reconciles(engine) -> dict:
    s, p = engine.store.stats(), engine.prefetcher.stats()
    assert s.bytes_read == (s.misses - s.prefetch_used + s.prefetched) * s.expert_bytes
    assert s.prefetched == p["issued"] and s.prefetch_used == p["hits"] + p["used_elsewhere"]
    return p


def test_prefetch_before_target_only_steps_residency_aware(tiny_dir, ref):
    """residency-aware decodes mostly target-only at this bank: those steps (a block of one) prefetch too."""
    engine = _engine(tiny_dir, ref, prefetch=True, policy="residency-aware")
    assert _run(engine) == ref
    s = engine.stats()
    p = _reconciles(engine)
    assert s["specdec_target_only_steps"] > 0 and p["cycles"] == s["specdec_cycles"] + s["specdec_target_only_steps"]
    assert p["hits"] > 0


@pytest.mark.parametrize("gdn_tape", [True, False])
def test_hybrid_rollback_with_prefetch_is_lossless(gdn_tape):
    """GatedDeltaNet rollback by tape replay or by snapshot + re-run (a forward the prefetcher was not told about:
    it neither learns from it nor mistakes it for the verify, and still accounts the staged experts it takes)."""
    from tests.family_helpers import FAMILIES

    path = FAMILIES["qwen3_5_moe"]
    stacked, _, _, _ = load_moe(path, expert_residency="stacked")
    ref = greedy(stacked, PROMPT, N)
    engine = _engine(path, ref, prefetch=True, slots=3, layers=(0, 2), gdn_tape=gdn_tape)
    assert _run(engine) == ref
    p = _reconciles(engine)
    assert (engine.stats()["specdec_rerun_tokens"] > 0) == (not gdn_tape)
    assert p["issued"] > 0


def test_prefetcher_learns_the_verified_routing(tiny_dir, ref):
    engine = _engine(tiny_dir, ref, prefetch=True)
    pf = engine.prefetcher
    seen: dict[int, np.ndarray] = {}  # bank -> routing rows of the latest verify the prefetcher prefetched for
    blocks: list[tuple[int, ...]] = []

    def record(bank, inds):
        if pf._armed[bank.index] is not None:  # runs before the prefetcher's own observer disarms the bank
            seen[bank.index] = inds.copy()

    engine.store.routing_observers.insert(0, record)
    issue = pf.prefetch
    pf.prefetch = lambda block: (blocks.append(tuple(block)), issue(block))[1]
    _run(engine)
    assert blocks and pf.stats()["cycles"] == len(blocks) and len(seen) == len(engine.store.banks)
    last = blocks[-1]
    for layer, inds in seen.items():
        assert inds.shape[0] == len(last)
        latest = {t: set(inds[r].tolist()) for r, t in enumerate(last)}  # memory 1: a repeated token's last row
        for t, experts in latest.items():
            assert set(pf.table.experts(t, layer)) == experts
        # and predicting the block gives the union of what its tokens were routed to
        assert set(pf.table.predict(layer, last)) == set().union(*latest.values())
    pf.close()
    assert pf._observe not in engine.store.routing_observers


def test_routing_table_learns_remembers_and_is_bounded():
    t = TokenRoutingTable(layers=2, top_k=2, num_experts=8, capacity=3, memory=2)
    assert t.predict(0, [5]) == []  # unseen tokens predict nothing
    t.observe(0, [5, 9], np.array([[1, 2], [3, 4]]))
    assert t.experts(5, 0) == [1, 2] and t.experts(9, 0) == [3, 4] and t.experts(5, 1) == []
    assert t.predict(0, [9, 5, 9]) == [3, 4, 1, 2]
    t.observe(0, [5], np.array([[2, 6]]))  # memory 2: the last two observations, most recent first
    assert t.experts(5, 0) == [2, 6, 1]
    t.observe(0, [5], np.array([[7, 0]]))
    assert t.experts(5, 0) == [7, 0, 2, 6]
    t.observe(1, [11, 12], np.array([[0, 1], [0, 1]]))  # 4 tokens > capacity 3: the least recently seen goes
    assert len(t) == 3 and 9 not in t and 5 in t
    t1 = TokenRoutingTable(layers=1, top_k=4, num_experts=16, capacity=64, memory=1)
    for i in range(1000):
        t1.observe(0, [i], np.array([[i % 16, 1, 2, 3]]))
    assert len(t1) == 64 and t1.experts(999, 0) == [999 % 16, 1, 2, 3] and 0 not in t1


def test_prefetch_staging_is_bounded_and_skips_resident(tiny_dir):
    _, _, store, _ = load_moe(tiny_dir, expert_residency="streaming", expert_slots=SLOTS)
    pf = DraftPrefetcher(store, max_staged=10)
    assert store.max_staged == 10 and pf.per_layer == 5
    tokens = list(range(8))
    for layer in range(len(store.banks)):  # every expert predicted for every layer
        pf.table.observe(layer, tokens, np.arange(32).reshape(8, 4) % 16)
    store.banks[0].lut[3] = 0  # pretend expert 3 of bank 0 is resident
    started = pf.prefetch(tokens)
    assert started == 10 == store.prefetched == pf.issued
    assert len(store._staged) == 10 and (0, 3) not in store._staged
    assert pf.prefetch(tokens) == 0  # all still staged
    store.banks[0].lut[3] = -1
    store.close()


def test_prefetch_only_in_streaming_and_opt_in(tiny_dir):
    assert BlockSpecDecEngineConfig().draft_prefetch is False
    model, tok, store, _ = load_moe(tiny_dir, expert_residency="stacked")
    eng = BlockSpecDecEngine(model, tok, config=BlockSpecDecEngineConfig(draft_prefetch=True, mode="prompt_lookup"),
                             store=store)
    assert eng.prefetcher is None
    with pytest.raises(ValueError):
        DraftPrefetcher(store)
