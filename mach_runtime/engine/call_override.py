"""Per-instance ``__call__`` overrides of MLX modules (capture taps, compiled MoE blocks).

An instance's class is swapped for a subclass whose ``__call__`` wraps the original: parameter names, ``repr``
and ``isinstance`` checks stay the same (same instance, same children), and other instances of the class are
untouched. One subclass per (class, tag), cached; swapping an instance twice for the same tag is a no-op.
"""

from __future__ import annotations

_SUBCLASSES: dict[tuple[type, str], type] = {}


def base_of(cls: type, tag: str) -> type | None:
    """The original class if ``cls`` is an override subclass for ``tag``, else None."""
    return cls.__dict__.get(f"_mach_{tag}_base")


def override_call(cls: type, tag: str, make_call) -> type:
    """The subclass of ``cls`` whose ``__call__`` is ``make_call(cls)`` (a function of ``self, *args, **kwargs``
    that may call ``cls.__call__``); ``cls`` itself when it already is one for ``tag``."""
    if base_of(cls, tag) is not None:
        return cls
    key = (cls, tag)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(cls.__name__, (cls,), {"__call__": make_call(cls), f"_mach_{tag}_base": cls,
                                                       "__module__": cls.__module__})
    return _SUBCLASSES[key]
