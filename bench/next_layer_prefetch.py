#!/usr/bin/env python3
"""Next-layer prefetch (``io/next_layer_prefetch.py``) off vs on, in one process, on a trained router.

Streaming residency in sync mode (the per-layer path that reads misses), a bank of ``--slots`` per layer, the
held-out split teacher-forced one token per forward (``mach trace``'s segments), once with the prefetcher off
(``prefetch_mb=0``) and once on: the predictor's precision (predicted experts the next layer used), the misses
served from prefetched bytes instead of a disk wait, the read wait of the MLX thread, tok/s, and whether every
step's argmax was the same in both runs (it must: prefetch only stages bytes). Reads are O_DIRECT.

    python bench/next_layer_prefetch.py                       # the bundled demo model, 8 of 32 slots
    python bench/next_layer_prefetch.py --ckpt DIR --slots 32 --tokens 1024
"""

from __future__ import annotations

import argparse
import os
import time

import _common as C


def run(ckpt, segments, slots, mb):
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mach_runtime import load_moe

    os.environ["MACH_PREFETCH_MB"] = str(mb)  # read by load_moe (config.resolve_prefetch_bytes)
    model, _, store, _ = load_moe(str(ckpt), expert_residency="streaming", expert_slots=slots, direct_io=True)
    store.optimistic.enabled = False  # the path that reads misses (and predicts)
    argmax, n = [], 0
    t0 = time.perf_counter()
    for seg in segments:
        cache = make_prompt_cache(model)
        for t in seg:
            argmax.append(int(mx.argmax(model(mx.array([[t]]), cache=cache)[0, -1]).item()))
            n += 1
    dt = time.perf_counter() - t0
    s = store.stats()
    pf = store.next_layer.stats() if store.next_layer is not None else {}
    store.close()
    C.free_mlx()
    return dict(prefetch_mb=mb, tokens=n, seconds=dt, tps=n / dt, misses=s.misses, hits=s.hits, hit_rate=s.hit_rate,
                prefetched=s.prefetched, prefetch_used=s.prefetch_used, read_seconds=s.read_seconds,
                bytes_read=s.bytes_read, predictor=pf, argmax=argmax)


def main():
    from mach_runtime.assets import demo_model_path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=str(demo_model_path()))
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--mb", type=float, default=1.0, help="prefetch budget of the 'on' run (MB)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    a.out = a.out or C.default_out("next_layer_prefetch")
    from mach_runtime import load_moe
    from mach_runtime.cli.trace import heldout_segments

    _, tok, store, _ = load_moe(a.ckpt, expert_residency="streaming", expert_slots=a.slots)
    st = store.stats()
    store.close()
    segments = heldout_segments(tok, a.tokens, a.seq, a.ckpt)
    off = run(a.ckpt, segments, a.slots, 0)
    on = run(a.ckpt, segments, a.slots, a.mb)
    same = off["argmax"] == on["argmax"]
    info = C.machine_info()
    rows = []
    for r in (off, on):
        pf = r["predictor"]
        rows.append([f"{r['prefetch_mb']:g} MB", f"{r['tps']:.2f}", f"{r['hit_rate']:.3f}", r["misses"],
                     f"{pf.get('precision', float('nan')):.3f}", r["prefetched"], r["prefetch_used"],
                     f"{r['prefetch_used'] / r['misses']:.0%}" if r["misses"] else "-",
                     f"{r['read_seconds']:.2f}", f"{r['bytes_read'] / 1e6:.1f}"])
    C.write_json(a.out, dict(benchmark="next_layer_prefetch", machine=info, checkpoint=a.ckpt, slots=a.slots,
                             layers=st.layers, experts=st.num_experts, expert_bytes=st.expert_bytes,
                             runs=[off, on], same_argmax=same))
    print(f"\nNext-layer prefetch ({info['backend']}: {info.get('gpu') or info['cpu_model']}); {a.ckpt}: {st.layers} "
          f"layers x {st.num_experts} experts, bank {a.slots} slots/layer, {off['tokens']} held-out tokens "
          f"teacher-forced, sync path, O_DIRECT")
    print(C.fmt_table(["prefetch", "tok/s", "hit", "misses", "precision", "prefetched", "used", "misses from staging",
                       "read wait s", "MB read"], rows))
    print(f"same argmax at every step: {same}\njson: {a.out}")


if __name__ == "__main__":
    main()
