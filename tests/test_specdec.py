"""BlockSpecDecEngine: greedy losslessness (random and oracle drafts, KV trim and GatedDeltaNet rollback),
sampled losslessness in distribution, stops inside accepted blocks, block policies, stats."""

from __future__ import annotations

import json
import random
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

from mach_runtime import BlockSpecDecEngine, BlockSpecDecEngineConfig, BlockSpecDecEngineMode
from mach_runtime.engine.sampling import SamplingParams
from mach_runtime.engine.sampling import filtered_logprobs as _filtered
from mach_runtime.engine.specdec.draft import DFlashDrafter, Drafter, save_dflash_draft
from mach_runtime.engine.specdec.policies import (
    FixedPolicy,
    OpenCodeSampledV1Policy,
    ResidencyAwarePolicy,
    PolicyMemory,
    make_policy,
)
from mach_runtime.errors import CheckpointError, ConfigError
from tests.family_helpers import FAMILIES
from tests.helpers import detokenize, greedy

PROMPT = [5, 17, 99, 3, 250, 77, 12, 40, 41]
N = 40
NATIVE = BlockSpecDecEngineMode.NATIVE_V7


def random_draft(num_target_layers: int, layer_ids, vocab: int = 512, hidden: int = 64, block: int = 8, seed: int = 1):
    from dflash_mlx.model import DFlashDraftModel, DFlashDraftModelArgs

    mx.random.seed(seed)
    args = DFlashDraftModelArgs.from_dict(dict(
        model_type="qwen3", hidden_size=hidden, num_hidden_layers=1, intermediate_size=2 * hidden,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, vocab_size=vocab,
        max_position_embeddings=4096, rope_theta=1e4, tie_word_embeddings=False,
        num_target_layers=num_target_layers, block_size=block,
        dflash_config={"mask_token_id": vocab - 1, "target_layer_ids": list(layer_ids)},
    ))
    model = DFlashDraftModel(args)
    model.set_dtype(mx.float32)
    model.eval()
    return model


class OracleDrafter(DFlashDrafter):
    """Runs the real draft (its context cache stays in sync), then proposes the reference continuation with one
    token corrupted in most blocks: partial acceptance + rollback at every position of the block."""

    def __init__(self, draft, target, ref, prompt_len, corrupt: float = 0.8, seed: int = 0):
        super().__init__(draft, target)
        self.ref, self.prompt_len, self.corrupt = ref, prompt_len, corrupt
        self.rng = random.Random(seed)

    def propose(self, history, staged, n):
        super().propose(history, staged, n)
        j = len(history) - self.prompt_len  # completion index of the first draft
        out = list(self.ref[j : j + n])
        if out and self.rng.random() < self.corrupt:
            i = self.rng.randrange(len(out))
            out[i] = (out[i] + 1) % 500
        return out


def run(engine, prompt=PROMPT, **kw):
    chunks = list(engine.generate(prompt, **kw))
    toks = [t for c in chunks for t in c.token_ids]
    return toks, chunks


def check_stats(s: dict) -> None:
    assert s["specdec_accepted"] <= s["specdec_drafted"]
    assert sum(s["acceptance_length_histogram"]) == s["specdec_cycles"]
    assert sum(i * n for i, n in enumerate(s["acceptance_length_histogram"])) == s["specdec_accepted"]
    assert s["low_cycles"] <= s["specdec_cycles"]


# -- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen3(tiny_dir):
    from mach_runtime import load_moe

    model, tok, store, _ = load_moe(tiny_dir, expert_residency="stacked")
    return model, tok, greedy(model, PROMPT, N)


@pytest.fixture(scope="module")
def qwen3_draft_dir(tmp_path_factory):
    return save_dflash_draft(random_draft(2, [0, 1]), tmp_path_factory.mktemp("draft") / "dflash")


@pytest.fixture(scope="module")
def hybrid():
    from mach_runtime import load_moe

    model, tok, _, _ = load_moe(FAMILIES["qwen3_5_moe"], expert_residency="stacked")
    return model, tok, greedy(model, PROMPT, N)


# -- greedy losslessness ---------------------------------------------------------------------------------------
def test_from_checkpoint_random_draft_is_lossless(tiny_dir, qwen3_draft_dir, qwen3):
    cfg = json.loads((qwen3_draft_dir / "config.json").read_text())
    assert cfg["block_size"] == 8 and cfg["dflash_config"]["target_layer_ids"] == [0, 1]
    engine = BlockSpecDecEngine.from_checkpoint(
        target_checkpoint=tiny_dir, draft_checkpoint=qwen3_draft_dir,
        config=BlockSpecDecEngineConfig(mode=NATIVE, block_size=8, policy="fixed"), expert_residency="stacked",
    )
    toks, chunks = run(engine, max_tokens=N, ignore_eos=True)
    assert toks == qwen3[2]
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    s = engine.stats()
    check_stats(s)
    assert s["specdec_cycles"] > 0 and s["specdec_committed"] == N


@pytest.mark.parametrize("family", ["qwen3", "hybrid"])
def test_oracle_draft_partial_acceptance_is_lossless(family, request):
    model, tok, ref = request.getfixturevalue(family)
    layers = [0, 1] if family == "qwen3" else [0, 2]
    draft = random_draft(len(model.layers), layers)
    for block in (4, 8):
        engine = BlockSpecDecEngine(model, tok, draft, config=BlockSpecDecEngineConfig(block_size=block, policy="fixed"))
        engine = BlockSpecDecEngine(model, tok, draft, config=engine.config,
                                    drafter=OracleDrafter(draft, engine.target, ref, len(PROMPT)))
        toks, _ = run(engine, max_tokens=N, ignore_eos=True)
        assert toks == ref
        s = engine.stats()
        check_stats(s)
        hist = s["acceptance_length_histogram"]
        assert sum(hist[1 : block - 1]) > 0  # partial acceptances happened
        assert s["specdec_accepted"] > s["specdec_drafted"] // 3
        assert s["specdec_rerun_tokens"] == 0  # attention trimmed; GatedDeltaNet state replayed from the tape


def test_hybrid_rollback_by_rerun_is_lossless(hybrid):
    """The snapshot + re-run path (no tape), forced at every position by an oracle draft."""
    model, tok, ref = hybrid
    draft = random_draft(len(model.layers), [0, 2])
    cfg = BlockSpecDecEngineConfig(block_size=8, policy="fixed", gdn_tape=False)
    engine = BlockSpecDecEngine(model, tok, draft, config=cfg)
    assert engine.tape is None
    engine = BlockSpecDecEngine(model, tok, draft, config=cfg, drafter=OracleDrafter(draft, engine.target, ref, len(PROMPT)))
    toks, _ = run(engine, max_tokens=N, ignore_eos=True)
    assert toks == ref
    assert engine.stats()["specdec_rerun_tokens"] > 0  # recurrent state restored + accepted tokens re-run


def test_hybrid_random_draft_is_lossless(hybrid):
    model, tok, ref = hybrid
    engine = BlockSpecDecEngine(model, tok, random_draft(3, [0, 2]), config=BlockSpecDecEngineConfig(block_size=8))
    toks, _ = run(engine, max_tokens=N, ignore_eos=True)
    assert toks == ref
    check_stats(engine.stats())


def test_target_only_and_prompt_lookup_equal_greedy(qwen3):
    model, tok, ref = qwen3
    engine = BlockSpecDecEngine(model, tok, config=BlockSpecDecEngineConfig(mode="target_only"))
    toks, _ = run(engine, max_tokens=N, ignore_eos=True)
    assert toks == ref
    s = engine.stats()
    assert s["specdec_cycles"] == 0 and s["specdec_target_only_steps"] == N - 1
    # prompt lookup: a prompt that already holds the continuation gets copies accepted
    prompt = PROMPT + ref[:20] + PROMPT
    ref2 = greedy(model, prompt, 24)
    engine = BlockSpecDecEngine(model, tok, config=BlockSpecDecEngineConfig(mode=BlockSpecDecEngineMode.PROMPT_LOOKUP))
    toks, _ = run(engine, prompt, max_tokens=24, ignore_eos=True)
    assert toks == ref2
    s = engine.stats()
    check_stats(s)
    assert s["specdec_accepted"] > 0


@pytest.mark.parametrize("stop_after", [None, 7])
def test_pipelined_target_only_equals_unpipelined(qwen3, stop_after):
    """TARGET_ONLY queues the next step before reading a token back; greedy and sampled outputs, stats and the
    handed-over KV (a prefix for a later request) equal the one-sync-per-token loop's."""
    model, tok, ref = qwen3
    stop_ids = [ref[stop_after]] if stop_after is not None else []
    runs = {}
    for pipelined in (True, False):
        engine = BlockSpecDecEngine(model, tok, config=BlockSpecDecEngineConfig(mode="target_only"))
        engine.pipeline_target_only = pipelined
        greedy_run = engine.generate(PROMPT, max_tokens=N, ignore_eos=True, stop_token_ids=stop_ids)
        toks = [t for c in greedy_run for t in c.token_ids]
        kv = greedy_run.handover()
        follow = [t for c in engine.generate(PROMPT + toks + [5, 6], max_tokens=6, ignore_eos=True, prefix=kv)
                  for t in c.token_ids]
        sampled = [t for c in engine.generate(PROMPT, max_tokens=N, temperature=0.9, top_p=0.95, seed=3,
                                              ignore_eos=True) for t in c.token_ids]
        runs[pipelined] = (toks, kv.n_tokens, follow, sampled, engine.stats()["specdec_target_only_steps"])
    (toks, n_kv, follow, sampled, steps), (toks2, n_kv2, follow2, sampled2, steps2) = runs[True], runs[False]
    assert (toks, follow, sampled, steps) == (toks2, follow2, sampled2, steps2)
    want = ref[: stop_after + 1] if stop_after is not None else ref
    assert toks == want
    # the KV covers every committed token but (at most) the last: the pipelined run has fed it already
    assert n_kv2 == len(PROMPT) + len(toks) - 1 and n_kv in (n_kv2, n_kv2 + 1)
    assert follow == greedy(model, PROMPT + toks + [5, 6], 6)


class ScriptedPolicy(FixedPolicy):
    """Block lengths from a script (cycled); records what it is told."""

    name = "scripted"

    def __init__(self, script):
        super().__init__(8)
        self.script, self.i, self.seen = script, 0, []

    def block_len(self, ctx_len=0):
        b = self.script[self.i % len(self.script)]
        self.i += 1
        return b

    def observe(self, block_len, accepted, bytes_read=0, seconds=0.0):
        self.seen.append((block_len, seconds))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_policy_target_only_stretches_run_pipelined_and_lossless(qwen3, monkeypatch, temperature):
    """A policy's b = 1 choices run as pipelined target-only stretches inside a speculative request (the drafter
    still sees every committed token): output equals the unpipelined engine's (greedy: plain greedy), every block
    length the policy asked for is the one run, and each step reports its seconds."""
    import mach_runtime.engine.specdec.engine as E

    model, tok, ref = qwen3
    script = [1, 1, 1, 4, 1, 8, 8, 1, 1, 2, 1]
    outs = {}
    for pipelined in (True, False):
        pols = []
        monkeypatch.setattr(E, "make_policy", lambda *a, **k: pols.append(ScriptedPolicy(script)) or pols[-1])
        engine = BlockSpecDecEngine(model, tok, random_draft(len(model.layers), [0, 1]),
                                    config=BlockSpecDecEngineConfig(block_size=8))
        engine.pipeline_target_only = pipelined
        outs[pipelined], _ = run(engine, max_tokens=N, ignore_eos=True, temperature=temperature, seed=5)
        pol = pols[-1]
        asked = [min(script[i % len(script)], 8) for i in range(pol.i)]
        seen = [b for b, _ in pol.seen]
        assert len(seen) >= pol.i - 1 and all(b <= a for b, a in zip(seen, asked))  # clamped near max_tokens
        assert seen[:24] == asked[:24]
        assert all(sec > 0 for _, sec in pol.seen)
        s = engine.stats()
        assert s["specdec_cycles"] > 0 and s["specdec_target_only_steps"] > 10
    assert outs[True] == outs[False]
    if temperature == 0:
        assert outs[True] == ref


def test_target_only_fallback_above_context(qwen3, qwen3_draft_dir):
    model, tok, ref = qwen3
    from mach_runtime.engine.specdec.draft import load_dflash_draft

    cfg = BlockSpecDecEngineConfig(block_size=8, policy="fixed", target_only_above_context=len(PROMPT) + 10)
    engine = BlockSpecDecEngine(model, tok, load_dflash_draft(qwen3_draft_dir), config=cfg)
    toks, _ = run(engine, max_tokens=N, ignore_eos=True)
    assert toks == ref
    s = engine.stats()
    assert 0 < s["specdec_cycles"] <= 11 and s["specdec_target_only_steps"] > 20


# -- sampling (THE sampler's own tests: tests/test_sampling.py) -------------------------------------------------
def filtered_logprobs(logits, temperature, top_p, top_k):
    return _filtered(logits, SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k))


class _SecondChoice(Drafter):
    """Proposes the target's 2nd most likely token: accepted sometimes, rejected often."""

    def __init__(self, model):
        self.model = model

    def propose(self, history, staged, n):
        logits = self.model(mx.array([history]))[0, -1]
        return [int(mx.argsort(-logits)[1].item())][:n]


def test_sampled_generation_matches_target_distribution(qwen3):
    """(t0, t1, t2) from the engine (t1 drafted, accepted or resampled; t2 bonus or next cycle) vs the exact
    target distribution with top-k=3: chi-square over the 27 paths."""
    model, tok, _ = qwen3
    prompt = PROMPT[:4]
    params = dict(temperature=1.5, top_k=3)
    exact = exact_paths(model, prompt, 1.5, 3)
    engine = BlockSpecDecEngine(model, tok, config=BlockSpecDecEngineConfig(block_size=2, policy="fixed"),
                                drafter=_SecondChoice(model))
    n = 450
    counts = Counter()
    for seed in range(n):
        toks, _ = run(engine, prompt, max_tokens=3, seed=seed, ignore_eos=True, **params)
        counts[tuple(toks)] += 1
    assert set(counts) <= set(exact)
    s = engine.stats()
    assert 0 < s["specdec_accepted"] < s["specdec_drafted"]  # both branches exercised
    assert_matches(counts, exact, n)


def exact_paths(model, prompt, temperature: float, top_k: int) -> dict:
    """The exact probability of every 3-token continuation under plain sampling (temperature, top-k)."""

    def dist(ids):
        p = np.exp(np.array(filtered_logprobs(model(mx.array([ids]))[0, -1:], temperature, 1.0, top_k)[0]))
        return {int(i): float(p[i]) for i in np.nonzero(p)[0]}

    exact = {}
    for a, pa in dist(prompt).items():
        for b, pb in dist(prompt + [a]).items():
            for c, pc in dist(prompt + [a, b]).items():
                exact[(a, b, c)] = pa * pb * pc
    return exact


def assert_matches(counts: Counter, exact: dict, n: int) -> None:
    """Chi-square test (p = 0.001) of ``n`` sampled paths against their exact distribution (rare paths pooled)."""
    assert set(counts) <= set(exact)
    obs, exp, o_rest, e_rest = [], [], 0, 0.0
    for k in sorted(exact, key=lambda k: -exact[k]):
        if exact[k] * n >= 5:
            obs.append(counts[k])
            exp.append(exact[k] * n)
        else:
            o_rest += counts[k]
            e_rest += exact[k] * n
    if e_rest > 0:
        obs.append(o_rest)
        exp.append(e_rest)
    exp = np.array(exp) * n / sum(exp)
    stat = float(((np.array(obs) - exp) ** 2 / exp).sum())
    assert stat < chi2_quantile_999(len(obs) - 1), (stat, obs, exp.round(1))


def chi2_quantile_999(df: int) -> float:
    """The 0.999 quantile of chi-square(df) (Wilson-Hilferty; no scipy here)."""
    z = 3.0902
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


# -- stops -----------------------------------------------------------------------------------------------------
def _perfect_engine(model, tok, ref, block=8):
    draft = random_draft(len(model.layers), [0, 1])
    engine = BlockSpecDecEngine(model, tok, draft, config=BlockSpecDecEngineConfig(block_size=block, policy="fixed"))
    return BlockSpecDecEngine(model, tok, draft, config=engine.config,
                              drafter=OracleDrafter(draft, engine.target, ref, len(PROMPT), corrupt=0.0))


def test_stop_token_inside_accepted_block(qwen3):
    model, tok, ref = qwen3
    i = next(i for i in range(4, N) if ref[i] not in ref[:i])
    engine = _perfect_engine(model, tok, ref)
    toks, chunks = run(engine, max_tokens=N, stop_token_ids=(ref[i],), ignore_eos=True)
    assert toks == ref[: i + 1] and chunks[-1].finish_reason == "stop"
    assert engine.stats()["acceptance_length_histogram"][-1] >= 1  # whole blocks were accepted


def test_stop_string_inside_accepted_block(qwen3):
    model, tok, ref = qwen3
    full = detokenize(tok, ref)
    start = len(detokenize(tok, ref[:12]))
    stop = next(full[j : j + 3] for j in range(start, len(full) - 3) if full[j : j + 3].strip() and full.find(full[j : j + 3]) == j)
    engine = _perfect_engine(model, tok, ref)
    toks, chunks = run(engine, max_tokens=N, stop=[stop], ignore_eos=True)
    text = "".join(c.text for c in chunks)
    assert text == full[: full.find(stop)] and chunks[-1].finish_reason == "stop"
    assert len(toks) < N and toks == ref[: len(toks)]
    assert stop in detokenize(tok, toks) and stop not in detokenize(tok, toks[:-1])  # nothing past the stop


# -- policies --------------------------------------------------------------------------------------------------
def test_fixed_and_opencode_policy_transitions():
    assert FixedPolicy(16).block_len() == 16
    p = OpenCodeSampledV1Policy(16)
    for _ in range(4):  # good full cycles stay full
        assert p.block_len() == 16
        p.observe(16, 10)
    assert p.mode == "full"
    for _ in range(4):  # poor acceptance: 2 tokens per cycle → reduced to 4
        p.observe(16, 1)
    assert p.mode == "reduced" and p.block_len() == 4
    for _ in range(63):
        p.observe(4, 1)
    assert p.mode == "reduced"
    p.observe(4, 1)  # the 64th reduced cycle → probe full blocks
    assert p.mode == "probe" and p.block_len() == 16
    for _ in range(8):  # probe fails
        p.observe(16, 2)
    assert p.mode == "reduced"
    for _ in range(16):  # fully accepted reduced cycles → early probe after 16
        p.observe(4, 3)
    assert p.mode == "probe" and p.probe_left == 4
    for _ in range(4):  # the probe accepts well → back to full
        p.observe(16, 14)
    assert p.mode == "full" and p.block_len() == 16
    assert p.transitions == ["reduced", "probe", "reduced", "probe", "full"]
    assert OpenCodeSampledV1Policy(16, prompt_len=40000).block_len() == 4  # long prompts start reduced
    with pytest.raises(ConfigError):
        make_policy("nope", 16)


class _FakeStats:
    def __init__(self, hit_rate):
        self.num_experts, self.layers, self.expert_bytes, self.hit_rate, self.bytes_read = 64, 4, 1000, hit_rate, 0


class _FakeStore:
    residency = "streaming"

    def __init__(self, hit_rate=0.5):
        self.hit_rate = hit_rate
        self.layout = type("L", (), {"top_k": 4})()

    def stats(self):
        return _FakeStats(self.hit_rate)


def test_residency_aware_policy_model():
    p = ResidencyAwarePolicy(16, _FakeStore())
    assert p.block_len() == 1 and p.block_len() == 1  # warm-up: measure a target-only token first
    p.observe(1, 0, 8000)
    p.observe(1, 0, 8000)
    # good acceptance, verifies that read little extra (experts shared / resident) → drafting pays
    for _ in range(64):
        b = p.block_len()
        p.observe(b, b - 1, 8000 + 200 * (b - 1))
    assert p.decisions[2] == 2  # explores with the cheapest drafting cycle first
    assert p.block_len() == 16 and p.credit > 0  # then grows the block as measured verifies stay cheap
    # acceptance collapses and every extra token misses: verifying b tokens costs b target-only tokens
    q = ResidencyAwarePolicy(16, _FakeStore(), probe_interval=0)
    q.observe(1, 0, 8000), q.observe(1, 0, 8000)
    for _ in range(8):
        b = q.block_len()
        q.observe(b, 0, 8000 * b) if b > 1 else q.observe(1, 0, 8000)
    assert q.block_len() == 1 and all(d == 1 for d in q.decisions[-4:])
    # the ledger: realized bytes never exceed target-only's by more than one cycle
    assert q.credit >= -8000 * 16
    # stacked residency: acceptance-only (opencode-sampled-v1)
    assert ResidencyAwarePolicy(16, None).block_len() == 16


def test_residency_aware_time_term():
    """Bytes say drafting pays (verifies read little extra) but a drafting cycle takes longer than target-only
    for the tokens it commits (a CPU): the measured cycle times turn drafting off after the first cycles; a later
    request on the same engine (shared timings) does not even explore; while the time ledger is negative,
    probes are spaced so their measured loss stays under 2 % of the time between them."""
    memory, t1 = PolicyMemory(), 0.01
    p = ResidencyAwarePolicy(16, _FakeStore(), memory=memory)
    for _ in range(2):
        assert p.block_len() == 1
        p.observe(1, 0, 8000, t1)
    blocks = []
    for _ in range(200):
        b = p.block_len()
        blocks.append(b)
        # half the drafts accepted; a cycle of b takes 1.5 b target-only steps
        p.observe(b, b // 2, 8000 + 100 * (b - 1), 1.5 * t1 * b if b > 1 else t1)
    assert 1 <= sum(b > 1 for b in blocks) <= 3 and set(blocks[3:]) == {1}
    assert p.credit > 0 and p.time_credit >= -1.5 * t1 * 16  # within one cycle of target-only's time
    q = ResidencyAwarePolicy(16, _FakeStore(), memory=memory)  # the next request: the timings are known
    q.observe(1, 0, 8000, t1), q.observe(1, 0, 8000, t1)
    assert [q.block_len() for _ in range(5)] == [1] * 5
    # in time debt: probes every max(64, loss / (2 % of t1)) target-only steps
    timed = PolicyMemory()
    timed.series(1).extend([t1] * 5), timed.series(2).extend([0.05] * 5)
    r = ResidencyAwarePolicy(16, _FakeStore(), memory=timed, warmup_steps=0)
    r.acceptance.add(1, 1)
    r.time_credit = -0.05
    calls = [r.block_len() for _ in range(1000)]
    probes = [i for i, b in enumerate(calls) if b == 2]
    gaps = [j - i for i, j in zip([-1] + probes, probes)]
    loss = 0.05 - t1 * r.expected_tokens(2)
    assert gaps and min(gaps) >= max(64, loss / (0.02 * t1)) and max(gaps) <= loss / (0.02 * t1) + 2
    r.probe_interval = 0
    assert set(r.block_len() for _ in range(500)) == {1}  # the strict bound: no probes


def test_residency_aware_streaming_never_loses_to_target_only(tiny_dir):
    """Random draft (almost no acceptance) in streaming residency with a small bank: bytes per committed token
    of residency-aware stay within one verify of target-only's, while fixed blocks read far more."""
    from mach_runtime import load_moe

    results = {}
    for name, mode, policy in (("target", "target_only", "fixed"), ("fixed", "native_v7", "fixed"),
                               ("aware", "native_v7", "residency-aware")):
        expert_bytes = 3 * 64 * 32 * 4  # gate, up, down of hidden 64 × moe_inter 32, fp32
        model, tok, store, _ = load_moe(tiny_dir, expert_residency="streaming", expert_cache_gb=6 * 2 * expert_bytes / 2**30)
        assert store.slots == 6 and store.stats().expert_bytes == expert_bytes
        engine = BlockSpecDecEngine(model, tok, random_draft(2, [0, 1]), store=store,
                                    config=BlockSpecDecEngineConfig(mode=mode, block_size=8, policy=policy))
        toks, _ = run(engine, max_tokens=N, ignore_eos=True)
        results[name] = (toks, store.stats().bytes_read)
        store.close()
    assert results["target"][0] == results["fixed"][0] == results["aware"][0]
    target, fixed, aware = (results[k][1] for k in ("target", "fixed", "aware"))
    verify_worst = 2 * 16 * 3 * 64 * 32 * 4  # a verify reads at most every expert of both layers
    assert fixed > target
    assert aware <= target + verify_worst


# -- errors ----------------------------------------------------------------------------------------------------
def test_config_and_draft_errors(qwen3, tmp_path):
    model, tok, _ = qwen3
    with pytest.raises(ConfigError):
        BlockSpecDecEngineConfig(policy="greedy-ish")
    with pytest.raises(ConfigError):
        BlockSpecDecEngineConfig(mode="warp")
    with pytest.raises(ConfigError):
        BlockSpecDecEngine(model, tok, config=BlockSpecDecEngineConfig(mode=NATIVE))  # no draft
    with pytest.raises(ConfigError):
        BlockSpecDecEngine(model, tok, random_draft(2, [0, 5]))  # layer outside the target
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    from mach_runtime.engine.specdec.draft import load_dflash_draft

    with pytest.raises(CheckpointError):
        load_dflash_draft(tmp_path)


def test_bucketed_kv_cache_equals_plain_cache(qwen3):
    """Multi-token forwards over KV lengths rounded up to 64 (masked) give the plain cache's logits."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    from mach_runtime.engine.specdec.verify_cache import KV_BUCKET, bucket_kv_caches

    model = qwen3[0]
    plain, bucketed = make_prompt_cache(model), make_prompt_cache(model)
    bucket_kv_caches(bucketed)
    assert type(bucketed[0]).__name__ == "BucketedKVCache"
    ids = list(range(5, 400))
    pos, caps = 0, []
    for n, keep in [(37, 37), (16, 9), (16, 16), (1, 1), (16, 3), (200, 200), (16, 16)]:  # crosses 256-steps
        blk = mx.array([ids[pos : pos + n]])
        a, b = model(blk, cache=plain), model(blk, cache=bucketed)
        assert float(mx.abs(a - b).max()) <= 1e-4 * float(mx.abs(a).max())
        trim_prompt_cache(plain, n - keep)
        trim_prompt_cache(bucketed, n - keep)
        pos += keep
        caps.append(bucketed[0].keys.shape[2])
    assert bucketed[0].offset == plain[0].offset == pos and pos % KV_BUCKET != 0
    # the buffer grows in whole steps and never shrinks: a bucket's K/V view keeps its strides
    assert all(c % bucketed[0].step == 0 for c in caps) and caps == sorted(caps) and caps[-1] > caps[0]


def test_warmup_runs_every_block_length_and_leaves_no_trace(qwen3):
    model, tok, ref = qwen3
    engine = BlockSpecDecEngine(model, tok, random_draft(2, [0, 1]), config=BlockSpecDecEngineConfig(block_size=8))
    seen = []
    forward = engine.target.forward
    engine.target.forward = lambda block, *a, **k: (seen.append(block.shape[0]), forward(block, *a, **k))[1]
    assert engine.warmup() > 0
    assert {2, 4, 8} <= set(seen)  # each policy block length was verified once
    assert engine.stats()["specdec_cycles"] == 0 and engine.stats()["specdec_committed"] == 0
    del engine.target.forward
    toks, _ = run(engine, max_tokens=N, ignore_eos=True)
    assert toks == ref


def _feed(policy, b: int, seconds: float, accepted: int) -> None:
    assert policy.block_len() == b
    policy.observe(b, accepted, 0, seconds)


def test_throughput_policy_picks_the_fastest_block_for_the_measured_costs():
    from mach_runtime.engine.specdec.policies import ThroughputPolicy

    def explore(policy, cost):
        for b in (16, 1, 2, 4, 8):  # full block first, then a target-only step, then the others, 3 times each
            for _ in range(3):
                _feed(policy, b, cost(b), 0)

    def acceptance(policy, accepted_of_15: int) -> None:  # set alpha through 32 cycles of 15 drafts
        policy.acceptance.own.clear()
        for _ in range(32):
            policy.acceptance.add(15, accepted_of_15)

    gpu = ThroughputPolicy(16, remeasure_every=1000)
    assert gpu.candidates == [1, 2, 4, 8, 16]
    explore(gpu, lambda b: 0.0017 if b == 1 else 0.0033)  # launch-bound: a verify costs ~the same at any length
    acceptance(gpu, 4)  # alpha 0.8
    assert gpu.best() == 16 and gpu.block_len() == 16
    cpu = ThroughputPolicy(16, remeasure_every=1000)
    explore(cpu, lambda b: 0.010 * (1 + 0.4 * (b - 1)))  # compute-bound: ~0.4 steps per extra token
    acceptance(cpu, 1)  # alpha 0.5: 2-token blocks pay, longer ones do not
    assert abs(cpu.alpha - 0.5) < 1e-9 and cpu.best() == 2
    acceptance(cpu, 0)  # almost nothing accepted: decode target-only
    assert cpu.best() == 1 and cpu.block_len() == 1
    # re-measurement: every remeasure_every cycles one other candidate, in turn
    p = ThroughputPolicy(4, remeasure_every=3, remeasure_budget=1.0)
    for b in (4, 4, 4, 1, 1, 1, 2, 2, 2):
        _feed(p, b, 0.001 if b > 1 else 0.002, b - 1)
    picks = [p.block_len() for _ in range(9)]
    assert picks.count(4) >= 6 and {1, 2} & set(picks)
    # timings are medians: a cycle that built kernels (first verify at a new KV span on a GPU) does not flip it
    q = ThroughputPolicy(4, remeasure_every=1000)
    for b in (4, 4, 4, 1, 1, 1, 2, 2, 2):
        _feed(q, b, 0.003, b - 1)
    for t in (5.0, 0.003):
        q.observe(4, 3, 0, t)
    assert q.seconds(4) == 0.003 and q.best() == 4
    # on target-only: the full block is re-measured every 4th time; re-measurements cheap enough every 2 calls
    r = ThroughputPolicy(16, remeasure_every=2)
    explore(r, lambda b: 0.001 if b == 1 else 0.0011)
    acceptance(r, 0)
    assert r.best() == 1
    picks = [r.block_len() for _ in range(16)]
    assert 16 in picks and picks.count(1) >= 8
    # a CPU's costs: each re-measurement (a 2-token cycle ~ 7 steps) is spaced to lose at most 2 % of the time
    c = ThroughputPolicy(16)
    explore(c, lambda b: 0.010 if b == 1 else 0.065 + 0.01 * b)
    acceptance(c, 1)
    picks = [c.block_len() for _ in range(5000)]
    lost = sum(c.seconds(b) - c.expected_tokens(b) * c.seconds(1) for b in picks if b > 1)
    worst = max(c.seconds(b) for b in c.candidates)  # the first one after exploring is 32 calls in
    assert c.best() == 1 and 0 < sum(b > 1 for b in picks) < 20 and lost <= 0.02 * 0.010 * len(picks) + worst


def test_acceptance_curve_follows_bursty_cycles_and_ages_by_tokens():
    """Tokens per cycle come from the recorded cycles' product-limit curve, not one per-draft rate: half the
    cycles accepting the whole block and half nothing give T(16) = 8.5 and T(2) = 1.5 (a geometric run at
    their rate would say 10.1 and 1.93); a full acceptance is censored at the length drafted; evidence
    ages with the tokens decoded since, towards the engine's own recent cycles."""
    from mach_runtime.engine.specdec.policies import Acceptance

    acc = Acceptance(window=32)
    for i in range(32):
        acc.add(15, 15 if i % 2 else 0)
    assert abs(acc.expected_tokens(16) - 8.5) < 0.2 and abs(acc.expected_tokens(2) - 1.5) < 0.05
    assert abs(acc.expected_tokens(16, acc.alpha) - 10.1) < 0.2 and acc.expected_tokens(2, acc.alpha) > 1.9
    short = Acceptance(window=32)
    for _ in range(32):
        short.add(3, 3)  # 4-token cycles, all accepted: says nothing about draft 4 onwards
    assert short.expected_tokens(4) > 3.9 and short.expected_tokens(16) < 16
    memory = PolicyMemory()
    for _ in range(32):
        memory.cycles.append((15, 15))  # the engine has seen whole blocks accepted
    aged = Acceptance(window=32, memory=memory)
    for _ in range(8):
        aged.add(15, 0)
    assert aged.expected_tokens(16) < 3
    aged.at(2000)  # ~16 half-lives later the 8 failures weigh nothing
    assert aged.expected_tokens(16) > 12


def test_throughput_policy_starts_from_the_engines_acceptance_and_probes_out_of_target_only():
    """A later request starts from the acceptance the engine measured (not α = 0.5, where on a launch-bound GPU
    no block pays and every request began target-only); through unpredictable text it decodes target-only and
    its probes cost < 5 % of the time; when the text turns predictable again it is back at full blocks within 64
    tokens (evidence ages with the tokens decoded since)."""
    from mach_runtime.engine.specdec.policies import ThroughputPolicy

    def cost(b):  # a launch-bound GPU: a cycle costs ~2.2 target-only steps at any length
        return 0.002 if b == 1 else 0.0044 + 0.00001 * b

    def decode(policy, accepted, n_tokens, pos=0):
        picks, end = [], pos + n_tokens
        while pos < end:
            b = policy.block_len(pos)
            a = accepted(b)
            policy.observe(b, a, 0, cost(b))
            picks.append(b)
            pos += a + 1
        return picks, pos

    memory = PolicyMemory()
    first = ThroughputPolicy(16, memory=memory)
    decode(first, lambda b: min(4, b - 1), 400)  # 4 drafts accepted of any block: 5 tokens from b = 5 on
    assert first.best() == 8 and 4.7 < first.expected_tokens(8) <= first.expected_tokens(16) < 5.3  # 8: cheaper
    second = ThroughputPolicy(16, memory=memory)
    assert second.alpha > 0.75 and second.block_len(0) == 8
    uninformed = PolicyMemory()
    uninformed.times = memory.times  # the same costs, no acceptance history
    assert ThroughputPolicy(16, memory=uninformed).best() == 1
    picks, pos = decode(second, lambda b: 0, 2000, 1)  # unpredictable: nothing accepted
    drafting = [b for b in picks[8:] if b > 1]
    lost = sum(cost(b) - cost(1) for b in drafting)
    # probes are spaced by their expected loss (2 %); here they accept nothing, below what the model expects
    assert picks[-200:].count(1) > 190 and lost < 0.05 * cost(1) * len(picks[8:])
    picks, _ = decode(second, lambda b: b - 1, 300, pos)  # predictable again
    last_target_only = max(i for i, b in enumerate(picks) if b == 1)
    later = picks[last_target_only + 1 :]
    assert last_target_only < 64 and later.count(16) >= 0.8 * len(later) >= 10


def test_throughput_policy_is_lossless_and_selectable(qwen3):
    model, tok, ref = qwen3
    cfg = BlockSpecDecEngineConfig(block_size=8, policy="throughput")
    draft = random_draft(2, [0, 1])
    engine = BlockSpecDecEngine(model, tok, draft, config=cfg,
                                drafter=OracleDrafter(draft, BlockSpecDecEngine(model, tok, draft).target, ref, len(PROMPT)))
    toks, _ = run(engine, max_tokens=N, ignore_eos=True)
    assert toks == ref
    first = engine.last_policy
    assert first.name == "throughput" and all(first.times[b] for b in (1, 8))
    assert isinstance(make_policy("throughput", 8), type(first))
    toks, _ = run(engine, max_tokens=N, ignore_eos=True)  # the next request keeps the engine's measured costs
    assert toks == ref and engine.last_policy is not first and engine.last_policy.memory is first.memory
