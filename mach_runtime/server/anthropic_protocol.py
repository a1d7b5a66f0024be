"""Anthropic protocol: POST /v1/messages (and /v1/messages/count_tokens), so Anthropic-protocol agents can point
at a local model.

Streams follow the event sequence the official client parses: ``message_start``, then per content block
``content_block_start`` / ``content_block_delta``s / ``content_block_stop`` (a ``ping`` after the first block
start), then ``message_delta`` (stop_reason, output usage) and ``message_stop``. Tool calls the model writes in
its family's format (``tool_calls.py``) become ``tool_use`` blocks (streamed as ``input_json_delta``); ``tool_result``
blocks go back to the model through the chat template as tool messages.
"""

from __future__ import annotations

import json
import secrets

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .anthropic_models import MessagesRequest
from .errors import APIError, anthropic_body
from .generation import SSEResponse, chain, collect, deltas, first_delta
from .structured import tool_call_grammar

router = APIRouter()
_STOP = {"length": "max_tokens", "tool_calls": "tool_use"}


def _text(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    out = []
    for j, b in enumerate(content):
        if b.type != "text":
            raise APIError(400, f"block type {b.type!r} is not supported here (text only)", param=f"{where}[{j}].type")
        out.append(b.text or "")
    return "".join(out)


def template_messages(body: MessagesRequest) -> list[dict]:
    out = []
    if body.system:
        out.append({"role": "system", "content": _text(body.system, "system")})
    for i, m in enumerate(body.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        text, calls = [], []
        for j, b in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            if b.type == "text":
                text.append(b.text or "")
            elif b.type == "tool_use" and m.role == "assistant":
                calls.append({"id": b.id, "type": "function",
                              "function": {"name": b.name or "", "arguments": b.input or {}}})
            elif b.type == "tool_result" and m.role == "user":
                if text:
                    out.append({"role": "user", "content": "".join(text)})
                    text = []
                out.append({"role": "tool", "tool_call_id": b.tool_use_id,
                            "content": _text(b.content, where + ".content")})
            else:
                raise APIError(400, f"block type {b.type!r} is not supported in a {m.role} message",
                               param=where + ".type")
        if text or calls or m.role == "assistant":
            d = {"role": m.role, "content": "".join(text)}
            if calls:
                d["tool_calls"] = calls
            out.append(d)
    return out


def _tool_use(call) -> dict:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments)}


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request):
    engine = request.app.state.engine
    engine.check_model(body.model)
    tools = [{"name": t.name, "description": t.description or "", "parameters": t.input_schema}
             for t in body.tools or []]
    choice = body.tool_choice
    use_tools = bool(tools) and (choice is None or choice.type != "none")
    grammar = None
    if use_tools and choice is not None and choice.type in ("any", "tool"):
        chosen = tools if choice.type == "any" else [t for t in tools if t["name"] == choice.name]
        if not chosen:
            raise APIError(400, f"tool_choice names {choice.name!r}, which is not in tools", param="tool_choice.name")
        grammar = tool_call_grammar(engine.tool_format, chosen, "tools")
    template_tools = [{"type": "function", "function": t} for t in tools] if use_tools else None
    ids = engine.chat_ids(template_messages(body), template_tools)
    stop = list(body.stop_sequences or [])
    if any(not s for s in stop):
        raise APIError(400, "stop sequences must be non-empty", param="stop_sequences")
    params = dict(max_tokens=engine.max_tokens(ids, body.max_tokens, "max_tokens"),
                  temperature=1.0 if body.temperature is None else body.temperature,
                  top_p=body.top_p or 1.0, top_k=body.top_k or 0, stop=stop, grammar=grammar)
    rid = "msg_" + secrets.token_hex(12)
    meta = {"id": rid, "type": "message", "role": "assistant", "model": engine.settings.model_name()}
    parser = engine.tool_format.parser(tools, "toolu_") if use_tools or engine.tool_format.always else None
    gen = deltas(engine, ids, params, rid, "messages", parser)
    if body.stream:
        first = await first_delta(gen)
        return SSEResponse(_events(meta, len(ids), first, gen), on_cancel=_cancel_events)
    parts, _, _, last = await collect(request, gen)
    content = []
    for p in parts:
        if isinstance(p, str):
            if content and content[-1]["type"] == "text":
                content[-1]["text"] += p
            elif p:
                content.append({"type": "text", "text": p})
        else:
            content.append(_tool_use(p))
    reason, seq = _stop_reason(last)
    return JSONResponse({**meta, "content": content, "stop_reason": reason, "stop_sequence": seq,
                         "usage": _usage(last.usage, len(ids))})


def _stop_reason(last):
    """(stop_reason, stop_sequence) of the last Delta: the stop string that matched, as the Runtime reports it."""
    if last.finish in _STOP:
        return _STOP[last.finish], None
    if last.stop_sequence is not None:
        return "stop_sequence", last.stop_sequence
    return "end_turn", None


def _usage(usage, prompt_tokens) -> dict:
    u = usage or {}
    return {"input_tokens": u.get("prompt_tokens", prompt_tokens), "output_tokens": u.get("completion_tokens", 0),
            "cache_read_input_tokens": u.get("cached_tokens", 0), "cache_creation_input_tokens": 0}


def _sse(kind: str, obj: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _cancel_events():
    yield _sse("error", anthropic_body(APIError(503, "the server shut down before the request finished")))


async def _events(meta, prompt_tokens, first, gen):
    yield _sse("message_start", {"type": "message_start", "message": {
        **meta, "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}})
    index, open_text, pinged = 0, False, False
    try:
        async for d in chain(first, gen):
            for p in d.parts:
                if isinstance(p, str):
                    if not p:
                        continue
                    if not open_text:
                        yield _sse("content_block_start", {"type": "content_block_start", "index": index,
                                                           "content_block": {"type": "text", "text": ""}})
                        open_text = True
                        if not pinged:
                            pinged = True
                            yield _sse("ping", {"type": "ping"})
                    yield _sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                                       "delta": {"type": "text_delta", "text": p}})
                    continue
                if open_text:
                    yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
                    index, open_text = index + 1, False
                block = _tool_use(p)
                yield _sse("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": {**block, "input": {}}})
                if not pinged:
                    pinged = True
                    yield _sse("ping", {"type": "ping"})
                yield _sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                                   "delta": {"type": "input_json_delta", "partial_json": p.arguments}})
                yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
                index += 1
            if d.finish is not None:
                if open_text:
                    yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
                reason, seq = _stop_reason(d)
                yield _sse("message_delta", {"type": "message_delta",
                                             "delta": {"stop_reason": reason, "stop_sequence": seq},
                                             "usage": {"output_tokens": (d.usage or {}).get("completion_tokens", 0)}})
                yield _sse("message_stop", {"type": "message_stop"})
    except APIError as e:
        yield _sse("error", anthropic_body(e))
    finally:
        await gen.aclose()
