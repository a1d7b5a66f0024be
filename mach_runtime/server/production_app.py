"""The ASGI app ``mach-serve`` runs: FastAPI over one async Runtime per process.

    from mach_runtime.server.production_app import create_app
    from mach_runtime.server.settings import ServerSettings
    app = create_app(ServerSettings(checkpoint="/ckpt", streaming=True))   # uvicorn.run(app, ...)

The Runtime is opened in the app's lifespan (model load, actors) and closed after the ASGI server has drained
in-flight requests (uvicorn's graceful shutdown on SIGTERM). Every response echoes ``X-Request-Id`` (the
client's, when it is a short token, else a fresh one); every request is logged with its timings. With an API
key set, /v1/* and /metrics need ``Authorization: Bearer KEY`` (or ``x-api-key: KEY``), compared in constant
time. Errors are OpenAI error objects (Anthropic ones under /v1/messages).
"""

from __future__ import annotations

import contextlib
import hmac
import inspect
import logging
import re
import secrets
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mach_runtime.backend.dtypes import dtype_name
from mach_runtime.errors import ConfigError

from . import anthropic_protocol, openai_protocol, operations
from .errors import APIError, field_name, render
from .generation import Engine
from .metrics import Metrics
from .settings import ServerSettings
from .tool_formats import tool_format

log = logging.getLogger("mach_runtime.server")
_RID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_OPEN_PATHS = ("/health", "/docs", "/openapi.json", "/redoc")
# mach-serve flag -> (settings field, the Runtime.open argument it maps to): the prefix cache's arguments
_PREFIX_ARGS = {"--prefix-cache/--no-prefix-cache": ("prefix_cache", "prefix_cache"),
                "--disk-kv-dir": ("disk_kv_dir", "prefix_cache_dir"),
                "--disk-kv-budget-gb": ("disk_kv_budget_gb", "disk_kv_budget_gb")}


def runtime_kwargs(s: ServerSettings, open_fn) -> dict:
    kw = dict(draft=s.draft, expert_residency=s.residency, expert_cache_gb=s.expert_cache_gb, max_batch=s.max_batch)
    if s.spec_batch_size:
        kw["spec_batch"] = s.spec_batch_size
    accepted = inspect.signature(open_fn).parameters
    for flag, (field, name) in _PREFIX_ARGS.items():
        value = getattr(s, field)
        if value is not None:
            if name not in accepted:
                raise ConfigError(f"{flag}: this build's Runtime has no prefix cache (Runtime.open takes no "
                                  f"{name!r}); leave the flag out")
            kw[name] = value
    return kw | s.open_kwargs


def startup_info(rt, settings: ServerSettings, stats) -> dict:
    from mach_runtime.io.arch_registry import adapter_for_config, arch_summary, read_config

    ckpt = settings.checkpoint
    if ckpt is None:
        from mach_runtime.assets import demo_model_path

        ckpt = str(demo_model_path())
    arch = arch_summary(adapter_for_config(read_config(ckpt)))
    e = stats.experts
    spec = rt._spec
    return {
        "model": settings.model_name(), "checkpoint": str(ckpt), "expert_residency": e.residency,
        "bank_experts": e.capacity_experts, "bank_gb": round(e.capacity_experts * e.expert_bytes / 2**30, 3),
        "eviction_policy": e.eviction_policy, "direct_io": int(bool(e.direct_io)),
        "decode_path": f"specdec-{spec.config.mode.value}" if spec is not None else "batched-target",
        "adaptive_block_policy": spec.config.policy if spec is not None else "none",
        "draft": Path(settings.draft).name if settings.draft else "none",
        "spec_batch": rt._spec_batch.max_batch if rt._spec_batch is not None else 0,
        "lane_policy": lane_policy(spec is not None, rt._spec_batch.max_batch if rt._spec_batch is not None else 0),
        "max_batch": settings.max_batch, "max_queue": settings.max_queue,
        "prefix_cache": _prefix_state(stats),
        "arch": arch["arch"], "kv_cache_kind": arch["kv_cache_kind"], "specdec_kind": arch["specdec_kind"],
        "continuous_batching": arch["continuous_batching"], "dtype": compute_dtype(rt._sup.model),
    }


def compute_dtype(model) -> str:
    """The float dtype the model computes in: its norms' (a checkpoint's own dtype, or float32 where the loader
    casts half precision for MLX's CPU kernels: io/load.py ``_float_cast``)."""
    from mlx.utils import tree_flatten

    for name, a in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            return dtype_name(a.dtype)
    return "unknown"


def lane_policy(draft: bool, spec_batch: int) -> str:
    """The scheduler's lane policy in one token (``engine/scheduler.py``, "Lane policy")."""
    if not draft:
        return "target_only"
    if not spec_batch:
        return "spec_alone_else_target_only"
    return f"spec_upto_{spec_batch}_live_then_target_only_until_drained"


def _prefix_state(stats) -> str:
    p = getattr(stats, "prefix_cache", None)
    if p is None or not getattr(p, "enabled", False):
        return "off"
    return "l1+l2" if getattr(p, "l2", None) is not None else "l1"


def _log_startup(info: dict, settings: ServerSettings) -> None:
    def line(prefix, keys):
        log.info("%s %s", prefix, " ".join(f"{k}={info[k]}" for k in keys))

    line("startup mode", ["model", "dtype", "expert_residency", "max_batch", "max_queue"])
    line("startup bank", ["bank_experts", "bank_gb", "eviction_policy", "direct_io"])
    line("startup", ["decode_path", "draft", "spec_batch", "lane_policy", "adaptive_block_policy", "prefix_cache"])
    line("startup capabilities", ["arch", "kv_cache_kind", "specdec_kind", "continuous_batching", "tool_format"])
    log.info("startup listening url=http://%s:%d/v1 auth=%d", settings.host, settings.port, int(bool(settings.api_key)))


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        from mach_runtime import Runtime

        kw = runtime_kwargs(settings, Runtime.open)
        async with Runtime.open(settings.checkpoint, **kw) as rt:
            engine = Engine(rt, settings, metrics)
            engine.startup = startup_info(rt, settings, await rt.stats())
            engine.prefix_cache_enabled = engine.startup["prefix_cache"] != "off"
            template = getattr(rt.tokenizer, "chat_template", None) or ""
            engine.tool_template = "tools" in template
            engine.tool_format = tool_format(template, engine.startup["arch"])
            engine.startup["tool_format"] = engine.tool_format.name
            app.state.engine = engine
            _log_startup(engine.startup, settings)
            try:
                yield
            finally:
                engine.draining = True
                log.info("shutdown in_flight=%d", engine.in_flight)

    app = FastAPI(title="mach-serve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI- and Anthropic-compatible API over the mach_runtime Runtime")
    app.include_router(openai_protocol.router)
    app.include_router(anthropic_protocol.router)
    app.include_router(operations.router)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return render(e, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request"}
        field = field_name(first.get("loc", ()))
        msg = first.get("msg", "invalid value")
        if first.get("type") == "json_invalid":
            msg, field = "the request body is not valid JSON", "body"
        return render(APIError(400, f"{field}: {msg}", param=field, code="invalid_value"), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return render(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None,
                               headers=getattr(e, "headers", None)), request.url.path)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return render(APIError(500, f"internal error: {type(e).__name__}", code="internal_error"), request.url.path)

    return Gate(app, settings, metrics)


class Gate:
    """Pure ASGI middleware (streams pass through untouched): request id, API key, body size, request log."""

    def __init__(self, app: FastAPI, settings: ServerSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self._key = settings.api_key.encode() if settings.api_key else None

    @property
    def state(self):
        return self.app.state

    def __getattr__(self, name):  # the FastAPI app's API (openapi(), routes, ...) stays reachable
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        rid = given if _RID.match(given) else "req-" + secrets.token_hex(8)
        path, started, status = scope["path"], time.perf_counter(), [0]

        async def send_with_id(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                msg = {**msg, "headers": list(msg.get("headers", [])) + [(b"x-request-id", rid.encode())]}
            await send(msg)

        error = self._refuse(headers, path)
        try:
            if error is not None:
                await render(error, path)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            ms = (time.perf_counter() - started) * 1e3
            self.metrics.requests.labels(path if path.startswith("/v1/") else "other", str(status[0])).inc()
            log.info("http %s %s status=%d ms=%.1f request_id=%s", scope["method"], path, status[0], ms, rid)

    def _refuse(self, headers: dict, path: str) -> APIError | None:
        if self._key is not None and path not in _OPEN_PATHS:
            auth = headers.get("authorization", "")
            token = auth[7:] if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
            if not hmac.compare_digest(token.encode("latin-1"), self._key):
                return APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.settings.max_request_bytes):
            return APIError(413, f"request body larger than {self.settings.max_request_bytes} bytes",
                            code="request_too_large")
        return None
