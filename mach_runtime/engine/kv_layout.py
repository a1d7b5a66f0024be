"""KV memory knobs applied to a loaded model: ``max_kv_size`` (rotating attention KV) and ``kv_bits``.

Every engine makes its caches through mlx-lm's ``make_prompt_cache(model)``, which defers to ``model.make_cache``;
``apply_kv_layout`` installs one on the model, so live requests in every lane (batch, speculative, spec batch), warm
prefills and restored snapshots all use the same cache classes. The returned dict salts the prefix cache's block
hashes: a snapshot made under one layout is never restored under another.

* ``max_kv_size=N``: every full-attention ``KVCache`` becomes mlx-lm's ``RotatingKVCache(max_size=N, keep=0)``
  (keep=0, not mlx-lm's default of 4 sink tokens: rotating caches batch only without a pinned prefix); the
  family's own sliding windows, GatedDeltaNet state are unchanged. DeepSeek-V4's compressed caches have no bounded
  form: ConfigError.
* ``kv_bits``: mlx-lm's ``QuantizedKVCache`` has no batched form (no merge/extract, mlx-lm's own BatchGenerator
  does not quantize either), and the Runtime always decodes through continuous batching: ConfigError naming that.
  Snapshots do support ``QuantizedKVCache`` layers (``kv_snapshot``) for engines that use them.
"""

from __future__ import annotations

from ..errors import ConfigError


def apply_kv_layout(model, kv_cache_kind: str, *, max_kv_size=None, kv_bits=None) -> dict:
    """Installs the cache layout on ``model`` (MLX thread); returns its description for the prefix salt."""
    if kv_bits is not None:
        raise ConfigError(
            f"kv_bits={kv_bits!r}: quantized KV (mlx-lm's QuantizedKVCache) cannot be batched, and the Runtime "
            "decodes every request through continuous batching; leave kv_bits unset (use max_kv_size to bound KV "
            "memory)")
    if max_kv_size is None:
        return {}
    if not isinstance(max_kv_size, int) or isinstance(max_kv_size, bool) or max_kv_size < 1:
        raise ConfigError(f"max_kv_size must be a positive integer (tokens of attention KV kept), got {max_kv_size!r}")
    if kv_cache_kind == "compressed":
        raise ConfigError("max_kv_size: this family's compressed attention caches (deepseek_v4) cannot be bounded "
                          "by a rotating window; leave max_kv_size unset")
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    base = getattr(model, "make_cache", None)
    if base is None:
        base = lambda: [KVCache() for _ in model.layers]  # noqa: E731 - mlx-lm's default

    def make_cache():
        return [RotatingKVCache(max_size=max_kv_size, keep=0) if type(c) is KVCache else c for c in base()]

    model.make_cache = make_cache
    return {"max_kv_size": max_kv_size}
