#!/usr/bin/env python3
"""CPU BLAS: MLX's reference BLAS (its Linux wheel's netlib libblas) vs OpenBLAS (mach_runtime/backend/cpu_blas.py),
side by side in one process: ``install_cpu_blas`` / ``restore_reference_blas`` switch libmlx.so's GEMM slots
between runs, and the repeats alternate the order.

1. GEMM: float32 ``[rows x 2048] @ [2048 x 2048]`` on the CPU, GFLOP/s for reference, OpenBLAS with 1 and 2
   threads, OpenBLAS 1 thread on two MLX CPU streams (the rows split in halves, evaluated together), and numpy's
   own OpenBLAS (its default threads) for context.
2. Decode: the bundled demo model (qwen3_moe, float32 on the CPU), greedy, batch 1 and 8: mach's continuous batch
   (``BatchEngine`` over ``load_moe(stacked)``) and mlx-lm's own generation (``generate_step`` at batch 1,
   ``BatchGenerator`` at batch 8) on ``mlx_lm.load`` of the same checkpoint cast to float32 (MLX's CPU gather_mm
   takes float32 only), each with both BLAS. Decode tok/s = tokens after each request's first / time from the
   first decode step to the last (prefill excluded).

    python bench/cpu_blas.py                 # ~3-4 min on the 2-core VM idle
    python bench/cpu_blas.py --quick         # fewer rows and tokens (~1 min)

The load average is printed and saved: CPU timings are only meaningful on an idle machine, and only as ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import _common as C

N = 2048


def _blas(mode: str, threads: int = 1):
    from mach_runtime.backend.cpu_blas import install_cpu_blas, restore_reference_blas

    s = restore_reference_blas() if mode == "reference" else install_cpu_blas("openblas", threads)
    assert s.active == mode, s
    return s


def gemm_rows(rows_list, reps: int) -> list[dict]:
    import mlx.core as mx
    import numpy as np

    s1, s2 = mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)
    w = mx.random.normal((N, N), stream=mx.cpu)
    wn = np.array(w)
    out = []
    for rows in rows_list:
        x = mx.random.normal((rows, N), stream=mx.cpu)
        xn = np.array(x)
        h = max(rows // 2, 1)
        one = lambda: mx.eval(mx.matmul(x, w, stream=mx.cpu))  # noqa: E731
        two = lambda: mx.eval(mx.matmul(x[:h], w, stream=s1), mx.matmul(x[h:], w, stream=s2))  # noqa: E731
        cases = {"reference": ("reference", 1, one), "openblas_1t": ("openblas", 1, one),
                 "openblas_2t": ("openblas", 2, one), "openblas_1t_2streams": ("openblas", 1, two)}
        times = {k: [] for k in cases}
        times["numpy"] = []
        for r in range(reps):
            order = list(cases) if r % 2 == 0 else list(reversed(cases))
            for name in order:
                mode, threads, fn = cases[name]
                _blas(mode, threads)
                fn()  # warm (allocations, OpenBLAS buffers)
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            xn @ wn
            times["numpy"].append(time.perf_counter() - t)
        flop = 2 * rows * N * N
        row = {"rows": rows}
        for k, ts in times.items():
            row[k + "_ms"] = C.median(ts) * 1e3
            row[k + "_gflops"] = flop / C.median(ts) / 1e9
        out.append(row)
        print(f"  rows {rows}: " + ", ".join(f"{k} {row[k + '_gflops']:.1f}" for k in times) + " GFLOP/s", flush=True)
    _blas("openblas", 1)
    return out


def mach_decode(model, tok, prompts, n):
    from actors.messages import SamplingParams
    from mach_runtime.engine.batch import BatchEngine

    eng = BatchEngine(model, tok, max_batch=len(prompts))
    for i, p in enumerate(prompts):
        eng.add(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    tokens = {f"r{i}": [] for i in range(len(prompts))}
    t_first, counted = None, 0
    while eng.active:
        outs = eng.step()
        for o in outs:
            if tokens[o.request_id]:
                counted += 1
            tokens[o.request_id].append(o.token)
            if o.finish_reason:
                eng.remove(o.request_id)
        if t_first is None and all(tokens.values()):
            t_first = time.perf_counter()
    return counted / (time.perf_counter() - t_first), [tokens[f"r{i}"] for i in range(len(prompts))]


def mlx_lm_decode(model, tok, prompts, n):
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator, generate_step
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    if len(prompts) == 1:
        gen = generate_step(mx.array(prompts[0], dtype=mx.uint32), model, max_tokens=n,
                            sampler=make_sampler(temp=0.0), prompt_cache=make_prompt_cache(model))
        toks, times = C.timed_tokens((t for t, _ in gen), n)
        return C.decode_tps(times), [toks]
    gen = BatchGenerator(model, max_tokens=n, stop_tokens=[],  # every request runs n tokens, as mach's (ignore_eos)
                         completion_batch_size=len(prompts), prefill_batch_size=len(prompts))
    uids = gen.insert(prompts, max_tokens=[n] * len(prompts))
    tokens = {u: [] for u in uids}
    t_first, counted, done = None, 0, 0
    while done < len(prompts):
        _, responses = gen.next()
        for r in responses:
            if tokens[r.uid]:
                counted += 1
            tokens[r.uid].append(r.token)
            done += r.finish_reason is not None
        if t_first is None and all(tokens.values()):
            t_first = time.perf_counter()
    dt = time.perf_counter() - t_first
    gen.close()
    return counted / dt, [tokens[u] for u in uids]


def decode(batches, n, reps) -> list[dict]:
    import mlx.core as mx
    import mlx_lm

    import mach_runtime.assets as assets
    from mach_runtime import load_moe

    ckpt = os.path.join(os.path.dirname(assets.__file__), "demo-qwen3-moe")
    ours, tok, _, _ = load_moe(ckpt, expert_residency="stacked")
    ref, ref_tok = mlx_lm.load(ckpt)
    ref.set_dtype(mx.float32)  # as load_moe does on the CPU: MLX's CPU gather_mm takes float32 only
    base = C.make_prompt(tok, 64 + 8 * 5)
    rows = []
    for b in batches:
        prompts = [base[i * 5:i * 5 + 64] for i in range(b)]
        engines = {"mach": lambda: mach_decode(ours, tok, prompts, n),
                   "mlx_lm": lambda: mlx_lm_decode(ref, ref_tok, prompts, n)}
        cases = [(e, m) for e in engines for m in ("reference", "openblas")]
        res = {c: [] for c in cases}
        toks = {}
        for r in range(reps):
            for e, m in (cases if r % 2 == 0 else list(reversed(cases))):
                _blas(m)
                tps, t = engines[e]()
                res[(e, m)].append(tps)
                toks[(e, m)] = t
        row = {"batch": b, "new_tokens": n}
        for (e, m), v in res.items():
            row[f"{e}_{m}_tps"] = C.median(v)
            row[f"{e}_{m}_all"] = v
        for e in engines:
            row[f"{e}_speedup"] = row[f"{e}_openblas_tps"] / row[f"{e}_reference_tps"]
            row[f"{e}_same_tokens"] = toks[(e, "reference")] == toks[(e, "openblas")]
        row["mach_vs_mlx_lm_reference"] = row["mach_reference_tps"] / row["mlx_lm_reference_tps"]
        row["mach_vs_mlx_lm_openblas"] = row["mach_openblas_tps"] / row["mlx_lm_openblas_tps"]
        rows.append(row)
        print(f"  batch {b}: " + ", ".join(f"{e}/{m} {row[f'{e}_{m}_tps']:.1f}" for e, m in cases) + " tok/s",
              flush=True)
    _blas("openblas", 1)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--gemm-reps", type=int, default=4)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=C.default_out("cpu_blas"))
    a = p.parse_args()
    if a.quick:
        a.rows, a.gemm_reps, a.new_tokens, a.reps = [1, 8, 64], 2, 24, 1

    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    info = C.machine_info()
    load0 = os.getloadavg()
    print(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    print("GEMM float32 [rows x 2048] @ [2048 x 2048] (CPU):", flush=True)
    gemm = gemm_rows(a.rows, a.gemm_reps)
    print("decode, demo model (float32 on the CPU), greedy:", flush=True)
    dec = decode(a.batches, a.new_tokens, a.reps)
    load1 = os.getloadavg()

    print(f"\nGEMM GFLOP/s (median of {a.gemm_reps})")
    print(C.fmt_table(["rows", "reference", "OpenBLAS 1t", "OpenBLAS 2t", "OpenBLAS 1t x 2 streams", "numpy"],
                      [[g["rows"]] + [f"{g[k + '_gflops']:.1f}" for k in
                                      ("reference", "openblas_1t", "openblas_2t", "openblas_1t_2streams", "numpy")]
                       for g in gemm]))
    print(f"\ndecode tok/s, demo model, {a.new_tokens} new tokens per request (median of {a.reps})")
    print(C.fmt_table(["batch", "mach ref", "mach OpenBLAS", "x", "mlx-lm ref", "mlx-lm OpenBLAS", "x",
                       "mach/mlx-lm ref", "mach/mlx-lm OpenBLAS", "same tokens (mach, mlx-lm)"],
                      [[d["batch"], f"{d['mach_reference_tps']:.1f}", f"{d['mach_openblas_tps']:.1f}",
                        f"{d['mach_speedup']:.2f}", f"{d['mlx_lm_reference_tps']:.1f}",
                        f"{d['mlx_lm_openblas_tps']:.1f}", f"{d['mlx_lm_speedup']:.2f}",
                        f"{d['mach_vs_mlx_lm_reference']:.2f}", f"{d['mach_vs_mlx_lm_openblas']:.2f}",
                        f"{d['mach_same_tokens']}, {d['mlx_lm_same_tokens']}"] for d in dec]))
    print(f"\nload average: start {load0[0]:.2f}, end {load1[0]:.2f} (1-min)")
    path = C.write_json(a.out, {"machine": info, "load_average_start": load0, "load_average_end": load1,
                                "gemm": gemm, "decode": dec, "args": vars(a)})
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
