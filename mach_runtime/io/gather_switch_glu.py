"""GatherSwitchGLU: the routed-expert MLP over stacked expert weights (stacked residency).

Drop-in for mlx-lm's ``SwitchGLU``: ``__call__(x[..., D], indices[..., k]) -> y[..., k, D]``; the MoE block
applies routing weights and sums over k. Gate and up projections are fused into one ``[E, 2I, D]`` weight so a
token costs two gather matmuls instead of three. The same module computes over the expert *bank* in streaming
residency, where "experts" are bank slots (see ``disk_switch_glu.py``).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.activations import swiglu

from .expert_layout import QuantSpec

# prefill: sort (token, k) pairs by expert once there are this many, as mlx-lm does
SORT_THRESHOLD = 64
# ... except where all of a layer's experts fit in this many bytes (they stay in the GPU's L2 / the CPU's cache, so
# re-reading an expert per row costs nothing): there the sort's ~8 extra kernels are pure launch overhead, measured
# on an H100 (demo model, 2 MB of experts per layer): a 16-token verify 3.23 -> 2.85 ms. Sorting starts at
# SMALL_EXPERTS_SORT_THRESHOLD rows (prefill chunks) instead.
SMALL_EXPERTS_BYTES = 16 << 20
SMALL_EXPERTS_SORT_THRESHOLD = 256
# nvfp4 with a tensor ("global") scale g: weight = e2m1 * e4m3 block scale * g / (448 * 6) (MLX's dequantize)
NVFP4_GLOBAL_SCALE = 1.0 / (448.0 * 6.0)


class ExpertProjection(nn.Module):
    """One projection of E experts (or E bank slots): ``weight [E, out, in]`` or its quantized form."""

    def __init__(self, weight: mx.array, scales=None, biases=None, bias=None, quant: QuantSpec | None = None,
                 global_scale=None):
        super().__init__()
        self.weight = weight
        if scales is not None:
            self.scales = scales
        if biases is not None:
            self.biases = biases
        if global_scale is not None:  # nvfp4 tensor scale, one per (expert, output row): [E, out] float32
            self.global_scale = global_scale
        if bias is not None:
            self.bias = bias
        self.quant = quant

    def __call__(self, x: mx.array, idx: mx.array, sorted_indices: bool) -> mx.array:
        q = self.quant
        if q is not None:
            y = mx.gather_qmm(
                x,
                self["weight"],
                self["scales"],
                self.get("biases"),
                rhs_indices=idx,
                transpose=True,
                group_size=q.group_size,
                bits=q.bits,
                mode=q.mode,
                sorted_indices=sorted_indices,
            )
            if "global_scale" in self:
                # nvfp4's tensor scale multiplies every dequantized weight of an expert by g / (448 * 6), so it
                # scales the expert's output rows: applied here because gather_qmm takes it only on the GPU (and
                # gate and up, fused into one projection, have a scale each)
                y = y * mx.expand_dims(self["global_scale"][idx] * NVFP4_GLOBAL_SCALE, -2).astype(y.dtype)
        else:
            y = mx.gather_mm(x, self["weight"].swapaxes(-1, -2), rhs_indices=idx, sorted_indices=sorted_indices)
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][idx], -2)
        return y


class SplitProjection(nn.Module):
    """Gate and up as two projections when they are stored in different formats (per-module quantization, e.g.
    mlx-lm's dynamic_quant giving one of them more bits): the same ``[..., 2I]`` output as a fused projection."""

    def __init__(self, gate: ExpertProjection, up: ExpertProjection):
        super().__init__()
        self.gate = gate
        self.up = up

    def __call__(self, x: mx.array, idx: mx.array, sorted_indices: bool) -> mx.array:
        return mx.concatenate([self.gate(x, idx, sorted_indices), self.up(x, idx, sorted_indices)], axis=-1)


def silu_limited(gate, up, alpha: float = 1.702, limit: float = 7.0, up_offset: float = 1.0):
    """Clamped SwiGLU: ``(clip(up, -limit, limit) + up_offset) * g * sigmoid(alpha * g)``, ``g = min(gate, limit)``.

    gpt-oss: alpha 1.702, up_offset 1; DeepSeek-V4: alpha 1, up_offset 0 (``silu(min(gate, l)) * clip(up, +-l)``).
    """
    gate = mx.minimum(gate, limit)
    up = mx.clip(up, -limit, limit)
    if up_offset:
        up = up + up_offset
    return up * (gate * mx.sigmoid(alpha * gate))


def plain_geglu(gate, up):
    """Gemma's GeGLU: ``gelu_tanh(gate) * up``."""
    return nn.gelu_approx(gate) * up


ACTIVATIONS = {"plain_swiglu": swiglu, "silu_limited": silu_limited, "plain_geglu": plain_geglu}  # (gate, up)


def activation_for(variant: str, **params):
    try:
        fn = ACTIVATIONS[variant]
    except KeyError:
        raise NotImplementedError(f"swiglu variant {variant!r} has no activation yet") from None
    if params:
        return lambda gate, up: fn(gate, up, **params)
    return fn


def switch_glu(x, indices, gate_up: ExpertProjection, down: ExpertProjection, activation, inter: int,
               sort_threshold: int = SORT_THRESHOLD):
    """y[..., k, D] for tokens x[..., D] routed to ``indices[..., k]`` (rows of the projections); the (token, k)
    pairs are sorted by expert once there are ``sort_threshold`` of them."""
    x = mx.expand_dims(x, (-2, -3))
    indices = mx.stop_gradient(indices)
    do_sort = indices.size >= sort_threshold
    idx, inv_order = indices, None
    if do_sort:
        k = indices.shape[-1]
        flat = indices.flatten()
        order = mx.argsort(flat)
        inv_order = mx.argsort(order)
        x, idx = x.flatten(0, -3)[order // k], flat[order]
    h = gate_up(x, idx, do_sort)
    y = down(activation(h[..., :inter], h[..., inter:]), idx, do_sort)
    if do_sort:
        y = mx.unflatten(y[inv_order], 0, indices.shape)
    return y.squeeze(-2)


class GatherSwitchGLU(nn.Module):
    """All experts resident; gather (quantized) matmuls pick each token's experts."""

    def __init__(self, gate_up: ExpertProjection, down: ExpertProjection, swiglu_variant: str, inter: int, **act):
        super().__init__()
        self.gate_up = gate_up
        self.down = down
        self.inter = inter
        self.swiglu_variant = swiglu_variant
        self._activation = activation_for(swiglu_variant, **act)
        nbytes = sum(v.nbytes for _, v in tree_flatten(self.parameters()))
        self._sort_threshold = SMALL_EXPERTS_SORT_THRESHOLD if nbytes <= SMALL_EXPERTS_BYTES else SORT_THRESHOLD

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        return switch_glu(x, indices, self.gate_up, self.down, self._activation, self.inter, self._sort_threshold)
