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
