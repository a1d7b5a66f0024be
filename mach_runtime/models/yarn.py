"""transformers' YaRN rope frequencies (``_compute_yarn_parameters``), shared by the families that need them exactly.

mlx-lm's ``YarnRoPE`` always rounds the correction range to whole dimensions; transformers keeps the fractional
range when the config says ``"truncate": false`` (gpt-oss), which changes the frequencies inside the ramp.
"""

from __future__ import annotations

import math

import mlx.core as mx


def yarn_inv_freq(dims: int, base: float, factor: float, original_max: int, beta_fast: float, beta_slow: float,
                  truncate: bool = True) -> mx.array:
    """inv_freq [dims/2] of YaRN: each frequency blends the interpolated (1 / factor) and the original one over
    the ramp between the correction dimensions of ``beta_fast`` and ``beta_slow`` rotations."""

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
    return inv_inter * (1 - extrapolation) + inv_extra * extrapolation
