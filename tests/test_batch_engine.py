"""BatchEngine directly: joins and leaves mid-batch, pipelined or not, equal to sequential generation."""

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
