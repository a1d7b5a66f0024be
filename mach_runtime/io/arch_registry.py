"""The architecture registry: one adapter per MoE family, and detection from ``config.json``.

Import-light on purpose: nothing here (or in ``adapters/``) imports MLX at module level, so the discovery
commands (``mach-archs``, ``mach check``) run on hosts without MLX. Adapters describe a family with plain data
(names of tensors, capability fields); the MLX-side pieces are imported only when a model is built.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import CheckpointError, CheckpointNotFoundError, ConfigError, UnsupportedArchError
from .adapter import KV_CACHE_KINDS, SWIGLU_VARIANTS, Capabilities, MoeArchAdapter, continuous_batching_capability

_MAX_CONFIG_BYTES = 16 << 20
__all__ = [
    "KV_CACHE_KINDS", "REGISTRY", "SWIGLU_VARIANTS", "Capabilities", "MoeArchAdapter", "adapter_for_config",
    "arch_summary", "capabilities_of", "continuous_batching_capability", "detect_arch", "read_config", "registry_summary", "supported_model_types",
]


def capabilities_of(model) -> Capabilities:
    """The capability table of a loaded model's family (by its ``model_type``); ``ConfigError`` for a model of no
    registered family."""
    found = None
    for m in (model, getattr(model, "language_model", None)):
        for t in (getattr(m, "model_type", None), getattr(getattr(m, "args", None), "model_type", None)):
            if found is None and isinstance(t, str):
                found = t
    for a in REGISTRY.values():
        if found is not None and (found in a.model_types or found in a.unwrapped_model_types
                                  or found.removesuffix("_text") in a.model_types):
            return a.capabilities()
    raise ConfigError(f"{found or type(model).__module__}: not a model of a registered MoE family; the engine "
                      f"supports {', '.join(REGISTRY)} (see mach-archs)")


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
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: config.json is not a regular file; put the model's config.json there")
    if os.path.getsize(path) > _MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: config.json is {os.path.getsize(path)} bytes, more than a config can be "
                              f"({_MAX_CONFIG_BYTES}); it is not the model's config.json")
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: config.json is not UTF-8 text ({e}); use the model's original "
                              "config.json") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: config.json is not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: config.json cannot be read ({e})") from None
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


def experts_and_top_k(directory: str | os.PathLike) -> tuple[int, int]:
    """(routed experts per layer, experts per token) of a checkpoint directory, read through its adapter (every
    config spelling the adapter accepts)."""
    config = read_config(directory)
    source = os.path.join(os.fspath(directory), "config.json")
    adapter = adapter_for_config(config, source)
    tc = adapter.text_config(config, source)
    return adapter.num_experts(tc, source), adapter.top_k(tc, source)


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
        "continuous_batching": adapter.continuous_batching(),
        "hidden_taps": adapter.hidden_taps,
        "implemented": adapter.implemented,
    }


def registry_summary() -> list[dict[str, Any]]:
    """One ``arch_summary`` per registered architecture, sorted by key."""
    return [arch_summary(REGISTRY[k]) for k in sorted(REGISTRY)]
