"""Continuous batching on the MLX thread: requests join and leave a running batch between decode steps.

Joining is two-phase so a long prompt never stalls the running rows for its whole prefill: ``begin(admissions)``
merges the newcomers' caches (empty, or a reused prefix KV) into a ``Prefill`` whose ``advance()`` runs ONE chunk
of their prompts (right-padded: k newcomers cost one prefill), and ``join(prefill)`` adds them to the batch once
it is done; the scheduler interleaves chunks with decode steps. ``add_many`` does all three at once.

Every ``step()`` feeds each row its pending token, samples every row with THE sampler (``sampling.sample_rows``:
keyed by (seed, completion position)) and ends rows on token-level conditions (``emit.StopRule``); text and stop
strings are the front end's (``emit.Emitter``). A finished row stays until it is removed.

Synchronous and single-threaded by design: the scheduler calls it from the one MLX thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache

from ..config import resolve_submit_layers
from ..errors import ConfigError
from .constraints import constraint_for
from .emit import StopRule
from .kv_prefix import fit_prefix
from .layer_submission import SubmittingCaches
from .model_head import ModelHead
from .sampling import apply_bitmask, check, penalize, sample_rows, token_logprobs

PREFILL_STEP = 512


@dataclass
class StepOutput:
    request_id: str
    index: int  # position of this token in the completion
    token: int
    finish_reason: str | None  # token-level: "stop" (a stop token) or "length"
    logprobs: tuple | None = None  # (logprob, ((top id, logprob), ...)) when the request asked for them


@dataclass
class Admission:
    """A request joining a batch: ``kv`` (single-request caches) covers ``prompt_ids[:cached_tokens]``;
    ``resume_ids`` are completion tokens already delivered (a replay after a crash, a move between lanes)."""

    request_id: str
    prompt_ids: tuple
    params: object  # sampling.SamplingParams
    resume_ids: tuple = ()
    kv: object = None
    cached_tokens: int = 0
    boundaries: tuple = ()  # token counts (> cached) at which ``BatchEngine.on_boundary`` sees its prefilled caches


@dataclass
class _Seq:
    request_id: str
    prompt: tuple
    params: object  # SamplingParams, seed resolved
    rule: StopRule
    generated: list = field(default_factory=list)
    next_token: int = 0
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    finish: str | None = None
    constraint: object = None  # GrammarConstraint (engine/constraints.py) when the request has a grammar

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    def row(self, ahead=None):
        """(params, completion position[, history]) of this row's next draw; ``ahead``: the lazy token of a step
        in flight (generated, not yet read back)."""
        pos = len(self.generated) + (ahead is not None)
        if not self.params.processors:  # (``ahead`` is then just True)
            return self.params, pos
        hist = mx.array(list(self.prompt) + self.generated, dtype=mx.uint32)
        return self.params, pos, hist if ahead is None else mx.concatenate([hist, ahead.astype(mx.uint32)])


def prefill_chunks(cache, todos: list[list[int]], step: int, forward, stops=()):
    """Feeds each row's ``todos[i]`` into the batch caches ``cache``, ONE forward of ``step`` tokens per ``next``
    (a generator: the caller interleaves chunks with other work); a chunk also ends at every column in ``stops``.
    Rows of different lengths are right-padded and the caches told so (mlx-lm's ``prepare`` / ``finalize``, as
    its BatchGenerator does). ``forward(tokens [B, T], start)`` runs one chunk over ``cache`` and returns an array
    to evaluate with it, or None."""
    lengths = [len(t) for t in todos]
    width = max(lengths) if lengths else 0
    if width == 0:
        return
    padding = [width - n for n in lengths]
    if any(padding):
        for c in cache:
            c.prepare(lengths=lengths, right_padding=padding)
    rows = mx.array([t + [0] * p for t, p in zip(todos, padding)], dtype=mx.uint32)
    start = 0
    for end in sorted(set(range(step, width, step)) | {s for s in stops if 0 < s < width}) + [width]:
        out = forward(rows[:, start:end], start)
        mx.eval([c.state for c in cache] + ([out] if out is not None else []))
        last = end >= width
        if last and any(padding):
            for c in cache:
                c.finalize()
            mx.eval([c.state for c in cache])
        yield end - start, last
        start = end


def prefill_rows(cache, todos, step: int, forward) -> None:
    """``prefill_chunks`` run to the end."""
    for _ in prefill_chunks(cache, todos, step, forward):
        pass


class Prefill:
    """Newcomers being prefilled: their merged caches, their records and the chunks still to run."""

    def __init__(self, members: list, cache, chunks, points=None, on_point=None):
        self.members = members
        self.cache = cache
        self._chunks = chunks
        self.done = chunks is None
        self.column = 0  # prompt columns fed so far
        self.points = points or {}  # column -> [(row, request_id, tokens)]: ``on_point`` after that chunk
        self.on_point = on_point
        self.drawn = {}  # "first": (tokens, logprobs) drawn from the rows' last logits by the last chunk (BatchEngine)

    @property
    def request_ids(self) -> list[str]:
        return [m.request_id for m in self.members]

    def advance(self) -> int:
        """Runs one chunk; returns the tokens per row it fed (0 once done)."""
        if self.done:
            return 0
        n, last = next(self._chunks, (0, True))
        self.done = last
        self.column += n
        for row, request_id, tokens in self.points.pop(self.column, ()) if not last else ():
            self.on_point(row, request_id, tokens)
        return n

    def finish(self) -> None:
        while not self.done:
            self.advance()


def boundary_prefill(members: list, cache, rows: list, step: int, forward, on_boundary=None, extract_row=None):
    """The chunked prefill of every lane (batch, spec batch, solo, ``warm_prefix``) with its prefix-cache boundary
    points. ``rows[i] = (request_id, tokens, cached, boundaries, todo)`` for row i of ``cache``: it feeds ``todo``
    (``tokens[cached:-1]`` in the decode lanes, ``tokens[cached:]`` for a warm prefix); a chunk also ends at each
    boundary ``t`` with ``cached < t < cached + len(todo)``, where ``on_boundary(request_id, extract, tokens[:t])``
    is called with ``extract() ->`` row i's single-request caches (``extract_row(i)``). Returns the ``Prefill``."""
    points: dict = {}
    todos = []
    for i, (request_id, tokens, cached, boundaries, todo) in enumerate(rows):
        todos.append(todo)
        for t in boundaries if on_boundary is not None else ():
            if cached < t < cached + len(todo):
                points.setdefault(t - cached, []).append((i, request_id, tuple(tokens[:t])))

    def on_point(row, request_id, tokens):
        on_boundary(request_id, lambda: extract_row(row), tokens)

    chunks = prefill_chunks(cache, todos, step, forward, sorted(points))
    return Prefill(members, cache, chunks, points, on_point)


class BatchMembership:
    """Who is in a continuous batch: ``_members()`` lists the requests in the row order of the batch caches
    ``self.cache`` (``request_id`` each); ``_filter(keep)`` drops every other row. Shared with
    ``specdec.batched.BatchedSpecDecoder``."""

    max_batch: int
    cache = None
    # on_boundary(request_id, extract, tokens): a prefilling request reached one of its ``boundaries``; ``extract()``
    # gives its single-request caches covering ``tokens`` (the prefix cache's boundary snapshots: ``boundary_prefill``)
    on_boundary = None

    def _members(self) -> list:
        raise NotImplementedError

    def _filter(self, keep: list[int]) -> None:
        raise NotImplementedError

    @property
    def active(self) -> int:
        return len(self._members())

    @property
    def full(self) -> bool:
        return len(self._members()) >= self.max_batch

    def has(self, request_id: str) -> bool:
        return any(m.request_id == request_id for m in self._members())

    def _join_caches(self, merged: list) -> None:
        """Appends the batch caches of newly prefilled rows (one per layer) below the current rows."""
        if self.cache is None:
            self.cache = merged
        else:
            for c, m in zip(self.cache, merged):
                c.extend(m)

    def join(self, prefill: Prefill) -> list:
        """Adds a finished ``Prefill``'s rows to the batch; returns their records."""
        prefill.finish()
        if len(self._members()) + len(prefill.members) > self.max_batch:
            raise RuntimeError("batch is full")
        self._join_caches(prefill.cache)
        self._members().extend(prefill.members)
        return prefill.members

    def add_many(self, admissions: list, *args) -> list:
        """Prefills requests in one batched forward per chunk and joins them (see ``begin``)."""
        return self.join(self.begin(admissions, *args))

    def remove(self, request_id: str):
        """Drops the request's row (its cache rows too); returns its record, or None if it is not here."""
        members = self._members()
        for i, m in enumerate(members):
            if m.request_id == request_id:
                self._filter([j for j in range(len(members)) if j != i])
                return m
        return None

    def _extract(self, request_id: str):
        """(row index, the request's cache as single-request caches)."""
        i = next(i for i, m in enumerate(self._members()) if m.request_id == request_id)
        if not getattr(self, "mergeable", True):  # one request on its own caches
            return i, list(self.cache)
        return i, [c.extract(i) for c in self.cache]


def merge_caches(caches: list) -> list:
    """Single-request caches (one list per request) → per-layer batch caches. A lone request's filled plain KV
    becomes its batch cache as it is (mlx-lm's ``merge`` would copy it into a new buffer: a prefix hit's KV)."""
    if len(caches) == 1:
        return [_adopt(c) if type(c) is KVCache and c.keys is not None else type(c).merge([c]) for c in caches[0]]
    return [type(layer[0]).merge(list(layer)) for layer in zip(*caches)]


def _adopt(c: KVCache) -> BatchKVCache:
    """A one-row ``BatchKVCache`` over ``c``'s buffers (what ``BatchKVCache.merge([c])`` holds, uncopied)."""
    b = BatchKVCache([0])
    b.keys, b.values, b._idx = c.keys, c.values, c.offset
    b.offset = b.offset + c.offset
    return b


class BatchEngine(BatchMembership):
    def __init__(self, model, tokenizer, max_batch: int = 8, prefill_step: int = PREFILL_STEP, pipeline: bool = True,
                 mergeable: bool = True, submit_layers: bool | None = None):
        """``mergeable=False``: the family's caches cannot merge into batch caches (its capabilities say
        ``batch=False``): one request at a time, on its own caches. ``submit_layers``: decode forwards hand each
        layer to the stream as soon as it is built (``SubmittingCaches``); None: ``MACH_SUBMIT_LAYERS`` (default
        off)."""
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        self.mergeable = mergeable
        max_batch = max_batch if mergeable else 1
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.prefill_step = prefill_step
        self.seqs: list[_Seq] = []  # row order of the batch caches
        self.cache = None  # per-layer batch caches, None while the batch is empty
        self.eos = frozenset(tokenizer.eos_token_ids)
        self.steps = 0
        self.pipeline = pipeline
        self._inflight = None  # sampled tokens [rows] of the queued step, not yet read back
        self._inflight_rows: list[_Seq] = []
        self._inflight_lp = None  # their token_logprobs(...) when a row asked for logprobs
        self.submit_layers = resolve_submit_layers(submit_layers)
        self._ready: list[StepOutput] = []  # newcomers' first draws (``take_ready``)
        self._head = ModelHead(model)

    # -- membership ---------------------------------------------------------------------------------------
    def _members(self) -> list:
        return self.seqs

    def add(self, request_id: str, prompt_ids, params, resume_ids=(), kv=None, cached_tokens: int = 0) -> _Seq:
        """Prefills a request and joins it to the batch. ``kv`` covers ``prompt_ids[:cached_tokens]``."""
        return self.add_many([Admission(request_id, prompt_ids, params, tuple(resume_ids), kv, cached_tokens)])[0]

    def begin(self, admissions: list[Admission], prefill_step: int | None = None) -> Prefill:
        """The newcomers' ``Prefill`` (nothing run yet; ``prefill_step`` tokens per chunk, default the engine's).
        Checks every request first: a bad one raises and nothing is admitted. Every token is fed, the last one
        too: the chunk holding a row's last token also gives its logits (at that position only), and the last
        chunk draws each row's next token from them (``join`` reads them back for ``take_ready``)."""
        from mlx_lm.models.cache import make_prompt_cache

        rows, caches, seqs = [], [], []
        for a in admissions:
            check(a.params)
            tokens = [int(t) for t in list(a.prompt_ids) + list(a.resume_ids)]
            if not tokens:
                raise ConfigError("the prompt is empty: give at least one token")
            # a reused KV is cut to what the request shares, but at least the last token is fed (its logits)
            kv, cached = fit_prefix(a.kv, min(a.cached_tokens, len(tokens) - 1)) if a.kv is not None else (None, 0)
            if kv is None:
                kv, cached = make_prompt_cache(self.model), 0
            rows.append((a.request_id, tokens, cached, a.boundaries, tokens[cached:]))
            caches.append(kv)
            p = a.params.resolved()
            # (the last prompt token counts as decoded, not prefilled, as when a decode step fed it)
            seq = _Seq(a.request_id, tuple(a.prompt_ids), p, StopRule(p, self.eos), [int(t) for t in a.resume_ids],
                       tokens[-1], cached_tokens=cached, prefilled_tokens=len(tokens) - 1 - cached,
                       constraint=constraint_for(p, self.tokenizer, a.resume_ids))
            if seq.generated:  # a replayed request that had in fact ended before the crash
                seq.finish = seq.rule.finish(seq.generated[-1], len(seq.generated))
            seqs.append(seq)
        if not self.mergeable and len(caches) > 1:
            raise ConfigError("this family's caches cannot be batched: admit one request at a time")
        merged = merge_caches(caches) if self.mergeable else caches[0]
        last = [len(r[4]) - 1 for r in rows]  # the prefill column of each row's last token
        width = max(last) + 1
        picked: dict = {}  # row -> its last token's logits [V]
        drawn: dict = {}  # "first": (tokens, logprobs) (the closure holds no reference to the Prefill: no cycle)

        def forward(tokens, start):
            end = start + tokens.shape[1]
            ending = [i for i, c in enumerate(last) if start <= c < end]
            if not ending:
                self.model(tokens, cache=merged)  # the logits are never evaluated
                return None
            head = self._head  # (its text model called from here: one file less on a request's path)
            out = head.inner(tokens, merged) if head.splits else self.model(tokens, cache=merged)
            logits = head.logits_of(out, ending, [last[i] - start for i in ending])
            for j, i in enumerate(ending):
                picked[i] = logits[j]
            if end < width:
                return logits
            tokens, lp = drawn["first"] = self._first_draws(seqs, mx.stack([picked[i] for i in range(len(seqs))]))
            return [tokens, *(lp or ())]

        pf = boundary_prefill(seqs, merged, rows, prefill_step or self.prefill_step, forward, self.on_boundary,
                              lambda row: [c.extract(row) for c in merged] if self.mergeable else list(merged))
        pf.drawn = drawn
        return pf

    def _first_draws(self, seqs: list, raw: mx.array) -> tuple:
        """(tokens [rows], token_logprobs or None): the newcomers' next draws from their last logits ``raw``."""
        tokens = sample_rows(self._processed(raw, seqs), [s.row() for s in seqs])
        k = max((s.params.top_logprobs for s in seqs if s.params.logprobs), default=-1)
        return tokens, (token_logprobs(raw, tokens, k) if k >= 0 else None)

    def join(self, prefill: Prefill) -> list:
        """Adds a finished ``Prefill``'s rows to the batch with their next token drawn (their outputs wait in
        ``take_ready``); returns their records."""
        members = super().join(prefill)
        tokens, lp = prefill.drawn.pop("first")
        lps = [a.tolist() for a in lp] if lp is not None else None
        self._ready.extend(self._record(members, tokens.tolist(), lps, skip_finished=True))
        return members

    def take_ready(self) -> list[StepOutput]:
        """The tokens drawn at the end of the prefills joined since the last call (each newcomer's first), which
        no ``step`` has returned yet (``step`` returns them ahead of its own)."""
        out, self._ready = self._ready, []
        return out

    def _filter(self, keep: list[int]) -> None:
        if len(keep) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in keep]
        if not keep:
            self.cache, self._inflight, self._inflight_rows, self._inflight_lp = None, None, [], None
            return
        for c in self.cache:
            c.filter(keep)  # (a single-row cache that cannot merge never keeps fewer rows: it empties above)
        if self._inflight is not None:  # drop the removed rows from the step in flight too
            kept = {id(s) for s in self.seqs}
            rows = [i for i, s in enumerate(self._inflight_rows) if id(s) in kept]
            self._inflight = self._inflight[mx.array(rows)] if rows else None
            if self._inflight_lp is not None:
                self._inflight_lp = tuple(a[mx.array(rows)] for a in self._inflight_lp) if rows else None
            self._inflight_rows = [self._inflight_rows[i] for i in rows]

    def clear(self) -> None:
        """Drops every row (after a failed step: the caches are not to be trusted)."""
        self.seqs, self.cache, self._inflight, self._inflight_rows, self._inflight_lp = [], None, None, [], None

    def extract_kv(self, request_id: str):
        """(caches, n): the request's cache as single-request caches, covering its first ``n`` tokens
        (prompt + generated; the newest token is covered only if a step in flight already fed it)."""
        if not self.mergeable:
            i, kv = 0, list(self.cache)
        else:
            i, kv = self._extract(request_id)
        n = next((c.offset for c in kv if isinstance(getattr(c, "offset", None), int)), None)
        s = self.seqs[i]
        return kv, (n if n is not None else s.prompt_len + len(s.generated) - 1)

    # -- decoding -----------------------------------------------------------------------------------------
    def _launch(self, cur=None, cur_rows=()) -> None:
        """Queues one forward + sampling for every row; rows in ``cur_rows`` feed their (lazy) token from
        ``cur``, rows that joined since feed their pending token."""
        pos = {id(s): i for i, s in enumerate(cur_rows)}
        kept = [pos[id(s)] for s in self.seqs if id(s) in pos]
        fresh = [s.next_token for s in self.seqs if id(s) not in pos]
        parts = []
        if kept:
            parts.append(cur if len(kept) == len(cur_rows) and kept == list(range(len(kept))) else cur[mx.array(kept)])
        if fresh:
            parts.append(mx.array(fresh, dtype=mx.uint32))
        inputs = parts[0] if len(parts) == 1 else mx.concatenate([p.astype(mx.uint32) for p in parts])
        cache = SubmittingCaches(self.cache) if self.submit_layers else self.cache
        raw = self.model(inputs[:, None], cache=cache)[:, -1, :]
        rows = [s.row((cur[pos[id(s)] : pos[id(s)] + 1] if s.params.processors else True) if id(s) in pos else None)
                for s in self.seqs]
        self._inflight = sample_rows(self._processed(raw), rows)
        self._inflight_rows = list(self.seqs)
        k = max((s.params.top_logprobs for s in self.seqs if s.params.logprobs), default=-1)
        self._inflight_lp = token_logprobs(raw, self._inflight, k) if k >= 0 else None
        mx.async_eval(self._inflight, *(self._inflight_lp or ()))

    def _processed(self, logits: mx.array, seqs=None) -> mx.array:
        """Penalties and grammar masks of the rows (``seqs``, default the batch's) that have them (such rows are
        never pipelined: their state includes the newest token, read back)."""
        seqs = self.seqs if seqs is None else seqs
        if any(s.params.presence_penalty or s.params.frequency_penalty for s in seqs):
            logits = mx.stack([penalize(logits[i], s.generated, s.params.presence_penalty, s.params.frequency_penalty)
                               for i, s in enumerate(seqs)])
        constrained = [(i, s.constraint) for i, s in enumerate(seqs) if s.constraint is not None]
        if constrained:
            words = max(c.words for _, c in constrained)
            bitmask = np.full((len(seqs), max(words, (logits.shape[-1] + 31) // 32)), -1, dtype=np.int32)
            for i, c in constrained:
                bitmask[i, :] = 0
                c.fill(bitmask[i, : c.words])
            logits = apply_bitmask(logits, bitmask)
        return logits

    @property
    def in_flight(self) -> bool:
        """A step is queued whose tokens no ``step`` has read back yet (its rows' caches already hold their
        newest token)."""
        return self._inflight is not None

    def step(self, on_launched=None, launch_next: bool = True) -> list[StepOutput]:
        """One batched decode step: the tokens of every running row of the step in flight; or, when rows that
        joined since have first draws nobody took (``take_ready``), those alone (no step).

        With ``pipeline`` on, the next step is queued before this one's tokens are read back, so building the
        next graph on the host overlaps the device's work (as mlx-lm's generators do). A row that finishes
        here was already part of the queued step; that wasted row is dropped when it leaves the batch.
        ``launch_next=False`` queues none (a batch about to hand its rows' KV over: each cache then covers all
        but the row's newest token, which the next engine feeds).
        """
        ready = self.take_ready()
        if ready:  # the first draws of rows that joined since: they go out alone, the rows step at the next call
            return ready
        if any(s.finish for s in self.seqs):  # rows that ended (e.g. replayed complete) and nobody removed
            self._filter([i for i, s in enumerate(self.seqs) if not s.finish])
        if not self.seqs:
            return []
        if self._inflight is None:
            self._launch()
        cur, rows, lp = self._inflight, self._inflight_rows, self._inflight_lp
        self._inflight, self._inflight_rows, self._inflight_lp = None, [], None
        if self.pipeline and launch_next and not any(s.params.host_bound for s in self.seqs):
            self._launch(cur, rows)
        if on_launched is not None:  # the caller's host work overlaps the device's (e.g. delivering outputs)
            on_launched()
        tokens = cur.tolist()
        lps = [a.tolist() for a in lp] if lp is not None else None
        self.steps += 1
        return self._record(rows, tokens, lps)

    def _record(self, rows: list, tokens: list, lps, skip_finished: bool = False) -> list[StepOutput]:
        """Appends each row's drawn token (``tokens[i]`` for ``rows[i]``) and ends rows on their stop rules; returns
        the outputs. ``skip_finished``: rows that already ended (a replayed request) draw nothing."""
        out = []
        for i, (s, t) in enumerate(zip(rows, tokens)):
            if skip_finished and s.finish:
                continue
            index = len(s.generated)
            s.generated.append(t)
            s.next_token = t
            if s.constraint is not None:
                s.constraint.advance(t)
            s.finish = s.rule.finish(t, len(s.generated))
            o = StepOutput(s.request_id, index, t, s.finish)
            if lps is not None and s.params.logprobs:
                k = s.params.top_logprobs
                o.logprobs = (lps[0][i], tuple(zip(lps[1][i][:k], lps[2][i][:k])))
            out.append(o)
        return out
