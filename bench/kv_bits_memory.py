"""KV memory with ``kv_bits`` (quantized KV) vs unquantized, on the bundled demo model, in one process.

    python bench/kv_bits_memory.py [--tokens 736] [--decode 32] [--out bench/results/kv_bits_memory.json]

For each setting (unquantized; kv_bits 8 and 4, group 64, quantized_kv_start 0) the model's own cache layout is
installed (``engine.kv_layout.apply_kv_layout``, what ``Runtime.open`` does) and a prompt of ``--tokens`` tokens
is prefilled, then ``--decode`` greedy tokens decoded. Reported per token of context: the live cache's bytes
(``nbytes`` of every layer: allocated buffers, which grow in 256-token steps, so ``--tokens`` is a multiple of
256), the prefix-cache snapshot's bytes (what L1 holds and an L2 file stores, ``Snapshot.nbytes``), the decode
speed (CPU: only the ratio within a run means anything) and how many of the greedy tokens equal the unquantized
run's. Plus the batch form: 4 rows merged into one ``BatchQuantKV``.
"""

from __future__ import annotations

import argparse
import time

import _common


def run(args) -> dict:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mach_runtime.assets import default_checkpoint
    from mach_runtime.engine.batch import merge_caches
    from mach_runtime.engine.kv_layout import apply_kv_layout
    from mach_runtime.engine.kv_snapshot import capture
    from mach_runtime.io.load import load_moe

    ckpt = default_checkpoint()
    rows, ref = [], None
    for bits in (None, 8, 4):
        model, tok, store, _ = load_moe(ckpt, expert_residency="stacked")
        apply_kv_layout(model, "standard", kv_bits=bits, kv_group_size=64, quantized_kv_start=0, head_dim=64)
        ids = _common.make_prompt(tok, args.tokens)
        cache = make_prompt_cache(model)
        logits = model(mx.array([ids[:-1]]), cache=cache)
        mx.eval([c.state for c in cache])
        out, t0 = [], None
        y = mx.array([[ids[-1]]])
        for i in range(args.decode + 1):
            logits = model(y, cache=cache)
            t = int(mx.argmax(logits[0, -1]).item())
            if i == 0:
                t0 = time.perf_counter()
            out.append(t)
            y = mx.array([[t]])
        tps = args.decode / (time.perf_counter() - t0)
        n = len(ids) + args.decode
        live = sum(c.nbytes for c in cache)
        snap = capture(cache, ids + out[:-1]).to_host()
        batch = merge_caches([cache] * 4)
        mx.eval([c.state for c in batch])
        batch_bytes = sum(c.nbytes for c in batch)
        ref = out if ref is None else ref
        rows.append({"kv_bits": bits or "-", "context": n, "live_bytes_per_token": round(live / n, 1),
                     "snapshot_bytes_per_token": round(snap.nbytes / n, 1),
                     "batch4_bytes_per_token": round(batch_bytes / (4 * n), 1), "decode_tok_s": round(tps, 1),
                     "greedy_equal": sum(a == b for a, b in zip(out, ref))})
        store.close()
        del model, cache, batch, snap
        _common.free_mlx()
    base = rows[0]
    for r in rows:
        r["live_vs_plain"] = round(r["live_bytes_per_token"] / base["live_bytes_per_token"], 3)
        r["snapshot_vs_plain"] = round(r["snapshot_bytes_per_token"] / base["snapshot_bytes_per_token"], 3)
    return {"machine": _common.machine_info(), "checkpoint": str(ckpt), "tokens": args.tokens,
            "decode": args.decode, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=736)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--out", default=_common.default_out("kv_bits_memory"))
    args = ap.parse_args()
    result = run(args)
    keys = ["kv_bits", "context", "live_bytes_per_token", "live_vs_plain", "snapshot_bytes_per_token",
            "snapshot_vs_plain", "batch4_bytes_per_token", "decode_tok_s", "greedy_equal"]
    print(_common.fmt_table(keys, [[r[k] for k in keys] for r in result["rows"]]))
    print("wrote", _common.write_json(args.out, result))


if __name__ == "__main__":
    main()
