"""Eviction policies for the expert banks: arrays, so a decode step's bookkeeping is one vectorised update.

* ``lru``  — least recently used.
* ``lrfu`` — frequency-aware LRU (LRFU, Lee et al. 1999): each expert carries a combined recency-frequency
  value ``C = sum over past uses of 2^(-lam * age)``, ages counted in bank steps (one step = one layer call,
  i.e. one token or one prefill chunk). The victim is the resident expert with the smallest C. ``lam`` → 1
  behaves like LRU, ``lam`` → 0 like LFU. ``C`` is kept for evicted experts too (a dense table costs nothing
  more), so an expert that comes back resumes its history instead of starting at 1 like a never-seen one: on
  the trained 128-expert routing trace this beats the forgetting variant at every bank size and every ``lam``
  (docs/benchmarks.md, "Eviction policies"). The default ``lam`` (``DEFAULT_LRFU_LAMBDA``, configurable:
  ``MACH_LRFU_LAMBDA``) was tuned on the first half of that trace's windows: a half-life of 50 steps.

A ``PolicyTable`` holds the state of many banks (one row per bank, one column per expert): ``step_rows`` records
one step of several banks at once (a verified optimistic decode forward steps every layer's bank with one call:
no per-expert Python on hits). ``table.row(i)`` is bank i's ``EvictionPolicy`` view (``step`` / ``remove`` /
``victim``), which the bank uses on misses. Ties (same recency, or the same LRFU value) go to the lowest expert
id. ``make_policy(name)`` gives a standalone one-bank policy (offline replay, tests); its columns grow with the
keys it sees.
"""

from __future__ import annotations

from typing import Container, Iterable

import numpy as np


class PolicyTable:
    """Policy state of ``banks`` banks over ``experts`` expert ids (columns grow on demand)."""

    name = "base"

    def __init__(self, banks: int, experts: int):
        self.t = np.zeros(banks, dtype=np.int64)  # steps per bank
        self.tracked = np.zeros((banks, experts), dtype=bool)  # resident experts the policy knows
        self.score = np.zeros((banks, experts), dtype=np.float64)  # smaller = evicted first

    # -- shape -----------------------------------------------------------------------------------------------
    def _grow(self, banks: int, experts: int) -> None:
        b0, e0 = self.tracked.shape
        if banks <= b0 and experts <= e0:
            return
        nb, ne = max(banks, b0), max(experts, 2 * e0 if experts > e0 else e0)
        for name in self._arrays():
            old = getattr(self, name)
            new = np.zeros((nb, ne), dtype=old.dtype)
            new[:b0, :e0] = old
            setattr(self, name, new)
        t = np.zeros(nb, dtype=np.int64)
        t[:b0] = self.t
        self.t = t

    def _arrays(self) -> tuple[str, ...]:
        return ("tracked", "score")

    def row(self, bank: int) -> "EvictionPolicy":
        self._grow(bank + 1, 1)
        return EvictionPolicy(self, bank)

    # -- updates ---------------------------------------------------------------------------------------------
    def step_rows(self, rows: np.ndarray, used: np.ndarray) -> None:
        """One step of each bank in ``rows`` (distinct), bank ``rows[i]`` using the distinct experts ``used[i]``."""
        rows = np.asarray(rows, dtype=np.int64)
        used = np.asarray(used, dtype=np.int64).reshape(len(rows), -1)
        self._grow(int(rows.max()) + 1 if len(rows) else 0, int(used.max()) + 1 if used.size else 0)
        self.t[rows] += 1
        r = rows[:, None]
        self._update(r, used, self.t[rows][:, None])
        self.tracked[r, used] = True

    def _update(self, r, used, t) -> None:
        raise NotImplementedError

    def remove(self, bank: int, key: int) -> None:
        if key >= self.tracked.shape[1] or not self.tracked[bank, key]:
            raise KeyError(key)
        self.tracked[bank, key] = False

    def victim(self, bank: int, exclude: Container[int]) -> int:
        cand = self.tracked[bank].copy()
        ex = [e for e in exclude if 0 <= e < len(cand)]
        cand[ex] = False
        if not cand.any():
            raise RuntimeError("no evictable expert: every resident expert is needed by this step")
        return int(np.argmin(np.where(cand, self.score[bank], np.inf)))


class LRUTable(PolicyTable):
    name = "lru"

    def _update(self, r, used, t):
        self.score[r, used] = t  # the step of the latest use


class LRFUTable(PolicyTable):
    name = "lrfu"

    def __init__(self, banks: int, experts: int, lam: float | None = None):
        if lam is None:
            from ..config import resolve_lrfu_lambda

            lam = resolve_lrfu_lambda()
        if not 0 < lam <= 1:
            raise ValueError(f"lrfu lambda must be in (0, 1], got {lam}")
        self.lam = lam
        super().__init__(banks, experts)
        self.logc = np.zeros_like(self.score)  # log2(C) at the latest use (kept after eviction)
        self.last = np.zeros_like(self.score)  # step of the latest use
        self.seen = np.zeros_like(self.tracked)  # used at least once (resident now or not)

    def _arrays(self):
        return ("tracked", "score", "logc", "last", "seen")

    def _update(self, r, used, t):
        lam = self.lam
        decayed = self.logc[r, used] - lam * (t - self.last[r, used])  # log2 of the old C, aged to now
        logc = np.where(self.seen[r, used], np.log2(1.0 + np.exp2(decayed)), 0.0)  # never used before: C = 1
        self.seen[r, used] = True
        self.logc[r, used] = logc
        self.last[r, used] = t
        self.score[r, used] = logc + lam * t  # log2(C) + lam * t_last: comparable without decaying every entry


class EvictionPolicy:
    """One bank's view of a ``PolicyTable``: what the bank tells about uses and removals, and asks for victims."""

    def __init__(self, table: PolicyTable, bank: int):
        self.table, self.bank = table, bank
        self.name = table.name

    def step(self, used: Iterable[int]) -> None:
        """Records that ``used`` experts (distinct; resident after this step) were used in one bank step."""
        used = np.fromiter(used, dtype=np.int64)
        self.table.step_rows(np.array([self.bank]), used[None])

    def remove(self, key: int) -> None:
        self.table.remove(self.bank, int(key))

    def victim(self, exclude: Container[int]) -> int:
        """The resident expert to evict, never one in ``exclude``."""
        return self.table.victim(self.bank, exclude)


TABLES = {"lru": LRUTable, "lrfu": LRFUTable}


def make_table(name: str, banks: int, experts: int) -> PolicyTable:
    return TABLES[name](banks, experts)


def make_policy(name: str, **kw) -> EvictionPolicy:
    """A standalone one-bank policy."""
    return TABLES[name](1, 64, **kw).row(0)


def LRUPolicy() -> EvictionPolicy:  # noqa: N802 - the policy's name, as the bank and replay use it
    return make_policy("lru")


def LRFUPolicy(lam: float | None = None) -> EvictionPolicy:  # noqa: N802
    return make_policy("lrfu", lam=lam)
