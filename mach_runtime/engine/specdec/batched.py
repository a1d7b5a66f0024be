"""``BatchedSpecDecoder``: speculative decoding and continuous batching together (batched verification).

Several requests (rows) decode at once on one set of mlx-lm batch caches of the target. Each row has its own
drafter (a per-request ``DFlashDrafter`` context, prompt lookup, a custom drafter, or none = target-only), its own
block policy, sampling parameters, stop handling (``output.TokenEmitter``) and stats. One ``step()``:

1. each row picks its block length b_i (its policy; 1 = no drafts: target-only rows, the context-length fallback,
   ``max_tokens``) and its drafter proposes b_i − 1 tokens after the row's staged token (lazily: DFlash drafts are
   queued on the device, not read back). DFlash rows drafting the same count share ONE draft pass
   (``batched_dflash_logits``: the rows' sink + window contexts left-padded and masked; equal to each row's own
   pass), so B rows cost one draft launch sequence, not B;
2. the blocks are stacked into tokens [B, b], b = max b_i; a row with fewer drafts is padded at its end with any
   token (causal attention / recurrence: padding after a row's real tokens cannot change them; it is rejected);
3. ONE target forward verifies [B, b] on the batch caches, capturing the drafters' tapped hidden states (with
   ``config.bucket_kv`` the attention runs over the KV length rounded up to ``KV_BUCKET``, padding masked, as the
   single-request engine does: static shapes for MLX's CUDA backend);
4. each row accepts its own prefix (greedy: longest prefix equal to the target's argmax + bonus; sampled: the
   rejection rule of ``acceptance.py`` with per-request keys (seed, completion position), so a row's randomness
   does not depend on its batch mates);
5. per-row rollback of the b − keep_i rejected positions (keep_i = accepted_i + 1):
   * attention (``BatchKVCache``): every row is trimmed by m = min_i(b − keep_i) (shared write index), then the
     remaining per-row excess r_i is rolled to the left end of the row, where it becomes masked left padding —
     mlx-lm's own right-padding mechanism (``prepare(right_padding=r)`` + ``finalize()``), as its batched prefill
     uses it. ``offset`` (RoPE positions) drops by r_i per row and ``left_padding`` grows by r_i, so the next
     block of each row lands at its own true positions and never sees the rejected keys; the common left padding
     is then sliced off (as ``filter`` does);
   * GatedDeltaNet (batched ``ArraysCache``): replayed per row from the ``GDNTape`` record of the verify — the
     recurrence re-run on the block with the mask ``t < keep_i`` (masked steps leave the state unchanged), and
     each row's conv window gathered at its own ``keep_i``; no target forward. Without a tape (or where it cannot
     replay) the recurrent state is restored from a snapshot, attention trimmed back to the cycle start, and
     every row's kept tokens re-run in one right-padded forward with ``lengths`` (``specdec_rerun_tokens``);
6. each row commits its accepted tokens + bonus (truncated at a stop / stop string / max_tokens), its drafter
   observes the kept hidden rows, the bonus becomes its next staged token.

Greedy rows are token-identical to plain greedy decoding of the target alone (tests/test_specdec_batched.py).

Rows join between steps (``add_many``: the newcomers' caches — empty, or a reused prefix KV for rows whose
drafter needs no hidden states — are merged and prefilled together in one right-padded forward per chunk, up to
but not including each prompt's last token, which is the row's first staged token; each DFlash row's drafter gets
its own rows of the captured hidden states; then they join the running batch caches) and leave between steps
(``remove``; rows that finished and were not removed are dropped at the start of the next ``step``). The API mirrors
``engine.batch.BatchEngine`` (``Admission``, ``add_many``, ``step``, ``remove``, ``extract_kv``, ``has``,
``active``, ``full``), except that a step reports a chunk of tokens per row (``SpecStepOutput``).

Families: any whose prompt cache holds only ``KVCache`` (full attention) and GatedDeltaNet ``ArraysCache``
layers: qwen3_moe, qwen3_5_moe. Sliding-window (``RotatingKVCache``: gpt_oss, gemma4) and compressed
(deepseek_v4) caches cannot be rolled back per row here: the constructor raises ``ConfigError`` (fall back to
``BatchEngine``).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from ...errors import ConfigError, RequestError
from ..batch import Admission
from ..sampling import validate
from .acceptance import greedy_accept, sampled_accept
from .config import BlockSpecDecEngineConfig, BlockSpecDecEngineMode
from .draft import DFlashDrafter, Drafter, PromptLookupDrafter
from .gdn_tape import GDNTape
from .output import TokenEmitter
from .policies import make_policy
from .stats import SpecDecStats
from .target import KV_BUCKET, Checkpoint, TargetOps, rollback

__all__ = ["BatchedSpecDecoder", "SpecParams", "SpecStepOutput", "Admission"]


def _bucketed_batch_kv_class():
    from mlx_lm.models.cache import BatchKVCache

    class BucketedBatchKVCache(BatchKVCache):
        """mlx-lm's ``BatchKVCache`` whose multi-token forwards attend over the KV length rounded up to
        ``KV_BUCKET`` with the columns past the last new token masked (as ``target.BucketedKVCache`` does for one
        request): every verify lands at a new KV length, and on MLX's CUDA backend a multi-row attention at a
        length not seen before costs tens of ms. Single-token steps are unchanged."""

        def _bucket(self, n: int) -> int:
            return -(-(self._idx + n) // KV_BUCKET) * KV_BUCKET

        def make_mask(self, N: int, return_array: bool = False, **kwargs):
            if N == 1 or kwargs.get("window_size") is not None:
                return super().make_mask(N, return_array=return_array, **kwargs)
            q = mx.arange(self._idx, self._idx + N)[:, None]
            k = mx.arange(self._bucket(N))[None]
            mask = (k <= q)[None, None] & (self.left_padding[:, None, None, None] <= k)
            return mask  # [B, 1, N, bucket]

        def update_and_fetch(self, keys, values):
            n = keys.shape[2]
            if n == 1:
                return super().update_and_fetch(keys, values)
            length = self._bucket(n)  # before the write moves _idx
            super().update_and_fetch(keys, values)
            short = length - self.keys.shape[2]
            if short > 0:
                pad = lambda a: mx.concatenate([a, mx.zeros((*a.shape[:2], short, a.shape[3]), a.dtype)], axis=2)
                self.keys, self.values = pad(self.keys), pad(self.values)
            return self.keys[..., :length, :], self.values[..., :length, :]

    return BucketedBatchKVCache


_BUCKETED_BATCH = None


def _bucket_batch_caches(cache) -> None:
    global _BUCKETED_BATCH
    from mlx_lm.models.cache import BatchKVCache

    if _BUCKETED_BATCH is None:
        _BUCKETED_BATCH = _bucketed_batch_kv_class()
    for c in cache:
        if type(c) is BatchKVCache:
            c.__class__ = _BUCKETED_BATCH


def _batchable_dflash(d) -> bool:
    """A plain ``DFlashDrafter`` (not a subclass with its own ``propose``) over a full-attention draft whose
    context caches are dflash-mlx's sink + window ``ContextOnlyDraftKVCache``: one batched draft pass can
    stand in for its ``propose``."""
    from dflash_mlx.model import ContextOnlyDraftKVCache, FullContextDraftKVCache

    if type(d) is not DFlashDrafter or d.cache is None:
        return False
    if any(type(c) is not ContextOnlyDraftKVCache or isinstance(c, FullContextDraftKVCache) for c in d.cache):
        return False
    return all(layer.self_attn.sliding_window is None and type(layer.self_attn.rope) is nn.RoPE
               for layer in d.draft.layers)


def batched_dflash_logits(drafters: list, staged: list[int], n: int) -> mx.array:
    """Draft logits [B, n, V] of several ``DFlashDrafter`` rows (same draft model) in one draft pass: what each
    row's ``draft_logits(staged[i], n)`` gives, with the rows' contexts (different lengths) left-padded and
    masked. Each row's pending context rows are first appended to its own context cache (the draft's
    ``advance_projected_context_cache``: projections only), then every draft layer runs once over [B, 1 + n]:
    queries and block keys at each row's own position (its cache offset), keys = [row context ; block], no
    causal mask inside the block (DFlash attends bidirectionally), padding masked out."""
    d0 = drafters[0]
    draft, target = d0.draft, d0.target
    for d in drafters:
        if d.pending:
            draft.advance_projected_context_cache(draft_context=d._take_context(), cache=d.cache)
    B, T = len(drafters), n + 1
    block = mx.array([[int(s)] + [d0.mask_token_id] * n for s in staged], dtype=mx.uint32)
    h = target.embed(block).astype(d0.dtype) * getattr(draft, "embed_scale", 1.0)
    offsets = mx.array([int(d.cache[0].offset) for d in drafters], dtype=mx.int32)
    lengths = [d.cache[0].cache_length() for d in drafters]
    width = max(lengths)
    mask = None
    if min(lengths) < width:
        key_pos = mx.arange(width + T)[None]
        mask = (key_pos >= mx.array([width - L for L in lengths])[:, None])[:, None, None, :]  # [B, 1, 1, W + T]
    for li, layer in enumerate(draft.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = attn.q_norm(attn.q_proj(x).reshape(B, T, attn.n_heads, -1)).transpose(0, 2, 1, 3)
        k = attn.k_norm(attn.k_proj(x).reshape(B, T, attn.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = attn.v_proj(x).reshape(B, T, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q = attn.rope(q, offset=offsets)
        k = attn.rope(k, offset=offsets)
        ctx_k, ctx_v = [], []
        for d, L in zip(drafters, lengths):
            ck, cv = d.cache[li].fetch()
            if L == 0:
                ck = mx.zeros((1, k.shape[1], 0, k.shape[3]), k.dtype)
                cv = mx.zeros((1, v.shape[1], 0, v.shape[3]), v.dtype)
            if L < width:
                pad = [(0, 0), (0, 0), (width - L, 0), (0, 0)]
                ck, cv = mx.pad(ck, pad), mx.pad(cv, pad)
            ctx_k.append(ck)
            ctx_v.append(cv)
        keys = mx.concatenate([mx.concatenate(ctx_k, axis=0), k], axis=2) if width else k
        values = mx.concatenate([mx.concatenate(ctx_v, axis=0), v], axis=2) if width else v
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=attn.scale, mask=mask)
        h = h + attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return target.head(draft.norm(h)[:, 1:])


@dataclass(frozen=True)
class SpecParams:
    """Per-request parameters (duck-type compatible with ``actors.messages.SamplingParams``).

    ``specdec``: "native_v7" (DFlash), "prompt_lookup", "target_only" or None (= target-only, as in the
    Decoder); ``specdec_policy`` overrides the config's block policy; ``ignore_eos`` decodes past eos."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = 0
    stop: tuple = ()
    stop_token_ids: tuple = ()
    specdec: str | None = None
    specdec_policy: str | None = None
    ignore_eos: bool = False


@dataclass
class SpecStepOutput:
    request_id: str
    index: int  # position of token_ids[0] in the request's completion (replayed tokens included)
    token_ids: tuple  # the tokens this step committed for the row, truncated at a stop
    text: str  # text released by them (stop-string prefixes are held back)
    finish_reason: str | None


@dataclass(frozen=True)
class _Sampling:
    temperature: float
    top_p: float
    top_k: int
    seed: int


@dataclass
class _Row:
    request_id: str
    prompt_len: int
    params: object
    sampling: _Sampling
    stop_ids: frozenset
    emitter: TokenEmitter
    drafter: Drafter | None
    policy: object
    history: list  # prompt + completion (replayed tokens included); the last one is staged (not in the cache)
    generated: list = field(default_factory=list)  # completion delivered (replayed tokens included)
    stats: SpecDecStats | None = None
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    finish: str | None = None
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


class BatchedSpecDecoder:
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
        tape = GDNTape(self.target) if self._recurrent and self.config.gdn_tape else None
        self.tape = tape if tape is not None and len(tape) else None
        self.draft = draft
        self.capture: tuple = ()
        if draft is not None:
            self._check_draft(draft)
            self.capture = tuple(int(i) for i in draft.target_layer_ids)
            self.target.tap(self.capture)
        self.lookup = PromptLookupDrafter(self.config.lookup_max_ngram, self.config.lookup_min_ngram)
        self.eos = frozenset(tokenizer.eos_token_ids)
        self.rows: list[_Row] = []  # row order of the batch caches
        self.cache = None  # per-layer batch caches; None while the batch is empty
        self._stats = self._new_stats()
        self.counters = Counter()  # batch-level: steps, verify_tokens (B·b), padded_tokens, rerun_tokens

    # -- checks -------------------------------------------------------------------------------------------
    def _check_caches(self) -> tuple[list[int], list[int]]:
        from mlx_lm.models.cache import ArraysCache, KVCache, make_prompt_cache

        attn, recurrent = [], []
        for i, c in enumerate(make_prompt_cache(self.model)):
            if type(c) is KVCache:
                attn.append(i)
            elif type(c) is ArraysCache:
                recurrent.append(i)
            else:
                raise ConfigError(
                    f"{self.target.family}: batched speculative decoding cannot roll back {type(c).__name__} "
                    "caches per row (only full-attention KVCache and GatedDeltaNet ArraysCache layers: qwen3_moe, "
                    "qwen3_5_moe); use target-only batching (BatchEngine) or BlockSpecDecEngine for one request"
                )
        return attn, recurrent

    def _check_draft(self, draft) -> None:
        H = self.target.hidden_size
        if int(draft.args.hidden_size) != H:
            raise ConfigError(f"draft hidden_size {draft.args.hidden_size} does not match the target's {H}")
        ids = list(draft.target_layer_ids)
        if any(not 0 <= i < self.target.num_layers for i in ids):
            raise ConfigError(f"draft target_layer_ids {ids} outside the target's {self.target.num_layers} layers")
        if int(draft.fc.weight.shape[-1]) != len(ids) * H:
            raise ConfigError(f"draft fc expects {draft.fc.weight.shape[-1]} inputs, {len(ids)} layers × {H} given")

    # -- membership ---------------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.max_batch

    def has(self, request_id: str) -> bool:
        return any(r.request_id == request_id for r in self.rows)

    def row(self, request_id: str) -> _Row:
        return next(r for r in self.rows if r.request_id == request_id)

    def add(self, request_id: str, prompt_ids, params=None, resume_ids=(), kv=None, cached_tokens: int = 0, *,
            drafter: Drafter | None = None) -> _Row:
        """Prefills one request and joins it to the batch (see ``add_many``)."""
        params = params if params is not None else SpecParams()
        return self.add_many([Admission(request_id, tuple(prompt_ids), params, tuple(resume_ids), kv, cached_tokens)],
                             [drafter])[0]

    def add_many(self, admissions: list[Admission], drafters: list | None = None) -> list[_Row]:
        """Prefills requests (each alone, chunked, capturing its drafter's hidden states) and joins them.

        ``params`` of an admission: ``SpecParams`` or the Decoder's ``SamplingParams`` (``specdec`` picks the
        row's drafter; None = target-only). ``drafters[i]``: a custom drafter for admission i (tests: oracle
        drafts), used in the NATIVE_V7 slot. A prefix ``kv`` is used only by rows whose drafter needs no hidden
        states (a DFlash draft needs every prompt token's). Checks every request before any work: a bad one
        raises and nothing is admitted."""
        if not admissions:
            return []
        drafters = list(drafters) if drafters is not None else [None] * len(admissions)
        if len(drafters) != len(admissions):
            raise ValueError("drafters: one entry per admission")
        if len(self.rows) + len(admissions) > self.max_batch:
            raise RuntimeError("batch is full")
        plans = []
        for a, custom in zip(admissions, drafters):
            p = a.params
            validate(p.temperature, p.top_p, p.top_k)
            tokens = [int(t) for t in list(a.prompt_ids) + list(a.resume_ids)]
            if not tokens:
                raise RequestError("the prompt is empty: give at least one token")
            if p.max_tokens <= 0:
                raise RequestError(f"max_tokens must be > 0, got {p.max_tokens}")
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
            plans.append((a, tokens, drafter))
        rows, caches, todos = [], [], []
        for a, tokens, drafter in plans:
            if drafter is not None and drafter.needs_hidden and not self.capture:
                self.capture = tuple(int(i) for i in drafter.capture_layer_ids)
                self.target.tap(self.capture)
            row, cache, todo = self._new_row(a, tokens, drafter)
            rows.append(row)
            caches.append(cache)
            todos.append(todo)
        merged = [type(layer[0]).merge(list(layer)) for layer in zip(*caches)]
        if self.config.bucket_kv:
            _bucket_batch_caches(merged)
        self._prefill(merged, todos, rows)
        if self.cache is None:
            self.cache = merged
        else:
            for c, m in zip(self.cache, merged):
                c.extend(m)
        self.rows.extend(rows)
        return rows

    def _prefill(self, cache, todos: list[list[int]], rows: list[_Row]) -> None:
        """Feeds each new row's ``todos[i]`` into the merged caches of the newcomers in one right-padded forward
        per chunk (as ``BatchEngine`` admits), handing each hidden-state drafter its rows' captured states."""
        lengths = [len(t) for t in todos]
        width = max(lengths)
        if width > 0:
            padding = [width - n for n in lengths]
            if any(padding):
                for c in cache:
                    c.prepare(lengths=lengths, right_padding=padding)
            hidden = [r.drafter is not None and r.drafter.needs_hidden for r in rows]
            capture = self.capture if any(hidden) else ()
            tokens = mx.array([t + [0] * p for t, p in zip(todos, padding)], dtype=mx.uint32)
            step = self.config.prefill_step
            for start in range(0, width, step):
                _, h = self.target.forward_batch(tokens[:, start : start + step], cache, capture, logits="none")
                mx.eval([c.state for c in cache] + ([h] if h is not None else []))
                for i, r in enumerate(rows):
                    valid = min(lengths[i] - start, step)
                    if hidden[i] and valid > 0:
                        r.drafter.observe(h[i, :valid])
            if any(padding):
                for c in cache:
                    c.finalize()
        mx.eval([c.state for c in cache])

    def _new_row(self, a: Admission, tokens: list[int], drafter: Drafter | None):
        """The row of admission ``a``, its single-request cache (empty, or the prefix ``kv`` fitted to the tokens
        it covers) and the tokens still to prefill (all but the last: the first staged token)."""
        p = a.params
        hidden = drafter is not None and drafter.needs_hidden
        kv, cached = (a.kv, a.cached_tokens) if not hidden else (None, 0)
        cached = min(cached, len(tokens) - 1)  # the last token is the first staged one
        if kv is not None and cached > 0:
            have = next((c.offset for c in kv if isinstance(getattr(c, "offset", None), int)), cached)
            if have > cached:
                if all(c.is_trimmable() for c in kv):
                    for c in kv:
                        c.trim(have - cached)
                else:
                    kv = None
        if kv is None or cached <= 0:
            kv, cached = self.target.make_cache(bucket_kv=False), 0
        if drafter is not None:
            drafter.start(tokens)
        todo = tokens[cached:-1]
        resume = [int(t) for t in a.resume_ids]
        ignore_eos = bool(getattr(p, "ignore_eos", False))
        stop_ids = (frozenset() if ignore_eos else self.eos) | frozenset(p.stop_token_ids)
        stops = (p.stop,) if isinstance(p.stop, str) else tuple(p.stop or ())
        emitter = TokenEmitter(self.tokenizer, stop_ids, stops, max(1, p.max_tokens - len(resume)))
        for t in resume:  # a replayed request continues its text exactly where it left off
            if t not in stop_ids:
                emitter.detok.add_token(t)
        emitter.sent = len(emitter.detok.text)
        seed = p.seed if p.seed is not None else random.getrandbits(62)
        policy = None
        if drafter is not None:
            policy = make_policy(getattr(p, "specdec_policy", None) or self.config.policy, self.config.block_size,
                                 store=self.store, prompt_len=len(tokens))
        row = _Row(a.request_id, len(a.prompt_ids), p, _Sampling(p.temperature, p.top_p, p.top_k, int(seed)),
                   stop_ids, emitter, drafter, policy, list(tokens), list(resume), self._new_stats(),
                   cached_tokens=cached, prefilled_tokens=len(tokens) - 1 - cached)
        if resume and (resume[-1] in stop_ids or len(resume) >= p.max_tokens):
            row.finish = "stop" if resume[-1] in stop_ids else "length"  # already over: leaves at the next step
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

    def remove(self, request_id: str) -> _Row | None:
        for i, r in enumerate(self.rows):
            if r.request_id == request_id:
                self._filter([j for j in range(len(self.rows)) if j != i])
                return r
        return None

    def extract_kv(self, request_id: str):
        """(caches, n): the request's cache as single-request caches covering its first ``n`` tokens of
        prompt + delivered completion; (None, 0) where the cache holds tokens past a stop (accepted in the same
        block) that a recurrent state cannot give back."""
        i = next(i for i, r in enumerate(self.rows) if r.request_id == request_id)
        r = self.rows[i]
        kv = [c.extract(i) for c in self.cache]
        covered = len(r.history) - 1
        n = min(covered, r.prompt_len + len(r.generated))
        if n < covered:
            if not all(c.is_trimmable() for c in kv):
                return None, 0
            for c in kv:
                c.trim(covered - n)
        return kv, n

    # -- stats --------------------------------------------------------------------------------------------
    def _new_stats(self) -> SpecDecStats:
        return SpecDecStats(self.config.block_size, self.config.recent_window, self.config.low_alpha)

    def stats(self) -> dict:
        """Aggregate over every row ever decoded (``SpecDecStats``: a row's verify is one of its cycles) plus
        the batch counters: ``batch_steps`` (target forwards), ``batch_verify_tokens`` (B·b per step, padding
        included), ``batch_padded_tokens`` (positions padding a row's shorter block)."""
        out = self._stats.as_dict()
        out["policy"] = self.config.policy
        out["block_size"] = self.config.block_size
        out["batch_steps"] = self.counters["steps"]
        out["batch_verify_tokens"] = self.counters["verify_tokens"]
        out["batch_padded_tokens"] = self.counters["padded_tokens"]
        out["batch_rows_histogram"] = {k[5:]: v for k, v in sorted(self.counters.items()) if k.startswith("rows:")}
        if self.store is not None:
            s = self.store.stats()
            out["expert_bytes_read"] = s.bytes_read
            out["expert_hit_rate"] = s.hit_rate
        return out

    def row_stats(self, request_id: str) -> dict:
        return self.row(request_id).stats.as_dict()

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
        if ctx == 0 and r.drafter.needs_hidden:  # a one-token prompt: no hidden context to draft from yet
            return 1
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
            if self.batched_draft and _batchable_dflash(r.drafter):
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
            head = [r.next_token] + ([] if isinstance(r.drafts, mx.array) else r.drafts)
            row = [mx.array(head, dtype=mx.uint32)]
            if isinstance(r.drafts, mx.array):
                row.append(r.drafts)
            if b > r.b:
                row.append(mx.zeros((b - r.b,), dtype=mx.uint32))
            parts.append(mx.concatenate(row) if len(row) > 1 else row[0])
        return mx.stack(parts)

    def step(self, on_launched=None) -> list[SpecStepOutput]:
        """One batched draft/verify cycle for every row: a chunk of committed tokens per row.

        ``on_launched``: called once the cycle's drafts and verify are queued on the device, before this thread
        waits for them (the caller's host work, e.g. delivering the last step's outputs, overlaps the device's)."""
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
        sampled = any(r.sampling.temperature > 0 for r in rows)
        choice = mx.argmax(logits, axis=-1)
        wait = [tokens, choice, *([hidden] if hidden is not None else []), *([logits] if sampled else [])]
        if on_launched is not None:
            mx.async_eval(*wait)
            on_launched()
        mx.eval(*wait)
        tok_rows, choice_rows = tokens.tolist(), choice.tolist()
        accs, nexts = [], []
        for i, r in enumerate(rows):
            drafts = tok_rows[i][1 : r.b]
            if r.sampling.temperature == 0:
                acc, nxt = greedy_accept(choice_rows[i][: r.b], drafts)
            else:
                acc, nxt = sampled_accept(logits[i, : r.b], drafts, r.sampling, len(r.generated))
            accs.append(acc)
            nexts.append(nxt)
        keeps = [a + 1 for a in accs]
        rerun = self._rollback(tokens, b, keeps, ckpt)
        bytes_read = (self.store.stats().bytes_read - before) if self.store is not None else 0
        self.counters["steps"] += 1
        self.counters[f"rows:{len(rows)}"] += 1
        self.counters["verify_tokens"] += len(rows) * b
        self.counters["padded_tokens"] += sum(b - r.b for r in rows)
        self.counters["rerun_tokens"] += sum(keeps) if rerun else 0
        out = []
        for i, r in enumerate(rows):
            acc, keep = accs[i], keeps[i]
            if hidden_rows[i] and hidden is not None:
                r.drafter.observe(hidden[i, :keep])
            if r.policy is not None:
                r.policy.observe(r.b, acc, bytes_read)
            new = tok_rows[i][1 : 1 + acc] + [nexts[i]]
            for s in (r.stats, self._stats):
                s.record(r.b, r.b - 1, acc, len(new), keep if rerun else 0)
            chunk = r.emitter.push(new)
            index = len(r.generated)
            r.generated.extend(chunk.token_ids)
            r.history.extend(new)  # the cache now holds history[:-1] (tokens past a stop included)
            r.drafts = None
            if chunk.finish_reason:
                r.finish = chunk.finish_reason
            out.append(SpecStepOutput(r.request_id, index, tuple(chunk.token_ids), chunk.text, chunk.finish_reason))
        self._compact()
        return out

    # -- rollback -----------------------------------------------------------------------------------------
    def _rollback(self, tokens: mx.array, b: int, keeps: list[int], ckpt) -> bool:
        """Undoes each row's rejected tail (b − keeps[i] positions). Returns True if the kept tokens were
        re-run (recurrent state restored from ``ckpt``)."""
        if min(keeps) >= b:
            if self.tape is not None:
                self.tape.clear()
            return False
        rerun = False
        if self._recurrent:
            if self.tape is not None and all(self._can_replay(self.cache[i], b) for i in self._recurrent):
                keep_arr = mx.array(keeps, dtype=mx.int32)
                for i in self._recurrent:
                    self._replay_rows(self.cache[i], keep_arr, max(keeps))
            else:
                rerun = True
            if self.tape is not None:
                self.tape.clear()
        if rerun:
            self._rerun(tokens, b, keeps, ckpt)
        else:
            self._trim_rows([b - k for k in keeps])
        return rerun

    def _trim_rows(self, excess: list[int]) -> None:
        """Drops the last ``excess[i]`` positions of row i from every attention cache (see the module doc)."""
        m = min(excess)
        extra = [e - m for e in excess]
        roll = any(extra)
        for j in self._attn:
            c = self.cache[j]
            if m:
                c.trim(m)
            if roll:
                c.prepare(right_padding=extra)
                c.finalize()

    def _compact(self) -> None:
        """Slices off the left padding every row has (as ``BatchKVCache.filter`` does), in whole KV buckets (the
        buffer keeps its alignment). Row i's padding is ``_idx`` minus its cached tokens, known on the host."""
        if not self._attn or not self.rows:
            return
        first = self.cache[self._attn[0]]
        lp = min(first._idx - (len(r.history) - 1) for r in self.rows)
        lp -= lp % KV_BUCKET
        if lp <= 0:
            return
        self.counters["compactions"] += 1
        for j in self._attn:
            c = self.cache[j]
            c.keys = c.keys[..., lp:, :]
            c.values = c.values[..., lp:, :]
            c._idx -= lp
            c.left_padding = c.left_padding - lp

    def _can_replay(self, c, steps: int) -> bool:
        e = self.tape._entries.get(id(c))
        return e is not None and e.cache is c and c[1] is e.state_out and e.steps == steps

    def _replay_rows(self, c, keeps: mx.array, kmax: int) -> None:
        """GatedDeltaNet cache ``c`` → its state after each row's first ``keeps[i]`` tokens of the recorded verify:
        conv window gathered per row; recurrence re-run (the layer's own ``gated_delta_update``) from the cycle
        start over the first ``kmax`` steps with the rows' later steps masked (a masked step keeps the state)."""
        e = self.tape._entries.pop(id(c))
        positions = (keeps[:, None] + mx.arange(e.n_keep)[None])[..., None]
        conv = mx.take_along_axis(e.conv_input, positions, axis=1)
        a = dict(e.arguments)
        for name in ("k", "v", "a", "b", "mask"):
            if a.get(name) is not None:
                a[name] = a[name][:, :kmax]
        mask = mx.arange(kmax)[None] < keeps[:, None]
        a["mask"] = mask if a.get("mask") is None else (a["mask"] & mask)
        a["q"] = a["k"]  # the state does not depend on q
        _, state = e.fn(**a)
        c[0] = conv
        c[1] = state

    def _rerun(self, tokens: mx.array, b: int, keeps: list[int], ckpt) -> None:
        """Recurrent state back to the cycle start (snapshot), attention trimmed to it, then each row's kept
        tokens run again in one right-padded forward (``lengths`` for the recurrent layers, the padding rolled to
        the left of the attention rows by ``finalize``)."""
        rollback(self.cache, ckpt, b, 0)  # restores the snapshots, trims the others by b
        kmax = max(keeps)
        for j in self._attn:
            self.cache[j].prepare(right_padding=[kmax - k for k in keeps])
        for j in self._recurrent:
            self.cache[j].prepare(lengths=keeps)
        self.target.forward_batch(tokens[:, :kmax], self.cache, (), logits="none")
        for c in self.cache:
            c.finalize()
        mx.eval([c.state for c in self.cache])

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
