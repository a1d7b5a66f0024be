#!/usr/bin/env python3
"""Routing statistics of recorded traces next to uniform random routing and Qwen3-30B-A3B's published figures,
and the bank hit rate they give under LRU, LRFU and Belady's MIN (pure Python, no MLX, seconds).

Definitions (``mach_runtime.analysis.trace_replay.routing_stats``), per MoE layer, then averaged over layers:

* repeat@1: share of a token's k selected experts that the same layer also selected at the previous token of the
  same sequence (the published "45 % of selections repeat at the next token");
* cover@8: share of a token's selected experts found among the experts the layer selected at any of the previous
  8 tokens (the published "80 % within 8"; tokens with 8 predecessors in their sequence);
* entropy: of the layer's expert loads over the trace, normalised by log2(E) (1 = perfectly even); Gini of the
  loads (0 = even); unused: experts never selected;
* union16: distinct experts a layer needs over 16 consecutive tokens (a 16-token speculative verify block).

The uniform row is a uniform random top-k router of the same shape and length (seeded), measured the same way
(its entropy and Gini are not exactly 1 and 0 on a finite trace); its repeat@1 / cover@8 expectations are k/E and
1-(1-k/E)^8. Hit rates: each trace replayed through a bank of ``slots`` per layer (trace_replay.replay).

    python bench/trace_stats.py bench/traces/qwen3moe_e128k8_l16_stdlib.json.gz [--compare OTHER.json.gz ...]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import _common as C

from mach_runtime.analysis.trace_replay import RoutingTrace, default_slot_sizes, routing_stats, sweep

PUBLISHED = {"model": "Qwen3-30B-A3B (128 experts, top-8)", "repeat_at_1": 0.45, "cover_at_8": 0.80,
             "lru_hit_at_40pct": "0.90-0.95", "source": "kekzl/imp#1359 (docs: /work/shared/reference/"
                                                        "moe_offload_anchors.md section 3)"}


def uniform_like(trace: RoutingTrace, seed: int = 0) -> RoutingTrace:
    """A uniform random top-k router with ``trace``'s shape: same experts, top-k, layers, tokens, segments."""
    rng = random.Random(seed)
    E, k = trace.num_experts, trace.top_k
    steps = [(layer, tuple(sorted(rng.sample(range(E), k)))) for _ in range(trace.tokens) for layer in trace.layers]
    return RoutingTrace(E, k, list(trace.layers), steps, segments=list(trace.segments),
                        meta={"source": f"uniform random top-{k} of {E}, seed {seed}"})


def summary_row(name: str, st: dict) -> dict:
    m = st["mean"]
    return {"trace": name, "repeat_at_1": m["reuse_next"], "cover_at_8": m["reuse_within_8"],
            "entropy_norm": m["entropy_norm"], "gini": m["gini"], "union16": m["block_union"],
            "unused_experts_per_layer": sum(x["unused_experts"] for x in st["layers"]) / len(st["layers"])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", type=Path)
    p.add_argument("--compare", type=Path, nargs="*", default=[], help="more traces for the summary table")
    p.add_argument("--sizes", default=None, help="comma-separated slots/layer for the hit-rate sweep")
    p.add_argument("--out", default=C.default_out("trace_stats"))
    a = p.parse_args()

    tr = RoutingTrace.load(a.trace)
    E, k = tr.num_experts, tr.top_k
    names = [a.trace.name] + [c.name for c in a.compare] + ["uniform random (same shape)"]
    traces = [tr] + [RoutingTrace.load(c) for c in a.compare] + [uniform_like(tr)]
    stats = [routing_stats(t) for t in traces]
    meta = {key: v for key, v in tr.meta.items() if key != "model_config"}
    print(f"[stats] {a.trace}: {tr.tokens} tokens in {len(set(tr.segments) | {0})} sequences x {len(tr.layers)} "
          f"MoE layers, {E} experts top-{k}; {json.dumps(meta)[:400]}")

    st = stats[0]
    rows = [[x["layer"], f"{x['reuse_next']:.3f}", f"{x['reuse_within_8']:.3f}", f"{x['entropy_norm']:.3f}",
             f"{x['gini']:.3f}", f"{x['block_union']:.1f}", x["unused_experts"], f"{x['max_expert_share']:.3f}"]
            for x in st["layers"]]
    print("\nper MoE layer (" + a.trace.name + "):")
    print(C.fmt_table(["layer", "repeat@1", "cover@8", "H/Hmax", "Gini", "union16", "unused", "max share"], rows))

    summary = [summary_row(n, s) for n, s in zip(names, stats)]
    rows = [[r["trace"], f"{r['repeat_at_1']:.3f}", f"{r['cover_at_8']:.3f}", f"{r['entropy_norm']:.3f}",
             f"{r['gini']:.3f}", f"{r['union16']:.1f}", f"{r['unused_experts_per_layer']:.1f}"] for r in summary]
    u = st["uniform"]
    rows.append(["uniform (expectation)", f"{u['reuse_next']:.3f}", f"{u['reuse_within_8']:.3f}", "1.000", "0.000",
                 f"{u['block_union']:.1f}", "0"])
    rows.append([PUBLISHED["model"] + ", published", f"{PUBLISHED['repeat_at_1']:.2f}", f"{PUBLISHED['cover_at_8']:.2f}",
                 "-", "-", "-", "-"])
    print("\nmean over layers:")
    print(C.fmt_table(["routing", "repeat@1", "cover@8", "H/Hmax", "Gini", "union16", "unused/layer"], rows))

    sizes = [int(x) for x in a.sizes.split(",")] if a.sizes else sorted(set(default_slot_sizes(tr)) | {round(0.4 * E)})
    results = {n: sweep(t, sizes) for n, t in zip(names[:1] + names[-1:], traces[:1] + traces[-1:])}
    rows = []
    for s in sizes:
        r = {x.policy: x for x in results[names[0]] if x.slots == s}
        ru = {x.policy: x for x in results[names[-1]] if x.slots == s}
        rows.append([s, f"{s / E:.1%}", f"{r['lru'].hit_rate:.3f}", f"{r['lrfu'].hit_rate:.3f}",
                     f"{r['belady'].hit_rate:.3f}", f"{r['lrfu'].hit_rate - r['belady'].hit_rate:+.3f}",
                     f"{ru['lrfu'].hit_rate:.3f}", f"{ru['belady'].hit_rate:.3f}"])
    print(f"\nbank hit rate vs slots/layer ({a.trace.name}; uniform = the uniform trace above; cold banks, every "
          "sequence's tokens in order, bank state kept across sequences):")
    print(C.fmt_table(["slots/layer", "bank", "LRU", "LRFU", "Belady", "LRFU-Belady", "uniform LRFU",
                       "uniform Belady"], rows))
    print(f"published for {PUBLISHED['model']}: LRU at 40 % residency -> {PUBLISHED['lru_hit_at_40pct']} steady-state hit")

    payload = {"benchmark": "trace_stats", "trace": str(a.trace), "meta": tr.meta, "published": PUBLISHED,
               "summary": summary, "per_layer": st["layers"], "uniform_expectation": st["uniform"],
               "sweep": {n: [{"policy": x.policy, "slots": x.slots, "hit_rate": x.hit_rate, "hits": x.hits,
                              "misses": x.misses} for x in res] for n, res in results.items()}}
    C.write_json(a.out, payload)
    print(f"json: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
