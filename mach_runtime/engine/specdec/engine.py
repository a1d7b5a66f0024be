"""``BlockSpecDecEngine``: block speculative decoding of one request at a time on the MLX thread.

The cycle (per request, after a prefill that also captures the draft's target-layer hidden states):

1. the policy picks the block length b (1 = a target-only step; also forced by TARGET_ONLY mode, by the
   context-length fallback and by ``max_tokens``);
2. the drafter proposes b − 1 tokens after the staged token (the last committed token, not yet fed);
3. ONE target forward verifies ``[staged, d1 … d(b−1)]`` (capturing the tapped layers);
4. acceptance: greedy = longest prefix equal to the target's argmax + the bonus token; sampled = speculative
   the keyed sampler's tokens at the block positions, accepted while they equal the drafts (``sampling.accept``:
   distribution-exact, and token-identical to plain sampling with the same seed);
5. rollback of the rejected tail: attention KV trimmed (sliding windows exactly, wrapped or not); GatedDeltaNet
   state recomputed for the accepted tokens by replaying the recurrence recorded during the verify
   (``gdn_tape.py``), or, where a tape cannot replay, restored from a snapshot and the accepted tokens re-run
   (``target.py``);
6. the accepted tokens + bonus are committed (truncated at a stop token / stop string / max_tokens), their
   hidden states queued as draft context, the bonus becomes the next staged token.

Greedy output is token-identical to plain greedy decoding of the target (tests/test_specdec.py).

KV reuse (tests/test_spec_sessions.py): ``generate(prefix=)`` continues from a KV that covers the first tokens of
the prompt (a session's earlier turns, from this engine or the batch) and prefills only the rest; the run's
``handover()`` returns its KV as plain mlx-lm caches covering the committed tokens plus the drafter's context,
for the session store, a later ``generate`` or ``BatchEngine`` (a demoted request joins the batch without
re-prefilling anything).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

import mlx.core as mx

from ...errors import ConfigError, RequestError
from ..emit import Emitter, StopRule
from ..sampling import SamplingParams, accept, check, sample
from .config import BlockSpecDecEngineConfig, BlockSpecDecEngineMode
from .draft import DFlashDrafter, Drafter, PromptLookupDrafter, check_draft, load_dflash_draft
from .output import Committer, SpecDecChunk
from .policies import PolicyMemory, make_policy
from .stats import SpecDecStats, engine_stats
from ..batch import Prefill, boundary_prefill
from ..hooks import HookPlan, install_spec_hooks
from ..kv_prefix import fit_prefix
from .compiled_draft import CompiledDraft
from .compiled_verify import CompiledVerify
from .gdn_tape import GDNTape
from .target import Checkpoint, TargetOps, rollback
from .verify_cache import bucket_kv_caches, exact_rotating_caches, plain_caches


class BlockSpecDecEngine:
    """Speculative decoding over a loaded MoE target (``load_moe``) and an optional DFlash draft."""

    def __init__(self, model, tokenizer, draft=None, *, config: BlockSpecDecEngineConfig | None = None,
                 store=None, drafter: Drafter | None = None):
        self.config = config or BlockSpecDecEngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.target = TargetOps(model)
        self.on_boundary = None  # on_boundary(request_id, extract, tokens): a prefix-cache point mid-prefill (batch.py)
        if self.config.compile_verify:
            self.target.compiled = CompiledVerify(self.target)  # qwen3_moe only; see compiled_verify.py
        self.draft = draft
        self._drafters: dict[BlockSpecDecEngineMode, Drafter] = {
            BlockSpecDecEngineMode.PROMPT_LOOKUP: PromptLookupDrafter(self.config.lookup_max_ngram, self.config.lookup_min_ngram),
        }
        if draft is not None:
            check_draft(self.target, draft)
            drafter_v7 = DFlashDrafter(draft, self.target, self.config.draft_sink, self.config.draft_window)
            if self.config.compile_draft:
                drafter_v7.compiled = CompiledDraft(drafter_v7, pad=self.config.block_size)
            self._drafters[BlockSpecDecEngineMode.NATIVE_V7] = drafter_v7
        if drafter is not None:  # a custom drafter (tests: oracle drafts) takes the NATIVE_V7 slot
            self._drafters[BlockSpecDecEngineMode.NATIVE_V7] = drafter
        # the hooks it uses (hooks.py): installed at load (``load_moe(speculative=)``: nothing changes here), or
        # now on a model its caller loaded without a plan
        taps = {int(i) for d in self._drafters.values() if d.needs_hidden for i in d.capture_layer_ids}
        install_spec_hooks(model, HookPlan(tuple(sorted(taps)), self.config.gdn_tape, self.config.compile_moe))
        tape = GDNTape(self.target) if self.config.gdn_tape else None  # GatedDeltaNet rollback by replay
        self.tape = tape if tape is not None and len(tape) else None
        if self.config.mode == BlockSpecDecEngineMode.NATIVE_V7 and BlockSpecDecEngineMode.NATIVE_V7 not in self._drafters:
            raise ConfigError("mode NATIVE_V7 needs a DFlash draft: pass draft_checkpoint (or use PROMPT_LOOKUP / TARGET_ONLY)")
        self._stats = SpecDecStats(self.config.block_size, self.config.recent_window, self.config.low_alpha)
        self.last_policy = None
        self._runs = 0  # requests started: the drafter's context belongs to the latest one only
        self._policy_memory = PolicyMemory()  # cycle timings + recent acceptance, shared by the requests' policies
        self._cache_layers = len(self.target.make_cache(False))  # a prefix KV must have one cache per layer
        self.pipeline_target_only = True  # target-only runs queue the next step before reading a token back
        self.prefetcher = None  # draft-informed expert prefetch (prefetch.py): streaming residency, opt-in
        if self.config.draft_prefetch and getattr(store, "residency", "") == "streaming":
            from .prefetch import DraftPrefetcher

            self.prefetcher = DraftPrefetcher(store)

    @classmethod
    def from_checkpoint(cls, target_checkpoint, draft_checkpoint=None, config: BlockSpecDecEngineConfig | None = None,
                        **load_moe_kwargs) -> "BlockSpecDecEngine":
        """Loads the target with ``load_moe`` (keyword arguments pass through) and the DFlash draft, if any."""
        from ...io.load import load_moe

        draft = load_dflash_draft(Path(draft_checkpoint)) if draft_checkpoint is not None else None
        load_moe_kwargs.setdefault("speculative", HookPlan.for_engine(config, draft))  # hooks at load
        model, tokenizer, store, _ = load_moe(target_checkpoint, **load_moe_kwargs)
        return cls(model, tokenizer, draft, config=config, store=store)

    # -- stats --------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        return engine_stats(self._stats, self.config, self.store)

    def reset_stats(self) -> None:
        self._stats = SpecDecStats(self.config.block_size, self.config.recent_window, self.config.low_alpha)

    def warmup(self) -> float:
        """Runs a cycle of every block length the policies use (2, 4, 8, full) with each drafter, so the kernels
        a GPU backend compiles on first use (a minute for the demo pair on MLX's CUDA build) are built before
        the first request. Stats are left untouched. Returns the seconds it took."""
        t0 = time.perf_counter()
        saved = self._stats
        self.reset_stats()
        try:
            for mode in self._drafters:
                for i, b in enumerate(sorted({min(n, self.config.block_size) for n in (2, 4, 8, self.config.block_size)})):
                    # max_tokens = b + 1: the first cycle (after the prefill's token) verifies exactly b tokens;
                    # one prompt of two KV buckets also builds the kernels of prompt-sized draft context updates
                    prompt = list(range(1, 130 if i == 0 else 9))
                    for _ in self.generate(prompt, max_tokens=b + 1, mode=mode, policy="fixed", ignore_eos=True):
                        pass
        finally:
            self._stats = saved
        return time.perf_counter() - t0

    # -- generation ---------------------------------------------------------------------------------------
    def generate(self, prompt, *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop=None, stop_token_ids=(), mode=None,
                 policy: str | None = None, ignore_eos: bool = False, prefix=None, resume_ids=(),
                 params: SamplingParams | None = None, text: bool = True) -> "SpecDecRun":
        """Chunks of one request (one per cycle); the last has ``finish_reason`` "stop" or "length".

        ``mode`` / ``policy`` override the engine's config for this request; ``ignore_eos`` decodes past the
        tokenizer's eos ids (benchmarks); ``seed`` None draws one.

        ``prefix``: a KV the request continues from instead of prefilling it: a ``SpecDecKV`` (what an earlier
        run's ``handover`` returned) or ``(caches, n_cached_tokens[, draft_state])`` with caches of the target's
        ``make_prompt_cache`` layout (plain mlx-lm classes: ``BatchEngine.extract_kv``; converted in place to the
        engine's verify-ready classes) covering ``prompt[:n_cached_tokens]``. Only the rest of the prompt is
        prefilled. The draft's context for the cached tokens is ``draft_state`` (a drafter ``snapshot``, trimmed
        to the prefix) when given; without it the draft sees only the prefilled tokens (still lossless: every
        draft is verified; acceptance may be lower at first). A prefix longer than ``len(prompt) - 1`` tokens is
        trimmed; one that cannot be trimmed (GatedDeltaNet state covers an exact token count) is not used.
        The caches are the run's from then on.

        ``resume_ids``: completion tokens the caller already has (a request moved here from another engine, or
        replayed): they follow the prompt (the prefix may cover them), are not counted in ``max_tokens``, and the
        sampling positions continue after them.

        ``params``: a ``SamplingParams`` in place of the keywords (its ``max_tokens`` counts ``resume_ids`` too, as
        everywhere in the runtime). ``text=False``: chunks carry token ids only and the run ends on token-level
        conditions (stop tokens, ``max_tokens``): the runtime's scheduler, whose front end detokenizes.

        Returns a ``SpecDecRun``: iterate it for the chunks (nothing runs before the first ``next``); once it
        has ended or been closed, ``handover()`` gives its KV for a later request or the batch.
        """
        resume = [int(t) for t in resume_ids]
        if params is None:
            if max_tokens <= 0:
                raise RequestError(f"max_tokens must be > 0, got {max_tokens}")
            params = SamplingParams(max_tokens=len(resume) + max_tokens, temperature=temperature, top_p=top_p,
                                    top_k=top_k, seed=seed, stop=tuple([stop] if isinstance(stop, str) else stop or ()),
                                    stop_token_ids=tuple(stop_token_ids), ignore_eos=ignore_eos, specdec=mode,
                                    specdec_policy=policy)
        run = SpecDecRun(self)

        def gen():  # nothing runs before the first ``next``
            self._start(run, prompt, params.resolved(), resume, text, prefix, self.config.prefill_step).finish()
            yield from self._decode(run)

        run._gen = gen()
        return run

    def begin(self, admissions: list, prefill_step: int | None = None) -> Prefill:
        """The scheduler's admission of ONE request (``batch.Admission``; ``kv`` a prefix KV, a ``SpecDecKV``
        bringing the draft's context): a ``batch.Prefill`` whose ``advance()`` runs one chunk of
        ``prefill_step`` prompt tokens (the same chunked prefill as every lane, ``batch.prefill_chunks``), so a
        long prompt entering this lane interleaves with the other lanes' decode steps. ``join`` returns
        ``[run]``: the ``SpecDecRun`` (token ids only), whose first ``next`` draws the first token from the
        logits of the prompt's last token (fed by the prefill's last chunk).
        Checks the request first: a bad one raises and nothing runs."""
        if len(admissions) != 1:
            raise ValueError(f"BlockSpecDecEngine admits one request at a time, got {len(admissions)}")
        a = admissions[0]
        run = SpecDecRun(self, a.request_id)
        prefix = None if a.kv is None else (a.kv, a.cached_tokens, getattr(a.kv, "draft_state", None))
        pf = self._start(run, list(a.prompt_ids), a.params.resolved(), [int(t) for t in a.resume_ids], False,
                         prefix, prefill_step or self.config.prefill_step, a.boundaries)
        run._gen = self._decode(run)
        return pf

    @staticmethod
    def join(prefill: Prefill) -> list:
        """The runs of a ``begin``'s Prefill once every chunk has run (``batch.BatchMembership.join``'s shape)."""
        prefill.finish()
        return prefill.members

    def _start(self, run: "SpecDecRun", prompt, params: SamplingParams, resume: list[int], text: bool, prefix,
               step: int, boundaries=()) -> Prefill:
        """Checks the request, sets up its run and returns the chunked prefill of the prompt (its last chunk also
        gives the last token's logits, which ``_decode`` samples the first token from), split at its prefix-cache
        ``boundaries`` (``on_boundary``, as in every lane: ``batch.boundary_prefill``)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        ids += resume
        if not ids:
            raise RequestError("the prompt is empty: give at least one token")
        check(params)
        max_tokens = params.max_tokens - len(resume)  # new tokens
        if max_tokens <= 0:
            raise RequestError(f"max_tokens must exceed the {len(resume)} tokens already delivered")
        mode, policy = params.specdec, params.specdec_policy
        mode = self.config.mode if mode is None else BlockSpecDecEngineMode(mode)
        drafter = None if mode == BlockSpecDecEngineMode.TARGET_ONLY else self._drafters.get(mode)
        if mode != BlockSpecDecEngineMode.TARGET_ONLY and drafter is None:
            raise ConfigError(f"mode {mode.name} needs a draft model; this engine has none")
        pol = make_policy(policy or self.config.policy, self.config.block_size, store=self.store, prompt_len=len(ids),
                          memory=self._policy_memory)
        self.last_policy = pol
        text_out = None
        if text:
            text_out = Emitter(self.tokenizer, params)
            text_out.push(resume)  # the caller has their text
        emitter = Committer(StopRule(params, self.tokenizer.eos_token_ids), len(resume), text_out)
        cache, cached, draft_state = self._prefix_cache(prefix, len(ids))
        capture = drafter.capture_layer_ids if drafter is not None and drafter.needs_hidden else ()
        if drafter is not None:
            drafter.start(ids)
            if cached:
                drafter.resume(draft_state, cached)
        run._begin(ids, cache, emitter, drafter, cached)
        run._plan = (params, len(resume), max_tokens, pol, capture)
        forward = self.target.prompt_forward(cache, len(ids) - cached, run._first, capture,
                                             drafter.observe if capture else None)
        run._prefill = boundary_prefill([run], cache, [(run.request_id, ids, cached, boundaries, ids[cached:])],
                                        step, forward, self.on_boundary, lambda row: list(cache))
        return run._prefill

    def _decode(self, run: "SpecDecRun") -> Iterator[SpecDecChunk]:
        ids, cache, emitter, drafter, _ = run._state
        params, pos0, max_tokens, pol, capture = run._plan  # pos0: completion positions (sampling keys) continue
        cfg = self.config  # after the resumed tokens
        logits = run._first.pop("logits")  # the prefill's last chunk fed the prompt's last token
        run._extent = len(ids)  # tokens in the cache
        staged = int(sample(logits, params, pos0, [ids]).item())
        self._stats.add_prompt_commit()
        chunk = emitter.push([staged])
        yield chunk
        if chunk.finish_reason:
            return
        # target-only steps (TARGET_ONLY, or a policy's choice of b = 1) run pipelined where every cache can trim
        pipelined = self.pipeline_target_only and self.prefetcher is None and not params.processors and all(c.is_trimmable() for c in cache)
        history = ids + [staged]
        n_ids = len(ids)

        def choose(n_out: int) -> int:
            """The next cycle's block length, with ``n_out`` tokens emitted and the last one staged."""
            ctx_len = n_ids + n_out - 1  # tokens in the cache
            if drafter is None or (cfg.target_only_above_context and ctx_len > cfg.target_only_above_context):
                return 1
            return max(1, min(pol.block_len(ctx_len), cfg.block_size, max_tokens - n_out))

        pending = None  # a block length chosen during a pipelined stretch, for the cycle after it
        while True:
            t_cycle = time.perf_counter()
            n_out = len(emitter.tokens)
            b = choose(n_out) if pending is None else pending
            pending = None
            if b == 1 and pipelined:
                pending = yield from self._target_only_steps(run, cache, emitter, params, pos0, history, choose,
                                                             pol if drafter is not None else None, drafter, capture)
                if pending is None:  # the request ended
                    return
                staged = history[-1]
                continue
            drafts, block = [], mx.array([staged], dtype=mx.uint32)
            if b > 1:
                proposed = drafter.propose(history, staged, b - 1)
                if isinstance(proposed, mx.array):  # lazy drafts: the verify is queued behind the draft pass
                    block = mx.concatenate([block, proposed[: b - 1].astype(mx.uint32)])
                    mx.async_eval(block)  # the device drafts while this thread builds the verify graph
                    drafts = None
                elif proposed:
                    drafts = [int(t) for t in proposed][: b - 1]
                    block = mx.array([staged] + drafts, dtype=mx.uint32)
            b = block.shape[0]
            before = self.store.stats().bytes_read if self.store is not None else 0
            if self.prefetcher is not None:  # after ``before``: the cycle's bytes include its prefetch
                self.prefetcher.prefetch(block.tolist())  # drafts on the host (the verify syncs per layer anyway)
            # a snapshot where some cache cannot trim (GatedDeltaNet state; deepseek_v4's compressed caches)
            ckpt = Checkpoint(cache) if b > 1 and not all(c.is_trimmable() for c in cache) else None
            with self.tape.recording() if ckpt is not None and self.tape is not None else contextlib.nullcontext():
                vlogits, vhidden = self.target.forward(block, cache, capture)
            # one host sync per cycle: drafts, the target's choices and the captured hidden states together
            if params.processors:
                mx.eval(block, vlogits, vhidden)
                drafts = block.tolist()[1:] if drafts is None else drafts
                acc, nxt = accept(vlogits, drafts, params, pos0 + n_out,
                                  [history + drafts[:i] for i in range(len(drafts) + 1)])
            else:
                choice = sample(vlogits, params, pos0 + n_out)  # THE sampler's token at every block position
                mx.eval(block, choice, vhidden)
                drafts = block.tolist()[1:] if drafts is None else drafts
                acc, nxt = _accept_prefix(choice.tolist(), drafts)
            rerun = 0
            if rollback(cache, ckpt, b, acc + 1, tape=self.tape):
                rerun = acc + 1
                self.target.forward(block[:rerun], cache, (), logits="none")
                mx.eval([c.state for c in cache])
            if drafter is not None and vhidden is not None:
                drafter.observe(vhidden[: acc + 1])
            bytes_read = (self.store.stats().bytes_read - before) if self.store is not None else 0
            pol.observe(b, acc, bytes_read, time.perf_counter() - t_cycle)
            new = drafts[:acc] + [nxt]
            run._verified(ckpt, block, acc)
            self._stats.record(b, b - 1, acc, len(new), rerun)
            chunk = emitter.push(new)
            yield chunk
            if chunk.finish_reason:
                return
            history.extend(new)
            staged = nxt

    def _target_only_steps(self, run, cache, emitter, params, pos0: int, history: list, choose, pol, drafter,
                           capture) -> Iterator[SpecDecChunk]:
        """Target-only steps (one token each, ``history[-1]`` staged first), each queued on the device before the
        previous step's token is read back, as mlx-lm's ``generate_step`` does: the host builds step n+1 while the
        device computes step n. The token is chosen on the device (argmax, or the same keyed draw as
        ``first_token``), so the output is the unpipelined one. Every cache here is trimmable: a step fed ahead
        of a stop is trimmed by ``handover``.

        ``choose(n_out)`` gives the next block length: the stretch goes on while it is 1 (it is asked before the
        previous step is observed: the policy sees the steps one late). Each step feeds the drafter its captured
        hidden row and tells ``pol`` its bytes read and seconds (from the return of the previous yield to the token's
        read-back). Returns the block
        length of the drafting cycle to run next (its staged token is ``history[-1]``), or None when the request
        has ended (a stop, or ``max_tokens``)."""
        store = self.store

        def launch(token: mx.array, position: int):
            before = store.stats().bytes_read if store is not None else 0
            logits, hidden = self.target.forward(token, cache, capture, logits="last")
            if drafter is not None and hidden is not None:
                drafter.observe(hidden)  # lazy: read when the draft next runs
            y = sample(logits, params, position, [history] if params.processors else None)
            mx.async_eval(y)
            run._verified(None, None, 0)  # one more token fed into the cache
            return y, (store.stats().bytes_read - before) if store is not None else 0

        y, nbytes = launch(mx.array(history[-1:], dtype=mx.uint32), pos0 + len(emitter.tokens))
        t_prev = time.perf_counter()
        while True:
            n_out = len(emitter.tokens)  # ``y`` is the token at completion position pos0 + n_out
            b = choose(n_out + 1) if n_out + 1 < emitter.max_tokens else 0  # for the step after ``y``'s
            nxt = launch(y, pos0 + n_out + 1) if b == 1 else None
            t = int(y.item())
            if pol is not None:
                pol.observe(1, 0, nbytes, time.perf_counter() - t_prev)
            self._stats.record(1, 0, 0, 1, 0)
            history.append(t)
            chunk = emitter.push([t])
            yield chunk
            t_prev = time.perf_counter()  # the consumer's time is left out, as the drafting cycles' timing does
            if chunk.finish_reason or b == 0:
                return None
            if nxt is None:
                return b
            y, nbytes = nxt

    def _prefix_cache(self, prefix, n_prompt: int):
        """(verify-ready cache, tokens it covers, draft state) for a request; a fresh cache when ``prefix`` is
        None or unusable."""
        if prefix is not None:
            if isinstance(prefix, SpecDecKV):
                caches, n, draft_state = list(prefix), prefix.n_tokens, prefix.draft_state
            else:
                caches, n, *rest = prefix
                caches, draft_state = list(caches), (rest[0] if rest else None)
            # the prompt's last token is always fed: its logits start decoding
            if len(caches) == self._cache_layers:
                caches, want = fit_prefix(caches, min(int(n), n_prompt - 1))
                if caches is not None and want > 0:
                    exact_rotating_caches(caches)
                    if self.config.bucket_kv:
                        bucket_kv_caches(caches)
                    return caches, want, draft_state
        return self.target.make_cache(self.config.bucket_kv), 0, None


def _accept_prefix(choice: list[int], drafts: list[int]) -> tuple[int, int]:
    """(accepted drafts, next token): the longest prefix of drafts equal to the sampler's tokens ``choice`` at
    their positions, then the sampler's own token (see ``sampling.accept``)."""
    acc = 0
    while acc < len(drafts) and drafts[acc] == choice[acc]:
        acc += 1
    return acc, choice[acc]


class SpecDecKV(list):
    """A target prompt cache handed out of a run (``SpecDecRun.handover``) or into one (``generate(prefix=)``):
    the per-layer caches as plain mlx-lm classes (``KVCache``, ``RotatingKVCache``, ``ArraysCache`` ...), so
    ``BatchEngine`` merges them and a session store keeps them like any prompt cache, covering the first
    ``n_tokens`` tokens of the request's prompt + completion; ``draft_state``: the drafter's context for those
    tokens (``DFlashDrafter.snapshot``), or None. A list: code that knows nothing of the draft state sees an
    ordinary prompt cache."""

    def __init__(self, caches, n_tokens: int, draft_state=None):
        super().__init__(caches)
        self.n_tokens = int(n_tokens)
        self.draft_state = draft_state


class SpecDecRun:
    """One request of ``BlockSpecDecEngine.generate``: an iterator of ``SpecDecChunk``s (one per cycle; nothing
    runs before the first ``next``) that hands its KV over once it has ended or been closed.

    ``cached_tokens`` / ``prefilled_tokens``: prompt tokens taken from the prefix / run through the prefill
    (set once the request is checked: ``generate``'s first ``next``, or ``BlockSpecDecEngine.begin``)."""

    finish = None  # (a ``batch.Prefill`` member: a run never ends during its prefill)

    def __init__(self, engine: BlockSpecDecEngine, request_id: str | None = None):
        self._engine = engine
        self.request_id = request_id
        self._gen = None
        self._state = None  # (ids, cache, emitter, drafter, run number) once the prefill starts
        self._plan = None  # (params, resumed tokens, new-token budget, block policy, captured layers)
        self._prefill = None  # the ``batch.Prefill`` of the prompt (from its cached prefix on)
        self._first = {}  # "logits": [1, V] of the prompt's last token, from the prefill's last chunk
        self._extent = None  # tokens the cache covers (after the prefill, at each yield)
        self._last = None  # the last cycle's (checkpoint, block, accepted): undoes accepted tokens past a stop
        self._failed = False
        self.cached_tokens = 0
        self.prefilled_tokens = 0

    def __iter__(self):
        return self

    def __next__(self) -> SpecDecChunk:
        try:
            return next(self._gen)
        except StopIteration:
            raise
        except BaseException:  # the caches may be mid-update: nothing to hand over
            self._failed = True
            raise

    def close(self) -> None:
        self._gen.close()

    # -- bookkeeping from the generator ---------------------------------------------------------------------
    def _begin(self, ids, cache, emitter, drafter, cached: int) -> None:
        self._engine._runs += 1
        self._state = (ids, cache, emitter, drafter, self._engine._runs)
        self.cached_tokens, self.prefilled_tokens = cached, len(ids) - cached

    def _verified(self, ckpt, block, acc: int) -> None:
        self._extent += acc + 1  # the staged token and the accepted drafts stay in the cache
        self._last = (ckpt, block, acc)

    # -- handover -------------------------------------------------------------------------------------------
    def handover(self) -> SpecDecKV | None:
        """Closes the run and returns its KV: the target cache (plain mlx-lm classes) covering the committed
        tokens (prompt + completion; the last completion token is included only where the final cycle had
        already fed it) and the drafter's context for them. None if the run never prefilled, failed mid-cycle,
        or was handed over already. Call on the MLX thread; the caller owns the result."""
        self._gen.close()  # at a yield point (or finished): the caches are consistent
        if self._extent is None and self._prefill is not None and self._prefill.done:
            self._extent = len(self._state[0])  # prefilled (the last prompt token too), no token drawn yet
        state, self._state = self._state, None
        if state is None or self._failed or self._extent is None:
            return None
        ids, cache, emitter, drafter, number = state
        n = self._extent
        committed = len(ids) + len(emitter.tokens)
        if n > committed:  # the final cycle fed accepted tokens past the stop: keep only the committed ones
            ckpt, block, acc = self._last
            keep = acc + 1 - (n - committed)
            if rollback(cache, ckpt, acc + 1, keep):  # recurrent state: cycle start restored, re-run the kept
                self._engine.target.forward(block[:keep], cache, (), logits="none")
            n = committed
        mx.eval([c.state for c in cache])
        draft_state = None
        if drafter is not None and self._engine._runs == number:  # no later request has restarted the drafter
            draft_state = drafter.snapshot(n)
        return SpecDecKV(plain_caches(cache), n, draft_state)
