"""Operations endpoints: GET /health, /v1/capabilities, /v1/stats, /v1/cache/stats, /metrics;
POST /v1/cache/warm_prefix."""

from __future__ import annotations

import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from .errors import APIError
from .metrics import CONTENT_TYPE_LATEST

router = APIRouter()


def _plain(obj):
    return msgspec.to_builtins(obj) if obj is not None else None


@router.get("/health")
async def health(request: Request):
    engine = request.app.state.engine
    sup = engine.rt._sup
    if sup.failed is not None or sup.closed or engine.draining:
        return JSONResponse({"status": "unavailable", "reason": str(sup.failed or "shutting down")}, status_code=503)
    return {"status": "ok", "model": engine.settings.model_name(), "in_flight": engine.in_flight}


@router.get("/v1/capabilities")
async def capabilities(request: Request):
    from mach_runtime.io.arch_registry import registry_summary

    engine = request.app.state.engine
    return {"architectures": registry_summary(), "server": engine.settings.public(), "startup": engine.startup,
            "features": {"chat_completions": True, "completions": True, "anthropic_messages": True,
                         "streaming": True, "tool_calls": engine.tool_format.name,
                         "tool_template": engine.tool_template,
                         "response_format": ["text", "json_object", "json_schema"], "grammar_library": "llguidance",
                         "logprobs": True, "n": 1, "prefix_cache": engine.prefix_cache_enabled}}


@router.get("/v1/stats")
async def stats(request: Request):
    engine = request.app.state.engine
    s = await engine.rt.stats()
    d = s.decoder
    return {"decode_path": engine.startup.get("decode_path"), "in_flight": engine.in_flight,
            "queue_capacity": engine.capacity, "decoder": _plain(d), "live_requests": s.live_requests,
            "decoder_restarts": s.decoder_restarts, "expert_store_restarts": s.expert_store_restarts,
            "specdec": s.specdec, "specdec_batch": s.specdec_batch, "sessions": s.sessions}


@router.get("/v1/cache/stats")
async def cache_stats(request: Request):
    engine = request.app.state.engine
    s = await engine.rt.stats()
    e = _plain(s.experts)
    summary = {"residency": e.get("residency"), "hits": e.get("hits"), "misses": e.get("misses"),
               "evictions": e.get("evictions"), "hit_rate": e.get("hit_rate"), "bytes_read": e.get("bytes_read"),
               "direct_pread": {"active": int(bool(e.get("direct_io"))),
                                "mode": "o_direct" if e.get("direct_io") else "pread"}}
    prefix = _plain(getattr(s, "prefix_cache", None))
    return {"streaming_summary": summary, "experts": e, "prefix_cache": prefix, "prefetch": s.prefetch,
            "stale_generation_in_flight": s.decoder.active > 0}


class WarmPrefixRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    messages: list[dict] | None = Field(None, max_length=4096)
    prompt: str | None = None


@router.post("/v1/cache/warm_prefix", responses={501: {"description": "the prefix cache is off"}})
async def warm_prefix(body: WarmPrefixRequest, request: Request):
    """Prefills a stable prefix (system prompt, tools) into the prefix cache ahead of traffic."""
    from mach_runtime.errors import ConfigError, RequestError

    engine = request.app.state.engine
    if not engine.prefix_cache_enabled:
        raise APIError(501, "the prefix cache is off (mach-serve --no-prefix-cache)", code="not_implemented")
    if (body.messages is None) == (body.prompt is None):
        raise APIError(400, "give exactly one of messages or prompt", param="messages")
    if body.prompt == "" or body.messages == []:
        raise APIError(400, "the prefix is empty", param="messages" if body.messages is not None else "prompt")
    try:
        usage = await engine.rt.warm_prefix(body.messages if body.messages is not None else body.prompt)
    except RequestError as e:
        raise APIError(400, str(e), param="messages" if body.messages is not None else "prompt") from None
    except ConfigError as e:
        raise APIError(501, str(e), code="not_implemented") from None
    return {"object": "cache.warm_prefix", "usage": usage}


@router.get("/metrics")
async def metrics(request: Request):
    engine = request.app.state.engine
    if not engine.rt._sup.closed:
        engine.metrics.refresh(await engine.rt.stats())
    return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)
