"""THE sampler: one request-parameter type and one keyed draw, used by every decode path.

``SamplingParams`` is the only type a request's parameters have (the Runtime builds it, ``Submit`` carries it, the
batch, the speculative engines and ``generate`` read it). A draw is keyed by (seed, completion position), never by
a global RNG stream: the uniform ``u = uniform(seed, position)`` is a hash computed on the host (the same on
every backend, no MLX RNG state), and the token is the inverse-CDF pick of ``u`` in the filtered distribution
(token-id order). So a request samples the same tokens alone, batched, moved between lanes, replayed after a
crash, or verified speculatively: with a deterministic draft (DFlash argmax, prompt lookup) speculative
acceptance is "accept the draft iff it equals the keyed draw at its position" — which is exactly rejection
sampling with a one-hot draft (P(accept x) = p(x); on rejection the keyed pick is distributed as p without x)
and gives token-for-token the output of plain sampling (``accept``).

The filters follow mlx-lm's sampler: temperature, top-k, top-p (nucleus; the most likely token is always kept),
min-p (relative to the most likely token). ``processors`` is the per-request logits hook (mlx-lm's
``logits_processors`` signature: ``fn(tokens: mx.array, logits: mx.array [1, V]) -> logits``), applied before the
filters with the request's tokens so far (prompt + completion). OpenAI presence / frequency penalties and
grammar masks (``constraints.py``, llguidance bitmasks) are applied by the target-only batch before the filters,
as vLLM and mlx-lm order them; reported log-probabilities are the model's own (raw logits, log-softmax).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..errors import ConfigError
from .params import MAX_TOP_LOGPROBS, SamplingParams  # noqa: F401  (MAX_TOP_LOGPROBS: re-exported)

_M64 = (1 << 64) - 1


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


def check(p: SamplingParams) -> None:
    validate(p.temperature, p.top_p, p.top_k, p.min_p, p.presence_penalty, p.frequency_penalty, p.top_logprobs)
    if p.max_tokens <= 0:
        raise ConfigError(f"max_tokens must be > 0, got {p.max_tokens}")


def _mix(x: int) -> int:
    """splitmix64's finaliser."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def uniform(seed: int, position: int, stream: int = 0) -> float:
    """The uniform in [0, 1) of draw ``stream`` at completion ``position`` of a request seeded ``seed`` (24 bits:
    exact in float32)."""
    h = _mix(_mix((int(seed) & _M64) ^ (stream << 56)) ^ (int(position) & _M64))
    return (h >> 40) * 2.0 ** -24


def filtered_logprobs(logits: mx.array, p: SamplingParams) -> mx.array:
    """Rows of logits [n, V] → log-probabilities (float32) of the distribution sampling draws from: temperature,
    then top-k, top-p, min-p; masked tokens at -inf."""
    logits = logits.astype(mx.float32) / p.temperature
    V = logits.shape[-1]
    if p.top_k and p.top_k < V:
        kth = mx.sort(logits, axis=-1)[:, V - p.top_k][:, None]
        logits = mx.where(logits >= kth, logits, -mx.inf)
    if p.top_p < 1.0:
        order = mx.argsort(-logits, axis=-1)
        probs = mx.softmax(mx.take_along_axis(logits, order, axis=-1), axis=-1)
        keep_sorted = (mx.cumsum(probs, axis=-1) - probs) < p.top_p  # mass strictly above; the top token stays
        keep = mx.take_along_axis(keep_sorted, mx.argsort(order, axis=-1), axis=-1)
        logits = mx.where(keep, logits, -mx.inf)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if p.min_p > 0:
        top = mx.max(logp, axis=-1, keepdims=True)
        logp = mx.where(logp >= top + math.log(p.min_p), logp, -mx.inf)
        logp = logp - mx.logsumexp(logp, axis=-1, keepdims=True)
    return logp


def _filtered_logits(logits: mx.array, temperature: float, top_p: float, top_k: int, min_p: float = 0.0):
    """1-D logits → the filtered log-probabilities at ``temperature`` (masked = -inf): ``filtered_logprobs`` for
    one row."""
    return filtered_logprobs(logits[None], SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                                                          min_p=min_p))[0]


def pick(logp: mx.array, us) -> mx.array:
    """Inverse-CDF picks: rows of log-probabilities [n, V] and one uniform per row → tokens [n] (uint32)."""
    cdf = mx.cumsum(mx.exp(logp), axis=-1)
    u = mx.array(list(us), dtype=mx.float32)[:, None] * cdf[:, -1:]
    idx = mx.sum(cdf <= u, axis=-1)  # the first token whose cumulative mass exceeds u (never a masked one)
    return mx.minimum(idx, logp.shape[-1] - 1).astype(mx.uint32)


def process(logits: mx.array, p: SamplingParams, histories) -> mx.array:
    """Rows of logits [n, V] through the request's logits processors; ``histories[i]``: the tokens before row i
    (a list or an mx.array)."""
    if not p.processors:
        return logits
    rows = []
    for i in range(logits.shape[0]):
        h = histories[i]
        tokens = h if isinstance(h, mx.array) else mx.array(list(h), dtype=mx.uint32)
        row = logits[i : i + 1]
        for fn in p.processors:
            row = fn(tokens, row)
        rows.append(row)
    return mx.concatenate(rows, axis=0)


def sample(logits: mx.array, p: SamplingParams, first_position: int, histories=None) -> mx.array:
    """Tokens [n] (uint32, lazy) for rows of logits [n, V] of ONE request at completion positions
    ``first_position``, ``first_position + 1``, …: argmax at temperature 0, else the keyed draw."""
    if p.processors:
        logits = process(logits, p, histories)
    if p.temperature == 0:
        return mx.argmax(logits, axis=-1).astype(mx.uint32)
    seed = p.seed if p.seed is not None else 0
    return pick(filtered_logprobs(logits, p), [uniform(seed, first_position + i) for i in range(logits.shape[0])])


def sample_rows(logits: mx.array, rows: list) -> mx.array:
    """Tokens [B] (uint32, lazy) for logits [B, V] of B requests; ``rows[i] = (params, position[, history])``."""
    if all(r[0].temperature == 0 and not r[0].processors for r in rows):
        return mx.argmax(logits, axis=-1).astype(mx.uint32)
    if all(not r[0].processors for r in rows) and len({_filters(r[0]) for r in rows}) == 1:
        p = rows[0][0]  # one filter for every row: one pass, the uniforms per row
        return pick(filtered_logprobs(logits, p), [uniform(r[0].seed or 0, r[1]) for r in rows])
    return mx.concatenate([sample(logits[i : i + 1], r[0], r[1], [r[2]] if len(r) > 2 else None)
                           for i, r in enumerate(rows)])


def _filters(p: SamplingParams) -> tuple:
    return (p.temperature, p.top_p, p.top_k, p.min_p)


def accept(logits: mx.array, drafts: list[int], p: SamplingParams, first_position: int, histories=None,
           draft_logprobs: mx.array | None = None) -> tuple[int, int]:
    """(accepted drafts, next token) for the verify logits [b, V] of [staged, *drafts] (row i: completion
    position ``first_position + i``).

    Deterministic drafts (``draft_logprobs`` None: q one-hot): the longest prefix of drafts equal to the sampler's
    own tokens at their positions, then the sampler's token — the output of plain decoding with the same keys,
    and distribution-exact rejection sampling. A draft distribution q [b-1, V]: the general rule (accept x with
    probability min(1, p(x)/q(x)) using draw stream 1; on rejection the keyed pick from normalize(max(0, p - q)))
    — distribution-exact, but not token-identical to plain decoding.
    """
    n = len(drafts)
    if draft_logprobs is None:
        choice = sample(logits, p, first_position, histories).tolist()
        acc = 0
        while acc < n and drafts[acc] == choice[acc]:
            acc += 1
        return acc, choice[acc]
    logits = process(logits, p, histories) if p.processors else logits
    logp = filtered_logprobs(logits, p)
    seed = p.seed or 0
    d = mx.array(drafts, dtype=mx.int32)[:, None]
    p_x = mx.exp(mx.take_along_axis(logp[:n], d, axis=-1)[:, 0])
    q_x = mx.exp(mx.take_along_axis(draft_logprobs, d, axis=-1)[:, 0])
    ok = (mx.array([uniform(seed, first_position + i, 1) for i in range(n)]) < p_x / mx.maximum(q_x, 1e-30)).tolist()
    acc = 0
    while acc < n and ok[acc]:
        acc += 1
    row = logp[acc : acc + 1]
    if acc < n:
        row = mx.log(mx.maximum(mx.exp(row) - mx.exp(draft_logprobs[acc : acc + 1]), 0.0))
    return acc, int(pick(row, [uniform(seed, first_position + acc)]).item())


class KeyedSampler:
    """A sampler callable for single-request loops (``generate.generate_tokens``): each call draws the next
    completion position: ``sampler(logprobs [1, V]) -> token [1]``."""

    def __init__(self, params: SamplingParams, position: int = 0):
        self.params = params.resolved()
        self.position = position

    def __call__(self, logits: mx.array) -> mx.array:
        out = sample(logits, self.params, self.position)
        self.position += 1
        return out


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
