"""qwen3_moe (Qwen3-30B-A3B, Qwen3-235B-A22B): plain SwiGLU experts, standard KV cache.

Config spellings: transformers 5 saves ``num_experts`` as ``num_local_experts`` (its ``attribute_map``) and rope
as ``rope_parameters``; hub configs and transformers 4.x write ``num_experts`` and ``rope_theta``.
"""

from __future__ import annotations

from ..adapter import MoeArchAdapter
from ..expert_schemes import fused_scheme, per_expert_scheme, switch_scheme
from .config_rules import normalizer

# transformers' Qwen3MoeConfig.attribute_map {"num_experts": "num_local_experts"}: (alias, the name mlx-lm reads)
ALIASES = (("num_local_experts", "num_experts"),)
FIELDS = {
    "hidden_size": "pos_int", "num_hidden_layers": "pos_int", "num_attention_heads": "pos_int",
    "num_key_value_heads": "pos_int", "head_dim": "pos_int?", "vocab_size": "pos_int", "intermediate_size": "pos_int",
    "num_experts": "pos_int", "num_experts_per_tok": "pos_int", "moe_intermediate_size": "pos_int",
    "decoder_sparse_step": "pos_int?", "mlp_only_layers": "int_list?", "norm_topk_prob": "bool?",
    "rms_norm_eps": "pos_num?", "rope_theta": "pos_num", "max_position_embeddings": "pos_int?",
    "tie_word_embeddings": "bool?",
}


def _moe_layers(tc: dict) -> list[int]:
    """Layers whose MLP is routed: not in mlp_only_layers and on the decoder_sparse_step grid."""
    n = int(tc["num_hidden_layers"])
    only = set(tc.get("mlp_only_layers") or [])
    step = int(tc.get("decoder_sparse_step", 1) or 1)
    if int(tc.get("num_experts", 0) or 0) <= 0:
        return []
    return [i for i in range(n) if i not in only and (i + 1) % step == 0]


ADAPTER = MoeArchAdapter(
    key="qwen3_moe",
    model_types=("qwen3_moe",),
    model_module="mlx_lm.models.qwen3_moe",
    swiglu_variant="plain_swiglu",
    has_expert_bias=False,
    wrapped=False,
    stacked=True,
    kv_cache_kind="standard",
    specdec_kind="trim",
    default_bits=4,
    default_group=64,
    expert_schemes=(
        per_expert_scheme("model.layers.{layer}.mlp.experts"),  # HF hub
        switch_scheme("model.layers.{layer}.mlp.switch_mlp"),  # MLX exports
        fused_scheme("model.layers.{layer}.mlp.experts"),  # transformers 5 save_pretrained
    ),
    switch_module_template="model.layers.{layer}.mlp.switch_mlp",
    num_experts_field="num_experts",
    top_k_field="num_experts_per_tok",
    moe_intermediate_field="moe_intermediate_size",
    moe_layers=_moe_layers,
    compiled_verify=True,
    normalize=normalizer(aliases=ALIASES, fields=FIELDS),
)
