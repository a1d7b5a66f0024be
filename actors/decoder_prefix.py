"""The Decoder's prefix-cache hooks (a mixin of ``actors.decoder.Decoder``), around ``engine.prefix_saver``:

* ``_request``: a Submit becomes a scheduler ``Request``; a ``PrefixHit`` handed over by the Cache actor is
  restored into MLX caches, and an exact hit (every prompt token, with the last logits) delivers the first token
  at once (no forward) and joins like a replayed request;
* ``_prefilled`` (the scheduler's ``on_prefilled``) + ``saver.poll`` after each step: a fresh prompt's prefill is
  captured lazily and handed to the Cache actor after its first token;
* ``_boundary`` (every lane's ``on_boundary``: batch, spec batch, solo, ``warm_prefix``): for caches that cannot be
  cut (GatedDeltaNet state, sliding windows, compressed KV), a fresh prompt is also captured at up to 4 block
  boundaries during its (chunked) prefill (``PrefixSaver.boundaries``), handed over after its first token too:
  partial-prefix points;
* ``_store_then_finish``: a finished request's KV goes to the Cache actor as a host snapshot before its Finish;
* ``_warm``: a ``warm_prefix`` request prefills every token (with boundary snapshots, as a lane would) and stores
  the snapshot, generating nothing; like every snapshot it is only materialised on the MLX thread, copied to the
  host by the Cache actor.
"""

from __future__ import annotations

from mach_runtime.engine.prefix_saver import first_token, restore_prefix, warm_prefill
from mach_runtime.engine.scheduler import Request
from mach_runtime.errors import MachError

from .messages import CacheInsert, Finish, RequestFailed, Submit, TokenOutput


def exact_only(model) -> bool:
    """Whether some layer of the model's prompt cache cannot be cut to a shorter prefix (``kv_snapshot``)."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache

    return not all(isinstance(c, (KVCache, QuantizedKVCache)) for c in make_prompt_cache(model))


class DecoderPrefixCache:
    def _request(self, m: Submit, kv) -> Request:
        generated = tuple(m.resume_ids)
        t = first_token(kv, m.prompt_ids, generated, m.params)
        if t is not None:  # delivered now; the KV covers the prompt and the next step feeds t
            self._outbox.append(TokenOutput(m.request_id, 0, (t,)))
            self.sched.counters["generated"] += 1
            generated = (t,)
        draft = getattr(self.sched.spec, "draft", None) if self.sched.spec is not None else None
        kv = restore_prefix(kv, draft)  # a prefix-cache hit: host snapshot -> MLX caches
        store = self.saver is not None and self.saver.wants(len(m.prompt_ids), m.session_id)
        cached = m.cached_tokens if kv is not None else 0
        # exact-only caches: snapshot points at block boundaries of a fresh prompt's prefill
        points = ()
        if self.saver is not None and not generated:
            n = len(m.prompt_ids)
            points = tuple(sorted({*self.saver.boundaries(n, cached), *self.saver.admission_point(n, cached)}))
        return Request(m.request_id, m.prompt_ids, m.params, generated, kv, cached, store, boundaries=points)

    def _prefilled(self, request_id, extract, tokens, cached) -> None:
        self.saver.admitted(request_id, extract, tokens, cached, self._sessions.get(request_id))

    def _boundary(self, request_id, extract, tokens) -> None:
        self.saver.boundary(request_id, extract, tokens, self._sessions.get(request_id))

    def _emitted(self, request_id: str) -> bool:
        """The request's first token has been handed to the sink (``_flush``), or it is no longer running."""
        if request_id in self._delivered:
            return True
        s = self.sched
        if s.prefill is not None and request_id in s.prefill[1].request_ids:
            return False
        return not any(m.request_id == request_id for m in list(s.batch.seqs) + (
            list(s.spec_batch.rows) if s.spec_batch is not None else []))

    def _emit_snapshot(self, snap, owner) -> None:
        handle = self.kv_table.put(snap)
        self._outbox.append(lambda: self.cache_inbox(CacheInsert(owner, handle, ())))

    def _store_then_finish(self, kv, tokens, owner, finish) -> None:
        """Hands a finished request's KV to the Cache actor as a host snapshot, then delivers ``finish``: the
        Cache actor holds it before the caller sees the end of the turn (a session's next lookup would otherwise
        race the insert)."""
        snap = self.saver.finished(kv, tokens, owner) if self.saver is not None else None
        if snap is None:
            self._outbox.append(finish)
            return
        handle = self.kv_table.put(snap)
        self._outbox.append(lambda: self.cache_inbox(CacheInsert(owner, handle, tuple(tokens)),
                                                     then=lambda: self.sink(finish)))

    def _warm(self, sub: Submit) -> None:
        """``warm_prefix``: feeds every prompt token (from the cached prefix on), snapshots the caches with the
        last logits for the Cache actor, generates nothing."""
        kv = self.kv_table.take(sub.cache_handle) if sub.cache_handle is not None else None
        self._fault("admit", request_id=sub.request_id)
        try:
            draft = getattr(self.sched.spec, "draft", None) if self.sched.spec is not None else None
            kv = restore_prefix(kv, draft)
            cached = kv.n_tokens if kv is not None else 0
            saver = self.saver
            n = len(sub.prompt_ids)
            points = saver.boundaries(n + 1, cached) if saver is not None else ()  # (the whole prompt is fed)
            snap = warm_prefill(self.sched.model, sub.prompt_ids, kv, cached, boundaries=points,
                                on_boundary=self._boundary if points else None, request_id=sub.request_id)
            snap = saver.materialized(snap) if saver is not None else snap.materialize()
        except MachError as e:
            self._outbox.append(RequestFailed(sub.request_id, str(e)))
            return
        if saver is not None:  # its boundary snapshots reach the Cache actor ahead of the whole prefix's
            saver.poll(lambda rid: rid == sub.request_id)
        self.sched.counters["prefilled"] += n - cached
        self.sched.counters["cached"] += cached
        finish = Finish(request_id=sub.request_id, reason="length", prompt_tokens=n, completion_tokens=0,
                        cached_tokens=cached, prefilled_tokens=n - cached)
        handle = self.kv_table.put(snap)
        self._outbox.append(lambda: self.cache_inbox(CacheInsert(None, handle, tuple(sub.prompt_ids)),
                                                     then=lambda: self.sink(finish)))
        self._flush()
