"""Grammars (llguidance Lark) that force exactly one tool call, written the way the family's template writes it
(``tool_calls.py`` lists the formats). Arguments follow the tool's parameter schema: as JSON (``%json``) where
the format writes JSON; where it writes bare values (Qwen3.5 XML, DSML strings, Gemma 4), strings are text
without ``<`` or newlines within the schema's length bounds, enums their values, other types JSON (Gemma 4:
its own value syntax). In the non-JSON formats a forced call carries the required parameters only."""

from __future__ import annotations

import json

from .tool_calls import DSML, QUOTE


def lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def forced_call(fmt: str, tools: list[dict]) -> str:
    rules, alts = [], []
    for i, t in enumerate(tools):
        schema = t.get("parameters") or {"type": "object"}
        name = t["name"]
        body = {"qwen_json": _qwen_json, "qwen_xml": _qwen_xml, "gemma4": _gemma4, "deepseek": _dsml,
                "harmony": _harmony}[fmt](name, schema, f"t{i}", rules)
        rules.append(f"call{i}: {body}")
        alts.append(f"call{i}")
    return "\n".join([f"start: {' | '.join(alts)}"] + rules + _GEMMA_VALUE * (fmt == "gemma4")) + "\n"


def _json_rule(rules: list, name: str, schema: dict) -> str:
    rules.append(f"{name}: %json {json.dumps(schema)}")
    return name


def _qwen_json(name, schema, key, rules) -> str:
    obj = {"type": "object", "properties": {"name": {"const": name}, "arguments": schema},
           "required": ["name", "arguments"], "additionalProperties": False}
    return f'{lit("<tool_call>" + chr(10))} {_json_rule(rules, key + "_obj", obj)} {lit(chr(10) + "</tool_call>")}'


def _harmony(name, schema, key, rules) -> str:
    head = f" to=functions.{name}<|channel|>commentary json<|message|>"
    return f"{lit(head)} {_json_rule(rules, key + '_args', schema)}"


def _required(schema: dict):
    props = schema.get("properties") or {}
    return [(k, props.get(k) or {}) for k in schema.get("required") or [] if k in props]


def _is_text(schema: dict) -> bool:
    enum = schema.get("enum")
    return schema.get("type") == "string" or bool(enum and all(isinstance(v, str) for v in enum))


def _text(schema: dict, rules: list, key: str, quote: str = "") -> str:
    """A bare value: a string as text (or one of its enum values), anything else as JSON."""
    if _is_text(schema):
        if schema.get("enum"):
            return "(" + " | ".join(lit(quote + v + quote) for v in schema["enum"]) + ")"
        lo, hi = max(1, int(schema.get("minLength") or 1)), schema.get("maxLength")
        regex = f"/[^<\\n]{{{lo},{int(hi)}}}/" if hi is not None else f"/[^<\\n]{{{lo},}}/"
        return f"{lit(quote)} {regex} {lit(quote)}" if quote else regex
    return _json_rule(rules, key, schema)


def _qwen_xml(name, schema, key, rules) -> str:
    parts = [lit(f"<tool_call>\n<function={name}>\n")]
    for j, (k, s) in enumerate(_required(schema)):
        parts += [lit(f"<parameter={k}>\n"), _text(s, rules, f"{key}_{j}"), lit("\n</parameter>\n")]
    return " ".join(parts + [lit("</function>\n</tool_call>")])


def _dsml(name, schema, key, rules) -> str:
    parts = [lit(f'<{DSML}function_calls>\n<{DSML}invoke name="{name}">\n')]
    for j, (k, s) in enumerate(_required(schema)):
        is_str = _is_text(s)
        parts += [lit(f'<{DSML}parameter name="{k}" string="{str(is_str).lower()}">'), _text(s, rules, f"{key}_{j}"),
                  lit(f"</{DSML}parameter>\n")]
    return " ".join(parts + [lit(f"</{DSML}invoke>\n</{DSML}function_calls>")])


def _gemma4(name, schema, key, rules) -> str:
    parts = [lit(f"<|tool_call>call:{name}{{")]
    for j, (k, s) in enumerate(sorted(_required(schema))):  # the template writes arguments sorted by key
        value = _text(s, rules, f"{key}_{j}", QUOTE) if _is_text(s) else "gvalue"
        parts += [lit(("," if j else "") + f"{k}:"), value]
    return " ".join(parts + [lit("}<tool_call|>")])


_GEMMA_VALUE = [  # Gemma 4's own value syntax, for parameters that are not strings
    f'gvalue: {lit(QUOTE)} /[^<]*/ {lit(QUOTE)} | /-?[0-9]+(\\.[0-9]+)?/ | "true" | "false" | "null"'
    ' | "{" (gpair ("," gpair)*)? "}" | "[" (gvalue ("," gvalue)*)? "]"',
    "gpair: /[A-Za-z_][A-Za-z0-9_]*/ \":\" gvalue",
]
