"""deepseek_v4 (DeepSeek-V4-Flash / Pro): hash-routed MoE layers (``mlp_layer_types == "hash_moe"``: experts
picked by a frozen ``tid2eid[input_ids]`` table) followed by learned-routed layers (``sqrtsoftplus`` router with
``e_score_correction_bias``, hybrid routing), a shared expert, compressed sparse / heavily compressed attention
with a lightning indexer (compressed KV caches: not trimmable, not batchable; speculative decoding restores
snapshots), manifold-constrained hyper-connections, and an MTP head (the speculative-decoding draft hook).
The MLX model is ``mach_runtime.models.deepseek_v4`` (mlx-lm has none: its ``deepseek_v41`` is a different
architecture); ``load_v4_flash`` is the dedicated loader.

Upstream (hub) checkpoints store experts per expert (``layers.L.ffn.experts.{e}.w1/w3/w2``, gate/up/down); their
axis-0 stacked form (transformers' ``experts.gate_up_proj``) does not load directly and is sliced per expert.
transformers' ``save_pretrained`` writes the same names under ``model.``. The MTP block (``num_nextn_predict_layers``
of them, ``mtp.{i}.*`` on disk) is MoE layer ``num_hidden_layers + i``: its experts are swapped and streamed
like every layer's. Checkpoints without ``mtp.*`` tensors (transformers drops them) load without the block.
"""

from __future__ import annotations

import re

from ..adapter import MoeArchAdapter
from ..expert_schemes import fused_scheme, per_expert_scheme
from .config_rules import normalizer

# transformers' DeepseekV4Config.attribute_map: (alias, the name the model reads)
ALIASES = (("num_local_experts", "n_routed_experts"), ("intermediate_size", "moe_intermediate_size"))
FIELDS = {
    "hidden_size": "pos_int", "num_hidden_layers": "pos_int", "num_attention_heads": "pos_int?",  # ? = model default
    "head_dim": "pos_int?", "vocab_size": "pos_int?", "n_routed_experts": "pos_int", "num_experts_per_tok": "pos_int",
    "moe_intermediate_size": "pos_int", "q_lora_rank": "pos_int?", "o_groups": "pos_int?", "o_lora_rank": "pos_int?",
    "index_n_heads": "pos_int?", "index_head_dim": "pos_int?", "index_topk": "pos_int?", "hc_mult": "pos_int?",
    "sliding_window": "pos_int?", "num_nextn_predict_layers": "nonneg_int?", "layer_types": "str_list?",
    "mlp_layer_types": "str_list?", "rms_norm_eps": "pos_num?", "swiglu_limit": "pos_num?",
}


def _n_mtp(tc: dict) -> int:
    return int(tc.get("num_nextn_predict_layers") or 0)


def _moe_layers(tc: dict) -> list[int]:
    return list(range(int(tc["num_hidden_layers"]) + _n_mtp(tc)))


def _checkpoint_config(tc: dict, has_tensor) -> dict:
    """Keeps the MTP blocks the checkpoint has tensors for (``mtp.{i}.*``)."""
    n_mtp = 0
    while n_mtp < _n_mtp(tc) and (has_tensor(f"mtp.{n_mtp}.e_proj.weight")
                                  or has_tensor(f"mtp.{n_mtp}.e_proj.scales")):
        n_mtp += 1
    return tc if n_mtp == _n_mtp(tc) else {**tc, "num_nextn_predict_layers": n_mtp}


def _expert_tensor_alias(tc: dict):
    """Scheme names of MoE layer ``n + i`` (MTP block i) -> ``mtp.{i}.*``."""
    n = int(tc["num_hidden_layers"])

    def alias(name: str) -> str:
        m = re.match(r"^(?:model\.)?layers\.(\d+)\.(.*)$", name)
        if m and int(m.group(1)) >= n:
            return f"mtp.{int(m.group(1)) - n}.{m.group(2)}"
        return name

    return alias


def _activation_params(tc: dict) -> dict:
    """``silu(min(gate, limit)) * clip(up, -limit, limit)``: silu_limited with alpha 1 and no ``+1`` on up."""
    return {"alpha": 1.0, "limit": float(tc.get("swiglu_limit", 10.0)), "up_offset": 0.0}


ADAPTER = MoeArchAdapter(
    key="deepseek_v4",
    model_types=("deepseek_v4",),
    model_module="mach_runtime.models.deepseek_v4",
    swiglu_variant="silu_limited",  # SwiGLU with gate/up clipped at swiglu_limit
    has_expert_bias=False,
    wrapped=False,
    stacked=False,
    kv_cache_kind="compressed",
    specdec_kind="snapshot",  # compressed caches restore from snapshots; the MTP head drafts
    default_bits=4,
    default_group=32,
    expert_schemes=(
        per_expert_scheme("layers.{layer}.ffn.experts", gate="w1", up="w3", down="w2", name="upstream_per_expert"),
        per_expert_scheme("model.layers.{layer}.ffn.experts", gate="w1", up="w3", down="w2", name="hf_saved_per_expert"),
        per_expert_scheme("model.layers.{layer}.mlp.experts"),
        fused_scheme("model.layers.{layer}.mlp.experts"),
    ),
    switch_module_template="model.layers.{layer}.mlp.experts",
    num_experts_field="n_routed_experts",
    top_k_field="num_experts_per_tok",
    moe_intermediate_field="moe_intermediate_size",
    moe_layers=_moe_layers,
    activation_params=_activation_params,
    checkpoint_config=_checkpoint_config,
    expert_tensor_alias=_expert_tensor_alias,
    # its decoder layers output hc_mult residual streams [T, hc, H] (collapsed only by the final hc_head), and no
    # DFlash draft defines which [T, H] features to read from them
    hidden_taps=False,
    normalize=normalizer(aliases=ALIASES, rope=False, fields=FIELDS),  # the model reads both rope spellings
)
