"""BatchEngine directly: joins and leaves mid-batch, pipelined or not, equal to sequential generation."""

import mlx.core as mx
import pytest

from actors.messages import SamplingParams
from mach_runtime import load_moe
from mach_runtime.engine.batch import BatchEngine
from tests.helpers import greedy

PROMPTS = ["def f(x):", "import os", "class A:\n    pass\n", "for i in range(10):", "x = {", "return None"]


def run(engine, tok, schedule, params):
    """schedule: {step number: [prompt index, ...]} requests join before that step."""
    out = {i: [] for ps in schedule.values() for i in ps}
    step = 0
    while step in schedule or any(k > step for k in schedule) or engine.active:
        for i in schedule.get(step, []):
            engine.add(f"r{i}", tok.encode(PROMPTS[i]), params[i])
        for o in engine.step():
            out[int(o.request_id[1:])].append(o.token)
            if o.finish_reason:
                engine.remove(o.request_id)
        step += 1
    return out


@pytest.mark.parametrize("pipeline", [True, False])
@pytest.mark.parametrize("residency", ["stacked", "streaming"])
def test_joins_and_leaves_equal_sequential(tiny_dir, pipeline, residency):
    from mlx_lm import load as mlx_lm_load

    ref_model, _ = mlx_lm_load(str(tiny_dir))
    kw = {"expert_cache_gb": 5.5 * 2 * 24576 / 2**30} if residency == "streaming" else {}
    model, tok, store, cache = load_moe(tiny_dir, expert_residency=residency, **kw)
    lengths = [9, 4, 12, 7, 3, 10]
    params = [SamplingParams(max_tokens=n, stop_token_ids=()) for n in lengths]
    eng = BatchEngine(model, tok, max_batch=6, pipeline=pipeline)
    eng.eos = frozenset()  # compare raw greedy streams: no early stop
    got = run(eng, tok, {0: [0, 1], 2: [2], 3: [3, 4], 7: [5]}, params)
    for i, n in enumerate(lengths):
        assert got[i] == greedy(ref_model, tok.encode(PROMPTS[i]), n), i
    assert eng.active == 0 and eng.cache is None
    store.close()


def test_pipelined_sampling_equals_unpipelined(tiny_dir):
    model, tok, store, cache = load_moe(tiny_dir)
    params = [SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7 + i) for i in range(4)]
    outs = []
    for pipeline in (True, False):
        eng = BatchEngine(model, tok, max_batch=4, pipeline=pipeline)
        eng.eos = frozenset()
        outs.append(run(eng, tok, {0: [0, 1], 1: [2], 4: [3]}, params))
    assert outs[0] == outs[1]


def test_abort_mid_flight_keeps_others(tiny_dir):
    from mlx_lm import load as mlx_lm_load

    ref_model, _ = mlx_lm_load(str(tiny_dir))
    model, tok, store, cache = load_moe(tiny_dir)
    eng = BatchEngine(model, tok, max_batch=3)
    eng.eos = frozenset()
    for i in range(3):
        eng.add(f"r{i}", tok.encode(PROMPTS[i]), SamplingParams(max_tokens=8))
    got = {i: [] for i in range(3)}
    for step in range(8):
        if step == 3:
            eng.remove("r1")
        for o in eng.step():
            got[int(o.request_id[1:])].append(o.token)
    assert got[0] == greedy(ref_model, tok.encode(PROMPTS[0]), 8)
    assert got[2] == greedy(ref_model, tok.encode(PROMPTS[2]), 8)
    assert len(got[1]) == 3


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_5_moe", "gemma4", "gpt_oss"])
def test_batched_admission_equals_sequential(tiny_dir, family):
    """Several requests prefilled together (right-padded: lengths 1..many, a replay with resume tokens, one with
    a reused prefix KV) join a running batch; each stream equals plain greedy decoding of its own tokens."""
    from mlx_lm.models.cache import make_prompt_cache

    from mach_runtime.engine.batch import Admission
    from tests.family_helpers import FAMILIES

    model, tok, store, _ = load_moe(tiny_dir if family == "qwen3_moe" else FAMILIES[family],
                                    expert_residency="stacked")
    enc = [tok.encode(p) for p in PROMPTS] + [[7], tok.encode("x" * 40)]
    n = 6
    eng = BatchEngine(model, tok, max_batch=8)
    eng.eos = frozenset()
    ref = {i: greedy(model, ids, n) for i, ids in enumerate(enc)}
    # a reused prefix: the KV of enc[2]'s first 5 tokens, built separately
    kv = make_prompt_cache(model)
    model(mx.array([enc[2][:5]]), cache=kv)
    got = {i: [] for i in range(len(enc))}

    def collect():
        for o in eng.step():
            got[int(o.request_id[1:])].append(o.token)
            if o.finish_reason:
                eng.remove(o.request_id)

    eng.add("r0", enc[0], SamplingParams(max_tokens=n))
    collect()
    seqs = eng.add_many([
        Admission("r1", tuple(enc[1]), SamplingParams(max_tokens=n)),
        Admission("r2", tuple(enc[2]), SamplingParams(max_tokens=n), kv=kv, cached_tokens=5),
        Admission("r6", tuple(enc[6]), SamplingParams(max_tokens=n)),  # a 1-token prompt: nothing to prefill
        Admission("r7", tuple(enc[7]), SamplingParams(max_tokens=n)),
        Admission("r3", tuple(enc[3]), SamplingParams(max_tokens=n), resume_ids=tuple(ref[3][:2])),
    ])
    got[3] = list(ref[3][:2])  # delivered before the "restart"
    assert [s.cached_tokens for s in seqs] == [0, 5, 0, 0, 0]
    assert [s.prefilled_tokens for s in seqs] == [len(enc[1]) - 1, len(enc[2]) - 6, 0, len(enc[7]) - 1,
                                                  len(enc[3]) + 1]
    while eng.active:
        collect()
    for i in (0, 1, 2, 3, 6, 7):
        assert got[i] == ref[i], (family, i)
    store.close() if store is not None else None


def test_add_many_checks_every_request_first(tiny_dir):
    from mach_runtime.engine.batch import Admission
    from mach_runtime.errors import ConfigError

    model, tok, _, _ = load_moe(tiny_dir)
    eng = BatchEngine(model, tok, max_batch=4)
    with pytest.raises(ConfigError, match="top_p"):
        eng.add_many([Admission("a", (1, 2, 3), SamplingParams()), Admission("b", (4, 5), SamplingParams(top_p=0))])
    assert eng.active == 0 and eng.cache is None  # nothing was admitted
    with pytest.raises(RuntimeError, match="full"):
        eng.add_many([Admission(f"r{i}", (1, 2), SamplingParams()) for i in range(5)])


def test_whole_prompt_cached_is_cut_to_all_but_the_last_token(tiny_dir):
    """A reused KV covering the entire prompt (a repeated turn): the last token is fed once, by the first step."""
    from mlx_lm.models.cache import make_prompt_cache

    from mach_runtime.engine.batch import Admission

    model, tok, _, _ = load_moe(tiny_dir)
    ids = tok.encode(PROMPTS[2])
    kv = make_prompt_cache(model)
    model(mx.array([ids]), cache=kv)
    eng = BatchEngine(model, tok, max_batch=2)
    eng.eos = frozenset()
    (seq,) = eng.add_many([Admission("r0", tuple(ids), SamplingParams(max_tokens=6), kv=kv, cached_tokens=len(ids))])
    assert seq.cached_tokens == len(ids) - 1 and seq.prefilled_tokens == 0
    got = []
    while eng.active:
        for o in eng.step():
            got.append(o.token)
            if o.finish_reason:
                eng.remove(o.request_id)
    assert got == greedy(model, ids, 6)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_5_moe", "gpt_oss"])
def test_layer_by_layer_submission_changes_nothing_but_when_work_is_queued(tiny_dir, family, monkeypatch):
    """Decode forwards handed to the stream layer by layer (``SubmittingCaches``, ``MACH_SUBMIT_LAYERS=1``) compute
    what the whole-graph submission computes, bit for bit (tokens and their log-probabilities), and do submit per
    layer."""
    from tests.family_helpers import FAMILIES

    model, tok, store, _ = load_moe(tiny_dir if family == "qwen3_moe" else FAMILIES[family],
                                    expert_residency="stacked")
    calls = []
    real = mx.async_eval
    monkeypatch.setattr(mx, "async_eval", lambda *a: (calls.append(len(a)), real(*a))[1])
    params = [SamplingParams(max_tokens=7, logprobs=True, top_logprobs=3),
              SamplingParams(max_tokens=5, temperature=1.0, seed=3, logprobs=True, top_logprobs=2),
              SamplingParams(max_tokens=6)]
    outs, launches = {}, {}
    for submit in (False, True):
        eng = BatchEngine(model, tok, max_batch=3, submit_layers=submit)
        eng.eos = frozenset()
        calls.clear()
        got = {i: [] for i in range(3)}
        for i, p in enumerate(params):
            eng.add(f"r{i}", tok.encode(PROMPTS[i]), p)
        while eng.active:
            for o in eng.step():
                got[int(o.request_id[1:])].append((o.token, o.logprobs))
                if o.finish_reason:
                    eng.remove(o.request_id)
        outs[submit], launches[submit] = got, (eng.steps, len(calls))
    assert outs[True] == outs[False]
    assert all(len(outs[True][i]) == p.max_tokens for i, p in enumerate(params))
    n_layers = len(model.layers)
    steps, n_calls = launches[False]
    assert n_calls <= steps + 1  # one submission per launch (the pipelined launch that ran past the end included)
    steps, n_calls = launches[True]
    assert n_calls >= steps * n_layers  # and layer by layer: n_layers - 1 during the forward, 1 at the end
    store.close() if store is not None else None


def test_submission_setting_argument_then_environment_then_off(tiny_dir, monkeypatch):
    from mach_runtime.errors import ConfigError

    model, tok, store, _ = load_moe(tiny_dir)
    monkeypatch.delenv("MACH_SUBMIT_LAYERS", raising=False)
    assert BatchEngine(model, tok).submit_layers is False
    monkeypatch.setenv("MACH_SUBMIT_LAYERS", "1")
    assert BatchEngine(model, tok).submit_layers is True
    assert BatchEngine(model, tok, submit_layers=False).submit_layers is False
    monkeypatch.setenv("MACH_SUBMIT_LAYERS", "sometimes")
    with pytest.raises(ConfigError, match="MACH_SUBMIT_LAYERS"):
        BatchEngine(model, tok)
    store.close()
