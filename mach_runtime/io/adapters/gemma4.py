"""gemma4 (Gemma 4 MoE, e.g. 26B-A4B): config wrapped under ``text_config``; every layer runs a dense GeGLU MLP
*in parallel* with the routed GeGLU experts; sliding-window and full attention layers alternate (rotating
KV cache with keep=0 for the sliding layers).

HF checkpoints: ``model.language_model.layers.L.experts.gate_up_proj [E, 2I, H]`` (gate rows first) and
``experts.down_proj [E, H, I]``; MLX exports: ``language_model.model.layers.L.experts.switch_glu``.

Two layouts: multimodal (``Gemma4ForConditionalGeneration``: ``model_type: gemma4``, settings under
``text_config``, vision / audio towers under ``model.vision_tower.*`` ... skipped) and text-only
(``Gemma4ForCausalLM``: ``model_type: gemma4_text``, a flat config, weights under ``model.*``).
"""

from __future__ import annotations

from ..adapter import MoeArchAdapter
from ..expert_schemes import fused_scheme, switch_scheme
from .config_rules import normalizer

FIELDS = {
    "hidden_size": "pos_int", "num_hidden_layers": "pos_int", "num_attention_heads": "pos_int",
    "num_key_value_heads": "pos_int", "head_dim": "pos_int?", "global_head_dim": "pos_int?", "vocab_size": "pos_int?",
    "intermediate_size": "pos_int?", "num_experts": "pos_int?", "top_k_experts": "pos_int?",
    "moe_intermediate_size": "pos_int?", "sliding_window": "pos_int?", "layer_types": "str_list?",
    "rms_norm_eps": "pos_num?", "final_logit_softcapping": "pos_num?", "tie_word_embeddings": "bool?",
    "enable_moe_block": "bool?", "per_layer_config": "dict?",
}


def _weight_rename(config: dict):
    """Text-only checkpoints (``model.layers.*``): mlx-lm's gemma4 sanitize expects ``model.language_model.*``."""
    if config.get("model_type") != "gemma4_text":
        return None
    return lambda name: "model.language_model." + name[len("model."):] if name.startswith("model.") else name


def _moe_layers(tc: dict) -> list[int]:
    if not tc.get("enable_moe_block") or int(tc.get("num_experts") or 0) <= 0:
        return []
    return list(range(int(tc["num_hidden_layers"])))


def _model_config(config: dict, tc: dict) -> dict:
    """The dict mlx-lm's gemma4.ModelArgs reads.

    * mlx-lm overwrites ``text_config["vocab_size"]`` with the top-level one (default 262144): pass it.
    * transformers >= 5.2x writes the full-attention layers' head size / kv heads as ``per_layer_config``
      (``{"5": {"head_dim": 512, "num_key_value_heads": 2}}``); mlx-lm reads ``global_head_dim`` and
      ``num_global_key_value_heads`` (hub configs carry those).
    """
    tc = dict(tc)
    types = tc.get("layer_types") or []
    per_layer = tc.get("per_layer_config") or {}
    full = [v for k, v in per_layer.items() if int(k) < len(types) and types[int(k)] == "full_attention"]
    if full:
        if "global_head_dim" not in tc and "head_dim" in full[0]:
            tc["global_head_dim"] = full[0]["head_dim"]
        if "num_global_key_value_heads" not in tc and "num_key_value_heads" in full[0]:
            tc["num_global_key_value_heads"] = full[0]["num_key_value_heads"]
    return {"model_type": "gemma4", "text_config": tc, "vocab_size": tc.get("vocab_size", 262144)}


ADAPTER = MoeArchAdapter(
    key="gemma4",
    model_types=("gemma4", "gemma4_text"),
    unwrapped_model_types=("gemma4_text",),
    model_module="mlx_lm.models.gemma4",
    swiglu_variant="plain_geglu",
    has_expert_bias=False,
    wrapped=True,
    stacked=True,
    kv_cache_kind="rotating",
    specdec_kind="trim",  # KV + rotating caches trim while inside the window
    default_bits=4,
    default_group=64,
    expert_schemes=(
        fused_scheme("model.language_model.layers.{layer}.experts"),
        switch_scheme("language_model.model.layers.{layer}.experts.switch_glu"),
        fused_scheme("model.layers.{layer}.experts", name="hf_text_fused"),  # text-only (Gemma4ForCausalLM)
    ),
    switch_module_template="language_model.model.layers.{layer}.experts.switch_glu",
    num_experts_field="num_experts",
    top_k_field="top_k_experts",
    moe_intermediate_field="moe_intermediate_size",
    moe_layers=_moe_layers,
    model_config=_model_config,
    rotating_keep=0,
    normalize=normalizer(rope=False, fields=FIELDS),  # rope_parameters per layer type: read as they are
    skipped_prefixes=("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.",
                      "model.multi_modal_projector.", "vision_tower.", "audio_tower.", "multi_modal_projector."),
    weight_rename=_weight_rename,
)
