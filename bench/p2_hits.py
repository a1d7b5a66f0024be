#!/usr/bin/env python3
"""P2-hits: streaming residency with every expert resident, against stacked residency, in one process.

What it isolates: the cost of the streaming *hit path* (no I/O at all). Every streaming bank holds all experts
(``expert_slots = experts``) and is filled before timing (every expert of every layer read once), so each
lookup hits; what remains is the routing check. Variants, same prompt and seeded sampling (temperature 1: a
random model's greedy output loops), timed after an untimed warm-up run each:

* ``stacked``: ``load_moe(..., "stacked")`` — the reference (GatherSwitchGLU over all experts);
* ``streaming optimistic``: the default hit path (``io/optimistic.py``): slot ids on the device, one routing
  check per forward, deferred one step in the pipelined decode loop;
* ``streaming sync``: the per-MoE-layer host readback (``store.optimistic.enabled = False``), i.e. what
  streaming did before — the 0.17x-on-an-H200 path.

Reported per variant: decode tok/s (median of ``--repeats``), ratio to stacked, host syncs per token
(``store.stats().host_syncs``), forwards redone, and whether the tokens equal stacked's (they must). The disk's
own O_DIRECT figure is printed too (there are no reads to compare: every lookup hits).

    python bench/p2_hits.py                    # CPU default: mid_q4 (8 layers x 64 experts, 4-bit)
    python bench/p2_hits.py --ckpt a3b_l16     # GPU default: Qwen3-30B-A3B expert shapes, 16 layers, 4-bit
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import _common as C
from p2_streaming import disk_bw, make_checkpoint


def run_variant(name, ckpt, ids, a):
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mach_runtime import load_moe
    from mach_runtime.engine.generate import generate_tokens, make_sampler

    t0 = time.perf_counter()
    if name == "stacked":
        model, _, store, _ = load_moe(str(ckpt), expert_residency="stacked")
    else:
        cfg = json.loads((ckpt / "config.json").read_text())
        model, _, store, _ = load_moe(str(ckpt), expert_residency="streaming", expert_slots=cfg["num_experts"],
                                      direct_io=True)
        for bank in store.banks:  # fill every bank: all experts resident
            store.ensure(bank, np.arange(bank.source.num_experts))
        store.optimistic.enabled = name == "streaming optimistic"
    load_s = time.perf_counter() - t0

    def once(n):
        mx.random.seed(a.seed)
        return C.timed_tokens(generate_tokens(model, ids, make_prompt_cache(model), make_sampler(a.temperature, seed=a.seed), n), n)

    once(min(8, a.new_tokens))  # warm-up (the first forward of a shape compiles kernels)
    s0 = store.stats() if name != "stacked" else None
    tps, toks = [], None
    for _ in range(a.repeats):
        toks, times = once(a.new_tokens)
        tps.append(C.decode_tps(times))
    res = dict(variant=name, load_seconds=load_s, tps_runs=tps, tps=C.median(tps), tokens=toks)
    if s0 is not None:
        s1 = store.stats()
        fwd = a.repeats * a.new_tokens
        res.update(host_syncs_per_token=(s1.host_syncs - s0.host_syncs) / fwd,
                   redone_forwards=s1.redone_forwards - s0.redone_forwards,
                   misses=s1.misses - s0.misses, hit_rate=s1.hit_rate)
    store.close()
    del model
    C.free_mlx()
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help="mid_q4 | mid_bf16_pe | a3b_l<layers> | a checkpoint directory")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2, help="variants are run this many times, interleaved")
    p.add_argument("--variants", nargs="+", default=["stacked", "streaming optimistic", "streaming sync"],
                   choices=["stacked", "streaming optimistic", "streaming sync"], help="stacked must be among them")
    p.add_argument("--ckpt-root", type=C.Path, default=C.default_ckpt_root())
    p.add_argument("--out", default=None)
    a = p.parse_args()
    a.out = a.out or C.default_out("p2_hits")
    info = C.machine_info()
    spec = a.ckpt or ("a3b_l16" if C.is_gpu() else "mid_q4")
    ckpt = make_checkpoint(spec, a.ckpt_root)
    from mach_runtime import load_moe

    _, tok, store, _ = load_moe(str(ckpt), expert_residency="streaming", direct_io=True)
    st = store.stats()
    store.close()
    ids = C.make_prompt(tok, a.prompt_tokens)
    bw = disk_bw(C.safetensors_files(ckpt))
    C.freeze_gc()
    names = a.variants
    results = {n: [] for n in names}
    for r in range(a.rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            res = run_variant(n, ckpt, ids, a)
            results[n].append(res)
            print(f"[p2-hits] round {r} {n}: {res['tps']:.2f} tok/s", flush=True)
    ref = C.median([x["tps"] for x in results["stacked"]])
    ref_tokens = results["stacked"][0]["tokens"]
    rows, summary = [], []
    for n in names:
        xs = results[n]
        tps = C.median([x["tps"] for x in xs])
        same = all(x["tokens"] == ref_tokens for x in xs)
        syncs = C.median([x.get("host_syncs_per_token", 0.0) for x in xs])
        redone = sum(x.get("redone_forwards", 0) for x in xs)
        summary.append(dict(variant=n, tps=tps, vs_stacked=tps / ref, host_syncs_per_token=syncs, redone=redone,
                            same_tokens_as_stacked=same, runs=[x["tps_runs"] for x in xs]))
        rows.append([n, f"{tps:.2f}", f"{tps / ref:.3f}", f"{syncs:.2f}", redone, same])
    payload = dict(benchmark="p2_hits", machine=info, checkpoint=str(ckpt), checkpoint_spec=spec, layers=st.layers,
                   experts=st.num_experts, expert_bytes=st.expert_bytes, new_tokens=a.new_tokens,
                   repeats=a.repeats, rounds=a.rounds, temperature=a.temperature, seed=a.seed, disk=bw,
                   summary=summary, results=results)
    C.write_json(a.out, payload)
    where = info.get("gpu") or info["cpu_model"]
    print(f"\nP2-hits: every expert resident ({info['backend']}: {where}; mlx {info['mlx']}); {spec}: {st.layers} "
          f"MoE layers x {st.num_experts} experts, {st.expert_bytes / 1e6:.2f} MB/expert; prompt {len(ids)}, "
          f"{a.new_tokens} new tokens x {a.repeats} repeats x {a.rounds} rounds (temperature {a.temperature:g})")
    print(C.fmt_table(["variant", "tok/s", "vs stacked", "host syncs/token", "redone", "same tokens"], rows))
    print(f"disk O_DIRECT 2 MiB random x4: {bw['mb_per_s']:.0f} MB/s ({bw['mode']}); no expert reads while timed")
    print(f"json: {a.out}")


if __name__ == "__main__":
    main()
