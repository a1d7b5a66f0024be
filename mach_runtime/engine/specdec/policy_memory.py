"""What the block policies estimate from past cycles: an engine's shared memory of cycle timings and recent
acceptance (``PolicyMemory``), a request's acceptance curve (``Acceptance``: tokens a cycle of b commits), and the
typical cycle time (``typical``). Used by ``policies.py``."""

from __future__ import annotations

import statistics
from collections import deque


def typical(samples) -> float | None:
    """The median of recent cycle timings. Outliers are only ever slow (a cycle that built kernels: on a GPU the
    first verify at each new KV span; preemption) and rare among a few samples, while a pipelined target-only
    step's time (between two read-backs) scatters both ways around its mean, so a minimum or low quantile
    undercuts it (and ``throughput`` then picks target-only steps where blocks pay: docs/benchmarks.md)."""
    return statistics.median(samples) if samples else None


def _geometric_alpha(cycles) -> float:
    """Per-draft acceptance from (drafted, accepted) cycles: the MLE of a geometric run, uniform prior."""
    accepted = sum(a for _, a in cycles)
    rejections = sum(1 for d, a in cycles if a < d)
    return (accepted + 1) / (accepted + rejections + 2)


class PolicyMemory:
    """What an engine's requests share: recent cycle seconds per block length (a machine's costs outlive a
    request) and its most recent (drafted, accepted) cycles (a new request's acceptance prior)."""

    def __init__(self, samples: int = 5, window: int = 32):
        self.samples = samples
        self.times: dict[int, deque] = {}
        self.cycles: deque = deque(maxlen=window)

    def series(self, b: int) -> deque:
        return self.times.setdefault(b, deque(maxlen=self.samples))

    def seconds(self, b: int) -> float | None:
        return typical(self.times.get(b))


def _hazards(cycles, prior, pseudo: float) -> list[float]:
    """Per draft position j of ``cycles`` ((drafted, accepted, weight)), the weighted share of the cycles that
    drafted and reached j whose draft j was rejected, with ``pseudo`` cycles at hazard ``prior(j)`` (the
    product-limit estimate: full acceptance is censored at the drafted length)."""
    cycles = list(cycles)
    K = max([d for d, _, _ in cycles], default=0)
    ended, rejected = [0.0] * (K + 1), [0.0] * (K + 1)  # weight whose drafted run ended / was rejected at j
    for d, a, w in cycles:
        ended[min(a, d - 1)] += w
        if a < d:
            rejected[a] += w
    out, at_risk = [], sum(ended)
    for j in range(K):
        out.append((rejected[j] + pseudo * prior(j)) / (at_risk + pseudo))
        at_risk -= ended[j]
    return out


class Acceptance:
    """How many tokens a cycle of b commits, for one request: T(b) = 1 + Σ_{j < b−1} P(drafts 0..j accepted),
    from the product-limit curve of its last ``window`` (drafted, accepted) cycles, each weighted by its age in
    tokens, 0.5^(age / ``half_life``), around the engine's recent cycles as a prior (``PolicyMemory.cycles``
    when the request starts: one pseudo-cycle per draft position at their hazard, or at 1 − α where they did
    not draft that far). Past the longest drafted position, and as ``alpha``, the geometric estimate
    α = (Σ w·accepted + k·α₀) / (Σ w·(accepted + rejected) + k), α₀ the engine's, k = ``prior_weight``.

    Why a curve and not one α: DFlash acceptance is bursty (whole blocks accepted in predictable stretches,
    early rejections elsewhere), which a geometric run at the mean α under-rates for long blocks (measured
    with ``bench/p3_specdec.py`` and ``bench/policy_replay.py``: docs/benchmarks.md, "Measurements the code's
    design rests on"). Why aged by tokens: acceptance follows the text, so after a target-only stretch one fresh
    probe outweighs the unpredictable stretch that stopped drafting, and with no recent evidence the estimate
    returns to what the engine sees. Why the engine's prior: with a uniform α = 0.5 every request starts where,
    on a GPU, no block pays for its verify (a 16-token cycle costs about two target-only steps and would commit
    2 tokens), so ``throughput`` would begin each request target-only."""

    def __init__(self, window: int = 32, memory: PolicyMemory | None = None, *, half_life: float = 128.0,
                 prior_weight: float = 2.0):
        self.own: deque = deque(maxlen=window)  # (drafted, accepted, position)
        self.memory = memory
        seen = list(memory.cycles) if memory is not None else []
        self.prior = _geometric_alpha(seen) if seen else 0.5
        self.prior_hazards = _hazards(((d, a, 1.0) for d, a in seen), lambda j: 1 - self.prior, 1.0)
        self.half_life, self.prior_weight = half_life, prior_weight
        self.now = 0  # the request's latest position (tokens in the cache), as the policy was last asked
        self._cached: tuple | None = None

    def at(self, position: int) -> None:
        self.now = max(self.now, int(position))

    def add(self, drafted: int, accepted: int) -> None:
        self.own.append((drafted, accepted, self.now))
        self._cached = None
        if self.memory is not None:
            self.memory.cycles.append((drafted, accepted))

    def _estimate(self) -> tuple[float, list[float]]:
        """(α, T(1), T(2), … along the curve), recomputed when a cycle was added or every 8 tokens (the
        weights move slowly)."""
        key = (self.now // 8, len(self.own))
        if self._cached is None or self._cached[0] != key:
            weighted = [(d, a, 0.5 ** ((self.now - pos) / self.half_life)) for d, a, pos in self.own]
            acc = sum(w * a for _, a, w in weighted)
            seen = sum(w * (a + (a < d)) for d, a, w in weighted)
            k = self.prior_weight
            alpha = (acc + k * self.prior) / (seen + k)

            def prior(j):  # the engine's curve where it has one, else this request's α
                return self.prior_hazards[j] if j < len(self.prior_hazards) else 1 - alpha

            hazards = _hazards(weighted, prior, 1.0)
            hazards += [prior(j) for j in range(len(hazards), len(self.prior_hazards))]
            tokens, survive = [1.0], 1.0
            for h in hazards:
                survive *= 1 - h
                tokens.append(tokens[-1] + survive)
            self._cached = (key, alpha, tokens)
        return self._cached[1], self._cached[2]

    @property
    def alpha(self) -> float:
        return self._estimate()[0]

    def expected_tokens(self, b: int, alpha: float | None = None) -> float:
        """T(b) along the curve (geometric past it), or the geometric T(b) = (1 − α^b) / (1 − α) of an
        explicit ``alpha``."""
        if alpha is None:
            a, tokens = self._estimate()
            n = len(tokens)
            if b <= n:
                return tokens[b - 1]
            last = tokens[-1] - tokens[-2] if n > 1 else 1.0  # P(the last position on the curve accepted)
            return tokens[-1] + last * (a * (1 - a ** (b - n)) / (1 - a) if a < 1.0 else b - n)
        return float(b) if alpha >= 1.0 else (1 - alpha**b) / (1 - alpha)
