"""deepseek_v4 (DeepSeek-V4-Flash / Pro): hash-routed MoE layers (``mlp_layer_types == "hash_moe"``: experts
picked by a frozen ``tid2eid[input_ids]`` table) followed by learned-routed layers (``sqrtsoftplus`` router with
``e_score_correction_bias``, hybrid routing), a shared expert, compressed sparse / heavily compressed attention
with a lightning indexer (compressed KV caches: not trimmable, not batchable), manifold-constrained
hyper-connections, and an MTP head (the speculative-decoding draft hook).

Upstream checkpoints store experts per expert (``layers.L.ffn.experts.{e}.w1/w3/w2``, gate/up/down); their
axis-0 stacked form (transformers' ``experts.gate_up_proj``) does not load directly and is sliced per expert.

Status: registered (detection, ``mach-archs``, ``mach check``) but not loadable yet: mlx-lm has no deepseek_v4
model (its ``deepseek_v41`` is a different architecture: no hash routing, engram layers) and ours is not written.
"""

from __future__ import annotations

from ..arch_registry import MoeArchAdapter
from ..expert_schemes import fused_scheme, per_expert_scheme


def _moe_layers(tc: dict) -> list[int]:
    return list(range(int(tc["num_hidden_layers"])))


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
        per_expert_scheme("model.layers.{layer}.mlp.experts"),
        fused_scheme("model.layers.{layer}.mlp.experts"),
    ),
    switch_module_template="model.layers.{layer}.mlp.experts.switch_mlp",
    num_experts_field="n_routed_experts",
    top_k_field="num_experts_per_tok",
    moe_intermediate_field="moe_intermediate_size",
    moe_layers=_moe_layers,
    implemented=False,
)
