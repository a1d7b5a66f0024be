"""The Supervisor: starts, watches and restarts the actors, and owns the request ledger.

Start order is ExpertStore, Cache, then Decoder (the Decoder's first forward may need the bank). Strategy is
one_for_one: a crashed actor is rebuilt alone, at most ``intensity`` times within ``period`` seconds (Erlang
semantics); past that the Supervisor shuts everything down and fails every live request with
``RuntimeFailedError``.

The ledger (request id → prompt, params, tokens already delivered, output slot, emitter) lives here, not in the
Decoder, so a Decoder crash loses nothing: the restarted Decoder re-admits every live request as prompt +
delivered tokens, and generation continues at the next position. Delivery is keyed by (request id, position), so
no token is delivered twice. The Decoder sends token ids; each entry's ``engine.emit.Emitter`` detokenizes them
and checks stop strings (a stop string ends the request: the Decoder is told with ``Abort(reason="stop")``).
An abort is recorded here the moment it is asked for: the stream ends at once and no restart re-admits it. A
request that failed by a fault of its own (``RequestFailed``) leaves the ledger and is never re-admitted.
``fault_hook(actor, point, info)`` is called by the actors at fixed points; tests raise from it to crash an actor
exactly there (or, at the Decoder's "admit", to fail one request).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import anyio

from mach_runtime.engine.emit import Emitter
from mach_runtime.errors import DistributedError, RequestError, RuntimeFailedError, UnknownRequestError

from .cache import CacheActor, KVTable
from .decoder import Decoder, MLXThread
from .expert_store import ExpertStoreActor
from .messages import Abort, CacheFlush, Finish, Shutdown, Submit, TokenOutput
from .slot import OutputSlot, call_soon, loop_token, wake


@dataclass
class LedgerEntry:
    submit: Submit
    slot: OutputSlot
    emitter: Emitter
    delivered: list[int] = field(default_factory=list)
    ending: str | None = None  # the emitter ended it ("stop" / "length"); the Decoder's Finish brings the usage


class Supervisor:
    def __init__(self, mlx: MLXThread, model, tokenizer, store, *, max_batch: int = 8, max_sessions: int = 64,
                 fault_hook=None, intensity: int = 3, period: float = 60.0, predictor=None, spec=None,
                 spec_batch=None, caps=None, prefill_chunk: int | None = None, prefix=None, step_sync=None):
        self.mlx = mlx
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.max_batch = max_batch
        self.fault_hook = fault_hook
        self.intensity, self.period = intensity, period
        self.predictor = predictor
        self.spec = spec  # BlockSpecDecEngine (MLX-thread object, shared by every Decoder incarnation) or None
        self.spec_batch = spec_batch  # BatchedSpecDecoder, likewise shared (each Decoder clears it first), or None
        self.caps = caps  # the family's Capabilities (io.arch_registry)
        self.prefill_chunk = prefill_chunk
        self.kv_table = KVTable()
        if prefix is None:  # sessions only (prefix_cache=False): a private L1, no disk
            from mach_runtime.engine.prefix_cache import PrefixCache

            prefix = PrefixCache(b"", shared=False)
        self.prefix = prefix  # PrefixCache: L1 (+ L2); outlives Cache actor restarts
        self.max_sessions = max_sessions
        self.ledger: dict[str, LedgerEntry] = {}
        self._lock = threading.Lock()  # ledger: the MLX thread delivers, the event loop submits/aborts
        self._crashes: dict[str, deque] = {}
        self.restarts = {"decoder": 0, "expert_store": 0, "cache": 0}
        self.failed: BaseException | None = None
        self.closed = False
        self.mlx_idle = True  # after shutdown: whether the MLX thread left the decoder loop in time
        self.decoder: Decoder | None = None
        self.expert_store: ExpertStoreActor | None = None
        self.cache: CacheActor | None = None
        self.step_sync = step_sync  # distributed runtime (rank 0): the Decoder broadcasts its steps
        if step_sync is not None:
            step_sync.on_lost = self._lost

    # -- start / watch -------------------------------------------------------------------------------------
    async def start(self, tg) -> None:
        self._token = loop_token()
        self._exits_send, self._exits_recv = anyio.create_memory_object_stream(16)
        self._tg = tg
        await tg.start(self._supervise_async, "expert_store", self._new_expert_store)
        await tg.start(self._supervise_async, "cache", self._new_cache)
        self._start_decoder()
        tg.start_soon(self._watch_decoder)

    def _new_expert_store(self):
        old = self.expert_store
        self.expert_store = ExpertStoreActor(self.store, self.predictor)
        self.expert_store.fault_hook = self.fault_hook
        if old is not None:  # keep the mailbox: senders hold on to it through the Supervisor
            self.expert_store.adopt_mailbox(old)
        return self.expert_store

    def _new_cache(self):
        old = self.cache
        self.cache = CacheActor(self.kv_table, self.prefix, self.max_sessions)
        self.cache.fault_hook = self.fault_hook
        if old is not None:  # a crashed Cache actor's sessions are gone: free their KV; keep the mailbox
            old.close()
            self.cache.adopt_mailbox(old)
        return self.cache

    def _allow_restart(self, name: str) -> bool:
        now = time.monotonic()
        q = self._crashes.setdefault(name, deque())
        q.append(now)
        while q and now - q[0] > self.period:
            q.popleft()
        return len(q) <= self.intensity

    async def _supervise_async(self, name, factory, *, task_status=anyio.TASK_STATUS_IGNORED):
        """one_for_one for an event-loop actor: rebuild it after a crash, within the restart limit."""
        actor = factory()
        task_status.started()
        while True:
            try:
                await actor.run()
                return  # mailbox closed: normal shutdown
            except Exception as e:  # crash: restart alone, or give up past the limit
                if self.closed:
                    return
                if not self._allow_restart(name):
                    self._give_up(name, e)
                    return
                self.restarts[name] += 1
                actor = factory()

    def _start_decoder(self) -> None:
        d = Decoder(
            self.model, self.tokenizer, max_batch=self.max_batch, sink=self.deliver, kv_table=self.kv_table,
            cache_inbox=None if self.step_sync is not None else (
                lambda m, then=None: call_soon(self._token, self._to_cache, m, then)),
            expert_inbox=lambda m: call_soon(self._token, self.expert_store.deliver, m),
            routing_source=self.expert_store.routing_source, fault_hook=self.fault_hook, spec=self.spec,
            spec_batch=self.spec_batch, caps=self.caps, prefill_chunk=self.prefill_chunk,
            prefix_min_tokens=self.prefix.block_size if self.prefix.shared else None, step_sync=self.step_sync,
        )
        if self.decoder is not None:  # statistics survive a restart
            d.adopt_stats(self.decoder)
        self.decoder = d

        def exited(result, error, d=d):
            call_soon(self._token, self._exits_send.send_nowait, (d, error))

        self.mlx.submit(d.run, exited)

    def _to_cache(self, msg, then=None) -> None:
        """On the event loop: hand ``msg`` to the Cache actor, then run ``then`` (ordered after it)."""
        self.cache.deliver(msg)
        if then is not None:
            then()

    async def _watch_decoder(self) -> None:
        async for d, error in self._exits_recv:
            if d is not self.decoder or self.closed:
                continue
            if error is None:  # clean shutdown
                return
            if not self._allow_restart("decoder"):
                self._give_up("decoder", error)
                return
            self.restarts["decoder"] += 1
            self._drop_orphaned_kv(d)
            self._start_decoder()
            with self._lock:
                live = [e for e in self.ledger.values() if e.ending is None]
                ended = [self.ledger.pop(k) for k, e in list(self.ledger.items()) if e.ending is not None]
            wake(self._token, [self._end(e, e.ending, 0, 0) for e in ended])  # they had ended already
            for e in live:  # re-admit: prompt + what the client already has; fresh KV (no session reuse)
                s = e.submit
                if s.cache_handle is not None:  # the session KV it was admitted with: not reused, so freed
                    self.kv_table.drop(s.cache_handle)
                self.decoder.send(Submit(request_id=s.request_id, prompt_ids=s.prompt_ids, params=s.params,
                                         resume_ids=tuple(e.delivered), session_id=s.session_id, warm=s.warm))

    def _drop_orphaned_kv(self, dead: Decoder) -> None:
        """KV handles of Submits a crashed Decoder never took from its mailbox: freed (the ledger re-admits them)."""
        subs = []
        while True:
            try:
                subs.append(dead.mailbox.get_nowait())
            except Exception:  # queue.Empty
                break
        for m in subs:
            if isinstance(m, Submit) and m.cache_handle is not None:
                self.kv_table.drop(m.cache_handle)

    def _give_up(self, name: str, error: BaseException) -> None:
        self.failed = error if isinstance(error, DistributedError) else RuntimeFailedError(
            f"the {name} actor crashed more than {self.intensity} times in {self.period:g}s "
            f"(last error: {type(error).__name__}: {error}); the runtime has shut down"
        )
        self.closed = True
        if self.decoder is not None:
            self.decoder.send(Shutdown())
        self._fail_all(self.failed)

    def _lost(self, error: DistributedError) -> None:
        """Distributed runtime (any thread): a rank is gone; every request in flight fails with ``error`` now."""
        if self.failed is None:
            self.failed = error
        self.closed = True
        self._fail_all(error)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            entries = list(self.ledger.values())
            self.ledger.clear()
        wake(self._token, [e.slot.fail(error) for e in entries])

    # -- requests ------------------------------------------------------------------------------------------
    def check_open(self) -> None:
        if self.failed is not None:
            raise self.failed
        if self.closed:
            raise RuntimeFailedError("the runtime is closed")

    def submit(self, sub: Submit) -> OutputSlot:
        self.check_open()
        slot = OutputSlot(sub.request_id)
        with self._lock:
            if sub.request_id in self.ledger:
                raise RequestError(f"request_id {sub.request_id!r} is already in use by a live request")
            self.ledger[sub.request_id] = LedgerEntry(sub, slot, Emitter(self.tokenizer, sub.params))
        self.decoder.send(sub)
        return slot

    def abort(self, request_id: str, *, missing_ok: bool = False) -> None:
        """Records the abort (the stream ends now; no restart re-admits the request), then tells the Decoder."""
        with self._lock:
            e = self.ledger.pop(request_id, None)
        if e is None:
            if missing_ok:
                return
            raise UnknownRequestError(f"no live request with id {request_id!r} (finished, aborted or never submitted)")
        wake(self._token, [self._end(e, e.ending or "abort", 0, 0)])
        if self.decoder is not None and not self.closed:
            self.decoder.send(Abort(request_id))

    def deliver(self, msgs) -> None:
        """Output from the Decoder (MLX thread; one message or a step's list): into the ledger and the
        requests' slots, never blocking; one wake-up call onto the event loop for all of them."""
        if not isinstance(msgs, list):
            msgs = [msgs]
        wake(self._token, [self._apply(m) for m in msgs])

    def _apply(self, msg):
        stop = False
        with self._lock:
            e = self.ledger.get(msg.request_id)
            if e is None:
                return None  # already finished, aborted or failed
            if isinstance(msg, TokenOutput):
                if e.ending is not None:
                    return None  # ended by the emitter: the Decoder's Finish is on its way
                skip = len(e.delivered) - msg.index  # replayed positions: the client has them already
                if skip < 0:
                    raise RuntimeError(f"token for {msg.request_id} at {msg.index}, expected {len(e.delivered)}")
                new = msg.token_ids[skip:]
                if not new:
                    return None
                text, finish, kept = e.emitter.push(new)
                e.delivered.extend(new[:kept])
                if finish is not None:
                    e.ending = finish
                    stop = True  # the Decoder may not know (a stop string): tell it
                lps = msg.logprobs[skip : skip + kept] if msg.logprobs is not None else None
                event = e.slot.push(new[:kept], text, lps)
            else:
                del self.ledger[msg.request_id]
        if isinstance(msg, TokenOutput):
            if stop and self.decoder is not None:
                self.decoder.send(Abort(msg.request_id, reason="stop"))
            return event
        if isinstance(msg, Finish):
            return self._end(e, e.ending or msg.reason, msg.cached_tokens, msg.prefilled_tokens)
        return e.slot.fail(msg.exception())  # RequestFailed: its own fault (of the type it raised), never re-admitted

    @staticmethod
    def _end(e: LedgerEntry, reason: str, cached: int, prefilled: int):
        """Finishes an entry's slot (it has left the ledger): the text still held back, then the usage."""
        text = e.emitter.close(reason)
        pushed = e.slot.push((), text) if text else None  # (the consumer's wake-up event, taken by the push)
        usage = {"prompt_tokens": len(e.submit.prompt_ids), "completion_tokens": len(e.delivered),
                 "cached_tokens": cached, "prefilled_tokens": prefilled}
        finished = e.slot.finish(reason, usage, e.emitter.stop_sequence)
        return pushed or finished

    # -- shutdown ------------------------------------------------------------------------------------------
    async def shutdown(self) -> None:
        if not self.closed:
            self.closed = True
            if self.decoder is not None:
                self.decoder.send(Shutdown())
        with anyio.move_on_after(30):
            done = anyio.Event()
            self.mlx.submit(lambda: None, lambda r, e: call_soon(self._token, done.set))
            await done.wait()  # the MLX thread has left the decoder loop
        self.mlx_idle = done.is_set()
        self._fail_all(self.failed or RuntimeFailedError("the runtime was closed before the request finished"))
        if self.cache is not None and self.prefix.disk is not None:  # L1 snapshots not on disk yet: write them
            with anyio.move_on_after(60), contextlib.suppress(RuntimeFailedError):
                await self.cache.ask(CacheFlush())
        if self.cache is not None:
            self.cache.close()
        self.kv_table.clear()  # whatever KV is left (sessions, handed-over prefixes) dies with the runtime
        self._exits_send.close()
        for actor in (self.expert_store, self.cache):
            if actor is not None:
                actor.close_mailbox()

    def release(self) -> None:
        """After shutdown, on the MLX thread: drops the model, the engines and every KV cache, so a closed
        runtime that its caller still names holds no memory (its counters stay for ``stats()``)."""
        if self.decoder is not None:
            self.decoder.release()
        if self.spec_batch is not None:
            self.spec_batch.clear()
        self.kv_table.clear()
        self.kv_table.collect()
        self.model = self.spec = self.spec_batch = self.predictor = None
