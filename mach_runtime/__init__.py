"""mach_runtime: MLX inference for Mixture-of-Experts models bigger than memory.

The stable surface is exported lazily, so ``import mach_runtime`` stays cheap (no MLX import) until a name
that needs MLX is used.
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load": "mach_runtime.io.load",
    "load_moe": "mach_runtime.io.load",
    "load_v4_flash": "mach_runtime.io.load",
    "detect_arch": "mach_runtime.io.arch_registry",
    "REGISTRY": "mach_runtime.io.arch_registry",
    "registry_summary": "mach_runtime.io.arch_registry",
    "arch_summary": "mach_runtime.io.arch_registry",
    "MoeArchAdapter": "mach_runtime.io.arch_registry",
    "ExpertStoreStats": "mach_runtime.io.expert_bank",
    "stream_generate": "mach_runtime.engine.generate",
    "BlockSpecDecEngine": "mach_runtime.engine.specdec",
    "BlockSpecDecEngineConfig": "mach_runtime.engine.specdec",
    "BlockSpecDecEngineMode": "mach_runtime.engine.specdec",
    "make_tiny_checkpoint": "mach_runtime.testing.tiny",
    "Runtime": "actors.runtime",
    "MachError": "mach_runtime.errors",
    "CheckpointError": "mach_runtime.errors",
    "CheckpointNotFoundError": "mach_runtime.errors",
    "UnsupportedArchError": "mach_runtime.errors",
    "ArchNotImplementedError": "mach_runtime.errors",
    "ConfigError": "mach_runtime.errors",
    "ExpertCacheTooSmallError": "mach_runtime.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mach_runtime' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
