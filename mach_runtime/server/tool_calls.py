"""Tool calls in the model's own format: Qwen-style ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
blocks in the generated text (Qwen2.5/3/3.5, Hermes-style templates).

``ToolCallParser`` is incremental: ``feed(text)`` returns the events the new text completes — plain text (with
any possible start of a ``<tool_call>`` tag held back) and whole tool calls — so the OpenAI stream sends
``delta.tool_calls`` and the Anthropic stream ``tool_use`` blocks, never the raw tags. A block whose JSON does
not parse is given back as text (what the model wrote, unchanged).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"


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


def _parse(block: str, id_prefix: str) -> ToolCall | None:
    try:
        obj = json.loads(block.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some templates / models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(id_prefix), obj["name"], json.dumps(args, ensure_ascii=False))


class ToolCallParser:
    def __init__(self, id_prefix: str = "call_"):
        self.id_prefix = id_prefix
        self._buf = ""
        self._inside = False
        self._after_call = False  # the newline(s) separating a closed block from what follows are dropped
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> list:
        """Events (``str`` text or ``ToolCall``) that ``text`` completes."""
        self._buf += text
        out = []
        while True:
            if not self._inside:
                if self._after_call:
                    self._buf = self._buf.lstrip("\n")
                    self._after_call = not self._buf
                i = self._buf.find(OPEN)
                if i < 0:
                    keep = _partial_suffix(self._buf, OPEN)
                    emit = self._buf[: len(self._buf) - keep]
                    if emit:
                        out.append(emit)
                    self._buf = self._buf[len(emit):]
                    return out
                if i > 0:
                    out.append(self._buf[:i])
                self._buf = self._buf[i + len(OPEN):]
                self._inside = True
            j = self._buf.find(CLOSE)
            if j < 0:
                return out
            call = _parse(self._buf[:j], self.id_prefix)
            if call is None:
                out.append(OPEN + self._buf[: j + len(CLOSE)])
            else:
                self.calls.append(call)
                out.append(call)
            self._buf = self._buf[j + len(CLOSE):]
            self._after_call = call is not None
            self._inside = False

    def finish(self) -> list:
        """At the end of generation: whatever is still held back, as text (an unclosed block is parsed if its
        JSON is complete: a model stopped by its stop token right before the closing tag)."""
        rest, self._buf = self._buf, ""
        if self._inside:
            self._inside = False
            call = _parse(rest, self.id_prefix)
            if call is not None:
                self.calls.append(call)
                return [call]
            return [OPEN + rest]
        return [rest] if rest else []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_text_and_calls(events) -> tuple[str, list[ToolCall]]:
    text = "".join(e for e in events if isinstance(e, str))
    return text, [e for e in events if isinstance(e, ToolCall)]
