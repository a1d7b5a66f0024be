"""THE emitter: when a request ends, and what text its tokens release.

Split as vLLM v1 splits it: the engines emit token ids and end a request only on token-level conditions
(``StopRule``: a stop token — the tokenizer's eos unless ``ignore_eos``, plus ``stop_token_ids`` — or
``max_tokens``); the front end (the Supervisor's request ledger, or a standalone generator) runs one ``Emitter``
per request over the delivered ids: streaming detokenization, stop strings (text from the first occurrence on is
never released; a suffix that could still become a stop string is held back until it resolves) and the finish
reason. A request that moves between lanes or is replayed after a crash needs no text state: the ledger's
emitter simply continues with the next token.
"""

from __future__ import annotations


class StopRule:
    """Token-level end of a request (the engines' half of the emitter)."""

    def __init__(self, params, eos):
        self.stop_ids = (frozenset() if getattr(params, "ignore_eos", False) else frozenset(eos)) | frozenset(
            params.stop_token_ids)
        self.max_tokens = params.max_tokens

    def finish(self, token: int, n: int) -> str | None:
        """The finish reason once ``token`` is the ``n``-th completion token, or None."""
        if token in self.stop_ids:
            return "stop"
        return "length" if n >= self.max_tokens else None

    def cut(self, tokens: list[int], n_before: int) -> tuple[list[int], str | None]:
        """Commits ``tokens`` (after ``n_before`` completion tokens) in order until one ends the request."""
        for i, t in enumerate(tokens):
            reason = self.finish(t, n_before + i + 1)
            if reason:
                return tokens[: i + 1], reason
        return list(tokens), None


def hold_back(text: str, stops) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class Emitter:
    """Token ids in, text out: ``push(ids) -> (text, finish_reason, kept)``; ``kept`` tokens of ``ids`` are part
    of the completion (a stop token or the token completing a stop string is the last one kept)."""

    def __init__(self, tokenizer, params, eos=None):
        self.rule = StopRule(params, tokenizer.eos_token_ids if eos is None else eos)
        self.stops = tuple(s for s in ((params.stop,) if isinstance(params.stop, str) else params.stop or ()) if s)
        self.detok = tokenizer.detokenizer  # a fresh streaming detokenizer per access
        self.detok.reset()
        self.tokens: list[int] = []
        self.sent = 0  # characters of the detokenizer's text released
        self.finish: str | None = None
        self.stop_sequence: str | None = None  # the stop string that ended the request, if one did

    def push(self, ids) -> tuple[str, str | None, int]:
        text, kept = "", 0
        for t in ids:
            if self.finish:
                break
            kept += 1
            self.tokens.append(int(t))
            text += self._one(int(t))
        return text, self.finish, kept

    def close(self, reason: str) -> str:
        """Ends the request for ``reason`` (the engine's, e.g. an abort); returns text still held back."""
        if self.finish:
            return ""
        self.finish = reason
        self.detok.finalize()
        return self._release(len(self.detok.text))

    def _one(self, t: int) -> str:
        reason = self.rule.finish(t, len(self.tokens))
        if reason == "stop":
            self.finish = "stop"
            self.detok.finalize()
            return self._release(len(self.detok.text))
        self.detok.add_token(t)
        if reason:
            self.finish = reason
            self.detok.finalize()
        full = self.detok.text
        if self.stops:
            start = max(0, self.sent - max(len(x) for x in self.stops))
            hits = [(h, x) for x in self.stops if (h := full.find(x, start)) >= 0]
            if hits:
                self.finish = "stop"
                at, self.stop_sequence = min(hits, key=lambda hx: hx[0])  # the first occurrence (first listed on a tie)
                return self._release(at)
        return self._release(len(full) if self.finish else len(full) - hold_back(full, self.stops))

    def _release(self, upto: int) -> str:
        text = self.detok.text[self.sent : max(upto, self.sent)]
        self.sent = max(upto, self.sent)
        return text
