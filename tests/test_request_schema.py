"""Strict checking of every request and ``Runtime.open`` argument (actors/request_schema.py): exact types, finite
numbers, ranges, token ids inside the vocabulary, chat roles and content — each failure a ``RequestError`` /
``ConfigError`` naming the field, raised before anything is queued; a property-based search finds no other
exception."""

import math

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.request_schema import (
    MAX_SEED,
    REQUEST_FIELDS,
    ROLES,
    check_messages,
    check_open,
    check_request,
    prompt_kind,
)
from mach_runtime import Runtime
from mach_runtime.errors import CheckpointError, ConfigError, RequestError

VOCAB = 512  # the tiny checkpoints' tokenizer and embedding

BAD_REQUESTS = [  # (arguments, what the message must say) — every case the issue measured, and neighbours
    ({"temperature": "0.5"}, r"temperature must be a number, got str '0.5'; pass the number 0.5"),
    ({"temperature": math.inf}, "temperature must be a finite number"),
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"temperature": True}, "temperature must be a number, got bool"),
    ({"top_k": math.nan}, "top_k must be an integer, got float nan"),
    ({"top_k": 2.5}, "top_k must be an integer, got float 2.5"),
    ({"top_k": 2.0}, r"top_k must be an integer, got float 2.0; pass 2"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"top_p": 0}, "top_p must be > 0"),
    ({"top_p": 1.5}, "top_p must be <= 1"),
    ({"top_p": math.nan}, "top_p must be a finite number"),
    ({"seed": "abc"}, "seed must be an integer, got str 'abc'"),
    ({"seed": math.inf}, "seed must be an integer, got float inf"),
    ({"seed": 1.5}, "seed must be an integer, got float 1.5"),
    ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*63 - 1\]"),
    ({"seed": MAX_SEED}, r"seed must be an integer in \[0, 2\*\*63 - 1\]"),
    ({"max_tokens": True}, "max_tokens must be an integer, got bool True"),
    ({"max_tokens": 0}, "max_tokens must be a positive integer"),
    ({"max_tokens": 8.0}, r"max_tokens must be an integer, got float 8.0; pass 8"),
    ({"stop": 5}, "stop must be a string or a list of strings, got int 5"),
    ({"stop": [5]}, r"stop\[0\] must be a string, got int 5"),
    ({"stop": [b"ab"]}, r"stop\[0\] must be a string, got bytes b'ab'"),
    ({"stop": [("a",)]}, r"stop\[0\] must be a string, got tuple \('a',\)"),
    ({"stop": ["ok", None]}, r"stop\[1\] must be a string, got NoneType"),
    ({"stop_token_ids": 5}, r"stop_token_ids must be a list of token ids \(e.g. \[5\]\), got int 5"),
    ({"stop_token_ids": ["a"]}, r"stop_token_ids\[0\] must be an integer token id, got str 'a'"),
    ({"stop_token_ids": [True]}, r"stop_token_ids\[0\] must be an integer token id, got bool"),
    ({"stop_token_ids": [VOCAB]}, rf"stop_token_ids\[0\] = {VOCAB} is outside the vocabulary \(0..{VOCAB - 1}"),
    ({"stop_token_ids": [-1]}, r"stop_token_ids\[0\] = -1 is outside the vocabulary"),
    ({"request_id": 7}, "request_id must be a non-empty string, got int 7"),
    ({"request_id": ""}, "request_id must be a non-empty string"),
    ({"specdec": 3}, "specdec must be a mode name"),
    ({"specdec_policy": ["fixed"]}, "specdec_policy must be a policy name"),
    ({"temprature": 0.5}, r"unknown request argument\(s\) \['temprature'\]; known: max_tokens"),
]

BAD_PROMPTS = [
    ([1, 2, VOCAB], rf"prompt\[2\] = {VOCAB} is outside the vocabulary \(0..{VOCAB - 1}, {VOCAB} tokens\)"),
    ([1, -3], r"prompt\[1\] = -3 is outside the vocabulary"),
    ([1, 2.0], r"prompt\[1\] must be an integer token id, got float 2.0"),
    ([1, True], r"prompt\[1\] must be an integer token id, got bool True"),
    ([], "the prompt is empty"),
    (b"bytes", "prompt must be a string, a list of chat messages"),
    (None, "prompt must be a string"),
    (42, "prompt must be a string"),
    ([{"role": "bot", "content": "hi"}], r"messages\[0\].role must be one of system, user, assistant, tool, got str"),
    ([{"role": "user", "content": None}], r"messages\[0\].content must be a string or a list of text parts, got NoneType"),
    ([{"role": "user", "content": 5}], r"messages\[0\].content must be a string"),
    ([{"role": "user"}], r"messages\[0\] needs 'role' and 'content'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], r"content\[0\] must be a text part"),
    ([{"role": "user", "content": "a"}, 3], "prompt mixes chat messages and other items"),
    ([{"role": ["user"], "content": "a"}], r"messages\[0\].role must be one of"),
    ([{"role": "user", "content": "a", "tool_calls": [{}]}], r"messages\[0\].tool_calls must be a list of dicts on an "
                                                           "assistant message"),
]

BAD_OPEN = [
    ({"max_sessions": -1}, "max_sessions must be an integer >= 0, got -1"),
    ({"max_sessions": 2.0}, "max_sessions must be an integer, got float"),
    ({"restart_intensity": -1}, "restart_intensity must be an integer >= 0, got -1"),
    ({"restart_period": 0}, "restart_period must be > 0"),
    ({"restart_period": math.inf}, "restart_period must be a finite number"),
    ({"expert_cache_gb": math.inf}, "expert_cache_gb must be a finite number, got inf"),
    ({"expert_cache_gb": math.nan}, "expert_cache_gb must be a finite number"),
    ({"expert_cache_gb": 0}, "expert_cache_gb must be > 0"),
    ({"expert_cache_gb": "2"}, "expert_cache_gb must be a number, got str '2'; pass the number 2.0"),
    ({"max_batch": True}, "max_batch must be an integer, got bool"),
    ({"max_batch": 0}, "max_batch must be a positive integer"),
    ({"spec_batch": 1}, "spec_batch must be 0 .off. or an integer in 2..max_batch"),
    ({"spec_batch": 9, "max_batch": 8}, "spec_batch must be 0"),
    ({"fault_hook": 3}, "fault_hook must be callable"),
    ({"predictor": object()}, "predictor must have observe"),
    ({"warmup": "yes"}, "warmup must be True, False or None"),
    ({"expert_residency": 1}, "expert_residency must be 'stacked', 'streaming' or None"),
    ({"checkpoint": 5}, "checkpoint must be a path"),
    ({"draft": 5}, "draft must be a path"),
    ({"specdec": "native_v7"}, "specdec must be a BlockSpecDecEngineConfig"),
    ({"prefix_cache_dir": 5}, "prefix_cache_dir must be a path"),
]


@pytest.mark.parametrize("kw,match", BAD_REQUESTS, ids=[f"{i}-{sorted(k)[0]}" for i, (k, _) in enumerate(BAD_REQUESTS)])
def test_bad_request_arguments_name_the_field(kw, match):
    with pytest.raises(RequestError, match=match):
        check_request(kw, VOCAB)


@pytest.mark.parametrize("kw,match", BAD_OPEN, ids=[f"{i}-{sorted(k)[0]}" for i, (k, _) in enumerate(BAD_OPEN)])
def test_bad_open_arguments_name_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        check_open(**kw)


def test_valid_request_is_normalised():
    from mach_runtime.engine.params import SamplingParams

    r = check_request({"max_tokens": 5, "temperature": 1, "top_p": 0.5, "top_k": 3, "seed": MAX_SEED - 1,
                       "stop": ["a", ""], "stop_token_ids": (1, 2), "request_id": "r"}, VOCAB)
    # THE engine's sampling parameters (one type from the Runtime and the server down to the sampler), and the id
    assert r.request_id == "r" and type(r.params) is SamplingParams
    assert r.params == SamplingParams(max_tokens=5, temperature=1.0, top_p=0.5, top_k=3, seed=MAX_SEED - 1,
                                      stop=("a",), stop_token_ids=(1, 2))
    assert type(r.params.temperature) is float and check_request({"stop": "x"}).params.stop == ("x",)
    assert check_request({"stop": ""}).params.stop == ()
    assert check_request({"stop_token_ids": None}).params.stop_token_ids == ()
    # a request naming no mode (or "default") gets the runtime's; None means target-only
    assert check_request({}, specdec="native_v7").params.specdec == "native_v7"
    assert check_request({"specdec": "default"}, specdec="prompt_lookup").params.specdec == "prompt_lookup"
    assert check_request({"specdec": None}, specdec="native_v7").params.specdec is None
    fn = lambda tokens, logits: logits  # noqa: E731
    assert check_request({"logits_processors": [fn]}).params.processors == (fn,)


def test_messages_text_parts_joined_and_tool_turns():
    msgs = check_messages([
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ])
    assert msgs[0]["content"] == "a\nb" and msgs[2]["content"] is None and msgs[3]["tool_call_id"] == "c1"


# -- property-based: nothing but RequestError, whatever the arguments ----------------------------------------

_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(max_size=4) | st.binary(max_size=4))
anything = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.tuples(inner)
                        | st.dictionaries(st.text(max_size=4) | st.integers(), inner, max_size=3), max_leaves=6)
plausible = {  # values near the valid ones, so the search also exercises the range checks
    "max_tokens": st.integers(-2, 40) | st.floats(-1, 40),
    "temperature": st.floats(allow_nan=True, allow_infinity=True) | st.integers(-2, 3) | st.text(max_size=3),
    "top_p": st.floats(-1, 2) | st.integers(-1, 2),
    "top_k": st.integers(-3, 600) | st.floats(-1, 5),
    "seed": st.integers(-2, 2**64) | st.floats(allow_nan=True, allow_infinity=True),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3) | st.integers() | st.binary(max_size=2), max_size=3),
    "stop_token_ids": st.lists(st.integers(-2, VOCAB + 2) | st.booleans() | st.text(max_size=2), max_size=3),
    "request_id": st.text(max_size=4) | st.integers(),
    "specdec": st.sampled_from([None, "default", "target_only", "nope"]) | st.integers(),
    "specdec_policy": st.sampled_from([None, "fixed", "nope"]) | st.integers(),
}
request_kwargs = st.dictionaries(st.sampled_from(REQUEST_FIELDS + ("bogus",)), anything, max_size=5) | \
    st.fixed_dictionaries({}, optional={k: v for k, v in plausible.items()})
message = st.fixed_dictionaries(
    {"role": st.sampled_from(ROLES + ("bot",)) | anything,
     "content": st.text(max_size=6) | st.none() | anything
     | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]), "text": st.text(max_size=3)}),
                max_size=2)},
    optional={"tool_calls": anything, "name": anything})
prompts = (st.text(max_size=12) | st.lists(st.integers(-2, VOCAB + 2), max_size=6) | st.lists(message, max_size=3)
           | anything)


@settings(max_examples=400, deadline=None)
@given(kw=request_kwargs)
def test_property_request_arguments_raise_only_request_error(kw):
    try:
        p = check_request(kw, VOCAB).params
    except RequestError:
        return
    assert type(p.max_tokens) is int and p.max_tokens >= 1 and type(p.top_k) is int and p.top_k >= 0
    assert type(p.temperature) is float and math.isfinite(p.temperature) and p.temperature >= 0
    assert type(p.top_p) is float and 0 < p.top_p <= 1
    assert p.seed is None or (type(p.seed) is int and 0 <= p.seed < MAX_SEED)
    assert all(type(s) is str and s for s in p.stop)
    assert all(type(t) is int and 0 <= t < VOCAB for t in p.stop_token_ids)


@settings(max_examples=300, deadline=None)
@given(prompt=prompts)
def test_property_prompts_raise_only_request_error(prompt):
    try:
        if prompt_kind(prompt) == "messages":
            for m in check_messages(prompt):
                assert m["role"] in ROLES and (isinstance(m["content"], str) or m["content"] is None)
    except RequestError:
        pass


valid_kwargs = st.fixed_dictionaries({}, optional={
    "max_tokens": st.integers(1, 100), "temperature": st.floats(0, 5) | st.integers(0, 3),
    "top_p": st.floats(0, 1, exclude_min=True), "top_k": st.integers(0, 1000),
    "seed": st.none() | st.integers(0, MAX_SEED - 1), "stop": st.none() | st.text(max_size=4)
    | st.lists(st.text(max_size=4), max_size=3), "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=3)})


@settings(max_examples=200, deadline=None)
@given(kw=valid_kwargs)
def test_property_valid_arguments_pass(kw):
    p = check_request(kw, VOCAB).params
    for k, v in kw.items():
        if k in ("top_k", "max_tokens", "seed"):
            assert getattr(p, k) == v
        elif k in ("temperature", "top_p"):
            assert getattr(p, k) == float(v)


# -- through the Runtime: raised by rt.stream itself, before anything is queued --------------------------------



@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.mark.anyio
async def test_runtime_rejects_bad_requests_before_queueing(tiny_dir):
    async with Runtime.open(tiny_dir, max_batch=2) as rt:
        assert rt._limits.vocab_size == VOCAB
        for kw, match in BAD_REQUESTS:
            with pytest.raises(RequestError, match=match):
                rt.stream("def f():", **kw)
        for prompt, match in BAD_PROMPTS:
            with pytest.raises(RequestError, match=match):
                rt.stream(prompt, max_tokens=4)
        # a template's own check (as Llama-2 / Mistral templates do), raised through jinja's raise_exception
        hf = rt.tokenizer._tokenizer
        saved = hf.chat_template
        hf.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                            "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                            "{{ m['content'] }}{% endfor %}")
        try:
            with pytest.raises(RequestError, match="chat template rejected them.*roles must alternate"):
                rt.stream([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
        finally:
            hf.chat_template = saved
        for bad in (5, None, ["hi"]):
            with pytest.raises(RequestError, match="the user message must be a string"):
                rt.session().send(bad)
        with pytest.raises(RequestError, match="system must be a string or None"):
            rt.session(system=3)
        with pytest.raises(RequestError, match="request_id must be a string"):
            await rt.abort(["r"])
        st_ = await rt.stats()
        assert st_.live_requests == 0 and st_.decoder.queued == 0 and st_.decoder.active == 0
        assert not rt._sup.ledger  # nothing reached the Supervisor
        # the runtime serves as before, with every argument the schema accepts
        c = await rt.generate([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], max_tokens=3,
                              temperature=0.7, top_p=0.9, top_k=5, seed=2**63 - 1, stop=["zzzz"],
                              stop_token_ids=[VOCAB - 1])
        assert c.finish_reason in ("length", "stop") and 1 <= len(c.token_ids) <= 3
        ids = await rt.generate([1, 2, VOCAB - 1], max_tokens=2)
        assert len(ids.token_ids) >= 1


@pytest.mark.anyio
async def test_runtime_property_only_request_errors(tiny_dir):
    async with Runtime.open(tiny_dir, max_batch=2) as rt:

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(prompt=prompts, kw=request_kwargs)
        def check(prompt, kw):
            try:
                s = rt.stream(prompt, **kw)
            except RequestError:
                return
            s._close()  # never iterated: nothing was submitted
            assert s._slot is None

        with anyio.fail_after(300):
            check()
        assert not rt._sup.ledger


@pytest.mark.anyio
async def test_open_checks_every_argument_before_loading(tmp_path):
    missing = tmp_path / "no-such-checkpoint"  # a bad argument is reported first, before the path is looked at
    for kw, match in BAD_OPEN:
        kw = {"checkpoint": missing, **kw}
        with pytest.raises(ConfigError, match=match):
            async with Runtime.open(**kw):
                pass
    with pytest.raises(ConfigError, match=r"unknown Runtime.open argument\(s\) \['max_bach'\].*eviction_policy"):
        async with Runtime.open(missing, max_bach=4):
            pass
    with pytest.raises(CheckpointError):  # and a good one reaches the loader
        async with Runtime.open(missing):
            pass
