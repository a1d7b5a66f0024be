"""The sampler's extras: min-p, presence/frequency penalties, token masks (grammars through llguidance),
log-probabilities — unit-checked against numpy / llguidance's own numpy kernel, and end to end through the
Runtime against an independent mlx-lm decoding loop."""

import json

import anyio
import mlx.core as mx
import numpy as np
import pytest

from mach_runtime import Runtime
from mach_runtime.engine import sampling
from mach_runtime.engine.constraints import GrammarConstraint, json_schema_grammar, lark_grammar
from mach_runtime.errors import RequestError


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_min_p_keeps_tokens_within_factor_of_the_best():
    logits = mx.array(np.log(np.array([0.5, 0.3, 0.1, 0.06, 0.04], dtype=np.float32)))
    out = np.array(sampling._filtered_logits(logits, 1.0, 1.0, 0, min_p=0.15))
    # p >= 0.15 * 0.5 = 0.075 survive
    assert np.isfinite(out).tolist() == [True, True, True, False, False]
    # at temperature 2 the distribution flattens: the threshold applies after temperature (0.06 survives)
    out = np.array(sampling._filtered_logits(logits, 2.0, 1.0, 0, min_p=0.15))
    assert np.isfinite(out).tolist() == [True, True, True, True, True]


def test_penalize_matches_openai_formula():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50).astype(np.float32)
    gen = [3, 7, 3, 3, 49, 7]
    out = np.array(sampling.penalize(mx.array(logits), gen, 0.5, 0.25))
    ref = logits.copy()
    for t in set(gen):
        ref[t] -= 0.5 + 0.25 * gen.count(t)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def test_apply_bitmask_matches_llguidance_numpy_kernel():
    from llguidance.numpy import apply_token_bitmask_inplace

    rng = np.random.default_rng(1)
    V = 100  # not a multiple of 32: the last word is partial
    logits = rng.standard_normal((3, V)).astype(np.float32)
    mask = rng.integers(-(2**31), 2**31, size=(3, 4), dtype=np.int64).astype(np.int32)
    ref = logits.copy()
    apply_token_bitmask_inplace(ref, mask)
    got = np.array(sampling.apply_bitmask(mx.array(logits), mask))
    np.testing.assert_array_equal(got, ref)


def test_token_logprobs_match_numpy():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((2, 40)).astype(np.float32) * 3
    tokens = mx.array([5, 17])
    chosen, ids, vals = sampling.token_logprobs(mx.array(logits), tokens, 4)
    ref = log_softmax(logits)
    np.testing.assert_allclose(np.array(chosen), ref[[0, 1], [5, 17]], atol=1e-5)
    for r in range(2):
        order = np.argsort(-ref[r])[:4]
        assert np.array(ids)[r].tolist() == order.tolist()
        np.testing.assert_allclose(np.array(vals)[r], ref[r, order], atol=1e-5)


@pytest.mark.parametrize("bad", [{"min_p": 1.5}, {"presence_penalty": 3.0}, {"frequency_penalty": -2.5},
                                 {"top_logprobs": 21}])
def test_validate_rejects_out_of_range(bad):
    from mach_runtime.errors import ConfigError

    kw = {"min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "top_logprobs": 0} | bad
    with pytest.raises(ConfigError, match=next(iter(bad))):
        sampling.validate(1.0, 1.0, 0, **kw)


def test_grammar_constraint_follows_a_schema_and_replays(tiny_dir):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tok = load_tokenizer(tiny_dir)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    g = json_schema_grammar(schema)
    ids = tok.encode('{"n": 42}', add_special_tokens=False)
    c = GrammarConstraint(g, tok)
    row = np.zeros(c.words, dtype=np.int32)
    for t in ids:
        c.fill(row)
        assert (int(row[t // 32]) >> (t % 32)) & 1, t
        c.advance(t)
    c.fill(row)
    eos = next(iter(tok.eos_token_ids))
    assert (int(row[eos // 32]) >> (eos % 32)) & 1  # the object is complete: end of generation is allowed
    replay = GrammarConstraint(g, tok, ids)  # a restarted Decoder rebuilds the state from delivered tokens
    row2 = np.zeros(c.words, dtype=np.int32)
    replay.fill(row2)
    assert row2.tolist() == row.tolist()
    with pytest.raises(RequestError, match="schema"):
        json_schema_grammar(["not", "an", "object"])
    with pytest.raises(RequestError, match="grammar"):
        GrammarConstraint(lark_grammar("start: ( "), tok)


def reference_decode(model, ids, n, eos, presence=0.0, frequency=0.0, allowed=None):
    """Greedy decoding with mlx-lm's own model and KV cache, penalties applied in numpy: the independent loop."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)
    out, lps = [], []
    for _ in range(n):
        row = np.array(logits[0, -1].astype(mx.float32), dtype=np.float64)
        lps.append(log_softmax(row))
        adj = row.copy()
        for t in set(out):
            adj[t] -= presence + frequency * out.count(t)
        t = int(np.argmax(adj))
        out.append(t)
        if t in eos:
            break
        logits = model(mx.array([[t]]), cache=cache)
    return out, lps


@pytest.mark.anyio
async def test_runtime_penalties_and_logprobs_equal_reference(tiny_dir):
    from mlx_lm import load as mlx_lm_load

    ref_model, tok = mlx_lm_load(str(tiny_dir))
    prompt = "def add(a, b):"
    ids = tok.encode(prompt)
    want, lps = reference_decode(ref_model, ids, 16, set(tok.eos_token_ids), presence=0.4, frequency=0.7)
    plain, _ = reference_decode(ref_model, ids, 16, set(tok.eos_token_ids))
    assert want != plain  # the penalties change this greedy stream: the comparison below tests something
    async with Runtime.open(tiny_dir, max_batch=4) as rt:

        async def run(**kw):
            got, logprobs = [], []
            async for c in rt.stream(prompt, max_tokens=16, **kw):
                got.extend(c.token_ids)
                logprobs.extend(c.logprobs or ())
            return got, logprobs

        results = {}
        async with anyio.create_task_group() as tg:  # batched with a plain request: rows keep their own params
            async def one(key, kw):
                results[key] = await run(**kw)
            tg.start_soon(one, "pen", dict(presence_penalty=0.4, frequency_penalty=0.7, logprobs=True, top_logprobs=3))
            tg.start_soon(one, "plain", {})
    got, logprobs = results["pen"]
    assert got == want
    assert results["plain"][0] == plain and results["plain"][1] == []
    assert len(logprobs) == len(got)
    for t, (lp, top), ref in zip(got, logprobs, lps):
        assert abs(lp - ref[t]) < 1e-3
        assert abs(top[0][1] - ref.max()) < 1e-3 and [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert all(abs(v - ref[i]) < 1e-3 for i, v in top)


@pytest.mark.anyio
async def test_runtime_json_schema_output_validates(tiny_dir):
    import jsonschema

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
              "maximum": 999}}, "required": ["ok", "n"], "additionalProperties": False}
    g = json_schema_grammar(schema)
    async with Runtime.open(tiny_dir, max_batch=4) as rt:
        for temperature, seed in ((0.0, None), (1.0, 3), (1.0, 4)):
            c = await rt.generate("x = ", max_tokens=40, temperature=temperature, seed=seed, grammar=g)
            assert c.finish_reason == "stop", c
            jsonschema.validate(json.loads(c.text), schema)
        with pytest.raises(RequestError, match="grammar"):
            rt.stream("x", grammar="%%% not a grammar")
        with pytest.raises(RequestError, match="min_p"):
            rt.stream("x", min_p=2.0)


@pytest.mark.anyio
async def test_speculative_runtime_routes_constrained_requests_to_the_target(anyio_backend):
    """With a DFlash draft, a grammar / logprobs / penalties request decodes in the target-only batch: its output
    equals the constrained target's (a runtime without a draft), token for token."""
    pytest.importorskip("dflash_mlx")
    from mach_runtime.assets import demo_model_path

    demo = demo_model_path()
    schema = {"type": "object", "properties": {"k": {"type": "string", "maxLength": 8}}, "required": ["k"]}
    kw = dict(max_tokens=30, grammar=json_schema_grammar(schema), logprobs=True, frequency_penalty=0.5)
    msgs = [{"role": "user", "content": "a JSON object"}]
    outs = []
    for draft in (None, demo.parent / "demo-qwen3-moe-dflash"):
        async with Runtime.open(demo, draft=draft, expert_residency="stacked") as rt:
            c = await rt.generate(msgs, **kw)
            outs.append(c.token_ids)
            s = await rt.stats()
            assert s.decoder.spec_requests == 0
    assert outs[0] == outs[1]
