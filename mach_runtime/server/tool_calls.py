"""Tool calls in the model family's own format, parsed out of the generated text.

Each family's chat template tells the model how to write a call; ``tool_format(template, arch)`` picks the
matching ``ToolFormat`` (``tool_formats.py``; from the template's own markers, else from the checkpoint's family):

* ``qwen_json``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Qwen2.5 / Qwen3, Hermes);
* ``qwen_xml``: ``<tool_call><function=NAME><parameter=KEY>VALUE</parameter></function></tool_call>`` (Qwen3.5,
  Qwen3-Coder; values typed by the tool's parameter schema);
* ``gemma4``: ``<|tool_call>call:NAME{key:<|"|>text<|"|>,n:3}<tool_call|>``;
* ``deepseek``: DSML ``<｜DSML｜function_calls><｜DSML｜invoke name="NAME"><｜DSML｜parameter name="K"
  string="true">V</｜DSML｜parameter>...`` (V3.2 and later) and ``<｜tool▁calls▁begin｜>...`` (V3 / V3.1);
* ``harmony`` (gpt-oss): messages ``<|channel|>C to=functions.NAME<|message|>ARGS<|call|>``; only the ``final``
  (and recipient-less ``commentary``) channels are text, ``analysis`` is hidden.

Parsers are incremental: ``feed(text)`` returns the events the new text completes — plain text (any possible
start of a tag held back) and whole ``ToolCall``s — so the OpenAI stream sends ``delta.tool_calls`` and the
Anthropic stream ``tool_use`` blocks, never the raw tags. A block that does not parse is given back as the text
the model wrote. Here: the calls and the tagged-block parser; ``tool_formats.py``: each format's bodies and the
choice of format; ``tool_grammars.py``: the grammar forcing one call in a format.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass


QUOTE = '<|"|>'  # Gemma 4's string delimiter
DSML = "｜DSML｜"  # DeepSeek's markup token


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of the arguments object

    def openai(self, index: int) -> dict:
        return {"index": index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id(prefix: str = "call_") -> str:
    return prefix + secrets.token_hex(12)


def make_call(name: str, args: dict, id_prefix: str) -> ToolCall:
    return ToolCall(new_call_id(id_prefix), name, json.dumps(args, ensure_ascii=False))


class BlockParser:
    """Tagged tool-call blocks in free text: ``tags`` are (open, close) pairs; ``parse_body(body)`` gives the block's
    calls as (name, arguments dict) pairs, or None when the block is not a valid call (then its text is kept)."""

    def __init__(self, tags, parse_body, id_prefix: str = "call_"):
        self.tags = tuple(tags)
        self.parse_body = parse_body
        self.id_prefix = id_prefix
        self._buf = ""
        self._open: tuple[str, str] | None = None  # the tag pair of the block being read
        self._after_call = False  # the newline(s) separating a closed block from what follows are dropped
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> list:
        """Events (``str`` text or ``ToolCall``) that ``text`` completes."""
        self._buf += text
        out = []
        while True:
            if self._open is None:
                if self._after_call:
                    self._buf = self._buf.lstrip("\n")
                    self._after_call = not self._buf
                hit = min(((i, t) for t in self.tags if (i := self._buf.find(t[0])) >= 0), default=None)
                if hit is None:  # held back: a possible start of a tag, and whitespace that may precede one
                    keep = max(partial_suffix(self._buf, t[0]) for t in self.tags)
                    emit = self._buf[: len(self._buf) - keep].rstrip()
                    if emit:
                        out.append(emit)
                    self._buf = self._buf[len(emit):]
                    return out
                i, self._open = hit
                if self._buf[:i].strip():  # (the whitespace between text and a call is the template's layout)
                    out.append(self._buf[:i].rstrip())
                self._buf = self._buf[i + len(self._open[0]):]
            close = self._open[1]
            j = self._buf.find(close)
            if j < 0:
                return out
            out += self._block(self._buf[:j], self._buf[: j + len(close)])
            self._buf = self._buf[j + len(close):]
            self._open = None

    def _block(self, body: str, raw: str) -> list:
        try:
            found = self.parse_body(body)
        except (ValueError, KeyError, TypeError, IndexError):
            found = None
        if not found:
            self._after_call = False
            return [self._open[0] + raw]
        calls = [make_call(name, args, self.id_prefix) for name, args in found]
        self.calls += calls
        self._after_call = True
        return calls

    def finish(self) -> list:
        """At the end of generation: whatever is still held back, as text (an unclosed block is parsed if it is
        complete: a model stopped by its stop token right before the closing tag)."""
        rest, self._buf = self._buf, ""
        if self._open is not None:
            out = self._block(rest, rest)
            self._open = None
            return out
        return [rest] if rest else []


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_text_and_calls(events) -> tuple[str, list[ToolCall]]:
    text = "".join(e for e in events if isinstance(e, str))
    return text, [e for e in events if isinstance(e, ToolCall)]
