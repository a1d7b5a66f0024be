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
* ``mlx_lm``: ``mlx_lm.load(LARGE)`` — the full, eager load (every weight read into memory); its decode only
  with ``--baseline-decode`` (on CPU the 30B-A3B shape decodes at ~0.04 tok/s). The full load needs the
  checkpoint's size + ``--headroom-gib`` of MemAvailable (17.2 GB + 3 GiB fits the 24 GiB dev machine when
  nothing else big runs); otherwise (``--mlx-lm auto``) it falls back to ``mlx_lm.load(LARGE, lazy=True)`` —
  which only builds the graph and reads no weights, so its time/RSS are NOT comparable and the output says
  so. ``--mlx-lm skip`` measures streaming only.

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
"""

from __future__ import annotations

import argparse
import json
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

    out = dict(engine=a.child)
    if a.child.startswith("streaming"):
        ckpt = a.sidecar if a.child == "streaming_sidecar" else a.ckpt
        t0 = time.perf_counter()
        model, tok, store, cache = load_moe(ckpt, expert_residency="streaming", expert_cache_gb=a.cache_gb,
                                            direct_io=True)
        if a.child == "streaming_eager":  # before the lazy bank: every slot array allocated and zero-filled
            mx.eval(model.parameters())
        out["load_seconds"] = time.perf_counter() - t0
        st = store.stats()
        out.update(capacity_experts=st.capacity_experts, experts_total=st.layers * st.num_experts,
                   expert_bytes=st.expert_bytes, expert_cache_gb=a.cache_gb,
                   bank_bytes=st.capacity_experts * st.expert_bytes)
    else:
        t0 = time.perf_counter()
        model, tok = mlx_lm.load(a.ckpt, lazy=(a.child == "mlx_lm_lazy"))
        out["load_seconds"] = time.perf_counter() - t0
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

    if a.decode_tokens and (a.child == "streaming" or (a.child == "mlx_lm" and a.baseline_decode)):
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


def _files(ckpt) -> list[str]:
    side = Path(ckpt) / "experts.mach"
    return C.safetensors_files(ckpt) + ([str(side)] if side.exists() else [])


def spawn(engine, a, decode=True) -> dict:
    drop = C.drop_caches(_files(a.sidecar if engine == "streaming_sidecar" else a.ckpt))
    cmd = [sys.executable, __file__, "--child", engine, "--ckpt", a.ckpt, "--cache-gb", str(a.cache_gb),
           "--sidecar", str(a.sidecar),
           "--decode-tokens", str(a.decode_tokens if decode else 0), "--prompt-tokens", str(a.prompt_tokens),
           "--spawn-time", repr(time.time())] + (["--baseline-decode"] if a.baseline_decode else [])
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
    if p.returncode != 0 or not lines:
        print(p.stdout[-3000:], p.stderr[-3000:], file=sys.stderr)
        return dict(engine=engine, error=f"child exited {p.returncode}", stderr_tail=p.stderr[-2000:],
                    process_wall_seconds=wall, drop_caches=drop)
    r = json.loads(lines[-1][len(MARK):])
    r.update(process_wall_seconds=wall, drop_caches=drop)
    return r


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
    p.add_argument("--no-eager-baseline", dest="eager", action="store_false",
                   help="skip streaming_eager (the bank zero-filled at load, as before the lazy bank)")
    p.add_argument("--child", choices=["streaming", "streaming_eager", "streaming_sidecar", "mlx_lm", "mlx_lm_lazy"],
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
    engines = (["streaming"] + (["streaming_eager"] if a.eager else []) + (["streaming_sidecar"] if a.sidecar else [])
               + {"full": ["mlx_lm"], "lazy": ["mlx_lm_lazy"], "skip": []}[mode])

    runs = {e: [] for e in engines}
    payload = dict(benchmark="p7_load", machine=info, checkpoint=a.ckpt, checkpoint_bytes=ckpt_bytes,
                   cache_gb=a.cache_gb, mlx_lm_mode=mode, mlx_lm_mode_reason=reason, runs=runs)
    for r in range(a.repeats):
        for e in (engines if r % 2 == 0 else engines[::-1]):
            res = spawn(e, a, decode=(r == 0))  # decode once per engine: it proves the model works
            runs[e].append(res)
            if "error" in res:
                print(f"[p7] rep {r} {e}: ERROR {res['error']}", flush=True)
            else:
                print(f"[p7] rep {r} {e}: load {res['load_seconds']:.2f} s, wall {res['process_wall_seconds']:.2f} s, "
                      f"peak RSS {res['peak_rss_after_load'] / 1e9:.2f} GB"
                      + (f", decode {res['decode_tps']:.2f} tok/s" if "decode_tps" in res else "")
                      + (f", hit {res['hit_rate']:.3f}" if "hit_rate" in res else ""), flush=True)
            C.write_json(a.out, payload)

    def med(e, key):
        xs = [x[key] for x in runs[e] if key in x]
        return C.median(xs) if xs else float("nan")

    summary = []
    for e in engines:
        ok = [x for x in runs[e] if "error" not in x]
        if not ok:
            summary.append(dict(engine=e, error=runs[e][0]["error"] if runs[e] else "not run"))
            continue
        summary.append(dict(engine=e, load_seconds=med(e, "load_seconds"), wall_seconds=med(e, "process_wall_seconds"),
                            spawn_to_loaded_seconds=med(e, "spawn_to_loaded_seconds"),
                            import_seconds=med(e, "import_seconds"),
                            peak_rss_after_load=med(e, "peak_rss_after_load"),
                            peak_rss_after_decode=med(e, "peak_rss_after_decode"),
                            decode_tps=med(e, "decode_tps"), ttft=med(e, "ttft"), hit_rate=med(e, "hit_rate"),
                            runs=len(ok)))
    payload["summary"] = summary
    s0 = summary[0]
    payload["goals"] = dict(streaming_load_lt_1s=s0.get("load_seconds", 99) < 1,
                            streaming_rss_lt_1_5gb=s0.get("peak_rss_after_load", 1e12) < 1.5e9)
    C.write_json(a.out, payload)

    label = {"streaming": f"load_moe streaming ({a.cache_gb:g} GiB bank, lazy)",
             "streaming_eager": "load_moe streaming, bank zero-filled at load (before)",
             "streaming_sidecar": "load_moe streaming, `mach convert` sidecar", "mlx_lm": "mlx_lm.load (full)",
             "mlx_lm_lazy": "mlx_lm.load(lazy=True) (NOT comparable: reads no weights)"}
    rows = []
    for s in summary:
        if "error" in s:
            rows.append([label[s["engine"]], "ERROR", s["error"]] + [""] * 7)
            continue
        f = lambda v, fmt: "-" if v != v else fmt.format(v)  # NaN -> "-"
        bank = [x.get("bank_bytes", float("nan")) for x in runs[s["engine"]] if "error" not in x][0]
        rows.append([label[s["engine"]], f(s["load_seconds"], "{:.2f}"), f(s["spawn_to_loaded_seconds"], "{:.2f}"),
                     f(s["peak_rss_after_load"] / 1e9, "{:.2f}"), f(bank / 1e9, "{:.2f}"),
                     f(s["peak_rss_after_decode"] / 1e9, "{:.2f}"),
                     f(s["ttft"], "{:.1f}"), f(s["decode_tps"], "{:.3f}"), f(s["hit_rate"], "{:.3f}")])
    where = info.get("gpu") or info["cpu_model"]
    print(f"\nP7 cold load of {a.ckpt} ({ckpt_bytes / 1e9:.1f} GB) ({info['backend']}: {where}; mlx {info['mlx']}); "
          f"fresh process each, page cache dropped before each; median of {a.repeats}; streaming then decodes "
          f"{a.decode_tokens} greedy tokens after a {a.prompt_tokens}-token prompt")
    print(C.fmt_table(["engine", "load s", "start->loaded s", "peak RSS GB", "of which bank GB",
                       "peak RSS GB +decode", "TTFT s", "decode tok/s", "hit rate"], rows))
    print("load s: the load call alone (mlx_lm/transformers/mach_runtime imported before the clock, for both); "
          "start->loaded s: from the parent's spawn to the loaded model (interpreter start, imports, load)")
    print(f"goals (streaming): load < 1 s: {payload['goals']['streaming_load_lt_1s']}, "
          f"RSS < 1.5 GB: {payload['goals']['streaming_rss_lt_1_5gb']}   [{reason}]")
    print(f"json: {a.out}")


if __name__ == "__main__":
    main()
