"""Per-request sampling inside a batch: temperature, top-k, top-p, and a seed that makes draws reproducible.

Each draw uses a key derived from (seed, position in the completion), not a global RNG stream, so a request
samples the same tokens whether it runs alone, in a batch, or is replayed after a Decoder restart.
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import ConfigError

_MASK64 = (1 << 63) - 1


def validate(temperature: float, top_p: float, top_k: int) -> None:
    if not temperature >= 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0, got {top_k}")


def _filtered_logits(logits: mx.array, temperature: float, top_p: float, top_k: int) -> mx.array:
    """1-D logits scaled by temperature, with everything outside top-k / the top-p nucleus masked."""
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = mx.sort(logits)[-top_k]
        logits = mx.where(logits >= kth, logits, -mx.inf)
    if top_p < 1.0:
        order = mx.argsort(-logits)
        probs = mx.softmax(logits[order])
        before = mx.cumsum(probs) - probs  # mass strictly above each token
        keep_sorted = before < top_p  # always keeps the most likely token
        keep = mx.zeros(logits.shape, dtype=mx.bool_)
        keep[order] = keep_sorted
        logits = mx.where(keep, logits, -mx.inf)
    return logits


def sample_key(seed: int, position: int) -> mx.array:
    return mx.random.key((seed * 0x9E3779B97F4A7C15 + position) & _MASK64)


def sample_batch(logprobs: mx.array, rows: list) -> mx.array:
    """Tokens [B] for logprobs [B, V]; ``rows[i]`` = (temperature, top_p, top_k, seed, position)."""
    greedy = mx.argmax(logprobs, axis=-1)
    if all(r[0] == 0 for r in rows):
        return greedy
    out = []
    for i, (temperature, top_p, top_k, seed, position) in enumerate(rows):
        if temperature == 0:
            out.append(greedy[i])
        else:
            logits = _filtered_logits(logprobs[i], temperature, top_p, top_k)
            out.append(mx.random.categorical(logits, key=sample_key(seed, position)))
    return mx.stack(out)
