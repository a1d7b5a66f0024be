"""The Decoder's prefix-cache hooks (a mixin of ``actors.decoder.Decoder``): what the decode loop does for the
prefix cache beyond the four calls of ``engine.prefix_saver`` (restore at admission, capture after a prefill,
poll after a step, snapshot at the end).

* ``_store_then_finish``: a finished request's KV goes to the Cache actor as a host snapshot before its Finish;
* ``_exact_hit``: a hit covering the whole prompt with its last logits delivers the first token without a forward;
* ``_warm``: a ``warm_prefix`` request prefills every token and stores the snapshot, generating nothing.
"""

from __future__ import annotations

from msgspec.structs import replace

from mach_runtime.engine.prefix_saver import first_token, restore_prefix, warm_prefill
from mach_runtime.errors import MachError

from .messages import CacheInsert, Finish, RequestFailed, Submit, TokenOutput


class DecoderPrefixCache:
    def _store_then_finish(self, kv, tokens, owner, finish) -> None:
        """Hands a finished request's KV to the Cache actor as a host snapshot, then delivers ``finish``: the
        Cache actor holds the snapshot before the caller sees the end of the turn (a session's next lookup would
        otherwise race the insert)."""
        snap = self.saver.finished(kv, tokens, owner) if kv is not None else None
        if snap is None:
            self._post(finish)
            return
        handle = self.kv_table.put(snap)
        self._post(lambda: self.cache_inbox(CacheInsert(owner, handle, tuple(tokens)),
                                            then=lambda: self.sink(finish)))

    def _exact_hit(self, sub: Submit, kv) -> Submit:
        """A hit restoring every prompt token with its last logits: the first token is sampled from them and
        delivered now; the request then joins like a replayed one (the KV covers the prompt, the token is fed by the
        next step), so nothing runs before its first token."""
        t = first_token(kv, sub)
        if t is None:
            return sub
        detok = self.tokenizer.detokenizer
        detok.reset()
        stops = self.engine.eos | frozenset(sub.params.stop_token_ids)
        if t not in stops:
            detok.add_token(t)
        self._post(TokenOutput(sub.request_id, 0, (t,), detok.text))
        self.counters["generated"] += 1
        return replace(sub, resume_ids=(t,), resume_chars=len(detok.text))

    def _emit_snapshot(self, snap, owner) -> None:
        handle = self.kv_table.put(snap)
        self._post(lambda: self.cache_inbox(CacheInsert(owner, handle, ())))

    def _emitted(self, request_id: str) -> bool:
        """The request has emitted its first token, or is no longer running."""
        for m in list(self.engine.seqs) + (list(self.spec_batch.rows) if self.spec_batch is not None else []):
            if m.request_id == request_id:
                return len(m.generated) > 0
        return True

    def _draft_model(self):
        return getattr(self.spec, "draft", None) if self.spec is not None else None

    def _warm(self, sub: Submit) -> None:
        """``warm_prefix``: feeds every prompt token (from the cached prefix on), snapshots the caches with the
        last logits for the Cache actor, generates nothing."""
        kv = self.kv_table.take(sub.cache_handle) if sub.cache_handle is not None else None
        self._fault("admit", request_id=sub.request_id)
        try:
            kv = restore_prefix(kv, self._draft_model())
            cached = kv.n_tokens if kv is not None else 0
            snap = warm_prefill(self.model, sub.prompt_ids, kv, cached)
        except MachError as e:
            self._post(RequestFailed(sub.request_id, str(e)))
            return
        n = len(sub.prompt_ids)
        self.counters["prefilled"] += n - cached
        self.counters["cached"] += cached
        finish = Finish(request_id=sub.request_id, reason="length", prompt_tokens=n, completion_tokens=0,
                        cached_tokens=cached, prefilled_tokens=n - cached)
        handle = self.kv_table.put(snap)
        self._post(lambda: self.cache_inbox(CacheInsert(None, handle, tuple(sub.prompt_ids)),
                                            then=lambda: self.sink(finish)))
        self._flush()
