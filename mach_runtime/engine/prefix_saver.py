"""The MLX-thread side of the prefix cache: restoring a hit into caches, capturing snapshots to save.

The integration surface a decode loop (today's Decoder actor, the scheduler tomorrow) needs is four calls:

* ``restore_prefix(kv, draft_model)`` at admission: a ``PrefixHit`` the Cache actor handed over (host snapshot +
  how many of the request's tokens it restores) becomes fresh MLX caches (a ``SpecDecKV``: a list of per-layer
  caches with ``n_tokens`` and the draft's context), anything else passes through;
* ``saver.admitted(request_id, extract, tokens, cached)`` right after a request's prefill: remembers a *lazy*
  capture of its caches (nothing is copied on the critical path) when it prefilled something worth keeping;
* ``saver.poll(has_emitted)`` after each decode step: captures whose request has emitted its first token (or has
  left) are copied to host arrays and handed to ``emit(snapshot, owner)`` (the Cache actor stores them in L1
  and writes them to L2 from a worker thread);
* ``saver.finished(kv, tokens, owner)`` when a request ends: its KV (prompt + completion; with the draft's
  context from a speculative run) as a host snapshot for the next turn ("continued generation").

``warm_prefill`` runs a ``warm_prefix`` request: the whole prefix is fed (no token is left for a step), so its
snapshot covers every token and carries the last logits.
"""

from __future__ import annotations

from dataclasses import dataclass

from .kv_snapshot import Snapshot, SnapshotUnsupported, capture


@dataclass(frozen=True)
class PrefixHit:
    """What a lookup hands the decode loop: restore ``snapshot``'s first ``n_tokens`` tokens."""

    snapshot: Snapshot
    n_tokens: int

    @property
    def logits(self):
        """The last restored token's logits (float32 numpy) when the hit covers the whole snapshot, else None."""
        return self.snapshot.logits if self.n_tokens == self.snapshot.n_tokens else None

    def materialize(self, draft_model=None):
        from .specdec.engine import SpecDecKV

        caches, n, draft_state = self.snapshot.restore(self.n_tokens, draft_model)
        return SpecDecKV(caches, n, draft_state)


def first_token(hit, prompt_ids, generated, params) -> int | None:
    """An exact hit (``hit`` restores every prompt token and holds the last logits): the request's first token,
    drawn from those logits by THE sampler with the request's parameters (position 0), as the forward it replaces
    would have; None otherwise (also for requests whose first draw needs more than the logits: penalties,
    grammars, logits processors, logprobs)."""
    if not isinstance(hit, PrefixHit) or hit.logits is None or generated or params.target_only:
        return None
    if hit.n_tokens != len(prompt_ids):
        return None
    import mlx.core as mx

    from .sampling import sample

    return int(sample(mx.array(hit.logits)[None], params.resolved(), 0).item())


def restore_prefix(kv, draft_model=None):
    """At admission: a ``PrefixHit`` -> MLX caches covering its tokens; other KV objects unchanged."""
    return kv.materialize(draft_model) if isinstance(kv, PrefixHit) else kv


_CANNOT = (SnapshotUnsupported, AttributeError, NotImplementedError)


class PrefixSaver:
    """Captures on the MLX thread; ``emit(snapshot, owner)`` receives host snapshots (thread-safe callable)."""

    def __init__(self, emit, min_tokens: int | None, fault=None):
        self.emit = emit
        # None: only sessions' own turns are kept (prefix_cache=False)
        self.min_tokens = max(1, int(min_tokens)) if min_tokens is not None else 1 << 62
        self.fault = fault  # fault(point, **info): the Decoder's fault hook (tests crash a save here)
        self.pending: dict[str, tuple[Snapshot, str | None]] = {}
        self.skipped = 0

    def admitted(self, request_id: str, extract, tokens, cached: int, owner: str | None = None) -> None:
        """After a prefill: ``extract()`` -> the request's single-request caches covering ``tokens``; worth a
        snapshot when they hold at least ``min_tokens`` tokens and more than the ``cached`` it reused."""
        if len(tokens) < self.min_tokens or cached >= len(tokens):
            return
        try:
            self.pending[request_id] = (capture(extract(), tokens), owner)
        except _CANNOT:  # a cache class (or a batch cache) without snapshot support: nothing is saved
            self.skipped += 1

    def poll(self, has_emitted) -> None:
        """Hands over the captures whose request ``has_emitted(request_id)`` (its first token is out, or it left)."""
        for rid in [r for r in self.pending if has_emitted(r)]:
            snap, owner = self.pending.pop(rid)
            self._emit(snap, owner)

    def drop(self, request_id: str) -> None:
        self.pending.pop(request_id, None)

    def wants(self, n_tokens: int, owner: str | None = None) -> bool:
        """Whether a finished request's KV of ``n_tokens`` tokens is worth extracting for ``finished``."""
        return n_tokens >= (1 if owner is not None else self.min_tokens)

    def finished(self, kv, tokens, owner: str | None = None) -> Snapshot | None:
        """A finished request's KV covering ``tokens`` as a host snapshot (the caller hands it to the Cache actor
        ahead of the request's end), or None."""
        if kv is None or not self.wants(len(tokens), owner):
            return None
        try:
            snap = capture(kv, tokens, draft_state=getattr(kv, "draft_state", None))
        except _CANNOT:
            self.skipped += 1
            return None
        return self._host(snap)

    def _host(self, snap: Snapshot) -> Snapshot:
        if self.fault is not None:
            self.fault("snapshot", tokens=snap.n_tokens)
        return snap.to_host()

    def _emit(self, snap: Snapshot, owner) -> None:
        self.emit(self._host(snap), owner)


def warm_prefill(model, tokens, kv, cached: int, step: int = 512, make_cache=None):
    """Feeds ``tokens[cached:]`` into ``kv`` (a fresh cache when None) in chunks; returns a host snapshot covering
    every token, with the last token's logits."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    if kv is None:
        kv, cached = (make_cache() if make_cache is not None else make_prompt_cache(model)), 0
    kv = list(kv)
    rest = list(tokens[cached:])
    logits = None
    for start in range(0, len(rest), step):
        logits = model(mx.array([rest[start : start + step]]), cache=kv)[0, -1]
        mx.eval([c.state for c in kv] + [logits])
    return capture(kv, tokens, logits=logits).to_host()
