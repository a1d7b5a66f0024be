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
import inspect
import itertools
import os
import secrets
from dataclasses import dataclass

import anyio
import msgspec

from mach_runtime.errors import ConfigError, RequestError

from . import runtime_parts as _build
from .gc_scope import gc_freeze, gc_unfreeze
from .messages import CacheLookup, RuntimeStats, StatsRequest, Submit
from .request_schema import check_messages, check_open, check_request, check_token_ids, prompt_kind
from .session import Session
from .slot import Chunk, Completion
from .decoder import MLXThread
from .supervisor import Supervisor

_ids = itertools.count(1)


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
        if sub.session_id is not None or self._rt._sup.prefix.shared:  # the longest cached prefix, L1 or L2
            # shielded: the Cache actor hands the KV over with its reply, which must not be lost to a
            # cancellation (the handle would leak); a pending cancellation strikes at the next await, and the
            # abort that follows frees the KV with the request
            with anyio.CancelScope(shield=True):
                reply = await self._rt._sup.cache.ask(CacheLookup(sub.session_id, sub.prompt_ids))
            if reply.handle is not None:
                sub = msgspec.structs.replace(sub, cache_handle=reply.handle, cached_tokens=reply.cached_tokens)
                try:
                    self._slot = self._rt._sup.submit(sub)
                except BaseException:
                    self._rt._sup.kv_table.drop(reply.handle)
                    raise
                return
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


@dataclass
class _Limits:
    max_context: int | None
    vocab_size: int | None  # token ids a request may use: the tokenizer's and the embedding's, whichever is fewer


class Runtime:
    def __init__(self, sup: Supervisor, tokenizer, limits: _Limits, spec=None, spec_batch=None):
        self._sup = sup
        self.tokenizer = tokenizer
        self._limits = limits
        self._spec = spec
        self._spec_batch = spec_batch
        self._final_stats: RuntimeStats | None = None  # set at close

    # -- lifecycle -----------------------------------------------------------------------------------------
    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, checkpoint=None, *, draft=None, specdec=None, expert_residency=None, expert_cache_gb=None,
                   prefix_cache=None, prefix_cache_gb=None, prefix_cache_dir=None, disk_kv_budget_gb=None,
                   prefix_block_size=None, prefix_cache_max_entries=None, kv_bits=None, kv_group_size=64,
                   quantized_kv_start=5000, max_kv_size=None,
                   max_batch: int = 8, max_sessions: int = 64, fault_hook=None, restart_intensity: int = 3,
                   restart_period: float = 60.0, predictor=None, warmup=None, spec_batch: int = 0,
                   prefill_chunk: int = 512, distributed=False, **load_kwargs):
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
        prefix_cache (default on; env MACH_PREFIX_CACHE): reuse the KV of any earlier request's longest common
            prefix (block-hashed, ``prefix_block_size`` tokens per block, default 256) from RAM (L1,
            ``prefix_cache_gb``, default 2, and ``prefix_cache_max_entries``) and, with ``prefix_cache_dir``, from
            disk (L2 ``DiskKVCache``, ``disk_kv_budget_gb``, default 20; shared safely between processes). Off:
            only a session's own earlier turns are reused. ``warm_prefix`` fills it ahead of traffic.
        max_kv_size: bound every full-attention layer's KV to this many tokens (a rotating window, keep=0), for live
            requests and snapshots alike.
        kv_bits / kv_group_size / quantized_kv_start: quantized attention KV with mlx-lm's ``generate`` semantics
            (bits 2-8, group 32/64/128, default 64; a request's KV is quantized once it holds quantized_kv_start
            tokens, default 5000, mlx-lm's), in the batch and solo speculative lanes, in snapshots (L1/L2 store the
            quantized arrays) and salted into the prefix cache's identity. A batch converts as a whole when its
            longest row reaches the start (``engine/quantized_kv.py``). ConfigError (naming kv_bits) for
            sliding-window and compressed caches (gpt_oss, gemma4, deepseek_v4), with max_kv_size, and with
            spec_batch (batched speculative rollback handles plain KV rows only).
        warmup: run the speculative engine once before serving (``BlockSpecDecEngine.warmup``: on a GPU backend
            the first draft + verify compile kernels for about a minute). Default: on a GPU, not on the CPU.
        max_sessions: session KV caches kept (least recently used beyond that are dropped; 0 keeps none);
        restart_intensity / restart_period: an actor is restarted at most that many times within that many
            seconds before the runtime gives up (``RuntimeFailedError``).

        distributed: True or a dict (docs/distributed.md) under ``mlx.launch``: rank 0 serves; ranks > 0 follow its
            steps, never enter the ``async with`` body and exit (SystemExit(0)) when rank 0 closes.

        Every argument is checked before anything loads (``request_schema.check_open``: ``ConfigError``).
        After loading, the process's garbage collector is collected once and frozen (``gc.freeze()``); the last
        open runtime to close unfreezes it, so a closed runtime is collectable. Closing releases the
        model, every KV cache and the bank, and parks the MLX thread for the next runtime to reuse.
        """
        from mach_runtime.io.arch_registry import adapter_for_config, read_config
        from mach_runtime.engine.kv_layout import apply_kv_layout, check_kv_bits
        from mach_runtime.io.load import load_moe

        check_open(checkpoint=checkpoint, draft=draft, specdec=specdec, expert_residency=expert_residency,
                   expert_cache_gb=expert_cache_gb, prefix_cache_dir=prefix_cache_dir, max_batch=max_batch,
                   max_sessions=max_sessions, fault_hook=fault_hook, restart_intensity=restart_intensity,
                   restart_period=restart_period, predictor=predictor, warmup=warmup, spec_batch=spec_batch,
                   prefill_chunk=prefill_chunk)
        passed_on = set(inspect.signature(load_moe).parameters) - {"path", "expert_residency", "expert_cache_gb",
                                                                    "speculative"}
        passed_on.add("revision")  # of a repository id in the Hugging Face cache
        unknown = sorted(set(load_kwargs) - passed_on)
        if unknown:
            raise ConfigError(f"unknown Runtime.open argument(s) {unknown}; besides its own it takes load_moe's: "
                              f"{', '.join(sorted(passed_on))}")
        from mach_runtime.config import resolve_prefix_config

        pconf = resolve_prefix_config(prefix_cache, prefix_cache_gb, prefix_cache_dir, disk_kv_budget_gb,
                                      prefix_block_size, prefix_cache_max_entries)
        if checkpoint is None:
            from mach_runtime.assets import default_checkpoint

            checkpoint = default_checkpoint()
        else:  # a local directory or a repository id in the Hugging Face cache (mlx-lm's resolution, offline)
            from mach_runtime.io.hf_cache import resolve_checkpoint

            checkpoint = resolve_checkpoint(checkpoint, load_kwargs.pop("revision", None))
        check_kv_bits("standard", kv_bits, kv_group_size, quantized_kv_start, None, None)  # values, before loading
        mlx = MLXThread.acquire()
        store = sup = rt = dist = None
        froze = False
        try:
            if distributed is not False and distributed is not None:  # {}: distributed, every setting default
                from .distributed import Distributed

                dist = await mlx.call(lambda: Distributed(distributed, checkpoint))
                dist.follow_signals()  # a follower's SIGTERM / SIGINT: rank 0 drains and ends the group
                load_kwargs["shard"], pconf, restart_intensity = dist.plan, _build.no_prefix(pconf), 0
                specdec = dist.specdec(specdec, draft)  # one every rank can follow: no collective in a compiled graph
            # with a draft or a speculative config, the engines' hooks go on at load (engine/hooks.py); building the
            # engines below changes nothing on the model
            plan = _build.hook_plan(draft, specdec) if draft is not None or specdec is not None else None
            model, tokenizer, store, _cache = await mlx.call(lambda: load_moe(
                checkpoint, expert_residency=expert_residency, expert_cache_gb=expert_cache_gb, speculative=plan,
                **load_kwargs))
            if dist is not None:
                specdec = await mlx.call(lambda: dist.after_load(model, store, specdec, draft))
            config = read_config(os.fspath(checkpoint))
            adapter = adapter_for_config(config)
            caps = adapter.capabilities()  # what the family can do: batching, speculative rollback (the table)
            tc = adapter.text_config(config)
            layout = await mlx.call(lambda: apply_kv_layout(
                model, adapter.kv_cache_kind, max_kv_size=max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size,
                quantized_kv_start=quantized_kv_start, text_config=tc))
            spec = batched = None
            if draft is not None or specdec is not None:
                spec = await mlx.call(lambda: _build.spec_engine(model, tokenizer, store, draft, specdec))
                if spec_batch >= 2 and caps.batch and caps.spec_batch:
                    batched = await mlx.call(lambda: _build.spec_batch(model, tokenizer, store, spec, spec_batch))
                if warmup or (warmup is None and await mlx.call(_build.on_gpu)):
                    await mlx.call(spec.warmup)
                    if batched is not None:
                        await mlx.call(batched.warmup)
            if dist is not None and not dist.leader:  # follow rank 0's steps until it shuts down, then end
                await mlx.call(lambda: _build.follow(dist, model, tokenizer, caps, max_batch, spec, batched,
                                                     prefill_chunk))
                raise SystemExit(0)
            limits = _Limits(tc.get("max_position_embeddings"), _build.vocab_size(tokenizer, tc))
            prefix = _build.prefix_cache(pconf, checkpoint, draft, layout)
            sup = Supervisor(mlx, model, tokenizer, store, max_batch=max_batch, max_sessions=max_sessions,
                             fault_hook=fault_hook, intensity=restart_intensity, period=restart_period,
                             predictor=predictor, spec=spec, spec_batch=batched, caps=caps,
                             prefill_chunk=prefill_chunk, prefix=prefix,
                             step_sync=dist.sync if dist is not None else None)
            del model, spec, batched, _cache  # from here on the Supervisor owns them (and drops them at close)
            gc_freeze()  # (actors/gc_scope.py) undone by the last open runtime's close
            froze = True
            try:
                async with anyio.create_task_group() as tg:
                    await sup.start(tg)
                    try:
                        rt = cls(sup, tokenizer, limits, sup.spec, sup.spec_batch)
                        yield rt
                    finally:
                        with anyio.CancelScope(shield=True):
                            await sup.shutdown()
                        tg.cancel_scope.cancel()
            except BaseExceptionGroup as group:  # the caller's own exception, not a group of one
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise
        finally:
            with anyio.CancelScope(shield=True):
                if rt is not None:
                    rt._final_stats = rt._snapshot(closed=True)
                    rt._spec = rt._spec_batch = None
                if froze:
                    gc_unfreeze()
                idle = sup is None or sup.mlx_idle  # a Decoder stuck in a step (past shutdown's wait) keeps it
                try:
                    if sup is not None and idle:  # the model, KV caches, engines: dropped on the MLX thread
                        await mlx.call(sup.release)
                finally:
                    if store is not None:
                        store.close()
                    if dist is not None:
                        dist.close()
                    store = None
                    mlx.release(idle=idle)

    # -- requests ------------------------------------------------------------------------------------------
    def _encode(self, prompt) -> list[int]:
        """Token ids of a checked prompt (``request_schema``: text, chat messages or in-vocabulary token ids)."""
        tok = self.tokenizer
        kind = prompt_kind(prompt)
        if kind == "text":
            return tok.encode(prompt)
        if kind == "tokens":
            return list(check_token_ids("prompt", prompt, self._limits.vocab_size))
        messages = check_messages(prompt)
        try:
            return list(tok.apply_chat_template(messages, add_generation_prompt=True))
        except Exception as e:  # the template's own checks (e.g. roles that must alternate)
            raise RequestError(f"messages: the chat template rejected them ({type(e).__name__}: {e})") from None

    def _stream_ids(self, ids, *, session_id=None, on_chunk=None, **params) -> RequestStream:
        """See ``stream``; ``params`` are checked by ``request_schema.check_request``. Sampling extras: ``min_p``;
        OpenAI ``presence_penalty`` / ``frequency_penalty`` over the generated tokens; ``logprobs`` (+
        ``top_logprobs`` alternatives) on each chunk; ``grammar``: an llguidance grammar string
        (``mach_runtime.engine.constraints.json_schema_grammar(schema)`` / ``lark_grammar``) every token must
        follow; ``logits_processors``: ``fn(tokens, logits) -> logits`` hooks. Requests using any of these decode
        in the target-only batch (the speculative lanes do not implement them), exactly against the
        (constrained) target."""
        self._sup.check_open()
        default = self._spec.config.mode.value if self._spec is not None else None
        req = check_request(params, self._limits.vocab_size, specdec=default)  # before anything is queued
        p = req.params
        if not ids:
            raise RequestError("the prompt is empty: give at least one token")
        if p.grammar is not None:
            from mach_runtime.engine.constraints import check_grammar

            check_grammar(p.grammar, self.tokenizer)
        ctx = self._limits.max_context
        if ctx is not None and len(ids) + p.max_tokens > ctx:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({p.max_tokens}) exceeds the model's context of {ctx} "
                "tokens; shorten the prompt or lower max_tokens"
            )
        self._check_specdec(p.specdec, p.specdec_policy)
        # the seed is drawn here when not given, so a replay after a crash samples the same tokens
        p = msgspec.structs.replace(p, seed=p.seed if p.seed is not None else secrets.randbits(62),
                                    specdec_policy=p.specdec_policy if p.specdec is not None else None)
        rid = req.request_id if req.request_id is not None else f"req-{next(_ids)}"
        sub = Submit(request_id=rid, prompt_ids=tuple(ids), params=p, session_id=session_id)
        return RequestStream(self, sub, on_chunk)

    def _check_specdec(self, mode, policy) -> None:
        """A request's speculative mode and policy (``check_request`` resolved "default") fit this runtime."""
        from mach_runtime.engine.specdec import BlockSpecDecEngineMode
        from mach_runtime.engine.specdec.config import POLICIES

        if mode is None:
            return
        try:
            BlockSpecDecEngineMode(mode)
        except ValueError:
            names = ", ".join(m.value for m in BlockSpecDecEngineMode)
            raise RequestError(f"specdec: unknown mode {mode!r}; use one of {names}") from None
        if mode != "target_only" and self._spec is None:
            raise RequestError(f"specdec={mode!r} needs a runtime opened with draft= or specdec=")
        if mode == "native_v7" and self._spec.draft is None:
            raise RequestError("specdec='native_v7' needs a DFlash draft: open the runtime with draft=")
        if policy is not None and policy not in POLICIES:
            raise RequestError(f"specdec_policy: unknown policy {policy!r}; use one of {', '.join(POLICIES)}")

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
        if system is not None and not isinstance(system, str):
            raise RequestError(f"system must be a string or None, got {type(system).__name__}")
        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise RequestError(f"session_id must be a non-empty string or None, got {session_id!r}")
        return Session(self, system, session_id or f"session-{next(_ids)}")

    async def warm_prefix(self, prompt) -> dict:
        """Prefills ``prompt`` (text, token ids, or chat messages: rendered without a generation prompt, so a
        later conversation that starts with them shares the prefix) and stores its KV with the last logits in the
        prefix cache (L1, and L2 when configured). Returns the usage: prompt_tokens, cached_tokens (already
        cached), prefilled_tokens."""
        if not self._sup.prefix.shared:
            raise ConfigError("warm_prefix needs the prefix cache: this runtime was opened with prefix_cache=False")
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            self._encode(prompt)  # validates the messages
            ids = list(self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=False))
        else:
            ids = self._encode(prompt)
        stream = self._stream_ids(ids, max_tokens=1)
        stream._submit = msgspec.structs.replace(stream._submit, warm=True)
        last = None
        async with stream as s:
            async for chunk in s:
                last = chunk
        return dict(last.usage) if last is not None and last.usage else {}

    async def abort(self, request_id: str) -> None:
        """Aborts a live request; raises ``UnknownRequestError`` for an id that is not live."""
        if not isinstance(request_id, str):
            raise RequestError(f"request_id must be a string, got {type(request_id).__name__}")
        self._sup.abort(request_id)

    async def stats(self) -> RuntimeStats:
        """Counters of every actor; after close, the final counters with ``closed=True`` and nothing live."""
        if self._final_stats is not None:
            return self._final_stats
        sup = self._sup
        if sup.closed:  # failed (past the restart limit) or closing
            return self._snapshot(closed=True)
        experts = await sup.expert_store.ask(StatsRequest())
        cache = await sup.cache.ask(StatsRequest())
        return self._snapshot(experts=experts, cache=cache)

    def _snapshot(self, *, closed: bool = False, experts=None, cache=None) -> RuntimeStats:
        sup = self._sup
        if experts is None:
            experts = sup.store.stats() if sup.store is not None else None
        dec = sup.decoder.stats()
        if closed:  # nothing runs in a closed runtime, whatever its last Decoder held
            dec = msgspec.structs.replace(dec, active=0, queued=0)
        return RuntimeStats(
            decoder=dec, experts=experts, sessions=cache.sessions if cache is not None else 0,
            live_requests=0 if closed else len(sup.ledger), decoder_restarts=sup.restarts["decoder"],
            expert_store_restarts=sup.restarts["expert_store"], cache_restarts=sup.restarts["cache"],
            restarts=dict(sup.restarts), closed=closed,
            prefetch={"prefetched": getattr(experts, "prefetched", 0), "used": getattr(experts, "prefetch_used", 0)},
            specdec=self._spec.stats() if self._spec is not None else None,
            specdec_batch=self._spec_batch.stats() if self._spec_batch is not None else None,
            prefix_cache=cache.prefix if cache is not None else sup.prefix.stats(),
        )
