"""THE request schema: every argument of a request and of ``Runtime.open``, checked before anything is queued.

One module for the embedded ``Runtime`` and the server (which maps ``RequestError`` to HTTP 400). The rules:

- integers are ``int`` (never ``bool``, never ``float`` — not even ``2.0``: a JSON ``2.5`` must not truncate
  silently); numbers are ``int`` or ``float`` (never ``bool`` or ``str``) and finite;
- every range is checked (``max_tokens >= 1``, ``0 <= temperature``, ``0 < top_p <= 1``, ``top_k >= 0``,
  ``0 <= min_p <= 1``, penalties in [-2, 2], ``0 <= top_logprobs <= 20``, ``0 <= seed < 2**63``); token ids lie
  inside the vocabulary;
- ``stop`` is a string or a list of strings; ``stop_token_ids`` a list of token ids (not a single int);
- a prompt is a string, a non-empty list of token ids, or a non-empty list of chat messages whose ``role`` is
  one of ``ROLES`` and whose ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts
  (joined; an assistant turn that carries ``tool_calls`` may have ``content`` None).

Each failure is a ``RequestError`` (request arguments) or ``ConfigError`` (``Runtime.open`` arguments) whose
message names the field, what was given, and what to pass instead. Nothing here imports MLX.
"""

from __future__ import annotations

import math
import os

import msgspec

from mach_runtime.engine.params import MAX_TOP_LOGPROBS, SamplingParams
from mach_runtime.errors import ConfigError, RequestError

ROLES = ("system", "user", "assistant", "tool")
MAX_SEED = 1 << 63  # seeds are 0 <= seed < 2**63 (the sampler's key space)
MAX_INT = (1 << 31) - 1  # max_tokens, top_k, batch sizes: far beyond any real value, small enough for any dtype
REQUEST_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                  "request_id", "specdec", "specdec_policy", "presence_penalty", "frequency_penalty", "logprobs",
                  "top_logprobs", "grammar", "logits_processors")


class CheckedRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A request's arguments after checking: THE sampling parameters the engines use (``engine.params``: ``stop``
    normalised to a tuple without empty strings, ``logits_processors`` as ``processors``) and the one argument that
    is not about sampling."""

    params: SamplingParams
    request_id: str | None = None  # None: the Runtime names it


def _desc(v) -> str:
    r = repr(v)
    return f"{type(v).__name__} {r if len(r) <= 60 else r[:57] + '...'}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(field: str, v, lo: int, hi: int = MAX_INT, *, error=RequestError) -> int:
    """``v`` as an int in [lo, hi]; raises ``error`` naming ``field`` otherwise."""
    if not _is_int(v):
        hint = f"; pass {int(v)}" if isinstance(v, float) and math.isfinite(v) and v == int(v) else ""
        raise error(f"{field} must be an integer, got {_desc(v)}{hint}")
    if not lo <= v <= hi:
        if v < lo and hi == MAX_INT:
            want = "a positive integer" if lo == 1 else f"an integer >= {lo}"
        else:
            want = f"an integer in [{lo}, {'2**63 - 1' if hi == MAX_SEED - 1 else hi}]"
        raise error(f"{field} must be {want}, got {v}")
    return int(v)


def check_number(field: str, v, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 error=RequestError) -> float:
    """``v`` (int or float, finite) as a float within the bounds; raises ``error`` naming ``field``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        hint = ""
        if isinstance(v, str):
            try:
                hint = f"; pass the number {float(v)!r}, not a string"
            except ValueError:
                pass
        raise error(f"{field} must be a number, got {_desc(v)}{hint}")
    try:
        f = float(v)
    except OverflowError:
        raise error(f"{field} must be a finite number, got an int too large for a float") from None
    if not math.isfinite(f):
        raise error(f"{field} must be a finite number, got {v!r}")
    if lo is not None and (f <= lo if lo_open else f < lo):
        raise error(f"{field} must be {'>' if lo_open else '>='} {lo:g}, got {v!r}")
    if hi is not None and f > hi:
        raise error(f"{field} must be <= {hi:g}, got {v!r}")
    return f


def check_token_ids(field: str, ids, vocab_size: int | None, *, allow_empty: bool = False) -> tuple[int, ...]:
    """A list/tuple of token ids, each an int in [0, vocab_size)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)):
        raise RequestError(f"{field} must be a list of token ids (e.g. [5]), got {_desc(ids)}")
    if not ids and not allow_empty:
        raise RequestError(f"{field} is empty: give at least one token id")
    hi = (vocab_size - 1) if vocab_size else MAX_INT
    for i, t in enumerate(ids):
        if not _is_int(t):
            raise RequestError(f"{field}[{i}] must be an integer token id, got {_desc(t)}")
        if not 0 <= t <= hi:
            where = f"the vocabulary (0..{hi}, {vocab_size} tokens)" if vocab_size else f"0..{hi}"
            raise RequestError(f"{field}[{i}] = {t} is outside {where}")
    return tuple(ids)


def check_stop(stop) -> tuple[str, ...]:
    """``stop``: None, a string, or a list of strings; empty strings are dropped."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if not isinstance(stop, (list, tuple)):
        raise RequestError(f"stop must be a string or a list of strings, got {_desc(stop)}")
    for i, s in enumerate(stop):
        if not isinstance(s, str):
            raise RequestError(f"stop[{i}] must be a string, got {_desc(s)}; stop strings are text "
                               "(for token ids use stop_token_ids)")
    return tuple(s for s in stop if s)


def check_request(params: dict, vocab_size: int | None = None, *, specdec: str | None = None) -> CheckedRequest:
    """Every request argument in ``params`` (the keyword arguments of ``Runtime.stream``), checked. ``specdec``: the
    mode of a request that names none (or "default"): the Runtime's configured one. ``seed`` stays None when not
    given (the Runtime draws one)."""
    unknown = sorted(set(params) - set(REQUEST_FIELDS), key=str)
    if unknown:
        raise RequestError(f"unknown request argument(s) {unknown}; known: {', '.join(REQUEST_FIELDS)}")
    p = dict(params)
    out = {"specdec": specdec}
    if "max_tokens" in p:
        out["max_tokens"] = check_int("max_tokens", p["max_tokens"], 1)
    if "temperature" in p:
        out["temperature"] = check_number("temperature", p["temperature"], lo=0.0)
    if "top_p" in p:
        out["top_p"] = check_number("top_p", p["top_p"], lo=0.0, hi=1.0, lo_open=True)
    if "top_k" in p:
        out["top_k"] = check_int("top_k", p["top_k"], 0)
    if "min_p" in p:
        out["min_p"] = check_number("min_p", p["min_p"], lo=0.0, hi=1.0)
    for name in ("presence_penalty", "frequency_penalty"):
        if name in p:
            out[name] = check_number(name, p[name], lo=-2.0, hi=2.0)
    if "logprobs" in p:
        if not isinstance(p["logprobs"], bool):
            raise RequestError(f"logprobs must be True or False, got {_desc(p['logprobs'])}")
        out["logprobs"] = p["logprobs"]
    if "top_logprobs" in p:
        out["top_logprobs"] = check_int("top_logprobs", p["top_logprobs"], 0, MAX_TOP_LOGPROBS)
    if p.get("grammar") is not None:
        if not isinstance(p["grammar"], str) or not p["grammar"]:
            raise RequestError(f"grammar must be a non-empty llguidance grammar string, got {_desc(p['grammar'])}")
        out["grammar"] = p["grammar"]
    if p.get("logits_processors") is not None:
        lp = p["logits_processors"]
        if not isinstance(lp, (list, tuple)) or not all(callable(f) for f in lp):
            raise RequestError(f"logits_processors must be a list of callables fn(tokens, logits) -> logits, "
                               f"got {_desc(lp)}")
        out["processors"] = tuple(lp)
    if p.get("seed") is not None:
        out["seed"] = check_int("seed", p["seed"], 0, MAX_SEED - 1)
    if "stop" in p:
        out["stop"] = check_stop(p["stop"])
    if p.get("stop_token_ids") is not None:
        out["stop_token_ids"] = check_token_ids("stop_token_ids", p["stop_token_ids"], vocab_size, allow_empty=True)
    rid = p.get("request_id")
    if rid is not None and (not isinstance(rid, str) or not rid):
        raise RequestError(f"request_id must be a non-empty string, got {_desc(rid)}")
    if "specdec" in p:
        mode = p["specdec"]
        if mode is not None and not isinstance(mode, str):  # str subclasses include the mode enum
            raise RequestError(f"specdec must be a mode name (e.g. 'native_v7', 'target_only') or None, "
                               f"got {_desc(mode)}")
        out["specdec"] = specdec if mode == "default" else getattr(mode, "value", mode)
    if p.get("specdec_policy") is not None:
        if not isinstance(p["specdec_policy"], str):
            raise RequestError(f"specdec_policy must be a policy name or None, got {_desc(p['specdec_policy'])}")
        out["specdec_policy"] = p["specdec_policy"]
    return CheckedRequest(params=SamplingParams(**out), request_id=rid)


def _content(i: int, m: dict):
    c = m["content"]
    if isinstance(c, str):
        return c
    if c is None and m["role"] == "assistant" and m.get("tool_calls"):
        return None
    if isinstance(c, (list, tuple)):
        texts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"messages[{i}].content[{j}] must be a text part {{'type': 'text', 'text': str}} "
                                   f"(this runtime serves text only), got {_desc(part)}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts, got {_desc(c)}")


def check_messages(messages) -> list[dict]:
    """Chat messages, checked; text parts joined into one string per message."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RequestError("messages must be a non-empty list of {'role', 'content'} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be a dict with 'role' and 'content', got {_desc(m)}")
        bad_keys = [k for k in m if not isinstance(k, str)]
        if bad_keys:
            raise RequestError(f"messages[{i}] has non-string keys {bad_keys[:3]!r}")
        if "role" not in m or "content" not in m:
            raise RequestError(f"messages[{i}] needs 'role' and 'content'")
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {_desc(m['role'])}")
        tc = m.get("tool_calls")
        if tc is not None and (m["role"] != "assistant" or not isinstance(tc, list)
                               or not all(isinstance(c, dict) for c in tc)):
            raise RequestError(f"messages[{i}].tool_calls must be a list of dicts on an assistant message")
        out.append({**m, "content": _content(i, m)})
    return out


def prompt_kind(prompt) -> str:
    """"text", "messages" or "tokens"; raises ``RequestError`` for anything else (checks no contents)."""
    if isinstance(prompt, str):
        return "text"
    if isinstance(prompt, (list, tuple)) and prompt:
        if all(isinstance(m, dict) for m in prompt):
            return "messages"
        if not any(isinstance(m, dict) for m in prompt):
            return "tokens"
        raise RequestError("prompt mixes chat messages and other items: give a list of {'role', 'content'} dicts")
    if isinstance(prompt, (list, tuple)):
        raise RequestError("the prompt is empty: give at least one token or message")
    raise RequestError(f"prompt must be a string, a list of chat messages ({{'role', 'content'}}) or a list of "
                       f"token ids, got {_desc(prompt)}")


# -- Runtime.open ---------------------------------------------------------------------------------------------


def _path_or_none(field: str, v) -> None:
    if v is not None and not isinstance(v, (str, os.PathLike)):
        raise ConfigError(f"{field} must be a path (str or os.PathLike) or None, got {_desc(v)}")


def check_open(*, checkpoint=None, draft=None, specdec=None, expert_residency=None, expert_cache_gb=None,
               prefix_cache_dir=None, max_batch=8, max_sessions=64, fault_hook=None, restart_intensity=3,
               restart_period=60.0, predictor=None, warmup=None, spec_batch=0, prefill_chunk=512) -> None:
    """Every ``Runtime.open`` argument, checked before anything loads; raises ``ConfigError`` naming it."""
    _path_or_none("checkpoint", checkpoint)
    _path_or_none("draft", draft)
    _path_or_none("prefix_cache_dir", prefix_cache_dir)  # the other prefix-cache settings: config.resolve_prefix_config
    if specdec is not None:
        from mach_runtime.engine.specdec.config import BlockSpecDecEngineConfig

        if not isinstance(specdec, BlockSpecDecEngineConfig):
            raise ConfigError(f"specdec must be a BlockSpecDecEngineConfig or None, got {_desc(specdec)}")
    if expert_residency is not None and not isinstance(expert_residency, str):
        raise ConfigError(f"expert_residency must be 'stacked', 'streaming' or None, got {_desc(expert_residency)}")
    if expert_cache_gb is not None:
        check_number("expert_cache_gb", expert_cache_gb, lo=0.0, lo_open=True, error=ConfigError)
    max_batch = check_int("max_batch", max_batch, 1, error=ConfigError)
    check_int("max_sessions", max_sessions, 0, error=ConfigError)
    check_int("prefill_chunk", prefill_chunk, 1, error=ConfigError)
    check_int("restart_intensity", restart_intensity, 0, error=ConfigError)
    check_number("restart_period", restart_period, lo=0.0, lo_open=True, error=ConfigError)
    if fault_hook is not None and not callable(fault_hook):
        raise ConfigError(f"fault_hook must be callable(actor, point, info) or None, got {_desc(fault_hook)}")
    if predictor is not None and not (callable(getattr(predictor, "observe", None))
                                      and callable(getattr(predictor, "predict", None))):
        raise ConfigError(f"predictor must have observe(step) and predict() methods, got {_desc(predictor)}")
    if warmup is not None and not isinstance(warmup, bool):
        raise ConfigError(f"warmup must be True, False or None, got {_desc(warmup)}")
    if not _is_int(spec_batch) or spec_batch < 0 or spec_batch == 1 or spec_batch > max_batch:
        raise ConfigError(f"spec_batch must be 0 (off) or an integer in 2..max_batch ({max_batch}), "
                          f"got {spec_batch!r}")
