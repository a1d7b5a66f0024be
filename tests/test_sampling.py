"""THE sampler: one keyed draw for every path.

Unit level: the filters against mlx-lm's own (``mlx_lm.sample_utils``), the keyed inverse-CDF pick against the
distribution it draws from, speculative acceptance (deterministic drafts: token-identical to plain sampling;
a draft distribution: distribution-exact). Model level: for the same (seed, position) keys the same tokens come
out of ``generate`` (``mach generate --seed``), the BatchEngine (batched with other rows), the spec engine's
target-only and speculative modes, and the BatchedSpecDecoder.
"""

from __future__ import annotations

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

from mach_runtime.engine.sampling import (
    SamplingParams, accept, filtered_logprobs, pick, sample, sample_rows, uniform,
)

V = 12


def _logits(seed=0, n=3):
    return mx.array(np.random.default_rng(seed).normal(size=(n, V)).astype(np.float32) * 1.7)


@pytest.mark.parametrize("kw", [dict(top_k=4), dict(top_p=0.7), dict(min_p=0.15)])
def test_filters_match_mlx_lm(kw):
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    logits = _logits(1, 4)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    ref = {"top_k": lambda: apply_top_k(logp, kw.get("top_k")), "top_p": lambda: apply_top_p(logp, kw.get("top_p")),
           "min_p": lambda: apply_min_p(logp, kw.get("min_p"))}[next(iter(kw))]()
    ours = filtered_logprobs(logits, SamplingParams(temperature=1.0, **kw))
    assert np.array_equal(np.isfinite(np.array(ours)), np.isfinite(np.array(ref)))


def test_uniform_is_keyed_and_spread():
    us = [uniform(7, p) for p in range(4000)]
    assert us == [uniform(7, p) for p in range(4000)] and us[:50] != [uniform(8, p) for p in range(50)]
    assert all(0 <= u < 1 for u in us) and abs(np.mean(us) - 0.5) < 0.02


def test_keyed_pick_follows_the_distribution():
    p = SamplingParams(temperature=0.8, top_k=6)
    logp = filtered_logprobs(_logits(2, 1), p)
    want = np.exp(np.array(logp[0]))
    n = 4000
    counts = Counter(int(pick(logp, [uniform(s, 0)]).item()) for s in range(n))
    emp = np.array([counts[i] / n for i in range(V)])
    assert set(counts) <= set(np.nonzero(want)[0].tolist())  # never a masked token
    assert 0.5 * np.abs(emp - want).sum() < 0.03


def test_every_entry_point_draws_the_same_token_for_the_same_key():
    logits = _logits(3, 4)
    for seed in range(20):
        p = SamplingParams(temperature=0.9, top_p=0.9, seed=seed)
        one = [int(sample(logits[i : i + 1], p, 5 + i).item()) for i in range(4)]
        assert sample(logits, p, 5).tolist() == one  # a block of positions (a verify)
        rows = sample_rows(logits, [(p, 5 + i) for i in range(4)]).tolist()  # a batch of rows
        assert rows == one
        mixed = SamplingParams(temperature=0.5, seed=seed + 100)  # batch mates with other filters change nothing
        assert sample_rows(logits, [(p, 5), (mixed, 0), (p, 7), (mixed, 1)]).tolist()[::2] == one[::2]
        assert accept(logits, one[:3], p, 5) == (3, one[3])  # drafts equal to the draws: all accepted
        bad = [(one[0] + 1) % V, one[1], one[2]]
        assert accept(logits, bad, p, 5) == (0, one[0])  # the first mismatch emits the sampler's own token


def test_rejection_with_a_draft_distribution_is_exact():
    """The general rule (q not one-hot): position 0's token follows p whatever q proposes."""
    logits = _logits(4, 2)
    p = SamplingParams(temperature=1.0)
    p0 = np.exp(np.array(filtered_logprobs(logits, p)[0]))
    q = mx.log(mx.softmax(_logits(5, 1), axis=-1))
    counts = Counter()
    n = 3000
    for seed in range(n):
        draft = int(pick(q, [uniform(seed, 0, 2)]).item())  # x ~ q
        acc, nxt = accept(logits, [draft], SamplingParams(temperature=1.0, seed=seed), 0, draft_logprobs=q)
        counts[draft if acc else nxt] += 1
    emp = np.array([counts[i] / n for i in range(V)])
    assert 0.5 * np.abs(emp - p0).sum() < 0.045


def test_logits_processor_hook_sees_the_history():
    seen = []

    def ban_last(tokens, logits):
        seen.append(tokens.tolist())
        return mx.where(mx.arange(logits.shape[-1]) == tokens[-1], -mx.inf, logits)

    logits = mx.zeros((2, V))
    logits[:, 3] = 5.0
    p = SamplingParams(processors=(ban_last,))
    out = sample(logits, p, 0, [[1, 3], [1, 3, 4]]).tolist()
    assert seen == [[1, 3], [1, 3, 4]] and out[0] != 3 and out[1] == 3


def test_all_paths_agree_on_a_model(tiny_dir):
    """Sampled decoding of one request (temperature 0.9, top-p 0.95, seed 1234) through every path."""
    from mach_runtime import BlockSpecDecEngine, BlockSpecDecEngineConfig, load_moe
    from mach_runtime.engine.batch import Admission, BatchEngine
    from mach_runtime.engine.generate import stream_generate
    from mach_runtime.engine.specdec.batched import BatchedSpecDecoder

    model, tok, store, _ = load_moe(tiny_dir, expert_residency="stacked")
    prompt = tok.encode("def fib(n):\n    return")
    n = 16
    p = SamplingParams(max_tokens=n, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    ref = [c.token for c in stream_generate(model, tok, prompt, params=p)]
    assert len(ref) == n
    be = BatchEngine(model, tok, max_batch=3)
    be.add_many([Admission("a", tuple(prompt), p),
                 Admission("mate", tuple(tok.encode("import os")), SamplingParams(max_tokens=n, temperature=1.0,
                                                                                 seed=9, ignore_eos=True))])
    got = []
    while len(got) < n:
        got += [o.token for o in be.step() if o.request_id == "a"]
    assert got[:n] == ref
    for mode in ("target_only", "prompt_lookup"):
        eng = BlockSpecDecEngine(model, tok, config=BlockSpecDecEngineConfig(mode=mode, block_size=4, policy="fixed"))
        toks = [t for c in eng.generate(prompt, params=p) for t in c.token_ids]
        assert toks == ref, mode
    dec = BatchedSpecDecoder(model, tok, config=BlockSpecDecEngineConfig(mode="prompt_lookup", block_size=4,
                                                                        policy="fixed"), max_batch=2)
    dec.add_many([Admission("a", tuple(prompt), SamplingParams(**{**_fields(p), "specdec": "prompt_lookup"}))])
    assert dec.run()["a"] == ref
    store.close()


def _fields(p):
    import msgspec

    return msgspec.structs.asdict(p)


@pytest.fixture(scope="module")
def cli_seed_text(tiny_dir):
    """What ``mach generate --seed 7`` writes (one subprocess for both backends: the CLI has no event loop)."""
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mach_runtime.cli.main", "generate", str(tiny_dir), "--prompt",
                        "def fib(n):", "--max-tokens", "12", "--temp", "0.9", "--top-p", "0.95", "--seed", "7",
                        "--no-streaming", "--ignore-chat-template", "--verbose", "False"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_cli_seed_equals_runtime_seed(anyio_backend, tiny_dir, cli_seed_text):
    """``mach generate --seed`` and ``Runtime.stream(seed=)`` write the same text (one sampler, no global RNG)."""
    from mach_runtime import Runtime

    prompt = "def fib(n):"
    async with Runtime.open(tiny_dir, expert_residency="stacked") as rt:
        c = await rt.generate(prompt, max_tokens=12, temperature=0.9, top_p=0.95, seed=7)
        other = await rt.generate(prompt, max_tokens=12, temperature=0.9, top_p=0.95, seed=8)
    assert c.text and cli_seed_text.startswith(c.text)
    assert other.token_ids != c.token_ids  # the seed matters
