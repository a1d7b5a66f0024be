"""``BlockSpecDecEngine``: block speculative decoding of one request at a time on the MLX thread.

The cycle (per request, after a prefill that also captures the draft's target-layer hidden states):

1. the policy picks the block length b (1 = a target-only step; also forced by TARGET_ONLY mode, by the
   context-length fallback and by ``max_tokens``);
2. the drafter proposes b − 1 tokens after the staged token (the last committed token, not yet fed);
3. ONE target forward verifies ``[staged, d1 … d(b−1)]`` (capturing the tapped layers);
4. acceptance: greedy = longest prefix equal to the target's argmax + the bonus token; sampled = speculative
   rejection sampling (``acceptance.py``), lossless in distribution;
5. rollback of the rejected tail: attention KV trimmed (sliding windows exactly, wrapped or not); GatedDeltaNet
   state recomputed for the accepted tokens by replaying the recurrence recorded during the verify
   (``gdn_tape.py``), or, where a tape cannot replay, restored from a snapshot and the accepted tokens re-run
   (``target.py``);
6. the accepted tokens + bonus are committed (truncated at a stop token / stop string / max_tokens), their
   hidden states queued as draft context, the bonus becomes the next staged token.

Greedy output is token-identical to plain greedy decoding of the target (tests/test_specdec.py).
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlx.core as mx

from ...errors import ConfigError, RequestError
from ..sampling import validate
from .acceptance import first_token, greedy_accept, sampled_accept
from .config import BlockSpecDecEngineConfig, BlockSpecDecEngineMode
from .draft import DFlashDrafter, Drafter, PromptLookupDrafter, load_dflash_draft
from .output import SpecDecChunk, TokenEmitter
from .policies import make_policy
from .stats import SpecDecStats
from .gdn_tape import GDNTape
from .target import Checkpoint, TargetOps, rollback


@dataclass(frozen=True)
class _Params:
    temperature: float
    top_p: float
    top_k: int
    seed: int


class BlockSpecDecEngine:
    """Speculative decoding over a loaded MoE target (``load_moe``) and an optional DFlash draft."""

    def __init__(self, model, tokenizer, draft=None, *, config: BlockSpecDecEngineConfig | None = None,
                 store=None, drafter: Drafter | None = None):
        self.config = config or BlockSpecDecEngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.target = TargetOps(model)
        tape = GDNTape(self.target) if self.config.gdn_tape else None  # GatedDeltaNet rollback by replay
        self.tape = tape if tape is not None and len(tape) else None
        self.draft = draft
        self._drafters: dict[BlockSpecDecEngineMode, Drafter] = {
            BlockSpecDecEngineMode.PROMPT_LOOKUP: PromptLookupDrafter(self.config.lookup_max_ngram, self.config.lookup_min_ngram),
        }
        if draft is not None:
            self._check_draft(draft)
            self._drafters[BlockSpecDecEngineMode.NATIVE_V7] = DFlashDrafter(
                draft, self.target, self.config.draft_sink, self.config.draft_window
            )
        if drafter is not None:  # a custom drafter (tests: oracle drafts) takes the NATIVE_V7 slot
            self._drafters[BlockSpecDecEngineMode.NATIVE_V7] = drafter
        for d in self._drafters.values():
            if d.needs_hidden:
                self.target.tap(d.capture_layer_ids)
        if self.config.mode == BlockSpecDecEngineMode.NATIVE_V7 and BlockSpecDecEngineMode.NATIVE_V7 not in self._drafters:
            raise ConfigError("mode NATIVE_V7 needs a DFlash draft: pass draft_checkpoint (or use PROMPT_LOOKUP / TARGET_ONLY)")
        self._stats = SpecDecStats(self.config.block_size, self.config.recent_window, self.config.low_alpha)
        self.last_policy = None

    @classmethod
    def from_checkpoint(cls, target_checkpoint, draft_checkpoint=None, config: BlockSpecDecEngineConfig | None = None,
                        **load_moe_kwargs) -> "BlockSpecDecEngine":
        """Loads the target with ``load_moe`` (keyword arguments pass through) and the DFlash draft, if any."""
        from ...io.load import load_moe

        model, tokenizer, store, _ = load_moe(target_checkpoint, **load_moe_kwargs)
        draft = load_dflash_draft(Path(draft_checkpoint)) if draft_checkpoint is not None else None
        return cls(model, tokenizer, draft, config=config, store=store)

    def _check_draft(self, draft) -> None:
        H = self.target.hidden_size
        if int(draft.args.hidden_size) != H:
            raise ConfigError(f"draft hidden_size {draft.args.hidden_size} does not match the target's {H}")
        ids = list(draft.target_layer_ids)
        if any(not 0 <= i < self.target.num_layers for i in ids):
            raise ConfigError(f"draft target_layer_ids {ids} outside the target's {self.target.num_layers} layers")
        if int(draft.fc.weight.shape[-1]) != len(ids) * H:
            raise ConfigError(f"draft fc expects {draft.fc.weight.shape[-1]} inputs, {len(ids)} layers × {H} given")

    # -- stats --------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        out = self._stats.as_dict()
        out["mode"] = self.config.mode.value
        out["policy"] = self.config.policy
        out["block_size"] = self.config.block_size
        if self.store is not None:
            s = self.store.stats()
            out["expert_bytes_read"] = s.bytes_read
            out["expert_hit_rate"] = s.hit_rate
        return out

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
                 policy: str | None = None, ignore_eos: bool = False) -> Iterator[SpecDecChunk]:
        """Chunks of one request (one per cycle); the last has ``finish_reason`` "stop" or "length".

        ``mode`` / ``policy`` override the engine's config for this request; ``ignore_eos`` decodes past the
        tokenizer's eos ids (benchmarks); ``seed`` None draws one.
        """
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise RequestError("the prompt is empty: give at least one token")
        if max_tokens <= 0:
            raise RequestError(f"max_tokens must be > 0, got {max_tokens}")
        validate(temperature, top_p, top_k)
        mode = self.config.mode if mode is None else BlockSpecDecEngineMode(mode)
        drafter = None if mode == BlockSpecDecEngineMode.TARGET_ONLY else self._drafters.get(mode)
        if mode != BlockSpecDecEngineMode.TARGET_ONLY and drafter is None:
            raise ConfigError(f"mode {mode.name} needs a draft model; this engine has none")
        if isinstance(stop, str):
            stop = (stop,)
        params = _Params(temperature, top_p, top_k, random.getrandbits(62) if seed is None else int(seed))
        pol = make_policy(policy or self.config.policy, self.config.block_size, store=self.store, prompt_len=len(ids))
        self.last_policy = pol
        cfg = self.config
        eos = set() if ignore_eos else set(self.tokenizer.eos_token_ids)
        emitter = TokenEmitter(self.tokenizer, eos | set(stop_token_ids), stop, max_tokens)
        cache = self.target.make_cache(self.config.bucket_kv)
        capture = drafter.capture_layer_ids if drafter is not None and drafter.needs_hidden else ()
        if drafter is not None:
            drafter.start(ids)

        logits = self.target.prefill(ids, cache, cfg.prefill_step, capture, drafter.observe if capture else None)
        staged = first_token(logits, params, 0)
        self._stats.add_prompt_commit()
        chunk = emitter.push([staged])
        yield chunk
        if chunk.finish_reason:
            return
        history = ids + [staged]
        while True:
            n_out = len(emitter.tokens)
            ctx_len = len(ids) + n_out - 1  # tokens in the cache
            b = 1
            if drafter is not None and not (cfg.target_only_above_context and ctx_len > cfg.target_only_above_context):
                b = max(1, min(pol.block_len(ctx_len), cfg.block_size, max_tokens - n_out))
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
            # a snapshot where some cache cannot trim (GatedDeltaNet state; deepseek_v4's compressed caches)
            ckpt = Checkpoint(cache) if b > 1 and not all(c.is_trimmable() for c in cache) else None
            with self.tape.recording() if ckpt is not None and self.tape is not None else contextlib.nullcontext():
                vlogits, vhidden = self.target.forward(block, cache, capture)
            # one host sync per cycle: drafts, the target's choices and the captured hidden states together
            if temperature == 0:
                choice = mx.argmax(vlogits, axis=-1)
                mx.eval(block, choice, vhidden)
                drafts = block.tolist()[1:] if drafts is None else drafts
                acc, nxt = greedy_accept(choice.tolist(), drafts)
            else:
                mx.eval(block, vlogits, vhidden)
                drafts = block.tolist()[1:] if drafts is None else drafts
                acc, nxt = sampled_accept(vlogits, drafts, params, n_out)
            rerun = 0
            if rollback(cache, ckpt, b, acc + 1, tape=self.tape):
                rerun = acc + 1
                self.target.forward(block[:rerun], cache, (), logits="none")
                mx.eval([c.state for c in cache])
            if drafter is not None and vhidden is not None:
                drafter.observe(vhidden[: acc + 1])
            bytes_read = (self.store.stats().bytes_read - before) if self.store is not None else 0
            pol.observe(b, acc, bytes_read)
            new = drafts[:acc] + [nxt]
            self._stats.record(b, b - 1, acc, len(new), rerun)
            chunk = emitter.push(new)
            yield chunk
            if chunk.finish_reason:
                return
            history.extend(new)
            staged = nxt
