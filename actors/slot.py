"""A request's output slot: the Decoder pushes without ever blocking; the consumer takes merged chunks.

Modelled on vLLM's output collector: one slot per request holds everything produced since the consumer last
looked. A slow consumer receives several tokens merged into one chunk; the producer (the MLX thread) only
appends under a lock. ``push`` / ``finish`` / ``fail`` return the consumer's wake-up event (or None when it is
not waiting); the producer hands all the events of one decode step to ``wake`` — one cross-thread call per
step, not one per request (each costs a syscall on the event loop's self-pipe). ``call_soon`` is how any thread
schedules a callback on an event loop (asyncio or trio alike).
"""

from __future__ import annotations

import threading

import anyio
import anyio.lowlevel
import msgspec


def loop_token():
    """The running event loop's native token (asyncio loop or TrioToken); call from async code."""
    return anyio.lowlevel.current_token().native_token


def call_soon(token, fn, *args) -> bool:
    """Schedules ``fn(*args)`` on the event loop of ``token`` from any thread, without waiting.

    Returns False if that loop is gone (the runtime already shut down).
    """
    try:
        if hasattr(token, "call_soon_threadsafe"):  # asyncio event loop
            token.call_soon_threadsafe(fn, *args)
        else:  # trio.lowlevel.TrioToken
            token.run_sync_soon(fn, *args)
        return True
    except RuntimeError:  # loop closed / trio run finished
        return False


class Chunk(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    index: int  # position of token_ids[0] in the completion
    finish_reason: str | None = None  # None until the last chunk
    usage: dict | None = None  # on the last chunk: prompt_tokens, completion_tokens, cached_tokens, prefilled_tokens
    # per token when the request asked for logprobs: (logprob, ((top token id, logprob), ...))
    logprobs: tuple | None = None
    stop_sequence: str | None = None  # on the last chunk: the stop string that ended the request, if one did


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: dict


def _set_all(events) -> None:
    for e in events:
        e.set()


def wake(token, events) -> None:
    """Sets the given consumer events (None entries skipped) with one call onto the event loop of ``token``."""
    events = [e for e in events if e is not None]
    if events:
        call_soon(token, _set_all, events)


class OutputSlot:
    def __init__(self, request_id: str):
        self.request_id = request_id
        self._lock = threading.Lock()
        self._ids: list[int] = []
        self._text: list[str] = []
        self._logprobs: list | None = None
        self._index = 0  # completion position of the first pending token
        self._finish: tuple[str, dict, str | None] | None = None
        self._error: BaseException | None = None
        self._event: anyio.Event | None = None
        self._done = False  # the consumer received the last chunk

    # -- producer side (any thread); each returns the event to set, for ``wake`` -------------------------
    def _take_event(self):
        event, self._event = self._event, None
        return event

    def push(self, token_ids, text: str, logprobs=None):
        with self._lock:
            self._ids.extend(token_ids)
            self._text.append(text)
            if logprobs is not None:
                self._logprobs = (self._logprobs or []) + list(logprobs)
            return self._take_event()

    def finish(self, reason: str, usage: dict, stop_sequence: str | None = None):
        with self._lock:
            if self._finish is None and self._error is None:
                self._finish = (reason, usage, stop_sequence)
            return self._take_event()

    def fail(self, error: BaseException):
        with self._lock:
            if self._finish is None and self._error is None:
                self._error = error
            return self._take_event()

    @property
    def closed(self) -> bool:
        return self._finish is not None or self._error is not None

    # -- consumer side (the request's task) ---------------------------------------------------------------
    async def get(self) -> Chunk | None:
        """The next merged chunk; None after the last one. Raises the request's error."""
        while True:
            with self._lock:
                if self._done:
                    return None
                if self._error is not None and not self._ids:
                    self._done = True
                    raise self._error
                if self._ids or self._finish is not None:
                    ids, text = tuple(self._ids), "".join(self._text)
                    lps, self._logprobs = self._logprobs, None
                    chunk_index = self._index
                    self._index += len(ids)
                    self._ids.clear()
                    self._text.clear()
                    reason, usage, stop_seq = self._finish if self._finish else (None, None, None)
                    if reason is not None:
                        self._done = True
                    return Chunk(request_id=self.request_id, text=text, token_ids=ids, index=chunk_index,
                                 finish_reason=reason, usage=usage, logprobs=tuple(lps) if lps else None,
                                 stop_sequence=stop_seq)
                event = self._event = anyio.Event()
            await event.wait()
