"""Fitting a reused prompt cache (a session's earlier turns, a handed-over KV) to the tokens a request shares."""

from __future__ import annotations


def fit_prefix(kv, want: int) -> tuple[list | None, int]:
    """Cuts the per-layer caches ``kv`` to cover the first ``want`` tokens of a request, in place.

    Returns ``(kv, n)``: n = want, or fewer when the KV holds fewer; ``(None, 0)`` when it holds more and some
    layer cannot trim (GatedDeltaNet state covers an exact token count). The count is read from the first layer
    that keeps one (a hybrid's first layers may be recurrent)."""
    if want <= 0:
        return None, 0
    have = next((c.offset for c in kv if isinstance(getattr(c, "offset", None), int)), want)
    if have < want:
        return kv, have
    if have > want:
        if not all(c.is_trimmable() for c in kv):
            return None, 0
        for c in kv:
            c.trim(have - want)
    return kv, want
