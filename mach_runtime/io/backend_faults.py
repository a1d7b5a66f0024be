"""Routes around MLX kernels that compute wrong results on a backend; each is pinned by a minimal repro in
``tests/test_backend_faults.py`` (which starts failing once MLX fixes the kernel, so the detour can go).

MLX 0.32.4 CUDA on Hopper (H200): ``quantized_matmul`` of an affine layer holding ONE quantization group per
output row (``group_size >=`` the input width, the width a multiple of 64) dispatches every call with more than one
row (prefill, verify blocks) to a kernel that returns wrong values that change from run to run, NaN at times
(measured: rel. error 1.0-1.4 at M=16 for widths 64/64 and 128/128, 4 and 8 bits; one row and narrower groups
are exact). Only layers narrower than their group hit it — in practice the 8-bit group-64 routers mlx-lm writes
for hidden sizes of 64 (the tiny test models), never a released checkpoint (input widths of 1024 and more).
Those layers are held dequantized on CUDA: the exact float weights the quantized matmul multiplies by, so the
model computes the same function.
"""

from __future__ import annotations


def _one_group_per_row(m) -> bool:
    import mlx.nn as nn

    if not isinstance(m, nn.QuantizedLinear) or getattr(m, "mode", "affine") != "affine":
        return False
    width = m.weight.shape[-1] * 32 // m.bits
    return width % 64 == 0 and m.group_size >= width


def dequantize_one_group_rows(model) -> list[str]:
    """On MLX's CUDA backend, replaces each affine ``QuantizedLinear`` with one group per row by an ``nn.Linear``
    of its dequantized weights (same bias). Returns the paths replaced (none on the CPU or Metal)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    if mx.default_device() != mx.gpu or not (hasattr(mx, "cuda") and mx.cuda.is_available()):
        return []
    swaps = []
    for path, m in model.named_modules():
        if _one_group_per_row(m):
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits, dtype=m.scales.dtype)
            lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            lin.weight = w
            if "bias" in m:
                lin.bias = m.bias
            swaps.append((path, lin))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return [p for p, _ in swaps]


# -- quantized KV attention (``kv_bits``) ------------------------------------------------------------------------
# MLX 0.32.4 CUDA has no ``quantized_matmul`` for the shapes mlx-lm's quantized SDPA multiplies a query block by a
# quantized KV cache with ("[quantized_matmul] No implementation for problem shape: 1x39x64x2, transpose: true,
# activation: float32, bits: 8, group size: 64": the cache hands attention a slice of its 256-row buffer). Where
# the backend lacks it, ``engine.quantized_kv``'s caches keep K/V quantized (same bytes, same snapshots) and hand
# attention the dequantized K/V instead, which the ordinary ``mx.fast.scaled_dot_product_attention`` takes: the
# same function (the dequantized values are what the quantized matmul multiplies by), float math in another order.
_KV_PROBES: dict = {}


def _cuda() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.gpu and hasattr(mx, "cuda") and mx.cuda.is_available()


def quantized_kv_attention_missing(bits: int, group_size: int) -> bool:
    """Whether the default device lacks the ``quantized_matmul`` kernels quantized KV attention needs at
    ``bits`` / ``group_size``: probed once per setting (MLX thread) on a GPU with the shapes mlx-lm's quantized SDPA
    uses (decode and prefill query blocks, against a slice of a larger quantized buffer, both products, float32 /
    bfloat16 / float16 activations); False on the CPU without probing (the quantized kernel stays the path)."""
    key = (int(bits), int(group_size))
    if key not in _KV_PROBES:
        _KV_PROBES[key] = _cuda() and not _kv_kernels_run(*key)
    return _KV_PROBES[key]


def _kv_kernels_run(bits: int, group_size: int) -> bool:
    import mlx.core as mx

    dim = max(64, group_size)
    try:
        for dtype in (mx.float32, mx.bfloat16, mx.float16):
            buf = mx.quantize(mx.ones((1, 2, 256, dim), dtype), group_size=group_size, bits=bits)
            kv = [a[..., :39, :] for a in buf]  # what a 256-row cache hands attention after 39 tokens
            for rows in (1, 16):
                scores = mx.quantized_matmul(mx.ones((1, 2, rows, dim), dtype), *kv, transpose=True,
                                             group_size=group_size, bits=bits)
                out = mx.quantized_matmul(scores, *kv, transpose=False, group_size=group_size, bits=bits)
                mx.eval(out)
    except (RuntimeError, ValueError):  # "[quantized_matmul] No implementation for problem shape ..."
        return False
    return True
