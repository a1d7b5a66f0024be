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
  streaming did before — the 0.17x-on-an-H200 path;
* ``stacked compiled`` / ``streaming compiled``: the same with the MoE blocks as ``mx.compile``d functions
  (``engine/compiled_moe.py``; streaming: the hit path with the slot gather on the device, routing as an output);
* ``streaming unchecked`` (diagnostic only, not a mode of the engine): the optimistic graph (slot gathers,
  recorded routing) with the per-token check skipped — what the readback and its bookkeeping cost.

Per variant it also times one decode step outside the loop: the host's graph build (the model call, nothing
evaluated) and a synchronous step (build + evaluation), medians of 20.

With ``--uniform-fraction F`` (default 0.25; 0 skips it) a second table follows: miss-bound decode, read cold
(O_DIRECT, page cache dropped before each run), every router replaced by uniform pseudo-random routing
(``p2_streaming.UniformGate``) and a bank of F of the experts; stacked with the same routing as the reference; read
MB/s against the disk's own O_DIRECT figure (before and after) and against the disk-bound rate (disk MB/s ÷ MB
read per token). Its variants (``--miss-variants``) write slots as MLX ops ("ops", the accelerators' way) or in
place ("in place", the CPU backend's default, ``io/slot_writes.py``), plain or with compiled MoE blocks;
``--miss-only`` runs just this table, ``--no-stacked`` without the stacked reference (which holds every expert).
``bench/miss_path.py`` measures the miss path alone (no model compute).

Reported per variant: decode tok/s (median of ``--repeats``), ratio to stacked, host syncs per token
(``store.stats().host_syncs``), forwards redone, and whether the tokens equal stacked's (they must). The disk's
own O_DIRECT figure is printed too (there are no reads to compare: every lookup hits).

    python bench/p2_hits.py                    # CPU default: mid_q4 (8 layers x 64 experts, 4-bit)
    python bench/p2_hits.py --ckpt a3b_l16     # GPU default: Qwen3-30B-A3B expert shapes, 16 layers, 4-bit
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import _common as C
from p2_streaming import bank_bytes_per_expert, disk_bw, make_checkpoint, stacked_run, streaming_run

VARIANTS = ["stacked", "streaming optimistic", "streaming sync", "stacked compiled", "streaming compiled",
            "streaming unchecked"]


def run_variant(name, ckpt, ids, a):
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mach_runtime import load_moe
    from mach_runtime.engine.generate import generate_tokens, make_sampler

    from mach_runtime.engine.compiled_moe import compile_moe_blocks

    t0 = time.perf_counter()
    if name.startswith("stacked"):
        model, _, store, _ = load_moe(str(ckpt), expert_residency="stacked")
    else:
        cfg = json.loads((ckpt / "config.json").read_text())
        model, _, store, _ = load_moe(str(ckpt), expert_residency="streaming", expert_slots=cfg["num_experts"],
                                      direct_io=True)
        for bank in store.banks:  # fill every bank: all experts resident
            store.ensure(bank, np.arange(bank.source.num_experts))
        store.optimistic.enabled = name != "streaming sync"
    if name.endswith("compiled"):
        compile_moe_blocks(model)
    load_s = time.perf_counter() - t0

    def once(n):
        mx.random.seed(a.seed)
        sampler = make_sampler(a.temperature, seed=a.seed)
        return C.timed_tokens(generate_tokens(model, ids, make_prompt_cache(model), sampler, n), n)

    unchecked = name == "streaming unchecked"
    if unchecked:  # diagnostic: skip the routing check (every expert is resident, so the tokens stay right)
        from mach_runtime.io import optimistic as O

        saved = (O.ForwardGuard.verify, O.ForwardGuard.outputs, O.ForwardGuard.close)
        O.ForwardGuard.verify = lambda self, ck: setattr(self.runner, "pending", []) or True
        O.ForwardGuard.outputs = lambda self, token=None: []
        O.ForwardGuard.close = lambda self: setattr(self.runner, "pending", [])
    try:
        res = _timed_variant(name, model, store, ids, a, once, load_s)
    finally:
        if unchecked:
            O.ForwardGuard.verify, O.ForwardGuard.outputs, O.ForwardGuard.close = saved
    store.close()
    del model
    C.free_mlx()
    return res


def _step_times(model, ids) -> dict:
    """Median host graph-build time and synchronous step time of one decode step (ms)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mach_runtime.io.optimistic import guard_for

    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([ids]), cache=cache))
    guard = guard_for(model, cache)
    y = mx.array([[ids[-1]]])
    build, step = [], []
    for _ in range(20):
        ck = guard.begin() if guard is not None else None
        t0 = time.perf_counter()
        out = model(y, cache=cache)
        t1 = time.perf_counter()
        mx.eval(out, *(guard.outputs() if guard is not None else ()))
        if guard is not None:
            guard.verify(ck)
        t2 = time.perf_counter()
        build.append(t1 - t0)
        step.append(t2 - t0)
    if guard is not None:
        guard.close()
    return dict(build_ms=C.median(build) * 1e3, sync_step_ms=C.median(step) * 1e3)


def _timed_variant(name, model, store, ids, a, once, load_s):
    once(min(8, a.new_tokens))  # warm-up (the first forward of a shape compiles kernels)
    s0 = store.stats() if not name.startswith("stacked") else None
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
    res.update(_step_times(model, ids))
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
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS, help="stacked must be among them")
    p.add_argument("--skip-probe", action="store_true", help="skip the host -> device copy probe")
    p.add_argument("--uniform-fraction", type=float, default=0.25, help="bank fraction of the miss-bound table (0: skip)")
    p.add_argument("--uniform-tokens", type=int, default=32)
    p.add_argument("--uniform-repeats", type=int, default=1, help="cold runs per miss-bound variant (interleaved)")
    p.add_argument("--miss-variants", nargs="+", default=None, choices=MISS_VARIANTS,
                   help="slot-write variants of the miss-bound table (default: ops and in place on the CPU, ops and "
                        "compiled ops on accelerators)")
    p.add_argument("--miss-only", action="store_true", help="only the miss-bound table (no hits variants, no probe)")
    p.add_argument("--no-stacked", action="store_true",
                   help="miss-bound table without the stacked reference (it loads every expert: 5.4 GB for a3b_l16); "
                        "tokens are compared with the first variant's")
    p.add_argument("--io-threads", type=int, default=4)
    p.add_argument("--policy", default="lrfu", choices=["lru", "lrfu"])
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
    if a.miss_only:
        payload = dict(benchmark="p2_hits", machine=info, checkpoint=str(ckpt), checkpoint_spec=spec, layers=st.layers,
                       experts=st.num_experts, expert_bytes=st.expert_bytes, load_average=os.getloadavg(), disk=bw)
        return print_miss(miss_bound(ckpt, ids, st, a, payload), a)
    names = a.variants
    results = {n: [] for n in names}
    for r in range(a.rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            res = run_variant(n, ckpt, ids, a)
            results[n].append(res)
            print(f"[p2-hits] round {r} {n}: {res['tps']:.2f} tok/s", flush=True)
    stacked = [n for n in names if n.startswith("stacked")]
    if not stacked:
        raise SystemExit("p2_hits: name a stacked variant too (the reference for tokens and speed)")
    ref_tokens = results[stacked[0]][0]["tokens"]
    rows, summary = [], []
    for n in names:
        xs = results[n]
        base = "stacked compiled" if n.endswith("compiled") and "stacked compiled" in results else (
            "stacked" if "stacked" in results else stacked[0])
        ref = C.median([x["tps"] for x in results[base]])
        tps = C.median([x["tps"] for x in xs])
        same = all(x["tokens"] == ref_tokens for x in xs)
        syncs = C.median([x.get("host_syncs_per_token", 0.0) for x in xs])
        redone = sum(x.get("redone_forwards", 0) for x in xs)
        build = C.median([x["build_ms"] for x in xs])
        sstep = C.median([x["sync_step_ms"] for x in xs])
        summary.append(dict(variant=n, tps=tps, vs_stacked=tps / ref, against=base, host_syncs_per_token=syncs,
                            redone=redone, same_tokens_as_stacked=same, runs=[x["tps_runs"] for x in xs],
                            build_ms=build, sync_step_ms=sstep))
        rows.append([n, f"{tps:.2f}", f"{tps / ref:.3f} ({base})", f"{1e3 / tps:.2f}", f"{build:.2f}",
                     f"{sstep:.2f}", f"{syncs:.2f}", redone, same])
    payload = dict(benchmark="p2_hits", machine=info, checkpoint=str(ckpt), checkpoint_spec=spec, layers=st.layers,
                   experts=st.num_experts, expert_bytes=st.expert_bytes, new_tokens=a.new_tokens,
                   repeats=a.repeats, rounds=a.rounds, temperature=a.temperature, seed=a.seed, disk=bw,
                   summary=summary, results=results)
    C.write_json(a.out, payload)
    where = info.get("gpu") or info["cpu_model"]
    print(f"\nP2-hits: every expert resident ({info['backend']}: {where}; mlx {info['mlx']}); {spec}: {st.layers} "
          f"MoE layers x {st.num_experts} experts, {st.expert_bytes / 1e6:.2f} MB/expert; prompt {len(ids)}, "
          f"{a.new_tokens} new tokens x {a.repeats} repeats x {a.rounds} rounds (temperature {a.temperature:g})")
    print(C.fmt_table(["variant", "tok/s", "vs stacked", "ms/token", "graph build ms", "sync step ms",
                       "host syncs/token", "redone", "same tokens"], rows))
    print(f"disk O_DIRECT 2 MiB random x4: {bw['mb_per_s']:.0f} MB/s ({bw['mode']}); no expert reads while timed",
          flush=True)
    if not a.skip_probe:
        probe = copy_probe(ckpt)
        payload["copy_probe"] = probe
        C.write_json(a.out, payload)
        print("host -> device copies of " + f"{probe['bytes'] / 1e6:.0f} MB ({probe['experts']} experts, "
              f"{probe['components']} components each): "
              + ", ".join(f"{k} {v:.2f} GB/s" for k, v in probe["gb_per_s"].items()), flush=True)
    if a.uniform_fraction > 0:
        return print_miss(miss_bound(ckpt, ids, st, a, payload), a)
    print(f"json: {a.out}")


def print_miss(miss, a) -> None:
    print(f"\nMiss-bound: uniform routing, bank {a.uniform_fraction:.1%} ({miss['slots']} slots/layer), cold "
          f"(O_DIRECT, page cache dropped: {miss['drop']}), {a.uniform_tokens} tokens, {a.io_threads} io threads, "
          f"{a.policy}; disk O_DIRECT {miss['disk_before']:.0f} MB/s before, {miss['disk_after']:.0f} after (their "
          f"mean is the disk-bound rate's bandwidth); load average {os.getloadavg()[0]:.1f}")
    print(C.fmt_table(["variant", "tok/s", "steady tok/s", "vs stacked", "hit", "MB/token", "read MB/s",
                       "read / disk", "disk-bound tok/s", "vs disk-bound", "read wait", "slot writes",
                       "routing syncs", "same tokens" + (" (as the first)" if a.no_stacked else "")],
                      miss["rows"]))
    print(f"json: {a.out}")


def copy_probe(ckpt, n_experts: int = 16) -> dict:
    """Host -> device copy of expert bytes as the bank's slot writes do it (``to_mx`` per component) against one
    ``mx.array`` per expert and one per batch of experts (bytes already in host memory; GB/s, evaluated). A
    diagnostic for the I/O path: the reads must not be hidden behind slower copies."""
    import mlx.core as mx

    from mach_runtime import load_moe
    from mach_runtime.io.safetensors_index import DTYPES

    _, _, store, _ = load_moe(str(ckpt), expert_residency="streaming", direct_io=True)
    bank = store.banks[0]
    comps = list(bank.source.components.values())
    got = store.reader.read([bank.source.ranges(e) for e in range(n_experts)])
    store.close()
    total = sum(v.nbytes for views in got for v in views)
    out = {}

    def timed(name, fn):
        fn()  # warm
        t0 = time.perf_counter()
        for _ in range(3):
            mx.eval(fn())
        out[name] = 3 * total / (time.perf_counter() - t0) / 1e9

    timed("per component (as the slot writes)", lambda: [mx.array(v.view(DTYPES[c.dtype][1]).reshape(c.shape))
                                                         for views in got for v, c in zip(views, comps)])
    timed("one array per expert", lambda: [mx.array(np.concatenate(views)) for views in got])
    big = np.concatenate([np.concatenate(views) for views in got])
    timed("one array per 16 experts (preassembled)", lambda: [mx.array(big)])
    C.free_mlx()
    return dict(experts=n_experts, bytes=total, components=len(comps), gb_per_s=out)


MISS_VARIANTS = ["ops", "in place", "compiled ops", "compiled in place"]


def miss_bound(ckpt, ids, st, a, payload) -> dict:
    """The uniform-routing, F-bank table (see the module docstring): per ``--miss-variants`` entry a stacked
    reference with the same compile setting and cold streaming runs; "ops" writes slots as MLX ops (the only way
    on accelerators), "in place" by numpy into the bank's host memory (CPU; io/slot_writes.py)."""
    import argparse as _ap

    from mach_runtime.io.slot_writes import in_place_backend

    files = C.safetensors_files(ckpt)
    E = st.num_experts
    slots = max(8, min(E, round(a.uniform_fraction * E)))
    bank_bytes = bank_bytes_per_expert(ckpt, st.expert_bytes)
    base = dict(routing="uniform", temperature=a.temperature, seed=a.seed, io_threads=a.io_threads, policy=a.policy)
    variants = a.miss_variants or (["ops", "in place"] if in_place_backend() else ["ops", "compiled ops"])
    bw0 = disk_bw(files)
    out = dict(slots=slots, disk_before=bw0["mb_per_s"], runs={})
    rows, refs = [], {}
    runs_of = {v: [] for v in variants}
    for rep in range(a.uniform_repeats):  # variants interleaved, order alternating
        for v in (variants if rep % 2 == 0 else variants[::-1]):
            compiled = v.startswith("compiled")
            ns = _ap.Namespace(**base, compile=compiled, in_place=v.endswith("in place"))
            if compiled not in refs:
                refs[compiled] = (stacked_run(ckpt, ids, a.uniform_tokens, 1, ns) if not a.no_stacked else None)
                streaming_run(ckpt, files, ids, 4, slots, st.layers, bank_bytes, ns, cold=False)  # warm-up (kernels)
            runs_of[v].append(streaming_run(ckpt, files, ids, a.uniform_tokens, slots, st.layers, bank_bytes, ns))
            r = runs_of[v][-1]["all"]
            print(f"[p2-hits] miss-bound {v} (run {rep}): {r['tps']:.3f} tok/s, {r['bytes_per_token'] / 1e6:.1f} "
                  f"MB/token, read {r['read_mb_per_s']:.0f} MB/s", flush=True)
    out["disk_after"] = disk_bw(files)["mb_per_s"]
    disk = (out["disk_before"] + out["disk_after"]) / 2
    if a.no_stacked:  # the first variant's tokens are the reference; no stacked decode (it holds every expert)
        first = runs_of[variants[0]][0]
        refs = {c: dict(tps=float("nan"), tokens=first["tokens"]) for c in refs}
    for compiled, ref in refs.items():
        if a.no_stacked:
            break
        tag = " compiled" if compiled else ""
        out["runs"]["stacked" + tag] = ref
        rows.append([f"stacked{tag} (uniform routing)", f"{ref['tps']:.3f}", "", "1.000", "1", "0", "", "", "", "",
                     "", "", "", "-"])
    for v in variants:
        runs, ref = runs_of[v], refs[v.startswith("compiled")]
        out["runs"]["streaming " + v] = runs
        out["drop"] = runs[-1]["drop_caches"]
        med = lambda win, key: C.median([r[win][key] for r in runs])  # noqa: E731
        bpt = med("all", "bytes_per_token")
        bound = disk * 1e6 / bpt if bpt else float("nan")
        tps = med("all", "tps")
        rows.append([f"streaming {a.uniform_fraction:.0%}, slot writes {v}", f"{tps:.3f}", f"{med('steady', 'tps'):.3f}",
                     f"{tps / ref['tps']:.3f}", f"{med('all', 'hit_rate'):.3f}", f"{bpt / 1e6:.1f}",
                     f"{med('all', 'read_mb_per_s'):.0f}", f"{med('all', 'read_mb_per_s') / disk:.2f}",
                     f"{bound:.3f}", f"{tps / bound:.2f}", f"{med('all', 'read_share'):.0%}",
                     f"{med('all', 'write_share'):.0%}", f"{med('all', 'sync_share'):.0%} "
                     f"({med('all', 'host_syncs_per_token'):.1f}/tok)", all(r["tokens"] == ref["tokens"] for r in runs)])
        out.setdefault("summary", []).append(dict(variant=v, tps=tps, disk_bound_tps=bound, vs_disk_bound=tps / bound,
                                                  bytes_per_token=bpt, vs_stacked=tps / ref["tps"]))
    out["rows"] = rows
    payload["miss_bound"] = out
    C.write_json(a.out, payload)
    return out


if __name__ == "__main__":
    main()
