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
