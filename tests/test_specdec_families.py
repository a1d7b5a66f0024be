"""BlockSpecDecEngine on the sliding-window families (gpt_oss: attention sinks; gemma4: tuple-returning decoder
layers, scaled embedding, logit softcapping) and deepseek_v4 (compressed caches, no hidden-state taps).

Greedy losslessness with random and oracle drafts (partial acceptance at every position), prompt lookup, stacked
and streaming residency (bank smaller than the experts), prompts both inside the window (verifies cross it) and
longer than it (wrapped from the start), the exact trim of rotating caches against a cache-free forward, and the
snapshot + re-run path once the window wraps."""

from __future__ import annotations

import json
import random

import mlx.core as mx
import pytest

from mach_runtime import BlockSpecDecEngine, BlockSpecDecEngineConfig, BlockSpecDecEngineMode, load_moe
from mach_runtime.engine.specdec.draft import Drafter
from mach_runtime.engine.specdec.target import TargetOps
from mach_runtime.errors import ConfigError
from tests.family_helpers import FAMILIES, FIXTURES
from tests.helpers import greedy
from tests.test_specdec import OracleDrafter, check_stats, random_draft, run

SWA = ("gpt_oss", "gemma4")
LONG = [5, 17, 99, 3, 250, 77, 12, 40, 41]  # longer than the fixtures' window: wrapped from the start
SHORT = [5, 17]  # inside the window: the first verifies start inside it and end past it
N = 32


def _window(family: str) -> int:
    cfg = json.loads((FAMILIES[family] / "config.json").read_text())
    return int(cfg.get("text_config", cfg)["sliding_window"])


@pytest.fixture(scope="module")
def targets():
    """family -> (model, tokenizer, {prompt: greedy reference}) in stacked residency."""
    out = {}
    for family in SWA:
        model, tok, _, _ = load_moe(FAMILIES[family], expert_residency="stacked")
        out[family] = (model, tok, {tuple(p): greedy(model, p, N) for p in (LONG, SHORT)})
    return out


def _oracle_engine(model, tok, ref, prompt, block, store=None):
    draft = random_draft(len(model.layers), [0, 1])
    config = BlockSpecDecEngineConfig(block_size=block, policy="fixed")
    ops = TargetOps(model)
    return BlockSpecDecEngine(model, tok, draft, config=config, store=store,
                              drafter=OracleDrafter(draft, ops, ref, len(prompt)))


class _GarbageEveryOther(Drafter):
    """Random tokens every other cycle, nothing in between: each rejected verify is followed by a single-token
    forward (the update that mishandled mlx-lm's own trim of a verify crossing the window)."""

    def __init__(self, seed: int = 0):
        self.rng, self.calls = random.Random(seed), 0

    def propose(self, history, staged, n):
        self.calls += 1
        return [self.rng.randrange(3, 500) for _ in range(n)] if self.calls % 2 else []


def _assert_partial(s: dict, block: int) -> None:
    check_stats(s)
    assert sum(s["acceptance_length_histogram"][1 : block - 1]) > 0  # partial acceptances happened
    assert s["specdec_accepted"] > s["specdec_drafted"] // 3


# -- stacked ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", SWA)
def test_window_wraps_during_generation(family):
    w = _window(family)
    assert len(SHORT) < w < len(LONG) and len(SHORT) + N > 4 * w


@pytest.mark.parametrize("family", SWA)
def test_random_draft_is_lossless(family, targets):
    model, tok, refs = targets[family]
    engine = BlockSpecDecEngine(model, tok, random_draft(len(model.layers), [0, 1]),
                                config=BlockSpecDecEngineConfig(block_size=8, policy="fixed"))
    for prompt in (LONG, SHORT):
        engine.reset_stats()
        toks, chunks = run(engine, prompt, max_tokens=N, ignore_eos=True)
        assert toks == refs[tuple(prompt)] and chunks[-1].finish_reason == "length"
        s = engine.stats()
        check_stats(s)
        assert s["specdec_cycles"] > 0 and s["specdec_committed"] == N
        assert s["specdec_rerun_tokens"] == 0  # rotating + KV caches trim exactly: no snapshot, no re-run


@pytest.mark.parametrize("family", SWA)
@pytest.mark.parametrize("prompt", [LONG, SHORT], ids=["wrapped", "crossing"])
def test_oracle_draft_partial_acceptance_is_lossless(family, prompt, targets):
    model, tok, refs = targets[family]
    ref = refs[tuple(prompt)]
    for block in (4, 8):
        engine = _oracle_engine(model, tok, ref, prompt, block)
        toks, _ = run(engine, prompt, max_tokens=N, ignore_eos=True)
        assert toks == ref, block
        s = engine.stats()
        _assert_partial(s, block)
        assert s["specdec_rerun_tokens"] == 0


@pytest.mark.parametrize("family", SWA)
def test_verify_crossing_the_window_then_single_tokens_is_lossless(family, targets):
    """Regression: with mlx-lm's ``RotatingKVCache.trim`` this decoded wrong tokens (prompt inside the window, a
    rejected verify ending past it, then a single-token step kept the rejected rows in the window)."""
    model, tok, refs = targets[family]
    for prompt in (SHORT, [5]):
        ref = refs.get(tuple(prompt)) or greedy(model, prompt, N)
        engine = BlockSpecDecEngine(model, tok, config=BlockSpecDecEngineConfig(block_size=8, policy="fixed"),
                                    drafter=_GarbageEveryOther())
        toks, _ = run(engine, prompt, max_tokens=N, ignore_eos=True)
        assert toks == ref
        s = engine.stats()
        assert s["specdec_target_only_steps"] > 0 and s["specdec_cycles"] > 0 and s["specdec_rerun_tokens"] == 0


@pytest.mark.parametrize("family", SWA)
def test_prompt_lookup_equals_greedy(family, targets):
    model, tok, refs = targets[family]
    cont = refs[tuple(LONG)]
    engine = BlockSpecDecEngine(model, tok, config=BlockSpecDecEngineConfig(mode=BlockSpecDecEngineMode.PROMPT_LOOKUP))
    for prompt in (LONG + cont[:16] + LONG, LONG + cont[:24]):  # prompts that hold (part of) their continuation
        ref = greedy(model, prompt, 24)
        toks, _ = run(engine, prompt, max_tokens=24, ignore_eos=True)
        assert toks == ref
    s = engine.stats()
    check_stats(s)
    assert s["specdec_drafted"] > 0 and s["specdec_accepted"] > 0


@pytest.mark.parametrize("family", SWA)
def test_wrapped_window_snapshot_and_rerun_is_lossless(family, targets, monkeypatch):
    """With mlx-lm's trimmability rule (``offset < max_size``) the engine snapshots every cache once the window
    has wrapped and re-runs the accepted tokens: the snapshot/restore of rotating caches is exact too."""
    from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

    from mach_runtime.engine.specdec.verify_cache import exact_rotating_caches

    model, tok, refs = targets[family]
    cache = make_prompt_cache(model)
    exact_rotating_caches(cache)
    rotating = next(type(c) for c in cache if isinstance(c, RotatingKVCache))
    assert rotating is not RotatingKVCache
    monkeypatch.setattr(rotating, "is_trimmable", lambda self: self.offset < self.max_size)
    for prompt in (SHORT, LONG):
        ref = refs[tuple(prompt)]
        engine = _oracle_engine(model, tok, ref, prompt, 8)
        toks, _ = run(engine, prompt, max_tokens=N, ignore_eos=True)
        assert toks == ref
        s = engine.stats()
        _assert_partial(s, 8)
        assert s["specdec_rerun_tokens"] > 0  # Checkpoint restored + accepted tokens re-run once wrapped
    engine = BlockSpecDecEngine(model, tok, config=BlockSpecDecEngineConfig(block_size=8, policy="fixed"),
                                drafter=_GarbageEveryOther())
    toks, _ = run(engine, SHORT, max_tokens=N, ignore_eos=True)
    assert toks == refs[tuple(SHORT)] and engine.stats()["specdec_rerun_tokens"] > 0


@pytest.mark.parametrize("family", SWA)
def test_rotating_trim_matches_a_cache_free_forward(family, targets):
    """Verify blocks of accepted tokens + garbage, trimmed (also whole blocks, then single tokens): every accepted
    row's logits equal a forward over the committed stream without any cache (bucketed full-attention KV too)."""
    model = targets[family][0]
    ops = TargetOps(model)
    rng = random.Random(3)
    stream = [rng.randrange(3, 500) for _ in range(70)]
    ref = model(mx.array([stream]))[0]
    cache = ops.make_cache(bucket_kv=True)
    ops.forward(mx.array(stream[:2], dtype=mx.uint32), cache, logits="none")
    pos = 2
    plan = [(8, 1), (3, 3), (8, 5), (1, 1), (5, 0), (1, 1), (2, 1), (9, 0), (4, 2), (1, 1), (1, 1), (6, 6), (7, 3),
            (2, 0), (1, 1), (8, 8), (3, 1)]
    worst = 0.0
    for b, keep in plan:
        block = stream[pos : pos + keep] + [rng.randrange(3, 500) for _ in range(b - keep)]
        logits, _ = ops.forward(mx.array(block, dtype=mx.uint32), cache)
        if keep:
            worst = max(worst, float(mx.abs(logits[:keep] - ref[pos : pos + keep]).max()))
        for c in cache:
            c.trim(b - keep)
        pos += keep
    assert pos > 4 * _window(family)
    assert worst <= 1e-4 * float(mx.abs(ref).max()), worst
    assert all(c.offset == pos for c in cache)


def test_head_and_embed_are_what_the_model_applies(targets):
    """gemma4: head = tied projection + final logit softcapping, embed = embedding × sqrt(hidden)."""
    from mlx_lm.models.cache import make_prompt_cache

    for family in SWA:
        model = targets[family][0]
        ops = TargetOps(model)
        ids = mx.array(LONG, dtype=mx.uint32)
        want = model(ids[None])[0]
        got, _ = ops.forward(ids, make_prompt_cache(model))
        assert float(mx.abs(got - want).max()) <= 1e-5 * float(mx.abs(want).max())
    g = TargetOps(targets["gemma4"][0])
    assert g.tied and g.softcap == 30.0 and g.embed_scale == 64**0.5
    raw = g.inner.embed_tokens(mx.array([3]))
    assert mx.allclose(g.embed(mx.array([3])), raw * 8.0)
    assert float(mx.abs(g.head(mx.ones((1, 64)) * 1e3)).max()) <= 30.0


# -- streaming: a bank smaller than the experts -------------------------------------------------------------------
@pytest.mark.parametrize("family", SWA)
def test_streaming_small_bank_is_lossless(family, targets):
    _, _, refs = targets[family]
    model, tok, store, _ = load_moe(FAMILIES[family], expert_residency="streaming", expert_slots=3)
    try:
        assert store.slots == 3 < store.layout.num_experts
        ref = refs[tuple(LONG)]
        engine = _oracle_engine(model, tok, ref, LONG, 8, store)
        toks, _ = run(engine, LONG, max_tokens=N, ignore_eos=True)
        assert toks == ref
        s = engine.stats()
        _assert_partial(s, 8)
        assert s["expert_bytes_read"] > 0 and s["expert_hit_rate"] < 1
        engine = BlockSpecDecEngine(model, tok, random_draft(len(model.layers), [0, 1]), store=store,
                                    config=BlockSpecDecEngineConfig(block_size=8, policy="residency-aware"))
        toks, _ = run(engine, SHORT, max_tokens=N, ignore_eos=True)
        assert toks == refs[tuple(SHORT)]
    finally:
        store.close()


# -- deepseek_v4 and unsupported families -------------------------------------------------------------------------
def test_deepseek_v4_prompt_lookup_and_no_hidden_taps():
    model, tok, _, _ = load_moe(FIXTURES / "hf_deepseek_v4", expert_residency="stacked")
    ref = greedy(model, LONG, 12)
    prompt = LONG + ref + LONG
    ref = greedy(model, prompt, 16)
    engine = BlockSpecDecEngine(model, tok, config=BlockSpecDecEngineConfig(mode=BlockSpecDecEngineMode.PROMPT_LOOKUP))
    toks, _ = run(engine, prompt, max_tokens=16, ignore_eos=True)
    assert toks == ref
    s = engine.stats()
    check_stats(s)
    assert s["specdec_accepted"] > 0 and s["specdec_rerun_tokens"] > 0  # compressed caches: snapshot + re-run
    ops = TargetOps(model)
    assert ops.num_layers == model.args.num_hidden_layers  # the MTP blocks are not target layers
    with pytest.raises(ConfigError, match="deepseek_v4.*hidden_taps=False"):
        BlockSpecDecEngine(model, tok, random_draft(ops.num_layers, [0, 1], hidden=32))


def test_unsupported_family_is_a_config_error(targets):
    gpt_oss = targets["gpt_oss"][0]

    class Other:  # the gpt_oss structure under another family name: embed / head semantics unknown
        model_type = "llama"
        args = gpt_oss.args
        lm_head = gpt_oss.lm_head
        model = gpt_oss.model

    with pytest.raises(ConfigError, match="llama.*supports qwen3_moe, qwen3_5_moe, gpt_oss, gemma4, deepseek_v4"):
        TargetOps(Other())
