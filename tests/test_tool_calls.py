"""The incremental tool-call parsers (Qwen JSON here; the other families in test_tool_formats.py): any split of the
stream gives the same events as the whole text, raw tags never leak, malformed blocks come back as the text the
model wrote."""

import json

import pytest

from mach_runtime.server.tool_calls import ToolCall, split_text_and_calls
from mach_runtime.server.tool_formats import FORMATS

TEXT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}\n</tool_call>')


def run(pieces):
    p = FORMATS["qwen_json"].parser()
    events = []
    for piece in pieces:
        events += p.feed(piece)
    events += p.finish()
    return split_text_and_calls(events), events


def test_whole_text():
    (text, calls), _ = run([TEXT])
    assert text == "Let me check."  # the newline before the block is layout
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                  ("get_time", {"tz": "CET"})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11])
def test_any_split_gives_the_same_events(size):
    (text, calls), events = run([TEXT[i:i + size] for i in range(0, len(TEXT), size)])
    assert text == "Let me check."  # the newline before the block is layout
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                  ("get_time", {"tz": "CET"})]
    assert not any(isinstance(e, str) and ("<tool" in e or "</tool" in e) for e in events)


def test_text_that_only_looks_like_a_tag_is_released():
    (text, calls), _ = run(["a < b and <tool", "s> are fine <to"])
    assert text == "a < b and <tools> are fine <to" and calls == []


def test_malformed_block_comes_back_as_text():
    bad = "<tool_call>\n{not json}\n</tool_call> after"
    (text, calls), _ = run([bad])
    assert calls == [] and text == bad


def test_unclosed_block_with_complete_json_is_a_call():
    (text, calls), _ = run(['<tool_call>\n{"name": "f", "arguments": {}}'])
    assert text == "" and [c.name for c in calls] == ["f"]
    (text, calls), _ = run(['<tool_call>\n{"name": "f", "argu'])
    assert calls == [] and text == '<tool_call>\n{"name": "f", "argu'


def test_openai_shape():
    c = ToolCall("call_1", "f", '{"x": 1}')
    assert c.openai(2) == {"index": 2, "id": "call_1", "type": "function", "function": {"name": "f",
                                                                                      "arguments": '{"x": 1}'}}
