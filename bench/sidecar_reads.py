#!/usr/bin/env python3
"""Cold expert reads from a checkpoint as exported and from the same checkpoint after ``mach convert``.

Both are read by the engine's own reader (``ExpertReader``, O_DIRECT, ``--threads`` I/O threads). The same
``--experts`` random (layer, expert) pairs are read from each, in rounds of ``--batch`` experts (a token's
misses). Source: an MLX stacked export holds each expert as 9 slices (gate/up/down weight, scales, biases) of
stacked tensors, so every expert takes 9 reads. Sidecar: one aligned extent, so one read. The page cache is
dropped before each pass and the order alternates over ``--repeats``. Reported: reads issued per expert, MB/s
of wanted bytes, and the disk's own O_DIRECT figure (``diskbw``) in the same run.

    python bench/sidecar_reads.py SRC SIDECAR [--experts 512 --batch 8 --repeats 2]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import _common as C


def layout_of(path: str):
    from mach_runtime.io.arch_registry import adapter_for_config, read_config
    from mach_runtime.io.expert_sidecar import expert_layout_for
    from mach_runtime.io.safetensors_index import CheckpointIndex

    d = Path(path).resolve()
    config = read_config(d)
    adapter = adapter_for_config(config, str(d / "config.json"))
    tc = adapter.text_config(config)
    index = CheckpointIndex(d)
    return expert_layout_for(d, index, adapter, adapter.resolve_config(tc, index.__contains__), str(d))


def one_pass(path: str, picks, batch: int, threads: int) -> dict:
    from mach_runtime.io.expert_reader import ExpertReader

    layout = layout_of(path)
    files = sorted({f for src in layout.layers for c in src.components.values() for f, _ in c.sources[:1]})
    drop = C.drop_caches(files)
    reader = ExpertReader(threads, direct=True)
    calls = 0
    real = reader._read_range

    def counted(*a):
        nonlocal calls
        calls += 1
        return real(*a)

    reader._read_range = counted
    t0 = time.perf_counter()
    try:
        for i in range(0, len(picks), batch):
            reqs = [layout.layers[li].ranges(e) for li, e in picks[i : i + batch]]
            for _, _, bufs in reader.read_iter(reqs):
                reader.release(bufs)
        dt = time.perf_counter() - t0
    finally:
        reader.close()
    return dict(path=path, seconds=dt, bytes=reader.bytes_read, mb_s=reader.bytes_read / dt / 1e6,
                reads=calls, reads_per_expert=calls / len(picks), direct=reader.direct, drop_caches=drop)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src")
    p.add_argument("sidecar")
    p.add_argument("--experts", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=C.default_out("sidecar_reads"))
    a = p.parse_args()
    layout = layout_of(a.src)
    rng = random.Random(a.seed)
    picks = [(rng.randrange(len(layout.layers)), rng.randrange(layout.num_experts)) for _ in range(a.experts)]
    info = C.machine_info()
    print(f"[sidecar_reads] {info}", flush=True)
    from diskbw import odirect_bandwidth  # the disk's own O_DIRECT figure: 2 MiB random blocks, same threads

    f0 = C.safetensors_files(a.src)[0]
    C.drop_caches([f0])
    disk = odirect_bandwidth(f0, total_bytes=256 << 20, pattern="random", threads=a.threads)["mb_per_s"]
    runs = {"source": [], "sidecar": []}
    for r in range(a.repeats):
        for name in (("source", "sidecar") if r % 2 == 0 else ("sidecar", "source")):
            res = one_pass(a.src if name == "source" else a.sidecar, picks, a.batch, a.threads)
            runs[name].append(res)
            print(f"[sidecar_reads] rep {r} {name}: {res['mb_s']:.0f} MB/s, {res['reads_per_expert']:.1f} reads/expert",
                  flush=True)
    rows = []
    for name, rs in runs.items():
        rows.append([name, f"{C.median([x['mb_s'] for x in rs]):.0f}", f"{rs[0]['reads_per_expert']:.1f}",
                     f"{rs[0]['bytes'] / a.experts / 1e6:.2f}"])
    payload = dict(benchmark="sidecar_reads", machine=info, src=a.src, sidecar=a.sidecar, experts=a.experts,
                   batch=a.batch, threads=a.threads, disk=disk, runs=runs)
    C.write_json(a.out, payload)
    print(f"\n{a.experts} random experts, {a.batch} per round, {a.threads} threads, O_DIRECT, cold; median of "
          f"{a.repeats}; the disk's own O_DIRECT random 2 MiB reads: {disk:.0f} MB/s")
    print(C.fmt_table(["checkpoint", "MB/s", "reads / expert", "MB / expert"], rows))
    print(f"json: {a.out}")


if __name__ == "__main__":
    sys.exit(main())
