#!/usr/bin/env python3
"""P1: stacked-residency decode speed, mach_runtime vs mlx-lm, same checkpoint, same process.

For each checkpoint variant both engines are loaded side by side:

* ours:    ``load_moe(ckpt, expert_residency="stacked")`` + ``mach_runtime.engine.generate.generate_tokens``
* mlx-lm:  ``mlx_lm.load(ckpt)`` + ``mlx_lm.generate.generate_step``

Both get the same prompt ids (``--prompt-tokens``, default 64), generate ``--new-tokens`` (default 128) greedy
tokens and are timed by this harness the same way: decode tok/s = (tokens - 1) / (time of the last token -
time of the first token), so prefill is excluded for both. After ``--warmup`` untimed runs of each, the timed
repeats alternate the order (ours, mlx-lm, mlx-lm, ours, ...) to cancel drift (thermal, page cache, allocator).
Greedy outputs must be identical token for token (checked on every run; the script exits 1 on a mismatch,
after writing the JSON).

Variants (``--variants``; default: cpu -> tiny, mid_fp32; gpu -> tiny, mid_bf16, mid_q4):

* tiny:      hidden 64, 2 layers, 8 experts top-2 (per-token overhead dominates)
* mid_*:     hidden 1024, 8 layers, 16 heads x 64, 64 experts top-8, moe_inter 512 (fp32 / bf16 stacked;
             q4 = 4-bit affine group 64 stacked, float tensors cast to bf16)

    python bench/p1_stacked_decode.py                     # CPU here
    python bench/p1_stacked_decode.py --variants mid_q4   # one variant
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _common as C

MID = dict(hidden=1024, layers=8, heads=16, head_dim=64, experts=64, top_k=8, moe_inter=512)
TINY = dict(hidden=64, layers=2, heads=4, head_dim=16, experts=8, top_k=2, moe_inter=32)
VARIANTS = {
    "tiny": dict(layout="stacked", dims=TINY, dtype="float32"),
    "tiny_bf16": dict(layout="stacked", dims=TINY, dtype="bfloat16"),
    "mid_fp32": dict(layout="stacked", dims=MID, dtype="float32"),
    "mid_bf16": dict(layout="stacked", dims=MID, dtype="bfloat16"),
    "mid_q4": dict(layout="stacked", dims=MID, dtype="float32", quant_bits=4, quant_group=64, cast_to="bfloat16"),
    "mid_q4_fp32": dict(layout="stacked", dims=MID, dtype="float32", quant_bits=4, quant_group=64),
}


def cast_checkpoint_floats(ckpt: Path, dtype: str) -> None:
    """Rewrites every float32 tensor of a checkpoint as ``dtype`` (make_tiny_checkpoint's quantized
    checkpoints keep float32 scales/norms; real MLX 4-bit checkpoints carry bf16)."""
    import json

    import mlx.core as mx

    target = getattr(mx, dtype)
    for f in C.safetensors_files(ckpt):
        w, meta = mx.load(f, return_metadata=True)
        w = {k: (v.astype(target) if v.dtype == mx.float32 else v) for k, v in w.items()}
        mx.save_safetensors(f, w, metadata=meta or {"format": "mlx"})
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["torch_dtype"] = dtype
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=1))
    C.free_mlx()


def make_variant(root: Path, name: str) -> Path:
    v = VARIANTS[name]
    kwargs = dict(layout=v["layout"], dtype=v["dtype"], **v["dims"])
    if v.get("quant_bits"):
        kwargs.update(quant_bits=v["quant_bits"], quant_group=v["quant_group"])
    marker_kwargs = dict(kwargs, cast_to=v.get("cast_to"))
    ckpt = root / f"p1_{name}"
    marker = ckpt / "bench_params.json"
    import json

    if marker.exists() and marker.read_text() == json.dumps(marker_kwargs, sort_keys=True, default=str):
        return ckpt
    ckpt = C.ensure_tiny_checkpoint(root, f"p1_{name}", **kwargs)
    if v.get("cast_to"):
        cast_checkpoint_floats(ckpt, v["cast_to"])
    marker.write_text(json.dumps(marker_kwargs, sort_keys=True, default=str))
    return ckpt


def run_ours(model, ids, n):
    from mlx_lm.models.cache import make_prompt_cache

    from mach_runtime.engine.generate import GenerationStats, generate_tokens, make_sampler

    stats = GenerationStats()
    t0 = time.perf_counter()
    toks, times = C.timed_tokens(generate_tokens(model, ids, make_prompt_cache(model), make_sampler(0.0), n, stats), n)
    return dict(tokens=toks, tps=C.decode_tps(times), ttft=times[0] - t0, internal_decode_tps=stats.decode_tps)


def run_mlx_lm(model, ids, n):
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    gen = generate_step(mx.array(ids, dtype=mx.uint32), model, max_tokens=n, sampler=make_sampler(temp=0.0),
                        prompt_cache=make_prompt_cache(model))
    t0 = time.perf_counter()
    toks, times = C.timed_tokens((t for t, _ in gen), n)
    return dict(tokens=toks, tps=C.decode_tps(times), ttft=times[0] - t0)


def first_diff(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def bench_variant(name, ckpt, a) -> dict:
    import mlx_lm

    from mach_runtime import load_moe

    t0 = time.perf_counter()
    ours, tok, store, _ = load_moe(str(ckpt), expert_residency="stacked")
    t_ours_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref, _ = mlx_lm.load(str(ckpt))
    t_ref_load = time.perf_counter() - t0
    ids = C.make_prompt(tok, a.prompt_tokens)
    engines = {"ours": lambda: run_ours(ours, ids, a.new_tokens), "mlx_lm": lambda: run_mlx_lm(ref, ids, a.new_tokens)}

    for _ in range(a.warmup):
        for e in engines.values():
            e()
    runs = {"ours": [], "mlx_lm": []}
    for r in range(a.repeats):
        order = ("ours", "mlx_lm") if r % 2 == 0 else ("mlx_lm", "ours")
        for e in order:
            runs[e].append(engines[e]())
            print(f"[p1] {name} rep {r} {e:6s} {runs[e][-1]['tps']:8.2f} tok/s", flush=True)

    ref_tokens = runs["mlx_lm"][0]["tokens"]
    mismatches = []
    for e in runs:
        for i, run in enumerate(runs[e]):
            d = first_diff(run["tokens"], ref_tokens)
            if d is not None:
                mismatches.append(dict(engine=e, run=i, first_diff=d))
    identical = not mismatches
    ours_tps = C.median([x["tps"] for x in runs["ours"]])
    ref_tps = C.median([x["tps"] for x in runs["mlx_lm"]])
    res = dict(
        variant=name, checkpoint=str(ckpt), spec=VARIANTS[name], checkpoint_bytes=C.checkpoint_bytes(ckpt),
        prompt_tokens=len(ids), new_tokens=a.new_tokens, repeats=a.repeats, warmup=a.warmup,
        load_seconds=dict(ours=t_ours_load, mlx_lm=t_ref_load),
        ours_tps=[x["tps"] for x in runs["ours"]], mlx_lm_tps=[x["tps"] for x in runs["mlx_lm"]],
        ours_internal_decode_tps=[x["internal_decode_tps"] for x in runs["ours"]],
        ours_ttft=[x["ttft"] for x in runs["ours"]], mlx_lm_ttft=[x["ttft"] for x in runs["mlx_lm"]],
        ours_median_tps=ours_tps, mlx_lm_median_tps=ref_tps, ratio=ours_tps / ref_tps,
        identical_tokens=identical, mismatches=mismatches, first_tokens=ref_tokens[:16],
    )
    print(f"[p1] {name}: greedy tokens identical: {identical}"
          + ("" if identical else f" (first divergence {mismatches[:3]})"), flush=True)
    store.close()
    del ours, ref, engines
    C.free_mlx()
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=None, choices=sorted(VARIANTS))
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=6, help="timed runs per engine (interleaved)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per engine first")
    p.add_argument("--ckpt-root", type=Path, default=C.default_ckpt_root())
    p.add_argument("--out", default=C.default_out("p1_stacked_decode"))
    a = p.parse_args()

    info = C.machine_info()
    variants = a.variants or (["tiny_bf16", "mid_bf16", "mid_q4"] if C.is_gpu() else ["tiny", "mid_fp32"])
    print(f"[p1] {info}", flush=True)
    results = []
    for name in variants:
        ckpt = make_variant(a.ckpt_root, name)
        results.append(bench_variant(name, ckpt, a))
        C.write_json(a.out, dict(benchmark="p1_stacked_decode", machine=info, results=results))

    rows = [
        [r["variant"], f"{r['checkpoint_bytes'] / 1e9:.2f}", f"{r['mlx_lm_median_tps']:.2f}", f"{r['ours_median_tps']:.2f}",
         f"{r['ratio']:.3f}", f"{C.median(r['mlx_lm_ttft']) * 1e3:.0f}", f"{C.median(r['ours_ttft']) * 1e3:.0f}",
         "yes" if r["identical_tokens"] else "NO"]
        for r in results
    ]
    where = info.get("gpu") or info["cpu_model"]
    print(f"\nP1 stacked decode ({info['backend']}: {where}; mlx {info['mlx']}, mlx-lm {info['mlx_lm']}); "
          f"prompt {a.prompt_tokens}, {a.new_tokens} new tokens, greedy, median of {a.repeats} interleaved runs")
    print(C.fmt_table(["variant", "GB", "mlx-lm tok/s", "ours tok/s", "ours/mlx-lm", "mlx-lm TTFT ms",
                       "ours TTFT ms", "same tokens"], rows))
    print(f"json: {a.out}")
    if not all(r["identical_tokens"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
