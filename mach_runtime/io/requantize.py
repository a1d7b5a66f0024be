"""Re-quantization of one layer's experts for ``mach convert --q-bits/--q-mode`` (MLX on the calling thread).

Each projection part is read for every expert at once (``[E, ...]``) and brought to the engine's rows with the
layout's own transforms (``expert_bank.apply_transform``). Quantized parts are dequantized with their own format:
affine / mxfp4 / mxfp8 via ``mx.dequantize``, and FP8 with float block scales by multiplying. The weight is cast
to the part's float dtype and quantized with ``mx.quantize`` over the whole ``[E, out, in]`` stack, which is what
mlx-lm's ``quantize_model`` does to a ``SwitchLinear``. Biases keep their dtype.
"""

from __future__ import annotations

import numpy as np

from .quant_formats import DEQUANT, MX_DTYPES, QuantSpec
from .safetensors_index import DTYPES


def _to_mx(raw: np.ndarray, c, E: int):
    import mlx.core as mx

    a = mx.array(raw.view(DTYPES[c.dtype][1]).reshape(E, *c.shape))
    return a.view(mx.bfloat16) if c.dtype == "BF16" else a


def _bytes(a, E: int) -> np.ndarray:
    import mlx.core as mx

    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a)).reshape(E, -1).view(np.uint8)


def requantize_layer(src, q: QuantSpec, float_dtype, read) -> dict:
    """{(part, comp): uint8 [E, bytes per expert]} of the re-quantized layer. ``float_dtype(part)`` is the
    safetensors name of the dtype the part is quantized from; ``read(component)`` gives its raw bytes
    ``uint8 [E, nbytes]``."""
    import mlx.core as mx

    from .expert_bank import apply_transform

    E = src.num_experts
    out = {}
    for part in dict.fromkeys(c.part for c in src.components.values()):
        comps = {comp: c for (p, comp), c in src.components.items() if p == part}
        arrays = {comp: apply_transform(_to_mx(read(c), c, E), c.transform) for comp, c in comps.items()}
        w, have = arrays["weight"], src.quant_of(part)
        scales = comps.get("scales")
        if scales is not None and scales.transform.startswith(DEQUANT + ":"):  # FP8 x float block scales
            w = mx.from_fp8(w, dtype=mx.float32) * arrays["scales"].astype(mx.float32)
        elif have is not None:
            w = mx.dequantize(w, arrays["scales"], arrays.get("biases"), group_size=have.group_size, bits=have.bits,
                              mode=have.mode)
        w = w.astype(getattr(mx, MX_DTYPES[float_dtype(part)]))
        res = mx.quantize(w, group_size=q.group_size, bits=q.bits, mode=q.mode)
        mx.eval(res)
        out[(part, "weight")] = _bytes(res[0], E)
        out[(part, "scales")] = _bytes(res[1], E)
        if q.mode == "affine":
            out[(part, "biases")] = _bytes(res[2], E)
        if "bias" in arrays:
            out[(part, "bias")] = _bytes(arrays["bias"], E)
    return out
