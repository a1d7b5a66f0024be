"""Continuous batching on the MLX thread: requests join and leave a running batch between decode steps.

A new request is prefilled alone (batch of one, chunked, reusing a prefix KV when one is handed over) up to but
not including its last token; its cache is then merged into the running batch's caches (mlx-lm's batch caches:
left-padded KV, batched recurrent state). Every ``step()`` feeds each request's pending token, samples each row
with its own parameters, detokenizes, checks stop conditions and reports the new tokens. A finished or aborted
request is filtered out of the batch at once, freeing its slot for the next step.

Synchronous and single-threaded by design: the Decoder actor calls it from the one MLX thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ..errors import ConfigError
from .constraints import constraint_for
from .kv_prefix import fit_prefix
from .sampling import apply_bitmask, penalize, sample_batch, token_logprobs, validate

PREFILL_STEP = 512


@dataclass
class StepOutput:
    request_id: str
    index: int  # position of this token in the completion
    token: int
    text: str  # text released by this token (stop-string prefixes are held back)
    finish_reason: str | None
    logprobs: tuple | None = None  # (logprob, ((top id, logprob), ...)) when the request asked for them


@dataclass
class Admission:
    """A request joining the batch: ``kv`` (single-request caches) covers ``prompt_ids[:cached_tokens]``;
    ``resume_ids`` are completion tokens already delivered (a replay after a Decoder restart, a move between
    lanes); ``resume_chars`` how much of their text the client has (None: all; less where a partial stop-string
    match was held back)."""

    request_id: str
    prompt_ids: tuple
    params: object  # SamplingParams
    resume_ids: tuple = ()
    kv: object = None
    cached_tokens: int = 0
    resume_chars: int | None = None


@dataclass
class _Seq:
    request_id: str
    prompt_len: int
    params: object  # SamplingParams
    stop_ids: frozenset
    detok: object
    generated: list = field(default_factory=list)
    next_token: int = 0
    sent_chars: int = 0  # characters of detok.text already released
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    constraint: object = None  # GrammarConstraint (engine/constraints.py) when the request has a grammar

    def row(self, ahead: int = 0):
        """Sampling parameters of this row; ``ahead`` tokens are generated but not yet read back."""
        p = self.params
        return (p.temperature, p.top_p, p.top_k, p.seed, len(self.generated) + ahead, p.min_p)


def _hold_back(text: str, stops) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def prefill_rows(cache, todos: list[list[int]], step: int, forward) -> None:
    """Feeds each row's ``todos[i]`` into the batch caches ``cache`` in one forward per chunk of ``step`` tokens:
    rows of different lengths are right-padded and the caches told so (mlx-lm's ``prepare`` / ``finalize``, as its
    BatchGenerator does: the padding ends up as masked left padding), so k new requests cost one prefill, not k.
    ``forward(tokens [B, T], start)`` runs one chunk over ``cache`` and returns an array to evaluate with it, or
    None."""
    lengths = [len(t) for t in todos]
    width = max(lengths)
    if width == 0:
        return
    padding = [width - n for n in lengths]
    if any(padding):
        for c in cache:
            c.prepare(lengths=lengths, right_padding=padding)
    rows = mx.array([t + [0] * p for t, p in zip(todos, padding)], dtype=mx.uint32)
    for start in range(0, width, step):
        out = forward(rows[:, start : start + step], start)
        mx.eval([c.state for c in cache] + ([out] if out is not None else []))
    if any(padding):
        for c in cache:
            c.finalize()
        mx.eval([c.state for c in cache])


class BatchMembership:
    """Who is in a continuous batch: ``_members()`` lists the requests in the row order of the batch caches
    ``self.cache`` (``request_id`` each); ``_filter(keep)`` drops every other row. Shared with
    ``specdec.batched.BatchedSpecDecoder``."""

    max_batch: int
    cache = None

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
        return i, [c.extract(i) for c in self.cache]


class BatchEngine(BatchMembership):
    def __init__(self, model, tokenizer, max_batch: int = 8, prefill_step: int = PREFILL_STEP, pipeline: bool = True):
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
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

    # -- membership ---------------------------------------------------------------------------------------
    def _members(self) -> list:
        return self.seqs

    def add(self, request_id: str, prompt_ids, params, resume_ids=(), kv=None, cached_tokens: int = 0) -> _Seq:
        """Prefills a request and joins it to the batch. ``kv`` covers ``prompt_ids[:cached_tokens]``."""
        return self.add_many([Admission(request_id, prompt_ids, params, tuple(resume_ids), kv, cached_tokens)])[0]

    def add_many(self, admissions: list["Admission"]) -> list[_Seq]:
        """Prefills several requests in one batched forward per chunk and joins them to the batch.

        Prompts of different lengths are right-padded and the caches told so (mlx-lm's ``prepare`` /
        ``finalize``, as its BatchGenerator does), so k new requests cost one prefill, not k. Checks every
        request before any work: a bad one raises and nothing is admitted.
        """
        from mlx_lm.models.cache import make_prompt_cache

        if len(self.seqs) + len(admissions) > self.max_batch:
            raise RuntimeError("batch is full")
        todos, caches, seqs = [], [], []
        for a in admissions:
            p = a.params
            validate(p.temperature, p.top_p, p.top_k, p.min_p, p.presence_penalty, p.frequency_penalty, p.top_logprobs)
            tokens = list(a.prompt_ids) + list(a.resume_ids)
            if not tokens:
                raise ConfigError("the prompt is empty: give at least one token")
            # a reused KV is cut to what the request shares, but the last token is always fed by a step
            kv, cached = fit_prefix(a.kv, min(a.cached_tokens, len(tokens) - 1)) if a.kv is not None else (None, 0)
            if kv is None:
                kv, cached = make_prompt_cache(self.model), 0
            todos.append(tokens[cached:-1])
            caches.append(kv)
            seqs.append(self._new_seq(a, tokens, cached))
        merged = [type(layer[0]).merge(list(layer)) for layer in zip(*caches)]
        self._prefill(merged, todos)
        self._join_caches(merged)
        self.seqs.extend(seqs)
        return seqs

    def _new_seq(self, a: "Admission", tokens: list[int], cached: int) -> _Seq:
        detok = self.tokenizer.detokenizer  # a fresh streaming detokenizer per access
        detok.reset()
        seq = _Seq(a.request_id, len(a.prompt_ids), a.params, self.eos | frozenset(a.params.stop_token_ids), detok,
                   cached_tokens=cached, prefilled_tokens=len(tokens) - 1 - cached,
                   constraint=constraint_for(a.params, self.tokenizer, a.resume_ids))
        for t in a.resume_ids:  # a replayed request continues its text exactly where it left off
            seq.generated.append(t)
            if t not in seq.stop_ids:
                detok.add_token(t)
        full = len(detok.text)
        seq.sent_chars = full if a.resume_chars is None else max(0, min(a.resume_chars, full))
        seq.next_token = tokens[-1]
        return seq

    def _prefill(self, cache, todos: list[list[int]]) -> None:
        """Feeds each row's ``todos[i]`` into the batch caches ``cache`` (right-padded, in chunks)."""

        def forward(tokens, start):
            self.model(tokens, cache=cache)  # the logits are never evaluated

        prefill_rows(cache, todos, self.prefill_step, forward)

    def _filter(self, keep: list[int]) -> None:
        if len(keep) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in keep]
        if not keep:
            self.cache, self._inflight, self._inflight_rows, self._inflight_lp = None, None, [], None
            return
        for c in self.cache:
            c.filter(keep)
        if self._inflight is not None:  # drop the removed rows from the step in flight too
            kept = {id(s) for s in self.seqs}
            rows = [i for i, s in enumerate(self._inflight_rows) if id(s) in kept]
            self._inflight = self._inflight[mx.array(rows)] if rows else None
            if self._inflight_lp is not None:
                self._inflight_lp = tuple(a[mx.array(rows)] for a in self._inflight_lp) if rows else None
            self._inflight_rows = [self._inflight_rows[i] for i in rows]

    def extract_kv(self, request_id: str):
        """(caches, n): the request's cache as single-request caches, covering its first ``n`` tokens
        (prompt + generated; the newest token is covered only if a step in flight already fed it)."""
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
        logits = self.model(inputs[:, None], cache=self.cache)[:, -1, :]
        rows = [s.row(1 if id(s) in pos else 0) for s in self.seqs]
        raw = logits
        logits = self._processed(logits)
        if any(r[0] > 0 for r in rows):  # greedy needs no normalisation
            logits = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        self._inflight = sample_batch(logits, rows)
        self._inflight_rows = list(self.seqs)
        k = max((s.params.top_logprobs for s in self.seqs if s.params.logprobs), default=-1)
        self._inflight_lp = token_logprobs(raw, self._inflight, k) if k >= 0 else None
        mx.async_eval(self._inflight, *(self._inflight_lp or ()))

    def _processed(self, logits: mx.array) -> mx.array:
        """Penalties and grammar masks of the rows that have them (such rows are never pipelined: their state
        includes the newest token, read back)."""
        seqs = self.seqs
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

    def _host_bound(self) -> bool:
        return any(s.params.host_bound for s in self.seqs)

    @property
    def in_flight(self) -> bool:
        """A step is queued whose tokens no ``step`` has read back yet (its rows' caches already hold their
        newest token)."""
        return self._inflight is not None

    def step(self, on_launched=None, launch_next: bool = True) -> list[StepOutput]:
        """One batched decode step: the tokens of every row of the step in flight.

        With ``pipeline`` on, the next step is queued before this one's tokens are read back, so building the
        next graph on the host overlaps the device's work (as mlx-lm's generators do). A row that finishes
        here was already part of the queued step; that wasted row is dropped when it leaves the batch.
        ``launch_next=False`` queues none (a batch about to hand its rows' KV over: each cache then covers all
        but the row's newest token, which the next engine feeds).
        """
        if not self.seqs:
            return []
        if self._inflight is None:
            self._launch()
        cur, rows, lp = self._inflight, self._inflight_rows, self._inflight_lp
        self._inflight, self._inflight_rows, self._inflight_lp = None, [], None
        if self.pipeline and launch_next and not self._host_bound():
            self._launch(cur, rows)
        if on_launched is not None:  # the caller's host work overlaps the device's (e.g. delivering outputs)
            on_launched()
        tokens = cur.tolist()
        lps = [a.tolist() for a in lp] if lp is not None else None
        self.steps += 1
        out = []
        for i, (s, t) in enumerate(zip(rows, tokens)):
            index = len(s.generated)
            s.generated.append(t)
            s.next_token = t
            if s.constraint is not None:
                s.constraint.advance(t)
            o = self._emit(s, index, t)
            if lps is not None and s.params.logprobs:
                k = s.params.top_logprobs
                o.logprobs = (lps[0][i], tuple(zip(lps[1][i][:k], lps[2][i][:k])))
            out.append(o)
        return out

    def _emit(self, s: _Seq, index: int, t: int) -> StepOutput:
        stops = s.params.stop
        if t in s.stop_ids:
            s.detok.finalize()
            text = s.detok.text[s.sent_chars :]  # held-back stop-string prefixes are released
            s.sent_chars += len(text)
            return StepOutput(s.request_id, index, t, text, "stop")
        s.detok.add_token(t)
        finish = "length" if len(s.generated) >= s.params.max_tokens else None
        if finish:
            s.detok.finalize()
        full = s.detok.text
        if stops:
            start = max(0, s.sent_chars - max(len(x) for x in stops))
            hits = [full.find(x, start) for x in stops]
            hits = [h for h in hits if h >= 0]
            if hits:
                end = min(hits)
                text = full[s.sent_chars : max(end, s.sent_chars)]
                s.sent_chars = max(end, s.sent_chars)
                return StepOutput(s.request_id, index, t, text, "stop")
        release = len(full) if finish else len(full) - _hold_back(full, stops)
        text = full[s.sent_chars : max(release, s.sent_chars)]
        s.sent_chars = max(release, s.sent_chars)
        return StepOutput(s.request_id, index, t, text, finish)
