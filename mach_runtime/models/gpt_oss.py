"""gpt_oss: mlx-lm's model with transformers' YaRN rope.

mlx-lm's ``YarnRoPE`` always rounds the YaRN correction range to whole dimensions (floor/ceil). gpt-oss configs say
``"truncate": false`` and transformers then keeps the fractional range, which changes the frequencies of the
dimensions inside the ramp (measured: 4e-4 relative logit error on a tiny model). This module recomputes the
frequencies the way transformers does when ``truncate`` is false; everything else is mlx-lm's.
"""

from __future__ import annotations

import math

import mlx.core as mx
from mlx_lm.models.gpt_oss import Model as _MlxLmModel
from mlx_lm.models.gpt_oss import ModelArgs  # noqa: F401  (the adapter's ModelArgs)


def yarn_periods(dims: int, base: float, factor: float, original_max: int, beta_fast: float, beta_slow: float,
                 truncate: bool) -> mx.array:
    """1 / inv_freq of transformers' ``_compute_yarn_parameters`` (the ``freqs`` mx.fast.rope takes)."""

    def correction_dim(num_rotations):
        return (dims * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp
    pos_freqs = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (factor * pos_freqs)
    inv = inv_inter * (1 - extrapolation) + inv_extra * extrapolation
    return 1.0 / inv


class Model(_MlxLmModel):
    def __init__(self, args):
        super().__init__(args)
        sc = args.rope_scaling or {}
        kind = sc.get("rope_type", sc.get("type"))
        if kind == "yarn" and sc.get("truncate", True) is False:
            periods = yarn_periods(
                args.head_dim, float(args.rope_theta), float(sc["factor"]),
                int(sc.get("original_max_position_embeddings", 4096)), float(sc.get("beta_fast", 32)),
                float(sc.get("beta_slow", 1)), truncate=False,
            )
            for layer in self.model.layers:
                layer.self_attn.rope._freqs = periods
