"""MLX dtype names as the runtime writes them (snapshot headers, slot-write tables, the server's capabilities)."""

from __future__ import annotations


def dtype_name(dtype) -> str:
    """``mx.bfloat16`` -> ``"bfloat16"`` (the name ``getattr(mx, name)`` takes back)."""
    return str(dtype).rsplit(".", 1)[-1]
