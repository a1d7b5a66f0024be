"""``BatchedSpecDecoder``: speculative decoding and continuous batching together (batched verification).

Several requests (rows) decode at once on one set of mlx-lm batch caches of the target. Each row has its own
drafter (a per-request ``DFlashDrafter`` context, prompt lookup, a custom drafter, or none = target-only), its own
block policy, sampling parameters, token-level ends (``output.Committer``) and stats. One ``step()``:

1. each row picks its block length b_i (its policy; 1 = no drafts: target-only rows, the context-length fallback,
   ``max_tokens``) and its drafter proposes b_i − 1 tokens after the row's staged token (lazily: DFlash drafts are
   queued on the device, not read back). DFlash rows drafting the same count share ONE draft pass
   (``batched_dflash_logits``: the rows' sink + window contexts left-padded and masked; equal to each row's own
   pass), so B rows cost one draft launch sequence, not B;
2. the blocks are stacked into tokens [B, b], b = max b_i; a row with fewer drafts is padded at its end with any
   token (causal attention / recurrence: padding after a row's real tokens cannot change them; it is rejected);
3. ONE target forward verifies [B, b] on the batch caches, capturing the drafters' tapped hidden states (with
   ``config.bucket_kv`` over bucketed KV lengths, ``verify_cache.bucket_batch_caches``: static shapes for MLX's CUDA);
4. each row accepts its own prefix (greedy: longest prefix equal to the target's argmax + bonus; sampled: the
   rule of THE sampler (``sampling.sample``: draws keyed by (seed, completion position)), so a row's randomness
   does not depend on its batch mates);
5. per-row rollback of the b − keep_i rejected positions (keep_i = accepted_i + 1):
   * attention (``BatchKVCache``): every row is trimmed by m = min_i(b − keep_i) (one write index), the rest r_i
     of row i's rejected tail rolled to its left end as masked left padding (mlx-lm's right-padding mechanism:
     ``prepare(right_padding=r)`` + ``finalize()``): ``offset`` (RoPE positions) drops by r_i, ``left_padding``
     grows by r_i, so each row's next block lands at its own positions and never sees a rejected key; padding
     every row has is sliced off now and then (``_compact``);
   * GatedDeltaNet (batched ``ArraysCache``): replayed per row from the ``GDNTape`` record of the verify
     (``GDNTape.replay_rows``: the recurrence alone, row i's steps past keep_i masked); no target forward. Without
     a tape (or where it cannot replay) the recurrent state is restored from a snapshot, attention trimmed back to
     the cycle start, and every row's kept tokens re-run in one right-padded forward with ``lengths``
     (``specdec_rerun_tokens``);
6. each row commits its accepted tokens + bonus (truncated at a stop token / max_tokens), its drafter
   observes the kept hidden rows, the bonus becomes its next staged token.

Greedy rows are token-identical to plain greedy decoding of the target alone (tests/test_specdec_batched.py).

Rows join between steps (``add_many``: the newcomers' caches — empty, or a reused prefix KV with the draft's
context where it brings one — merged and prefilled together by ``batch.prefill_chunks`` up to their last token, the
first staged one, each DFlash drafter observing its own rows; then merged into the running caches) and leave
between steps (``remove``; finished rows nobody removed leave at the next ``step``). The API mirrors
``engine.batch.BatchEngine`` (``Admission``, ``add_many``, ``step``, ``remove``, ``extract_kv``, ``has``,
``active``, ``full``), except that a step reports a chunk of tokens per row (``SpecStepOutput``); ``handover``
removes a row with its KV and draft context (for a session, or to continue in another engine).

Families whose prompt cache holds only ``KVCache`` and GatedDeltaNet ``ArraysCache`` layers: qwen3_moe,
qwen3_5_moe. Sliding-window (gpt_oss, gemma4) and compressed (deepseek_v4) caches cannot be rolled back per row
here: the constructor raises ``ConfigError`` (fall back to ``BatchEngine``).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field

import mlx.core as mx

from ...errors import ConfigError, RequestError
from ..batch import Admission, BatchMembership, Prefill, boundary_prefill, merge_caches
from ..kv_prefix import fit_prefix
from ..quantized_kv import PendingQuantKV
from ..emit import StopRule
from ..hooks import HookPlan, install_spec_hooks
from ..sampling import SamplingParams, accept, check, sample
from .config import BlockSpecDecEngineConfig, BlockSpecDecEngineMode
from .draft import DFlashDrafter, Drafter, PromptLookupDrafter, batchable_dflash, batched_dflash_logits, check_draft
from .engine import SpecDecKV
from .gdn_tape import GDNTape
from .output import Committer
from .row_rollback import RowRollback
from .policies import PolicyMemory, make_policy
from .stats import SpecDecStats, engine_stats
from .target import Checkpoint, TargetOps
from .verify_cache import bucket_batch_caches

__all__ = ["BatchedSpecDecoder", "SpecParams", "SpecStepOutput", "Admission"]


SpecParams = SamplingParams  # the one request-parameter type (kept under this name for callers)


@dataclass
class SpecStepOutput:
    request_id: str
    index: int  # position of token_ids[0] in the request's completion (replayed tokens included)
    token_ids: tuple  # the tokens this step committed for the row, truncated at a stop
    finish_reason: str | None


@dataclass
class _Row:
    request_id: str
    prompt_len: int
    params: object
    emitter: Committer
    drafter: Drafter | None
    policy: object
    history: list  # prompt + completion (replayed tokens included); the last one is staged (not in the cache)
    generated: list = field(default_factory=list)  # completion delivered (replayed tokens included)
    stats: SpecDecStats | None = None
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    finish: str | None = None
    context: bool = False  # its drafter has hidden states to draft from (prefilled, resumed or verified ones)
    b: int = 1  # this step's block length
    drafts: object = None  # this step's drafts (list or lazy mx.array)

    @property
    def next_token(self) -> int:
        return self.history[-1]


def _mode(params, custom: Drafter | None) -> BlockSpecDecEngineMode:
    m = getattr(params, "specdec", None)
    if m is None:
        return BlockSpecDecEngineMode.NATIVE_V7 if custom is not None else BlockSpecDecEngineMode.TARGET_ONLY
    try:
        return BlockSpecDecEngineMode(m)
    except ValueError:
        names = ", ".join(x.value for x in BlockSpecDecEngineMode)
        raise RequestError(f"specdec: unknown speculative decoding mode {m!r}; use one of {names}") from None


class BatchedSpecDecoder(RowRollback, BatchMembership):
    """Batched speculative decoding over a loaded MoE target (``load_moe``) and an optional DFlash draft."""

    def __init__(self, model, tokenizer, draft=None, *, config: BlockSpecDecEngineConfig | None = None,
                 store=None, max_batch: int = 8, target: TargetOps | None = None, batched_draft: bool = True):
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        self.config = config or BlockSpecDecEngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.max_batch = max_batch
        self.batched_draft = batched_draft  # DFlash rows share one draft pass (False: one pass per row)
        self.target = target if target is not None else TargetOps(model)
        self._attn, self._recurrent = self._check_caches()
        self.draft = draft
        self.capture: tuple = ()
        if draft is not None:
            check_draft(self.target, draft)
            self.capture = tuple(int(i) for i in draft.target_layer_ids)
        # its hooks (hooks.py): installed at load, or now on a model its caller loaded without a plan
        install_spec_hooks(model, HookPlan(tuple(sorted(set(self.capture))), self.config.gdn_tape, False))
        tape = GDNTape(self.target) if self._recurrent and self.config.gdn_tape else None
        self.tape = tape if tape is not None and len(tape) else None
        self.lookup = PromptLookupDrafter(self.config.lookup_max_ngram, self.config.lookup_min_ngram)
        self.eos = frozenset(tokenizer.eos_token_ids)
        self.rows: list[_Row] = []  # row order of the batch caches
        self.cache = None  # per-layer batch caches; None while the batch is empty
        self._stats = self._new_stats()
        self.counters = Counter()  # batch-level: steps, verify_tokens (B·b), padded_tokens, rerun_tokens
        self._policy_memory = PolicyMemory()  # cycle timings + recent acceptance, shared by the requests' policies

    # -- checks -------------------------------------------------------------------------------------------
    def _check_caches(self) -> tuple[list[int], list[int]]:
        from mlx_lm.models.cache import ArraysCache, KVCache, make_prompt_cache

        caches = make_prompt_cache(self.model)
        if not self.target.caps.spec_batch:  # the family's capability table (io.arch_registry)
            kinds = sorted({type(c).__name__ for c in caches} - {"KVCache", "ArraysCache"})
            raise ConfigError(f"{self.target.family}: batched speculative decoding cannot roll back {', '.join(kinds)} "
                              "caches per row (capabilities: spec_batch=False; only full-attention KVCache and "
                              "GatedDeltaNet ArraysCache layers); use target-only batching (BatchEngine) or "
                              "BlockSpecDecEngine for one request")
        attn = [i for i, c in enumerate(caches) if type(c) in (KVCache, PendingQuantKV)]  # (kv_bits: quantized KV)
        recurrent = [i for i, c in enumerate(caches) if type(c) is ArraysCache]
        return attn, recurrent

    # -- membership (``active``, ``full``, ``has``, ``remove``: ``BatchMembership``) -----------------------------
    def _members(self) -> list:
        return self.rows

    def row(self, request_id: str) -> _Row:
        return next(r for r in self.rows if r.request_id == request_id)

    def add(self, request_id: str, prompt_ids, params=None, resume_ids=(), kv=None, cached_tokens: int = 0, *,
            drafter: Drafter | None = None) -> _Row:
        """Prefills one request and joins it to the batch (see ``add_many``)."""
        params = params if params is not None else SpecParams()
        return self.add_many([Admission(request_id, tuple(prompt_ids), params, tuple(resume_ids), kv, cached_tokens)],
                             [drafter])[0]

    def begin(self, admissions: list[Admission], drafters: list | None = None, prefill_step: int | None = None) -> Prefill:
        """The newcomers' ``Prefill`` (``batch.BatchMembership.join`` adds them once it is done; ``add_many`` does
        both). ``drafters[i]``: a custom drafter for admission i (tests: oracle drafts), in the NATIVE_V7 slot;
        ``params.specdec`` picks the others (None = target-only). A prefix ``kv`` (``Admission.kv``, covering
        ``cached_tokens``) spares its tokens' prefill; a DFlash row then resumes the draft's context from the KV's
        ``draft_state`` (a ``SpecDecKV`` from ``handover`` or ``SpecDecRun.handover``) or, without one, drafts
        from the tokens after it only (lossless; acceptance may be lower at first). Each chunk captures the rows'
        hidden states for their drafters. Checks every request before any work: a bad one raises."""
        drafters = list(drafters) if drafters is not None else [None] * len(admissions)
        if len(drafters) != len(admissions):
            raise ValueError("drafters: one entry per admission")
        plans = []
        for a, custom in zip(admissions, drafters):
            p = a.params
            check(p)
            tokens = [int(t) for t in list(a.prompt_ids) + list(a.resume_ids)]
            if not tokens:
                raise RequestError("the prompt is empty: give at least one token")
            plans.append((a, tokens, self._drafter(p, custom)))
        rows, caches, todos = [], [], []
        for a, tokens, drafter in plans:
            if drafter is not None and drafter.needs_hidden and not self.capture:
                capture = tuple(int(i) for i in drafter.capture_layer_ids)
                install_spec_hooks(self.model, HookPlan(tuple(sorted(set(capture))), False, False))
                self.capture = capture
            row, cache, todo = self._new_row(a, tokens, drafter)
            rows.append(row)
            caches.append(cache)
            todos.append(todo)
        merged = merge_caches(caches)
        if self.config.bucket_kv:
            bucket_batch_caches(merged)
        hidden = [r.drafter is not None and r.drafter.needs_hidden for r in rows]
        capture = self.capture if any(hidden) else ()

        def forward(tokens, start):
            _, h = self.target.forward_batch(tokens, merged, capture, logits="none")
            for i, r in enumerate(rows):
                valid = min(len(todos[i]) - start, tokens.shape[1])
                if hidden[i] and valid > 0:
                    r.drafter.observe(h[i, :valid])
            return h

        points = [(a.request_id, t, r.cached_tokens, a.boundaries, todo) for (a, t, _), r, todo in zip(plans, rows, todos)]
        return boundary_prefill(rows, merged, points, prefill_step or self.config.prefill_step, forward,
                                self.on_boundary, lambda row: [c.extract(row) for c in merged])

    def _drafter(self, p, custom):
        mode = _mode(p, custom)
        drafter = None
        if mode == BlockSpecDecEngineMode.NATIVE_V7:
            if custom is not None:
                drafter = custom
            elif self.draft is not None:
                drafter = DFlashDrafter(self.draft, self.target, self.config.draft_sink, self.config.draft_window)
            else:
                raise ConfigError("mode NATIVE_V7 needs a DFlash draft; this decoder has none "
                                  "(use prompt_lookup or target_only)")
        elif mode == BlockSpecDecEngineMode.PROMPT_LOOKUP:
            drafter = custom if custom is not None else self.lookup
        if drafter is not None and drafter.needs_hidden:
            ids = tuple(int(i) for i in drafter.capture_layer_ids)
            if self.capture and ids != self.capture:
                raise ConfigError(f"a drafter captures layers {ids}; this batch captures {self.capture}")
        return drafter

    def _new_row(self, a: Admission, tokens: list[int], drafter: Drafter | None):
        """The row of admission ``a``, its single-request cache (empty, or the prefix ``kv`` fitted to the tokens
        it covers) and the tokens still to prefill (all but the last: the first staged token)."""
        p = a.params
        # a reused KV is cut to what the request shares; the last token is the first staged one
        kv, cached = (None, 0) if a.kv is None else fit_prefix(a.kv, min(a.cached_tokens, len(tokens) - 1))
        if kv is None:
            kv, cached = self.target.make_cache(bucket_kv=False), 0
        todo = tokens[cached:-1]
        context = bool(todo)
        if drafter is not None:
            drafter.start(tokens)
            if cached:  # the draft's context for the cached tokens, where the KV brings one (a ``SpecDecKV``)
                context |= bool(drafter.resume(getattr(a.kv, "draft_state", None), cached))
        resume = [int(t) for t in a.resume_ids]
        p = p.resolved()
        policy = None
        if drafter is not None:
            policy = make_policy(p.specdec_policy or self.config.policy, self.config.block_size,
                                 store=self.store, prompt_len=len(tokens), memory=self._policy_memory)
        rule = StopRule(p, self.eos)
        row = _Row(a.request_id, len(a.prompt_ids), p, Committer(rule, len(resume)), drafter, policy, list(tokens),
                   list(resume), self._new_stats(), cached_tokens=cached, prefilled_tokens=len(tokens) - 1 - cached,
                   context=context)
        if resume:  # a replayed request that had in fact ended: leaves at the next step
            row.finish = rule.finish(resume[-1], len(resume))
        return row, kv, todo

    def _filter(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = None
            return
        for c in self.cache:
            c.filter(keep)

    def extract_kv(self, request_id: str):
        """(caches, n): the request's cache as single-request caches covering its first ``n`` tokens of
        prompt + delivered completion (all but the staged token, less any accepted past a stop); (None, 0) where
        that is none, or where a recurrent state cannot give back tokens past a stop."""
        i, kv = self._extract(request_id)
        r = self.rows[i]
        return fit_prefix(kv, min(len(r.history) - 1, r.prompt_len + len(r.generated)))

    def handover(self, request_id: str):
        """Removes the request; returns (its KV as a ``SpecDecKV``: ``extract_kv``'s caches with the DFlash
        drafter's context for the same tokens, or None where ``extract_kv`` gives none; its row)."""
        kv, n = self.extract_kv(request_id)
        row = self.remove(request_id)
        if kv is None:
            return None, row
        return SpecDecKV(kv, n, row.drafter.snapshot(n) if row.drafter is not None else None), row

    def clear(self) -> None:
        """Drops every row (a crashed caller's batch)."""
        self.rows, self.cache = [], None
        if self.tape is not None:
            self.tape.clear()

    # -- stats --------------------------------------------------------------------------------------------
    def _new_stats(self) -> SpecDecStats:
        return SpecDecStats(self.config.block_size, self.config.recent_window, self.config.low_alpha)

    def stats(self) -> dict:
        """Aggregate over every row ever decoded (``SpecDecStats``: a row's verify is one of its cycles) plus
        the batch counters: ``batch_steps`` (target forwards), ``batch_verify_tokens`` (B·b per step, padding
        included), ``batch_padded_tokens`` (positions padding a row's shorter block)."""
        out = engine_stats(self._stats, self.config, self.store)
        out["batch_steps"] = self.counters["steps"]
        out["batch_verify_tokens"] = self.counters["verify_tokens"]
        out["batch_padded_tokens"] = self.counters["padded_tokens"]
        out["batch_rows_histogram"] = {k[5:]: v for k, v in sorted(self.counters.items()) if k.startswith("rows:")}
        return out

    def reset_stats(self) -> None:
        self._stats = self._new_stats()
        self.counters = Counter()

    # -- decoding -----------------------------------------------------------------------------------------
    def _want(self, r: _Row) -> int:
        """This step's block length of row ``r`` before drafting (1: no drafts)."""
        cfg = self.config
        if r.drafter is None:
            return 1
        ctx = len(r.history) - 1  # tokens in the cache
        if cfg.target_only_above_context and ctx > cfg.target_only_above_context:
            return 1
        if r.drafter.needs_hidden and not r.context:  # a one-token prompt, a KV without the draft's context:
            return 1  # nothing to draft from before one target-only step
        remaining = r.emitter.max_tokens - len(r.emitter.tokens)
        return max(1, min(r.policy.block_len(ctx), cfg.block_size, remaining))

    def _plan(self, rows: list[_Row]) -> None:
        """Each row's block length ``r.b`` and drafts ``r.drafts`` for this step (lazy where the drafter allows).
        Plain DFlash rows drafting the same number of tokens share one batched draft pass."""
        groups: dict[tuple, list[_Row]] = {}
        for r in rows:
            r.b, r.drafts = 1, []
            want = self._want(r)
            if want <= 1:
                continue
            if self.batched_draft and batchable_dflash(r.drafter):
                groups.setdefault((id(r.drafter.draft), want), []).append(r)
                continue
            self._propose(r, want)
        for (_, want), grp in groups.items():
            if len(grp) == 1:
                self._propose(grp[0], want)
                continue
            logits = batched_dflash_logits([r.drafter for r in grp], [r.next_token for r in grp], want - 1)
            drafts = mx.argmax(logits, axis=-1).astype(mx.uint32)  # [G, want - 1], lazy
            for j, r in enumerate(grp):
                r.drafts, r.b = drafts[j], want
            self.counters["batched_draft_passes"] += 1

    def _propose(self, r: _Row, want: int) -> None:
        proposed = r.drafter.propose(r.history, r.next_token, want - 1)
        if isinstance(proposed, mx.array):
            r.drafts = proposed[: want - 1].astype(mx.uint32)
            r.b = 1 + int(r.drafts.shape[0])
        elif proposed:
            r.drafts = [int(t) for t in proposed][: want - 1]
            r.b = 1 + len(r.drafts)

    def _block(self, rows: list[_Row], b: int) -> mx.array:
        """tokens [B, b]: each row's [staged, drafts…] padded at its end."""
        if all(not isinstance(r.drafts, mx.array) for r in rows):
            return mx.array([[r.next_token] + r.drafts + [0] * (b - r.b) for r in rows], dtype=mx.uint32)
        parts = []
        for r in rows:
            lazy = isinstance(r.drafts, mx.array)
            head = mx.array([r.next_token] + ([] if lazy else r.drafts), dtype=mx.uint32)
            tail = mx.zeros((b - r.b,), dtype=mx.uint32)
            parts.append(mx.concatenate([head, r.drafts, tail] if lazy else [head, tail]))
        return mx.stack(parts)

    def step(self, on_launched=None) -> list[SpecStepOutput]:
        """One batched draft/verify cycle for every row: a chunk of committed tokens per row.

        ``on_launched``: called once the cycle's drafts and verify are queued on the device, before this thread
        waits for them (the caller's host work, e.g. delivering the last step's outputs, overlaps the device's)."""
        t_step = time.perf_counter()
        done = [i for i, r in enumerate(self.rows) if r.finish is None]
        self._filter(done)  # finished rows nobody removed leave now
        if not self.rows:
            return []
        rows = self.rows
        self._plan(rows)
        b = max(r.b for r in rows)
        tokens = self._block(rows, b)
        if any(isinstance(r.drafts, mx.array) for r in rows):
            mx.async_eval(tokens)  # the device drafts while this thread builds the verify graph
        before = self.store.stats().bytes_read if self.store is not None else 0
        hidden_rows = [r.drafter is not None and r.drafter.needs_hidden for r in rows]
        capture = self.capture if any(hidden_rows) else ()
        ckpt = Checkpoint(self.cache) if b > 1 and self._recurrent else None
        recording = self.tape.recording() if ckpt is not None and self.tape is not None else contextlib.nullcontext()
        with recording:
            logits, hidden = self.target.forward_batch(tokens, self.cache, capture)
        # THE sampler's token at every block position of every row (argmax when greedy): acceptance keeps the
        # longest prefix of drafts equal to them (``sampling.accept``); rows with logits processors need their
        # drafts on the host first
        if all(r.params.greedy for r in rows):
            choice = mx.argmax(logits, axis=-1)
        else:
            choice = mx.stack([mx.argmax(logits[i], axis=-1).astype(mx.uint32) if r.params.processors
                               else sample(logits[i], r.params, len(r.generated)) for i, r in enumerate(rows)])
        wait = [tokens, choice, *([hidden] if hidden is not None else [])]
        if on_launched is not None:
            mx.async_eval(*wait)
            on_launched()
        mx.eval(*wait)
        tok_rows, choice_rows = tokens.tolist(), choice.tolist()
        accepted = []  # (accepted drafts, next token) per row
        for i, r in enumerate(rows):
            drafts = tok_rows[i][1 : r.b]
            if r.params.processors:
                hist = r.history  # its last token is the staged one
                accepted.append(accept(logits[i, : r.b], drafts, r.params, len(r.generated),
                                       [hist + drafts[:j] for j in range(r.b)]))
            else:
                acc = 0
                while acc < len(drafts) and drafts[acc] == choice_rows[i][acc]:
                    acc += 1
                accepted.append((acc, choice_rows[i][acc]))
        keeps = [a + 1 for a, _ in accepted]
        rerun = self._rollback(tokens, b, keeps, ckpt)
        bytes_read = (self.store.stats().bytes_read - before) if self.store is not None else 0
        self.counters["steps"] += 1
        self.counters[f"rows:{len(rows)}"] += 1
        self.counters["verify_tokens"] += len(rows) * b
        self.counters["padded_tokens"] += sum(b - r.b for r in rows)
        self.counters["rerun_tokens"] += sum(keeps) if rerun else 0
        out, seconds = [], time.perf_counter() - t_step  # every row's cycle took the whole step
        for i, r in enumerate(rows):
            (acc, nxt), keep = accepted[i], keeps[i]
            if hidden_rows[i] and hidden is not None:
                r.drafter.observe(hidden[i, :keep])
                r.context = True
            if r.policy is not None:
                r.policy.observe(r.b, acc, bytes_read, seconds)
            new = tok_rows[i][1 : 1 + acc] + [nxt]
            for s in (r.stats, self._stats):
                s.record(r.b, r.b - 1, acc, len(new), keep if rerun else 0)
            chunk = r.emitter.push(new)
            index = len(r.generated)
            r.generated.extend(chunk.token_ids)
            r.history.extend(new)  # the cache now holds history[:-1] (tokens past a stop included)
            r.drafts = None
            if chunk.finish_reason:
                r.finish = chunk.finish_reason
            out.append(SpecStepOutput(r.request_id, index, tuple(chunk.token_ids), chunk.finish_reason))
        self._compact()
        return out

    # -- convenience ----------------------------------------------------------------------------------------
    def run(self, on_output=None) -> dict[str, list[int]]:
        """Steps until every row finished (removing each as it does); returns request id → its tokens."""
        got: dict[str, list[int]] = {r.request_id: [] for r in self.rows}
        while self.rows:
            for o in self.step():
                got.setdefault(o.request_id, []).extend(o.token_ids)
                if on_output is not None:
                    on_output(o)
                if o.finish_reason is not None:
                    self.remove(o.request_id)
        return got

    def warmup(self, batch_sizes=(1, 2, 4, 8), prompt=None) -> float:
        """Runs batched cycles of every block length the policies use (2, 4, 8, full) for each batch size up to
        ``max_batch``, so a GPU backend compiles its kernels before the first requests. Needs an empty batch;
        stats are left untouched. Returns the seconds it took."""
        if self.rows:
            raise RuntimeError("warmup needs an empty batch")
        t0 = time.perf_counter()
        saved = (self._stats, self.counters)
        self.reset_stats()
        mode = "native_v7" if self.draft is not None else "prompt_lookup"
        try:
            for B in sorted({min(x, self.max_batch) for x in batch_sizes}):
                for blk in sorted({min(n, self.config.block_size) for n in (2, 4, 8, self.config.block_size)}):
                    params = SpecParams(max_tokens=blk + 1, specdec=mode, specdec_policy="fixed", ignore_eos=True)
                    for k in range(B):
                        self.add(f"_warmup{k}", list(prompt or range(1, 9)), params)
                    self.run()
        finally:
            self._stats, self.counters = saved
        return time.perf_counter() - t0
