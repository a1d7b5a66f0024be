"""Tool calls in two non-Qwen families' formats through a live mach-serve and the official clients: the demo
weights with a gpt-oss-harmony-style and a Gemma-4-style tool template. The server picks the parser from the
template; a forced tool choice constrains generation to one call in that format (so the real generation path
writes it), which comes back as OpenAI ``tool_calls`` (streamed as deltas) and Anthropic ``tool_use`` blocks, and
the call and its result go back through the template."""

import json

import jsonschema
import pytest

from mach_runtime.server.settings import ServerSettings
from tests.server_helpers import GEMMA4_TEMPLATE, HARMONY_TEMPLATE, MODEL, serve_in_thread, tool_checkpoint

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
          "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                            "parameters": PARAMS}}
MARKERS = {"harmony": ("<|channel|>", "<|message|>", "to=functions"),
           "gemma4": ("<|tool_call>", "<tool_call|>", "call:")}
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module", params=[pytest.param(("harmony", HARMONY_TEMPLATE), id="harmony"),
                                        # the second format (a server start, ~20 s idle) in the long suite only
                                        pytest.param(("gemma4", GEMMA4_TEMPLATE), id="gemma4", marks=pytest.mark.slow)])
def server(request, tmp_path_factory):
    fmt, template = request.param
    ckpt = tool_checkpoint(tmp_path_factory.mktemp(fmt) / "ckpt", template)
    settings = ServerSettings(checkpoint=str(ckpt), streaming=False, max_batch=2, served_model_name=MODEL)
    with serve_in_thread(settings) as (base, _app):
        yield fmt, base, ckpt


def test_openai_tool_calls_in_the_family_format(server):
    import httpx
    from mlx_lm.tokenizer_utils import load

    fmt, base, ckpt = server
    assert httpx.get(base + "/v1/capabilities", timeout=30).json()["features"]["tool_calls"] == fmt
    oai = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = oai.chat.completions.create(model=MODEL, messages=MSGS, tools=[WEATHER], tool_choice=choice, max_tokens=60,
                                    temperature=0)
    assert r.choices[0].finish_reason == "tool_calls", r
    call = r.choices[0].message.tool_calls[0]
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(args, PARAMS)
    assert not any(m in (r.choices[0].message.content or "") for m in MARKERS[fmt])
    chunks = list(oai.chat.completions.create(model=MODEL, messages=MSGS, tools=[WEATHER], tool_choice=choice,
                                              max_tokens=60, temperature=0, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas if d.function.name] == ["get_weather"]
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == args
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert not any(m in streamed for m in MARKERS[fmt])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # the call and its result go back through the family's template
    follow = MSGS + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r2 = oai.chat.completions.create(model=MODEL, messages=follow, tools=[WEATHER], max_tokens=4, temperature=0)
    expected = load(ckpt).apply_chat_template(
        MSGS + [{"role": "assistant", "content": "", "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": args}}]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}], tools=[WEATHER],
        add_generation_prompt=True)
    assert r2.usage.prompt_tokens == len(expected)


def test_anthropic_tool_use_in_the_family_format(server):
    fmt, base, _ = server
    client = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0, timeout=120)
    tool = {"name": "get_weather", "description": "weather", "input_schema": PARAMS}
    kw = dict(model=MODEL, max_tokens=60, messages=MSGS, tools=[tool],
              tool_choice={"type": "tool", "name": "get_weather"}, extra_body={"temperature": 0})
    t = client.messages.create(**kw)
    assert t.stop_reason == "tool_use"
    uses = [b for b in t.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and uses[0].id.startswith("toolu_")
    jsonschema.validate(uses[0].input, PARAMS)
    assert not any(m in b.text for b in t.content if b.type == "text" for m in MARKERS[fmt])
    with client.messages.stream(**kw) as s:
        final = s.get_final_message()
    assert [b.input for b in final.content if b.type == "tool_use"] == [uses[0].input]
    assert final.stop_reason == "tool_use"
