"""The server side of one request: admission (bounded queue), prompt building, the Runtime stream with
timings and metrics, disconnect-safe SSE responses.

Admission: at most ``max_batch + max_queue`` requests are in the server at once; the next one gets 429 with
``Retry-After``. Leaving the async iterator (client gone, task cancelled) closes the Runtime stream, which
aborts the request before the Decoder's next step.
"""

from __future__ import annotations

import contextlib
import logging
import time

import anyio
from starlette.responses import Response

from mach_runtime.errors import RequestError, RuntimeFailedError

from .errors import APIError

log = logging.getLogger("mach_runtime.server")


class Engine:
    """The Runtime plus what the server keeps about it."""

    def __init__(self, rt, settings, metrics):
        self.rt = rt
        self.settings = settings
        self.metrics = metrics
        self.tokenizer = rt.tokenizer
        self.max_context = rt._limits.max_context
        self.in_flight = 0
        self.draining = False
        self.created = int(time.time())

    def check_model(self, model: str) -> None:
        name = self.settings.model_name()
        if model != name:
            raise APIError(400, f"unknown model {model!r}; this server serves {name!r} (GET /v1/models)",
                           param="model", code="model_not_found")

    @property
    def capacity(self) -> int:
        return self.settings.max_batch + self.settings.max_queue

    @contextlib.contextmanager
    def admit(self):
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.in_flight >= self.capacity:
            self.metrics.rejected.inc()
            raise APIError(429, f"too many requests in flight ({self.in_flight}); retry shortly",
                           code="queue_full", headers={"Retry-After": str(self.settings.retry_after_s)})
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)

    # -- prompts ---------------------------------------------------------------------------------------------
    def chat_ids(self, messages: list[dict], tools: list | None = None) -> list[int]:
        kw = {"tools": tools} if tools else {}
        try:
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kw))
        except Exception as e:  # a template's own raise_exception(), a missing key, ...
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None

    def text_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        vocab = len(self.tokenizer)
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids out of range [0, {vocab}): {bad[:5]}", param="prompt")
        return list(prompt)

    def max_tokens(self, ids: list[int], requested: int | None, param: str) -> int:
        ctx = self.max_context
        if ctx is not None and len(ids) >= ctx:
            raise APIError(400, f"the prompt has {len(ids)} tokens; the model's context is {ctx} tokens",
                           param="messages" if param != "prompt" else "prompt", code="context_length_exceeded")
        if requested is None:
            return (ctx - len(ids)) if ctx is not None else 1024
        if ctx is not None and len(ids) + requested > ctx:
            raise APIError(400, f"prompt ({len(ids)} tokens) + {param} ({requested}) exceeds the model's context "
                                f"of {ctx} tokens", param=param, code="context_length_exceeded")
        return requested

    # -- generation ------------------------------------------------------------------------------------------
    def open_stream(self, ids, params: dict, request_id: str):
        try:
            return self.rt._stream_ids(ids, request_id=request_id, **params)
        except RequestError as e:
            raise APIError(400, str(e), param=_param_of(str(e))) from None
        except RuntimeFailedError as e:
            raise APIError(503, str(e), code="runtime_failed") from None

    async def chunks(self, stream, started: float, endpoint: str):
        """The Runtime stream's chunks, timed into the metrics; request errors become APIError."""
        m = self.metrics
        first = last = None
        n = 0
        try:
            async with stream:
                async for chunk in stream:
                    now = time.perf_counter()
                    if chunk.token_ids:
                        if first is None:
                            first = now
                            m.ttft.observe(now - started)
                        elif last is not None:
                            per = (now - last) / len(chunk.token_ids)
                            for _ in chunk.token_ids:
                                m.itl.observe(per)
                        last = now
                        n += len(chunk.token_ids)
                    if chunk.usage is not None:
                        m.record_usage(chunk.usage)
                    yield chunk
        except RequestError as e:
            raise APIError(400, str(e), param=_param_of(str(e))) from None
        except RuntimeFailedError as e:
            raise APIError(503, str(e), code="runtime_failed") from None
        finally:
            total = time.perf_counter() - started
            log.info("request %s endpoint=%s tokens=%d ttft_ms=%s total_ms=%.1f", stream.request_id, endpoint, n,
                     f"{(first - started) * 1e3:.1f}" if first else "-", total * 1e3)


def _param_of(message: str) -> str | None:
    head = message.split(" ", 1)[0].rstrip(":")
    known = {"temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "top_logprobs",
             "max_tokens", "stop", "seed", "grammar", "prompt"}
    return head if head in known else None


class SSEResponse(Response):
    """A ``text/event-stream`` ASGI response over an async iterator of event strings.

    It listens for ``http.disconnect`` while it streams: a client that leaves cancels the iterator (so the
    Runtime request is aborted before its next step), whatever the ASGI server's spec version. Cancelled by the
    server (shutdown timeout) instead, it sends ``on_cancel()``'s events (an error event and ``[DONE]``) first.
    """

    def __init__(self, events, headers: dict | None = None, on_cancel=None):
        self.events = events
        self.sse_headers = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache",
                        "x-accel-buffering": "no", **(headers or {})}
        self.on_cancel = on_cancel
        self.status_code = 200
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(k.encode(), str(v).encode()) for k, v in self.sse_headers.items()]})
        gone = told = False
        try:
            async with anyio.create_task_group() as tg:

                async def watch():
                    nonlocal gone
                    while True:
                        msg = await receive()
                        if msg["type"] == "http.disconnect":
                            gone = True
                            tg.cancel_scope.cancel()
                            return

                tg.start_soon(watch)
                try:
                    async for ev in self.events:
                        await send({"type": "http.response.body", "body": ev.encode(), "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except anyio.get_cancelled_exc_class():
                    if not gone and self.on_cancel is not None:
                        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                            for ev in self.on_cancel():
                                await send({"type": "http.response.body", "body": ev.encode(), "more_body": True})
                            await send({"type": "http.response.body", "body": b"", "more_body": False})
                            told = True
                    raise
                finally:
                    with anyio.CancelScope(shield=True):
                        await self.events.aclose()
                tg.cancel_scope.cancel()
        except anyio.get_cancelled_exc_class():
            if told:  # the ASGI server cancelled us at its shutdown timeout and the client has been told: done
                return
            raise


async def watch_disconnect(request, scope: anyio.CancelScope) -> None:
    """Cancels ``scope`` when the client of a (non-streaming) request disconnects."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            scope.cancel()
            return


class Delta:
    """What one Runtime chunk adds: text and tool calls in order, the tokens' logprobs, the finish."""

    __slots__ = ("parts", "token_ids", "logprobs", "finish", "usage", "stop_sequence")

    def __init__(self, parts, token_ids=(), logprobs=None, finish=None, usage=None, stop_sequence=None):
        self.parts, self.token_ids, self.logprobs, self.finish, self.usage = parts, token_ids, logprobs, finish, usage
        self.stop_sequence = stop_sequence  # with finish: the stop string that ended the request, if one did


async def deltas(engine: Engine, ids, params: dict, request_id: str, endpoint: str, parser=None):
    """The request as ``Delta``s: admitted, streamed, tool calls parsed out when ``parser`` is given. The last
    Delta has ``finish`` ("stop" | "length" | "tool_calls") and ``usage``. Raises APIError before the first
    Delta for anything wrong with the request (so the caller can still answer with a 4xx status)."""
    started = time.perf_counter()
    with engine.admit():
        stream = engine.open_stream(ids, params, request_id)
        async for chunk in engine.chunks(stream, started, endpoint):
            parts = parser.feed(chunk.text) if parser is not None else ([chunk.text] if chunk.text else [])
            finish = chunk.finish_reason
            if finish is not None:
                if parser is not None:
                    parts += parser.finish()
                    if parser.calls and finish == "stop":
                        finish = "tool_calls"
                if finish == "abort":
                    finish = "stop"
            yield Delta(parts, chunk.token_ids, chunk.logprobs, finish, chunk.usage, chunk.stop_sequence)


def usage_dict(usage: dict | None) -> dict:
    u = usage or {}
    p, c = u.get("prompt_tokens", 0), u.get("completion_tokens", 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": u.get("cached_tokens", 0)},
            "completion_tokens_details": {"reasoning_tokens": 0}}


async def first_delta(gen):
    """The first Delta (so request errors still answer with a 4xx status), as a one-item list."""
    try:
        return [await gen.__anext__()]
    except StopAsyncIteration:
        return []


async def collect(request, gen):
    """Every Delta of a non-streaming request, aborting it if the client disconnects meanwhile: (parts, token ids,
    logprobs, the last Delta)."""
    parts, token_ids, lps, last = [], [], [], None
    first = await first_delta(gen)  # a bad request answers with its status before anything runs
    try:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_disconnect, request, scope)
                async for d in chain(first, gen):
                    parts += d.parts
                    token_ids += d.token_ids
                    lps += d.logprobs or ()
                    if d.finish is not None:
                        last = d
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # an APIError from the stream, not a group of one
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        await gen.aclose()
    if last is None:  # the client left: nobody reads this
        raise APIError(499, "client closed the request")
    return parts, token_ids, lps, last


async def chain(first, gen):
    """The prefetched Deltas, then the rest of the generator's."""
    for d in first:
        yield d
    async for d in gen:
        yield d
