"""The Decoder actor: owns the model and runs the decode loop on the one MLX thread.

Its mailbox is a thread-safe queue (the loop lives on the MLX thread, not on the event loop): the async side
drops ``Submit`` / ``Abort`` / ``Shutdown`` messages in without blocking. Each loop iteration drains the mailbox,
admits at most one waiting request (prefill interleaves with decoding, so a long prompt delays the running batch
by one prefill, not by the whole queue), runs one batched decode step for every active request, and hands each
new token to ``sink`` (the Supervisor's ledger, which fills the request's output slot). Finished and aborted
requests leave the batch before the next step.

Speculative decoding follows mach's hybrid policy: a request that asks for it (``params.specdec``) runs through
the ``BlockSpecDecEngine`` while it is alone — one draft/verify cycle per loop iteration — and is moved into the
target-only batch as soon as another request arrives, with the KV the engine built for its prompt + delivered
tokens (nothing is prefilled twice). A speculative session turn starts from the session's cached KV and, when it
ends, stores its KV (and the draft's context) for the next turn, as a batched turn does.

With a spec batch (``Runtime.open(spec_batch=N)``: a ``BatchedSpecDecoder``), requests run in one of three lanes
and the lane follows the set of running + waiting requests: a lone speculative request starts in the solo lane
(as above); 2..N requests of which at least one wants speculative decoding run together in the spec batch (one
draft/verify cycle for all of them per iteration; target-only rows ride along with one-token blocks); more than N
use the target-only batch. When the set changes lanes (arrivals, finishes, aborts) the running requests move with
their KV (``SpecDecRun.handover``, ``BatchedSpecDecoder.handover`` with the draft's context, or — after a last
step that queues none — ``BatchEngine.extract_kv``) and re-join as prompt + delivered tokens, so nothing computed
is prefilled again and token positions continue exactly. A request never moves into the solo lane mid-stream: a
speculative one left alone in a batch stays there (the solo engine would start a fresh detokenizer and draft
context); a target-only one left alone in the spec batch goes back to the (pipelined) target-only batch.

A crash (any exception in the loop) ends the loop; ``on_exit`` tells the Supervisor, which re-admits every live
request on a fresh Decoder. Session KV caches go to the Cache actor's table as opaque handles.
"""

from __future__ import annotations

import queue
from collections import Counter, deque
from dataclasses import dataclass

from mach_runtime.engine.batch import Admission, BatchEngine
from mach_runtime.errors import MachError

from .messages import (
    Abort,
    CacheInsert,
    DecoderStats,
    Finish,
    RequestFailed,
    Shutdown,
    StepRouting,
    Submit,
    TokenOutput,
)


@dataclass
class _Solo:
    sub: Submit
    gen: object  # BlockSpecDecEngine.generate(...) → SpecDecRun: one cycle per next(), handover() at the end
    delivered: list  # every token the client has for this request (replayed ones included)


class Decoder:
    name = "decoder"

    def __init__(self, model, tokenizer, *, max_batch: int, sink, kv_table, cache_inbox=None, expert_inbox=None,
                 fault_hook=None, routing_source=None, spec=None, spec_batch=None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.sink = sink  # callable(OutputMessage or list of them), thread-safe
        self.kv_table = kv_table
        self.cache_inbox = cache_inbox  # callable(msg, then=None): deliver to the Cache actor, then call then()
        self.expert_inbox = expert_inbox  # callable(msg): deliver to the ExpertStore actor (thread-safe)
        self.fault_hook = fault_hook
        self.routing_source = routing_source  # callable() -> per-bank experts of the last step, or None
        self.spec = spec  # BlockSpecDecEngine sharing the model, or None
        self.solo: _Solo | None = None  # the lone speculative request, if one is running
        self.spec_batch = spec_batch  # BatchedSpecDecoder sharing the model (spec_batch mode), or None
        self._moved: dict[str, tuple[int, int]] = {}  # request moved between lanes -> its (cached, prefilled)
        self._spec_counted: set[str] = set()  # live requests counted in spec_requests
        self._settle = False  # the next batch step queues no other: its rows are about to move
        self._outbox: list = []  # outputs not yet handed to the sink (messages, or callables run in order)
        self.mailbox: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: deque[Submit] = deque()
        self.engine: BatchEngine | None = None
        self._submits: dict[str, Submit] = {}
        self.counters = Counter()
        self.histogram: Counter = Counter()
        self.spec_histogram: Counter = Counter()  # spec batch rows -> cycles

    # -- called from async code ----------------------------------------------------------------------------
    def send(self, msg) -> None:
        self.mailbox.put(msg)

    def stats(self) -> DecoderStats:
        e, sb = self.engine, self.spec_batch
        return DecoderStats(
            active=(e.active if e else 0) + (sb.active if sb is not None else 0),
            queued=len(self.pending),
            max_batch=self.max_batch,
            steps=self.counters["steps"],
            generated_tokens=self.counters["generated"],
            prefilled_tokens=self.counters["prefilled"],
            cached_tokens=self.counters["cached"],
            completed=self.counters["completed"],
            aborted=self.counters["aborted"],
            batch_histogram=dict(self.histogram),
            spec_cycles=self.counters["spec_cycles"],
            spec_requests=self.counters["spec_requests"],
            spec_demoted=self.counters["spec_demoted"],
            spec_batch_cycles=self.counters["spec_batch_cycles"],
            spec_batch_moves=self.counters["spec_batch_moves"],
            spec_batch_histogram=dict(self.spec_histogram),
        )

    # -- the loop (MLX thread) -----------------------------------------------------------------------------
    def _post(self, item) -> None:
        """Queues an output message (or a callable that must run in order with them) for ``_flush``."""
        self._outbox.append(item)

    def _flush(self) -> None:
        """Hands queued outputs to the sink in order: one delivery (one wake-up) per run of messages."""
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
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
        self.engine = BatchEngine(self.model, self.tokenizer, self.max_batch)
        sb = self.spec_batch
        if sb is not None:
            sb.clear()  # rows a crashed incarnation left behind (the Supervisor re-admits their requests)
        while True:
            self.kv_table.collect()
            spec_rows = sb is not None and sb.active
            if not self.engine.active and not spec_rows:
                self._flush()  # nothing will be stepped this iteration: deliver now
            idle = not self.engine.active and not spec_rows and not self.pending and self.solo is None
            msgs = [self.mailbox.get()] if idle else []
            while True:
                try:
                    msgs.append(self.mailbox.get_nowait())
                except queue.Empty:
                    break
            for m in msgs:
                if isinstance(m, Shutdown):
                    self._flush()
                    return
                if isinstance(m, Submit):
                    self.pending.append(m)
                elif isinstance(m, Abort):
                    self._abort(m.request_id)
            if sb is not None:
                self._schedule()
            else:
                if self.solo is not None and (self.pending or self.engine.active):
                    self._demote_solo()  # company arrived: the lone speculative request joins the batch
                if self.pending and not self.engine.full:
                    self._flush()  # a prefill may take a while: deliver what the last step produced first
                    if len(self.pending) == 1 and not self.engine.active and self._wants_spec(self.pending[0]):
                        self._start_solo(self.pending.popleft())
                    else:
                        self._admit_pending()
            if self.solo is not None:
                self._solo_cycle()
                self._flush()
            elif sb is not None and sb.active:
                self._spec_step()
            elif self.engine.active:
                self._step()

    def _admit_pending(self) -> None:
        """Everything waiting that fits joins the target-only batch at once: one batched prefill."""
        free = self.engine.max_batch - self.engine.active
        if self.pending and free > 0:
            self._admit([self.pending.popleft() for _ in range(min(free, len(self.pending)))])

    # -- spec_batch mode: lanes ---------------------------------------------------------------------------
    def _lane(self) -> tuple[str | None, list[Submit]]:
        """The lane running now ("solo", "spec", "batch" or None: at most one runs) and its requests."""
        if self.solo is not None:
            return "solo", [self.solo.sub]
        if self.spec_batch.active:
            return "spec", [self._submits[r.request_id] for r in self.spec_batch.rows]
        if self.engine.active:
            return "batch", [self._submits[s.request_id] for s in self.engine.seqs]
        return None, []

    def _schedule(self) -> None:
        """Picks the lane for the running + waiting requests (see the module doc), moves the running ones there
        if it changed, then admits what waits."""
        lane, running = self._lane()
        subs = running + list(self.pending)
        if len(subs) == 1:  # stays where it runs, but a target-only request left in the spec batch is pipelined
            spec = self._wants_spec(subs[0])
            want = ("solo" if spec else "batch") if lane is None else ("batch" if lane == "spec" and not spec else lane)
        elif (subs and len(subs) <= self.spec_batch.max_batch and any(self._wants_spec(s) for s in subs)
              and not any(s.params.target_only for s in subs)):  # the spec batch samples none of those extras
            want = "spec"
        else:
            want = "batch"
        moved = []
        if lane is not None and want != lane:
            if lane == "batch" and self.engine.in_flight:
                self._settle = True  # this iteration's step reads the step in flight and queues none: move next
                return
            moved = self._evict(lane)
        if not moved and not self.pending:
            return
        self._flush()  # a prefill may take a while: deliver what the last step produced first
        if want == "solo":
            self._start_solo(self.pending.popleft())
        elif want == "spec":  # the moved rows first: they prefill nothing, the newcomers together
            for group in (moved, [self.pending.popleft() for _ in range(len(self.pending))]):
                if group:
                    self._admit(group, self.spec_batch)
        else:
            if moved:
                self._admit(moved)
            self._admit_pending()

    def _evict(self, lane: str) -> list[Submit]:
        """Takes every request out of ``lane`` with its KV: Submits that re-join as prompt + delivered tokens."""
        if lane == "solo":
            return [self._evict_solo()]
        out = []
        for rid in [m.request_id for m in (self.spec_batch.rows if lane == "spec" else self.engine.seqs)]:
            if lane == "spec":
                kv, m = self.spec_batch.handover(rid)  # with the draft's context
                n = kv.n_tokens if kv is not None else 0
            else:  # settled: the cache holds all but the newest token
                kv, n = self.engine.extract_kv(rid)
                m = self.engine.remove(rid)
            sent = m.emitter.sent if lane == "spec" else m.sent_chars
            out.append(self._moved_submit(self._submits.pop(rid), m.generated, kv, n,
                                          (m.cached_tokens, m.prefilled_tokens), sent))
        self.counters["spec_batch_moves"] += len(out)
        return out

    def _moved_submit(self, sub: Submit, delivered, kv, n: int, usage: tuple[int, int], sent_chars) -> Submit:
        """The Submit re-admitting a request that leaves a lane: its KV under a handle, ``usage`` kept for
        ``_join``, ``sent_chars`` of its text delivered (text held back for a partial stop-string match moves
        with it)."""
        self._moved[sub.request_id] = usage
        handle = self.kv_table.put(kv) if kv is not None else None
        return Submit(request_id=sub.request_id, prompt_ids=sub.prompt_ids, params=sub.params,
                      resume_ids=tuple(delivered), resume_chars=sent_chars, session_id=sub.session_id,
                      cache_handle=handle, cached_tokens=n if kv is not None else 0)

    def _spec_step(self) -> None:
        """One draft/verify cycle of every spec batch row; the previous cycle's outputs go out while it runs."""
        outs = self.spec_batch.step(on_launched=self._flush)
        self.counters["spec_batch_cycles"] += 1
        self.spec_histogram[len(outs)] += 1
        self._report_routing()
        self._fault("step", steps=self.counters["steps"] + self.counters["spec_batch_cycles"])
        for o in outs:
            if o.token_ids:
                self._post(TokenOutput(o.request_id, o.index, tuple(o.token_ids), o.text))
                self.counters["generated"] += len(o.token_ids)
        for o in outs:
            if o.finish_reason is not None:
                self._finish(o.request_id, o.finish_reason)

    # -- the lone speculative request ---------------------------------------------------------------------
    def _wants_spec(self, sub: Submit) -> bool:
        p, done = sub.params, sub.resume_ids
        if self.spec is None or p.specdec in (None, "target_only") or len(done) >= p.max_tokens:
            return False
        # a replayed request that already ended goes through the batch path, which finishes it at once
        return not (done and done[-1] in self.engine.eos | frozenset(p.stop_token_ids))

    def _start_solo(self, sub: Submit) -> None:
        p = sub.params
        kv = self.kv_table.take(sub.cache_handle) if sub.cache_handle is not None else None
        # a session's earlier turns (with the draft's context, if stored): only the rest is prefilled
        prefix = (kv, sub.cached_tokens, getattr(kv, "draft_state", None)) if kv is not None else None
        self._fault("admit", request_id=sub.request_id)
        run = self.spec.generate(
            list(sub.prompt_ids), resume_ids=sub.resume_ids, resume_chars=sub.resume_chars,
            max_tokens=p.max_tokens - len(sub.resume_ids),
            temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed, stop=p.stop or None,
            stop_token_ids=p.stop_token_ids, mode=p.specdec, policy=p.specdec_policy, prefix=prefix,
        )
        self.solo = _Solo(sub, run, list(sub.resume_ids))
        self._count_spec(sub)

    def _solo_cycle(self) -> None:
        solo = self.solo
        try:
            chunk = next(solo.gen)
        except StopIteration:  # pragma: no cover - the generator always ends with a finish chunk
            chunk = None
        except Exception as e:
            if not isinstance(e, MachError):
                raise
            self.solo = None
            self._spec_counted.discard(solo.sub.request_id)
            self._post(RequestFailed(solo.sub.request_id, str(e)))
            return
        self.counters["spec_cycles"] += 1
        self._report_routing()
        self._fault("step", steps=self.counters["steps"] + self.counters["spec_cycles"])
        if chunk is not None and chunk.token_ids:
            self._post(TokenOutput(solo.sub.request_id, len(solo.delivered), tuple(chunk.token_ids), chunk.text))
            solo.delivered.extend(chunk.token_ids)
            self.counters["generated"] += len(chunk.token_ids)
        if chunk is None or chunk.finish_reason is not None:
            self._finish_solo(chunk.finish_reason if chunk is not None else "length")

    def _finish_solo(self, reason: str) -> None:
        solo, self.solo = self.solo, None
        sub, run = solo.sub, solo.gen
        self._spec_counted.discard(sub.request_id)
        store_kv = sub.session_id is not None and self.cache_inbox is not None and reason != "abort"
        kv = run.handover() if store_kv else None  # handover closes the run
        run.close()
        self.counters["aborted" if reason == "abort" else "completed"] += 1
        self.counters["prefilled"] += run.prefilled_tokens
        self.counters["cached"] += run.cached_tokens
        finish = Finish(request_id=sub.request_id, reason=reason, prompt_tokens=len(sub.prompt_ids),
                        completion_tokens=len(solo.delivered), cached_tokens=run.cached_tokens,
                        prefilled_tokens=run.prefilled_tokens)
        if kv is not None:
            tokens = (tuple(sub.prompt_ids) + tuple(solo.delivered))[: kv.n_tokens]  # the tokens the KV covers
            handle = self.kv_table.put(kv)  # with the drafter's context: a speculative next turn continues it
            # as in ``_finish``: the Cache actor holds the KV before the caller sees the end of the turn
            self._post(lambda: self.cache_inbox(CacheInsert(sub.session_id, handle, tokens),
                                                then=lambda: self.sink(finish)))
        else:
            self._post(finish)

    def _demote_solo(self) -> None:
        """Moves the lone speculative request into the batch, with the KV the speculative engine built for its
        prompt + delivered tokens: the batch prefills nothing again (the last delivered token is fed by the next
        step). Joins at once (nothing to prefill), ahead of whatever waits."""
        self._admit([self._evict_solo()])

    def _evict_solo(self) -> Submit:
        solo, self.solo = self.solo, None
        run = solo.gen
        sent = run.sent_chars  # before the handover ends the run
        kv = run.handover()  # None if the run never got as far as a consistent cache: then a full re-prefill
        self.counters["spec_demoted"] += 1
        self.counters["prefilled"] += run.prefilled_tokens
        self.counters["cached"] += run.cached_tokens
        return self._moved_submit(solo.sub, solo.delivered, kv, kv.n_tokens if kv is not None else 0,
                                  (run.cached_tokens, run.prefilled_tokens),
                                  solo.sub.resume_chars if sent is None else sent)

    def _count_spec(self, sub: Submit) -> None:
        if sub.request_id not in self._spec_counted and self._wants_spec(sub):
            self._spec_counted.add(sub.request_id)
            self.counters["spec_requests"] += 1

    def _admit(self, subs: list[Submit], engine=None) -> None:
        """Joins ``subs`` to ``engine`` (the target-only batch, or the spec batch) in one batched prefill."""
        engine = engine if engine is not None else self.engine
        kvs = [self.kv_table.take(s.cache_handle) if s.cache_handle is not None else None for s in subs]
        admissions = []  # (every handle taken first: a crash below leaves none behind in the table)
        for sub, kv in zip(subs, kvs):
            self._fault("admit", request_id=sub.request_id)
            admissions.append(Admission(sub.request_id, sub.prompt_ids, sub.params, sub.resume_ids, kv,
                                        sub.cached_tokens if kv is not None else 0, sub.resume_chars))
        if len(subs) > 1 and self._join(subs, admissions, engine, report=False):
            return
        for sub, a in zip(subs, admissions):  # one by one: a bad request fails alone, the others join
            self._join([sub], [a], engine)

    def _join(self, subs: list[Submit], admissions: list[Admission], engine, report: bool = True) -> bool:
        try:
            seqs = engine.add_many(admissions)
        except MachError as e:  # raised before any work: nothing was admitted
            if report:
                self._moved.pop(subs[0].request_id, None)
                self._spec_counted.discard(subs[0].request_id)
                self._post(RequestFailed(subs[0].request_id, str(e)))
            return False
        for sub, seq in zip(subs, seqs):
            self._submits[sub.request_id] = sub
            self.counters["prefilled"] += seq.prefilled_tokens
            moved = self._moved.pop(sub.request_id, None)
            if moved is None:
                self.counters["cached"] += seq.cached_tokens
            else:  # the request's own counts: what it reused and prefilled before the move, plus what this lane
                # prefilled; the handed-over KV is its own work, not a reuse
                seq.cached_tokens = moved[0]
                seq.prefilled_tokens += moved[1]
            if engine is not self.engine:
                self._count_spec(sub)
            # a replayed request that had in fact completed before the crash
            if sub.resume_ids and sub.resume_ids[-1] in seq.stop_ids:
                self._finish(sub.request_id, "stop")
            elif len(sub.resume_ids) >= sub.params.max_tokens:
                self._finish(sub.request_id, "length")
        return True

    def _step(self) -> None:
        # the previous step's outputs go out once the next step is queued: the consumers' Python then runs
        # while the device computes, not while this thread builds the next graph
        settle, self._settle = self._settle, False
        outs = self.engine.step(on_launched=self._flush, launch_next=not settle)
        self.counters["steps"] += 1
        self.histogram[len(outs)] += 1
        self.counters["generated"] += len(outs)
        self._report_routing()
        self._fault("step", steps=self.counters["steps"])
        self._outbox.extend(TokenOutput(o.request_id, o.index, (o.token,), o.text,
                                        (o.logprobs,) if o.logprobs is not None else None) for o in outs)
        for o in outs:
            if o.finish_reason is not None:
                self._finish(o.request_id, o.finish_reason)

    def _report_routing(self) -> None:
        """Tells the ExpertStore actor which experts the last forward used (streaming residency): its predictor
        prefetches for the next one. After a speculative cycle that is the union over the verified block, which
        is what the next verify will largely need again."""
        if self.expert_inbox is not None and self.routing_source is not None:
            routing = self.routing_source()
            if routing is not None:
                self.expert_inbox(StepRouting(routing))

    def _finish(self, request_id: str, reason: str) -> None:
        sub = self._submits.pop(request_id)
        self._spec_counted.discard(request_id)
        store_kv = sub.session_id is not None and self.cache_inbox is not None and reason != "abort"
        kv = None
        if self.spec_batch is not None and self.spec_batch.has(request_id):
            # with the draft's context: a speculative next turn continues it
            kv, seq = self.spec_batch.handover(request_id) if store_kv else (None, self.spec_batch.remove(request_id))
            n = kv.n_tokens if kv is not None else 0
        else:
            if store_kv:
                kv, n = self.engine.extract_kv(request_id)
            seq = self.engine.remove(request_id)
        self.counters["aborted" if reason == "abort" else "completed"] += 1
        finish = Finish(
            request_id=request_id, reason=reason, prompt_tokens=len(sub.prompt_ids),
            completion_tokens=len(seq.generated), cached_tokens=seq.cached_tokens,
            prefilled_tokens=seq.prefilled_tokens,
        )
        if kv is not None:
            tokens = (tuple(sub.prompt_ids) + tuple(seq.generated))[:n]  # the tokens the KV covers
            # the Cache actor must hold the KV before the caller sees the end of the turn (its next turn's
            # lookup would otherwise race the insert): the Finish follows the insert on the event loop
            handle = self.kv_table.put(kv)
            self._post(lambda: self.cache_inbox(CacheInsert(sub.session_id, handle, tokens),
                                                then=lambda: self.sink(finish)))
        else:
            self._post(finish)

    def _abort(self, request_id: str) -> None:
        if self.solo is not None and self.solo.sub.request_id == request_id:
            self._finish_solo("abort")
            return
        for i, sub in enumerate(self.pending):
            if sub.request_id == request_id:
                del self.pending[i]
                self.counters["aborted"] += 1
                self._post(Finish(request_id=request_id, reason="abort", prompt_tokens=len(sub.prompt_ids),
                                  completion_tokens=len(sub.resume_ids), cached_tokens=0, prefilled_tokens=0))
                return
        if self.engine.has(request_id) or (self.spec_batch is not None and self.spec_batch.has(request_id)):
            self._finish(request_id, "abort")

