"""THE request-parameter type (no MLX here: the actors' messages and the server import it)."""

from __future__ import annotations

import random

import msgspec


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and not self.processors

    def resolved(self) -> "SamplingParams":
        """These parameters with a seed (drawn when None)."""
        return self if self.seed is not None else msgspec.structs.replace(self, seed=random.getrandbits(62))
