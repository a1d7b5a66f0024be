"""The scheduler on its own (plain engine types, no actors): chunked prefill interleaves with decode steps, and
every request's tokens equal plain greedy decoding alone (mlx-lm's cache loop, ``tests.helpers.greedy``)."""

from __future__ import annotations

import pytest

from mach_runtime import load_moe
from mach_runtime.engine.sampling import SamplingParams
from mach_runtime.engine.scheduler import Request, Scheduler
from mach_runtime.io.arch_registry import REGISTRY
from tests.helpers import greedy


@pytest.fixture(scope="module")
def model(tiny_dir):
    m, tok, store, _ = load_moe(tiny_dir, expert_residency="stacked")
    yield m, tok
    store.close()


def _run(sched, until, tokens):
    order = []
    for _ in range(10_000):
        for e in sched.step():
            if e.token_ids:
                tokens.setdefault(e.request_id, []).extend(e.token_ids)
                order.append(e.request_id)
        if until(tokens):
            return tokens, order
    raise AssertionError("did not finish")


@pytest.mark.parametrize("chunk", [8, 512])
def test_long_prompt_prefills_in_chunks_between_decode_steps(model, chunk):
    m, tok = model
    caps = REGISTRY["qwen3_moe"].capabilities()
    sched = Scheduler(m, tok, max_batch=4, caps=caps, prefill_chunk=chunk)
    p = SamplingParams(max_tokens=60, ignore_eos=True)
    short = [tok.encode("def add(a, b):"), tok.encode("import os")]
    long = tok.encode("while True:\n    line = input()\n" * 6)[:81]
    for i, ids in enumerate(short):
        sched.submit(Request(f"s{i}", tuple(ids), p))
    tokens = {}
    _run(sched, lambda t: all(len(t.get(f"s{i}", [])) >= 3 for i in range(2)), tokens)
    sched.submit(Request("long", tuple(long), SamplingParams(max_tokens=5, ignore_eos=True)))
    tokens, order = _run(sched, lambda t: "long" in t, tokens)
    steps_before = order.index("long")  # decode steps of the running rows while the newcomer prefilled
    assert sched.counters["prefill_chunks"] >= (80 + chunk - 1) // chunk
    if chunk == 8:  # 80 prompt tokens to prefill: one chunk per step, the running rows step meanwhile
        assert steps_before >= 2 * 9  # both running rows, at least once per chunk
    tokens, _ = _run(sched, lambda t: sched.idle, tokens)
    for i, ids in enumerate(short):
        assert tokens[f"s{i}"] == greedy(m, ids, 60)
    assert tokens["long"] == greedy(m, long, 5)


def test_a_request_that_raises_fails_alone(model):
    m, tok = model
    caps = REGISTRY["qwen3_moe"].capabilities()
    sched = Scheduler(m, tok, max_batch=4, caps=caps)

    def bad(tokens, logits):
        raise ValueError("bad processor")

    ok = SamplingParams(max_tokens=6, ignore_eos=True)
    sched.submit(Request("a", tuple(tok.encode("x = [")), ok))
    sched.submit(Request("bad", tuple(tok.encode("lambda")), SamplingParams(max_tokens=6, processors=(bad,))))
    sched.submit(Request("b", tuple(tok.encode("print(")), ok))
    events = []
    for _ in range(200):
        events += sched.step()
        if sched.idle:
            break
    errors = [e for e in events if e.error]
    assert [e.request_id for e in errors] == ["bad"] and "ValueError: bad processor" in errors[0].error
    got = {r: [t for e in events if e.request_id == r for t in e.token_ids] for r in "ab"}
    assert got["a"] == greedy(m, tok.encode("x = ["), 6) and got["b"] == greedy(m, tok.encode("print("), 6)
    assert sched.counters["isolated_retries"] == 3 and sched.counters["failed"] == 1


@pytest.fixture(scope="module")
def spec_lanes(tiny_dir):
    """A model of its own with both speculative lanes over it (a random DFlash draft: lossless at any acceptance)."""
    from mach_runtime.engine.specdec import BlockSpecDecEngine, BlockSpecDecEngineConfig
    from mach_runtime.engine.specdec.batched import BatchedSpecDecoder
    from tests.test_specdec import random_draft

    m, tok, store, _ = load_moe(tiny_dir, expert_residency="stacked")
    draft = random_draft(2, [0, 1])
    cfg = BlockSpecDecEngineConfig(mode="native_v7", block_size=4, policy="fixed")
    spec = BlockSpecDecEngine(m, tok, draft, config=cfg)
    batched = BatchedSpecDecoder(m, tok, draft, config=cfg, max_batch=4, target=spec.target)
    yield m, tok, spec, batched
    store.close()


def _trace(sched, until, tokens, trace):
    """Steps until ``until(tokens)``; ``trace`` gets, per step, ("chunk", request ids prefilling) for a prefill
    chunk run and ("tokens", request id) for each token event, in order."""
    def prefilling():
        return tuple(r.request_id for r in sched.prefill[2]) if sched.prefill is not None else None

    for _ in range(10_000):
        before, group = sched.counters["prefill_chunks"], prefilling()
        events = sched.step()
        if sched.counters["prefill_chunks"] > before:  # the group admitted in this step, or the one before it
            trace.append(("chunk", group or prefilling()))
        for e in events:
            if e.token_ids:
                tokens.setdefault(e.request_id, []).extend(e.token_ids)
                trace.append(("tokens", e.request_id))
        if until(tokens):
            return
    raise AssertionError("did not finish")


def test_every_lane_prefills_in_chunks_between_decode_steps(model, spec_lanes):
    """The solo speculative lane prefills a lone long prompt chunk by chunk like the batches do (one mechanism,
    ``batch.Prefill``); a request streaming in the solo lane keeps producing tokens between the chunks of a long
    newcomer that takes both into the spec batch; everything equals plain greedy decoding."""
    m, tok, spec, batched = spec_lanes
    caps = REGISTRY["qwen3_moe"].capabilities()
    sched = Scheduler(m, tok, max_batch=4, caps=caps, spec=spec, spec_batch=batched, prefill_chunk=8)
    sp = lambda n: SamplingParams(max_tokens=n, ignore_eos=True, specdec="native_v7")
    long = tuple(tok.encode("while True:\n    line = input()\n" * 6)[:81])
    other = tuple(tok.encode("def add(a, b):"))
    tokens, trace = {}, []
    # 1. a lone long prompt in the solo lane: 11 chunks (all 81 tokens: the last one's logits draw the first token),
    # one per step, then decoding
    sched.submit(Request("solo", long, sp(6)))
    _trace(sched, lambda t: len(t.get("solo", [])) >= 1, tokens, trace)
    assert trace[:11] == [("chunk", ("solo",))] * 11 and trace[11] == ("tokens", "solo")
    assert sched.solo is not None and sched.counters["spec_requests"] == 1
    _trace(sched, lambda t: sched.idle, tokens, trace)
    # 2. a short request streams alone (solo); a long newcomer takes both into the spec batch and prefills there
    sched.submit(Request("a", other, sp(40)))
    _trace(sched, lambda t: len(t.get("a", [])) >= 3, tokens, trace)
    assert sched.solo is not None
    trace.clear()
    sched.submit(Request("long", long, sp(5)))
    _trace(sched, lambda t: "long" in t, tokens, trace)
    chunks = [i for i, ev in enumerate(trace) if ev == ("chunk", ("long",))]
    # (the spec batch feeds 80: its first verify block starts with the last prompt token)
    assert len(chunks) == 10 and sched.counters["spec_demoted"] == 1  # "a" left the solo lane with its KV
    assert {r.request_id for r in batched.rows} == {"a", "long"}
    for i, j in zip(chunks, chunks[1:]):  # "a" streamed between every two chunks of the newcomer
        assert ("tokens", "a") in trace[i + 1 : j], trace
    _trace(sched, lambda t: sched.idle, tokens, trace)
    assert tokens["solo"] == greedy(m, list(long), 6)
    assert tokens["long"] == greedy(m, list(long), 5)
    assert tokens["a"] == greedy(m, list(other), 40)


def test_simultaneous_arrivals_on_an_idle_scheduler_prefill_as_one_group(model):
    """A wave of 8 requests whose first one reaches an idle scheduler alone: it is held open one iteration
    (``holding``) and the other 7, arriving meanwhile, join its group: one group, one chunk, 8 rows decoding
    together from the first step; tokens equal plain greedy decoding."""
    m, tok = model
    sched = Scheduler(m, tok, max_batch=8, caps=REGISTRY["qwen3_moe"].capabilities())
    p = SamplingParams(max_tokens=3, ignore_eos=True)
    prompts = [tuple(tok.encode(t)) for t in ("def add(a, b):", "import os", "class Node:", "x = [", "while True:",
                                               "for i in range(3):", "# parse\n", "print(")]
    sched.submit(Request("r0", prompts[0], p))
    assert sched.step() == [] and sched.holding and sched.prefill is None and sched.counters["prefill_groups"] == 0
    for i, ids in enumerate(prompts[1:], 1):
        sched.submit(Request(f"r{i}", ids, p))
    events = sched.step()
    assert not sched.holding and sched.counters["prefill_groups"] == 1 and sched.counters["prefill_chunks"] == 1
    assert sorted(e.request_id for e in events if e.token_ids) == sorted(f"r{i}" for i in range(8))
    tokens, _ = _run(sched, lambda t: sched.idle, {e.request_id: list(e.token_ids) for e in events})
    # 3 tokens each: the first drawn by the group's prefill (its last chunk feeds every prompt's last token), then 2
    # decode steps of 8 rows
    assert sched.histogram == {8: 2} and sched.counters["prefill_groups"] == 1
    for i, ids in enumerate(prompts):
        assert tokens[f"r{i}"] == greedy(m, list(ids), 3)
    sched.submit(Request("late", prompts[1], p))  # a lone request on an idle scheduler: held once, then alone
    assert sched.step() == [] and sched.holding
    tokens, _ = _run(sched, lambda t: sched.idle, {})
    assert tokens["late"] == greedy(m, list(prompts[1]), 3) and sched.counters["prefill_groups"] == 2


def test_a_batch_that_outgrew_the_spec_lane_keeps_its_requests_until_it_drains(model, spec_lanes):
    """Lane policy: 5 speculative requests outgrow the spec batch (4 rows) and run target-only; when the shortest
    finishes, the other 4 stay in the target-only batch (no move back: no flapping around the threshold); once it
    has drained, newcomers decode speculatively again. Everything equals plain greedy decoding."""
    m, tok, spec, batched = spec_lanes
    sched = Scheduler(m, tok, max_batch=8, caps=REGISTRY["qwen3_moe"].capabilities(), spec=spec, spec_batch=batched)
    sp = lambda n: SamplingParams(max_tokens=n, ignore_eos=True, specdec="native_v7")
    prompts = [tuple(tok.encode(t)) for t in ("def add(a, b):", "import os", "class Node:", "x = [", "while True:")]
    for i, ids in enumerate(prompts):
        sched.submit(Request(f"r{i}", ids, sp(2 if i == 0 else 6)))
    tokens, _ = _run(sched, lambda t: sched.idle, {})
    assert sched.counters["spec_batch_cycles"] == 0 and sched.counters["spec_batch_moves"] == 0
    assert 5 in sched.histogram and 4 in sched.histogram  # the four stayed after the first finished
    for i, ids in enumerate(prompts):
        assert tokens[f"r{i}"] == greedy(m, list(ids), 2 if i == 0 else 6)
    for i in (1, 2):
        sched.submit(Request(f"again{i}", prompts[i], sp(6)))
    tokens, _ = _run(sched, lambda t: sched.idle, {})
    assert sched.counters["spec_batch_cycles"] > 0  # drained: the spec lane is back
    for i in (1, 2):
        assert tokens[f"again{i}"] == greedy(m, list(prompts[i]), 6)
