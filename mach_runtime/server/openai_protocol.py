"""OpenAI protocol: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.

Streams are SSE (``data: {json}`` events, ``data: [DONE]`` last); ``stream_options.include_usage`` adds a
usage chunk (``choices: []``) before ``[DONE]`` and ``usage: null`` on every other chunk. Stop strings are never
echoed (the Runtime holds back partial matches). Tool calls in the model family's format (``tool_calls.py``) become
``tool_calls`` (streamed as ``delta.tool_calls``), with ``finish_reason: "tool_calls"``.
"""

from __future__ import annotations

import json
import secrets
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .errors import APIError, openai_body
from .generation import SSEResponse, chain, collect, deltas, first_delta, usage_dict
from .openai_models import ChatCompletionRequest, CompletionRequest
from .structured import response_format_grammar, tool_call_grammar

router = APIRouter()
ERRORS = {400: {"description": "invalid request (OpenAI error object)"}, 401: {"description": "bad API key"},
          429: {"description": "admission queue full; see Retry-After"}, 503: {"description": "shutting down"}}


def _engine(request: Request):
    return request.app.state.engine


def _event(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def sampling(engine, req, ids, requested_max, max_param: str) -> dict:
    if req.n not in (None, 1):
        raise APIError(400, "n > 1 is not supported: send n separate requests", param="n")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > engine.settings.max_stop_sequences:
        raise APIError(400, f"at most {engine.settings.max_stop_sequences} stop sequences", param="stop")
    if any(len(s) > 512 for s in stop):
        raise APIError(400, "stop sequences are limited to 512 characters", param="stop")
    return dict(
        max_tokens=engine.max_tokens(ids, requested_max, max_param),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        seed=req.seed, stop=stop,
    )


def template_messages(messages) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type not in ("text", "input_text"):
                    raise APIError(400, f"content part type {part.type!r} is not supported (text only)",
                                   param=f"messages[{i}].content[{j}].type")
                texts.append(part.text or "")
            content = "".join(texts)
        d = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.tool_calls:
            calls = []
            for j, tc in enumerate(m.tool_calls):
                try:
                    args = json.loads(tc.function.arguments or "{}")
                except json.JSONDecodeError:
                    raise APIError(400, "tool call arguments must be a JSON object",
                                   param=f"messages[{i}].tool_calls[{j}].function.arguments") from None
                calls.append({"id": tc.id, "type": "function",
                              "function": {"name": tc.function.name, "arguments": args}})
            d["tool_calls"] = calls
        if m.role == "tool":
            d["tool_call_id"] = m.tool_call_id
        if m.name:
            d["name"] = m.name
        out.append(d)
    return out


def token_text(tok, token_id: int) -> str:
    return tok.decode([token_id])


def chat_logprobs(tok, token_ids, logprobs) -> list[dict]:
    out = []
    for t, (lp, top) in zip(token_ids, logprobs or ()):
        s = token_text(tok, t)
        out.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                    "top_logprobs": [{"token": (x := token_text(tok, i)), "logprob": v, "bytes": list(x.encode())}
                                     for i, v in top]})
    return out


@router.post("/v1/chat/completions", responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    engine = _engine(request)
    engine.check_model(body.model)
    tools = [t.function.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice
    use_tools = bool(tools) and choice != "none"
    grammar = response_format_grammar(body.response_format.model_dump(by_alias=True) if body.response_format
                                      else None)
    if use_tools and (choice == "required" or not isinstance(choice, (str, type(None)))):
        chosen = tools if choice == "required" else [t for t in tools if t["name"] == choice.function.name]
        if not chosen:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not in tools",
                           param="tool_choice.function.name")
        if grammar is not None:
            raise APIError(400, "response_format and a forced tool_choice cannot be combined", param="tool_choice")
        grammar = tool_call_grammar(engine.tool_format, chosen, "tools")
    elif choice is not None and choice != "none" and not tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    template_tools = [{"type": "function", "function": t} for t in tools] if use_tools else None
    ids = engine.chat_ids(template_messages(body.messages), template_tools)
    params = sampling(engine, body, ids, body.max_completion_tokens or body.max_tokens,
                      "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    want_lp = bool(body.logprobs)
    if body.top_logprobs and not want_lp:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    params.update(logprobs=want_lp, top_logprobs=body.top_logprobs or 0, grammar=grammar)
    rid = "chatcmpl-" + secrets.token_hex(12)
    meta = {"id": rid, "created": int(time.time()), "model": engine.settings.model_name(),
            "system_fingerprint": None}
    parser = engine.tool_format.parser(tools) if use_tools or engine.tool_format.always else None
    gen = deltas(engine, ids, params, rid, "chat", parser)
    if body.stream:
        first = await first_delta(gen)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSEResponse(_chat_events(engine, meta, first, gen, include_usage, want_lp),
                           headers=_mode_header(engine), on_cancel=_cancel_events)
    parts, token_ids, lps, last = await collect(request, gen)
    finish, usage = last.finish, last.usage
    text = "".join(p for p in parts if isinstance(p, str))
    calls = [p for p in parts if not isinstance(p, str)]
    message = {"role": "assistant", "content": text if (text or not calls) else None}
    if calls:
        message["tool_calls"] = [c.openai(i) for i, c in enumerate(calls)]
        for tc in message["tool_calls"]:
            tc.pop("index")
    choice_out = {"index": 0, "message": message, "finish_reason": finish,
                  "logprobs": {"content": chat_logprobs(engine.tokenizer, token_ids, lps)} if want_lp else None}
    return JSONResponse({**meta, "object": "chat.completion", "choices": [choice_out], "usage": usage_dict(usage)},
                        headers=_mode_header(engine))


def _mode_header(engine) -> dict:
    return {"X-Decode-Mode": "specdec" if engine.settings.draft else "batched"}


def _cancel_events():
    yield _event(openai_body(APIError(503, "the server shut down before the request finished",
                                      code="shutting_down")))
    yield "data: [DONE]\n\n"


async def _chat_events(engine, meta, first, gen, include_usage: bool, want_lp: bool):
    base = {**meta, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def chunk(delta, finish=None, logprobs=None):
        c = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return _event({**base, "choices": [c], **extra})

    yield chunk({"role": "assistant", "content": ""})
    n_calls = 0
    try:
        async for d in chain(first, gen):
            text = ""
            for p in d.parts:
                if isinstance(p, str):
                    text += p
                    continue
                if text:
                    yield chunk({"content": text})
                    text = ""
                yield chunk({"tool_calls": [p.openai(n_calls)]})
                n_calls += 1
            lp = {"content": chat_logprobs(engine.tokenizer, d.token_ids, d.logprobs)} if want_lp else None
            if text or (lp and lp["content"]):
                yield chunk({"content": text}, logprobs=lp)
            if d.finish is not None:
                yield chunk({}, finish=d.finish)
                if include_usage:
                    yield _event({**base, "choices": [], "usage": usage_dict(d.usage)})
    except APIError as e:
        yield _event(openai_body(e))
    finally:
        await gen.aclose()
    yield "data: [DONE]\n\n"


@router.post("/v1/completions", responses=ERRORS)
async def completions(body: CompletionRequest, request: Request):
    engine = _engine(request)
    engine.check_model(body.model)
    if body.best_of not in (None, 1):
        raise APIError(400, "best_of > 1 is not supported", param="best_of")
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "a batch of prompts is not supported: send one request per prompt", param="prompt")
        prompt = prompt[0]
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    ids = engine.text_ids(prompt)
    params = sampling(engine, body, ids, body.max_tokens if body.max_tokens is not None else 16, "max_tokens")
    want_lp = body.logprobs is not None
    grammar = response_format_grammar(body.response_format.model_dump(by_alias=True) if body.response_format
                                      else None)
    params.update(logprobs=want_lp, top_logprobs=body.logprobs or 0, grammar=grammar)
    rid = "cmpl-" + secrets.token_hex(12)
    meta = {"id": rid, "object": "text_completion", "created": int(time.time()),
            "model": engine.settings.model_name(), "system_fingerprint": None}
    echo = engine.tokenizer.decode(ids) if body.echo else ""
    gen = deltas(engine, ids, params, rid, "completions")
    if body.stream:
        first = await first_delta(gen)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSEResponse(_completion_events(engine, meta, first, gen, include_usage, want_lp, echo),
                           headers=_mode_header(engine), on_cancel=_cancel_events)
    parts, token_ids, lps, last = await collect(request, gen)
    finish, usage = last.finish, last.usage
    choice = {"index": 0, "text": echo + "".join(parts), "finish_reason": finish,
              "logprobs": legacy_logprobs(engine.tokenizer, token_ids, lps, len(echo)) if want_lp else None}
    return JSONResponse({**meta, "choices": [choice], "usage": usage_dict(usage)}, headers=_mode_header(engine))


def legacy_logprobs(tok, token_ids, lps, offset: int = 0) -> dict:
    tokens, offsets = [], []
    for t in token_ids:
        s = token_text(tok, t)
        offsets.append(offset)
        offset += len(s)
        tokens.append(s)
    return {"tokens": tokens, "token_logprobs": [lp for lp, _ in lps], "text_offset": offsets,
            "top_logprobs": [{token_text(tok, i): v for i, v in top} for _, top in lps]}


async def _completion_events(engine, meta, first, gen, include_usage, want_lp, echo):
    extra = {"usage": None} if include_usage else {}
    offset = len(echo)

    def chunk(text, finish=None, logprobs=None):
        return _event({**meta, "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                                            "finish_reason": finish}], **extra})

    try:
        if echo:
            yield chunk(echo)
        async for d in chain(first, gen):
            text = "".join(d.parts)
            lp = legacy_logprobs(engine.tokenizer, d.token_ids, d.logprobs or (), offset) if want_lp else None
            offset += len(text)
            if text or d.finish is not None or (lp and lp["tokens"]):
                yield chunk(text, d.finish, lp)
            if d.finish is not None and include_usage:
                yield _event({**meta, "choices": [], "usage": usage_dict(d.usage)})
    except APIError as e:
        yield _event(openai_body(e))
    finally:
        await gen.aclose()
    yield "data: [DONE]\n\n"


@router.get("/v1/models")
async def models(request: Request):
    engine = _engine(request)
    return {"object": "list", "data": [{"id": engine.settings.model_name(), "object": "model",
                                        "created": engine.created, "owned_by": "mach-runtime"}]}
