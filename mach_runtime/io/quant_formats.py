"""Quantized and low-precision weight formats: how each maps onto what MLX computes with.

* ``QuantSpec``: one projection's MLX format (affine 2-8 bit, mxfp4, nvfp4, mxfp8), recovered from shapes;
* released formats (DeepSeek-V4-Flash): FP4 e2m1 experts with ue8m0 scales *are* mxfp4 (the same bytes); FP8
  e4m3 experts with ue8m0 block scales become mxfp8 (block scales repeated per row and 32-wide group, exact);
  FP8 experts with float block scales (DeepSeek-V3 / Qwen3-FP8 ``weight_scale_inv``) are dequantized;
* non-expert FP8 / FP4 linears are dequantized at load (``dequantize_released``).

No MLX at import (the discovery commands use the layout side); ``dequantize_released`` imports it when called.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CheckpointError
from .safetensors_index import CheckpointIndex, TensorInfo

FLOAT_DTYPES = ("F32", "F16", "BF16")
E8M0_DTYPES = ("F8_E8M0", "U8")  # ue8m0 scales as released (F8_E8M0) or as raw bytes
BLOCKS = "blocks"  # transform prefix: ue8m0 block scales -> per-row, per-32 group scales ("blocks:bm:bk:out:in")
# transform prefix of float FP8 block scales: expanded to the full [out, in] and multiplied into the weight
# (``dequant:bm:bk:out:in``); the weight (F8_E4M3) is then held as float
DEQUANT = "dequant"


MX_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "U32": "uint32", "U8": "uint8",
             "F8_E4M3": "bfloat16"}  # FP8 experts with float block scales are held dequantized (bf16 by default)


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    mode: str = "affine"


def block_size(tc: dict, out_dim: int, in_dim: int, grid: tuple[int, ...]) -> tuple[int, int] | None:
    """(rows, cols) of an FP8 weight's scale blocks: ``quantization_config.weight_block_size`` when the config
    gives one, else what the scale grid implies (128 x 128 when it fits, as DeepSeek ships them)."""
    qc = tc.get("quantization_config") if isinstance(tc.get("quantization_config"), dict) else {}
    candidates = [tuple(qc["weight_block_size"])] if qc.get("weight_block_size") else [(128, 128)]
    if len(grid) == 2 and out_dim % grid[0] == 0 and in_dim % grid[1] == 0:
        candidates.append((out_dim // grid[0], in_dim // grid[1]))
    for bm, bk in candidates:
        if len(grid) == 2 and grid == (-(-out_dim // bm), -(-in_dim // bk)):
            return int(bm), int(bk)
    return None


def released_format(name, w: TensorInfo, w_shape, s: TensorInfo, s_shape, out_dim, in_dim, tc, transform):
    """Low-precision weights as released (FP8 / FP4 with ue8m0 scales) -> (weight dtype, weight shape, scale
    dtype, scale shape, scale transform, QuantSpec) in MLX's mxfp8 / mxfp4 layout, or None for MLX layouts."""
    if transform or len(w_shape) != 2 or len(s_shape) != 2:
        return None
    fp8 = w.dtype == "F8_E4M3"
    fp4 = w.dtype in ("I8", "U8") and s.dtype in E8M0_DTYPES and w_shape[-1] * 2 == in_dim
    if not (fp8 or fp4):
        return None
    if s.dtype not in E8M0_DTYPES:
        if not fp8 or s.dtype not in FLOAT_DTYPES or tuple(w_shape) != (out_dim, in_dim):
            raise CheckpointError(
                f"{s.file}: expert tensor {name!r} is {w.dtype} with {s.dtype} scales ({s.name!r}); expected "
                "ue8m0 (F8_E8M0) scales, or float block scales for FP8 weights"
            )
        # DeepSeek-V3-style float block scales (``weight_scale_inv``): no exact MX layout -> dequantized to float
        block = block_size(tc, out_dim, in_dim, tuple(s_shape))
        if block is None:
            raise CheckpointError(
                f"{s.file}: FP8 expert scales {s.name!r} have shape {list(s_shape)}: not a block grid of a "
                f"[{out_dim}, {in_dim}] weight (quantization_config.weight_block_size gives the block size)"
            )
        return ("F8_E4M3", tuple(w_shape), s.dtype, tuple(s_shape),
                f"{DEQUANT}:{block[0]}:{block[1]}:{out_dim}:{in_dim}", None)
    if in_dim % 32:
        raise CheckpointError(f"{w.file}: {name!r}: input dimension {in_dim} is not a multiple of 32 (mx formats)")
    if fp4:
        if tuple(s_shape) != (out_dim, in_dim // 32):
            raise CheckpointError(
                f"{s.file}: FP4 expert scales {s.name!r} have shape {list(s_shape)}, expected "
                f"{[out_dim, in_dim // 32]} (one ue8m0 scale per 32 inputs)"
            )
        return "U32", (out_dim, in_dim // 8), "U8", tuple(s_shape), "", QuantSpec(4, 32, "mxfp4")
    if tuple(w_shape) != (out_dim, in_dim):
        return None  # the shape check reports it
    block = block_size(tc, out_dim, in_dim, tuple(s_shape))
    if block is None or block[1] % 32:
        raise CheckpointError(
            f"{s.file}: FP8 expert scales {s.name!r} have shape {list(s_shape)}: not a block grid of a "
            f"[{out_dim}, {in_dim}] weight with blocks whose width is a multiple of 32"
        )
    bm, bk = block
    return ("U32", (out_dim, in_dim // 4), "U8", (out_dim, in_dim // 32), f"{BLOCKS}:{bm}:{bk}:{out_dim}:{in_dim}",
            QuantSpec(8, 32, "mxfp8"))


_SCALE_SUFFIXES = (".scale", ".weight_scale_inv")  # DeepSeek-V4 (ue8m0) / DeepSeek-V3-style (float) FP8 scales


def dequantize_released(weights: dict, index: CheckpointIndex, config: dict) -> dict:
    """Non-expert FP8 (``F8_E4M3`` + block ``.scale`` / ``.weight_scale_inv``) and FP4 (``I8`` e2m1 pairs + ue8m0
    ``.scale`` per 32 inputs) weights, dequantized to the checkpoint's float dtype at load (their modules are
    plain ``nn.Linear``s; README "Quantized checkpoints" gives the memory cost). Routed experts never come here:
    they stay packed as mxfp8 / mxfp4 (expert_layout)."""
    import mlx.core as mx

    floats = [v for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)]
    dtype = max(floats, key=lambda v: v.size).dtype if floats else mx.float32
    out = dict(weights)
    for name in weights:
        if not name.endswith(".weight") or index[name].dtype not in ("F8_E4M3", "I8"):
            continue
        base = name[: -len(".weight")]
        sname = next((base + x for x in _SCALE_SUFFIXES if base + x in weights), None)
        if sname is None:
            continue
        w, s, sdt = weights[name], weights[sname], index[sname].dtype
        if index[name].dtype == "I8":  # FP4: two e2m1 codes per byte (low nibble first) = MLX's mxfp4 packing
            if w.ndim != 2 or sdt not in E8M0_DTYPES or tuple(s.shape) != (w.shape[0], w.shape[1] // 16):
                raise CheckpointError(
                    f"{index[name].file}: FP4 tensor {name!r} {list(w.shape)} needs ue8m0 scales "
                    f"[{w.shape[0]}, {w.shape[1] // 16}] in {sname!r}, found {sdt} {list(s.shape)}"
                )
            deq = mx.dequantize(w.view(mx.uint32), s.view(mx.uint8), None, 32, 4, mode="mxfp4", dtype=mx.float32)
        else:
            rows, cols = w.shape
            block = block_size(config, rows, cols, tuple(s.shape)) if s.ndim == 2 else None
            if block is None:
                raise CheckpointError(
                    f"{index[sname].file}: FP8 scales {sname!r} {list(s.shape)} are not a block grid of the "
                    f"[{rows}, {cols}] weight {name!r} (quantization_config.weight_block_size says the block size)"
                )
            scale = mx.power(2.0, s.astype(mx.float32) - 127.0) if sdt in E8M0_DTYPES else s.astype(mx.float32)
            full = mx.repeat(mx.repeat(scale, block[0], axis=0)[:rows], block[1], axis=1)[:, :cols]
            deq = mx.from_fp8(w, dtype=mx.float32) * full
        out[name] = deq.astype(dtype)
        del out[sname]
    return out


_HELD_FLOAT_BYTES = 2  # dequantized weights are held in bf16 unless a float32 cast is asked for (CPU default)


def held_expert_bytes(layout) -> int:
    """Bytes the routed experts of every layer occupy once loaded (no MLX; for ``mach check``): as on disk, except
    ue8m0 FP8 block scales expanded per 32-wide group, float-scaled FP8 experts dequantized (bf16, their scales
    folded in) and nvfp4 tensor scales held per output row."""
    import math

    total = 0
    for src in layout.layers:
        per_expert = 0
        for c in src.components.values():
            if c.transform.startswith(DEQUANT + ":"):
                continue
            if c.dtype == "F8_E4M3":
                per_expert += math.prod(c.shape) * _HELD_FLOAT_BYTES
            elif c.transform.startswith(BLOCKS + ":"):
                _, _, _, out_dim, in_dim = c.transform.split(":")
                per_expert += int(out_dim) * (int(in_dim) // 32)
            elif c.comp == "global_scale":
                w = src.components[(c.part, "weight")]
                per_expert += 4 * ((c.rows[1] - c.rows[0]) if c.rows else w.shape[0])
            else:
                per_expert += c.nbytes
        total += per_expert * src.num_experts
    return total


def dequantized_non_expert_extra(index: CheckpointIndex, expert_names) -> int:
    """Extra bytes the non-expert FP8 / FP4 linears take once dequantized at load (bf16) over their disk bytes."""
    import math

    extra = 0
    for name, t in index.tensors.items():
        if name in expert_names or not name.endswith(".weight") or t.dtype not in ("F8_E4M3", "I8"):
            continue
        base = name[: -len(".weight")]
        scale = next((index[base + x] for x in _SCALE_SUFFIXES if base + x in index), None)
        if scale is None:
            continue
        elems = math.prod(t.shape) * (2 if t.dtype == "I8" else 1)
        extra += elems * _HELD_FLOAT_BYTES - t.nbytes - scale.nbytes
    return extra


def bank_expert_bytes(layout, target) -> int:
    """Bytes one expert occupies in memory once loaded (after any float cast), averaged over the MoE layers
    (mixed quantization gives layers different sizes; every layer has the same number of slots)."""
    import math

    import mlx.core as mx

    from .expert_layout import _transformed_shape as transformed_shape

    total = 0
    for src in layout.layers:
        for c in src.components.values():
            if multiplied(c):
                continue  # float FP8 block scales are multiplied into the weight, not held
            dt = getattr(mx, MX_DTYPES[c.dtype])
            if target is not None and mx.issubdtype(dt, mx.floating) and c.comp != "global_scale":
                dt = target
            total += math.prod(transformed_shape(c.shape, c.transform)) * dt.size
            if c.comp == "global_scale":  # held per output row
                total += (held_rows(src, c) - 1) * dt.size
    return -(-total // max(1, len(layout.layers)))


def multiplied(c) -> bool:
    """A component multiplied into its part's weight at load (float FP8 block scales: ``dequant:`` transform)."""
    return c.transform.startswith(DEQUANT + ":")


def held_rows(src, c) -> int:
    """Output rows of the part a component belongs to (a global scale is held once per row)."""
    if c.rows:
        return c.rows[1] - c.rows[0]
    from .expert_layout import _transformed_shape

    w = src.components[(c.part, "weight")]
    return _transformed_shape(w.shape, w.transform)[0]
