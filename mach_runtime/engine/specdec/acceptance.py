"""Accepting a verified block: greedy (longest prefix equal to the target's argmax, plus the bonus token) and
speculative rejection sampling, lossless in distribution.

Rejection sampling (Leviathan et al. / Chen et al.): draft token x at a position is accepted with probability
min(1, p(x) / q(x)), p the target's distribution there (after temperature / top-k / top-p, exactly what plain
sampling draws from), q the draft's. On the first rejection the token is drawn from normalize(max(0, p - q)) and
the cycle ends; if every draft is accepted a bonus token is drawn from p at the last position. Every emitted
token is then distributed exactly as under plain sampling. Our drafts are deterministic (DFlash argmax, prompt
lookup), so q is one-hot: accept x with probability p(x), on rejection draw from p with x removed.

Randomness comes from per-request keys of (seed, position in the completion), like ``engine.sampling``: a
request replays exactly whatever it is batched or interleaved with.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..sampling import sample_key


@dataclass(frozen=True)
class Sampling:
    """A request's sampling parameters as acceptance uses them (``seed`` resolved: never None)."""

    temperature: float
    top_p: float
    top_k: int
    seed: int


def filtered_logprobs(logits: mx.array, temperature: float, top_p: float, top_k: int) -> mx.array:
    """Rows of logits [n, V] → log-probabilities of the distribution plain sampling draws from (masked = -inf)."""
    logits = logits.astype(mx.float32) / temperature
    V = logits.shape[-1]
    if top_k and top_k < V:
        kth = mx.sort(logits, axis=-1)[:, V - top_k][:, None]
        logits = mx.where(logits >= kth, logits, -mx.inf)
    if top_p < 1.0:
        order = mx.argsort(-logits, axis=-1)
        sorted_logits = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        before = mx.cumsum(probs, axis=-1) - probs  # mass strictly above each token; the top token is kept
        keep_sorted = before < top_p
        inverse = mx.argsort(order, axis=-1)
        keep = mx.take_along_axis(keep_sorted, inverse, axis=-1)
        logits = mx.where(keep, logits, -mx.inf)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def greedy_accept(choice: list[int], drafts: list[int]) -> tuple[int, int]:
    """(accepted drafts, next token) given the target's argmax ``choice`` at each row of the block
    [staged, *drafts]: the longest prefix of drafts equal to it, then the target's own token."""
    acc = 0
    while acc < len(drafts) and drafts[acc] == choice[acc]:
        acc += 1
    return acc, choice[acc]


def _keys(seed: int, position: int) -> tuple[mx.array, mx.array]:
    k = mx.random.split(sample_key(seed, position))
    return k[0], k[1]


def sampled_accept(logits: mx.array, drafts: list[int], params, first_position: int,
                   draft_logprobs: mx.array | None = None) -> tuple[int, int]:
    """(accepted drafts, next token) by rejection sampling.

    ``logits`` [b, V] are the verify logits of [staged, *drafts]; row i gives the distribution of completion
    position ``first_position + i``. ``params`` has temperature, top_p, top_k, seed. ``draft_logprobs`` [b-1, V]
    is the draft's distribution (None: a deterministic draft, q one-hot at each draft token).
    """
    logp = filtered_logprobs(logits, params.temperature, params.top_p, params.top_k)
    n = len(drafts)
    keys = [_keys(params.seed, first_position + i) for i in range(n + 1)]
    acc = 0
    if n:
        d = mx.array(drafts, dtype=mx.int32)[:, None]
        p_x = mx.exp(mx.take_along_axis(logp[:n], d, axis=-1)[:, 0])
        if draft_logprobs is None:
            ratio = p_x
        else:
            q_x = mx.exp(mx.take_along_axis(draft_logprobs, d, axis=-1)[:, 0])
            ratio = mx.minimum(1.0, p_x / mx.maximum(q_x, 1e-30))
        u = mx.stack([mx.random.uniform(key=k[0]) for k in keys[:n]])
        ok = (u < ratio).tolist()
        while acc < n and ok[acc]:
            acc += 1
    row = logp[acc]
    if acc < n:  # rejected: draw from normalize(max(0, p - q))
        p = mx.exp(row)
        if draft_logprobs is None:
            resid = p * (mx.arange(p.shape[0]) != drafts[acc])
        else:
            resid = mx.maximum(p - mx.exp(draft_logprobs[acc]), 0.0)
        row = mx.log(resid)
    tok = int(mx.random.categorical(row, key=keys[acc][1]).item())
    return acc, tok


def device_token(logits: mx.array, params, position: int = 0) -> mx.array:
    """The token [1] (uint32, unevaluated) plain decoding picks from logits [1, V] at completion ``position``:
    argmax, or a draw keyed by (seed, position) from the filtered distribution (what ``sampled_accept`` draws
    for a block without drafts)."""
    if params.temperature == 0:
        return mx.argmax(logits, axis=-1).astype(mx.uint32)
    logp = filtered_logprobs(logits, params.temperature, params.top_p, params.top_k)[0]  # [V]: the draw's shape
    return mx.random.categorical(logp, key=_keys(params.seed, position)[1]).reshape(1).astype(mx.uint32)


def first_token(logits: mx.array, params, position: int = 0) -> int:
    """The token plain decoding picks from one row of logits [V] (the first token, out of prefill)."""
    return int(device_token(logits[None], params, position).item())
