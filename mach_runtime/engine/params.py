"""THE request-parameter type (no MLX here: the actors' messages and the server import it)."""

from __future__ import annotations

import random

import msgspec

MAX_TOP_LOGPROBS = 20  # alternatives a request may ask for at each position (OpenAI's limit)


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """A request's parameters (the one type: Runtime, messages, engines, benchmarks)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None  # None: drawn at admission (the Runtime always sets one, so replays are exact)
    stop: tuple[str, ...] = ()  # stop strings: output ends before the first occurrence (checked by the emitter)
    stop_token_ids: tuple[int, ...] = ()  # in addition to the tokenizer's eos ids
    ignore_eos: bool = False  # decode past the tokenizer's eos ids (benchmarks)
    specdec: str | None = None  # speculative mode (native_v7 / prompt_lookup / target_only); None = target-only
    specdec_policy: str | None = None  # block policy override (fixed / opencode-sampled-v1 / residency-aware)
    processors: tuple = ()  # logits processors fn(tokens mx.array, logits [1, V]) -> logits (in-process only)
    presence_penalty: float = 0.0  # OpenAI penalties over the generated tokens, on the raw logits
    frequency_penalty: float = 0.0
    logprobs: bool = False  # report each token's log-probability (the model's own distribution)
    top_logprobs: int = 0  # ... and the k most likely alternatives at each position
    grammar: str | None = None  # an llguidance grammar (engine/constraints.py) every token must follow

    @property
    def host_bound(self) -> bool:
        """The next token's logits need this request's newest token on the host (penalties, a grammar)."""
        return self.grammar is not None or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def target_only(self) -> bool:
        """Uses what only the target-only batch implements (the scheduler keeps such requests there)."""
        return self.host_bound or self.logprobs or bool(self.processors)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and not self.processors and not self.host_bound

    def resolved(self) -> "SamplingParams":
        """These parameters with a seed (drawn when None)."""
        return self if self.seed is not None else msgspec.structs.replace(self, seed=random.getrandbits(62))
