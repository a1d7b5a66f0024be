"""Runtime: the embedded async API (``mach_runtime.Runtime``).

    async with Runtime.open(checkpoint, expert_residency="streaming", max_batch=8) as rt:
        async for chunk in rt.stream("def main():", max_tokens=64):
            print(chunk.text, end="")
        completion = await rt.generate([{"role": "user", "content": "hi"}])
        async with rt.session(system="You write Python.") as s:
            async for chunk in s.send("a function that reverses a list"): ...
        print(await rt.stats())

Works under asyncio and trio (anyio). The model is loaded on, and only ever touched from, the one MLX thread;
requests from any number of tasks are multiplexed into the Decoder's continuous batch. Leaving an ``async for``
early, closing the stream, or cancelling the task that iterates it aborts the request and frees its batch slot
before the next decode step. Errors arrive as exceptions from the iterator.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import secrets
from dataclasses import dataclass

import anyio
import msgspec

from mach_runtime.errors import ConfigError, RequestError
from mach_runtime.engine.sampling import validate

from .messages import CacheLookup, CacheRelease, RuntimeStats, SamplingParams, StatsRequest, Submit
from .mlx_thread import MLXThread
from .slot import Chunk
from .supervisor import Supervisor

_ids = itertools.count(1)


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: dict


class RequestStream:
    """Async iterator of ``Chunk``s for one request. Closing it (or dropping it) aborts the request."""

    def __init__(self, rt: "Runtime", submit: Submit, on_chunk=None):
        self._rt = rt
        self._submit = submit
        self._slot = None
        self._finished = False
        self._on_chunk = on_chunk
        self.request_id = submit.request_id

    def __aiter__(self):
        return self

    async def _start(self) -> None:
        sub = self._submit
        if sub.session_id is not None:
            reply = await self._rt._sup.cache.ask(CacheLookup(sub.session_id, sub.prompt_ids))
            if reply.handle is not None:
                sub = msgspec.structs.replace(sub, cache_handle=reply.handle, cached_tokens=reply.cached_tokens)
        self._slot = self._rt._sup.submit(sub)

    async def __anext__(self) -> Chunk:
        if self._finished:
            raise StopAsyncIteration
        try:
            if self._slot is None:
                await self._start()
            chunk = await self._slot.get()
        except BaseException:  # cancelled, or the request failed: make sure it leaves the batch
            self._close()
            raise
        if chunk is None:
            self._finished = True
            raise StopAsyncIteration
        if chunk.finish_reason is not None:
            self._finished = True
        if self._on_chunk is not None:
            self._on_chunk(chunk)
        return chunk

    def _close(self) -> None:
        if not self._finished:
            self._finished = True
            if self._slot is not None and not self._slot.closed:
                self._rt._sup.abort(self.request_id, missing_ok=True)

    async def aclose(self) -> None:
        self._close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self._close()

    def __del__(self):  # ``break`` out of ``async for`` drops the stream: abort right away
        try:
            self._close()
        except Exception:
            pass


class Session:
    """A multi-turn conversation whose KV cache stays warm between turns (no re-prefill of earlier turns).

    Turn N's prompt is built at the token level: the exact tokens of turn N-1 (its prompt and the reply as
    generated) followed by the chat template's text between that reply and the new assistant turn. The template
    text is found by rendering the conversation with a marker in place of the last reply, so the reply's own
    tokens are never re-tokenized and the Cache actor's KV covers the whole history.
    """

    _MARK = "\ue000mach-reply\ue000"

    def __init__(self, rt: "Runtime", system: str | None, session_id: str):
        self.rt = rt
        self.session_id = session_id
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self._prompt_text: str | None = None  # rendered text of the latest turn's prompt
        self._history_ids: list[int] | None = None  # that prompt's tokens + the reply's tokens
        self._ended_with_eos = False
        self.turns: list[Completion] = []

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        if not self.rt._sup.closed:
            self.rt._sup.cache.deliver(CacheRelease(self.session_id))

    def _render(self, msgs) -> str:
        return self.rt.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def _prompt_ids(self, user: str) -> tuple[list[int], str]:
        tok = self.rt.tokenizer
        user_msg = {"role": "user", "content": user}
        text = self._render(self.messages + [user_msg])
        if self._history_ids is not None:
            marked = self._render(self.messages[:-1] + [{"role": "assistant", "content": self._MARK}, user_msg])
            before, found, after = marked.partition(self._MARK)
            if found and before == self._prompt_text:
                if self._ended_with_eos:  # the template's end-of-turn text is already there as a token
                    eos_text = tok.decode(self._history_ids[-1:])
                    after = after[len(eos_text) :] if after.startswith(eos_text) else after
                return self._history_ids + tok.encode(after, add_special_tokens=False), text
        return tok.encode(text, add_special_tokens=False), text

    def send(self, user: str, **params) -> RequestStream:
        """Streams the assistant's reply to ``user``; the turn is recorded when the last chunk arrives."""
        ids, text = self._prompt_ids(user)
        parts: list[Chunk] = []

        def collect(chunk: Chunk) -> None:
            parts.append(chunk)
            if chunk.finish_reason is not None:
                self._record(user, ids, text, parts)

        return self.rt._stream_ids(ids, session_id=self.session_id, on_chunk=collect, **params)

    def _record(self, user: str, prompt_ids: list[int], prompt_text: str, parts: list[Chunk]) -> None:
        reply = "".join(c.text for c in parts)
        gen = [t for c in parts for t in c.token_ids]
        self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        self._prompt_text = prompt_text
        self._history_ids = list(prompt_ids) + gen
        self._ended_with_eos = bool(gen) and gen[-1] in self.rt.tokenizer.eos_token_ids
        last = parts[-1]
        self.turns.append(Completion(request_id=last.request_id, text=reply, token_ids=tuple(gen),
                                     finish_reason=last.finish_reason, usage=last.usage))


@dataclass
class _Limits:
    max_context: int | None


class Runtime:
    def __init__(self, sup: Supervisor, tokenizer, limits: _Limits, spec=None, spec_batch=None):
        self._sup = sup
        self.tokenizer = tokenizer
        self._limits = limits
        self._spec = spec
        self._spec_batch = spec_batch

    # -- lifecycle -----------------------------------------------------------------------------------------
    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, checkpoint=None, *, draft=None, specdec=None, expert_residency=None, expert_cache_gb=None,
                   prefix_cache_dir=None, max_batch: int = 8, max_sessions: int = 64, fault_hook=None,
                   restart_intensity: int = 3, restart_period: float = 60.0, predictor=None, warmup=None,
                   spec_batch: int = 0, prefill_chunk: int = 512, **load_kwargs):
        """Loads the model on the MLX thread and starts the actors; closes everything on exit.

        draft: a DFlash draft checkpoint; requests then decode speculatively (NATIVE_V7) while they run alone.
        specdec: a ``BlockSpecDecEngineConfig`` (mode, block size, policy); with PROMPT_LOOKUP no draft is needed.
        spec_batch: with ``draft``/``specdec``, N >= 2 runs 2..N concurrent requests (at least one speculative)
            together in a ``BatchedSpecDecoder`` (batched verification) instead of the target-only batch; more
            than N use the target-only batch, a lone request the single-request engine. 0 (default): off.
            Families whose capabilities rule out per-row rollback (``spec_batch=False``: sliding windows,
            compressed KV) run without it (0), as do families that cannot batch at all (those run one request at a
            time, the others queued: ``stats().decoder.batching`` says so).
        prefill_chunk: prompt tokens a newcomer prefills per decode step of the running requests (chunked
            prefill: a long prompt delays each running stream by one chunk at a time, not by its whole prefill).
        warmup: run the speculative engine once before serving (``BlockSpecDecEngine.warmup``: on a GPU backend
            the first draft + verify compile kernels for about a minute). Default: on a GPU, not on the CPU.

        After loading, the process's garbage collector is collected once and frozen (``gc.freeze()``): objects
        alive then (the model's) are never scanned again, which keeps decode-time collections short.
        """
        from mach_runtime.io.arch_registry import adapter_for_config, read_config
        from mach_runtime.io.load import load_moe

        if prefix_cache_dir is not None:
            raise ConfigError("prefix_cache_dir (the on-disk L2 prefix cache) is not supported by the Runtime yet")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not isinstance(spec_batch, int) or spec_batch < 0 or spec_batch == 1 or spec_batch > max_batch:
            raise ConfigError(f"spec_batch must be 0 (off) or an integer in 2..max_batch ({max_batch}), "
                              f"got {spec_batch!r}")
        if checkpoint is None:
            from mach_runtime.assets import default_checkpoint

            checkpoint = default_checkpoint()
        if not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool) or prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
        mlx = MLXThread()
        store = None
        try:
            model, tokenizer, store, _ = await mlx.call(lambda: load_moe(
                checkpoint, expert_residency=expert_residency, expert_cache_gb=expert_cache_gb, **load_kwargs))
            config = read_config(os.fspath(checkpoint))
            adapter = adapter_for_config(config)
            caps = adapter.capabilities()  # what the family can do: batching, speculative rollback (the table)
            spec = batched = None
            if draft is not None or specdec is not None:
                spec = await mlx.call(lambda: _spec_engine(model, tokenizer, store, draft, specdec))
                if spec_batch >= 2 and caps.batch and caps.spec_batch:
                    batched = await mlx.call(lambda: _spec_batch(model, tokenizer, store, spec, spec_batch))
                if warmup or (warmup is None and await mlx.call(_on_gpu)):
                    await mlx.call(spec.warmup)
                    if batched is not None:
                        await mlx.call(batched.warmup)
            # the model's many long-lived objects leave the collector's reach, so the collections that decoding's
            # short-lived arrays trigger stay short (on the H100 the spec decode ran ~10 % faster with gc off)
            gc.collect()
            gc.freeze()
            tc = adapter.text_config(config)
            limits = _Limits(tc.get("max_position_embeddings"))
            sup = Supervisor(mlx, model, tokenizer, store, max_batch=max_batch, max_sessions=max_sessions,
                             fault_hook=fault_hook, intensity=restart_intensity, period=restart_period,
                             predictor=predictor, spec=spec, spec_batch=batched, caps=caps,
                             prefill_chunk=prefill_chunk)
            try:
                async with anyio.create_task_group() as tg:
                    await sup.start(tg)
                    try:
                        yield cls(sup, tokenizer, limits, spec, batched)
                    finally:
                        with anyio.CancelScope(shield=True):
                            await sup.shutdown()
                        tg.cancel_scope.cancel()
            except BaseExceptionGroup as group:  # the caller's own exception, not a group of one
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise
        finally:
            if store is not None:
                store.close()
            mlx.stop()

    # -- requests ------------------------------------------------------------------------------------------
    def _encode(self, prompt) -> list[int]:
        tok = self.tokenizer
        if isinstance(prompt, str):
            return tok.encode(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            for i, m in enumerate(prompt):
                if "role" not in m or "content" not in m:
                    raise RequestError(f"messages[{i}] needs 'role' and 'content'")
            return list(tok.apply_chat_template(list(prompt), add_generation_prompt=True))
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = getattr(tok, "vocab_size", None)
            bad = [t for t in prompt if t < 0 or (vocab is not None and t >= len(tok))]
            if bad:
                raise RequestError(f"prompt token ids out of range: {bad[:5]}")
            return list(prompt)
        raise RequestError("prompt must be a string, a list of chat messages ({'role', 'content'}) or token ids")

    def _stream_ids(self, ids, *, max_tokens=64, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=None,
                    stop=None, stop_token_ids=(), request_id=None, session_id=None, specdec="default",
                    specdec_policy=None, logits_processors=(), on_chunk=None, presence_penalty=0.0,
                    frequency_penalty=0.0, logprobs=False, top_logprobs=0, grammar=None) -> RequestStream:
        """See ``stream``. Sampling extras: ``min_p``; OpenAI ``presence_penalty`` / ``frequency_penalty`` over the
        generated tokens; ``logprobs`` (+ ``top_logprobs`` alternatives) on each chunk; ``grammar``: an llguidance
        grammar string (``mach_runtime.engine.constraints.json_schema_grammar(schema)`` / ``lark_grammar``) every
        token must follow; ``logits_processors``: ``fn(tokens, logits) -> logits`` hooks. Requests using any of
        these decode in the target-only batch (the speculative lanes do not implement them), exactly against the
        (constrained) target."""
        self._sup.check_open()
        if not ids:
            raise RequestError("the prompt is empty: give at least one token")
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            raise RequestError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        try:
            validate(temperature, top_p, top_k, min_p, presence_penalty, frequency_penalty, top_logprobs)
        except (ConfigError, TypeError) as e:
            raise RequestError(str(e)) from None
        if grammar is not None:
            from mach_runtime.engine.constraints import check_grammar

            check_grammar(grammar, self.tokenizer)
        ctx = self._limits.max_context
        if ctx is not None and len(ids) + max_tokens > ctx:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's context of {ctx} tokens"
            )
        if isinstance(stop, str):
            stop = [stop]
        stop = tuple(s for s in (stop or ()) if s)
        specdec, specdec_policy = self._specdec_choice(specdec, specdec_policy)
        if not all(isinstance(s, str) for s in stop):
            raise RequestError(f"stop must be a string or a list of strings, got {stop!r}")
        params = SamplingParams(
            max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
            min_p=float(min_p), seed=int(seed) if seed is not None else secrets.randbits(62), stop=stop,
            stop_token_ids=tuple(stop_token_ids), specdec=specdec, specdec_policy=specdec_policy,
            processors=tuple(logits_processors), presence_penalty=float(presence_penalty),
            frequency_penalty=float(frequency_penalty), logprobs=bool(logprobs), top_logprobs=int(top_logprobs),
            grammar=grammar,
        )
        rid = request_id if request_id is not None else f"req-{next(_ids)}"
        sub = Submit(request_id=rid, prompt_ids=tuple(ids), params=params, session_id=session_id)
        return RequestStream(self, sub, on_chunk)

    def _specdec_choice(self, mode, policy):
        """(mode value or None, policy or None) for a request; "default" = the runtime's configured mode."""
        from mach_runtime.engine.specdec import BlockSpecDecEngineMode
        from mach_runtime.engine.specdec.config import POLICIES

        if mode == "default":
            mode = self._spec.config.mode.value if self._spec is not None else None
        if mode is None:
            return None, None
        try:
            mode = BlockSpecDecEngineMode(getattr(mode, "value", mode)).value
        except ValueError:
            names = ", ".join(m.value for m in BlockSpecDecEngineMode)
            raise RequestError(f"specdec: unknown mode {mode!r}; use one of {names}") from None
        if mode != "target_only" and self._spec is None:
            raise RequestError(f"specdec={mode!r} needs a runtime opened with draft= or specdec=")
        if mode == "native_v7" and self._spec.draft is None:
            raise RequestError("specdec='native_v7' needs a DFlash draft: open the runtime with draft=")
        if policy is not None and policy not in POLICIES:
            raise RequestError(f"specdec_policy: unknown policy {policy!r}; use one of {', '.join(POLICIES)}")
        return mode, policy

    def stream(self, prompt, **params) -> RequestStream:
        """Streams the completion of ``prompt`` (text, chat messages, or token ids) as ``Chunk``s."""
        return self._stream_ids(self._encode(prompt), **params)

    async def generate(self, prompt, **params) -> Completion:
        """The whole completion at once."""
        parts = []
        async with self.stream(prompt, **params) as s:
            async for chunk in s:
                parts.append(chunk)
        last = parts[-1]
        return Completion(request_id=last.request_id, text="".join(c.text for c in parts),
                          token_ids=tuple(t for c in parts for t in c.token_ids), finish_reason=last.finish_reason,
                          usage=last.usage)

    def session(self, system: str | None = None, session_id: str | None = None) -> Session:
        return Session(self, system, session_id or f"session-{next(_ids)}")

    async def abort(self, request_id: str) -> None:
        """Aborts a live request; raises ``UnknownRequestError`` for an id that is not live."""
        self._sup.abort(request_id)

    async def stats(self) -> RuntimeStats:
        sup = self._sup
        experts = await sup.expert_store.ask(StatsRequest()) if not sup.closed else sup.store.stats()
        cache = await sup.cache.ask(StatsRequest()) if not sup.closed else None
        return RuntimeStats(
            decoder=sup.decoder.stats(), experts=experts, sessions=cache.sessions if cache else 0,
            live_requests=len(sup.ledger), decoder_restarts=sup.restarts["decoder"],
            expert_store_restarts=sup.restarts["expert_store"],
            prefetch={"prefetched": getattr(experts, "prefetched", 0), "used": getattr(experts, "prefetch_used", 0)},
            specdec=self._spec.stats() if self._spec is not None else None,
            specdec_batch=self._spec_batch.stats() if self._spec_batch is not None else None,
        )


def _on_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.gpu


def _spec_engine(model, tokenizer, store, draft, config):
    """The BlockSpecDecEngine sharing the runtime's model (built on the MLX thread)."""
    from mach_runtime.engine.specdec import BlockSpecDecEngine, BlockSpecDecEngineConfig, BlockSpecDecEngineMode
    from mach_runtime.engine.specdec.draft import load_dflash_draft

    if config is None:
        config = BlockSpecDecEngineConfig(mode=BlockSpecDecEngineMode.NATIVE_V7)
    draft_model = load_dflash_draft(draft) if draft is not None else None
    return BlockSpecDecEngine(model, tokenizer, draft_model, config=config, store=store)


def _spec_batch(model, tokenizer, store, spec, n: int):
    """The BatchedSpecDecoder sharing the runtime's model, draft and speculative config (only where the family's
    capabilities allow ``spec_batch``)."""
    from mach_runtime.engine.specdec.batched import BatchedSpecDecoder

    return BatchedSpecDecoder(model, tokenizer, spec.draft, config=spec.config, store=store, max_batch=n,
                              target=spec.target)
