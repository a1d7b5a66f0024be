"""Per-request sampling inside a batch: temperature, top-k, top-p, min-p, presence/frequency penalties, a token
mask (grammar constraints), log-probabilities, and a seed that makes draws reproducible.

Each draw uses a key derived from (seed, position in the completion), not a global RNG stream, so a request
samples the same tokens whether it runs alone, in a batch, or is replayed after a Decoder restart.

Order of operations for one row (as vLLM and mlx-lm apply them): penalties on the raw logits, then the token
mask, then temperature, top-k, top-p and min-p; greedy rows take the argmax after penalties and mask. Reported
log-probabilities are the model's own (raw logits, log-softmax), as OpenAI's ``logprobs`` are.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..errors import ConfigError

_MASK64 = (1 << 63) - 1
MAX_TOP_LOGPROBS = 20


def validate(temperature: float, top_p: float, top_k: int, min_p: float = 0.0, presence_penalty: float = 0.0,
             frequency_penalty: float = 0.0, top_logprobs: int = 0) -> None:
    if not temperature >= 0 or not math.isfinite(temperature):
        raise ConfigError(f"temperature must be a finite number >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0, got {top_k}")
    if not 0 <= min_p <= 1:
        raise ConfigError(f"min_p must be in [0, 1], got {min_p}")
    for name, v in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not -2 <= v <= 2:
            raise ConfigError(f"{name} must be in [-2, 2], got {v}")
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise ConfigError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")


def _filtered_logits(logits: mx.array, temperature: float, top_p: float, top_k: int, min_p: float = 0.0) -> mx.array:
    """1-D logits scaled by temperature, with everything outside top-k / the top-p nucleus / min-p masked."""
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
    if min_p > 0.0:  # p(x) >= min_p * max p  <=>  logit(x) - max logit >= log(min_p); keeps the top token
        logits = mx.where(logits - logits.max() >= math.log(min_p), logits, -mx.inf)
    return logits


def sample_key(seed: int, position: int) -> mx.array:
    return mx.random.key((seed * 0x9E3779B97F4A7C15 + position) & _MASK64)


def sample_batch(logprobs: mx.array, rows: list) -> mx.array:
    """Tokens [B] for logprobs [B, V]; ``rows[i]`` = (temperature, top_p, top_k, seed, position[, min_p])."""
    greedy = mx.argmax(logprobs, axis=-1)
    if all(r[0] == 0 for r in rows):
        return greedy
    out = []
    for i, (temperature, top_p, top_k, seed, position, *rest) in enumerate(rows):
        if temperature == 0:
            out.append(greedy[i])
        else:
            logits = _filtered_logits(logprobs[i], temperature, top_p, top_k, rest[0] if rest else 0.0)
            out.append(mx.random.categorical(logits, key=sample_key(seed, position)))
    return mx.stack(out)


def penalize(logits: mx.array, generated, presence: float, frequency: float) -> mx.array:
    """1-D logits minus OpenAI's presence / frequency penalties over the tokens generated so far:
    ``logit[t] -= presence * (count[t] > 0) + frequency * count[t]``."""
    if not generated or (presence == 0 and frequency == 0):
        return logits
    ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
    keep = ids < logits.shape[-1]
    ids, counts = ids[keep], counts[keep].astype(np.float32)
    delta = mx.zeros(logits.shape, dtype=mx.float32)
    delta[mx.array(ids)] = mx.array(presence + frequency * counts)
    return logits - delta.astype(logits.dtype)


def apply_bitmask(logits: mx.array, bitmask: np.ndarray) -> mx.array:
    """Logits [B, V] with every token whose bit is clear in ``bitmask`` [B, W] (int32 words, bit t % 32 of word
    t // 32, as llguidance / xgrammar write them) set to -inf; tokens past the mask's 32*W are masked too."""
    V = logits.shape[-1]
    words = np.ascontiguousarray(bitmask, dtype=np.int32).view(np.uint32)
    bits = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little").astype(bool)  # [B, 32W]
    if bits.shape[-1] < V:
        bits = np.pad(bits, ((0, 0), (0, V - bits.shape[-1])))
    return mx.where(mx.array(bits[:, :V]), logits, -mx.inf)


def token_logprobs(logits: mx.array, tokens: mx.array, k: int):
    """(logprob of each row's token [B], top-k token ids [B, k], their logprobs [B, k]) under the model's own
    distribution ``log_softmax(logits)``; top-k sorted most likely first (k = 0: empty)."""
    lp = logits.astype(mx.float32)
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(lp, tokens.astype(mx.int32)[:, None], axis=-1)[:, 0]
    if k <= 0:
        empty = mx.zeros((lp.shape[0], 0), dtype=mx.float32)
        return chosen, empty.astype(mx.int32), empty
    top = mx.argpartition(-lp, kth=k - 1, axis=-1)[:, :k]
    vals = mx.take_along_axis(lp, top, axis=-1)
    order = mx.argsort(-vals, axis=-1)
    return chosen, mx.take_along_axis(top, order, axis=-1), mx.take_along_axis(vals, order, axis=-1)
