"""Grammar constraints on decoding (structured output), through llguidance.

A request carries its grammar as data: ``SamplingParams.grammar``, an llguidance grammar string (JSON schema,
Lark or regex compiled to llguidance's top-level format by the helpers below). The engine builds a
``GrammarConstraint`` from it on the MLX thread; before each step it fills the row's token bitmask, after it
feeds the sampled token. A replayed request (Decoder restart, lane move) rebuilds the matcher and feeds its
delivered tokens, so the constraint continues exactly.

Why llguidance (docs/serving.md): it installs with no dependencies, compiles a JSON schema in about a
millisecond, writes a numpy int32 bitmask (backend-neutral: ``sampling.apply_bitmask`` turns it into an MLX
mask on any device) and handles end of generation itself (EOS is allowed exactly when the grammar accepts).
xgrammar needs torch and triton and returns torch tensors; outlines-core needs a hand-built byte-level
vocabulary.
"""

from __future__ import annotations

import json
import threading
import weakref

import numpy as np

from ..errors import RequestError

_lock = threading.Lock()
_tokenizers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _llguidance():
    try:
        import llguidance
        import llguidance.hf  # noqa: F401
    except ImportError:  # pragma: no cover - the server and test extras install it
        raise RequestError("structured output needs llguidance: pip install 'mach-runtime[server]'") from None
    return llguidance


# one canonical layout ({"a": 1, "b": [1, 2]}): a weak model cannot wander off into endless whitespace
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_schema_grammar(schema: dict | None) -> str:
    """The llguidance grammar for JSON values following ``schema`` (None: any JSON object)."""
    ll = _llguidance()
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise RequestError("a JSON schema must be a JSON object")
    try:
        return ll.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_COMPACT)
    except (ValueError, TypeError) as e:
        raise RequestError(f"invalid JSON schema: {e}") from None


def lark_grammar(lark: str) -> str:
    """The llguidance grammar for a Lark grammar text (llguidance's Lark dialect; may embed %json{...})."""
    ll = _llguidance()
    try:
        return ll.LLMatcher.grammar_from_lark(lark)
    except (ValueError, TypeError) as e:
        raise RequestError(f"invalid grammar: {e}") from None


def check_grammar(grammar: str, tokenizer=None) -> None:
    """Raises RequestError naming the problem if llguidance cannot compile ``grammar``."""
    ll = _llguidance()
    if not isinstance(grammar, str) or not grammar:
        raise RequestError("grammar must be a non-empty llguidance grammar string")
    ok, err = _validate(ll, grammar, tokenizer)
    if not ok:
        raise RequestError(f"invalid grammar: {err}")


def _validate(ll, grammar: str, tokenizer):
    tok = ll_tokenizer(tokenizer) if tokenizer is not None else None
    is_err, messages = ll.LLMatcher.validate_grammar_with_warnings(grammar, tok)
    return (not is_err), "; ".join(messages)


def ll_tokenizer(tokenizer):
    """The llguidance tokenizer of an mlx-lm ``TokenizerWrapper`` (or a HF fast tokenizer); built once (~0.1 s)."""
    ll = _llguidance()
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    with _lock:
        tok = _tokenizers.get(hf)
        if tok is None:
            eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id])
            tok = ll.hf.from_tokenizer(hf, eos_token=eos[0] if len(eos) == 1 else eos)
            _tokenizers[hf] = tok
    return tok


class GrammarConstraint:
    """The state of one request's grammar: which tokens may come next."""

    def __init__(self, grammar: str, tokenizer, consumed=()):
        ll = _llguidance()
        self._tok = ll_tokenizer(tokenizer)
        self.matcher = ll.LLMatcher(self._tok, grammar)
        if self.matcher.is_error():
            raise RequestError(f"invalid grammar: {self.matcher.get_error()}")
        self.words = (self._tok.vocab_size + 31) // 32
        for t in consumed:
            self.advance(t)

    def fill(self, row: np.ndarray) -> None:
        """Writes the allowed-token bitmask (int32 words) into ``row`` (C-contiguous, ``self.words`` long)."""
        self.matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.size * row.itemsize)

    def advance(self, token: int) -> None:
        """Feeds the sampled token; a token outside the mask (only possible when the grammar is already done or a
        replay diverged) leaves the matcher in its error state, which then allows only end of generation."""
        if not self.matcher.is_stopped():
            self.matcher.consume_token(int(token))

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped() or self.matcher.is_error()


def constraint_for(params, tokenizer, consumed=()):
    """The request's ``GrammarConstraint``, or None when it has no grammar."""
    if getattr(params, "grammar", None) is None:
        return None
    return GrammarConstraint(params.grammar, tokenizer, consumed)
