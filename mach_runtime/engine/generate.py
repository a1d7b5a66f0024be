"""Single-request generation on the MLX thread: chunked prefill, then a pipelined decode loop.

The decode loop queues the next forward (``mx.async_eval``) before handing out the current token, so the host
work of one step overlaps the device work of the next. With streaming residency the steps run optimistically
(``io/optimistic.py``): a step is checked for expert misses after the next one is queued, and a step that
missed is rolled back and redone with its experts loaded, so the pipelining survives and the tokens do not
change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx

from ..errors import ConfigError
from .emit import Emitter
from .sampling import KeyedSampler, SamplingParams, check

PREFILL_STEP = 512


@dataclass
class GenerationChunk:
    text: str  # text decoded since the previous chunk (may be empty mid-character)
    token: int
    finish_reason: str | None = None  # "stop" (eos) or "length" on the last chunk


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str | None = None
    token_readbacks: int = 0  # tokens read back on their own (the rest rode along with a streaming step's check)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # the first generated token comes out of prefill; decode time covers the rest
        n = self.generated_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds else 0.0


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 min_p: float = 0.0, position: int = 0) -> KeyedSampler:
    """THE sampler for a single-request loop: each call ``sampler(logits [1, V]) -> token [1]`` draws the next
    completion position (from ``position``) keyed by (seed, position); greedy when temperature is 0."""
    p = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
    check(p)
    return KeyedSampler(p, position)


def prefill(model, tokens: mx.array, cache, step: int = PREFILL_STEP) -> mx.array:
    """Runs all but the last prompt token through the model into ``cache``; returns the last token."""
    while tokens.size > 1:
        n = min(step, tokens.size - 1)
        model(tokens[:n][None], cache=cache)
        mx.eval([c.state for c in cache])
        tokens = tokens[n:]
    return tokens


def generate_tokens(model, prompt_ids: list[int], cache, sampler, max_tokens: int, stats: GenerationStats | None = None) -> Iterator[int]:
    """Yields up to ``max_tokens`` token ids; the caller stops early on eos."""
    if not prompt_ids:
        raise ConfigError("the prompt is empty: give at least one token")
    if max_tokens <= 0:
        raise ConfigError(f"max_tokens must be > 0, got {max_tokens}")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)

    from ..io.optimistic import guard_for

    guard = guard_for(model, cache)  # streaming residency: each step is checked after the next is queued
    # THE sampler's draws are keyed by (seed, completion position): a step redone after a streaming miss is told
    # its position again and samples exactly what it would have sampled the first time
    start = getattr(sampler, "position", None)
    pos = [0]

    def step(y, at=None):
        at = pos[0] if at is None else at
        pos[0] = at + 1
        if start is not None:
            sampler.position = start + at
        ck = (guard.begin(), at) if guard is not None else None
        logits = model(y[None], cache=cache)[:, -1, :]
        return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True)), ck

    def redo(y, ck, tokens):  # a streamed step missed: roll back and recompute it with its misses loaded
        guard.rollback(ck[0], tokens)
        with guard.redo():
            tok, _ = step(y, ck[1])
        mx.eval(tok)
        return tok

    t0 = time.perf_counter()
    y = prefill(model, mx.array(prompt_ids, dtype=mx.uint32), cache)
    tok, ck = step(y)
    mx.eval(tok)
    if guard is not None and not guard.verify(ck[0]):
        tok = redo(y, ck, 1)
    stats.prefill_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        for n in range(max_tokens):
            nxt = nck = None
            if n + 1 < max_tokens:
                nxt, nck = step(tok)
                mx.async_eval(nxt, *(guard.outputs(nxt) if guard is not None else ()))
            host = None
            if guard is not None and ck is not None:
                if guard.verify(ck[0]):
                    host = guard.token(ck[0])  # read back with the check: no second sync
                else:
                    tok = redo(y, ck, 2 if nxt is not None else 1)
                    if nxt is not None:
                        nxt, nck = step(tok)
                        mx.async_eval(nxt, *guard.outputs(nxt))
            stats.generated_tokens = n + 1
            stats.decode_seconds = time.perf_counter() - t0
            if host is None:
                stats.token_readbacks += 1
            yield int(host[0]) if host is not None else int(tok.item())
            y, tok, ck = tok, nxt, nck
    finally:
        if guard is not None:
            guard.close()


def stream_generate(model, tokenizer, prompt, *, max_tokens: int = 256, temperature: float = 0.0,
                    top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop=(), cache=None,
                    stats: GenerationStats | None = None, params: SamplingParams | None = None
                    ) -> Iterator[GenerationChunk]:
    """Text chunks for a prompt (a string, or token ids); stops at eos, a stop string or ``max_tokens``.
    ``seed`` keys the draws exactly as ``Runtime.stream(seed=)`` does; ``params`` replaces the keywords."""
    from mlx_lm.models.cache import make_prompt_cache

    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if cache is None:
        cache = make_prompt_cache(model)
    if params is None:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                stop=tuple([stop] if isinstance(stop, str) else stop or ()))
    check(params)
    params = params.resolved()
    stats = stats if stats is not None else GenerationStats()
    emitter = Emitter(tokenizer, params)
    for tok in generate_tokens(model, ids, cache, KeyedSampler(params), params.max_tokens, stats):
        text, finish, _ = emitter.push([tok])
        if finish:
            stats.finish_reason = finish
        yield GenerationChunk(text, tok, finish)
        if finish:
            return
