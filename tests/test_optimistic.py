"""Optimistic streaming: hits need one host sync per forward, misses are redone exactly (io/optimistic.py)."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import ArraysCache, make_prompt_cache

from mach_runtime import load_moe
from mach_runtime.engine.generate import GenerationStats, generate_tokens, make_sampler
from mach_runtime.io.expert_reader import ExpertReader
from mach_runtime.io.optimistic import rollback_ok
from tests.helpers import reference_logits, rel_err
from tests.tolerances import reorder

TOL = reorder(1e-6)  # the same weights through different gather orders (tests/tolerances.py)
PROMPT = list(range(5, 30))


def _stacked(tiny_dir):
    model, tok, store, cache = load_moe(tiny_dir, expert_residency="stacked")
    return model


def _decode(model, temperature, n=24, prompt=PROMPT):
    mx.random.seed(11)
    return list(generate_tokens(model, prompt, make_prompt_cache(model), make_sampler(temperature, seed=11), n))


def _streaming(tiny_dir, slots, warm=False):
    model, tok, store, cache = load_moe(tiny_dir, expert_residency="streaming", expert_slots=slots)
    if warm:
        for bank in store.banks:
            store.ensure(bank, np.arange(bank.source.num_experts))
    return model, store


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("slots", [4, 7, 16])
def test_optimistic_decode_equals_stacked(tiny_dir, slots, temperature):
    want = _decode(_stacked(tiny_dir), temperature)
    model, store = _streaming(tiny_dir, slots)
    try:
        assert _decode(model, temperature) == want
        s = store.stats()
        assert s.optimistic_forwards > 0
        assert s.bytes_read == s.misses * s.expert_bytes  # redone forwards read nothing twice
        if slots < 16:
            assert s.redone_forwards > 0  # the small banks miss: rollback + sync redo was exercised
    finally:
        store.close()


def test_all_resident_decode_syncs_once_per_token(tiny_dir):
    model, store = _streaming(tiny_dir, 16, warm=True)
    try:
        prompt = PROMPT[:4]  # 3 prefill rows: one optimistic forward too
        s0 = store.stats()
        gstats = GenerationStats()
        mx.random.seed(11)
        toks = list(generate_tokens(model, prompt, make_prompt_cache(model), make_sampler(1.0, seed=11), 20, gstats))
        s1 = store.stats()
        forwards = 1 + len(toks)  # the prefill forward + one forward per generated token
        assert s1.host_syncs - s0.host_syncs == forwards  # one routing readback per forward, none per layer
        assert gstats.token_readbacks == 1  # the first token only: the others rode along with their step's check
        assert s1.redone_forwards == s0.redone_forwards and s1.misses == s0.misses
        assert s1.hits - s0.hits >= forwards * 2  # every layer's lookups were accounted (>= 1 distinct each)
        assert toks == _decode(_stacked(tiny_dir), 1.0, n=20, prompt=prompt)
        # the sync path (per-layer readback) for comparison: one sync per MoE layer per forward
        store.optimistic.enabled = False
        s2 = store.stats()
        _decode(model, 1.0, n=20, prompt=prompt)
        assert store.stats().host_syncs - s2.host_syncs == 2 * forwards
    finally:
        store.close()


@pytest.mark.parametrize("slots", [4, 16])
def test_eager_forward_redone_after_a_miss(tiny_dir, slots):
    """A direct model call (no decode loop): checked at its own end, rolled back and redone on a miss (retried
    with the first missing layer loaded where it fits the bank, else in sync mode)."""
    ids = PROMPT[:3]
    want = reference_logits(_stacked(tiny_dir), ids)
    model, store = _streaming(tiny_dir, slots)
    try:
        cache = make_prompt_cache(model)
        got = np.array(model(mx.array([ids]), cache=cache)[0])
        assert rel_err(got, want) <= TOL
        s = store.stats()
        assert s.redone_forwards == 1  # the empty bank missed
        assert all(c.offset == len(ids) for c in cache)  # the rolled-back tokens were not written twice
        assert s.hits + s.misses >= 2 and s.bytes_read == s.misses * s.expert_bytes
        if slots == 16:  # 3 tokens x top-4 fit: retried optimistically, then everything is resident
            assert s.retried_forwards >= 1
            cache = make_prompt_cache(model)
            got = np.array(model(mx.array([ids]), cache=cache)[0])
            assert rel_err(got, want) <= TOL and store.stats().redone_forwards == 1
            assert store.stats().misses == s.misses
    finally:
        store.close()


def test_caches_that_cannot_roll_back_take_the_sync_path(tiny_dir):
    assert rollback_ok(None, 3)
    assert not rollback_ok([ArraysCache(2)], 1)
    model, store = _streaming(tiny_dir, 16, warm=True)
    try:
        store.optimistic.enabled = True
        s0 = store.stats()
        model(mx.array([PROMPT[:40]]))  # 25 rows <= 32 with no cache: optimistic, one sync
        assert store.stats().host_syncs - s0.host_syncs == 1
        long = (PROMPT * 2)[:40]  # 40 rows: a prefill-sized call runs the per-layer path
        s1 = store.stats()
        model(mx.array([long]))
        assert store.stats().host_syncs - s1.host_syncs == 2
    finally:
        store.close()


def test_abandoned_decode_loop_does_not_confuse_the_next(tiny_dir):
    want = _decode(_stacked(tiny_dir), 1.0)
    model, store = _streaming(tiny_dir, 5)
    try:
        gen = generate_tokens(model, PROMPT, make_prompt_cache(model), make_sampler(1.0, seed=11), 24)
        for _ in range(5):
            next(gen)  # left suspended with a step queued
        assert _decode(model, 1.0) == want
        del gen
        assert _decode(model, 1.0) == want
    finally:
        store.close()


def test_bank_is_allocated_lazily(tiny_dir):
    """The slot arrays are not materialised at load: memory after load does not grow with the bank."""
    mx.clear_cache()
    base = mx.get_active_memory()
    model, store = _streaming(tiny_dir, 16)
    try:
        bank_bytes = sum(getattr(t.proj, t.comp).nbytes for b in store.banks for t in b.targets.values())
        assert mx.get_active_memory() - base < bank_bytes // 2
        assert len(_decode(model, 0.0, n=4)) == 4
    finally:
        store.close()


def test_reader_reuses_staging_buffers(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, 3 * 8192 + 100, dtype=np.uint8)
    f = tmp_path / "blob.bin"
    f.write_bytes(data.tobytes())
    reader = ExpertReader(threads=3)
    try:
        reqs = [[(str(f), 0, 5000), (str(f), 9000, 3000)], [(str(f), 17000, 4000)]]
        for _ in range(4):
            seen = {}
            for i, views, bufs in reader.read_iter(reqs):
                seen[i] = [bytes(v) for v in views]
                reader.release(bufs)
            assert seen == {i: [data[o:o + n].tobytes() for _, o, n in req] for i, req in enumerate(reqs)}
        assert reader.pool.allocated == 3  # one buffer per range size, reused every round
        assert reader.bytes_read == 4 * 12000
        # ranges that follow each other in one file are read at once, and split back exactly
        adjacent = [[(str(f), 100, 1000), (str(f), 1100, 2000), (str(f), 3100, 50)]]
        (i, views, bufs), = list(reader.read_iter(adjacent))
        assert [bytes(v) for v in views] == [data[o:o + n].tobytes() for _, o, n in adjacent[0]]
        assert len(bufs) == 1
        views, bufs = reader.submit(adjacent[0]).result()
        assert [bytes(v) for v in views] == [data[o:o + n].tobytes() for _, o, n in adjacent[0]] and len(bufs) == 1
    finally:
        reader.close()


def test_prefill_arena_keeps_the_decode_hot_set(tiny_dir):
    """A long prompt streams through the transient arena: the bank's residents stay, nothing is evicted, and the
    logits and tokens equal stacked residency."""
    ids = (PROMPT * 3)[:60]  # 60 rows: a prefill-sized call
    stacked = _stacked(tiny_dir)
    want = reference_logits(stacked, ids)
    want_tokens = _decode(stacked, 0.0, n=8, prompt=ids)
    model, store = _streaming(tiny_dir, 6)
    try:
        hot = np.array([0, 3, 5, 9, 12, 15])
        for bank in store.banks:
            store.ensure(bank, hot)
        before = [bank.lut.copy() for bank in store.banks]
        s0 = store.stats()
        got = np.array(model(mx.array([ids]))[0])
        assert rel_err(got, want) <= TOL
        s1 = store.stats()
        assert s1.evictions == s0.evictions  # the hot set was not touched
        assert all((b.lut == lut).all() for b, lut in zip(store.banks, before))
        assert s1.bytes_read - s0.bytes_read == (s1.misses - s0.misses) * s1.expert_bytes
        assert s1.hits > s0.hits  # bank-resident experts were copied into the arena, not read
        assert store.arena is not None  # kept while prefill chunks come ...
        assert _decode(model, 0.0, n=8, prompt=ids) == want_tokens
        assert store.arena is None  # ... and dropped by the first decode step
        store.arena_slots = 0  # turned off: the bank serves the prompt (and evicts)
        model(mx.array([ids]))
        assert store.stats().evictions > s1.evictions
    finally:
        store.close()


def test_prefill_arena_warms_a_cold_bank(tiny_dir):
    ids = (PROMPT * 3)[:60]
    model, store = _streaming(tiny_dir, 6)
    try:
        model(mx.array([ids]))
        s = store.stats()
        assert s.evictions == 0 and s.resident_experts == s.capacity_experts  # free slots filled, none evicted
    finally:
        store.close()


def test_pinning_from_a_routing_trace(tiny_dir, tmp_path):
    from mach_runtime.analysis.trace_replay import RoutingTrace
    from mach_runtime.errors import ConfigError

    model, store = _streaming(tiny_dir, 16)
    try:
        store.start_trace()
        _decode(model, 1.0, n=16)
        path = RoutingTrace.from_store(store).save(tmp_path / "trace.json")
    finally:
        store.close()
    want = _decode(_stacked(tiny_dir), 1.0, n=24)
    model, store = _streaming(tiny_dir, 6)
    try:
        pinned = store.pin_from_trace(path, per_layer=5)
        assert all(len(v) == 2 for v in pinned.values())  # capped at slots - top-k = 2
        gen = generate_tokens(model, PROMPT, make_prompt_cache(model), make_sampler(1.0, seed=11), 24)
        mx.random.seed(11)
        got = []
        for t in gen:
            got.append(t)
            for bank in store.banks:  # pinned experts stay resident at every step
                assert all(bank.lut[e] >= 0 for e in bank.pinned)
        assert got == want
        assert store.stats().evictions > 0  # the bank did evict: just never a pinned expert
        with pytest.raises(ConfigError, match="routing trace"):
            store.pin_from_trace(tmp_path / "missing.json", 2)
    finally:
        store.close()


@pytest.mark.parametrize("slots", [4, 16])
def test_compiled_streaming_decode_equals_stacked(tiny_dir, slots):
    """The hit path as compiled MoE blocks (engine/compiled_moe.py): the same tokens as stacked residency, with
    misses, rollbacks and slot-table updates (4 slots) and with every expert resident (one sync per token)."""
    from mach_runtime.engine.compiled_moe import compile_moe_blocks

    want = _decode(_stacked(tiny_dir), 1.0)
    model, store = _streaming(tiny_dir, slots, warm=slots == 16)
    try:
        assert compile_moe_blocks(model) == len(store.banks)
        s0 = store.stats()
        assert _decode(model, 1.0) == want
        s1 = store.stats()
        if slots == 16:
            assert s1.misses == s0.misses and s1.redone_forwards == s0.redone_forwards
            assert s1.host_syncs - s0.host_syncs == 1 + 24  # prefill + one per token
        else:
            assert s1.redone_forwards > 0 and s1.evictions > 0
    finally:
        store.close()


def test_vectorised_hit_bookkeeping_equals_call_by_call(tiny_dir, monkeypatch):
    """A verified decode forward steps every bank's eviction policy in one array update (``account_rows``): the
    hits, evictions, the policy state and the tokens equal those of the call-by-call bookkeeping."""
    from mach_runtime.io import optimistic

    def run():
        model, store = _streaming(tiny_dir, 7)
        try:
            toks = _decode(model, 1.0, n=32)
            t = store.policy_table
            return toks, store.stats(), t.tracked.copy(), t.score.copy(), [b.last_used for b in store.banks]
        finally:
            store.close()

    fast = run()
    calls = []
    orig = optimistic.OptimisticRunner._account

    def slow(self, parts, loaded):
        calls.append(len(parts))
        return orig(self, parts, {"force": ()} | (loaded or {}))  # a non-empty `loaded` takes the per-call path

    monkeypatch.setattr(optimistic.OptimisticRunner, "_account", slow)
    ref = run()
    assert calls  # the per-call path ran
    assert fast[0] == ref[0]
    for f in ("hits", "misses", "evictions", "host_syncs"):
        assert getattr(fast[1], f) == getattr(ref[1], f), f
    assert np.array_equal(fast[2], ref[2]) and np.array_equal(fast[3], ref[3])
    assert fast[4] == ref[4]
