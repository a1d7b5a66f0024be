"""The rules a family's adapter uses to normalise and check its ``config.json`` (import-light: no MLX).

A checkpoint's config is spelled the way the tool that wrote it spells it: transformers 5 saves attributes under
their ``attribute_map`` aliases (qwen3_moe's ``num_local_experts``) and rope settings as one ``rope_parameters``
dict; transformers 4.x and older hub configs write ``rope_theta`` / ``rope_scaling``. ``normalizer`` builds the
adapter's function that turns any of these into the one spelling the family's MLX ``ModelArgs`` reads, then
checks every field it knows (types, ranges) so a damaged config is a ``CheckpointError`` naming the field,
never a ``ZeroDivisionError`` deep inside model construction.
"""

from __future__ import annotations

import math
from typing import Callable

from ...errors import CheckpointError

# field kinds: name -> (check, what the error says the field must be). A trailing "?" in a spec marks the field
# optional (checked only when present and not null).


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


KINDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "pos_int": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "nonneg_int": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "pos_num": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "num": (_is_num, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int_list": (lambda v: isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v),
                 "a list of non-negative integers"),
    "str_list": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "dict": (lambda v: isinstance(v, dict), "a JSON object"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "token_ids": (lambda v: (_is_int(v) and v >= 0) or (isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v)),
                  "a token id or a list of token ids"),
}

# fields of every transformers config (PreTrainedConfig), typed as transformers' strict validation types them
COMMON_FIELDS = {
    "use_cache": "bool?", "tie_word_embeddings": "bool?", "output_hidden_states": "bool?", "return_dict": "bool?",
    "is_encoder_decoder": "bool?", "architectures": "str_list?", "bos_token_id": "token_ids?",
    "eos_token_id": "token_ids?", "pad_token_id": "token_ids?",
}


def apply_aliases(tc: dict, aliases: tuple[tuple[str, str], ...], source: str) -> dict:
    """Copies each ``alias`` field to its ``canonical`` name (transformers' ``attribute_map``: the same attribute
    under two names); both present with different values is a damaged config."""
    for alias, canonical in aliases:
        if alias not in tc:
            continue
        if canonical in tc and tc[canonical] != tc[alias]:
            raise CheckpointError(
                f"{source}: fields {canonical!r} ({tc[canonical]!r}) and {alias!r} ({tc[alias]!r}) name the same "
                f"setting with different values; keep one of them"
            )
        tc[canonical] = tc[alias]
    return tc


def _rope_kind(d: dict) -> str:
    return str(d.get("rope_type", d.get("type", "default")))


def normalize_rope(tc: dict, source: str) -> dict:
    """Fills both rope spellings from whichever the config has: ``rope_parameters`` (transformers 5: theta and
    scaling in one dict) and ``rope_theta`` + ``rope_scaling`` (transformers 4.x, older hub configs). A
    per-layer-type ``rope_parameters`` (gemma4's ``{"sliding_attention": {...}, ...}``) is left alone."""
    rp, theta, scaling = tc.get("rope_parameters"), tc.get("rope_theta"), tc.get("rope_scaling")
    if rp is not None and not isinstance(rp, dict):
        raise CheckpointError(f"{source}: field 'rope_parameters' must be a JSON object, got {rp!r}")
    if scaling is not None and not isinstance(scaling, dict):
        raise CheckpointError(f"{source}: field 'rope_scaling' must be a JSON object or null, got {scaling!r}")
    if isinstance(rp, dict) and ("rope_theta" in rp or "rope_type" in rp or "type" in rp):
        if "rope_theta" not in tc and "rope_theta" in rp:
            tc["rope_theta"] = rp["rope_theta"]
        if "rope_scaling" not in tc:
            tc["rope_scaling"] = None if _rope_kind(rp) == "default" else {
                k: v for k, v in rp.items() if k != "rope_theta"}
        if "partial_rotary_factor" not in tc and "partial_rotary_factor" in rp:
            tc["partial_rotary_factor"] = rp["partial_rotary_factor"]
    elif rp is None and theta is not None:
        rp = {"rope_type": _rope_kind(scaling or {}), "rope_theta": theta, **(scaling or {})}
        if "partial_rotary_factor" in tc:
            rp.setdefault("partial_rotary_factor", tc["partial_rotary_factor"])
        tc["rope_parameters"] = rp
    return tc


def check_fields(tc: dict, spec: dict[str, str], source: str) -> None:
    """``spec``: field -> kind (``KINDS``), ``"kind?"`` for optional fields."""
    for name, kind in spec.items():
        optional = kind.endswith("?")
        check, what = KINDS[kind.rstrip("?")]
        if name not in tc or tc[name] is None:
            if optional:
                continue
            raise CheckpointError(f"{source}: field {name!r} must be {what}, but it is missing")
        if not check(tc[name]):
            raise CheckpointError(f"{source}: field {name!r} must be {what}, got {tc[name]!r}")
    heads, kv = tc.get("num_attention_heads"), tc.get("num_key_value_heads")
    if _is_int(heads) and _is_int(kv) and kv > 0 and heads % kv:
        raise CheckpointError(
            f"{source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")


def normalizer(*, aliases: tuple[tuple[str, str], ...] = (), rope: bool = True, fields: dict[str, str] | None = None,
               extra: Callable[[dict, str], dict] | None = None) -> Callable[[dict, str], dict]:
    """The adapter's ``normalize(tc, source)``: aliases, then rope spellings, then ``extra``, then field checks.
    Returns a new dict (the checkpoint's own config is never modified)."""

    def normalize(tc: dict, source: str = "config.json") -> dict:
        tc = apply_aliases(dict(tc), aliases, source)
        if rope:
            tc = normalize_rope(tc, source)
        if extra is not None:
            tc = extra(tc, source)
        check_fields(tc, {**COMMON_FIELDS, **(fields or {})}, source)
        return tc

    return normalize
