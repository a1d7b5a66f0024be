"""Structured output and forced tool calls as llguidance grammars (``SamplingParams.grammar``).

``response_format`` ``{"type": "json_object"}`` → any JSON object; ``{"type": "json_schema", "json_schema":
{"schema": ...}}`` → JSON following the schema. A forced tool call (OpenAI ``tool_choice`` "required" or a named
function; Anthropic ``tool_choice`` "any" or a named tool) → exactly one call in the family's own format
(``tool_grammars.py``) naming one of the allowed tools, whose arguments follow that tool's parameter schema.
"""

from __future__ import annotations

from mach_runtime.engine.constraints import json_schema_grammar, lark_grammar
from mach_runtime.errors import RequestError

from .errors import APIError


def response_format_grammar(fmt: dict | None) -> str | None:
    if not fmt:
        return None
    kind = fmt.get("type")
    try:
        if kind == "text":
            return None
        if kind == "json_object":
            return json_schema_grammar(None)
        if kind == "json_schema":
            spec = fmt.get("json_schema") or {}
            schema = spec.get("schema")
            if schema is None:
                raise APIError(400, "json_schema.schema is required", param="response_format.json_schema.schema")
            return json_schema_grammar(schema)
    except RequestError as e:
        raise APIError(400, str(e), param="response_format") from None
    raise APIError(400, f"unknown response_format type {kind!r}; use text, json_object or json_schema",
                   param="response_format.type")


def tool_call_grammar(fmt, tools: list[dict], param: str) -> str:
    """One call to any of ``tools`` ({"name", "parameters"} each), in the family's format ``fmt`` (a
    ``tool_calls.ToolFormat``)."""
    try:
        return lark_grammar(fmt.grammar(tools))
    except RequestError as e:
        raise APIError(400, f"a tool's parameters are not a usable JSON schema: {e}", param=param) from None
