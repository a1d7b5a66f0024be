"""gpt_oss: mlx-lm's model with transformers' YaRN rope.

mlx-lm's ``YarnRoPE`` always rounds the YaRN correction range to whole dimensions (floor/ceil). gpt-oss configs say
``"truncate": false`` and transformers then keeps the fractional range, which changes the frequencies of the
dimensions inside the ramp (a visible logit difference against transformers on the tiny fixture). This module
recomputes the frequencies the way transformers does when ``truncate`` is false (``yarn.py``); everything else is
mlx-lm's.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.gpt_oss import Model as _MlxLmModel
from mlx_lm.models.gpt_oss import ModelArgs  # noqa: F401  (the adapter's ModelArgs)

from .yarn import yarn_inv_freq


def yarn_periods(dims: int, base: float, factor: float, original_max: int, beta_fast: float, beta_slow: float,
                 truncate: bool) -> mx.array:
    """1 / inv_freq of transformers' ``_compute_yarn_parameters`` (the ``freqs`` mx.fast.rope takes)."""
    return 1.0 / yarn_inv_freq(dims, base, factor, original_max, beta_fast, beta_slow, truncate)


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
