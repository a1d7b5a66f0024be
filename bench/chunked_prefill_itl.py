#!/usr/bin/env python3
"""Chunked prefill: inter-token latency of running streams while a long prompt joins.

Four requests stream through ``mach_runtime.Runtime``; once each has produced a few tokens, a fifth request with
a ``--long-tokens`` prompt (default 4096) joins. Measured on the four streams: the gaps between consecutive chunks
(time between tokens as the client sees them) from the moment the long request is submitted until its first
token, plus the long request's time to first token. Variants, in one process on the same random qwen3_moe
(context 32k; the bundled demo model's is 1024):

* whole:    ``prefill_chunk`` larger than the prompt: the newcomer prefills in one go between two decode steps
            (what main did: ``BatchEngine.add_many`` prefilled the whole prompt at admission);
* chunk=N:  the scheduler's chunked prefill, N prompt tokens per decode step (``Runtime.open(prefill_chunk=N)``).

``--baseline-src DIR`` also runs the same measurement in a subprocess on another source tree (e.g. an export of
main), whose Runtime has no ``prefill_chunk``.

    python bench/chunked_prefill_itl.py                          # CPU: about 2 minutes
    python bench/chunked_prefill_itl.py --baseline-src /tmp/main_src
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import _common as C

DIMS = dict(hidden=256, layers=4, heads=4, head_dim=64, experts=16, top_k=4, moe_inter=128)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


async def measure(ckpt, long_tokens: int, chunk: int | None, streams: int = 4) -> dict:
    import anyio

    from mach_runtime import Runtime

    kw = {} if chunk is None else {"prefill_chunk": chunk}
    async with Runtime.open(ckpt, expert_residency="stacked", max_batch=8, **kw) as rt:
        tok = rt.tokenizer
        long_ids = C.make_prompt(tok, long_tokens)
        short = [C.make_prompt(tok, 16 + 8 * i)[i:] for i in range(streams)]
        await rt.generate(long_ids[:600], max_tokens=2)  # warm-up (kernels, a 2-chunk prefill)
        arrivals: dict[int, list[float]] = {i: [] for i in range(streams)}
        started = anyio.Event()
        done = anyio.Event()
        marks = {}

        async def stream(i):
            async with rt.stream(short[i], max_tokens=20000, seed=i) as s:
                async for c in s:
                    arrivals[i].append(time.perf_counter())
                    if all(len(a) >= 5 for a in arrivals.values()):
                        started.set()
                    if done.is_set() and time.perf_counter() > marks["first"] + 0.5:
                        break

        async def joiner():
            await started.wait()
            marks["submit"] = time.perf_counter()
            async for c in rt.stream(long_ids, max_tokens=2):
                marks.setdefault("first", time.perf_counter())
            done.set()

        with anyio.fail_after(600):
            async with anyio.create_task_group() as tg:
                for i in range(streams):
                    tg.start_soon(stream, i)
                tg.start_soon(joiner)
        stats = await rt.stats()
    t0, t1 = marks["submit"], marks["first"]
    gaps, before = [], []
    for ts in arrivals.values():
        for a, b in zip(ts, ts[1:]):
            if b > t0 and a < t1:
                gaps.append(b - a)  # a gap that overlaps the join
            elif b <= t0:
                before.append(b - a)
    return {"chunk": chunk, "ttft_long_s": t1 - t0, "gaps": len(gaps), "itl_p50_ms": 1e3 * pct(gaps, 50),
            "itl_p99_ms": 1e3 * pct(gaps, 99), "itl_max_ms": 1e3 * max(gaps), "steady_p50_ms": 1e3 * pct(before, 50),
            "prefill_chunks": getattr(stats.decoder, "prefill_chunks", None)}


def main():
    import anyio

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--long-tokens", type=int, default=4096)
    ap.add_argument("--chunks", type=int, nargs="+", default=[512, 256])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--baseline-src", help="another source tree to measure in a subprocess (e.g. main)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure once with the tree on sys.path, print JSON
    ap.add_argument("--out", default=C.default_out("chunked_prefill_itl"))
    a = ap.parse_args()
    ckpt = C.ensure_tiny_checkpoint(C.default_ckpt_root(), "itl_qwen3_moe", layout="stacked", **DIMS)
    if a.one:
        print("RESULT " + json.dumps(anyio.run(measure, ckpt, a.long_tokens, None)))
        return
    variants = [("whole", 10 ** 9)] + [(f"chunk={c}", c) for c in a.chunks]
    results = {name: [] for name, _ in variants}
    if a.baseline_src:
        results["baseline-src"] = []
    for rep in range(a.repeats):
        for name, chunk in (variants if rep % 2 == 0 else variants[::-1]):
            results[name].append(anyio.run(measure, ckpt, a.long_tokens, chunk))
            print(f"[{name}] {json.dumps(results[name][-1])}", flush=True)
        if a.baseline_src:
            env = {**os.environ, "PYTHONPATH": a.baseline_src}
            out = subprocess.run([sys.executable, __file__, "--one", "1", "--long-tokens", str(a.long_tokens)],
                                 capture_output=True, text=True, env=env, cwd=os.path.dirname(__file__), timeout=900)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                sys.exit(f"baseline run failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            results["baseline-src"].append(json.loads(line[0][7:]))
            print(f"[baseline-src] {json.dumps(results['baseline-src'][-1])}", flush=True)
    rows = []
    for name, rs in results.items():
        med = {k: C.median([r[k] for r in rs]) for k in ("itl_p50_ms", "itl_p99_ms", "itl_max_ms", "ttft_long_s",
                                                            "steady_p50_ms")}
        rows.append([name, f"{med['steady_p50_ms']:.1f}", f"{med['itl_p50_ms']:.1f}", f"{med['itl_p99_ms']:.0f}",
                     f"{med['itl_max_ms']:.0f}", f"{med['ttft_long_s']:.2f}"])
    C.write_json(a.out, {"benchmark": "chunked_prefill_itl", "machine": C.machine_info(),
                         "source": C.mach_runtime_source(), "dims": DIMS, "long_tokens": a.long_tokens,
                         "streams": 4, "results": results})
    print(f"\nChunked prefill: 4 running streams while a {a.long_tokens}-token prompt joins; qwen3_moe {DIMS} fp32, "
          f"median of {a.repeats}")
    print(C.fmt_table(["variant", "ITL before join p50 ms", "ITL during join p50 ms", "p99 ms", "max ms",
                       "long TTFT s"], rows))
    print(f"JSON: {a.out}")


if __name__ == "__main__":
    main()
