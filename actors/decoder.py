"""The Decoder actor: mailbox and outbox on the one MLX thread around ``engine/scheduler.py``, and that thread.

Its mailbox is a thread-safe queue (the loop lives on the MLX thread, not on the event loop): the async side
drops ``Submit`` / ``Abort`` / ``Shutdown`` messages in without blocking. Each iteration drains the mailbox into
the scheduler, runs one scheduler step (admissions, one prefill chunk, one decode step of the running lane: see
the scheduler's module doc) and turns its events into messages for ``sink`` (the Supervisor's ledger, which
detokenizes and fills the requests' output slots). The previous step's outputs are delivered while the next
step runs on the device.

A request's own fault (its admission, prefill or step) fails it alone (``RequestFailed``); any other exception
ends the loop and ``on_exit`` tells the Supervisor, which re-admits every live request on a fresh Decoder.
``fault_hook(actor, point, info)`` is called at "admit" (with the request id: raising there fails that request)
and after every "step" (raising there crashes the Decoder). Session KV caches go to the Cache actor's table as
opaque handles.

The MLX thread (``MLXThread``, owned by the Decoder: its loop is the thread's long job). MLX is not thread-safe and
its streams are thread-local, so every ``mx`` call of the process runs on one long-lived thread: the model is
loaded there and the Decoder's loop runs there. Async code hands it work with ``await mlx.call(fn)``; the thread
answers by scheduling a callback on the caller's event loop (``slot.call_soon``: asyncio and trio alike). anyio's
worker-thread pool is never used for MLX. A runtime takes its MLX thread with ``MLXThread.acquire()`` and hands it
back with ``release()`` when it closes: the thread then waits, idle, for the next runtime of the process. Ending
it instead would leak an OS thread per open/close: MLX (0.32.4) starts a worker thread for every stream a thread
uses, and ``mx.clear_streams()`` does not end it (measured: each short-lived thread that evaluates one op leaves
one OS thread behind). Reusing the thread reuses its streams, so a process that opens and closes runtimes in a
loop keeps a flat thread count; at most as many MLX threads exist as runtimes were ever open at once. Idle threads
release their streams at exit.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time

import anyio

from mach_runtime.backend.mlx_streams import release_streams
from mach_runtime.engine.prefix_saver import PrefixSaver
from mach_runtime.engine.scheduler import Scheduler

from .decoder_prefix import DecoderPrefixCache, exact_only
from .messages import (
    Abort,
    DecoderStats,
    Finish,
    RequestFailed,
    Shutdown,
    StepRouting,
    Submit,
    TokenOutput,
)
from .slot import call_soon, loop_token

# a wave's stragglers (``Decoder._take``): waiting is worth a fraction of a decode step (an H200 steps the demo in
# ~6 ms, 2 loaded CPU cores in 100-400 ms while their event loop parses a request in several ms)
GATHER_QUIET = (0.002, 0.1, 0.01)  # (at least s, fraction of the last step, at most s) the mailbox stays quiet
GATHER_MAX = (0.005, 0.5, 0.05)  # (at least s, fraction of the last step, at most s) in all


class Decoder(DecoderPrefixCache):
    name = "decoder"

    def __init__(self, model, tokenizer, *, max_batch: int, sink, kv_table, caps, cache_inbox=None,
                 expert_inbox=None, fault_hook=None, routing_source=None, spec=None, spec_batch=None,
                 prefill_chunk: int | None = None, prefix_min_tokens: int | None = None, step_sync=None):
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.caps = caps
        self.sink = sink  # callable(OutputMessage or list of them), thread-safe
        self.kv_table = kv_table
        self.cache_inbox = cache_inbox  # callable(msg, then=None): deliver to the Cache actor, then call then()
        self.expert_inbox = expert_inbox  # callable(msg): deliver to the ExpertStore actor (thread-safe)
        self.fault_hook = fault_hook
        self.routing_source = routing_source  # callable() -> per-bank experts of the last step, or None
        self.mailbox: queue.SimpleQueue = queue.SimpleQueue()
        self.step_sync = step_sync  # distributed runtime: every rank takes rank 0's steps (actors/distributed.py)
        self._step_s = 0.0  # the last iteration that produced tokens took this long (``_take``'s gathering)
        self._outbox: list = []  # outputs not yet handed to the sink (messages, or callables run in order)
        self._sessions: dict[str, str | None] = {}  # live request -> its session (KV stored at its finish)
        self._delivered: set[str] = set()  # requests with a capture pending whose first token reached the sink
        kw = {} if prefill_chunk is None else {"prefill_chunk": prefill_chunk}
        # prefix cache: snapshots of prefilled prompts (after their first token) and of finished requests go to the
        # Cache actor as host arrays; prefix_min_tokens None = only sessions' own turns are kept
        self.saver = PrefixSaver(self._emit_snapshot, prefix_min_tokens, self._fault,
                                 lambda: exact_only(model)) if cache_inbox else None
        self.sched = Scheduler(model, tokenizer, max_batch=max_batch, caps=caps, spec=spec, spec_batch=spec_batch,
                               on_admit=lambda rid: self._fault("admit", request_id=rid),
                               on_prefilled=self._prefilled if self.saver is not None else None,
                               on_boundary=self._boundary if self.saver is not None else None, **kw)

    # -- statistics survive a restart -------------------------------------------------------------------------
    def adopt_stats(self, old: "Decoder") -> None:
        s, o = self.sched, old.sched
        s.counters, s.histogram, s.spec_histogram = o.counters, o.histogram, o.spec_histogram

    # -- called from async code ----------------------------------------------------------------------------
    def send(self, msg) -> None:
        self.mailbox.put(msg)

    def release(self) -> None:
        """After shutdown (MLX thread): drops the scheduler (model, engines, KV of leftover requests); the
        counters stay for ``stats()``."""
        if self.sched is not None:
            self._final_stats = self.stats()
            if self.sched.solo is not None:
                self.sched.solo.run.close()
            self.sched = None

    def stats(self) -> DecoderStats:
        s = self.sched
        if s is None:
            return self._final_stats
        c = s.counters
        return DecoderStats(
            active=s.active, queued=len(s.pending), max_batch=s.batch.max_batch, steps=c["steps"],
            generated_tokens=c["generated"], prefilled_tokens=c["prefilled"], cached_tokens=c["cached"],
            completed=c["completed"], aborted=c["aborted"], batch_histogram=dict(s.histogram),
            spec_cycles=c["spec_cycles"], spec_requests=c["spec_requests"], spec_demoted=c["spec_demoted"],
            spec_batch_cycles=c["spec_batch_cycles"], spec_batch_moves=c["spec_batch_moves"],
            spec_batch_histogram=dict(s.spec_histogram),
            batching="continuous" if self.caps.batch else f"one at a time: {self.caps.batch_reason}",
            prefill_chunks=c["prefill_chunks"], failed=c["failed"], isolated_retries=c["isolated_retries"],
        )

    # -- the loop (MLX thread) -----------------------------------------------------------------------------
    def _flush(self) -> None:
        """Hands queued outputs to the sink in order: one delivery (one wake-up) per run of messages."""
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        if self.saver is not None and self.saver.pending:  # their captures may now be handed over (``_emitted``)
            self._delivered.update(m.request_id for m in items if isinstance(m, TokenOutput))
        batch = []
        for item in items:
            if callable(item):
                if batch:
                    self.sink(batch)
                    batch = []
                item()
            else:
                batch.append(item)
        if batch:
            self.sink(batch)

    def _fault(self, point: str, **info) -> None:
        if self.fault_hook is not None:
            self.fault_hook(self.name, point, info)

    def run(self) -> None:
        sched = self.sched
        while True:
            self.kv_table.collect()
            if sched.idle:
                self._flush()  # nothing will be stepped this iteration: deliver now
            msgs = self._take(block=sched.idle, gather=sched.holding)
            for m in msgs:
                if isinstance(m, Shutdown):
                    self._flush()
                    return
                if isinstance(m, Submit) and m.warm:
                    self._warm(m)
                elif isinstance(m, Submit):
                    kv = self.kv_table.take(m.cache_handle) if m.cache_handle is not None else None
                    self._sessions[m.request_id] = m.session_id
                    sched.submit(self._request(m, kv))  # a prefix-cache hit restored (decoder_prefix.py)
                elif isinstance(m, Abort):
                    sched.abort(m.request_id, m.reason)
            t = time.perf_counter()
            events = self._step(sched)
            stepped = any(e.token_ids for e in events)
            if any(e.index for e in events if e.token_ids):  # a decode step (not only first tokens of a prefill)
                self._step_s = time.perf_counter() - t
            for e in events:
                self._post(e)
            if any(e.index == 0 and e.token_ids for e in events):
                self._flush()  # a request's first token goes out now, not after the next step's graph is built
            if self.saver is not None and self.saver.pending:
                # once the first token has reached the sink: never on a request's critical path (materialising a
                # 900-token snapshot before the token went out added ~5-8 ms to an L1 hit's TTFT on the CPU)
                self.saver.poll(self._emitted)
            if stepped:
                self._report_routing()
                self._fault("step", steps=sched.counters["steps"] + sched.counters["spec_cycles"]
                            + sched.counters["spec_batch_cycles"])
            if sched.solo is not None or not (sched.batch.active or (sched.spec_batch and sched.spec_batch.active)):
                self._flush()

    def _take(self, block: bool, gather: bool = False) -> list:
        """The mailbox's messages (waiting for one when ``block``); in a distributed runtime, rank 0's. With
        ``gather`` (the scheduler holds a group open on an idle start) it also waits for stragglers: until the
        mailbox stays quiet for a tenth of the last decode step, at most half a step in all (``GATHER_QUIET``,
        ``GATHER_MAX``), so requests sent together but parsed one after the other by the event loop prefill as one
        group."""
        if self.step_sync is not None:
            return self.step_sync.take(self, block)
        msgs = [self.mailbox.get()] if block else []
        while True:
            try:
                msgs.append(self.mailbox.get_nowait())
            except queue.Empty:
                break
        if not gather:  # every iteration of a busy decoder ends here: the waiting below is for an idle start only
            return msgs
        quiet, most = (min(hi, max(lo, f * self._step_s)) for lo, f, hi in (GATHER_QUIET, GATHER_MAX))
        deadline = time.monotonic() + most
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    return msgs
                msgs.append(self.mailbox.get(timeout=min(quiet, left)))
            except queue.Empty:
                return msgs

    def _step(self, sched) -> list:
        if self.step_sync is None:
            return sched.step(self._flush)
        try:
            with self.step_sync.guard("a decode step"):
                return sched.step(self._flush)
        except Exception as e:  # a collective failed: the group is lost, not one request
            raise self.step_sync.step_error(e) or e

    def _post(self, e) -> None:
        if e.error is not None or e.finish is not None:
            self._delivered.discard(e.request_id)
        if e.error is not None:
            self._sessions.pop(e.request_id, None)
            self._outbox.append(RequestFailed(e.request_id, e.error, e.error_type))
        elif e.finish is None:
            self._outbox.append(TokenOutput(e.request_id, e.index, e.token_ids, e.logprobs))
        else:
            session = self._sessions.pop(e.request_id, None)
            u = e.usage
            finish = Finish(request_id=e.request_id, reason=e.finish, prompt_tokens=u["prompt_tokens"],
                            completion_tokens=u["completion_tokens"], cached_tokens=u["cached_tokens"],
                            prefilled_tokens=u["prefilled_tokens"])
            if self.saver is not None:
                self.saver.drop(e.request_id)  # an admission capture not handed over yet: the finish covers it
            if e.kv is not None:
                self._store_then_finish(*e.kv, session, finish)  # as a host snapshot, before the Finish
            else:
                self._outbox.append(finish)

    def _report_routing(self) -> None:
        """Tells the ExpertStore actor which experts the last forward used (streaming residency): its predictor
        prefetches for the next one. After a speculative cycle that is the union over the verified block, which
        is what the next verify will largely need again."""
        if self.expert_inbox is not None and self.routing_source is not None:
            routing = self.routing_source()
            if routing is not None:
                self.expert_inbox(StepRouting(routing))


# -- the one MLX thread ---------------------------------------------------------------------------------------
class MLXThread:
    """A single daemon thread running submitted jobs in order; its last job releases its MLX streams
    (``backend/mlx_streams.py``)."""

    _idle: list["MLXThread"] = []  # threads of closed runtimes, waiting for the next one (see the module doc)
    _idle_lock = threading.Lock()

    @classmethod
    def acquire(cls) -> "MLXThread":
        """An idle MLX thread of a closed runtime, or a new one."""
        with cls._idle_lock:
            while cls._idle:
                t = cls._idle.pop()
                if t._thread.is_alive():
                    return t
        return cls()

    def release(self, idle: bool = False) -> None:
        """Hands the thread back for reuse: at once if the caller knows it is ``idle`` (its last job returned),
        else once every job queued on it has run (a thread stuck in a job never comes back: the next runtime
        then starts its own)."""
        if idle:
            self._park()
        else:
            self.submit(self._park)

    def _park(self) -> None:
        with self._idle_lock:
            self._idle.append(self)

    @classmethod
    def _stop_idle(cls) -> None:
        """At exit: idle threads release their MLX streams while Python still runs."""
        with cls._idle_lock:
            idle, cls._idle[:] = list(cls._idle), []
        for t in idle:
            t.stop()

    def __init__(self, name: str = "mach-mlx"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                release_streams()
                return
            fn, done = job
            try:
                result, error = fn(), None
            except BaseException as e:  # reported to the submitter, never kills the thread
                result, error = None, e
            if done is not None:
                done(result, error)

    def submit(self, fn, done=None) -> None:
        """Runs ``fn()`` on the thread; then ``done(result, error)`` on the thread."""
        self._jobs.put((fn, done))

    async def call(self, fn):
        """Runs ``fn()`` on the MLX thread and returns its result (or raises its exception)."""
        token, event, box = loop_token(), anyio.Event(), {}

        def done(result, error):
            box["result"], box["error"] = result, error
            call_soon(token, event.set)

        self.submit(fn, done)
        with anyio.CancelScope(shield=True):  # the job runs to completion anyway: wait for its answer
            await event.wait()
        if box["error"] is not None:
            raise box["error"]
        return box["result"]

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def stop(self) -> None:
        self._jobs.put(None)
        if not self.is_current():
            self._thread.join(timeout=30)


atexit.register(MLXThread._stop_idle)
