"""The scheduler: which requests run, in which lane, and when newcomers prefill (synchronous, one MLX thread).

Plain engine types in and out: ``submit(Request)`` / ``abort(request_id)`` in, ``step() -> list[Event]`` out
(token ids, finishes with usage and a session's KV, per-request failures). The Decoder actor wraps it with its
mailbox and outbox; text, stop strings and finish text are the front end's (``emit.Emitter`` in the ledger).

Lanes (at most one runs at a time):
* solo: a lone speculative request in the ``BlockSpecDecEngine`` (one draft/verify cycle per step);
* spec: 2..N requests, at least one speculative, in the ``BatchedSpecDecoder`` (``spec_batch``), one batched
  draft/verify cycle per step; target-only rows ride along with one-token blocks;
* batch: the target-only ``BatchEngine`` (pipelined), for everything else.
The lane follows the set of running + waiting requests. When it changes, the running requests move with their KV
(``SpecDecRun.handover``, ``BatchedSpecDecoder.handover`` with the draft's context, or — after a step that queues
none — ``BatchEngine.extract_kv``) and re-join as prompt + generated tokens: nothing is prefilled twice and
sampling positions continue. A request never moves into the solo lane mid-stream.

Chunked prefill, the same in every lane: newcomers join through their lane engine's ``begin`` (a
``batch.Prefill`` over ``batch.prefill_chunks``: ``BatchEngine``, ``BatchedSpecDecoder``, and
``BlockSpecDecEngine`` for the solo lane), ONE chunk (``prefill_chunk`` tokens) per step, interleaved with the
running rows' decode steps, so a long prompt delays each running stream by a chunk, not by its whole prefill
(mlx-lm's BatchGenerator does the same); ``join`` adds them once the last chunk has run. One group prefills at a
time; what arrives meanwhile waits for it. A group that would start on an idle scheduler (nothing running or
prefilling) is held open for one iteration before its first chunk (``holding``): whatever arrives meanwhile joins
it, so a wave of simultaneous arrivals prefills as one group instead of its first request alone while the others
wait (the Decoder drains its mailbox in between, briefly waiting for stragglers: ``actors/decoder.py``).

Lane policy (one threshold, ``spec_batch.max_batch``): requests decode speculatively while the running + waiting
set fits the spec batch (a lone one in the solo lane) and in target-only continuous batching once it outgrows
it. A target-only batch entered that way keeps its requests until it drains: a set that shrinks back under it does not
move into the spec lane (moves cost a settle step and a handover each, and under a load hovering around the
threshold they would flap every few steps); newcomers join the running batch. Speculative lanes come back when the
scheduler next starts from empty.

Capabilities (``io.arch_registry.Capabilities``): a family whose caches cannot merge runs one request at a time,
the others queued; the spec lane exists only where rows can be rolled back alone.

Fault isolation: an exception raised while admitting, prefilling or stepping fails the request it belongs to
(an ``Event`` with ``error``), never the others. A failure of several requests together (a batched prefill or
step) leaves the culprit unknown: the lane is dropped and each of its requests is retried alone once (a probe:
prefill + one step on a private single-row engine); the one that fails alone fails, the others continue. Only
faults of the process (``process_fault``: out of memory) propagate, for the Supervisor's restart limit.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from ..errors import error_name
from .batch import PREFILL_STEP, Admission, BatchEngine
from .emit import StopRule


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: tuple
    params: object  # sampling.SamplingParams
    generated: tuple = ()  # completion tokens the client already has (a replay, a lane move)
    kv: object = None  # prefix KV covering prompt_ids + generated [:cached_tokens]
    cached_tokens: int = 0
    store_kv: bool = False  # a session turn: its KV is handed out with the finish
    isolate: bool = False  # involved in a failed group: retried alone before it runs with others
    usage: tuple | None = None  # (cached, prefilled) before a lane move
    boundaries: tuple = ()  # token counts at which its prefill is offered to ``on_boundary`` (prefix snapshots)


@dataclass
class Event:
    request_id: str
    index: int = 0  # completion position of token_ids[0]
    token_ids: tuple = ()
    finish: str | None = None  # "stop" | "length" | "abort" on the request's last event
    usage: dict | None = None  # with finish: prompt_tokens, completion_tokens, cached_tokens, prefilled_tokens
    kv: tuple | None = None  # with finish of a store_kv request: (caches, the tokens they cover)
    error: str | None = None  # the request failed alone (the message names the cause)
    error_type: str = "RequestError"  # with error: the errors.py class the caller gets (errors.error_name)
    logprobs: tuple | None = None  # per token when the request asked: (logprob, ((top id, logprob), ...))


@dataclass
class _Solo:
    req: Request
    run: object  # SpecDecRun
    generated: list = field(default_factory=list)


def process_fault(e: BaseException) -> bool:
    """Faults of the process itself (not of one request): they crash the Decoder and count against the restart
    limit. A failed collective of a distributed runtime is one."""
    from ..distributed.group import collective_failure  # a distributed runtime lost a rank (docs/distributed.md)

    text = str(e).lower()
    return (isinstance(e, MemoryError) or "out of memory" in text or "insufficient memory" in text
            or collective_failure(e))


class Scheduler:
    def __init__(self, model, tokenizer, *, max_batch: int, caps, spec=None, spec_batch=None,
                 prefill_chunk: int = PREFILL_STEP, on_admit=None, on_prefilled=None, on_boundary=None):
        self.model, self.tokenizer, self.caps = model, tokenizer, caps
        self.batch = BatchEngine(model, tokenizer, max_batch, prefill_chunk, mergeable=caps.batch)
        self.spec = spec  # BlockSpecDecEngine sharing the model, or None
        self.spec_batch = spec_batch if caps.batch and caps.spec_batch else None
        if self.spec_batch is not None:
            self.spec_batch.clear()  # rows a crashed predecessor left behind
        self.prefill_chunk = prefill_chunk
        self.on_admit = on_admit  # on_admit(request_id) before a request's admission (the Decoder's fault hook)
        # on_prefilled(request_id, extract, tokens, cached) when a fresh prompt's prefill is done: ``extract()`` gives
        # its single-request caches covering ``tokens`` (the prefix cache snapshots them after the first token)
        self.on_prefilled = on_prefilled
        for lane in (self.batch, self.spec, self.spec_batch):  # a Request's ``boundaries`` reached mid-prefill
            if lane is not None:
                lane.on_boundary = on_boundary
        self.eos = frozenset(tokenizer.eos_token_ids)
        self.pending: deque[Request] = deque()
        self.live: dict[str, Request] = {}  # admitted (prefilling or running) requests
        self.solo: _Solo | None = None
        self.prefill = None  # (lane engine, Prefill, requests): newcomers prefilling chunk by chunk
        self._dropped: set[str] = set()  # aborted while prefilling: finished when they join
        self._spec_counted: set[str] = set()  # live requests counted in spec_requests
        self._settle = False  # the next batch step queues none: its rows are about to move
        self._outgrown = False  # the target-only batch runs because the set outgrew the spec batch: it keeps them
        self._held = False  # the waiting requests were held open one iteration on an idle scheduler (``holding``)
        self._events: list[Event] = []
        self.counters = Counter()
        self.histogram: Counter = Counter()  # batch rows -> steps
        self.spec_histogram: Counter = Counter()  # spec batch rows -> cycles

    # -- in ---------------------------------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        self.pending.append(req)

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Ends a request now (``reason`` "stop": the front end found a stop string; its session KV is kept)."""
        for i, r in enumerate(self.pending):
            if r.request_id == request_id:
                del self.pending[i]  # (a prefix hit's first token may have ended it before its admission)
                self._finish_event(r, reason, r.usage or (r.cached_tokens if r.kv is not None else 0, 0), None)
                return
        if self.solo is not None and self.solo.req.request_id == request_id:
            self._finish_solo(reason)
        elif self.prefill is not None and request_id in self.prefill[1].request_ids:
            self._dropped.add(request_id)
        elif request_id in self.live:
            self._finish(request_id, reason)

    @property
    def idle(self) -> bool:
        return not (self.pending or self.live or self.solo)

    @property
    def holding(self) -> bool:
        """Newcomers are held open for one iteration before their group starts (the scheduler was idle): the
        caller may gather more arrivals before the next ``step``."""
        return self._held and bool(self.pending)

    @property
    def active(self) -> int:
        return self.batch.active + (self.spec_batch.active if self.spec_batch is not None else 0) + (
            self.solo is not None)

    # -- one iteration ----------------------------------------------------------------------------------------
    def step(self, flush=None) -> list[Event]:
        """Admissions, one prefill chunk, one decode step of the running lane; the events they produced.
        ``flush()`` is called before slow host work and once a step is queued on the device (the caller delivers
        the previous outputs meanwhile)."""
        flush = flush or (lambda: None)
        if not self.pending:
            self._held = False
        suspect = next((r for r in self.pending if r.isolate), None)
        if suspect is not None:
            self.pending.remove(suspect)
            flush()
            self._guard([suspect], self._probe, suspect)
        self._schedule(flush)
        if self.prefill is not None and self._advance(flush):
            events, self._events = self._events, []  # first tokens go out now; the lane steps next iteration
            return events
        if self.solo is not None:
            self._guard([self.solo.req], self._solo_cycle)
        elif self.spec_batch is not None and self.spec_batch.active:
            self._guard([self.live[r.request_id] for r in self.spec_batch.rows], self._spec_step, flush)
        elif self.batch.active:
            self._guard([self.live[s.request_id] for s in self.batch.seqs], self._batch_step, flush)
        events, self._events = self._events, []
        return events

    def _guard(self, reqs: list[Request], fn, *args) -> None:
        """Runs ``fn``; an exception fails ``reqs[0]`` alone, or sends every one of ``reqs`` to be retried alone."""
        try:
            fn(*args)
        except Exception as e:
            if process_fault(e):
                raise
            self._contain(reqs, e)

    def _contain(self, reqs: list[Request], e: Exception) -> None:
        pf, self.prefill = self.prefill, None
        if pf is not None and any(r.request_id in pf[1].request_ids for r in reqs):
            pf = None  # the failed group was prefilling: drop it
        elif pf is not None:
            self.prefill = pf
        ids = {r.request_id for r in reqs}
        if self.solo is not None and self.solo.req.request_id in ids:
            solo, self.solo = self.solo, None
            solo.run.close()
        for lane in (self.batch, self.spec_batch):
            if lane is not None and any(lane.has(i) for i in ids):
                members = {m.request_id: m for m in lane._members()}
                lane.clear()
                for r in reqs:
                    m = members.get(r.request_id)
                    if m is not None:  # what the client has of it so far
                        r.generated = tuple(m.generated)
                        r.usage = self._usage(r, m.cached_tokens, m.prefilled_tokens)
        self.counters["request_faults"] += 1
        for r in reqs:
            self.live.pop(r.request_id, None)
            self._dropped.discard(r.request_id)
            if len(reqs) == 1:
                self._spec_counted.discard(r.request_id)
        if len(reqs) == 1:
            r = reqs[0]
            self.counters["failed"] += 1
            self._events.append(Event(r.request_id, error=f"request {r.request_id!r} failed: {type(e).__name__}: {e}",
                                      error_type=error_name(e)))
            return
        self.counters["isolated_retries"] += len(reqs)
        for r in reversed(reqs):  # unknown culprit: each retried alone, ahead of the queue
            self.pending.appendleft(Request(r.request_id, r.prompt_ids, r.params, r.generated, None, 0,
                                            r.store_kv, True, r.usage))

    # -- lanes ------------------------------------------------------------------------------------------------
    def _wants_spec(self, r: Request) -> bool:
        p = r.params
        if self.spec is None or p.specdec in (None, "target_only") or len(r.generated) >= p.max_tokens:
            return False
        if p.target_only:  # penalties, grammars, logprobs, logits processors: only the target-only batch has them
            return False
        # a replayed request that already ended goes through the batch, which finishes it at once
        return not (r.generated and StopRule(p, self.eos).finish(r.generated[-1], len(r.generated)))

    def _lane(self) -> tuple[str | None, list[Request]]:
        if self.solo is not None:
            return "solo", [self.solo.req]
        if self.spec_batch is not None and self.spec_batch.active:
            return "spec", [self.live[r.request_id] for r in self.spec_batch.rows]
        if self.batch.active:
            return "batch", [self.live[s.request_id] for s in self.batch.seqs]
        return None, []

    def _schedule(self, flush) -> None:
        """Picks the lane for the running + waiting requests, moves the running ones there if it changed, then
        starts the admission of what waits (one group prefilling at a time)."""
        if self.prefill is not None or (self.spec_batch is None and not self.pending and self.solo is None):
            return  # (without a spec lane only newcomers change lanes)
        lane, running = self._lane()
        waiting = [r for r in self.pending if not r.isolate]  # suspects are probed alone first (``step``)
        if lane is None and waiting and not self._held:
            self._held = True  # idle: the group stays open one iteration for simultaneous arrivals to join it
            return
        self._held = False
        subs = running + waiting
        if len(subs) == 1:  # stays where it runs; a target-only request left in the spec batch goes pipelined
            spec = self._wants_spec(subs[0])
            want = ("solo" if spec else "batch") if lane is None else ("batch" if lane == "spec" and not spec else lane)
        elif (self.spec_batch is not None and len(subs) <= self.spec_batch.max_batch
              and any(self._wants_spec(s) for s in subs) and not any(s.params.target_only for s in subs)):
            want = "spec"
        else:
            want = "batch"
        if lane is None:
            self._outgrown = False
        if (self.spec_batch is not None and len(subs) > self.spec_batch.max_batch
                and any(self._wants_spec(s) for s in subs)):
            self._outgrown = True  # target-only because the set outgrew the spec batch
        if lane == "batch" and self._outgrown:
            want = "batch"  # it keeps its requests until it drains (the lane policy above)
        moved = []
        if lane is not None and want != lane:
            if lane == "batch" and self.batch.in_flight:
                self._settle = True  # this iteration's step reads the step in flight and queues none: move next
                return
            flush()
            moved = self._evict(lane)
        if not moved and not waiting:
            return
        flush()  # a prefill may take a while: deliver what the last step produced first
        engine = {"solo": self.spec, "spec": self.spec_batch}.get(want, self.batch)
        if moved:  # they prefill nothing (their KV covers all but the newest token): join at once
            self._guard(moved, self._admit, engine, moved, True)
        free = 1 if want == "solo" else engine.max_batch - engine.active
        if waiting and free > 0:
            group = waiting[:free]
            for r in group:
                self.pending.remove(r)
            self._guard(group, self._admit, engine, group, False)

    def _admit(self, engine, reqs: list[Request], now: bool) -> None:
        for r in reqs:
            self.live[r.request_id] = r
            if self.on_admit is not None:
                self._guard([r], self.on_admit, r.request_id)
        reqs = [r for r in reqs if r.request_id in self.live]  # those the admission hook did not fail
        if not reqs:
            return
        self.counters["prefill_groups"] += 1
        pf = engine.begin([Admission(r.request_id, r.prompt_ids, r.params, r.generated, r.kv,
                                     r.cached_tokens if r.kv is not None else 0, r.boundaries) for r in reqs],
                          prefill_step=self.prefill_chunk)
        for r in reqs:
            r.kv = None  # the lane owns it now
        self.prefill = (engine, pf, reqs)
        if now:
            pf.finish()
            self._advance(lambda: None)

    def _advance(self, flush) -> bool:
        """One chunk of the prefilling group; joins it to its lane when done. True when the join drew tokens (the
        batch lane's last chunk draws each newcomer's next token: ``BatchEngine.take_ready``)."""
        engine, pf, reqs = self.prefill
        flush()
        try:
            self.counters["prefill_chunks"] += bool(pf.advance())
        except Exception as e:
            if process_fault(e):
                raise
            self._contain(reqs, e)
            return False
        if not pf.done:
            return False
        self.prefill = None
        members = engine.join(pf)
        ready = {o.request_id: o for o in engine.take_ready()} if engine is self.batch else {}
        for m, r in zip(members, reqs):
            self.counters["prefilled"] += m.prefilled_tokens
            if r.usage is None:
                self.counters["cached"] += m.cached_tokens
            if engine is self.spec:  # the solo lane: its first cycle feeds the last prompt token
                self.solo = _Solo(r, m, list(r.generated))
                self._count_spec(r)
                if r.request_id in self._dropped:
                    self._dropped.discard(r.request_id)
                    self._finish_solo("abort")
                continue
            if engine is self.spec_batch:
                self._count_spec(r)
            if self.on_prefilled is not None and r.usage is None and not r.generated:
                rid = r.request_id
                self.on_prefilled(rid, lambda e=engine, i=rid: e._extract(i)[1], tuple(r.prompt_ids[:-1]),
                                  m.cached_tokens)
            if r.request_id in self._dropped:
                self._dropped.discard(r.request_id)
                self._finish(r.request_id, "abort")
                continue
            o = ready.get(r.request_id)
            if o is not None:
                self._events.append(Event(o.request_id, o.index, (o.token,),
                                          logprobs=(o.logprobs,) if o.logprobs is not None else None))
                self.counters["generated"] += 1
            if m.finish:  # its first token ended it, or a replayed request had in fact ended before the crash
                self._finish(r.request_id, m.finish)
        return bool(ready)

    def _evict(self, lane: str) -> list[Request]:
        """Takes every request out of ``lane`` with its KV: Requests that re-join as prompt + generated tokens."""
        if lane == "solo":
            return [self._evict_solo()]
        out = []
        for rid in [m.request_id for m in (self.spec_batch.rows if lane == "spec" else self.batch.seqs)]:
            if lane == "spec":
                kv, m = self.spec_batch.handover(rid)  # with the draft's context
                n = kv.n_tokens if kv is not None else 0
            else:  # settled: the cache holds all but the newest token
                kv, n = self.batch.extract_kv(rid)
                m = self.batch.remove(rid)
            r = self.live.pop(rid)
            out.append(Request(rid, r.prompt_ids, r.params, tuple(m.generated), kv, n if kv is not None else 0,
                               r.store_kv, False, self._usage(r, m.cached_tokens, m.prefilled_tokens)))
        self.counters["spec_batch_moves"] += len(out)
        return out

    @staticmethod
    def _usage(r: Request, cached: int, prefilled: int) -> tuple[int, int]:
        """(cached, prefilled) of a request so far: a moved one's own counts, plus what its lane prefilled (the
        handed-over KV is its own work, not a reuse)."""
        return (r.usage[0], r.usage[1] + prefilled) if r.usage else (cached, prefilled)

    # -- decode steps -----------------------------------------------------------------------------------------
    def _batch_step(self, flush) -> None:
        settle, self._settle = self._settle, False
        outs = self.batch.step(on_launched=flush, launch_next=not settle)
        self.counters["steps"] += 1
        self.histogram[len(outs)] += 1
        self.counters["generated"] += len(outs)
        self._events.extend(Event(o.request_id, o.index, (o.token,),
                                  logprobs=(o.logprobs,) if o.logprobs is not None else None) for o in outs)
        for o in outs:
            if o.finish_reason is not None:
                self._finish(o.request_id, o.finish_reason)

    def _spec_step(self, flush) -> None:
        outs = self.spec_batch.step(on_launched=flush)
        self.counters["spec_batch_cycles"] += 1
        self.spec_histogram[len(outs)] += 1
        for o in outs:
            if o.token_ids:
                self._events.append(Event(o.request_id, o.index, tuple(o.token_ids)))
                self.counters["generated"] += len(o.token_ids)
        for o in outs:
            if o.finish_reason is not None:
                self._finish(o.request_id, o.finish_reason)

    def _probe(self, r: Request) -> None:
        """A request from a failed group, alone: prefill + one step on a private single-row engine. If it fails it
        is the culprit (``_guard`` fails it); otherwise it re-joins the queue with its KV and one token more."""
        if self.on_admit is not None:
            self.on_admit(r.request_id)
        eng = BatchEngine(self.model, self.tokenizer, 1, self.prefill_chunk, pipeline=False, mergeable=self.caps.batch)
        seq = eng.add_many([Admission(r.request_id, r.prompt_ids, r.params, r.generated)])[0]
        usage = self._usage(r, seq.cached_tokens, seq.prefilled_tokens)
        self.counters["prefilled"] += seq.prefilled_tokens
        ready = eng.take_ready()  # the token its prefill drew
        if not ready:  # a replayed request that had in fact ended
            return self._finish_event(r, seq.finish, usage, None)
        o = ready[0]
        self._events.append(Event(r.request_id, o.index, (o.token,),
                                  logprobs=(o.logprobs,) if o.logprobs is not None else None))
        self.counters["generated"] += 1
        if o.finish_reason:
            kv = eng.extract_kv(r.request_id) if r.store_kv else None
            return self._finish_event(r, o.finish_reason, usage, kv and (kv[0], (*r.prompt_ids, *seq.generated)[:kv[1]]))
        kv, n = eng.extract_kv(r.request_id)
        self.pending.appendleft(Request(r.request_id, r.prompt_ids, r.params, tuple(seq.generated), kv, n,
                                        r.store_kv, False, usage))

    # -- the lone speculative request -------------------------------------------------------------------------
    def _count_spec(self, r: Request) -> None:
        """Counts a request that runs (at least partly) speculatively, once."""
        if r.request_id not in self._spec_counted and self._wants_spec(r):
            self._spec_counted.add(r.request_id)
            self.counters["spec_requests"] += 1

    def _solo_cycle(self) -> None:
        solo = self.solo
        chunk = next(solo.run, None)
        self.counters["spec_cycles"] += 1
        if chunk is not None and chunk.token_ids:
            self._events.append(Event(solo.req.request_id, len(solo.generated), tuple(chunk.token_ids)))
            solo.generated.extend(chunk.token_ids)
            self.counters["generated"] += len(chunk.token_ids)
        if chunk is None or chunk.finish_reason is not None:
            self._finish_solo(chunk.finish_reason if chunk is not None else "length")

    def _finish_solo(self, reason: str) -> None:
        solo, self.solo = self.solo, None
        r, run = solo.req, solo.run
        self.live.pop(r.request_id, None)
        kv = run.handover() if r.store_kv and reason != "abort" else None  # handover closes the run
        run.close()
        usage = self._usage(r, run.cached_tokens, run.prefilled_tokens)
        covered = (tuple(r.prompt_ids) + tuple(solo.generated))[: kv.n_tokens] if kv is not None else None
        self._finish_event(r, reason, usage, (kv, covered) if kv is not None else None, len(solo.generated))

    def _evict_solo(self) -> Request:
        solo, self.solo = self.solo, None
        r, run = solo.req, solo.run
        self.live.pop(r.request_id, None)
        kv = run.handover()  # None if the run never got as far as a consistent cache: then a full re-prefill
        self.counters["spec_demoted"] += 1
        return Request(r.request_id, r.prompt_ids, r.params, tuple(solo.generated), kv,
                       kv.n_tokens if kv is not None else 0, r.store_kv, False,
                       self._usage(r, run.cached_tokens, run.prefilled_tokens))

    # -- finishing --------------------------------------------------------------------------------------------
    def _finish(self, request_id: str, reason: str) -> None:
        r = self.live.pop(request_id)
        store = r.store_kv and reason != "abort"
        kv = None
        if self.spec_batch is not None and self.spec_batch.has(request_id):
            # with the draft's context: a speculative next turn continues it
            kv, m = self.spec_batch.handover(request_id) if store else (None, self.spec_batch.remove(request_id))
            n = kv.n_tokens if kv is not None else 0
        else:
            if store:
                kv, n = self.batch.extract_kv(request_id)
            m = self.batch.remove(request_id)
        covered = (tuple(r.prompt_ids) + tuple(m.generated))[:n] if kv is not None else None
        self._finish_event(r, reason, self._usage(r, m.cached_tokens, m.prefilled_tokens),
                           (kv, covered) if kv is not None else None, len(m.generated))

    def _finish_event(self, r: Request, reason: str, usage: tuple, kv, completion: int | None = None) -> None:
        self._spec_counted.discard(r.request_id)
        self.counters["aborted" if reason == "abort" else "completed"] += 1
        n = len(r.generated) if completion is None else completion
        self._events.append(Event(r.request_id, n, (), reason, {
            "prompt_tokens": len(r.prompt_ids), "completion_tokens": n, "cached_tokens": usage[0],
            "prefilled_tokens": usage[1]}, kv))
