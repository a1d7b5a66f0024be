"""Eviction policies for one layer's expert bank, behind one small interface.

* ``lru``  — least recently used.
* ``lrfu`` — frequency-aware LRU (LRFU, Lee et al. 1999): each expert carries a combined recency-frequency
  value ``C = sum over past uses of 2^(-lam * age)``, ages counted in bank steps (one step = one layer call,
  i.e. one token or one prefill chunk). The victim is the resident expert with the smallest C. ``lam`` → 1
  behaves like LRU, ``lam`` → 0 like LFU; the default keeps an expert used at every step of the last ~20
  well above one used once just now, which is what MoE routing locality rewards.

Keys are expert ids; the bank tells the policy about uses and removals and asks it for a victim that is not in
the set the current step needs.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Container, Iterable


class EvictionPolicy:
    name = "base"

    def step(self, used: Iterable[int]) -> None:
        """Records that ``used`` experts (resident after this step) were used in one bank step."""
        raise NotImplementedError

    def remove(self, key: int) -> None:
        raise NotImplementedError

    def victim(self, exclude: Container[int]) -> int:
        """The resident expert to evict, never one in ``exclude``."""
        raise NotImplementedError


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self):
        self._order: OrderedDict[int, None] = OrderedDict()

    def step(self, used):
        for k in used:
            self._order[k] = None
            self._order.move_to_end(k)

    def remove(self, key):
        del self._order[key]

    def victim(self, exclude):
        for k in self._order:
            if k not in exclude:
                return k
        raise RuntimeError("no evictable expert: every resident expert is needed by this step")


class LRFUPolicy(EvictionPolicy):
    name = "lrfu"

    def __init__(self, lam: float = 0.05):
        if not 0 < lam <= 1:
            raise ValueError(f"lrfu lambda must be in (0, 1], got {lam}")
        self.lam = lam
        self._t = 0
        # key -> log2(C) + lam * t_last: comparable across keys without decaying every entry each step
        self._score: dict[int, float] = {}
        self._last: dict[int, int] = {}
        self._logc: dict[int, float] = {}

    def step(self, used):
        self._t += 1
        t, lam = self._t, self.lam
        for k in used:
            if k in self._logc:
                decayed = self._logc[k] - lam * (t - self._last[k])  # log2 of the old C, aged to now
                logc = math.log2(1.0 + 2.0**decayed)
            else:
                logc = 0.0  # C = 1
            self._logc[k], self._last[k] = logc, t
            self._score[k] = logc + lam * t

    def remove(self, key):
        del self._score[key], self._last[key], self._logc[key]

    def victim(self, exclude):
        best, best_score = None, math.inf
        for k, s in self._score.items():
            if s < best_score and k not in exclude:
                best, best_score = k, s
        if best is None:
            raise RuntimeError("no evictable expert: every resident expert is needed by this step")
        return best


POLICIES = {"lru": LRUPolicy, "lrfu": LRFUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    return POLICIES[name]()
