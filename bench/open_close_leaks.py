"""Leaks across Runtime open/close: OS threads and RSS over N cycles of the natural loop.

    python bench/open_close_leaks.py [--cycles 8] [--checkpoint DIR] [--residency stacked|streaming] [--json out.json]

Runs ``for i in range(N): async with Runtime.open(ckpt) as rt: await rt.generate(...)`` in one process (the way a
user writes it: ``rt`` still names the previous runtime while the next one opens) and records, after each
cycle, the process's OS thread count (``/proc/self/task`` or ``threading.active_count`` where /proc is missing)
its resident set size and the MLX memory still held by arrays. The baseline is the first cycle: a runtime that leaks nothing stays flat after it.
Prints a table and writes JSON (machine, date, commit). Also runs the same loop under trio with ``--backend trio``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time

import _common  # noqa: F401  (puts this checkout on sys.path when it is not installed)


def os_threads() -> int:
    """OS threads of this process, once threads that were just joined have left (a joined thread can linger in
    /proc/self/task for a moment): the count after it stops falling, polled for at most a second."""

    def count() -> int:
        try:
            return len(os.listdir("/proc/self/task"))
        except OSError:  # macOS: Python threads only
            return threading.active_count()

    n = count()
    for _ in range(20):
        time.sleep(0.05)
        m = count()
        if m >= n:
            return m
        n = m
    return n


def thread_names() -> dict:
    """OS threads by name (/proc/self/task/*/comm; Python's names where /proc is missing): says which kind leaks."""
    import collections

    try:
        names = []
        for t in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{t}/comm") as f:
                    names.append(f.read().strip())
            except OSError:  # left since the listing
                pass
    except OSError:
        names = [t.name for t in threading.enumerate()]
    return dict(sorted(collections.Counter(names).items()))


def rss_mb() -> float:
    """Current resident set size (not the peak): /proc on Linux, psutil elsewhere if installed."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import psutil  # macOS: pip install psutil

    return psutil.Process().memory_info().rss / 2**20


def mlx_active_mb() -> float:
    """MLX memory held by live arrays (weights, KV caches): 0 once every runtime's arrays are freed."""
    import mlx.core as mx

    return round(mx.get_active_memory() / 2**20, 1)


async def cycles(n: int, ckpt, residency: str, rows: list) -> None:
    from mach_runtime import Runtime

    for i in range(n):
        async with Runtime.open(ckpt, expert_residency=residency, max_batch=2) as rt:
            await rt.generate("def add(a, b):", max_tokens=8)
        rows.append({"cycle": i + 1, "threads": os_threads(), "rss_mb": round(rss_mb(), 1),
                     "gc_frozen": gc.get_freeze_count(), "mlx_active_mb": mlx_active_mb(),
                     "thread_names": thread_names()})


def main(argv=None) -> int:
    import anyio

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=8)
    ap.add_argument("--checkpoint", default=None, help="default: the bundled demo model")
    ap.add_argument("--residency", default="stacked", choices=["stacked", "streaming"])
    ap.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    ckpt = a.checkpoint
    if ckpt is None:
        from mach_runtime.assets import demo_model_path

        ckpt = str(demo_model_path())
    import mlx.core  # noqa: F401  (MLX's own threads exist before the first runtime: not a leak)

    rows = [{"cycle": 0, "threads": os_threads(), "rss_mb": round(rss_mb(), 1), "gc_frozen": gc.get_freeze_count(),
             "mlx_active_mb": mlx_active_mb(), "thread_names": thread_names()}]
    anyio.run(cycles, a.cycles, ckpt, a.residency, rows, backend=a.backend)
    print(f"{'cycle':>5} {'threads':>8} {'rss MB':>8} {'gc frozen':>10} {'mlx active MB':>14}")
    for r in rows:
        print(f"{r['cycle']:>5} {r['threads']:>8} {r['rss_mb']:>8} {r['gc_frozen']:>10} {r['mlx_active_mb']:>14}")
    first, last = rows[1], rows[-1]
    summary = {"threads_after_first": first["threads"], "threads_after_last": last["threads"],
               "rss_after_first_mb": first["rss_mb"], "rss_after_last_mb": last["rss_mb"],
               "rss_growth_mb": round(last["rss_mb"] - first["rss_mb"], 1)}
    grown = {k: v - first["thread_names"].get(k, 0) for k, v in last["thread_names"].items()
             if v != first["thread_names"].get(k, 0)}
    summary["threads_grown_by_name"] = grown  # after the first cycle: empty when nothing leaks
    print(json.dumps(summary))
    if a.json:
        out = {"machine": _common.machine_info(), "args": vars(a), "rows": rows, "summary": summary}
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
