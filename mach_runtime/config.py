"""Configuration, read in one place: explicit argument → environment variable → default.

Nothing else in the project reads ``os.environ``; callers ask this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ConfigError

RESIDENCIES = ("stacked", "streaming")
EVICTION_POLICIES = ("lru", "lrfu")

# name -> (environment variable, default)
_ENV = {
    "expert_residency": ("MACH_EXPERT_RESIDENCY", "stacked"),
    "expert_cache_gb": ("MACH_EXPERT_CACHE_GB", None),
    "eviction_policy": ("MACH_EVICTION_POLICY", "lrfu"),
    "io_threads": ("MACH_IO_THREADS", 4),
    "direct_io": ("MACH_DIRECT_IO", False),
    "api_key": ("MACH_API_KEY", None),
}

# Fraction of the routed-expert bytes the streaming bank gets when no budget is given.
DEFAULT_BANK_FRACTION = 0.25


def _raw(name: str, value):
    if value is not None:
        return value, "argument"
    env, default = _ENV[name]
    if env in os.environ and os.environ[env] != "":
        return os.environ[env], f"environment variable {env}"
    return default, "default"


def _as_bool(text, where: str) -> bool:
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{where}: expected a boolean (1/0/true/false), got {text!r}")


@dataclass(frozen=True)
class StoreConfig:
    """Resolved settings for the expert store of one loaded model."""

    expert_residency: str
    expert_cache_gb: float | None
    eviction_policy: str
    io_threads: int
    direct_io: bool


def resolve_store_config(
    expert_residency: str | None = None,
    expert_cache_gb: float | None = None,
    eviction_policy: str | None = None,
    io_threads: int | None = None,
    direct_io: bool | None = None,
) -> StoreConfig:
    """Resolve every store setting from arguments, then ``MACH_*`` env vars, then defaults."""
    residency, where = _raw("expert_residency", expert_residency)
    residency = str(residency).strip().lower()
    if residency not in RESIDENCIES:
        raise ConfigError(
            f"{where}: expert_residency must be one of {', '.join(RESIDENCIES)}, got {residency!r}"
        )

    gb, where = _raw("expert_cache_gb", expert_cache_gb)
    if gb is not None:
        try:
            gb = float(gb)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expert_cache_gb must be a number of GB, got {gb!r}") from None
        if not gb > 0:
            raise ConfigError(f"{where}: expert_cache_gb must be > 0, got {gb!r}")

    policy, where = _raw("eviction_policy", eviction_policy)
    policy = str(policy).strip().lower()
    if policy not in EVICTION_POLICIES:
        raise ConfigError(
            f"{where}: eviction_policy must be one of {', '.join(EVICTION_POLICIES)}, got {policy!r}"
        )

    threads, where = _raw("io_threads", io_threads)
    try:
        threads = int(threads)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: io_threads must be an integer, got {threads!r}") from None
    if threads < 1:
        raise ConfigError(f"{where}: io_threads must be >= 1, got {threads}")

    direct, where = _raw("direct_io", direct_io)
    return StoreConfig(residency, gb, policy, threads, _as_bool(direct, where))


def resolve_api_key(api_key: str | None = None) -> str | None:
    """mach-serve's API key: ``--api-key``, else ``MACH_API_KEY``, else None (no authentication)."""
    key, _ = _raw("api_key", api_key)
    return key or None
