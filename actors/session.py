"""A session: a multi-turn conversation over a ``Runtime`` whose KV cache stays warm between turns
(``Runtime.session``)."""

from __future__ import annotations

from mach_runtime.errors import RequestError

from .messages import CacheRelease
from .slot import Chunk, Completion


class Session:
    """A multi-turn conversation whose KV cache stays warm between turns (no re-prefill of earlier turns).

    Turn N's prompt is built at the token level: the exact tokens of turn N-1 (its prompt and the reply as
    generated) followed by the chat template's text between that reply and the new assistant turn. The template
    text is found by rendering the conversation with a marker in place of the last reply, so the reply's own
    tokens are never re-tokenized and the Cache actor's KV covers the whole history.
    """

    _MARK = "\ue000mach-reply\ue000"

    def __init__(self, rt, system: str | None, session_id: str):
        self.rt = rt
        self.session_id = session_id
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self._prompt_text: str | None = None  # rendered text of the latest turn's prompt
        self._history_ids: list[int] | None = None  # that prompt's tokens + the reply's tokens
        self._ended_with_eos = False
        self.turns: list[Completion] = []

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        if not self.rt._sup.closed:
            self.rt._sup.cache.deliver(CacheRelease(self.session_id))

    def _render(self, msgs) -> str:
        return self.rt.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def _prompt_ids(self, user: str) -> tuple[list[int], str]:
        tok = self.rt.tokenizer
        user_msg = {"role": "user", "content": user}
        text = self._render(self.messages + [user_msg])
        if self._history_ids is not None:
            marked = self._render(self.messages[:-1] + [{"role": "assistant", "content": self._MARK}, user_msg])
            before, found, after = marked.partition(self._MARK)
            if found and before == self._prompt_text:
                if self._ended_with_eos:  # the template's end-of-turn text is already there as a token
                    eos_text = tok.decode(self._history_ids[-1:])
                    after = after[len(eos_text) :] if after.startswith(eos_text) else after
                return self._history_ids + tok.encode(after, add_special_tokens=False), text
        return tok.encode(text, add_special_tokens=False), text

    def send(self, user: str, **params):
        """Streams the assistant's reply to ``user``; the turn is recorded when the last chunk arrives."""
        if not isinstance(user, str):
            raise RequestError(f"the user message must be a string, got {type(user).__name__}")
        ids, text = self._prompt_ids(user)
        parts: list[Chunk] = []

        def collect(chunk: Chunk) -> None:
            parts.append(chunk)
            if chunk.finish_reason is not None:
                self._record(user, ids, text, parts)

        return self.rt._stream_ids(ids, session_id=self.session_id, on_chunk=collect, **params)

    def _record(self, user: str, prompt_ids: list[int], prompt_text: str, parts: list[Chunk]) -> None:
        reply = "".join(c.text for c in parts)
        gen = [t for c in parts for t in c.token_ids]
        self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        self._prompt_text = prompt_text
        self._history_ids = list(prompt_ids) + gen
        self._ended_with_eos = bool(gen) and gen[-1] in self.rt.tokenizer.eos_token_ids
        last = parts[-1]
        self.turns.append(Completion(request_id=last.request_id, text=reply, token_ids=tuple(gen),
                                     finish_reason=last.finish_reason, usage=last.usage))
