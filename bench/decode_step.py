"""The steady batched decode step on the CPU: whole-graph vs layer-by-layer submission
(``engine.batch.SubmittingCaches``).

    python bench/decode_step.py [--ckpt DIR] [--batch 8] [--steps 240] [--block 8] [--out JSON]

One ``BatchEngine`` (pipelined, greedy, the serving benchmark's prompts with the chat template) over the float32
demo model that ``bench/serve_bench.py`` serves; the two variants alternate every ``--block`` steps inside the same
run (the first two steps after each switch are not counted), so a changing machine load hits both alike. Per
variant: wall time per step (p25 / p50 / mean) and, from ``/proc/self/task/*/schedstat``, each busy thread's CPU
time per step, the time it waited for a core (run queue) and the time it slept (blocked): the MLX stream's worker
sleeping is the stream idling for want of queued work (what layer-by-layer submission removes). The tokens are
compared with a whole-graph run of the same requests (they must be equal: same graph).

Why it exists: ``mx.async_eval`` returns only once at most ~100 CPU ops of the graph are left to compute (MLX's
back-pressure), so a whole-graph submission leaves the stream with ~1 ms of work while Python builds the next step.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import _common

PROMPTS = ["def add(a, b):", "import os\nimport sys\n", "class Node:", "for i in range(10):", "# parse the file\n",
           "while True:", "try:\n    import json\nexcept ImportError:", "x = [", "def main():", "with open(path) as f:"]


def schedstat() -> dict:
    out = {}
    for t in os.listdir("/proc/self/task"):
        try:
            run, wait, _ = open(f"/proc/self/task/{t}/schedstat").read().split()
        except (OSError, ValueError):
            continue
        out[t] = (int(run) / 1e9, int(wait) / 1e9)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None, help="default: the fp32 demo of bench/serve_bench.py")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--out", default=_common.default_out("decode_step"))
    a = ap.parse_args()
    import mlx.core as mx

    from actors.messages import SamplingParams
    from mach_runtime import load_moe
    from mach_runtime.engine.batch import Admission, BatchEngine
    from serve_bench import fp32_demo

    ckpt = Path(a.ckpt) if a.ckpt else fp32_demo(_common.default_ckpt_root())
    model, tok, _, _ = load_moe(ckpt, expert_residency="stacked")
    prompts = [tuple(tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                             add_generation_prompt=True)) for i in range(a.batch)]

    def engine(submit: bool):
        eng = BatchEngine(model, tok, max_batch=a.batch, submit_layers=submit)
        eng.add_many([Admission(f"r{i}", p, SamplingParams(max_tokens=a.steps + 4, temperature=0.0,
                                                             ignore_eos=True)) for i, p in enumerate(prompts)])
        return eng

    ref = engine(False)  # the tokens of a whole-graph run
    want = [[o.token for o in ref.step()] for _ in range(a.steps)]
    ref.clear()
    eng = engine(True)
    names = {True: "layer by layer", False: "whole graph (default)"}
    wall = {v: [] for v in names}
    cpu = {v: {} for v in names}
    got = []
    load0 = os.getloadavg()[0]
    for i in range(a.steps):
        v = (i // a.block) % 2 == 0
        eng.submit_layers = v
        counted = i % a.block >= 2
        s0, t0 = schedstat(), time.perf_counter()
        outs = eng.step()
        dt, s1 = time.perf_counter() - t0, schedstat()
        got.append([o.token for o in outs])
        if counted:
            wall[v].append(dt)
            for t, (run, wait) in s1.items():
                r0, w0 = s0.get(t, (run, wait))
                c = cpu[v].setdefault(t, [0.0, 0.0, 0.0])
                c[0] += run - r0
                c[1] += wait - w0
                c[2] += dt - (run - r0) - (wait - w0)
    rows, res = [], {"checkpoint": str(ckpt), "batch": a.batch, "steps": a.steps, "block": a.block,
                     "machine": _common.machine_info(), "same_tokens": got == want,
                     "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)], "variants": {}}
    for v, name in names.items():
        xs = sorted(wall[v])
        n = len(xs)
        me = str(threading.get_native_id())  # this (Python) thread; the busiest other one is the stream's worker
        worker = max((t for t in cpu[v] if t != me), key=lambda t: cpu[v][t][0])
        threads = [(worker, cpu[v][worker]), (me, cpu[v][me])]
        r = {"steps_counted": n, "step_p25_ms": 1e3 * xs[n // 4], "step_p50_ms": 1e3 * xs[n // 2],
             "step_mean_ms": 1e3 * sum(xs) / n,
             "threads_ms_per_step": [{"run": 1e3 * c[0] / n, "runqueue": 1e3 * c[1] / n, "blocked": 1e3 * c[2] / n}
                                     for _, c in threads]}
        res["variants"][name] = r
        th = "; ".join(f"{x['run']:.2f} / {x['runqueue']:.2f} / {x['blocked']:.2f}" for x in r["threads_ms_per_step"])
        rows.append([name, n, f"{r['step_p25_ms']:.2f}", f"{r['step_p50_ms']:.2f}", f"{r['step_mean_ms']:.2f}", th])
    print(_common.fmt_table(["submission", "steps", "p25 ms", "p50 ms", "mean ms",
                             "stream worker; Python thread: run / run-queue / blocked ms per step"], rows))
    print(f"same tokens as a whole-graph run: {res['same_tokens']}; load average {load0:.1f} -> "
          f"{os.getloadavg()[0]:.1f}; device {mx.default_device()}")
    _common.write_json(a.out, res)
    print("wrote", a.out)
    return 0 if res["same_tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
