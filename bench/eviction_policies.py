#!/usr/bin/env python3
"""Online eviction policies against Belady's MIN on a recorded routing trace (pure numpy, no MLX, minutes).

Every layer's bank is simulated at once (one row per layer) with the bank's own procedure: on a step, the
missing experts fill free slots first, then evict the resident experts (not needed by this step) of lowest keep
score, ties to the lowest expert id. Policies are keep-score functions of what a decode step knows:

* ``lru``; ``lrfu-forget`` (what the bank had before: LRFU, lam 0.05, C restarts at 1 when an expert returns);
  ``lrfu`` (the shipped policy: C kept for evicted experts, lam = MACH_LRFU_LAMBDA's default; the tune half's
  best lam is shown too), ``lrfu per-layer lam``;
* ``lrfu + fast term`` (a second, fast-decaying count), ``lrfu + trace prior`` (soft pinning: the tuning half's
  expert frequencies as pseudo-counts), ``pin top-N + lrfu`` (``StreamingExpertStore.pin_from_trace``),
  ``lrfu + next-token predictor`` (a per-layer transition model P(expert at t+1 | experts at t), fitted on the
  tuning half: what a predictor could know at decode time from the routing alone), ``per-layer partition``
  (slots per layer from the tuning half's marginal hit gains, same total; Belady's row keeps equal shares, so
  this row can exceed it), ``arc`` (adaptive replacement,
  scan resistant);
* upper bounds: ``oracle next h tokens`` (lrfu, but never evicting an expert the next h tokens use, nearest
  first: what a perfect h-token look-ahead would give; h = 1 is a perfect next-token predictor, or a perfect
  draft of one token), and ``belady``.

Overfitting: every tunable (lam, weights, N, partition) is chosen on the first half of the trace's windows
(``tune``), and the table reports the second half (``held-out``), each half from cold banks. The shipped policy is
also replayed through the real policy code (``trace_replay.replay`` → ``io/eviction.py``) on the held-out half and
must give the same counts as this simulator.

    python bench/eviction_policies.py [--trace bench/traces/qwen3moe_e128k8_l16_stdlib.json.gz]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from collections import OrderedDict

import _common as C
import numpy as np

from mach_runtime.analysis.trace_replay import RoutingTrace, replay
from mach_runtime.config import resolve_lrfu_lambda

FRACTIONS = (0.10, 0.25, 0.40, 0.60)
NEVER = 1 << 30


# --- the simulator ----------------------------------------------------------------------------------------------
def onehot(R: np.ndarray, E: int) -> np.ndarray:
    U = np.zeros((R.shape[0], R.shape[1], E), bool)
    U[np.arange(R.shape[0])[:, None, None], np.arange(R.shape[1])[None, :, None], R] = True
    return U


def next_use(U: np.ndarray) -> np.ndarray:
    """[L, T, E]: the next step after t at which each expert is used (NEVER if not)."""
    NU = np.empty(U.shape, np.int32)
    nxt = np.full((U.shape[0], U.shape[2]), NEVER, np.int32)
    for t in range(U.shape[1] - 1, -1, -1):
        NU[:, t] = nxt
        nxt = np.where(U[:, t], t, nxt)
    return NU


def simulate(U: np.ndarray, slots, policy) -> np.ndarray:
    """Hits and lookups per layer ([L, 2]) of ``U`` [L, T, E] through banks of ``slots`` (int or per layer)."""
    L, T, E = U.shape
    slots = np.broadcast_to(np.asarray(slots), (L,)).astype(np.int64)
    res = np.zeros((L, E), bool)
    hits = np.zeros(L, np.int64)
    ids = np.broadcast_to(np.arange(E), (L, E))
    policy.reset(U)
    for t in range(T):
        need = U[:, t]
        miss = need & ~res
        nm = miss.sum(1)
        hits += need.sum(1) - nm
        over = res.sum(1) + nm - slots
        if (over > 0).any():
            s = np.where(res & ~need, policy.score(t, need), np.inf)
            order = np.lexsort((ids, s), axis=1)
            for layer in np.flatnonzero(over > 0):
                res[layer, order[layer, : over[layer]]] = False
        res |= need
        policy.update(t, need, miss)
    return np.stack([hits, U.sum((1, 2))], 1)


def rate(h: np.ndarray) -> float:
    return float(h[:, 0].sum() / h[:, 1].sum())


class Policy:
    def reset(self, U): ...
    def score(self, t, need): ...
    def update(self, t, need, miss): ...


class LRU(Policy):
    def reset(self, U):
        self.last = np.full(U.shape[::2], -1.0)

    def score(self, t, need):
        return self.last

    def update(self, t, need, miss):
        self.last[need] = t


class LRFU(Policy):
    """The arithmetic of ``io/eviction.py``'s LRFUTable (log2 C + lam * t_last), so ties break alike.
    ``forget``: C restarts at 1 when an evicted expert returns (the bank before this change)."""

    def __init__(self, lam, forget=False):
        self.lam, self.forget = lam, forget

    def reset(self, U):
        L, _, E = U.shape
        self.lam_l = np.broadcast_to(np.asarray(self.lam, float), (L,))[:, None] * np.ones((1, E))
        self.logc, self.last, self.sc = np.zeros((L, E)), np.zeros((L, E)), np.zeros((L, E))
        self.seen = np.zeros((L, E), bool)
        self.t = 0

    def score(self, t, need):
        return self.sc

    def update(self, t, need, miss):
        self.t += 1
        lam = self.lam_l[need]
        decayed = self.logc[need] - lam * (self.t - self.last[need])
        known = (self.seen & ~miss)[need] if self.forget else self.seen[need]
        logc = np.where(known, np.log2(1.0 + np.exp2(decayed)), 0.0)
        self.logc[need], self.last[need], self.seen[need] = logc, self.t, True
        self.sc[need] = logc + lam * self.t


class Plus(Policy):
    """lrfu's C (as a per-step rate) + w * an extra per-expert term."""

    def __init__(self, lam, w, term):
        self.lam, self.w, self.term = lam, w, term

    def reset(self, U):
        self.C = np.zeros(U.shape[::2])
        self.term.reset(U)

    def score(self, t, need):
        return self.C * (1 - 2.0 ** -self.lam) + self.w * self.term.value(t)

    def update(self, t, need, miss):
        self.C *= 2.0 ** -self.lam
        self.C[need] += 1
        self.term.update(t, need)


class FastCount:
    def __init__(self, lam):
        self.lam = lam

    def reset(self, U):
        self.C = np.zeros(U.shape[::2])

    def value(self, t):
        return self.C * (1 - 2.0 ** -self.lam)

    def update(self, t, need):
        self.C *= 2.0 ** -self.lam
        self.C[need] += 1


class Prior:
    def __init__(self, freq):
        self.freq = freq

    def reset(self, U): ...

    def value(self, t):
        return self.freq

    def update(self, t, need): ...


class NextToken:
    """P(expert at t+1 | the layer's experts at t) from a transition model fitted on the tuning half (the mean over
    the step's experts of their rows)."""

    def __init__(self, M):
        self.M = M

    def reset(self, U):
        self.p = np.zeros(U.shape[::2])

    def value(self, t):
        return self.p

    def update(self, t, need):
        self.p = np.einsum("le,lef->lf", need.astype(float), self.M) / need.sum(1, keepdims=True)  # ~P(used)


class Pinned(Policy):
    def __init__(self, base, pinned):
        self.base, self.pinned = base, pinned

    def reset(self, U):
        self.base.reset(U)

    def score(self, t, need):
        return self.base.score(t, need) + np.where(self.pinned, 1e12, 0.0)

    def update(self, t, need, miss):
        self.base.update(t, need, miss)


class Ahead(Policy):
    """Oracle: the base policy, except that experts used within the next h steps are kept, nearest first."""

    def __init__(self, base, h):
        self.base, self.h = base, h

    def reset(self, U):
        self.NU = next_use(U)
        self.base.reset(U)

    def score(self, t, need):
        dist = self.NU[:, t] - t
        return np.where(dist <= self.h, 1e12 * (self.h + 1 - dist), 0.0) + self.base.score(t, need)

    def update(self, t, need, miss):
        self.base.update(t, need, miss)


class Belady(Policy):
    def reset(self, U):
        self.NU = next_use(U)

    def score(self, t, need):
        return -self.NU[:, t].astype(float)


def arc(U: np.ndarray, slots: int) -> np.ndarray:
    """ARC (Megiddo & Modha 2003) per layer; the experts a step needs are never chosen as its victims."""
    out = []
    for layer in range(U.shape[0]):
        T1, T2, B1, B2 = OrderedDict(), OrderedDict(), OrderedDict(), OrderedDict()
        p, hits, total = 0.0, 0, 0

        def replace(in_b2, protect):
            first = (T1, B1) if T1 and (len(T1) > p or (in_b2 and len(T1) == p)) else (T2, B2)
            for src, ghost in (first, (T2, B2) if first[0] is T1 else (T1, B1)):
                victim = next((k for k in src if k not in protect), None)
                if victim is not None:
                    del src[victim]
                    ghost[victim] = None
                    return

        for t in range(U.shape[1]):
            need = np.flatnonzero(U[layer, t]).tolist()
            protect = set(need)
            total += len(need)
            for x in need:
                if x in T1 or x in T2:
                    hits += 1
                    (T1 if x in T1 else T2).pop(x)
                    T2[x] = None
                elif x in B1:
                    p = min(slots, p + max(len(B2) / max(len(B1), 1), 1))
                    replace(False, protect)
                    del B1[x]
                    T2[x] = None
                elif x in B2:
                    p = max(0, p - max(len(B1) / max(len(B2), 1), 1))
                    replace(True, protect)
                    del B2[x]
                    T2[x] = None
                else:
                    n = len(T1) + len(T2) + len(B1) + len(B2)
                    if len(T1) + len(B1) == slots:
                        if len(T1) < slots:
                            B1.popitem(last=False)
                            replace(False, protect)
                        else:
                            del T1[next(k for k in T1 if k not in protect)]
                    elif n >= slots:
                        if n == 2 * slots:
                            B2.popitem(last=False)
                        replace(False, protect)
                    T1[x] = None
        out.append((hits, total))
    return np.array(out)


# --- tuning -----------------------------------------------------------------------------------------------------
def transitions(U: np.ndarray, seg: int) -> np.ndarray:
    """Per layer P(f at t+1 | e at t), add-one smoothed toward the layer's frequencies, within windows."""
    Uf = U.astype(np.float32)
    A = np.zeros(U.shape[:1] + (U.shape[2],) * 2)
    for s in range(0, U.shape[1], seg):
        A += np.einsum("lte,ltf->lef", Uf[:, s : s + seg - 1], Uf[:, s + 1 : s + seg])
    freq = Uf.mean(1)
    return (A + freq[:, None, :]) / (Uf.sum(1)[:, :, None] + 1.0)  # rows sum to ~top-k


def best(grid, run):
    """(argmax, {param: mean hit rate over the fractions on the tuning half})."""
    scores = {g: run(g) for g in grid}
    return max(scores, key=scores.get), scores


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", default=str(C.REPO / "bench/traces/qwen3moe_e128k8_l16_stdlib.json.gz"))
    ap.add_argument("--no-real-replay", action="store_true", help="skip the check through trace_replay.replay")
    ap.add_argument("--out", default=C.default_out("eviction_policies"))
    a = ap.parse_args()
    t_start = time.time()
    tr = RoutingTrace.load(a.trace)
    E, k = tr.num_experts, tr.top_k
    per = tr.per_layer()
    R = np.array([[list(ex) for ex in per[layer]] for layer in tr.layers])
    U = onehot(R, E)
    seg = tr.segments[1] - tr.segments[0] if len(tr.segments) > 1 else U.shape[1]
    half = (len(tr.segments) // 2) * seg
    Ut, Uh = U[:, :half], U[:, half:]
    sizes = [max(k, round(f * E)) for f in FRACTIONS]
    print(f"trace {a.trace}: {U.shape[0]} layers x {U.shape[1]} tokens, top-{k} of {E}; tune = tokens [0, {half}), "
          f"held-out = [{half}, {U.shape[1]}); bank sizes {sizes} slots/layer; load {os.getloadavg()[0]:.1f}", flush=True)

    def tune_mean(make):
        return float(np.mean([rate(simulate(Ut, s, make())) for s in sizes]))

    tuned = {}
    lam_grid = (0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1)
    per_layer = {lam: [simulate(Ut, s, LRFU(lam)) for s in sizes] for lam in lam_grid}
    lam_scores = {lam: float(np.mean([rate(h) for h in hs])) for lam, hs in per_layer.items()}
    lam_best = max(lam_scores, key=lam_scores.get)
    lam = resolve_lrfu_lambda()  # the shipped default (MACH_LRFU_LAMBDA): the base of every candidate below
    tuned["lrfu lam (mean over bank sizes, tune half)"] = {"best": lam_best, "shipped": lam, "scores": lam_scores}
    layer_hits = np.array([[h[:, 0] for h in hs] for hs in per_layer.values()]).sum(1)  # [lams, L]
    lam_layer = np.array(lam_grid)[layer_hits.argmax(0)]
    tuned["per-layer lam"] = lam_layer.tolist()
    print(f"tuned lam {lam_best}, shipped {lam} ({time.time() - t_start:.0f} s)", flush=True)

    w_fast, sc = best((0.05, 0.2, 0.5), lambda w: tune_mean(lambda: Plus(lam, w, FastCount(0.3))))
    tuned["fast term weight (lam 0.3)"] = {"best": w_fast, "scores": sc}
    freq_t = Ut.mean(1).astype(float)
    w_prior, sc = best((0.1, 0.3, 1.0), lambda w: tune_mean(lambda: Plus(lam, w, Prior(freq_t))))
    tuned["prior weight"] = {"best": w_prior, "scores": sc}
    # the next-token model is fitted on the first quarter and its weight chosen on the second (so the weight is
    # not tuned on the data the model has memorised); the held-out run uses a model fitted on the whole tune half
    q = (len(tr.segments) // 4) * seg
    M_q = transitions(Ut[:, :q], seg)
    w_next, sc = best((0.1, 0.3, 1.0), lambda w: float(np.mean(
        [rate(simulate(Ut[:, q:], s, Plus(lam, w, NextToken(M_q)))) for s in sizes])))
    tuned["next-token predictor weight"] = {"best": w_next, "scores": sc}
    M = transitions(Ut, seg)
    rank = np.argsort(np.argsort(-freq_t, axis=1, kind="stable"), axis=1)

    def pinned(frac, s):
        return rank < int(frac * (s - k))

    pin_frac, sc = best((0.25, 0.5, 1.0), lambda f: float(np.mean(
        [rate(simulate(Ut, s, Pinned(LRFU(lam), pinned(f, s)))) for s in sizes])))
    tuned["pinned share of (slots - top-k)"] = {"best": pin_frac, "scores": sc}
    part_sizes = list(range(k, E + 1, 4))
    curve = np.array([simulate(Ut, s, LRFU(lam))[:, 0] for s in part_sizes])  # [sizes, L]

    def partition(total):
        idx = np.zeros(U.shape[0], int)
        while sum(part_sizes[i] for i in idx) + 4 <= total:
            gain = np.array([curve[i + 1, layer] - curve[i, layer] if i + 1 < len(part_sizes) else -1
                             for layer, i in enumerate(idx)])
            idx[gain.argmax()] += 1
        sl = np.array([part_sizes[i] for i in idx])
        while sl.sum() < total:
            sl[np.argmin(sl)] += 1
        return sl

    print(f"tuned the rest ({time.time() - t_start:.0f} s)", flush=True)

    rows = OrderedDict()
    rows["lru"] = lambda s: simulate(Uh, s, LRU())
    rows["lrfu-forget (before: lam 0.05, C restarts)"] = lambda s: simulate(Uh, s, LRFU(0.05, forget=True))
    rows[f"lrfu (shipped: lam {lam}, C kept)"] = lambda s: simulate(Uh, s, LRFU(lam))
    if lam_best != lam:
        rows[f"lrfu, lam {lam_best} (the tune half's best)"] = lambda s: simulate(Uh, s, LRFU(lam_best))
    rows["lrfu, per-layer lam"] = lambda s: simulate(Uh, s, LRFU(lam_layer))
    rows[f"lrfu + fast term (w {w_fast})"] = lambda s: simulate(Uh, s, Plus(lam, w_fast, FastCount(0.3)))
    rows[f"lrfu + trace prior (w {w_prior})"] = lambda s: simulate(Uh, s, Plus(lam, w_prior, Prior(freq_t)))
    rows[f"pin top {pin_frac:g} x (slots - k) + lrfu"] = lambda s: simulate(Uh, s, Pinned(LRFU(lam), pinned(pin_frac, s)))
    rows[f"lrfu + next-token predictor (w {w_next})"] = lambda s: simulate(Uh, s, Plus(lam, w_next, NextToken(M)))
    rows["lrfu, per-layer partition"] = lambda s: simulate(Uh, partition(s * U.shape[0]), LRFU(lam))
    rows["arc"] = lambda s: arc(Uh, s)
    for h in (1, 2, 4, 8):
        rows[f"oracle next {h} token{'s' if h > 1 else ''} + lrfu"] = lambda s, h=h: simulate(Uh, s, Ahead(LRFU(lam), h))
    rows["belady"] = lambda s: simulate(Uh, s, Belady())
    table = OrderedDict()
    for name, run in rows.items():
        table[name] = {s: rate(run(s)) for s in sizes}
        print(f"{name}: " + " ".join(f"{v:.4f}" for v in table[name].values()), flush=True)

    real = {}
    if not a.no_real_replay:  # the shipped policy through the real policy code
        held = RoutingTrace(E, k, list(tr.layers), [st for st in tr.steps[half * len(tr.layers):]])
        shipped = next(n for n in table if n.startswith("lrfu (shipped"))
        for s in sizes:
            r = replay(held, s, "lrfu")
            real[s] = r.hit_rate
            assert abs(r.hit_rate - table[shipped][s]) < 1e-12, (s, r.hit_rate, table[shipped][s])
        print(f"real policy code (trace_replay.replay, MACH_LRFU_LAMBDA default) = simulator: {real}", flush=True)

    bel = table["belady"]
    head = "| policy | " + " | ".join(f"{f:.0%} ({s})" for f, s in zip(FRACTIONS, sizes)) + " |"
    lines = [head, "|" + " --- |" * (len(sizes) + 1)]
    for name, r in table.items():
        cells = [f"{r[s]:.3f}" + ("" if name == "belady" else f" ({100 * (r[s] - bel[s]):+.1f})") for s in sizes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\nheld-out hit rate (points vs Belady)\n" + "\n".join(lines))
    C.write_json(a.out, {
        "trace": a.trace, "tune_tokens": half, "heldout_tokens": U.shape[1] - half, "sizes": sizes,
        "fractions": FRACTIONS, "tuned": tuned, "heldout": {n: {str(s): v for s, v in r.items()} for n, r in table.items()},
        "real_replay": {str(s): v for s, v in real.items()}, "load_1min_end": os.getloadavg()[0], "seconds": time.time() - t_start,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
        "cpus": os.cpu_count(), **C.mach_runtime_source()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
