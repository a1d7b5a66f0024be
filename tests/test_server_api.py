"""mach-serve over the official openai and anthropic clients: a live server (the real CLI, subprocess) on a
loopback port, serving the demo model with a Qwen-style tool template."""

import json

import httpx
import jsonschema
import mlx.core as mx
import pytest

from tests.server_helpers import MODEL, serve_subprocess, tool_checkpoint, wait_ready

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

PROMPT = [{"role": "user", "content": "def add(a, b):"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                          "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    ckpt = tool_checkpoint(d / "ckpt")
    with serve_subprocess(str(ckpt), "--no-streaming", "--served-model-name", MODEL, "--max-batch", "4",
                          log_path=d / "server.log") as (base, proc):
        wait_ready(base, proc)
        yield base, ckpt, d / "server.log"


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok(server):
    from mlx_lm.tokenizer_utils import load

    return load(server[1])


def test_chat_stream_equals_non_stream_with_usage(oai):
    full = oai.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=24, temperature=0)
    assert full.object == "chat.completion" and full.choices[0].finish_reason in ("length", "stop")
    u = full.usage
    assert u.completion_tokens <= 24 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert 0 <= u.prompt_tokens_details.cached_tokens < u.prompt_tokens
    chunks = list(oai.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=24, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == u.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_framing_ends_with_done(server):
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_stop_string_is_never_echoed(oai):
    base = oai.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=30, temperature=0)
    text = base.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), text
    for stream in (False, True):
        r = oai.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=30, temperature=0, stop=[stop],
                                        stream=stream)
        got = "".join(c.choices[0].delta.content or "" for c in r if c.choices) if stream else r.choices[0].message.content
        assert got == text[: text.index(stop)] and stop not in got


def test_max_completion_tokens_seed_and_sampling_extras(oai):
    kw = dict(model=MODEL, messages=PROMPT, temperature=0.9, top_p=0.95, seed=1234,
              extra_body={"top_k": 40, "min_p": 0.05}, presence_penalty=0.3, frequency_penalty=0.3)
    a = oai.chat.completions.create(max_completion_tokens=12, **kw)
    b = oai.chat.completions.create(max_completion_tokens=12, **kw)
    assert a.usage.completion_tokens <= 12
    assert a.choices[0].message.content == b.choices[0].message.content  # the seed makes sampling replayable


def test_logprobs(oai):
    r = oai.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=6, temperature=0, logprobs=True,
                                    top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        assert abs(item.top_logprobs[0].logprob - item.logprob) < 1e-4  # greedy took the most likely token
    assert "".join(i.token for i in content) == r.choices[0].message.content


def test_completions_endpoint(oai):
    r = oai.completions.create(model=MODEL, prompt="import os\n", max_tokens=8, temperature=0, logprobs=2)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 8
    assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens
    s = list(oai.completions.create(model=MODEL, prompt="import os\n", max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in s) == r.choices[0].text


def test_models_and_errors(oai, server):
    assert [m.id for m in oai.models.list().data] == [MODEL]
    cases = [
        (dict(model="nope", messages=PROMPT), "model"),
        (dict(model=MODEL, messages=PROMPT, n=2), "n"),
        (dict(model=MODEL, messages=PROMPT, temperature=5), "temperature"),
        (dict(model=MODEL, messages=PROMPT, max_tokens=10**6), "max_tokens"),
        (dict(model=MODEL, messages=[{"role": "user", "content": "x " * 3000}]), "messages"),
        (dict(model=MODEL, messages=PROMPT, stop=["a", "b", "c", "d", "e"]), "stop"),
        (dict(model=MODEL, messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(**kw)
        assert e.value.status_code == 400
        assert e.value.body["param"] == param, (kw, e.value.body)
    r = httpx.post(server[0] + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(server[0] + "/v1/models", headers={"X-Request-Id": "abc-123"}, timeout=30)
    assert r.headers["x-request-id"] == "abc-123"


def test_json_schema_output_validates(oai):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
              "age": {"type": "integer", "minimum": 0, "maximum": 150}}, "required": ["name", "age"],
              "additionalProperties": False}
    for temperature in (0, 1):
        r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a person as JSON"}],
                                        max_tokens=80, temperature=temperature, seed=5, response_format={
                                            "type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = oai.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=80, temperature=0,
                                    response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_tool_call_round_trip(oai, tok):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = oai.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], tool_choice=choice, max_tokens=60,
                                    temperature=0)
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and "<tool_call>" not in (r.choices[0].message.content or "")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    # streamed: the same call as delta.tool_calls, never the raw tags
    chunks = list(oai.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], tool_choice=choice,
                                              max_tokens=60, temperature=0, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas if d.function.name] == ["get_weather"]
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == args
    assert "<tool_call>" not in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # the result goes back through the chat template
    follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r2 = oai.chat.completions.create(model=MODEL, messages=follow, tools=[WEATHER], max_tokens=8, temperature=0)
    expected = tok.apply_chat_template(
        msgs + [{"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": args}}]},
            {"role": "tool", "content": "sunny, 21 C"}], tools=[WEATHER], add_generation_prompt=True)
    assert r2.usage.prompt_tokens == len(expected)


def test_anthropic_messages(server):
    client = anthropic.Anthropic(base_url=server[0], api_key="unused", max_retries=0, timeout=120)
    r = client.messages.create(model=MODEL, max_tokens=20, system="You write Python.", messages=PROMPT,
                               extra_body={"temperature": 0})
    assert r.type == "message" and r.stop_reason in ("max_tokens", "end_turn") and r.content[0].type == "text"
    with client.messages.stream(model=MODEL, max_tokens=20, system="You write Python.", messages=PROMPT,
                                extra_body={"temperature": 0}) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert final.content[0].text == r.content[0].text
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "message_delta" in kinds
    body = {"model": MODEL, "max_tokens": 6, "messages": PROMPT, "stream": True, "temperature": 0}
    with httpx.stream("POST", server[0] + "/v1/messages", json=body, timeout=60) as resp:
        names = [line[7:] for line in resp.iter_lines() if line.startswith("event: ")]
    n = names.count("content_block_delta")
    assert n >= 1 and names == ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * n + [
        "content_block_stop", "message_delta", "message_stop"]
    tool = {"name": "get_weather", "description": "weather", "input_schema": WEATHER["function"]["parameters"]}
    t = client.messages.create(model=MODEL, max_tokens=60, messages=[{"role": "user", "content": "Paris?"}],
                               tools=[tool], tool_choice={"type": "tool", "name": "get_weather"}, extra_body={"temperature": 0})
    assert t.stop_reason == "tool_use"
    use = next(b for b in t.content if b.type == "tool_use")
    jsonschema.validate(use.input, tool["input_schema"])
    with client.messages.stream(model=MODEL, max_tokens=60, messages=[{"role": "user", "content": "Paris?"}],
                                tools=[tool], tool_choice={"type": "tool", "name": "get_weather"}, extra_body={"temperature": 0}) as s:
        final = s.get_final_message()
    assert [b.input for b in final.content if b.type == "tool_use"] == [use.input]
    back = client.messages.create(model=MODEL, max_tokens=8, tools=[tool], messages=[
        {"role": "user", "content": "Paris?"}, {"role": "assistant", "content": [b.model_dump() for b in t.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}])
    assert back.usage.input_tokens > t.usage.input_tokens
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="nope", max_tokens=5, messages=PROMPT)
    assert e.value.body["type"] == "error" and "model" in e.value.body["error"]["message"]


def test_operations_endpoints(server, oai):
    base = server[0]
    oai.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=2, temperature=0)
    caps = httpx.get(base + "/v1/capabilities", timeout=30).json()
    assert any(a["arch"] == "qwen3_moe" for a in caps["architectures"]) and caps["server"]["model"] == MODEL
    stats = httpx.get(base + "/v1/stats", timeout=30).json()
    assert stats["decoder"]["completed"] >= 1 and stats["decode_path"] == "batched-target"
    cache = httpx.get(base + "/v1/cache/stats", timeout=30).json()
    assert cache["streaming_summary"]["residency"] == "stacked"
    system = {"role": "system", "content": "You are a careful Python programmer. " * 60}
    warm = httpx.post(base + "/v1/cache/warm_prefix", json={"messages": [system]}, timeout=120)
    assert warm.status_code == 200, warm.text
    assert warm.json()["usage"]["prompt_tokens"] > 300  # more than one prefix-cache block (256 tokens)
    r = oai.chat.completions.create(model=MODEL, messages=[system, PROMPT[0]], max_tokens=4, temperature=0)
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert 256 <= cached < r.usage.prompt_tokens  # the warmed prefix was reused, not prefilled again
    assert httpx.get(base + "/v1/cache/stats", timeout=30).json()["prefix_cache"]["l1"]["hits"] >= 1
    bad = httpx.post(base + "/v1/cache/warm_prefix", json={}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    metrics = httpx.get(base + "/metrics", timeout=30).text
    for name in ("mach_time_to_first_token_seconds_bucket", "mach_inter_token_latency_seconds_bucket",
                 "mach_generation_tokens_total", "mach_queue_depth", "mach_expert_bank_hit_rate",
                 "mach_prefix_cache_hit_tokens_total", "mach_expert_bytes_read"):
        assert name in metrics, name
    log = server[2].read_text()
    for key in ("startup mode", "expert_residency=stacked", "startup bank", "decode_path=batched-target",
                "lane_policy=target_only",
                "prefix_cache=l1", "startup capabilities", "kv_cache_kind=standard",
                # the demo is float16; MLX's CPU kernels need float32 experts, so the CPU computes it in float32
                "dtype=" + ("float32" if mx.default_device() == mx.cpu else "float16")):
        assert key in log, key


def test_anthropic_stop_sequence_names_the_one_that_matched(server):
    client = anthropic.Anthropic(base_url=server[0], api_key="unused", max_retries=0, timeout=120)
    kw = dict(model=MODEL, max_tokens=40, messages=PROMPT, extra_body={"temperature": 0})
    text = client.messages.create(**kw).content[0].text
    pieces = [text[i:i + 3] for i in range(2, len(text) - 3)]
    pieces = [p for p in pieces if p.strip()]
    early = pieces[len(pieces) // 4]
    late = next(p for p in reversed(pieces) if text.index(p) > text.index(early) + 3)
    stops = ["never in the text", late, early]  # listed first is not what matters: the first match is
    r = client.messages.create(stop_sequences=stops, **kw)
    assert (r.stop_reason, r.stop_sequence) == ("stop_sequence", early)
    assert "".join(b.text for b in r.content) == text[: text.index(early)]
    with client.messages.stream(stop_sequences=stops, **kw) as s:
        deltas = [e for e in s if e.type == "message_delta"]
        final = s.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", early)
    assert deltas[-1].delta.stop_sequence == early and final.content[0].text == r.content[0].text
    r = client.messages.create(stop_sequences=["never in the text"], **{**kw, "max_tokens": 5})
    assert (r.stop_reason, r.stop_sequence) == ("max_tokens", None)
