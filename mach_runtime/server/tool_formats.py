"""Each family's tool-call format (``tool_calls.py`` says which family writes which): the bodies of its blocks
(every body parser returns [(name, arguments dict), ...] or None), the harmony (gpt-oss) message parser, and
``tool_format(template, arch)``, the format a checkpoint's chat template (else its family) writes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from . import tool_grammars
from .tool_calls import DSML, QUOTE, BlockParser, make_call, partial_suffix

# -- Qwen: JSON (Qwen2.5 / Qwen3) or XML-ish (Qwen3.5 / Qwen3-Coder) inside <tool_call> ---------------------------
QWEN_TAGS = (("<tool_call>", "</tool_call>"),)
_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*?)</function>\s*$", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.S)


def qwen_body(body: str, tools: list[dict]):
    text = body.strip()
    if text.startswith("{"):
        obj = json.loads(text)
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):  # some templates / models write the arguments as a JSON string
            args = json.loads(args)
        return [(obj["name"], args)] if isinstance(args, dict) else None
    m = _FUNCTION.match(body)
    if m is None:
        return None
    name = m.group(1).strip()
    props = _properties(tools, name)
    args = {}
    for k, v in _PARAMETER.findall(m.group(2)):
        v = v[1:] if v.startswith("\n") else v
        v = v[:-1] if v.endswith("\n") else v
        args[k.strip()] = typed(v, props.get(k.strip()))
    return [(name, args)]


def _properties(tools: list[dict], name: str) -> dict:
    for t in tools:
        if t.get("name") == name:
            return (t.get("parameters") or {}).get("properties") or {}
    return {}


def typed(value: str, schema: dict | None):
    """A parameter written as bare text, typed by its schema (strings stay text; the rest is JSON when it parses)."""
    kind = (schema or {}).get("type")
    if kind == "string":
        return value
    if kind == "boolean" and value in ("True", "False"):  # a Jinja template's ``value | string``
        return value == "True"
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


# -- Gemma 4: <|tool_call>call:NAME{key:value,...}<tool_call|>, strings between <|"|> ----------------------------
GEMMA4_TAGS = (("<|tool_call>", "<tool_call|>"),)


def gemma4_body(body: str, tools: list[dict]):
    text = body.strip()
    if not text.startswith("call:") or "{" not in text:
        return None
    i = text.index("{")
    name = text[5:i].strip()
    args, end = _gemma_value(text, i)
    if not name or not isinstance(args, dict) or text[end:].strip():
        return None
    return [(name, args)]


def _gemma_value(s: str, i: int):
    """(value, end) of the Gemma 4 value at ``s[i:]``: {k:v,...}, [v,...], <|"|>text<|"|>, true/false/null/number."""
    while s[i].isspace():
        i += 1
    if s.startswith(QUOTE, i):
        j = s.index(QUOTE, i + len(QUOTE))
        return s[i + len(QUOTE): j], j + len(QUOTE)
    if s[i] in "{[":
        close, out = ("}", {}) if s[i] == "{" else ("]", [])
        i += 1
        while True:
            while s[i].isspace() or s[i] == ",":
                i += 1
            if s[i] == close:
                return out, i + 1
            if close == "}":
                if s.startswith(QUOTE, i):
                    key, i = _gemma_value(s, i)
                else:
                    j = s.index(":", i)
                    key, i = s[i:j].strip(), j
                while s[i].isspace():
                    i += 1
                if s[i] != ":":
                    raise ValueError("expected ':'")
                out[key], i = _gemma_value(s, i + 1)
            else:
                v, i = _gemma_value(s, i)
                out.append(v)
    j = i
    while j < len(s) and s[j] not in ",}]":
        j += 1
    word = s[i:j].strip()
    if not word:
        raise ValueError("empty value")
    try:
        return json.loads(word), j
    except json.JSONDecodeError:
        return word, j


# -- DeepSeek: DSML (V3.2 and later) or the V3 / V3.1 tool-call tokens ------------------------------------------
DEEPSEEK_TAGS = ((f"<{DSML}function_calls>", f"</{DSML}function_calls>"),
                 ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"))
_INVOKE = re.compile(rf'<{DSML}invoke name="([^"]+)">(.*?)</{DSML}invoke>', re.S)
_DSML_PARAM = re.compile(rf'<{DSML}parameter name="([^"]+)" string="(true|false)">(.*?)</{DSML}parameter>', re.S)
_V3_CALL = re.compile(r"<｜tool▁call▁begin｜>(.*?)<｜tool▁sep｜>(.*?)<｜tool▁call▁end｜>", re.S)
_V3_FENCE = re.compile(r"^(.*?)\n```(?:json)?\n(.*?)\n```\s*$", re.S)


def deepseek_body(body: str, tools: list[dict]):
    calls = []
    if DSML in body:
        for name, inner in _INVOKE.findall(body):
            calls.append((name, {k: v if s == "true" else json.loads(v) for k, s, v in _DSML_PARAM.findall(inner)}))
        return calls or None
    for head, rest in _V3_CALL.findall(body):
        if head.strip() == "function":  # V3: function<sep>NAME\n```json\nARGS\n```
            m = _V3_FENCE.match(rest)
            if m is None:
                return None
            name, args = m.group(1).strip(), json.loads(m.group(2))
        else:  # V3.1: NAME<sep>ARGS
            name, args = head.strip(), json.loads(rest)
        if not isinstance(args, dict):
            return None
        calls.append((name, args))
    return calls or None


# -- harmony (gpt-oss): channels and recipients -------------------------------------------------------------------
MESSAGE, ENDS = "<|message|>", ("<|end|>", "<|call|>", "<|return|>")
_RECIPIENT = re.compile(r"to=(\S+?)(?=<\||\s|$)")
_CHANNEL = re.compile(r"<\|channel\|>\s*(\w+)")


class HarmonyParser:
    """Harmony messages after the ``<|start|>assistant`` generation prompt: a header (``<|channel|>C``, an optional
    ``to=functions.NAME`` recipient, ``<|constrain|>json``) up to ``<|message|>``, then the body up to ``<|end|>``
    (or the ``<|call|>`` / ``<|return|>`` stop tokens, which end generation). A body sent to ``functions.NAME`` is a
    call; ``final`` and recipient-less ``commentary`` bodies are text (streamed); ``analysis`` is hidden. Output
    with no harmony structure at all is given back as text at the end."""

    def __init__(self, tools=None, id_prefix: str = "call_"):
        self.id_prefix = id_prefix
        self._buf = ""
        self._body: str | None = None  # None: reading a header; else "call:NAME" | "text" | "hidden"
        self._structured = False
        self.calls = []

    def feed(self, text: str) -> list:
        self._buf += text
        out = []
        while True:
            if self._body is None:
                i = self._buf.find(MESSAGE)
                if i < 0:
                    return out
                self._structured = True
                self._body = self._kind(self._buf[:i])
                self._buf = self._buf[i + len(MESSAGE):]
            hit = min(((i, e) for e in ENDS if (i := self._buf.find(e)) >= 0), default=None)
            if hit is None:
                if self._body == "text":
                    keep = max(partial_suffix(self._buf, e) for e in ENDS)
                    if len(self._buf) > keep:
                        out.append(self._buf[: len(self._buf) - keep])
                        self._buf = self._buf[len(self._buf) - keep:]
                return out
            i, end = hit
            out += self._close(self._buf[:i])
            self._buf = self._buf[i + len(end):]

    @staticmethod
    def _kind(header: str) -> str:
        to = _RECIPIENT.search(header)
        if to is not None and to.group(1).startswith("functions."):
            return "call:" + to.group(1)[len("functions."):]
        ch = _CHANNEL.search(header)
        channel = ch.group(1) if ch else "final"
        return "hidden" if channel == "analysis" or to is not None else "text"

    def _close(self, body: str) -> list:
        kind, self._body = self._body, None
        if kind == "text":
            return [body] if body else []
        if kind == "hidden":
            return []
        try:
            args = json.loads(body) if body.strip() else {}
        except json.JSONDecodeError:
            return [body]
        if not isinstance(args, dict):
            return [body]
        call = make_call(kind[5:], args, self.id_prefix)
        self.calls.append(call)
        return [call]

    def finish(self) -> list:
        rest, self._buf = self._buf, ""
        if self._body is not None:
            return self._close(rest)
        return [rest] if rest and not self._structured else []


def parser(name: str, tools: list[dict], id_prefix: str):
    if name == "harmony":
        return HarmonyParser(tools, id_prefix)
    tags, body = {"qwen_json": (QWEN_TAGS, qwen_body), "qwen_xml": (QWEN_TAGS, qwen_body),
                  "gemma4": (GEMMA4_TAGS, gemma4_body), "deepseek": (DEEPSEEK_TAGS, deepseek_body)}[name]
    return BlockParser(tags, lambda text: body(text, tools), id_prefix)


@dataclass(frozen=True)
class ToolFormat:
    """One family's tool-call format: its parser, and the grammar that forces one call (``tool_choice``)."""

    name: str
    always: bool = False  # parse every response, tools or not (harmony: the channels are the response's structure)

    def parser(self, tools: list[dict] | None = None, id_prefix: str = "call_"):
        return parser(self.name, tools or [], id_prefix)

    def grammar(self, tools: list[dict]) -> str:
        """Lark text (llguidance) of exactly one call to one of ``tools`` ({"name", "parameters"} each)."""
        return tool_grammars.forced_call(self.name, tools)


FORMATS = {n: ToolFormat(n, always=(n == "harmony")) for n in ("qwen_json", "qwen_xml", "gemma4", "deepseek",
                                                                "harmony")}
# the checkpoint's family, when its template names no format (model_type -> format)
_BY_ARCH = {"qwen3_moe": "qwen_json", "qwen3_5_moe": "qwen_xml", "gemma4": "gemma4", "gpt_oss": "harmony",
            "deepseek_v4": "deepseek", "deepseek_v3": "deepseek", "deepseek_v32": "deepseek"}


def tool_format(template: str | None, arch: str | None = None) -> ToolFormat:
    """The format the chat template writes tool calls in (its markers), else the family's, else Qwen's JSON."""
    t = template if isinstance(template, str) else ""
    if "<|tool_call>" in t and "<tool_call|>" in t:
        name = "gemma4"
    elif "to=functions." in t or "<|channel|>" in t:
        name = "harmony"
    elif "｜DSML｜" in t or "<｜tool▁calls▁begin｜>" in t:
        name = "deepseek"
    elif "<function=" in t:
        name = "qwen_xml"
    elif "<tool_call>" in t:
        name = "qwen_json"
    else:
        name = _BY_ARCH.get(arch or "", "qwen_json")
    return FORMATS[name]

