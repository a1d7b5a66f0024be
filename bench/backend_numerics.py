"""The arithmetic of the current MLX backend, measured against MLX's CPU (exact float32 products): float32 matmul
(TF32 or not), gather_mm, quantize / dequantize, quantized_matmul and gather_qmm at the tiny test models' shapes,
each twice (determinism). Prints one line per check and writes JSON. The tolerance rule in docs/testing.md is
derived from these numbers.

    python bench/backend_numerics.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os

import mlx.core as mx
import numpy as np

CPU = mx.cpu


def rel(a, b) -> float:
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.max(np.abs(a - b)) / max(1e-30, np.max(np.abs(b))))


def same(a, b) -> bool:
    return bool(np.array_equal(np.array(a), np.array(b), equal_nan=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []

    def row(name, **kw):
        rows.append({"check": name, **kw})
        print(name, " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items()),
              flush=True)

    print("mlx", mx.__version__, mx.default_device(), "MLX_ENABLE_TF32", os.environ.get("MLX_ENABLE_TF32"))
    mx.random.seed(0)
    b = mx.array(np.arange(256, dtype=np.uint8))
    for dt in (mx.float32, mx.bfloat16, mx.float16):
        f = mx.from_fp8(b, dtype=dt)
        row("from_fp8", asked=str(dt), got=str(f.dtype),
            equals_cpu=same(f.astype(mx.float32), mx.from_fp8(b, dtype=dt, stream=CPU).astype(mx.float32)))
    # quantized KV attention as mlx-lm runs it (--kv-bits): queries [B, H, L, D] against quantized keys [B, H, S, D]
    for dt in (mx.float32, mx.bfloat16):
        for L in (1, 11):
            keys = mx.random.normal((1, 2, 11, 32))
            qk = mx.quantize(keys, 32, 4)
            qs = mx.random.normal((1, 2, L, 32)).astype(dt)
            try:
                s = mx.quantized_matmul(qs, *qk, transpose=True, group_size=32, bits=4)
                want = mx.matmul(qs.astype(mx.float32), mx.dequantize(*qk, 32, 4, stream=CPU).swapaxes(-1, -2),
                                 stream=CPU)
                row("qmm_batched_kv", dtype=str(dt), L=L, rel=rel(s.astype(mx.float32), want))
            except Exception as e:  # noqa: BLE001
                row("qmm_batched_kv", dtype=str(dt), L=L, error=str(e)[:120])
    for K in (32, 64, 128, 1024):
        a = mx.random.normal((16, K))
        b = mx.random.normal((K, 64)) / K**0.5
        g1, g2 = a @ b, a @ b
        row("matmul_f32", K=K, rel=rel(g1, mx.matmul(a, b, stream=CPU)), deterministic=same(g1, g2))
    for dt in (mx.bfloat16, mx.float16):
        a = mx.random.normal((16, 128)).astype(dt)
        b = (mx.random.normal((128, 64)) / 128**0.5).astype(dt)
        row(f"matmul_{dt}", rel=rel((a @ b).astype(mx.float32),
                                    mx.matmul(a, b, stream=CPU).astype(mx.float32)))
    # gather_mm as mlx-lm's SwitchGLU calls it: x [T, 1, 1, K], w [E, N, K]^T, indices [T, k]
    E, k, T = 8, 2, 16
    for K in (32, 64):
        x = mx.random.normal((T, 1, 1, K))
        w = mx.random.normal((E, 64, K)) / K**0.5
        idx = mx.random.randint(0, E, (T, k)).astype(mx.uint32)
        g = mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=idx)
        row("gather_mm_f32", K=K, rel=rel(g, mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=idx, stream=CPU)),
            vs_matmul=rel(g, mx.matmul(x, w[idx].swapaxes(-1, -2))))
    # quantize on the device vs the CPU, then quantized_matmul / gather_qmm against dequantized CPU matmuls
    # nvfp4 dequantized with its tensor scale on the device vs the CPU (test_nvfp4_global_scale's reference), and
    # the float32 matmul with bf16 weights that the dequantized nvfp4 attention of that test runs
    for K in (64, 128):
        w = mx.random.normal((4, 128, K)) / K**0.5
        g = mx.array([0.05, 0.09, 0.2, 1.0])
        wq, sc = mx.quantize(w, 16, 4, mode="nvfp4", stream=CPU)
        for e in range(2):
            dg = mx.dequantize(wq[e], sc[e], None, 16, 4, mode="nvfp4", global_scale=g[e])
            dc = mx.dequantize(wq[e], sc[e], None, 16, 4, mode="nvfp4", global_scale=g[e], stream=CPU)
            row("dequantize_nvfp4_global_scale", K=K, expert=e, dtype=str(dg.dtype), rel=rel(dg, dc))
        # as mlx-lm writes it (quantized with the expert's max |w| as the tensor scale: block scales up to 448), with
        # and without dtype=float32 (MLX 0.32.4 CUDA, H200: 1.8e-3..2.9e-3 without, exact with; docs/testing.md)
        gm = mx.max(mx.abs(w), axis=(-2, -1))
        for e in range(2):
            q = mx.quantize(w[e], 16, 4, mode="nvfp4", global_scale=gm[e], stream=CPU)
            dc = mx.dequantize(q[0], q[1], None, 16, 4, mode="nvfp4", global_scale=gm[e], stream=CPU)
            for kw in ({}, {"dtype": mx.float32}):
                dg = mx.dequantize(q[0], q[1], None, 16, 4, mode="nvfp4", global_scale=gm[e], **kw)
                row("dequantize_nvfp4_global_scale_mlx_lm", K=K, expert=e, dtype_arg=str(kw.get("dtype")),
                    rel=rel(dg, dc))
        wb = mx.dequantize(wq[0], sc[0], None, 16, 4, mode="nvfp4", stream=CPU)  # bf16, exact
        x = mx.random.normal((16, K))
        row("matmul_f32_x_bf16_w", K=K, w_dtype=str(wb.dtype),
            rel=rel(x @ wb.T, mx.matmul(x, wb.astype(mx.float32).T, stream=CPU)))
    for mode, bits, group in (("affine", 4, 32), ("affine", 8, 32), ("affine", 4, 64), ("affine", 4, 128),
                              ("affine", 8, 128), ("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)):
        for K, N in ((32, 64), (64, 64), (128, 64), (128, 128), (128, 256)):  # N % 128 == 0: other kernels
            if K % group:
                continue
            w = mx.random.normal((N, K)) / K**0.5
            q = mx.quantize(w, group, bits, mode=mode)
            qc = mx.quantize(w, group, bits, mode=mode, stream=CPU)
            qsame = all(same(a, b) for a, b in zip(q, qc))
            wq, sc, bi = q[0], q[1], (q[2] if len(q) > 2 else None)
            deq = mx.dequantize(wq, sc, bi, group, bits, mode=mode, dtype=mx.float32, stream=CPU)
            for M in (1, 16):
                x = mx.random.normal((1, M, K))
                want = mx.matmul(x, deq.T, stream=CPU)
                try:
                    g1 = mx.quantized_matmul(x, wq, sc, bi, transpose=True, group_size=group, bits=bits, mode=mode)
                    g2 = mx.quantized_matmul(x, wq, sc, bi, transpose=True, group_size=group, bits=bits, mode=mode)
                    row("qmm", mode=mode, bits=bits, group=group, K=K, N=N, M=M, quantize_equals_cpu=qsame,
                        rel=rel(g1, want), deterministic=same(g1, g2))
                except Exception as e:  # noqa: BLE001 - a missing kernel is a finding
                    row("qmm", mode=mode, bits=bits, group=group, K=K, M=M, error=str(e)[:120])
            we = mx.random.normal((E, N, K)) / K**0.5
            qe = mx.quantize(we, group, bits, mode=mode)
            wq, sc, bi = qe[0], qe[1], (qe[2] if len(qe) > 2 else None)
            deq = mx.dequantize(wq, sc, bi, group, bits, mode=mode, dtype=mx.float32, stream=CPU)
            for T in (1, 16, 40):
                x = mx.random.normal((T, 1, 1, K))
                idx = mx.random.randint(0, E, (T, k)).astype(mx.uint32)
                for srt in (False, True):
                    xs, ids = x, idx
                    if srt:
                        order = mx.argsort(idx.flatten())
                        xs, ids = x.flatten(0, -3)[order // k], idx.flatten()[order]
                    want = mx.matmul(xs, deq[ids].swapaxes(-1, -2), stream=CPU)
                    try:
                        g1 = mx.gather_qmm(xs, wq, sc, bi, rhs_indices=ids, transpose=True, group_size=group,
                                           bits=bits, mode=mode, sorted_indices=srt)
                        g2 = mx.gather_qmm(xs, wq, sc, bi, rhs_indices=ids, transpose=True, group_size=group,
                                           bits=bits, mode=mode, sorted_indices=srt)
                        row("gather_qmm", mode=mode, bits=bits, group=group, K=K, N=N, T=T, sorted=srt,
                            rel=rel(g1, want), deterministic=same(g1, g2))
                    except Exception as e:  # noqa: BLE001
                        row("gather_qmm", mode=mode, bits=bits, group=group, K=K, T=T, sorted=srt, error=str(e)[:120])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mlx": mx.__version__, "device": str(mx.default_device()),
                       "tf32_env": os.environ.get("MLX_ENABLE_TF32"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
