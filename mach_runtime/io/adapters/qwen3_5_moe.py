"""qwen3_5_moe (Qwen3.5 / Qwen3.6-35B-A3B): GatedDeltaNet linear attention + full attention every
``full_attention_interval``-th layer (hybrid_gdn cache: recurrent state, not trimmable), config wrapped under
``text_config``, every layer routed (plain SwiGLU) plus a sigmoid-gated shared expert.

HF checkpoints store experts fused: ``model.language_model.layers.L.mlp.experts.gate_up_proj [E, 2I, H]`` (gate
rows first) and ``experts.down_proj [E, H, I]``; MLX exports use ``language_model.model.layers.L.mlp.switch_mlp``.
transformers 5's ``save_pretrained`` writes the experts per expert (``experts.{e}.gate_proj.weight`` ...).

Two layouts: multimodal (``Qwen3_5MoeForConditionalGeneration``: ``model_type: qwen3_5_moe``, settings under
``text_config``, text weights under ``model.language_model.*``, vision tower under ``model.visual.*``, skipped) and
text-only (``Qwen3_5MoeForCausalLM``: ``model_type: qwen3_5_moe_text``, a flat config, weights under ``model.*``).
"""

from __future__ import annotations

from ...errors import CheckpointError
from ..adapter import MoeArchAdapter
from ..expert_schemes import fused_scheme, per_expert_scheme, switch_scheme
from .config_rules import normalizer

FIELDS = {
    "hidden_size": "pos_int", "num_hidden_layers": "pos_int", "num_attention_heads": "pos_int",
    "num_key_value_heads": "pos_int", "head_dim": "pos_int?", "vocab_size": "pos_int",
    "num_experts": "pos_int", "num_experts_per_tok": "pos_int", "moe_intermediate_size": "pos_int",
    "shared_expert_intermediate_size": "pos_int?", "linear_num_value_heads": "pos_int",
    "linear_num_key_heads": "pos_int", "linear_key_head_dim": "pos_int", "linear_value_head_dim": "pos_int",
    "linear_conv_kernel_dim": "pos_int", "full_attention_interval": "pos_int?", "layer_types": "str_list?",
    "rms_norm_eps": "pos_num?", "tie_word_embeddings": "bool?", "max_position_embeddings": "pos_int?",
}


def _moe_layers(tc: dict) -> list[int]:
    if int(tc.get("num_experts", 0) or 0) <= 0:
        return []
    return list(range(int(tc["num_hidden_layers"])))


def _full_attention_interval(tc: dict) -> int:
    """mlx-lm reads ``full_attention_interval``; transformers writes ``layer_types``. They must agree."""
    n = int(tc["num_hidden_layers"])
    types = tc.get("layer_types")
    interval = tc.get("full_attention_interval")
    if types is None:
        return int(interval or 4)
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    guess = full[0] + 1 if full else n + 1
    expected = ["full_attention" if (i + 1) % guess == 0 else "linear_attention" for i in range(n)]
    if list(types) != expected or (interval is not None and int(interval) != guess and full):
        raise CheckpointError(
            f"config.json: text_config.layer_types {types} is not 'full attention every N-th layer' "
            f"(full_attention_interval={interval}); the qwen3_5_moe model cannot express this schedule"
        )
    return guess


def _model_config(config: dict, tc: dict) -> dict:
    tc = dict(tc)
    tc["full_attention_interval"] = _full_attention_interval(tc)
    return {"model_type": "qwen3_5_moe", "text_config": tc}


_LM = "model.language_model.layers.{layer}.mlp"  # HF (multimodal)
_TEXT = "model.layers.{layer}.mlp"  # HF text-only (Qwen3_5MoeForCausalLM)
_MLX = "language_model.model.layers.{layer}.mlp"  # MLX exports (mlx-community)

ADAPTER = MoeArchAdapter(
    key="qwen3_5_moe",
    model_types=("qwen3_5_moe", "qwen3_5_moe_text"),
    unwrapped_model_types=("qwen3_5_moe_text",),
    model_module="mlx_lm.models.qwen3_5_moe",
    swiglu_variant="plain_swiglu",
    has_expert_bias=False,
    wrapped=True,
    stacked=True,
    kv_cache_kind="hybrid_gdn",
    specdec_kind="snapshot",  # GDN recurrent state: snapshot and restore, KV layers trim
    default_bits=4,
    default_group=64,
    expert_schemes=(
        fused_scheme(_LM + ".experts"),
        switch_scheme(_MLX + ".switch_mlp"),
        per_expert_scheme(_LM + ".experts"),  # transformers 5's save_pretrained, per-expert conversions
        per_expert_scheme(_TEXT + ".experts", name="hf_text_per_expert"),  # text-only
        fused_scheme(_TEXT + ".experts", name="hf_text_fused"),
    ),
    switch_module_template="language_model.model.layers.{layer}.mlp.switch_mlp",
    num_experts_field="num_experts",
    top_k_field="num_experts_per_tok",
    moe_intermediate_field="moe_intermediate_size",
    moe_layers=_moe_layers,
    model_config=_model_config,
    normalize=normalizer(fields=FIELDS),
    skipped_prefixes=("model.visual.", "visual.", "vision_tower."),
)
