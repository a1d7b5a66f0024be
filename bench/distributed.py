#!/usr/bin/env python3
"""Expert parallel over 1, 2, 4 ranks (mlx.launch, ring backend, this machine's CPU), streaming residency.

    python bench/distributed.py [--ranks 1,2,4] [--tokens 48] [--slots 16]

A random qwen3_moe (``mach_runtime.testing.tiny``: 4 MoE layers x 64 experts, top-4, fp32, ~0.8 MB per expert)
whose experts exceed one rank's bank: every rank keeps ``--slots`` slots per layer (16 = a quarter of the
experts). With N ranks a rank owns 64/N experts per layer, so the aggregate bank grows N-fold: 1 rank streams
from disk, 4 ranks hold every expert. Each run greedy-decodes ``--tokens`` tokens after a 16-token prompt
through the model (the same forward the Runtime drives), on every rank in step; rank 0 times it.

Per configuration: decode tok/s; bytes read from disk per token per rank (the store's counter; page cache not
dropped, so the bytes are what the bank missed, not what the disk served); the expert-parallel all_sum bytes per
step; the collective time share (the step's all_sums of the same sizes timed alone, over the step time); and
what the all_sums would cost over a 10 / 40 / 80 Gb/s link (a ring all_sum sends 2(N-1)/N of the buffer per
rank; bandwidth term only, no latency). Writes bench/results/distributed.json.
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


def worker(a) -> None:
    """One rank (also the 1-rank baseline, run without mlx.launch)."""
    import mlx.core as mx

    from actors.distributed import Distributed
    from mach_runtime.distributed.expert_parallel import collective_stats
    from mach_runtime.io.load import load_moe

    d = Distributed({"mode": "expert", "timeout": 600}, a.ckpt)
    g = d.group
    model, tok, store, cache = load_moe(a.ckpt, expert_residency="streaming", expert_slots=a.slots, shard=d.plan)
    d.after_load(model, store, None, None)
    ids = C.make_prompt(tok, 16)
    logits = model(mx.array([ids]), cache=cache)
    t = mx.argmax(logits[0, -1])
    mx.eval(t)
    warm = 4
    for _ in range(warm):  # the bank's first misses, the first graph builds
        t = mx.argmax(model(t.reshape(1, 1), cache=cache)[0, -1])
        mx.eval(t)
    s0, c0 = store.stats(), collective_stats(model)
    t0 = time.perf_counter()
    for _ in range(a.tokens):
        t = mx.argmax(model(t.reshape(1, 1), cache=cache)[0, -1])
        mx.eval(t)
    secs = time.perf_counter() - t0
    s1, c1 = store.stats(), collective_stats(model)
    calls = (c1["calls"] - c0["calls"]) // a.tokens
    per_call = (c1["bytes"] - c0["bytes"]) // max(1, c1["calls"] - c0["calls"])
    coll = 0.0
    if g.size > 1 and calls:  # the step's all_sums alone: same count, same sizes
        x = mx.ones((1, 1, per_call // 4), dtype=mx.float32)
        mx.eval(mx.distributed.all_sum(x, group=g.mx_group))
        t1 = time.perf_counter()
        for _ in range(a.tokens):
            ys = [mx.distributed.all_sum(x + i, group=g.mx_group) for i in range(calls)]
            mx.eval(ys)
        coll = (time.perf_counter() - t1) / a.tokens
    rec = {"rank": g.rank, "size": g.size, "tokens": a.tokens, "seconds": secs, "tok_s": a.tokens / secs,
           "bytes_read_per_token": (s1.bytes_read - s0.bytes_read) / a.tokens,
           "hit_rate": (s1.hits - s0.hits) / max(1, (s1.hits - s0.hits) + (s1.misses - s0.misses)),
           "owned_experts_per_layer": len(next(iter(d.plan.owned.values()))) if d.plan.owned else 64,
           "collectives_per_step": calls, "collective_bytes_per_call": per_call,
           "collective_s_per_step": coll, "step_s": secs / a.tokens}
    Path(a.out, f"rank{g.rank}.json").write_text(json.dumps(rec))
    d.close()


def run_config(n: int, ckpt: Path, a, tmp: Path) -> list[dict]:
    out = tmp / f"n{n}"
    out.mkdir(parents=True, exist_ok=True)
    me = [str(Path(__file__).resolve()), "--worker", "--ckpt", str(ckpt), "--out", str(out), "--tokens",
          str(a.tokens), "--slots", str(a.slots)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(C.REPO), os.environ.get("PYTHONPATH", "")])}
    if n == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [str(Path(sys.executable).parent / "mlx.launch"), "-n", str(n), "--backend", "ring", "--python",
               sys.executable, *me]
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
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--json", default=C.default_out("distributed"))
    a = p.parse_args()
    if a.worker:
        worker(a)
        return 0
    ckpt = C.ensure_tiny_checkpoint(C.default_ckpt_root(), "dist-qwen3moe-64x4", layout="per_expert", **DIMS)
    load = os.getloadavg()
    rows, runs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in a.ranks.split(",")]:
            recs = run_config(n, ckpt, a, Path(tmp))
            runs[n] = recs
            r0 = recs[0]
            share = r0["collective_s_per_step"] / r0["step_s"] if r0["step_s"] else 0.0
            rows.append([n, f"{r0['tok_s']:.2f}", f"{r0['owned_experts_per_layer']}",
                         " / ".join(f"{x['bytes_read_per_token'] / 2**20:.1f}" for x in recs),
                         " / ".join(f"{x['hit_rate']:.2f}" for x in recs),
                         f"{r0['collectives_per_step'] * r0['collective_bytes_per_call']}",
                         f"{100 * share:.1f}%",
                         *(f"{link_ms(n, r0['collectives_per_step'], r0['collective_bytes_per_call'], g):.4f}"
                           for g in LINKS_GBPS)])
    headers = ["ranks", "tok/s", "experts/rank/layer", "MiB read/token per rank", "bank hit rate per rank",
               "all_sum B/step", "collective share", *(f"ms/token @{g}Gb/s" for g in LINKS_GBPS)]
    print(f"expert parallel, streaming, bank {a.slots} slots/layer per rank, {DIMS}; load avg {load[0]:.1f}")
    print(C.fmt_table(headers, rows))
    print(C.RANDOM_ROUTING_NOTE)
    C.write_json(a.json, {"machine": C.machine_info(), "load_avg": load, "dims": DIMS, "slots": a.slots,
                          "tokens": a.tokens, "runs": runs, "table": {"headers": headers, "rows": rows}})
    print(f"-> {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
