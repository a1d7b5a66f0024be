"""Committing tokens to the caller: detokenize, stop at stop tokens / stop strings / max_tokens, and never
release a token past the stop, even when a whole accepted block arrives at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..batch import _hold_back


@dataclass
class SpecDecChunk:
    text: str  # text released by these tokens (stop-string prefixes are held back until resolved)
    token_ids: list[int] = field(default_factory=list)  # the tokens committed by one cycle, truncated at a stop
    finish_reason: str | None = None  # "stop" or "length" on the last chunk


class TokenEmitter:
    def __init__(self, tokenizer, stop_ids, stops, max_tokens: int):
        self.detok = tokenizer.detokenizer
        self.detok.reset()
        self.stop_ids = frozenset(stop_ids)
        self.stops = tuple(s for s in (stops or ()) if s)
        self.max_tokens = max_tokens
        self.tokens: list[int] = []
        self.sent = 0
        self.finish: str | None = None

    def replay(self, tokens, sent_chars: int | None = None) -> None:
        """Completion tokens delivered before this emitter took over (a replay after a restart, a request moved
        between engines): the text continues exactly where they left off. Not counted against ``max_tokens``.
        ``sent_chars``: how much of their text the caller has received (None: all of it); the rest (a partial
        stop-string match held back) is released or cut here, as if nothing had moved."""
        for t in tokens:
            if t not in self.stop_ids:
                self.detok.add_token(t)
        full = len(self.detok.text)
        self.sent = full if sent_chars is None else max(0, min(int(sent_chars), full))

    def push(self, new_tokens: list[int]) -> SpecDecChunk:
        """Commits ``new_tokens`` in order until one finishes the request; the rest are dropped."""
        kept, text = [], ""
        for t in new_tokens:
            if self.finish:
                break
            kept.append(t)
            self.tokens.append(t)
            text += self._one(t)
        return SpecDecChunk(text, kept, self.finish)

    def _one(self, t: int) -> str:
        if t in self.stop_ids:
            self.detok.finalize()
            self.finish = "stop"
            return self._release(len(self.detok.text))
        self.detok.add_token(t)
        if len(self.tokens) >= self.max_tokens:
            self.finish = "length"
            self.detok.finalize()
        full = self.detok.text
        if self.stops:
            start = max(0, self.sent - max(len(x) for x in self.stops))
            hits = [h for h in (full.find(x, start) for x in self.stops) if h >= 0]
            if hits:
                self.finish = "stop"
                return self._release(min(hits))
        return self._release(len(full) if self.finish else len(full) - _hold_back(full, self.stops))

    def _release(self, upto: int) -> str:
        text = self.detok.text[self.sent : max(upto, self.sent)]
        self.sent = max(upto, self.sent)
        return text
