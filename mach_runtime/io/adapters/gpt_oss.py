"""gpt_oss (gpt-oss-20b / 120b): experts with biases and a clamped SwiGLU (``silu_limited``:
``(clip(up, ±limit) + 1) * g * sigmoid(alpha * g)``, ``g = min(gate, limit)``), attention sinks, sliding-window
and full attention layers alternating (rotating KV cache, keep=0).

HF bf16 layout (transformers ``GptOssExperts``): ``experts.gate_up_proj [E, H, 2I]`` — *transposed*, with gate and
up *interleaved* along the last axis (gate = ``[..., ::2]``, up = ``[..., 1::2]``) — ``gate_up_proj_bias [E, 2I]``
(interleaved), ``down_proj [E, I, H]`` (transposed), ``down_proj_bias [E, H]``. Each expert is still one
contiguous range; streaming transposes and de-interleaves it on the host. Hub checkpoints keep the experts in
mxfp4: ``gate_up_proj_blocks [E, 2I, H/32, 16]`` U8 (rows interleaved, not transposed; read as MLX's mxfp4 U32
weight), ``_scales``, ``_bias``. MLX exports use ``experts.gate_proj``…
"""

from __future__ import annotations

from ..adapter import MoeArchAdapter
from ..expert_schemes import fused_scheme, mxfp4_scheme, switch_scheme
from .config_rules import normalizer


def _moe_layers(tc: dict) -> list[int]:
    return list(range(int(tc["num_hidden_layers"])))


def _activation_params(tc: dict) -> dict:
    return {"alpha": float(tc.get("swiglu_alpha", 1.702)), "limit": float(tc.get("swiglu_limit", 7.0))}


def _model_config(config: dict, tc: dict) -> dict:
    """mlx-lm's gpt_oss reads ``layer_types`` only when it is a list (rope spellings: ``normalize``)."""
    tc = dict(tc)
    if tc.get("layer_types") is None:
        tc.pop("layer_types", None)
    return tc


# transformers' GptOssConfig.attribute_map {"num_experts": "num_local_experts"}: (alias, the name mlx-lm reads)
ALIASES = (("num_experts", "num_local_experts"),)
FIELDS = {
    "hidden_size": "pos_int", "num_hidden_layers": "pos_int", "num_attention_heads": "pos_int",
    "num_key_value_heads": "pos_int", "head_dim": "pos_int?", "vocab_size": "pos_int", "intermediate_size": "pos_int",
    "num_local_experts": "pos_int", "num_experts_per_tok": "pos_int", "sliding_window": "pos_int?",
    "layer_types": "str_list?", "rms_norm_eps": "pos_num?", "rope_theta": "pos_num?", "swiglu_limit": "pos_num?",
    "swiglu_alpha": "num?", "tie_word_embeddings": "bool?",
}


ADAPTER = MoeArchAdapter(
    key="gpt_oss",
    model_types=("gpt_oss",),
    model_module="mach_runtime.models.gpt_oss",  # mlx-lm's, with transformers' untruncated YaRN
    swiglu_variant="silu_limited",
    has_expert_bias=True,
    wrapped=False,
    stacked=True,
    kv_cache_kind="rotating",
    specdec_kind="trim",
    default_bits=4,  # upstream experts are mxfp4 (4-bit, group 32)
    default_group=32,
    expert_schemes=(
        fused_scheme("model.layers.{layer}.mlp.experts", transform_gate_up="t+deinterleave", transform_down="t"),
        mxfp4_scheme("model.layers.{layer}.mlp.experts"),  # hub checkpoints (mxfp4 experts)
        switch_scheme("model.layers.{layer}.mlp.experts"),
    ),
    switch_module_template="model.layers.{layer}.mlp.experts",
    num_experts_field="num_local_experts",
    top_k_field="num_experts_per_tok",
    moe_intermediate_field="intermediate_size",
    moe_layers=_moe_layers,
    model_config=_model_config,
    activation_params=_activation_params,
    rotating_keep=0,
    normalize=normalizer(aliases=ALIASES, fields=FIELDS),
)
