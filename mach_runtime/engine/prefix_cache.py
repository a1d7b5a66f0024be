"""The two-tier prefix cache: L1 snapshots in RAM, L2 ``DiskKVCache`` files, one index over both.

Synchronous and MLX-free (snapshots here are host arrays): the Cache actor owns one and runs its disk calls in
worker threads. ``lookup`` finds the snapshot restoring the most of a request's tokens in either tier; an L2 hit
is ``load``-ed and promoted into L1; ``insert`` stores a new snapshot in L1 (evicting by value) and says whether
it should be written to disk. Displaced L1 entries not yet on disk are returned for a write ("displacement
save"); ``unsaved`` lists what a shutdown must flush.

L1 value of an entry = ``(hits + 1) * tokens / bytes``, halved per ``half_life_s`` since its last use; entries a
live session owns count 4x. The lowest value goes first while L1 is over ``max_bytes`` or ``max_entries``.
A new snapshot that can be cut makes the shorter cuttable L1 entries it extends redundant: they are dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec
import numpy as np

from .disk_kv_cache import DiskKVCache, DiskStats
from .kv_snapshot import Snapshot, layer_cuttable
from .prefix_keys import IndexEntry, PrefixIndex


class TierStats(msgspec.Struct, frozen=True, kw_only=True):
    lookups: int
    hits: int
    tokens_restored: int
    entries: int
    bytes: int
    evictions: int


class PrefixCacheStats(msgspec.Struct, frozen=True, kw_only=True):
    enabled: bool
    block_size: int
    lookups: int
    misses: int
    l1: TierStats
    l2: TierStats | None
    disk: DiskStats | None
    snapshots_saved: int
    snapshots_skipped: int  # too short, or a cache class without snapshot support
    save_queue: int = 0  # L2 writes waiting


@dataclass
class _L1:
    snap: Snapshot
    owner: str | None
    last_used: float
    hits: int = 0
    on_disk: bool = False


@dataclass
class PrefixCache:
    salt: bytes
    block_size: int = 256
    max_bytes: int = 2 << 30
    max_entries: int = 64
    disk: DiskKVCache | None = None
    shared: bool = True  # False: a request only reuses snapshots its own session stored (prefix_cache=False)
    half_life_s: float = 600.0
    index: PrefixIndex = field(init=False)
    l1: dict = field(init=False, default_factory=dict)
    live_owners: set = field(init=False, default_factory=set)

    def __post_init__(self):
        self.index = PrefixIndex(self.block_size, self.salt)
        self.l1_bytes = 0
        self.n = dict(lookups=0, misses=0, l1_hits=0, l2_hits=0, l1_tokens=0, l2_tokens=0, l1_evictions=0,
                      saved=0, skipped=0, l2_lookups=0)
        if self.disk is not None:
            self.rescan()

    # -- index maintenance ------------------------------------------------------------------------------------
    def rescan(self) -> None:
        """(Re)reads the L2 directory's headers into the index (files other runtimes wrote; gone ones dropped)."""
        if self.disk is not None:
            self.apply_scan(*self.disk.scan(self.known_on_disk()))

    def known_on_disk(self) -> set:
        return {k for k, e in self.index.entries.items() if e.tier == "l2" or k in self.l1 and self.l1[k].on_disk}

    def apply_scan(self, headers, seen) -> None:
        """Index updates of a ``DiskKVCache.scan`` (run the scan in a worker thread, this on the owner's)."""
        for h in headers:
            if h.key in self.index:
                continue
            cuttable = all(layer_cuttable(c, m) for c, m, _ in h.layers)
            self.index.add(IndexEntry(h.key, np.asarray(h.tokens, np.uint32), cuttable, "l2", 0,
                                      [bytes.fromhex(x) for x in h.block_hashes], h.has_logits))
        for key in [k for k, e in self.index.entries.items() if e.tier == "l2" and k not in seen]:
            self.index.remove(key)
        self._drain_disk_evictions()

    def _drain_disk_evictions(self) -> None:
        if self.disk is None:
            return
        for key in self.disk.evicted_keys:
            e = self.index.entries.get(key)
            if e is not None and e.tier == "l2":
                self.index.remove(key)
            elif key in self.l1:
                self.l1[key].on_disk = False
        self.disk.evicted_keys.clear()

    # -- lookup ---------------------------------------------------------------------------------------------
    def lookup_request(self, tokens, owner: str | None = None) -> tuple[IndexEntry | None, int]:
        """A request's lookup: a snapshot of exactly ``tokens`` with their last logits (restores everything: no
        forward before the first token), else the most of ``tokens[:-1]`` (the last token is fed by a step)."""
        e, n = self.index.lookup(tokens, len(tokens), None if self.shared else (lambda e: False))
        if e is not None and n == len(tokens) and e.has_logits and e.n_tokens == n:
            self.n["lookups"] += 1
            return e, n
        return self.lookup(tokens, len(tokens) - 1, owner)

    def lookup(self, tokens, limit: int, owner: str | None = None) -> tuple[IndexEntry | None, int]:
        """(entry, n): the snapshot restoring the most of ``tokens[:limit]``; entry.tier says where it is."""
        self.n["lookups"] += 1
        accept = None if self.shared else (lambda e: e.key in self.l1 and owner is not None
                                                  and self.l1[e.key].owner == owner)
        e, n = self.index.lookup(tokens, limit, accept)
        if owner is not None:  # a session's own snapshots, even those shorter than a block (not in the index)
            t = np.asarray(tokens, np.uint32)
            for k, ent in self.l1.items():
                if ent.owner == owner and k in self.index:
                    m = self.index.entries[k].usable(t, limit)
                    if m > n:
                        e, n = self.index.entries[k], m
        if e is None:
            self.n["misses"] += 1
        return e, n

    def take_l1(self, key: str, n: int) -> Snapshot:
        ent = self.l1[key]
        ent.hits += 1
        ent.last_used = time.monotonic()
        self.n["l1_hits"] += 1
        self.n["l1_tokens"] += n
        return ent.snap

    def read_l2(self, key: str) -> Snapshot | None:
        """Blocking disk read, safe in a worker thread (touches no index): the snapshot, or None (gone or bad)."""
        self.n["l2_lookups"] += 1
        return self.disk.load(key)

    def forget(self, key: str) -> None:
        """An L2 entry whose file is gone or was dropped as bad."""
        e = self.index.entries.get(key)
        if e is not None and e.tier == "l2":
            self.index.remove(key)

    def load_l2(self, key: str) -> Snapshot | None:
        """``read_l2`` + ``forget`` on a miss (single-threaded callers)."""
        snap = self.read_l2(key)
        if snap is None:
            self.forget(key)
        return snap

    def promote(self, key: str, snap: Snapshot, n: int) -> None:
        """An L2 hit: into L1 (already on disk)."""
        self.n["l2_hits"] += 1
        self.n["l2_tokens"] += n
        self._put_l1(key, snap, None, on_disk=True)

    # -- insert ---------------------------------------------------------------------------------------------
    def insert(self, snap: Snapshot, owner: str | None = None) -> tuple[str | None, list]:
        """Stores ``snap`` in L1. Returns (key or None if skipped, [(key, snapshot)] to write to L2: this one when
        L2 is on and it is not on disk yet, plus displaced L1 entries not on disk)."""
        if snap.n_tokens < (1 if owner is not None else self.block_size) or (owner is None and not self.shared):
            self.n["skipped"] += 1
            return None, []
        hashes = self.index.hashes(snap.tokens)
        key = self.index.key_of(snap.tokens, hashes)
        if snap.cuttable:  # shorter cuttable entries this one extends are redundant in RAM
            for k, ent in list(self.l1.items()):
                if (k != key and ent.snap.cuttable and ent.snap.n_tokens <= snap.n_tokens
                        and np.array_equal(ent.snap.tokens, snap.tokens[: ent.snap.n_tokens])
                        and ent.owner in (None, owner)):
                    self._drop_l1(k, keep_on_disk=True)
        on_disk = self.disk is not None and key in self.index and self.index.entries[key].tier == "l2"
        displaced = self._put_l1(key, snap, owner, on_disk=on_disk, hashes=hashes)
        self.n["saved"] += 1
        writes = [] if self.disk is None else [(k, s) for k, s in displaced]
        if self.disk is not None and not on_disk and key in self.l1:
            writes.insert(0, (key, snap))
        return key, writes

    def mark_on_disk(self, key: str) -> None:
        if key in self.l1:
            self.l1[key].on_disk = True
        self._drain_disk_evictions()

    def _put_l1(self, key, snap, owner, on_disk=False, hashes=None) -> list:
        old = self.l1.pop(key, None)
        if old is not None:
            self.l1_bytes -= old.snap.nbytes
            owner = owner or old.owner
            on_disk = on_disk or old.on_disk
        self.l1[key] = _L1(snap, owner, time.monotonic(), on_disk=on_disk)
        self.l1_bytes += snap.nbytes
        self.index.add(IndexEntry(key, snap.tokens, snap.cuttable, "l1", snap.nbytes, hashes or [],
                                  snap.logits is not None))
        return self._evict_l1()

    def _value(self, ent: _L1, now: float) -> float:
        v = (ent.hits + 1) * ent.snap.n_tokens / max(ent.snap.nbytes, 1)
        v *= 0.5 ** ((now - ent.last_used) / self.half_life_s)
        return v * (4.0 if ent.owner in self.live_owners else 1.0)

    def _evict_l1(self) -> list:
        """Evicts by value while over budget; returns displaced (key, snap) not on disk (for an L2 save)."""
        out = []
        now = time.monotonic()
        while self.l1 and (self.l1_bytes > self.max_bytes or len(self.l1) > self.max_entries):
            key = min(self.l1, key=lambda k: self._value(self.l1[k], now))
            ent = self.l1[key]
            if not ent.on_disk and self.disk is not None:
                out.append((key, ent.snap))
            self._drop_l1(key, keep_on_disk=True)
            self.n["l1_evictions"] += 1
        return out

    def _drop_l1(self, key: str, keep_on_disk: bool) -> None:
        ent = self.l1.pop(key)
        self.l1_bytes -= ent.snap.nbytes
        e = self.index.entries.get(key)
        if e is not None:
            if keep_on_disk and self.disk is not None and (ent.on_disk or self.disk.exists(key)):
                e.tier, e.nbytes = "l2", 0
            else:
                self.index.remove(key)

    def release_owner(self, owner: str) -> None:
        """A session ended: its entries become ordinary ones (shared) or go (private mode)."""
        self.live_owners.discard(owner)
        for k, ent in list(self.l1.items()):
            if ent.owner == owner:
                if self.shared:
                    ent.owner = None
                else:
                    self._drop_l1(k, keep_on_disk=False)

    def unsaved(self) -> list:
        """(key, snap) of L1 entries not on disk (the shutdown flush)."""
        if self.disk is None:
            return []
        return [(k, e.snap) for k, e in self.l1.items() if not e.on_disk]

    def hashes_of(self, snap: Snapshot) -> list[bytes]:
        return self.index.hashes(snap.tokens)

    # -- stats ----------------------------------------------------------------------------------------------
    def stats(self, save_queue: int = 0) -> PrefixCacheStats:
        n = self.n
        l1 = TierStats(lookups=n["lookups"], hits=n["l1_hits"], tokens_restored=n["l1_tokens"], entries=len(self.l1),
                       bytes=self.l1_bytes, evictions=n["l1_evictions"])
        l2 = disk = None
        if self.disk is not None:
            disk = self.disk.stats()
            l2 = TierStats(lookups=n["l2_lookups"], hits=n["l2_hits"], tokens_restored=n["l2_tokens"],
                           entries=disk.files, bytes=disk.bytes, evictions=disk.evictions)
        return PrefixCacheStats(enabled=self.shared, block_size=self.block_size, lookups=n["lookups"],
                                misses=n["misses"], l1=l1, l2=l2, disk=disk, snapshots_saved=n["saved"],
                                snapshots_skipped=n["skipped"], save_queue=save_queue)

