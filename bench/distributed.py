#!/usr/bin/env python3
"""Expert parallel over 1, 2, 4 ranks (mlx.launch, ring backend, this machine's CPU), streaming residency.

    python bench/distributed.py [--ranks 1,2,4] [--tokens 48] [--blocks 4] [--slots 8] [--residency streaming]

A random qwen3_moe (``mach_runtime.testing.tiny``: 4 MoE layers x 64 experts, top-4, fp32, ~0.8 MB per expert)
whose experts exceed one rank's bank: every rank keeps ``--slots`` slots per layer (8 = an eighth of the
experts). With N ranks a rank owns 64/N experts per layer, so the aggregate bank grows N-fold (8, 16, 32 of the
64 experts of a layer resident over 1, 2, 4 ranks). Each run greedy-decodes ``--tokens`` tokens after a 16-token
prompt through the model (the same forward the Runtime drives), on every rank in step; rank 0 times it.

Ours against a baseline, in the same rank processes: the expert-parallel hook computes only the (token, choice)
pairs routed to its rank's experts; the baseline (``set_baseline``) is the hook as it was before, every rank
computing all k choices of every token and zeroing the foreign ones. The two alternate in ``--blocks`` blocks of
decode tokens (ours, baseline, ours, ...), so load changes on a shared machine hit both alike.

Per configuration: decode tok/s and step time (ours, baseline); expert pairs computed per token per rank (x 6 x
hidden x moe_inter FLOPs each) against the baseline's; bytes read from disk per token per rank (the store's
counter over our blocks; page cache not dropped, so the bytes are what the bank missed, not what the disk
served); the expert-parallel all_sum bytes per step; the collective time share (the step's all_sums of the same
sizes timed alone, over the step time); and what the all_sums would cost over a 10 / 40 / 80 Gb/s link (a ring
all_sum sends 2(N-1)/N of the buffer per rank; bandwidth term only, no latency). Writes
bench/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

LINKS_GBPS = (10, 40, 80)
DIMS = dict(hidden=256, layers=4, heads=4, head_dim=64, experts=64, top_k=4, moe_inter=256)


_BASELINE = None


def set_baseline(model, on: bool) -> None:
    """Swaps every ``OwnedExperts`` hook to the baseline (``on``) or back. The baseline is the hook as it was before
    it computed only its own pairs: every rank runs all k choices of every token (a foreign choice pointed at its
    first owned expert) and zeroes the foreign outputs. Bench-only; same state, another ``__call__``."""
    global _BASELINE
    import mlx.core as mx
    import numpy as np

    from mach_runtime.distributed.expert_parallel import OwnedExperts

    if _BASELINE is None:
        class AllChoices(OwnedExperts):
            def __call__(self, x, indices):  # as before: device-side tables, no host readback of its own
                if not hasattr(self, "hook_all_rows"):
                    rows = self.hook_rows.copy()
                    rows[~self.hook_mine] = rows[self.hook_mine][0]
                    self.hook_all_rows = mx.array(rows)
                    self.hook_all_mask = mx.array(self.hook_mine.astype(np.float32))
                self.hook_pairs += indices.size
                self.hook_computed += indices.size
                y = self.inner(x, self.hook_all_rows[indices])
                return y * mx.expand_dims(self.hook_all_mask[indices], -1).astype(y.dtype)

        _BASELINE = AllChoices
    for _, m in model.named_modules():
        if isinstance(m, OwnedExperts):
            object.__setattr__(m, "__class__", _BASELINE if on else OwnedExperts)


def worker(a) -> None:
    """One rank (also the 1-rank baseline, run without mlx.launch)."""
    import mlx.core as mx

    from actors.distributed import Distributed
    from mach_runtime.distributed.expert_parallel import collective_stats
    from mach_runtime.io.load import load_moe

    d = Distributed({"mode": "expert", "timeout": 600}, a.ckpt)
    g = d.group
    slots = {"expert_slots": a.slots} if a.residency == "streaming" else {}
    model, tok, store, cache = load_moe(a.ckpt, expert_residency=a.residency, shard=d.plan, **slots)
    d.after_load(model, store, None, None)
    ids = C.make_prompt(tok, 16)
    logits = model(mx.array([ids]), cache=cache)
    t = mx.argmax(logits[0, -1])
    mx.eval(t)

    def decode(n):
        nonlocal t
        t0 = time.perf_counter()
        for _ in range(n):
            t = mx.argmax(model(t.reshape(1, 1), cache=cache)[0, -1])
            mx.eval(t)
        return time.perf_counter() - t0

    decode(4)  # the bank's first misses, the first graph builds
    # interleaved blocks (ours, baseline, ours, ...) so a load change on the shared machine hits both alike; the
    # bank's bytes and the collectives are counted over our blocks only
    ours = {"seconds": 0.0, "pairs": 0, "computed": 0, "bytes": 0, "hits": 0, "misses": 0, "calls": 0, "cbytes": 0}
    base = {"seconds": 0.0, "pairs": 0, "computed": 0}
    block = max(1, a.tokens // a.blocks)
    for _ in range(a.blocks):
        for which, acc in ((False, ours), (True, base)):
            if g.size == 1 and which:
                continue  # one rank computes every choice either way: no baseline
            set_baseline(model, which)
            s0, c0 = store.stats(), collective_stats(model)
            acc["seconds"] += decode(block)
            s1, c1 = store.stats(), collective_stats(model)
            acc["pairs"] += c1["pairs"] - c0["pairs"]
            acc["computed"] += c1["computed"] - c0["computed"]
            if not which:
                acc["bytes"] += s1.bytes_read - s0.bytes_read
                acc["hits"] += s1.hits - s0.hits
                acc["misses"] += s1.misses - s0.misses
                acc["calls"] += c1["calls"] - c0["calls"]
                acc["cbytes"] += c1["bytes"] - c0["bytes"]
    set_baseline(model, False)
    n = block * a.blocks
    if g.size == 1:  # no hooks on a group of one: it computes every (token, choice) pair of every MoE layer
        ours["pairs"] = ours["computed"] = n * DIMS["top_k"] * DIMS["layers"]
    calls = ours["calls"] // n
    per_call = ours["cbytes"] // max(1, ours["calls"])
    coll = 0.0
    if g.size > 1 and calls:  # the step's all_sums alone: same count, same sizes
        x = mx.ones((1, 1, per_call // 4), dtype=mx.float32)
        mx.eval(mx.distributed.all_sum(x, group=g.mx_group))
        t1 = time.perf_counter()
        for _ in range(n):
            ys = [mx.distributed.all_sum(x + i, group=g.mx_group) for i in range(calls)]
            mx.eval(ys)
        coll = (time.perf_counter() - t1) / n
    flops_per_pair = 6 * DIMS["hidden"] * DIMS["moe_inter"]  # gate, up, down: 3 matmuls of hidden x moe_inter
    rec = {"rank": g.rank, "size": g.size, "tokens": n, "seconds": ours["seconds"], "tok_s": n / ours["seconds"],
           "step_s": ours["seconds"] / n,
           "baseline_step_s": base["seconds"] / n if base["seconds"] else None,
           "pairs_per_token": ours["pairs"] / n, "computed_per_token": ours["computed"] / n,
           "baseline_computed_per_token": base["computed"] / n if base["seconds"] else ours["computed"] / n,
           "expert_mflop_per_token": ours["computed"] / n * flops_per_pair / 1e6,
           "baseline_expert_mflop_per_token": (base["computed"] if base["seconds"] else ours["computed"]) / n
           * flops_per_pair / 1e6,
           "bytes_read_per_token": ours["bytes"] / n,
           "hit_rate": ours["hits"] / max(1, ours["hits"] + ours["misses"]),
           "owned_experts_per_layer": len(next(iter(d.plan.owned.values()))) if d.plan.owned else DIMS["experts"],
           "collectives_per_step": calls, "collective_bytes_per_call": per_call, "collective_s_per_step": coll}
    Path(a.out, f"rank{g.rank}.json").write_text(json.dumps(rec))
    d.close()


def run_config(n: int, ckpt: Path, a, tmp: Path) -> list[dict]:
    out = tmp / f"n{n}"
    out.mkdir(parents=True, exist_ok=True)
    me = [str(Path(__file__).resolve()), "--worker", "--ckpt", str(ckpt), "--out", str(out), "--tokens",
          str(a.tokens), "--slots", str(a.slots), "--blocks", str(a.blocks), "--residency", a.residency]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(C.REPO), os.environ.get("PYTHONPATH", "")])}
    if n == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [str(Path(sys.executable).parent / "mlx.launch"), "-n", str(n), "--backend", "ring", "--python",
               sys.executable, "--", *me]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{n} ranks failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(n)]


def link_ms(n: int, calls: int, per_call: int, gbps: float) -> float:
    """Per-token all_sum time over a link of ``gbps`` (ring: 2(N-1)/N of each buffer leaves every rank)."""
    if n == 1:
        return 0.0
    return calls * per_call * 2 * (n - 1) / n * 8 / (gbps * 1e9) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--ranks", default="1,2,4")
    p.add_argument("--tokens", type=int, default=48, help="decode tokens timed, ours (and as many for the baseline)")
    p.add_argument("--blocks", type=int, default=4, help="interleaved blocks of ours / baseline tokens")
    p.add_argument("--residency", default="streaming", choices=["streaming", "stacked"])
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--router-scale", type=float, default=1.0,
                   help="the random router's scale (tiny.make_tiny_checkpoint): 1 spreads routing over many experts, "
                        "8 concentrates it on a few")
    p.add_argument("--json", default=C.default_out("distributed"))
    a = p.parse_args()
    if a.worker:
        worker(a)
        return 0
    ckpt = C.ensure_tiny_checkpoint(C.default_ckpt_root(), f"dist-qwen3moe-64x4-r{a.router_scale:g}",
                                    layout="per_expert", router_scale=a.router_scale, **DIMS)
    load = os.getloadavg()
    rows, runs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in a.ranks.split(",")]:
            recs = run_config(n, ckpt, a, Path(tmp))
            runs[n] = recs
            r0 = recs[0]
            share = r0["collective_s_per_step"] / r0["step_s"] if r0["step_s"] else 0.0
            rows.append([n, f"{r0['tok_s']:.2f}", f"{r0['owned_experts_per_layer']}",
                         " / ".join(f"{x['bytes_read_per_token'] / 2**20:.2f}" for x in recs),
                         " / ".join(f"{x['hit_rate']:.2f}" for x in recs),
                         " / ".join(f"{x['computed_per_token']:.1f}" for x in recs),
                         f"{r0['baseline_computed_per_token']:.0f}",
                         f"{1e3 * r0['step_s']:.1f}",
                         f"{1e3 * r0['baseline_step_s']:.1f}" if r0["baseline_step_s"] else "-",
                         f"{r0['collectives_per_step'] * r0['collective_bytes_per_call']}",
                         f"{100 * share:.1f}%",
                         *(f"{link_ms(n, r0['collectives_per_step'], r0['collective_bytes_per_call'], g):.4f}"
                           for g in LINKS_GBPS)])
    headers = ["ranks", "tok/s", "experts/rank/layer", "MiB read/token per rank", "bank hit rate per rank",
               "expert pairs computed/token per rank", "baseline pairs/token", "step ms", "baseline step ms",
               "all_sum B/step", "collective share", *(f"ms/token @{g}Gb/s" for g in LINKS_GBPS)]
    print(f"expert parallel, {a.residency}, bank {a.slots} slots/layer per rank, {DIMS}, router scale "
          f"{a.router_scale:g}; load avg {load[0]:.1f}; expert MFLOP per pair {6 * DIMS['hidden'] * DIMS['moe_inter'] / 1e6:.2f}")
    print(C.fmt_table(headers, rows))
    print(C.RANDOM_ROUTING_NOTE)
    C.write_json(a.json, {"machine": C.machine_info(), "load_avg": load, "load_avg_after": os.getloadavg(),
                          "dims": DIMS, "slots": a.slots, "residency": a.residency, "blocks": a.blocks,
                          "router_scale": a.router_scale,
                          "tokens": a.tokens, "runs": runs, "table": {"headers": headers, "rows": rows}})
    print(f"-> {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
