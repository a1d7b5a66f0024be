#!/usr/bin/env python3
"""P7: cold load time and peak memory of a large MoE checkpoint: streaming load_moe vs mlx_lm.load.

Each measurement runs in a fresh child process (``python bench/p7_load.py --child ...``), after the page cache
was dropped (``diskbw.drop_page_cache``: fadvise + ``echo 3 > /proc/sys/vm/drop_caches`` as root), so every
load is cold and every peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` in the child) is that engine's
alone. Children, alternated over ``--repeats``:

* ``streaming``: ``load_moe(LARGE, expert_residency="streaming", expert_cache_gb=--cache-gb, direct_io=True)``,
  then (first repeat only) ``--decode-tokens`` (8) greedy tokens to prove the model works (tok/s, hit rate);
* ``streaming_eager`` (the baseline "before", ``--eager-baseline``, on by default): the same load, then every
  bank slot array evaluated, as ``load_moe`` did before the bank was allocated lazily (``1f0f283``: the bank
  zero-filled at load, ~1.3 s and 1 GB per GiB of bank on the CPU);
* ``streaming_sidecar`` (with ``--sidecar DIR``, the same checkpoint after ``mach convert LARGE DIR``): the
  streaming load of the converted checkpoint (experts in one aligned extent each);
* ``*_before`` (with ``--before-src DIR``): the same streaming loads by an earlier ``mach_runtime`` (a snapshot:
  ``git archive REV mach_runtime | tar -x -C DIR``), run by children with ``PYTHONPATH=DIR``, interleaved with ours:
  before/after in one run;
* ``mlx_lm``: ``mlx_lm.load(LARGE)`` — the full, eager load (every weight read into memory); its decode only
  with ``--baseline-decode`` (on CPU the 30B-A3B shape decodes at ~0.04 tok/s). The full load needs the
  checkpoint's size + ``--headroom-gib`` of MemAvailable (17.2 GB + 3 GiB fits the 24 GiB dev machine when
  nothing else big runs); otherwise (``--mlx-lm auto``) it falls back to ``mlx_lm.load(LARGE, lazy=True)`` —
  which only builds the graph and reads no weights, so its time/RSS are NOT comparable and the output says
  so. ``--mlx-lm skip`` measures streaming only.

``--cache warm`` / ``both``: each streaming load also runs right after a cold one, without dropping the page cache
(``ENGINE@warm``). The disk's own O_DIRECT read rate (``diskbw.odirect_bandwidth``, sequential, 1 thread x 2 MiB
and 4 threads x 16 MiB, on the file holding the non-expert weights) is measured before and after the loads in the
same run, and the load floor printed: non-expert bytes (what a streaming load must read) / that rate.

The bank is allocated lazily (each layer's slots when that layer first runs), so neither load time nor RSS
before decoding grows with ``--cache-gb``; ``streaming_eager`` shows what they were when it was zero-filled.

Reported: load seconds (the load call alone, in the child, with mlx_lm / transformers / mach_runtime imported
before the clock for both engines), start->loaded seconds (from the parent's spawn: interpreter start, imports,
load), peak RSS after load and after decode, and the bank's share of it. Goal for streaming: load < 3 s,
RSS < 3 GB.

    python bench/p7_load.py                                   # /work/large_ckpt/qwen3-30b-a3b-shaped-4bit
    python bench/p7_load.py --ckpt DIR --cache-gb 2 --repeats 2
    python bench/p7_load.py --cache-gb 1 --mlx-lm skip --decode-tokens 0 --out bench/results/p7_load_1gib.json
    python bench/p7_load.py --sidecar /work/large_ckpt/qwen3-30b-a3b-shaped-4bit-sidecar --mlx-lm skip
    python bench/p7_load.py --sidecar /work/large_ckpt/qwen3-30b-a3b-shaped-4bit-sidecar --mlx-lm skip \
        --no-eager-baseline --decode-tokens 0 --cache both --repeats 3 --before-src /tmp/p7_before
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import _common as C

DEFAULT_CKPT = "/work/large_ckpt/qwen3-30b-a3b-shaped-4bit"
MARK = "P7_CHILD_RESULT "


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux: KiB


def current_rss_bytes() -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def child(a) -> dict:
    t_import = time.perf_counter()
    # The same imports for both engines, before the clock starts: load_moe would otherwise pay for importing
    # mlx_lm (and transformers, ~1-3 s cold) inside the timed call while mlx_lm.load would not.
    import mlx.core as mx
    import mlx_lm
    import mlx_lm.models.qwen3_moe  # noqa: F401
    from mlx_lm.models.cache import make_prompt_cache

    import mach_runtime.io.disk_switch_glu  # noqa: F401
    import mach_runtime.io.gather_switch_glu  # noqa: F401
    from mach_runtime import load_moe

    import mach_runtime

    out = dict(engine=a.child, mach_runtime=os.path.dirname(mach_runtime.__file__))
    base = a.child.removesuffix("_before")
    if base.startswith("streaming"):
        ckpt = a.sidecar if base == "streaming_sidecar" else a.ckpt
        t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
        model, tok, store, cache = load_moe(ckpt, expert_residency="streaming", expert_cache_gb=a.cache_gb,
                                            direct_io=True)
        if base == "streaming_eager":  # before the lazy bank: every slot array allocated and zero-filled
            mx.eval(model.parameters())
        out["load_seconds"] = time.perf_counter() - t0
        # CPU the load used: all threads (reads' page-cache copies and page faults included), the calling thread
        out["load_cpu_seconds"], out["load_main_thread_cpu_seconds"] = time.process_time() - c0, time.thread_time() - m0
        st = store.stats()
        out.update(capacity_experts=st.capacity_experts, experts_total=st.layers * st.num_experts,
                   expert_bytes=st.expert_bytes, expert_cache_gb=a.cache_gb,
                   bank_bytes=st.capacity_experts * st.expert_bytes)
    else:
        t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
        model, tok = mlx_lm.load(a.ckpt, lazy=(a.child == "mlx_lm_lazy"))
        out["load_seconds"] = time.perf_counter() - t0
        out["load_cpu_seconds"], out["load_main_thread_cpu_seconds"] = time.process_time() - c0, time.thread_time() - m0
        store = None
        cache = make_prompt_cache(model)
    out["import_seconds"] = t0 - t_import
    out["spawn_to_loaded_seconds"] = time.time() - a.spawn_time  # interpreter start + imports + load
    out["peak_rss_after_load"] = peak_rss_bytes()
    out["rss_after_load"] = current_rss_bytes()
    try:
        out["mlx_peak_memory"] = mx.get_peak_memory()
    except AttributeError:  # pragma: no cover
        pass

    if a.decode_tokens and (base == "streaming" or (a.child == "mlx_lm" and a.baseline_decode)):
        from mach_runtime.engine.generate import GenerationStats, generate_tokens, make_sampler

        ids = C.make_prompt(tok, a.prompt_tokens)
        gs = GenerationStats()
        t0 = time.perf_counter()
        toks, times = C.timed_tokens(generate_tokens(model, ids, cache, make_sampler(0.0), a.decode_tokens, gs),
                                     a.decode_tokens)
        out.update(decode_tokens=len(toks), tokens=toks, ttft=times[0] - t0, decode_tps=C.decode_tps(times),
                   generate_seconds=times[-1] - t0)
        if store is not None:
            s = store.stats()
            out.update(hit_rate=s.hit_rate, bytes_read=s.bytes_read, misses=s.misses, read_seconds=s.read_seconds)
        out["peak_rss_after_decode"] = peak_rss_bytes()
    if store is not None:
        store.close()
    return out


def spawn(engine, a, decode=True, cold=True) -> dict:
    base = engine.removesuffix("_before")
    ckpt = a.sidecar if base == "streaming_sidecar" else a.ckpt
    drop = C.drop_caches(C.safetensors_files(ckpt)) if cold else "warm: not dropped"
    env = dict(os.environ)
    if engine.endswith("_before"):  # the earlier mach_runtime first on the path
        env["PYTHONPATH"] = os.pathsep.join(x for x in (a.before_src, env.get("PYTHONPATH")) if x)
    cmd = [sys.executable, __file__, "--child", engine, "--ckpt", a.ckpt, "--cache-gb", str(a.cache_gb),
           "--sidecar", str(a.sidecar),
           "--decode-tokens", str(a.decode_tokens if decode else 0), "--prompt-tokens", str(a.prompt_tokens),
           "--spawn-time", repr(time.time())] + (["--baseline-decode"] if a.baseline_decode else [])
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
    if p.returncode != 0 or not lines:
        print(p.stdout[-3000:], p.stderr[-3000:], file=sys.stderr)
        return dict(engine=engine, error=f"child exited {p.returncode}", stderr_tail=p.stderr[-2000:],
                    process_wall_seconds=wall, drop_caches=drop)
    r = json.loads(lines[-1][len(MARK):])
    r.update(process_wall_seconds=wall, drop_caches=drop, loadavg=os.getloadavg())
    return r


def non_expert_file_and_bytes(ckpt) -> tuple[str, int]:
    """The bytes a streaming load must read (every non-expert tensor) and the file holding most of them."""
    from mach_runtime.io.arch_registry import adapter_for_config, read_config
    from mach_runtime.io.expert_sidecar import expert_layout_for
    from mach_runtime.io.safetensors_index import CheckpointIndex

    src = str(Path(ckpt) / "config.json")
    config = read_config(ckpt)
    adapter = adapter_for_config(config, src)
    index = CheckpointIndex(ckpt)
    tc = adapter.resolve_config(adapter.text_config(config, src), index.__contains__)
    layout = expert_layout_for(ckpt, index, adapter, tc, src)
    per_file: dict[str, int] = {}
    for name, t in index.tensors.items():
        if name not in layout.expert_tensor_names:
            per_file[t.file] = per_file.get(t.file, 0) + t.nbytes
    return max(per_file, key=per_file.get), sum(per_file.values())


def disk_rate(path) -> dict:
    """The disk's own O_DIRECT read rate on ``path`` (cold), sequential: 1 thread x 2 MiB, 4 threads x 16 MiB."""
    from diskbw import odirect_bandwidth

    out = {}
    for threads, block in ((1, 2 << 20), (4, 16 << 20)):
        C.drop_caches([path])
        total = min(os.path.getsize(path), 1 << 30) // block * block
        r = odirect_bandwidth(path, block_bytes=block, total_bytes=total, pattern="sequential", threads=threads)
        out[f"{threads}x{block >> 20}MiB"] = dict(mb_per_s=r["mb_per_s"], mode=r.get("mode"))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=DEFAULT_CKPT)
    p.add_argument("--cache-gb", type=float, default=2.0, help="streaming bank budget (GiB, all layers)")
    p.add_argument("--decode-tokens", type=int, default=8, help="decoded in the first repeat only")
    p.add_argument("--prompt-tokens", type=int, default=2,
                   help="short: on CPU a 30B-A3B-shaped 4-bit forward takes seconds per token")
    p.add_argument("--baseline-decode", action="store_true",
                   help="also decode after mlx_lm.load (slow on CPU: ~26 s/token seen for the 30B-A3B shape)")
    p.add_argument("--spawn-time", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--mlx-lm", choices=["auto", "full", "lazy", "skip"], default="auto")
    p.add_argument("--headroom-gib", type=float, default=3.0)
    p.add_argument("--sidecar", default="", help="the checkpoint converted by `mach convert` (also measured)")
    p.add_argument("--before-src", default="", help="a directory holding an earlier mach_runtime package (git "
                   "archive REV mach_runtime | tar -x -C DIR): its streaming loads run too, interleaved ('_before')")
    p.add_argument("--cache", choices=["cold", "warm", "both"], default="cold",
                   help="page cache before each streaming load: dropped (cold), warm from the cold load just before, "
                        "or both")
    p.add_argument("--no-disk", dest="disk", action="store_false", help="skip the disk's O_DIRECT figure")
    p.add_argument("--no-eager-baseline", dest="eager", action="store_false",
                   help="skip streaming_eager (the bank zero-filled at load, as before the lazy bank)")
    p.add_argument("--child", choices=["streaming", "streaming_eager", "streaming_sidecar", "streaming_before",
                                       "streaming_eager_before", "streaming_sidecar_before", "mlx_lm", "mlx_lm_lazy"],
                   help=argparse.SUPPRESS)
    p.add_argument("--out", default=C.default_out("p7_load"))
    a = p.parse_args()
    if a.child:
        print(MARK + json.dumps(child(a)), flush=True)
        return

    info = C.machine_info()
    ckpt_bytes = C.checkpoint_bytes(a.ckpt)
    avail = C.mem_available_gib()
    need = ckpt_bytes / (1 << 30) + a.headroom_gib
    mode = a.mlx_lm
    if mode == "auto":
        mode = "full" if avail >= need else "lazy"
    reason = (f"MemAvailable {avail:.1f} GiB vs checkpoint {ckpt_bytes / (1 << 30):.1f} GiB + "
              f"{a.headroom_gib:g} GiB headroom -> mlx_lm {mode}")
    print(f"[p7] {info}\n[p7] {a.ckpt}: {ckpt_bytes / 1e9:.2f} GB; {reason}", flush=True)
    streaming = ["streaming"] + (["streaming_eager"] if a.eager else []) + (["streaming_sidecar"] if a.sidecar else [])
    if a.before_src:
        if not (Path(a.before_src) / "mach_runtime" / "__init__.py").is_file():
            p.error(f"--before-src {a.before_src}: no mach_runtime package there (git archive REV mach_runtime | tar "
                    f"-x -C {a.before_src})")
        streaming = [x for e in streaming for x in (e, e + "_before")]
    engines = streaming + {"full": ["mlx_lm"], "lazy": ["mlx_lm_lazy"], "skip": []}[mode]
    temps = {"cold": [True], "warm": [False], "both": [True, False]}[a.cache]
    keys = [e + ("" if cold else "@warm") for e in engines for cold in (temps if e.startswith("streaming") else [True])]

    ne_file, ne_bytes = non_expert_file_and_bytes(a.sidecar or a.ckpt)
    runs = {k: [] for k in keys}
    payload = dict(benchmark="p7_load", machine=info, checkpoint=a.ckpt, checkpoint_bytes=ckpt_bytes,
                   sidecar=a.sidecar, before_src=a.before_src, non_expert_bytes=ne_bytes, cache_gb=a.cache_gb,
                   mlx_lm_mode=mode, mlx_lm_mode_reason=reason, loadavg_start=os.getloadavg(), runs=runs)
    if a.disk:
        payload["disk_before"] = disk_rate(ne_file)
        print(f"[p7] disk O_DIRECT on {ne_file}: {payload['disk_before']}", flush=True)
    for r in range(a.repeats):
        for e in (engines if r % 2 == 0 else engines[::-1]):
            for cold in (temps if e.startswith("streaming") else [True]):
                res = spawn(e, a, decode=(r == 0 and cold), cold=cold)  # decode once per engine: it works
                key = e + ("" if cold else "@warm")
                runs[key].append(res)
                if "error" in res:
                    print(f"[p7] rep {r} {key}: ERROR {res['error']}", flush=True)
                else:
                    cpu = res.get("load_cpu_seconds", 0)
                    print(f"[p7] rep {r} {key}: load {res['load_seconds']:.2f} s (CPU {cpu:.2f} "
                          f"s, calling thread {res.get('load_main_thread_cpu_seconds', 0):.2f} s), wall "
                          f"{res['process_wall_seconds']:.2f} s, peak RSS {res['peak_rss_after_load'] / 1e9:.2f} GB"
                          + (f", decode {res['decode_tps']:.2f} tok/s" if "decode_tps" in res else "")
                          + (f", hit {res['hit_rate']:.3f}" if "hit_rate" in res else "")
                          + f", loadavg {res['loadavg'][0]:.1f}", flush=True)
                C.write_json(a.out, payload)
    if a.disk:
        payload["disk_after"] = disk_rate(ne_file)
        print(f"[p7] disk O_DIRECT on {ne_file}: {payload['disk_after']}", flush=True)
    payload["loadavg_end"] = os.getloadavg()

    def med(e, key):
        xs = [x[key] for x in runs[e] if key in x]
        return C.median(xs) if xs else float("nan")

    summary = []
    for e in keys:
        ok = [x for x in runs[e] if "error" not in x]
        if not ok:
            summary.append(dict(engine=e, error=runs[e][0]["error"] if runs[e] else "not run"))
            continue
        summary.append(dict(engine=e, load_seconds=med(e, "load_seconds"), wall_seconds=med(e, "process_wall_seconds"),
                            spawn_to_loaded_seconds=med(e, "spawn_to_loaded_seconds"),
                            import_seconds=med(e, "import_seconds"), load_cpu_seconds=med(e, "load_cpu_seconds"),
                            load_main_thread_cpu_seconds=med(e, "load_main_thread_cpu_seconds"),
                            peak_rss_after_load=med(e, "peak_rss_after_load"),
                            peak_rss_after_decode=med(e, "peak_rss_after_decode"),
                            decode_tps=med(e, "decode_tps"), ttft=med(e, "ttft"), hit_rate=med(e, "hit_rate"),
                            runs=len(ok)))
    payload["summary"] = summary
    s0 = next((x for x in summary if x["engine"] == ("streaming_sidecar" if a.sidecar else "streaming")), summary[0])
    payload["goals"] = dict(streaming_load_lt_1s=s0.get("load_seconds", 99) < 1,
                            streaming_rss_lt_1_5gb=s0.get("peak_rss_after_load", 1e12) < 1.5e9)
    C.write_json(a.out, payload)

    names = {"streaming": f"load_moe streaming ({a.cache_gb:g} GiB bank, lazy)",
             "streaming_eager": "load_moe streaming, bank zero-filled at load",
             "streaming_sidecar": "load_moe streaming, `mach convert` sidecar", "mlx_lm": "mlx_lm.load (full)",
             "mlx_lm_lazy": "mlx_lm.load(lazy=True) (NOT comparable: reads no weights)"}

    def label_of(key):
        e, _, warm = key.partition("@")
        before = e.endswith("_before")
        return (names[e.removesuffix("_before")] + (f" [before: {a.before_src}]" if before else "")
                + (" [warm page cache]" if warm else " [cold]" if e.startswith("streaming") else ""))

    rows = []
    for s in summary:
        if "error" in s:
            rows.append([label_of(s["engine"]), "ERROR", s["error"]] + [""] * 8)
            continue
        f = lambda v, fmt: "-" if v != v else fmt.format(v)  # NaN -> "-"
        bank = [x.get("bank_bytes", float("nan")) for x in runs[s["engine"]] if "error" not in x][0]
        rows.append([label_of(s["engine"]), f(s["load_seconds"], "{:.2f}"),
                     f(s["load_cpu_seconds"], "{:.2f}") + " / " + f(s["load_main_thread_cpu_seconds"], "{:.2f}"),
                     f(s["spawn_to_loaded_seconds"], "{:.2f}"),
                     f(s["peak_rss_after_load"] / 1e9, "{:.2f}"), f(bank / 1e9, "{:.2f}"),
                     f(s["peak_rss_after_decode"] / 1e9, "{:.2f}"),
                     f(s["ttft"], "{:.1f}"), f(s["decode_tps"], "{:.3f}"), f(s["hit_rate"], "{:.3f}")])
    where = info.get("gpu") or info["cpu_model"]
    print(f"\nP7 cold load of {a.ckpt} ({ckpt_bytes / 1e9:.1f} GB) ({info['backend']}: {where}; mlx {info['mlx']}); "
          f"fresh process each, page cache dropped before each; median of {a.repeats}; streaming then decodes "
          f"{a.decode_tokens} greedy tokens after a {a.prompt_tokens}-token prompt")
    print(C.fmt_table(["engine", "load s", "load CPU s (all / calling thread)", "start->loaded s", "peak RSS GB",
                       "of which bank GB",
                       "peak RSS GB +decode", "TTFT s", "decode tok/s", "hit rate"], rows))
    print("load s: the load call alone (mlx_lm/transformers/mach_runtime imported before the clock, for both); "
          "start->loaded s: from the parent's spawn to the loaded model (interpreter start, imports, load)")
    for when in ("disk_before", "disk_after"):
        if when in payload:
            print(f"disk O_DIRECT ({when.split('_')[1]} the loads): "
                  + ", ".join(f"{k}: {v['mb_per_s']:.0f} MB/s" for k, v in payload[when].items()))
    if a.disk:
        rates = [v["mb_per_s"] for w in ("disk_before", "disk_after") for v in payload[w].values()]
        payload["read_floor_seconds"] = dict(best=ne_bytes / max(rates) / 1e6, median=ne_bytes / C.median(rates) / 1e6)
        print(f"load floor: {ne_bytes / 1e9:.3f} GB of non-expert weights must be read: "
              f"{payload['read_floor_seconds']['best']:.2f} s at the best O_DIRECT rate measured "
              f"({max(rates):.0f} MB/s), {payload['read_floor_seconds']['median']:.2f} s at the median")
        C.write_json(a.out, payload)
    print(f"load average: start {payload['loadavg_start'][0]:.1f}, end {payload['loadavg_end'][0]:.1f}")
    print(f"goals (streaming): load < 1 s: {payload['goals']['streaming_load_lt_1s']}, "
          f"RSS < 1.5 GB: {payload['goals']['streaming_rss_lt_1_5gb']}   [{reason}]")
    print(f"json: {a.out}")


if __name__ == "__main__":
    main()
