"""Each family's tool-call format, parsed from text exactly as the family's chat template renders an assistant's
call (gpt-oss harmony, Gemma 4, DeepSeek DSML through mlx-lm's own DeepSeek-V3.2 encoder, DeepSeek V3.1, Qwen3.5
XML): the same calls whatever the stream's split; the format chosen from the template's markers or the family;
the forced-call grammar of each format accepts the rendering and its output parses back."""

import json

import jinja2
import pytest

from mach_runtime.server.tool_calls import ToolCall
from mach_runtime.server.tool_formats import FORMATS, tool_format
from mach_runtime.server.tool_grammars import forced_call

TOOLS = [{"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer"},
                                     "metric": {"type": "boolean"}}, "required": ["city", "days"]}}]
ARGS = {"city": "Paris", "days": 3, "metric": True}
NESTED = {"opts": {"unit": "C", "note": "a, {b}"}, "tags": ["x", "y"], "n": -1.5, "flag": False}

# gpt-oss's template renders an assistant tool call as
#   "<|start|>assistant to=" + "functions." + name + "<|channel|>commentary json<|message|>" + args|tojson + "<|end|>"
# after the generation prompt "<|start|>assistant"; generating, the model ends the call with its <|call|> stop token.
HARMONY_CALL = jinja2.Environment().from_string(
    '{{ " to=functions." + name + "<|channel|>commentary json<|message|>" }}{{ args|tojson }}')


def events_of(fmt: str, text: str, size: int | None, tools=TOOLS):
    p = FORMATS[fmt].parser(tools)
    pieces = [text] if size is None else [text[i:i + size] for i in range(0, len(text), size)]
    events = [e for piece in pieces for e in p.feed(piece)] + p.finish()
    return "".join(e for e in events if isinstance(e, str)), [e for e in events if isinstance(e, ToolCall)], events


def calls_of(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


def deepseek_v32_rendering(args: dict) -> str:
    """DeepSeek-V3.2's assistant turn with a tool call, rendered by mlx-lm's own encoder of its chat format, less the
    end-of-sentence token (the model's stop token: never in the generated text)."""
    enc = pytest.importorskip("mlx_lm.chat_templates.deepseek_v32")
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps(args)}}]}]
    text = enc.render_message(1, messages, thinking_mode="chat")
    assert text.endswith(enc.eos_token)
    return text[: -len(enc.eos_token)]


CASES = {
    "harmony": HARMONY_CALL.render(name="get_weather", args=ARGS),
    "harmony_analysis_first": "<|channel|>analysis<|message|>The user wants the weather.<|end|><|start|>assistant"
                              + HARMONY_CALL.render(name="get_weather", args=ARGS) + "<|call|>",
    "gemma4": '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3,metric:true}<tool_call|>',
    "deepseek": None,  # rendered by mlx-lm at test time
    "deepseek_v31": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
                    + json.dumps(ARGS) + "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    "qwen_xml": "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
                "</parameter>\n<parameter=metric>\nTrue\n</parameter>\n</function>\n</tool_call>",
}
FORMAT_OF = {"harmony_analysis_first": "harmony", "deepseek_v31": "deepseek"}


@pytest.mark.parametrize("size", [None, 1, 3, 7])
@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_call_parses_whatever_the_split(case, size):
    text = CASES[case] if CASES[case] is not None else deepseek_v32_rendering(ARGS)
    plain, calls, events = events_of(FORMAT_OF.get(case, case), text, size)
    assert plain == "" and calls_of(calls) == [("get_weather", ARGS)], events
    assert calls[0].id.startswith("call_")


def test_text_around_calls_and_nested_arguments():
    gemma = ('Checking.<|tool_call>call:set{flag:false,n:-1.5,opts:{note:<|"|>a, {b}<|"|>,unit:<|"|>C<|"|>},'
             'tags:[<|"|>x<|"|>,<|"|>y<|"|>]}<tool_call|><|tool_call>call:get_weather{city:<|"|>Rome<|"|>,days:1}'
             '<tool_call|>')
    for size in (None, 2, 5):
        plain, calls, _ = events_of("gemma4", gemma, size)
        assert plain == "Checking."
        assert calls_of(calls) == [("set", NESTED), ("get_weather", {"city": "Rome", "days": 1})]
    dsml = "I will look it up." + deepseek_v32_rendering(NESTED)
    plain, calls, _ = events_of("deepseek", dsml, 4)
    assert plain == "I will look it up." and calls_of(calls) == [("get_weather", NESTED)]


def test_harmony_channels():
    final = ("<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>It is sunny."
             "<|return|>")
    for size in (None, 1, 4):
        plain, calls, _ = events_of("harmony", final, size)
        assert plain == "It is sunny." and calls == []
    # the model's own form (channel first, then the recipient and <|constrain|>), ended by the <|call|> stop token
    own = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo", "days": 2}'
    assert calls_of(events_of("harmony", own, 3)[1]) == [("get_weather", {"city": "Oslo", "days": 2})]
    assert events_of("harmony", "no structure at all", 2)[0] == "no structure at all"


def test_malformed_blocks_come_back_as_text():
    for fmt, bad in (("gemma4", "<|tool_call>call:f{x:<|\"|>unterminated}<tool_call|>"),
                     ("deepseek", "<｜DSML｜function_calls>\nnothing\n</｜DSML｜function_calls>"),
                     ("qwen_xml", "<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n</tool_call>")):
        plain, calls, _ = events_of(fmt, bad, 3)
        assert calls == [] and plain == bad, fmt


def test_format_from_template_markers_else_family():
    assert tool_format("{{ '<|tool_call>call:' }}{{ '<tool_call|>' }}").name == "gemma4"
    assert tool_format('{{- "functions." + tc.name + "<|channel|>commentary json<|message|>" }}').name == "harmony"
    assert tool_format("<｜DSML｜function_calls>").name == "deepseek"
    assert tool_format("{{- '<tool_call>\\n<function=' + tc.name + '>\\n' }}").name == "qwen_xml"
    assert tool_format('<tool_call>\\n{"name": {{ tool_call.name }}}').name == "qwen_json"
    plain = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert [tool_format(plain, a).name for a in ("gpt_oss", "gemma4", "deepseek_v4", "qwen3_5_moe", "qwen3_moe")] == [
        "harmony", "gemma4", "deepseek", "qwen_xml", "qwen_json"]
    assert tool_format(None).name == "qwen_json"


@pytest.fixture(scope="module")
def tok():
    from mlx_lm.tokenizer_utils import load

    from mach_runtime.assets import demo_model_path

    return load(demo_model_path())


@pytest.mark.parametrize("fmt", ["qwen_json", "qwen_xml", "gemma4", "deepseek", "harmony"])
def test_forced_call_grammar_accepts_the_rendering(fmt, tok):
    import llguidance

    from mach_runtime.engine.constraints import lark_grammar, ll_tokenizer

    two = TOOLS + [{"name": "get_time", "parameters": {"type": "object", "properties": {
        "tz": {"type": "string", "enum": ["CET", "UTC"]}}, "required": ["tz"]}}]
    grammar = lark_grammar(forced_call(fmt, two))
    required = {"city": "Paris", "days": 3}  # a forced call in a non-JSON format carries the required parameters
    rendering = {"qwen_json": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
                              "</tool_call>",
                 "qwen_xml": "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                             "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
                 "gemma4": '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>',
                 "deepseek": deepseek_v32_rendering(required).lstrip("\n"),
                 "harmony": HARMONY_CALL.render(name="get_weather", args=required)}[fmt]
    m = llguidance.LLMatcher(ll_tokenizer(tok), grammar)
    assert m.consume_tokens(tok.encode(rendering, add_special_tokens=False)), (fmt, m.get_error())
    assert m.is_accepting() and not m.is_error()
    assert calls_of(events_of(fmt, rendering, 5)[1]) == [("get_weather", required)]
    other = {"gemma4": '<|tool_call>call:get_time{tz:<|"|>CET<|"|>}<tool_call|>',
             "harmony": ' to=functions.get_time<|channel|>commentary json<|message|>{"tz": "UTC"}'}.get(fmt)
    if other is not None:  # the other tool, an enum value
        m = llguidance.LLMatcher(ll_tokenizer(tok), grammar)
        assert m.consume_tokens(tok.encode(other, add_special_tokens=False)) and m.is_accepting()
    bad = rendering.replace("Paris", "A city name far too long")
    m = llguidance.LLMatcher(ll_tokenizer(tok), grammar)
    assert not (m.consume_tokens(tok.encode(bad, add_special_tokens=False)) and m.is_accepting())
