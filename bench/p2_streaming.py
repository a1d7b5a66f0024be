#!/usr/bin/env python3
"""P2: streaming-residency decode with a bounded expert bank, read COLD from disk.

For each bank size (``--fractions``, default 100 %, 50 %, 25 %, 12.5 % of the routed experts of every MoE layer)
a fresh ``load_moe(ckpt, expert_residency="streaming", expert_cache_gb=..., direct_io=True)`` generates
``--new-tokens`` tokens after a short prompt, sampled at ``--temperature`` 1 with a fixed seed (greedy decoding
of a random model loops on one token, which repeats the routing and inflates the hit rate; every run uses
the same seed, so every run must produce the same tokens as the stacked reference: checked). Before every timed run the checkpoint's files are evicted
from the page cache (``diskbw.drop_page_cache``: fadvise + ``echo 3 > /proc/sys/vm/drop_caches`` as root), and
the expert reads use O_DIRECT, so every miss is a real disk read. Same process, same prompt:

* the stacked-residency decode tok/s of the same checkpoint (``load_moe(..., "stacked")``) is the
  100 %-resident reference (no router readback, no bank);
* the disk's own O_DIRECT bandwidth (``diskbw.odirect_bandwidth``: 2 MiB random blocks, 4 threads, on the
  largest checkpoint file) is measured before and after the streaming runs.

Per run it reports decode tok/s, hit rate, bytes read per token (``store.stats().bytes_read`` delta / decode
forwards), achieved read MB/s (bytes / ``read_seconds``: time the MLX thread waited for reads) and the share of
decode time spent waiting for reads; "all" = every decode token, "steady" = the second half of them (the bank
is cold at the start of every run, so a 100 % bank misses until it has filled).

The bank budget is expert_cache_gb = (slots + 0.5) * layers * bank_bytes / 2**30 with slots = fraction *
experts; bank_bytes is one expert's size in memory: the on-disk bytes, or 2x for a bf16/fp16 unquantized
checkpoint on the CPU backend (computed in float32 there).

Checkpoints (``--ckpt``):

* ``mid_bf16_pe`` (CPU default): hidden 1024, 8 layers, 64 experts top-8, moe_inter 512, bf16, HF per-expert
  layout (the layout of un-quantized hub checkpoints); 3.1 MB per expert on disk, 1.6 GB of routed experts.
  On CPU it computes in fp32 (bank bytes 6.3 MB per expert).
* ``a3b_l16`` (GPU default): Qwen3-30B-A3B expert and attention shapes (hidden 2048, moe_inter 768, 128 experts
  top-8, 4-bit group 64, bf16 scales, MLX stacked) with 16 of its 48 layers, made by make_large_checkpoint.py;
  ~2.5 MB per expert, ~5 GB of routed experts.
* any directory path.

Routing (``--routing``): ``model`` uses the checkpoint's own random routers; ``uniform`` replaces every router
by pseudo-random logits hashed from the hidden state (uniform, memoryless routing, and a pure function, so a
forward redone after a miss routes the same). The script traces the decode routing and prints its
locality (repeat@1: share of a step's experts the previous step used; cover@8: share found in the previous 8
steps) next to uniform's and Qwen3-30B-A3B's published values (0.45 / 0.80).

``--trace FILE`` (routing ``trace``) replays a recorded routing trace instead (``mach trace`` format, e.g.
bench/traces/qwen3moe_e128k8_l16_stdlib.json.gz: a briefly trained 128-expert top-8 qwen3_moe on held-out
text, made by bench/train_router_trace.py): every router picks, at token position p, the experts the trace
recorded at token p of segment ``--trace-segment`` (bench/trace_routing.py). Each streaming run also records its
own bank steps and replays them offline at the run's bank size: under Belady's MIN (the ceiling for any policy
that loads on demand) and under the live policy (which must reproduce the live hits exactly).

NOTE: uniform random routing caps the hit rate at ~ slots / experts, so with ``--routing uniform`` hit rates are
a FLOOR; trained routers have strong locality, so real streaming reads far fewer bytes per token. Random WEIGHTS
do not guarantee uniform routing: measured repeat@1 was 0.62 for mid_bf16_pe (make_tiny_checkpoint scales its
routers up 8x) and 0.93 for a3b_l16 (make_large_checkpoint's router collapses onto a few experts), both MORE
local than trained Qwen3 (0.45): with ``--routing model`` these hit rates are optimistic, not a floor.

    python bench/p2_streaming.py                        # CPU: mid_bf16_pe, model routing
    python bench/p2_streaming.py --routing uniform      # the floor -> bench/results/p2_streaming_uniform.json
    python bench/p2_streaming.py --ckpt a3b_l16 --routing uniform --new-tokens 40   # GPU default checkpoint
    python bench/p2_streaming.py --ckpt a3b_l16 --trace bench/traces/qwen3moe_e128k8_l16_stdlib.json.gz \
        --new-tokens 128 --fractions 1 0.25        # trained routing -> bench/results/p2_streaming_trace.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _common as C

MID = dict(hidden=1024, layers=8, heads=16, head_dim=64, experts=64, top_k=8, moe_inter=512)


def make_checkpoint(spec: str, root: Path) -> Path:
    if spec == "mid_bf16_pe":
        return C.ensure_tiny_checkpoint(root, "p2_mid_bf16_pe", layout="per_expert", dtype="bfloat16", **MID)
    if spec == "mid_q4":
        return C.ensure_tiny_checkpoint(root, "p2_mid_q4", layout="stacked", dtype="float32", quant_bits=4,
                                        quant_group=64, **MID)
    if spec.startswith("a3b_l"):
        layers = int(spec[len("a3b_l"):])
        out = root / spec
        if (out / "model.safetensors.index.json").exists():
            return out
        t0 = time.perf_counter()
        cmd = [sys.executable, str(C.BENCH_DIR / "make_large_checkpoint.py"), str(out), "--layers", str(layers)]
        print(f"[p2] {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
        print(f"[p2]   made in {time.perf_counter() - t0:.1f} s", flush=True)
        return out
    p = Path(spec)
    if not (p / "config.json").exists():
        raise SystemExit(f"--ckpt {spec!r}: not a known spec (mid_bf16_pe, mid_q4, a3b_l<N>) nor a checkpoint dir")
    return p


def bank_bytes_per_expert(ckpt: Path, expert_bytes: int) -> int:
    """Bytes one expert occupies in the bank: load_moe casts unquantized half experts to fp32 on CPU."""
    cfg = json.loads((ckpt / "config.json").read_text())
    quantized = bool(cfg.get("quantization") or cfg.get("quantization_config"))
    half = str(cfg.get("torch_dtype", "")).lower() in ("bfloat16", "float16")
    return expert_bytes * 2 if (not quantized and half and not C.is_gpu()) else expert_bytes


class UniformGate:
    """Stands in for a MoE block's router (``mlp.gate``): pseudo-random logits, uniform over the experts and
    independent from token to token — the true floor for the hit rate (~ slots / experts). They are a pure
    function of the hidden state (a hash: ``frac(43758.5453 * sin(12.9898 * x @ P))`` with a fixed random
    projection P), not PRNG draws, so a forward that streaming residency redoes after a miss routes exactly as
    the first time, and stacked and streaming residency route alike."""

    def __init__(self, experts: int, layer: int, hidden: int):
        import mlx.core as mx

        self.experts, self.layer = experts, layer
        # made (and evaluated) here, not at the first call: that call may be traced by mx.compile (--compile)
        self.proj = mx.random.normal((hidden, experts), key=mx.random.key(1000 + layer))
        mx.eval(self.proj)

    def __call__(self, x):
        import mlx.core as mx

        h = mx.sin((x.astype(mx.float32) @ self.proj) * 12.9898) * 43758.5453
        return h - mx.floor(h)


def apply_routing(model, routing: str, experts: int, a=None, tokens: int = 0) -> dict | None:
    """Installs the routing (``model`` / ``uniform`` / ``trace``), then, with ``--compile``, the compiled MoE blocks
    (``engine/compiled_moe.py``: stacked, and streaming's optimistic hit path). Returns the trace replay's info."""
    info = None
    if routing == "trace":
        from trace_routing import apply_trace

        info = apply_trace(model, a.trace_obj, tokens, a.trace_segment)
    elif routing != "model":
        _uniform(model, experts)
    if getattr(a, "compile", False):
        from mach_runtime.engine.compiled_moe import compile_moe_blocks

        compile_moe_blocks(model)
    return info


def _uniform(model, experts: int) -> None:
    n = 0
    for i, layer in enumerate(model.layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and hasattr(mlp, "gate") and hasattr(mlp, "switch_mlp"):
            if "gate" in mlp:
                del mlp["gate"]  # drop the router's weights from the module tree
            object.__setattr__(mlp, "gate", UniformGate(experts, i, model.args.hidden_size))  # plain attribute: not a parameter
            n += 1
    if not n:
        raise SystemExit("--routing uniform: found no MoE block with a gate to replace")
    return None


def offline_replay(store, slots: int, policy: str) -> dict:
    """The run's own bank steps (recorded live since ``store.start_trace()``) replayed at its bank size: Belady's
    MIN and the live policy, whose counters must equal the live ones."""
    from mach_runtime.analysis.trace_replay import RoutingTrace, replay

    tr = RoutingTrace.from_store(store, granularity="mixed")
    s = store.stats()
    bel, pol = replay(tr, slots, "belady"), replay(tr, slots, policy)
    return dict(steps=len(tr.steps), belady_hit_rate=bel.hit_rate, belady_hits=bel.hits, belady_misses=bel.misses,
                replay_hit_rate=pol.hit_rate,
                replay_matches_live=(pol.hits, pol.misses, pol.evictions) == (s.hits, s.misses, s.evictions))


def window(snaps, times, a, b, k, layers):
    """Metrics between token a and token b (indices into the per-token snapshots/times)."""
    s0, s1 = snaps[a], snaps[b]
    hits, misses = s1.hits - s0.hits, s1.misses - s0.misses
    lookups = hits + misses
    forwards = lookups / (k * layers) if lookups else 0
    nbytes = s1.bytes_read - s0.bytes_read
    rsec = s1.read_seconds - s0.read_seconds
    dt = times[b] - times[a]
    return dict(
        tokens=b - a, seconds=dt, tps=(b - a) / dt if dt > 0 else float("nan"),
        hit_rate=hits / lookups if lookups else float("nan"), misses=misses, bytes_read=nbytes,
        bytes_per_token=nbytes / forwards if forwards else 0.0, read_seconds=rsec,
        read_mb_per_s=nbytes / rsec / 1e6 if rsec > 0 else float("nan"),
        read_share=rsec / dt if dt > 0 else float("nan"),
        write_share=(s1.write_seconds - s0.write_seconds) / dt if dt > 0 else float("nan"),
        sync_share=(s1.sync_seconds - s0.sync_seconds) / dt if dt > 0 else float("nan"),
        host_syncs_per_token=(s1.host_syncs - s0.host_syncs) / (b - a) if b > a else float("nan"),
    )


def streaming_run(ckpt, files, ids, n_new, slots, layers, bank_bytes, a, cold=True) -> dict:
    from mach_runtime import load_moe
    from mach_runtime.engine.generate import GenerationStats, generate_tokens, make_sampler

    drop = C.drop_caches(files) if cold else None
    budget_gb = (slots + 0.5) * layers * bank_bytes / (1 << 30)
    t0 = time.perf_counter()
    model, tok, store, cache = load_moe(str(ckpt), expert_residency="streaming", expert_cache_gb=budget_gb,
                                        direct_io=True, io_threads=a.io_threads, eviction_policy=a.policy)
    load_s = time.perf_counter() - t0
    if getattr(a, "in_place", None) is not None:  # slot writes as MLX ops instead of in place (p2_hits.py)
        store.in_place_writes = store.in_place_writes and a.in_place
    st = store.stats()
    k = json.loads((Path(ckpt) / "config.json").read_text())["num_experts_per_tok"]
    apply_routing(model, a.routing, st.num_experts, a, len(ids) + n_new)
    store.start_trace()
    snaps = []
    gstats = GenerationStats()
    t0 = time.perf_counter()
    toks, times = C.timed_tokens(generate_tokens(model, ids, cache, make_sampler(a.temperature, seed=a.seed), n_new,
                                                 gstats),
                                 n_new, on_token=lambda i: snaps.append(store.stats()))
    end = store.stats()
    n = len(toks)
    res = dict(
        slots_per_layer=st.capacity_experts // max(st.layers, 1), capacity_experts=st.capacity_experts,
        bank_fraction=st.capacity_experts / (st.layers * st.num_experts), expert_cache_gb=budget_gb,
        load_seconds=load_s, ttft=times[0] - t0, prefill_bytes=snaps[0].bytes_read, tokens=toks,
        distinct_tokens=len(set(toks)),
        all=window(snaps, times, 0, n - 1, k, st.layers),
        steady=window(snaps, times, n // 2, n - 1, k, st.layers),
        total_hit_rate=end.hit_rate, total_bytes_read=end.bytes_read, evictions=end.evictions,
        direct_io=end.direct_io, eviction_policy=end.eviction_policy, drop_caches=drop,
        offline=offline_replay(store, st.capacity_experts // max(st.layers, 1), end.eviction_policy),
    )
    store.close()
    del model, cache, store
    C.free_mlx()
    return res


def routing_locality(ckpt, ids, n_new, E, k, a) -> dict:
    """Traces which experts every decode step routes to (one warm, untimed streaming run with a full bank) and
    compares the locality with uniform random routing: repeat@1 = share of a step's experts that the previous
    step of the same layer also used (uniform: k/E; Qwen3-30B-A3B, published: ~0.45); cover@8 = share found in
    the union of the previous 8 steps (uniform: 1-(1-k/E)^8; Qwen3-30B-A3B: ~0.80); entropy = normalised
    entropy of expert use per layer (1.0 = perfectly even)."""
    import math
    from collections import Counter, defaultdict


    from mach_runtime import load_moe
    from mach_runtime.engine.generate import generate_tokens, make_sampler

    model, _, store, cache = load_moe(str(ckpt), expert_residency="streaming", expert_cache_gb=1e6, direct_io=True)
    apply_routing(model, a.routing, E, a, len(ids) + n_new)
    store.start_trace()
    list(generate_tokens(model, ids, cache, make_sampler(a.temperature, seed=a.seed), n_new))
    per_layer = defaultdict(list)
    for layer, experts in store.trace:
        per_layer[layer].append(set(experts))
    store.close()
    del model, cache, store
    C.free_mlx()
    rep, cov, ent = [], [], []
    for steps in per_layer.values():
        steps = [s for s in steps[-(n_new - 2):] if len(s) == k]  # decode steps only
        for t in range(1, len(steps)):
            rep.append(len(steps[t] & steps[t - 1]) / k)
            if t >= 8:
                cov.append(len(steps[t] & set().union(*steps[t - 8:t])) / k)
        cnt = Counter(e for s in steps for e in s)
        n = sum(cnt.values())
        ent.append(-sum(c / n * math.log(c / n) for c in cnt.values()) / math.log(min(E, n)) if n else float("nan"))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    return dict(repeat_at_1=mean(rep), uniform_repeat_at_1=k / E, cover_at_8=mean(cov),
                uniform_cover_at_8=1 - (1 - k / E) ** 8, usage_entropy=mean(ent),
                qwen3_30b_a3b_published=dict(repeat_at_1=0.45, cover_at_8=0.80))


def stacked_run(ckpt, ids, n_new, warmup, a) -> dict:
    from mlx_lm.models.cache import make_prompt_cache

    from mach_runtime import load_moe
    from mach_runtime.engine.generate import generate_tokens, make_sampler

    t0 = time.perf_counter()
    model, _, store, _ = load_moe(str(ckpt), expert_residency="stacked")
    load_s = time.perf_counter() - t0
    apply_routing(model, a.routing, store.stats().num_experts, a, len(ids) + n_new)
    for _ in range(warmup):
        list(generate_tokens(model, ids, make_prompt_cache(model), make_sampler(a.temperature, seed=a.seed), min(n_new, 8)))
    tps = []
    toks = None
    for _ in range(2):
        toks, times = C.timed_tokens(
            generate_tokens(model, ids, make_prompt_cache(model), make_sampler(a.temperature, seed=a.seed), n_new), n_new)
        tps.append(C.decode_tps(times))
    store.close()
    del model
    C.free_mlx()
    return dict(load_seconds=load_s, tps_runs=tps, tps=C.median(tps), tokens=toks)


def disk_bw(files) -> dict:
    from diskbw import odirect_bandwidth

    f = max(files, key=os.path.getsize)
    total = min(512 << 20, os.path.getsize(f) // 2)
    r = odirect_bandwidth(f, block_bytes=2 << 20, total_bytes=total, pattern="random", threads=4,
                          seed=int(time.time()))
    r["file"] = f
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help="mid_bf16_pe | mid_q4 | a3b_l<layers> | a checkpoint directory")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125])
    p.add_argument("--prompt-tokens", type=int, default=4,
                   help="short: a long prefill through a small bank re-reads most experts several times")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2, help="cold runs per bank size (interleaved over sizes)")
    p.add_argument("--io-threads", type=int, default=4)
    p.add_argument("--policy", default="lrfu", choices=["lru", "lrfu"])
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (seeded, same for every run). Default 1: greedy decoding of a random "
                        "model falls into repetition loops (the same token over and over), which repeats the routing "
                        "and inflates hit rates; sampling keeps the token stream, hence the routing, near-uniform")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--routing", choices=["model", "uniform", "trace"], default="model",
                   help="model: the checkpoint's own (random) routers; uniform: replace every router by N(0,1) "
                        "logits per token (uniform, memoryless routing: the true hit-rate floor); trace: replay "
                        "--trace (implied by --trace)")
    p.add_argument("--trace", type=Path, default=None,
                   help="a routing trace (mach trace format, .json or .json.gz) to replay: every router picks the "
                        "experts the trace recorded at each token position (bench/trace_routing.py)")
    p.add_argument("--trace-segment", type=int, default=0, help="which recorded sequence of --trace to replay")
    p.add_argument("--warmup", choices=["first", "each", "none"], default=None,
                   help="untimed short runs before timing: first bank size only (CPU default) or each (GPU "
                        "default: the first forward of a new shape JIT-compiles)")
    p.add_argument("--time-budget-s", type=float, default=None, help="start no new timed run after this")
    p.add_argument("--skip-locality", action="store_true",
                   help="skip the full-bank locality run (it holds every expert; a --trace's locality is known)")
    p.add_argument("--compile", action="store_true",
                   help="compiled MoE blocks (engine/compiled_moe.py) for stacked and streaming alike")
    p.add_argument("--ckpt-root", type=Path, default=C.default_ckpt_root())
    p.add_argument("--out", default=None, help="default bench/results/p2_streaming[_uniform].json")
    a = p.parse_args()

    t_start = time.perf_counter()
    if a.trace is not None:
        from mach_runtime.analysis.trace_replay import RoutingTrace

        a.routing, a.trace_obj = "trace", RoutingTrace.load(a.trace)
    elif a.routing == "trace":
        p.error("--routing trace needs --trace FILE")
    a.out = a.out or C.default_out("p2_streaming" + ("" if a.routing == "model" else f"_{a.routing}"))
    info = C.machine_info()
    gpu = C.is_gpu()
    spec = a.ckpt or ("a3b_l16" if gpu else "mid_bf16_pe")
    warm_mode = a.warmup or ("each" if gpu else "first")
    print(f"[p2] {info}", flush=True)
    print(f"[p2] {C.RANDOM_ROUTING_NOTE}", flush=True)
    ckpt = make_checkpoint(spec, a.ckpt_root)
    files = C.safetensors_files(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    E, k = cfg["num_experts"], cfg["num_experts_per_tok"]

    from mach_runtime import load_moe

    # expert geometry from a throwaway streaming load (no expert is read at load)
    _, tok, store, _ = load_moe(str(ckpt), expert_residency="streaming", direct_io=True)
    st = store.stats()
    store.close()
    C.free_mlx()
    layers, expert_bytes = st.layers, st.expert_bytes
    bank_bytes = bank_bytes_per_expert(ckpt, expert_bytes)
    ids = C.make_prompt(tok, a.prompt_tokens)
    routed = layers * E * expert_bytes
    print(f"[p2] {ckpt}: {layers} MoE layers x {E} experts (top-{k}), {expert_bytes / 1e6:.2f} MB/expert on disk, "
          f"{bank_bytes / 1e6:.2f} MB in the bank; routed experts {routed / 1e9:.2f} GB on disk", flush=True)

    payload = dict(benchmark="p2_streaming", machine=info, checkpoint=str(ckpt), checkpoint_spec=spec,
                   checkpoint_bytes=C.checkpoint_bytes(ckpt), layers=layers, experts=E, top_k=k,
                   expert_bytes=expert_bytes, bank_bytes_per_expert=bank_bytes, routed_bytes=routed,
                   prompt_tokens=len(ids), new_tokens=a.new_tokens, io_threads=a.io_threads, policy=a.policy,
                   temperature=a.temperature, seed=a.seed, routing=a.routing,
                   trace=dict(file=str(a.trace), segment=a.trace_segment, meta=a.trace_obj.meta) if a.trace else None,
                   note=C.RANDOM_ROUTING_NOTE)

    bw_before = disk_bw(files)
    print(f"[p2] disk O_DIRECT 2 MiB random x4 threads: {bw_before['mb_per_s']:.0f} MB/s ({bw_before['mode']})", flush=True)
    payload["disk_before"] = bw_before

    stacked = stacked_run(ckpt, ids, a.new_tokens, 1, a)
    payload["stacked"] = stacked
    print(f"[p2] stacked reference: {stacked['tps']:.2f} tok/s", flush=True)

    loc = None if a.skip_locality else routing_locality(ckpt, ids, a.new_tokens, E, k, a)
    payload["routing_locality"] = loc
    if loc:
        print(f"[p2] routing locality: repeat@1 {loc['repeat_at_1']:.3f} (uniform {loc['uniform_repeat_at_1']:.3f}), "
              f"cover@8 {loc['cover_at_8']:.3f} (uniform {loc['uniform_cover_at_8']:.3f}), "
              f"usage entropy {loc['usage_entropy']:.3f}", flush=True)

    slots = {f: max(k, min(E, round(f * E))) for f in a.fractions}
    for f in (a.fractions if warm_mode == "each" else a.fractions[:1] if warm_mode == "first" else []):
        streaming_run(ckpt, files, ids, min(a.new_tokens, 4), slots[f], layers, bank_bytes, a, cold=False)
    print(f"[p2] warm-up ({warm_mode}) done at {time.perf_counter() - t_start:.0f} s", flush=True)

    runs = {f: [] for f in a.fractions}
    skipped = 0
    for r in range(a.repeats):
        order = a.fractions if r % 2 == 0 else a.fractions[::-1]
        for f in order:
            if a.time_budget_s and time.perf_counter() - t_start > a.time_budget_s and any(runs[x] for x in runs):
                skipped += 1
                continue
            res = streaming_run(ckpt, files, ids, a.new_tokens, slots[f], layers, bank_bytes, a)
            res["same_tokens_as_stacked"] = res["tokens"] == stacked["tokens"]
            runs[f].append(res)
            print(f"[p2] rep {r} bank {f:6.1%}: {res['all']['tps']:7.2f} tok/s, hit {res['all']['hit_rate']:.3f}, "
                  f"{res['all']['bytes_per_token'] / 1e6:7.1f} MB/tok, read {res['all']['read_mb_per_s']:6.0f} MB/s, "
                  f"read share {res['all']['read_share']:.0%}, {res['distinct_tokens']} distinct tokens, same tokens as stacked: {res['same_tokens_as_stacked']}; "
                  f"whole run hit {res['total_hit_rate']:.3f} vs Belady {res['offline']['belady_hit_rate']:.3f} "
                  f"(replay reproduces live: {res['offline']['replay_matches_live']})",
                  flush=True)
            payload["runs"] = {str(x): v for x, v in runs.items()}
            C.write_json(a.out, payload)
    payload["skipped_runs_time_budget"] = skipped

    bw_after = disk_bw(files)
    payload["disk_after"] = bw_after
    payload["runs"] = {str(x): v for x, v in runs.items()}

    def med(f, win, key):
        return C.median([x[win][key] for x in runs[f]])

    summary = []
    for f in a.fractions:
        if not runs[f]:
            continue
        summary.append(dict(
            fraction=f, slots_per_layer=runs[f][0]["slots_per_layer"], bank_gib=runs[f][0]["expert_cache_gb"],
            runs=len(runs[f]), tps=med(f, "all", "tps"), steady_tps=med(f, "steady", "tps"),
            hit_rate=med(f, "all", "hit_rate"), steady_hit_rate=med(f, "steady", "hit_rate"),
            bytes_per_token=med(f, "all", "bytes_per_token"), steady_bytes_per_token=med(f, "steady", "bytes_per_token"),
            read_mb_per_s=med(f, "all", "read_mb_per_s"), read_share=med(f, "all", "read_share"),
            vs_stacked=med(f, "all", "tps") / stacked["tps"],
            same_tokens_as_stacked=all(x["same_tokens_as_stacked"] for x in runs[f]),
            total_hit_rate=C.median([x["total_hit_rate"] for x in runs[f]]),
            belady_hit_rate=C.median([x["offline"]["belady_hit_rate"] for x in runs[f]]),
            replay_matches_live=all(x["offline"]["replay_matches_live"] for x in runs[f]),
        ))
    payload["summary"] = summary
    C.write_json(a.out, payload)

    where = info.get("gpu") or info["cpu_model"]
    print(f"\nP2 streaming decode, cold ({info['backend']}: {where}; mlx {info['mlx']}); {spec}: {layers} layers x "
          f"{E} experts top-{k}, {expert_bytes / 1e6:.2f} MB/expert on disk ({bank_bytes / 1e6:.2f} MB in bank); "
          f"prompt {len(ids)}, {a.new_tokens} new tokens (temperature {a.temperature:g}, seed {a.seed}); "
          f"routing: {a.routing}; direct_io, {a.io_threads} io threads, {a.policy}; "
          f"median of the cold runs ('runs' column; {a.repeats} planned)")
    rows = [["stacked (100% resident)", E, "-", len(stacked["tps_runs"]), f"{stacked['tps']:.2f}",
             f"{stacked['tps']:.2f}", "1.000", "1.000", "-", "-", "0.0", "0.0", "-", "-", "1.00"]]
    for s in summary:
        rows.append([f"streaming {s['fraction']:.1%}", s["slots_per_layer"], f"{s['bank_gib']:.2f}", s["runs"],
                     f"{s['tps']:.2f}",
                     f"{s['steady_tps']:.2f}", f"{s['hit_rate']:.3f}", f"{s['steady_hit_rate']:.3f}",
                     f"{s['total_hit_rate']:.3f}", f"{s['belady_hit_rate']:.3f}",
                     f"{s['bytes_per_token'] / 1e6:.1f}", f"{s['steady_bytes_per_token'] / 1e6:.1f}",
                     f"{s['read_mb_per_s']:.0f}", f"{s['read_share']:.0%}", f"{s['vs_stacked']:.2f}"])
    print(C.fmt_table(["residency / bank", "slots/layer", "GiB", "runs", "tok/s", "steady tok/s", "hit", "steady hit",
                       "run hit", "Belady", "MB/tok", "steady MB/tok", "read MB/s", "read share", "vs stacked"], rows))
    print(f"disk O_DIRECT 2 MiB random, 4 threads: {bw_before['mb_per_s']:.0f} MB/s before, "
          f"{bw_after['mb_per_s']:.0f} MB/s after ({bw_before['mode']}, {Path(bw_before['file']).name})")
    print("run hit: the whole run's hit rate (prefill included); Belady: the same bank steps replayed offline under "
          f"Belady's MIN at the same size (replay of the live policy reproduces the live counters: "
          f"{all(s['replay_matches_live'] for s in summary)})")
    if a.trace is not None:
        print(f"routing: trace {a.trace} segment {a.trace_segment} ({a.trace_obj.meta.get('source', '?')})")
    if loc:
        print(f"routing of this checkpoint (decode, traced): repeat@1 {loc['repeat_at_1']:.3f} (uniform random "
              f"{loc['uniform_repeat_at_1']:.3f}, Qwen3-30B-A3B ~0.45), cover@8 {loc['cover_at_8']:.3f} (uniform "
              f"{loc['uniform_cover_at_8']:.3f}, Qwen3-30B-A3B ~0.80), expert-use entropy {loc['usage_entropy']:.3f}")
    drops = {json.dumps(x["drop_caches"]) for v in runs.values() for x in v}
    print(f"page-cache drop: {', '.join(drops) or '-'}")
    print(C.RANDOM_ROUTING_NOTE)
    print(f"json: {a.out}")


if __name__ == "__main__":
    main()
