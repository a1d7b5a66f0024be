"""KV memory knobs applied to a loaded model: ``max_kv_size`` (rotating attention KV) and ``kv_bits`` (quantized).

Every engine makes its caches through mlx-lm's ``make_prompt_cache(model)``, which defers to ``model.make_cache``;
``apply_kv_layout`` installs one on the model, so live requests in every lane (batch, speculative, spec batch), warm
prefills and restored snapshots all use the same cache classes. The returned dict salts the prefix cache's block
hashes: a snapshot made under one layout is never restored under another (a quantized and an unquantized runtime
never share entries).

* ``max_kv_size=N``: every full-attention ``KVCache`` becomes mlx-lm's ``RotatingKVCache(max_size=N, keep=0)``
  (keep=0, not mlx-lm's default of 4 sink tokens: rotating caches batch only without a pinned prefix); the
  family's own sliding windows, GatedDeltaNet state are unchanged. DeepSeek-V4's compressed caches have no bounded
  form: ConfigError.
* ``kv_bits`` / ``kv_group_size`` / ``quantized_kv_start`` (mlx-lm's ``generate`` semantics, its defaults 64 and
  5000): every full-attention ``KVCache`` becomes a ``quantized_kv.PendingQuantKV``, quantized once it holds
  ``quantized_kv_start`` tokens, batched by ``quantized_kv.BatchQuantKV``. Refused (ConfigError naming the flag)
  where mlx-lm cannot quantize either: sliding-window caches (``RotatingKVCache.to_quantized`` is not implemented;
  gpt_oss's attention sinks have no quantized attention), so also together with ``max_kv_size``; deepseek_v4's
  compressed caches; a ``kv_group_size`` that does not divide the attention head dimension.
"""

from __future__ import annotations

from ..errors import ConfigError

DEFAULT_KV_GROUP_SIZE = 64  # mlx-lm's
DEFAULT_QUANTIZED_KV_START = 5000  # mlx-lm's


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_kv_bits(kv_cache_kind: str, kv_bits, kv_group_size, quantized_kv_start, max_kv_size, head_dim) -> dict:
    """The quantized-KV part of the layout (``{}`` without ``kv_bits``); ConfigError where it cannot apply."""
    from .quantized_kv import KV_BITS, KV_GROUP_SIZES

    if kv_bits is None:
        return {}
    if kv_bits not in KV_BITS or isinstance(kv_bits, bool):
        raise ConfigError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))} (mx.quantize), got {kv_bits!r}")
    if kv_group_size not in KV_GROUP_SIZES or isinstance(kv_group_size, bool):
        raise ConfigError(f"kv_group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, got {kv_group_size!r}")
    _positive_int("quantized_kv_start", quantized_kv_start, 0)
    if kv_cache_kind == "compressed":
        raise ConfigError("kv_bits: this family's compressed attention caches (deepseek_v4) have no quantized form; "
                          "leave kv_bits unset")
    if kv_cache_kind == "rotating":
        raise ConfigError("kv_bits: this family's sliding-window attention caches (RotatingKVCache) cannot be "
                          "quantized (mlx-lm's RotatingKVCache.to_quantized is not implemented, and attention sinks "
                          "have no quantized attention); leave kv_bits unset")
    if max_kv_size is not None:
        raise ConfigError("kv_bits cannot be combined with max_kv_size: a bounded (rotating) KV cache cannot be "
                          "quantized (mlx-lm: RotatingKVCache quantization is not implemented); give one of them")
    if isinstance(head_dim, int) and head_dim % kv_group_size:
        raise ConfigError(f"kv_group_size={kv_group_size} must divide the attention head dimension ({head_dim}); "
                          f"give a kv_group_size among 32, 64, 128 that does")
    return {"kv_bits": kv_bits, "kv_group_size": kv_group_size, "quantized_kv_start": quantized_kv_start}


def apply_kv_layout(model, kv_cache_kind: str, *, max_kv_size=None, kv_bits=None,
                    kv_group_size=DEFAULT_KV_GROUP_SIZE, quantized_kv_start=DEFAULT_QUANTIZED_KV_START,
                    head_dim=None, text_config=None) -> dict:
    """Installs the cache layout on ``model`` (MLX thread); returns its description for the prefix salt.
    ``text_config``: the family's text config (the attention head dimension when ``head_dim`` is not given)."""
    if head_dim is None and text_config:
        tc = text_config
        head_dim = tc.get("head_dim") or (tc.get("hidden_size", 0) // max(1, tc.get("num_attention_heads") or 1))
    quant = check_kv_bits(kv_cache_kind, kv_bits, kv_group_size, quantized_kv_start, max_kv_size, head_dim or None)
    if max_kv_size is None and not quant:
        return {}
    if max_kv_size is not None:
        if not isinstance(max_kv_size, int) or isinstance(max_kv_size, bool) or max_kv_size < 1:
            raise ConfigError(f"max_kv_size must be a positive integer (tokens of attention KV kept), got "
                              f"{max_kv_size!r}")
        if kv_cache_kind == "compressed":
            raise ConfigError("max_kv_size: this family's compressed attention caches (deepseek_v4) cannot be "
                              "bounded by a rotating window; leave max_kv_size unset")
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    from .quantized_kv import quantizing_cache

    base = getattr(model, "make_cache", None)
    if base is None:
        base = lambda: [KVCache() for _ in model.layers]  # noqa: E731 - mlx-lm's default

    if quant:
        def make_cache():
            return quantizing_cache(base(), kv_bits, kv_group_size, quantized_kv_start)

        model.make_cache = make_cache
        return quant

    def make_cache():
        return [RotatingKVCache(max_size=max_kv_size, keep=0) if type(c) is KVCache else c for c in base()]

    model.make_cache = make_cache
    return {"max_kv_size": max_kv_size}
