"""The adapter base class: what the engine needs to know about one MoE family, as plain data.

Import-light (no MLX at module level). Each family's instance lives in ``adapters/<family>.py``; the registry
(``arch_registry.py``) collects them. This module imports neither, so an adapter module imports cleanly on its
own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import CheckpointError

SWIGLU_VARIANTS = ("plain_swiglu", "silu_limited", "plain_geglu")
KV_CACHE_KINDS = ("standard", "hybrid_gdn", "compressed", "rotating")


@dataclass(frozen=True)
class Capabilities:
    """What a family's caches and layers allow: THE table the Runtime, the scheduler and the speculative engines
    obey (``MoeArchAdapter.capabilities``; ``mach-archs`` prints it).

    batch: its prompt caches merge into batch caches per row (continuous batching); otherwise requests run one at
        a time, the others queued. spec_rollback: how a speculative verify is undone ("trim": every cache trims;
        "snapshot": some state is restored from a snapshot). spec_batch: batched verification can roll each row
        back alone (full-attention KV and GatedDeltaNet state only). hidden_taps: decoder layers output the [T, H]
        hidden states a DFlash draft reads. snapshot: its prompt cache can be saved and reloaded (sessions' KV
        and the disk prefix cache). compiled_verify: its decoder layers are the plain attention + MoE blocks
        ``specdec/compiled_verify.py`` compiles whole (qwen3_moe)."""

    family: str  # the registry key
    batch: bool
    batch_reason: str
    speculate: bool
    spec_rollback: str
    spec_batch: bool
    hidden_taps: bool
    snapshot: bool
    compiled_verify: bool = False


@dataclass(frozen=True)
class MoeArchAdapter:
    """What the engine needs to know about one MoE family.

    Expert tensor names are declared as ``ExpertScheme``s (``expert_schemes.py``): one per real on-disk layout
    (HF per-expert, HF fused 3-D, MLX ``switch_mlp`` stacked); the loader picks the one the checkpoint has.
    """

    key: str  # registry key
    model_types: tuple[str, ...]  # config.json model_type values this adapter accepts
    model_module: str  # module with the family's Model / ModelArgs classes
    swiglu_variant: str  # plain_swiglu | silu_limited | plain_geglu
    has_expert_bias: bool
    wrapped: bool  # config nested under text_config
    stacked: bool  # whether the upstream axis-0 stacked layout loads directly
    kv_cache_kind: str  # standard | hybrid_gdn | compressed | rotating
    specdec_kind: str  # how speculative decoding rolls back this family's caches
    default_bits: int  # default routed-expert quantization fallback
    default_group: int
    expert_schemes: tuple  # ExpertScheme, in detection order
    switch_module_template: str  # module path of the routed MLP in the MLX model, e.g. "model.layers.{layer}.mlp.switch_mlp"
    # config.json field names (after unwrapping text_config)
    num_experts_field: str
    top_k_field: str
    moe_intermediate_field: str
    moe_layers: Callable[[dict], list[int]] = field(compare=False, default=None)
    # the dict given to ModelArgs.from_dict: model_config(config, text_config); None -> the text config
    model_config: Callable[[dict, dict], dict] | None = field(compare=False, default=None)
    # extra keyword arguments of the expert activation, from the text config (e.g. gpt-oss's swiglu limit)
    activation_params: Callable[[dict], dict] | None = field(compare=False, default=None)
    # the text config adjusted to the checkpoint's tensors: checkpoint_config(tc, has_tensor) (deepseek_v4 drops
    # MTP layers whose tensors the checkpoint lacks); applied by load_moe and mach check before the layout
    checkpoint_config: Callable[[dict, Callable[[str], bool]], dict] | None = field(compare=False, default=None)
    # expert_tensor_alias(tc)(name): the checkpoint's name for a tensor name the schemes build (layers stored
    # under another prefix, e.g. deepseek_v4's MTP layer n+i under mtp.{i}); None: names as built
    expert_tensor_alias: Callable[[dict], Callable[[str], str]] | None = field(compare=False, default=None)
    rotating_keep: int = 0  # tokens a rotating KV cache keeps at the front (mlx-lm's RotatingKVCache keep)
    implemented: bool = True  # False: registered (metadata, mach check) but load_moe cannot build it yet
    unwrapped_model_types: tuple[str, ...] = ()  # text-only variants of a wrapped family (config not nested)
    # normalize(tc, source) -> tc: every spelling the family's configs use (transformers 4.x / 5.x aliases, rope
    # spellings) turned into the one the MLX ModelArgs reads, fields checked (adapters/config_rules.normalizer)
    normalize: Callable[[dict, str], dict] | None = field(compare=False, default=None)
    # checkpoint tensors that are not the text model (vision / audio towers): skipped at load with one log line
    skipped_prefixes: tuple[str, ...] = ()
    # weight_rename(config)(name): a non-expert tensor's name as the MLX model's sanitize expects it (text-only
    # checkpoints of wrapped families); None: names as stored
    weight_rename: Callable[[dict], Callable[[str], str] | None] | None = field(compare=False, default=None)
    notes: str = ""
    hidden_taps: bool = True  # decoder layers output [T, H] hidden states (what a DFlash draft reads)
    compiled_verify: bool = False  # plain attention + MoE decoder layers: the verify compiles whole

    def text_config(self, config: dict, source: str = "config.json") -> dict:
        """The model's own config dict, normalised and checked: unwrapped from ``text_config`` for wrapped
        families (a flat config of a wrapped family is accepted too), spelled as the family's MLX model reads it."""
        inner = config
        if self.wrapped and config.get("model_type") not in self.unwrapped_model_types:
            inner = config.get("text_config")
            if inner is None and "num_hidden_layers" in config:  # flat: the text settings at the top level
                inner = config
            if not isinstance(inner, dict):
                raise CheckpointError(
                    f"{source}: model_type {config.get('model_type')!r} keeps its settings under 'text_config', "
                    "which is missing or not a JSON object; use the checkpoint's original config.json"
                )
        return self.normalize(inner, source) if self.normalize else inner

    def rename_for(self, config: dict) -> Callable[[str], str] | None:
        return self.weight_rename(config) if self.weight_rename else None

    def required_int(self, text_config: dict, name: str, source: str = "config.json") -> int:
        value = text_config.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{source}: field {name!r} must be a positive integer, got {value!r}")
        return value

    def num_experts(self, tc: dict, source: str = "config.json") -> int:
        return self.required_int(tc, self.num_experts_field, source)

    def top_k(self, tc: dict, source: str = "config.json") -> int:
        return self.required_int(tc, self.top_k_field, source)

    def moe_intermediate(self, tc: dict, source: str = "config.json") -> int:
        return self.required_int(tc, self.moe_intermediate_field, source)

    def hidden_size(self, tc: dict, source: str = "config.json") -> int:
        return self.required_int(tc, "hidden_size", source)

    def resolve_config(self, tc: dict, has_tensor: Callable[[str], bool]) -> dict:
        return self.checkpoint_config(tc, has_tensor) if self.checkpoint_config else tc

    def model_args_dict(self, config: dict, tc: dict) -> dict:
        return self.model_config(config, tc) if self.model_config else tc

    def activation_kwargs(self, tc: dict) -> dict:
        return self.activation_params(tc) if self.activation_params else {}

    def continuous_batching(self) -> bool:
        """Whether the family's caches can be batched per row (see ``continuous_batching_capability``)."""
        return continuous_batching_capability(self.kv_cache_kind, self.rotating_keep)[0]

    def capabilities(self) -> Capabilities:
        """The family's capability table (see ``Capabilities``)."""
        batch, reason = continuous_batching_capability(self.kv_cache_kind, self.rotating_keep)
        return Capabilities(family=self.key, batch=batch, batch_reason=reason, speculate=True, spec_rollback=self.specdec_kind,
                            spec_batch=self.kv_cache_kind in ("standard", "hybrid_gdn"),
                            hidden_taps=self.hidden_taps, snapshot=self.kv_cache_kind != "compressed",
                            compiled_verify=self.compiled_verify)

    def model_classes(self):
        """(Model, ModelArgs) of the family (imports MLX)."""
        import importlib

        module = importlib.import_module(self.model_module)
        return module.Model, module.ModelArgs


def continuous_batching_capability(kv_cache_kind: str, keep: int = 0) -> tuple[bool, str]:
    """(possible, reason). The rule: batching needs caches that can be cloned and merged per row.

    * ``standard`` (KVCache) and ``hybrid_gdn`` (KVCache + ArraysCache recurrent state): yes, both merge into
      batch caches;
    * ``compressed`` (DeepSeek-V4 compressed/indexed attention caches): no, they have no per-row merge;
    * ``rotating`` (sliding-window RotatingKVCache): only when ``keep == 0`` (no pinned prefix), because a
      batched rotating cache rotates every row identically.
    """
    if kv_cache_kind in ("standard", "hybrid_gdn"):
        return True, f"{kv_cache_kind} caches merge into batch caches"
    if kv_cache_kind == "compressed":
        return False, "compressed attention caches cannot be merged per row"
    if kv_cache_kind == "rotating":
        if keep == 0:
            return True, "rotating (sliding-window) caches with keep=0 batch"
        return False, f"rotating caches with keep={keep} cannot be batched (only keep=0)"
    return False, f"unknown kv_cache_kind {kv_cache_kind!r}"
