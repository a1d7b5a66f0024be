"""The architecture registry: one adapter per MoE family, and detection from ``config.json``.

Import-light on purpose: nothing here (or in ``adapters/``) imports MLX at module level, so the discovery
commands (``mach-archs``, ``mach check``) run on hosts without MLX. Adapters describe a family with plain data
(names of tensors, capability fields); the MLX-side pieces are imported only when a model is built.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import CheckpointError, CheckpointNotFoundError, UnsupportedArchError

SWIGLU_VARIANTS = ("plain_swiglu", "silu_limited", "plain_geglu")
KV_CACHE_KINDS = ("standard", "hybrid_gdn", "compressed", "rotating")


@dataclass(frozen=True)
class MoeArchAdapter:
    """What the engine needs to know about one MoE family.

    Tensor-name templates use ``{layer}``, ``{expert}`` and ``{proj}`` placeholders; the component suffix
    (``weight``, ``scales``, ``biases``, ``bias``) is appended by the loader.
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
    # expert tensor naming
    projections: tuple[str, ...]  # (gate, up, down) projection names, in that order
    per_expert_template: str  # e.g. "model.layers.{layer}.mlp.experts.{expert}.{proj}"
    stacked_template: str  # e.g. "model.layers.{layer}.mlp.switch_mlp.{proj}"
    switch_module_template: str  # module path of the routed MLP in the MLX model, e.g. "model.layers.{layer}.mlp.switch_mlp"
    # config.json field names (after unwrapping text_config)
    num_experts_field: str
    top_k_field: str
    moe_intermediate_field: str
    moe_layers: Callable[[dict], list[int]] = field(compare=False, default=None)

    def text_config(self, config: dict, source: str = "config.json") -> dict:
        """The model's own config dict (unwrapped from ``text_config`` for wrapped families)."""
        if not self.wrapped:
            return config
        inner = config.get("text_config")
        if not isinstance(inner, dict):
            raise CheckpointError(
                f"{source}: model_type {config.get('model_type')!r} keeps its settings under 'text_config', "
                "which is missing; use the checkpoint's original config.json"
            )
        return inner

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

    def model_classes(self):
        """(Model, ModelArgs) of the family (imports MLX)."""
        import importlib

        module = importlib.import_module(self.model_module)
        return module.Model, module.ModelArgs


def _load_adapters() -> dict[str, MoeArchAdapter]:
    from .adapters import ADAPTERS

    return {a.key: a for a in ADAPTERS}


REGISTRY: dict[str, MoeArchAdapter] = _load_adapters()


def supported_model_types() -> list[str]:
    return sorted({t for a in REGISTRY.values() for t in a.model_types})


def read_config(path: str | os.PathLike) -> dict:
    """Reads ``config.json`` (or the config.json inside a checkpoint directory) with clear errors."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise CheckpointNotFoundError(
            f"{path}: config.json not found; a checkpoint directory needs the model's config.json"
        )
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: config.json must hold a JSON object")
    return config


def adapter_for_config(config: dict, source: str = "config.json") -> MoeArchAdapter:
    model_type = config.get("model_type")
    if not model_type:
        raise CheckpointError(f"{source}: no 'model_type' field; cannot tell which architecture this is")
    for adapter in REGISTRY.values():
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchError(
        f"{source}: model_type {model_type!r} is not supported; supported model types: "
        f"{', '.join(supported_model_types())} (see `mach-archs`)"
    )


def detect_arch(config_json_path: str | os.PathLike) -> str:
    """Returns the registry key for the checkpoint whose ``config.json`` is given (a directory works too)."""
    config = read_config(config_json_path)
    return adapter_for_config(config, os.fspath(config_json_path)).key


def arch_summary(adapter: MoeArchAdapter) -> dict[str, Any]:
    """JSON-serialisable facts about one adapter (one row of ``mach-archs``)."""
    return {
        "arch": adapter.key,
        "model_type": adapter.model_types[0],
        "model_types": list(adapter.model_types),
        "swiglu": adapter.swiglu_variant,
        "stacked": adapter.stacked,
        "expert_bias": adapter.has_expert_bias,
        "wrapped": adapter.wrapped,
        "kv_cache_kind": adapter.kv_cache_kind,
        "specdec_kind": adapter.specdec_kind,
        "bits": adapter.default_bits,
        "group": adapter.default_group,
        "model_module": adapter.model_module,
    }


def registry_summary() -> list[dict[str, Any]]:
    """One ``arch_summary`` per registered architecture, sorted by key."""
    return [arch_summary(REGISTRY[k]) for k in sorted(REGISTRY)]
