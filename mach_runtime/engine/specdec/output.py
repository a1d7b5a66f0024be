"""Committing a speculative cycle's tokens: never past a request's end, even when a whole accepted block arrives
at once. Token-level ends (``emit.StopRule``) always; text and stop strings only where the caller wants text
(``BlockSpecDecEngine.generate`` used standalone: an ``emit.Emitter`` attached). The runtime's scheduler takes
token ids only; the Supervisor's ledger runs the emitter."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..emit import Emitter, StopRule


@dataclass
class SpecDecChunk:
    text: str  # text released by these tokens ("" when the run emits token ids only)
    token_ids: list[int] = field(default_factory=list)  # the tokens committed by one cycle, truncated at an end
    finish_reason: str | None = None  # "stop" or "length" on the last chunk


class Committer:
    """A request's new tokens after ``n_before`` already delivered (counted in ``rule.max_tokens``)."""

    def __init__(self, rule: StopRule, n_before: int = 0, emitter: Emitter | None = None):
        self.rule = rule
        self.n_before = n_before
        self.emitter = emitter
        self.max_tokens = rule.max_tokens - n_before  # new tokens this run may commit
        self.tokens: list[int] = []
        self.finish: str | None = None

    def push(self, new: list[int]) -> SpecDecChunk:
        """Commits ``new`` in order until one ends the request; the rest are dropped."""
        if self.finish:
            return SpecDecChunk("", [], self.finish)
        kept, finish = self.rule.cut([int(t) for t in new], self.n_before + len(self.tokens))
        text = ""
        if self.emitter is not None:
            text, by_text, k = self.emitter.push(kept)
            kept, finish = kept[:k], by_text or finish
        self.tokens += kept
        self.finish = finish
        return SpecDecChunk(text, kept, finish)
