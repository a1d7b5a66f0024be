"""The MLX-thread side of the prefix cache: restoring a hit into caches, capturing snapshots to save.

The integration surface a decode loop (today's Decoder actor, the scheduler tomorrow) needs is four calls:

* ``restore_prefix(kv, draft_model)`` at admission: a ``PrefixHit`` the Cache actor handed over (host snapshot +
  how many of the request's tokens it restores) becomes fresh MLX caches (a ``SpecDecKV``: a list of per-layer
  caches with ``n_tokens`` and the draft's context), anything else passes through;
* ``saver.admitted(request_id, extract, tokens, cached)`` right after a request's prefill: remembers a *lazy*
  capture of its caches (nothing is copied on the critical path) when it prefilled something worth keeping;
* ``saver.poll(has_emitted)`` after each decode step: captures whose request has emitted its first token (or has
  left) are materialised (evaluated; numpy views of the buffers) and handed to ``emit(snapshot, owner)`` (the
  Cache actor copies them to host memory in a worker thread) (the Cache actor stores them in L1
  and writes them to L2 from a worker thread);
* ``saver.finished(kv, tokens, owner)`` when a request ends: its KV (prompt + completion; with the draft's
  context from a speculative run) as a host snapshot for the next turn ("continued generation").

``warm_prefill`` runs a ``warm_prefix`` request: the whole prefix is fed (no token is left for a step), so its
snapshot covers every token and carries the last logits; it prefills through ``batch.boundary_prefill`` like every
lane, so exact-only caches get their block-boundary snapshots from it too.
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
MAX_BOUNDARIES = 4  # boundary snapshots per request (each one a prefill chunk split + a copy of its caches)


class PrefixSaver:
    """Captures on the MLX thread; ``emit(snapshot, owner)`` receives host snapshots (thread-safe callable)."""

    def __init__(self, emit, min_tokens: int | None, fault=None, exact_only=False):
        self.emit = emit
        # None: only sessions' own turns are kept (prefix_cache=False)
        self.min_tokens = max(1, int(min_tokens)) if min_tokens is not None else 1 << 62
        self.fault = fault  # fault(point, **info): the Decoder's fault hook (tests crash a save here)
        # the model's caches cannot be cut to a shorter prefix (GatedDeltaNet state, sliding windows, compressed
        # KV): snapshots at block boundaries during prefill give later requests partial-prefix points. A bool, or a
        # callable deciding it on first use (on the MLX thread: it may build the model's caches)
        self._exact_only = exact_only
        self.pending: dict[tuple[str, int], tuple[Snapshot, str | None]] = {}  # (request, tokens) -> capture
        self.skipped = 0

    @property
    def exact_only(self) -> bool:
        if callable(self._exact_only):
            self._exact_only = bool(self._exact_only())
        return self._exact_only

    def boundaries(self, n_prompt: int, cached: int) -> tuple:
        """Token counts at which a fresh prompt of ``n_prompt`` tokens (``cached`` of them restored) is snapshotted
        during its prefill: for exact-only caches, at most ``MAX_BOUNDARIES`` multiples of the block size
        (``min_tokens``) between ``cached`` and the prefill's end (``n_prompt - 1``, snapshotted anyway): the last
        one and those at 1/2, 1/4 ... of the prompt, so a later request sharing any part of it restores a
        boundary at least half as long as what it shares with it (of the last block multiple's length)."""
        block, end = self.min_tokens, n_prompt - 1
        if not self.exact_only or end < 2 * block:
            return ()
        out, t = set(), end
        while t > cached and len(out) < MAX_BOUNDARIES:
            b = t // block * block
            if b <= cached or b < block:
                break
            if b < end:
                out.add(b)
            t //= 2
        return tuple(sorted(out))

    def admission_point(self, n_prompt: int, cached: int) -> tuple:
        """For exact-only caches, the boundary at ``n_prompt - 1`` where the admission snapshot is taken: the batch
        lane's prefill feeds the last prompt token too (its logits give the first token), and such caches cannot
        be cut back to the tokens before it afterwards. () otherwise."""
        end = n_prompt - 1
        return (end,) if self.exact_only and end >= self.min_tokens and cached < end else ()

    def admitted(self, request_id: str, extract, tokens, cached: int, owner: str | None = None) -> None:
        """After a prefill: ``extract()`` -> the request's single-request caches covering ``tokens`` (or more:
        ``capture`` cuts them); worth a snapshot when they hold at least ``min_tokens`` tokens and more than the
        ``cached`` it reused. Skipped when a boundary capture (``admission_point``) already covers ``tokens``."""
        if len(tokens) < self.min_tokens or cached >= len(tokens) or (request_id, len(tokens)) in self.pending:
            return
        try:
            self.pending[(request_id, len(tokens))] = (capture(extract(), tokens), owner)
        except _CANNOT:  # a cache class (or a batch cache) without snapshot support: nothing is saved
            self.skipped += 1

    def boundary(self, request_id: str, extract, tokens, owner: str | None = None) -> None:
        """Mid-prefill, at one of the request's ``boundaries``: its caches covering ``tokens``, captured and
        materialised on the device now (the live caches move on), copied to the host after its first token."""
        import mlx.core as mx

        try:
            snap = capture(extract(), tokens)
        except _CANNOT:
            self.skipped += 1
            return
        mx.async_eval([a for a in snap.arrays.values() if isinstance(a, mx.array)])
        self.pending[(request_id, len(tokens))] = (snap, owner)

    def poll(self, has_emitted) -> None:
        """Hands over the captures whose request ``has_emitted(request_id)`` (its first token is out, or it left)."""
        for key in [k for k in self.pending if has_emitted(k[0])]:
            snap, owner = self.pending.pop(key)
            self._emit(snap, owner)

    def drop(self, request_id: str) -> None:
        """A finished request: its admission capture is covered by the finish snapshot when caches can be cut;
        exact-only captures are not (they are handed over at the next ``poll``)."""
        if not self.exact_only:
            for key in [k for k in self.pending if k[0] == request_id]:
                self.pending.pop(key)

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
        return self.materialized(snap)

    def materialized(self, snap: Snapshot) -> Snapshot:
        """Materialised on the device (MLX thread); the Cache actor copies it to host memory in a worker thread
        (``Snapshot.copy_views``) before storing it."""
        if self.fault is not None:
            self.fault("snapshot", tokens=snap.n_tokens)
        return snap.materialize()

    def _emit(self, snap: Snapshot, owner) -> None:
        self.emit(self.materialized(snap), owner)


def warm_prefill(model, tokens, kv, cached: int, step: int = 512, make_cache=None, boundaries=(),
                 on_boundary=None, request_id: str = "warm") -> Snapshot:
    """Feeds ``tokens[cached:]`` into ``kv`` (a fresh cache when None) in chunks, through the prefill every lane runs
    (``batch.boundary_prefill``: ``on_boundary`` at each of ``boundaries``, as ``PrefixSaver.boundary`` takes it);
    returns the (lazy) capture covering every token, with the last token's logits: ``PrefixSaver.materialized``
    evaluates it and the Cache actor copies it to the host off the MLX thread."""
    from mlx_lm.models.cache import make_prompt_cache

    from .batch import boundary_prefill

    if kv is None:
        kv, cached = (make_cache() if make_cache is not None else make_prompt_cache(model)), 0
    from .model_head import ModelHead

    kv = list(kv)
    tokens = [int(t) for t in tokens]
    head, width, last = ModelHead(model), len(tokens) - cached, {}

    def forward(rows, start):
        end = start + rows.shape[1]
        if end < width:  # only the last token's logits are kept: earlier chunks skip the head (never evaluated)
            head.inner(rows, kv) if head.splits else model(rows, cache=kv)
            return None
        out = head.inner(rows, kv) if head.splits else model(rows, cache=kv)
        last["logits"] = head.logits_of(out, [0], [rows.shape[1] - 1])[0]
        return last["logits"]

    boundary_prefill([], kv, [(request_id, tokens, cached, boundaries, tokens[cached:])], step, forward,
                     on_boundary, lambda row: kv).finish()
    return capture(kv, tokens, logits=last["logits"])
