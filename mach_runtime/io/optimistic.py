"""Optimistic streaming forwards: hits cost no host sync; misses are found once per forward and redone exactly.

Per-layer routing readback serialised every MoE layer on accelerators (0.17x stacked on an H200 with every
expert resident). Here a forward runs *assuming every expert it routes to is resident*:

* each bank keeps its expert -> slot table on the device (``DiskSwitchGLU.slot_of``; a missing expert maps to
  slot 0, so the forward stays finite but that layer's output is wrong); the gather indices of resident
  experts are computed there (``slot_of[indices]``), and the layer's routing is recorded lazily;
* after the forward, ONE readback of every layer's routing (a concatenation of the recorded indices) checks the
  host tables: when every expert was resident the forward is exact (the same slots, the same gather matmuls
  as the synchronous path) and the bookkeeping (hits, eviction policy, trace, routing observers) is done then;
* when any layer missed, the forward is rolled back (its tokens trimmed from every KV cache) and redone: first
  *retried* optimistically after loading the experts of the first call that missed (its routing is exact, every
  call before it was), up to ``MAX_RETRIES`` times, then in *sync mode* — the per-layer path that reads routing,
  loads misses and token-groups oversized calls. The outputs are those of stacked residency either way.

Two ways to use it:

* **eager** (any caller, e.g. speculative verify, batched decode): ``load_moe`` puts a hook (``engine/hooks.py``)
  in place of the text model; each call checks at its own end (one sync per forward instead of one per MoE
  layer) and returns a verified output;
* **deferred** (a pipelined decode loop, ``engine/generate.py``): ``ForwardGuard.begin()`` before a step makes
  the next forward unchecked; the loop queues the following step before it ``verify()``s the earlier one, so the
  host builds step t+1 while the device runs step t, exactly as stacked decoding does. A miss rolls back both
  steps (their tokens leave the caches) and the loop redoes the step (``ForwardGuard.redo()``: retried, else sync
  mode), then queues the next one again.

Optimism needs caches it can roll back exactly: ``KVCache``-like caches (trim), and sliding-window caches that
have not wrapped within the forward. Other caches (GatedDeltaNet state, compressed caches), long forwards
(prefill chunks; see also prefill_arena.py) and a bank that keeps missing (``backoff``: an isolated miss costs
nothing more, consecutive ones send the next 1, 2, 4 ... 32 forwards to sync mode, reset by the next clean
optimistic forward) run in sync mode.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ..engine.hooks import ModuleHook, find_hook
from ..engine.hooks import install as install_hook

# forwards with more token rows than this run in sync mode (prefill chunks: their experts rarely all fit)
MAX_OPTIMISTIC_ROWS = 32
MAX_BACKOFF = 32
MAX_RETRIES = 2  # optimistic retries of a forward that missed, each after loading the first missing layer


@dataclass
class ForwardRecord:
    """The routing one optimistic forward recorded: (bank, lazy indices [rows, k], bank version) per MoE call."""

    seq: int
    entries: list = field(default_factory=list)
    flat: object = None  # every entry's indices, flattened and concatenated (one lazy array)
    queued: bool = False  # flat was handed to mx.async_eval
    extra: int = 0  # values appended to flat after the routing (the step's sampled token: ForwardGuard.outputs)
    extra_host: object = None  # those values, read back by the check

    def close(self):
        """Builds ``flat`` (lazy). A deferred forward's caller queues it together with the forward's own output
        (``ForwardGuard.outputs()``), so checking it later waits for this forward's routers only, never for a
        forward queued after it, and the graph is walked once."""
        import mlx.core as mx

        if self.entries:
            idx = [i for _, i, _ in self.entries]
            if all(i.shape == idx[0].shape and i.dtype == idx[0].dtype for i in idx):
                # one kernel (stack takes the strided top-k slices as they are); flattened, the same layout as the
                # concatenation of each call's flattened indices
                self.flat = mx.stack(idx).reshape(-1)
            else:
                self.flat = mx.concatenate([i.reshape(-1) for i in idx])


def rollback_ok(cache, tokens: int) -> bool:
    """Whether every cache can drop the last ``tokens`` tokens of a forward exactly (see the module docstring)."""
    from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache, RotatingKVCache

    if cache is None:
        return True
    for c in cache:
        if isinstance(c, RotatingKVCache):
            if not (c.is_trimmable() and c.offset + tokens <= c.max_size):
                return False
        elif not isinstance(c, (KVCache, BatchKVCache, QuantizedKVCache)):
            return False
    return True


def trim_caches(cache, tokens: int) -> None:
    if cache is not None and tokens:
        for c in cache:
            c.trim(tokens)


class OptimisticRunner:
    """The streaming store's forward policy (one per store; used on the MLX thread only)."""

    def __init__(self, store):
        self.store = store
        self.enabled = True
        self._recording: ForwardRecord | None = None  # the forward being built optimistically
        self._sync_depth = 0  # > 0 while a forward must take the per-layer path
        self._deferred_next = False  # set by ForwardGuard.begin(): the next forward is checked by the caller
        self.pending: list[ForwardRecord] = []  # deferred forwards not yet verified (oldest first)
        self.seq = 0  # forwards so far (a ForwardGuard checkpoint names the one its step runs)
        self.active_guard = None  # the ForwardGuard of the decode loop using deferred checks, if any
        self.pending_failed = False  # a deferred forward failed a check forced by a sync forward
        self._skip = 0  # sync-mode forwards left before optimism is tried again
        self._backoff = 0  # the next skip after a miss: 0 for an isolated miss, doubling while misses repeat
        self._retry_next = False  # set by ForwardGuard.redo(): the next forward is a retry of one that missed
        self.first_miss = None  # (bank, host routing) of the first MoE call the last failed check found missing
        self.retried_forwards = 0
        # counters (store.stats() reports them)
        self.optimistic_forwards = 0
        self.redone_forwards = 0
        self.sync_forwards = 0
        self.host_syncs = 0  # routing readbacks (one per verified forward or group; one per layer in sync mode)

    # -- called by DiskSwitchGLU ---------------------------------------------------------------------------
    @property
    def recording(self) -> ForwardRecord | None:
        return self._recording if self._sync_depth == 0 else None

    def record(self, bank, indices) -> None:
        self._recording.entries.append((bank, indices, bank.version))

    # -- called by the model's __call__ ------------------------------------------------------------------------
    def _recorded(self, run, seq: int):
        """``run()`` with every MoE call's routing recorded lazily: (its output, the closed ForwardRecord)."""
        rec = ForwardRecord(seq)
        self._recording = rec
        try:
            out = run()
        finally:
            self._recording = None
        rec.close()
        return out, rec

    def forward(self, run, rows: int, tokens: int, cache):
        """Runs ``run()`` (the model's own forward) optimistically where it can; see the module docstring."""
        deferred, self._deferred_next = self._deferred_next, False
        seq, self.seq = self.seq, self.seq + 1
        if self.store.arena is not None and rows <= MAX_OPTIMISTIC_ROWS:
            self.store.arena = None  # prefill is over: the transient arena's memory goes back
        eligible = (self.enabled and not self._sync_depth and rows <= MAX_OPTIMISTIC_ROWS
                    and rollback_ok(cache, tokens))
        if eligible and self._skip and not self._retry_next:
            self._skip -= 1
            eligible = False
        if eligible and self._retry_next:  # a deferred step that missed, redone by its loop
            self._retry_next = False
            return self.retry(run, tokens, cache)
        self._retry_next = False
        if not eligible:
            if self.pending and not self._sync_depth:
                # a sync forward may load experts: settle the deferred ones first (their tables must not move)
                if not self.verify(self.pending):
                    self.pending_failed = True
                self.pending = []
            return self._sync_forward(run)
        out, rec = self._recorded(run, seq)
        self.optimistic_forwards += 1
        if deferred:
            self.pending.append(rec)
            return out
        if self.verify([rec]):
            return out
        trim_caches(cache, tokens)
        self.redone_forwards += 1
        return self.retry(run, tokens, cache)

    def _sync_forward(self, run):
        self.sync_forwards += 1
        with self.sync_mode():
            return run()

    @contextmanager
    def sync_mode(self):
        self._sync_depth += 1
        try:
            yield
        finally:
            self._sync_depth -= 1

    # -- verification --------------------------------------------------------------------------------------
    def verify(self, records: list[ForwardRecord], loaded: dict | None = None) -> bool:
        """One routing readback for ``records``: True (and bookkeeping done) when every expert was resident.

        On a miss, ``first_miss`` names the first MoE call that missed and its routing (correct: every call
        before it was exact); ``loaded`` (bank index -> experts loaded by a retry of this forward) keeps those
        from being counted as hits too.
        """
        self.first_miss = None
        entries = [e for r in records for e in r.entries]
        if not entries:
            return True
        chunks = []
        for r in records:
            if r.flat is not None:
                h = np.array(r.flat).reshape(-1)  # THE sync (one per record; a decode step verifies one)
                if r.extra:
                    r.extra_host, h = h[-r.extra :], h[: -r.extra]
                chunks.append(h)
        host = np.concatenate(chunks)
        self.store.count_sync()
        self.host_syncs += 1
        parts, pos = [], 0
        for bank, idx, version in entries:
            k = idx.shape[-1]
            n = idx.size
            parts.append((bank, host[pos : pos + n].reshape(-1, k), version))
            pos += n
        # one vectorised residency check over every call (decode: 1 row per call), then the first miss
        if all(p[1].shape == parts[0][1].shape for p in parts):
            luts = np.stack([bank.lut for bank, _, _ in parts])
            rows = np.arange(len(parts))[:, None, None]
            resident = (luts[rows, np.stack([p[1] for p in parts])] >= 0).all(axis=(1, 2))
        else:
            resident = np.array([(bank.lut[inds] >= 0).all() for bank, inds, _ in parts])
        for ok, (bank, inds, version) in zip(resident.tolist(), parts):
            if version != bank.version or not ok:
                if version == bank.version:
                    self.first_miss = (bank, inds)
                self._skip = self._backoff
                self._backoff = min(max(1, 2 * self._backoff), MAX_BACKOFF)
                return False
        pos = 0
        for r in records:  # bookkeeping per forward, in order (each bank steps once per forward)
            n = len(r.entries)
            self._account(parts[pos : pos + n], loaded)
            pos += n
        self._backoff = 0
        return True

    def _account(self, parts: list, loaded: dict | None) -> None:
        """The hits of one verified forward: vectorised over its MoE calls when each is one token row of a
        different bank (decode), else call by call."""
        store = self.store
        if not loaded and parts and all(p[1].shape[0] == 1 for p in parts):
            banks = [p[0] for p in parts]
            inds = np.concatenate([p[1] for p in parts])
            s = np.sort(inds, axis=1)
            if len({b.index for b in banks}) == len(banks) and not (s[:, 1:] == s[:, :-1]).any():
                store.account_rows(banks, inds)
                return
        loaded = loaded or {}
        for bank, inds, _ in parts:
            store.account_hits(bank, inds, loaded.get(bank.index, ()))

    def retry(self, run, tokens: int, cache):
        """Redoes a forward that missed: loads the first missing call's experts (its routing is exact) and runs
        optimistically again, up to ``MAX_RETRIES`` times (a later layer may miss too: its routing is only right
        once the layers before it are); then falls back to sync mode. Outputs are exact either way."""
        loaded: dict[int, set] = {}
        for _ in range(MAX_RETRIES):
            if self.first_miss is None:
                break
            bank, inds = self.first_miss
            needed = np.unique(inds)
            if len(needed) > bank.group_slots:
                break
            for observe in self.store.routing_observers:  # told before the bank is touched, as in sync mode
                observe(bank, inds)
            loaded.setdefault(bank.index, set()).update(self.store.load_missing(bank, needed))
            out, rec = self._recorded(run, -1)
            self.retried_forwards += 1
            if self.verify([rec], loaded):
                return out
            trim_caches(cache, tokens)
        self.first_miss = None
        self.store.preloaded = loaded  # their lookups were counted as misses: the sync pass must not count hits
        try:
            return self._sync_forward(run)
        finally:
            self.store.preloaded = {}


class ForwardGuard:
    """Deferred verification for a pipelined single-sequence decode loop (see the module docstring).

    ``begin()`` before building a step returns a checkpoint; ``verify(ck)`` checks every pending forward up to and
    including the one started at ``ck`` (one readback), leaving later ones pending; ``rollback(ck)`` drops the
    forwards from ``ck`` on (trimming their tokens from the caches); the caller then redoes the step inside
    ``redo()``, drawing the same random numbers (it keys its draws by position).
    """

    def __init__(self, runner: OptimisticRunner, cache):
        self.runner = runner
        self.cache = cache
        runner.pending, runner.pending_failed, runner._deferred_next = [], False, False  # an abandoned loop's
        runner.active_guard = self
        self._tokens: dict = {}  # forward seq -> token ids read back with its check (outputs(token))

    def begin(self):
        ck = (self.runner.seq,)
        self.runner._deferred_next = True
        return ck

    def outputs(self, token=None) -> list:
        """The routing arrays of deferred forwards not yet queued: pass them to the same ``mx.async_eval`` as the
        step's output. ``token`` (the step's sampled token ids) rides along with the latest forward's routing, so
        the check's one readback hands it out too (``token(ck)``): one host sync per step, as stacked decoding."""
        import mlx.core as mx

        out = []
        pending = self.runner.pending
        for p in pending:
            if p.flat is not None and not p.queued:
                p.queued = True
                if token is not None and p is pending[-1]:
                    p.extra = token.size
                    p.flat = mx.concatenate([p.flat, token.reshape(-1).astype(p.flat.dtype)])
                out.append(p.flat)
        return out

    def token(self, ck):
        """The token ids that rode along with the check of the forward started at ``ck`` (host int array), when
        that check passed; else None (read the token itself)."""
        return self._tokens.get(ck[0])

    def verify(self, ck) -> bool:
        r = self.runner
        if r.pending_failed:
            r.pending_failed = False
            return False
        head = [p for p in r.pending if p.seq <= ck[0]]
        r.pending = [p for p in r.pending if p.seq > ck[0]]
        ok = r.verify(head)
        self._tokens = {p.seq: p.extra_host for p in head if p.extra_host is not None} if ok else {}
        if not ok:
            r.pending = head + r.pending  # rollback() drops them
        return ok

    def rollback(self, ck, tokens: int) -> None:
        """Drops pending forwards from ``ck`` on; ``tokens``: tokens the caches took since ``ck``."""
        r = self.runner
        r.pending = [p for p in r.pending if p.seq < ck[0]]
        r._deferred_next = False
        r.redone_forwards += 1
        trim_caches(self.cache, tokens)

    @contextmanager
    def redo(self):
        """Around the redo of the step that missed: it retries optimistically with the missing experts loaded
        (``OptimisticRunner.retry``), else runs in sync mode."""
        self.runner._retry_next = True
        try:
            yield
        finally:
            self.runner._retry_next = False

    def close(self) -> None:
        """Verifies what is still pending (e.g. a step queued past the last token) so bookkeeping stays exact."""
        r = self.runner
        if r.active_guard is not self:  # a later loop owns the runner now (this one was abandoned)
            return
        r.active_guard = None
        r._deferred_next = False
        if r.pending:
            r.verify(r.pending)
            r.pending = []


class OptimisticHook(ModuleHook):
    """The text model (the module that runs the decoder layers) with its forwards routed through the store's
    optimistic runner (``engine/hooks.py``: the one hook mechanism; no class changes)."""

    kind = "optimistic"

    def __init__(self, inner, runner):
        super().__init__(inner)
        self.hook_runner = runner

    def __call__(self, *args, **kwargs):
        inputs = args[0] if args else kwargs.get("inputs")
        cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
        if inputs is None or getattr(inputs, "ndim", 0) < 1:  # e.g. input_embeddings only: take the safe path
            rows, tokens = MAX_OPTIMISTIC_ROWS + 1, 0
        else:
            rows, tokens = int(np.prod(inputs.shape)), int(inputs.shape[-1])
        return self.hook_runner.forward(lambda: self.inner(*args, **kwargs), rows, tokens, cache)


def _text_model_path(model) -> str:
    """Where the decoder layers' runner sits: ``model`` (most families) or ``language_model.model``."""
    return "language_model.model" if "language_model" in model else "model"


def install(model, store) -> OptimisticRunner:
    """Routes ``model``'s forwards through ``store``'s optimistic runner (streaming residency)."""
    return install_hook(model, _text_model_path(model), OptimisticHook, store.optimistic).hook_runner


def runner_of(model) -> OptimisticRunner | None:
    """The optimistic runner installed on ``model``, or None."""
    try:
        node = model
        for part in _text_model_path(model).split("."):
            node = node[part]
    except (KeyError, TypeError):
        return None
    hook = find_hook(node, OptimisticHook)
    return None if hook is None else hook.hook_runner


def guard_for(model, cache) -> ForwardGuard | None:
    """A deferred-verification guard when ``model`` streams optimistically, else None."""
    runner = runner_of(model)
    if runner is None or not runner.enabled:
        return None
    return ForwardGuard(runner, cache)
