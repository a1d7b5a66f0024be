"""The Cache actor: the prefix cache (L1 snapshots in RAM, L2 ``DiskKVCache`` files), sessions, warm prefixes.

It decides *what* to reuse; MLX objects never reach it. A lookup finds the snapshot restoring the most of a
request's tokens (``PrefixCache.lookup``: L1, else L2 read from a worker thread and promoted into L1) and puts a
``PrefixHit`` (host arrays + token count) into the ``KVTable`` under a handle; only the handle travels in the
``Submit``, and the Decoder turns it into MLX caches on the MLX thread. The Decoder sends back snapshots it
materialised on the device (``CacheInsert``: after a request's first token, and when it finishes; numpy views of
evaluated MLX buffers, the only MLX objects that reach this actor, never touched here but through numpy); the
actor copies them to host memory in a worker thread (``Snapshot.copy_views``), hands the MLX arrays back to be
freed on the MLX thread, stores the snapshots in L1 and queues
the L2 write, which a writer task runs in a worker thread (bytes only; temp file + fsync + rename), never on the
critical path of any request. L1 displacement queues the displaced entry's write; ``CacheFlush`` (shutdown)
writes every L1 entry not on disk yet and waits for the queue.

Sessions are ordinary users: a session's turn is a snapshot owned by the session (valued higher while the
session lives; reusable by everyone when the prefix cache is shared); with ``prefix_cache=False`` only a
session's own snapshots are reused, and nothing goes to disk.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque

import anyio
import msgspec

from .actor import AsyncActor
from .messages import CacheFlush, CacheInsert, CacheLookup, CacheLookupReply, CacheRelease, StatsRequest


class KVTable:
    """handle → KV object handed between the actors (a ``PrefixHit``, a host ``Snapshot``, or live MLX caches
    moving between the Decoder's lanes). MLX objects are put/taken on the MLX thread only; drop may come from
    anywhere and is collected (the arrays freed) on the MLX thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._items: dict[int, object] = {}
        self._dropped: list[object] = []
        self._ids = itertools.count(1)

    def put(self, kv) -> int:
        with self._lock:
            h = next(self._ids)
            self._items[h] = kv
            return h

    def take(self, handle: int):
        with self._lock:
            return self._items.pop(handle, None)

    def drop(self, handle: int) -> None:
        with self._lock:
            kv = self._items.pop(handle, None)
            if kv is not None:
                self._dropped.append(kv)

    def free_later(self, arrays) -> None:
        """MLX arrays a worker thread is done with: freed by the next ``collect`` (MLX thread)."""
        with self._lock:
            self._dropped.append(arrays)

    def collect(self) -> None:
        with self._lock:
            self._dropped.clear()

    def clear(self) -> None:
        """Drops every handle (the runtime is closing); the arrays are freed by the next ``collect``."""
        with self._lock:
            self._dropped.extend(self._items.values())
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class CacheStats(msgspec.Struct, frozen=True):
    sessions: int
    lookups: int
    hits: int
    reused_tokens: int
    prefix: object = None  # mach_runtime.engine.prefix_cache.PrefixCacheStats


class CacheActor(AsyncActor):
    name = "cache"

    def __init__(self, kv_table: KVTable, prefix, max_sessions: int = 64):
        super().__init__()
        self.kv_table = kv_table
        self.prefix = prefix  # PrefixCache (outlives actor restarts: the Supervisor owns it)
        self.max_sessions = max_sessions
        self.sessions: deque[str] = deque()  # live sessions, oldest first
        self.lookups = self.hits = self.reused = 0
        self._writes: deque = deque()  # (key, snapshot) waiting for the writer
        self._queued: set[str] = set()
        self._wake = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            if self.prefix.disk is not None:
                tg.start_soon(self._writer)
            try:
                await self.serve()
            finally:
                tg.cancel_scope.cancel()

    # -- messages ------------------------------------------------------------------------------------------
    def handle(self, msg):
        if isinstance(msg, CacheLookup):
            return self._lookup(msg)
        if isinstance(msg, CacheInsert):
            return self._insert(msg)
        if isinstance(msg, CacheRelease):
            self.prefix.release_owner(msg.session_id)
            if msg.session_id in self.sessions:
                self.sessions.remove(msg.session_id)
            return None
        if isinstance(msg, CacheFlush):
            return self._flush()
        if isinstance(msg, StatsRequest):
            return CacheStats(len(self.sessions), self.lookups, self.hits, self.reused,
                              self.prefix.stats(len(self._writes)))
        raise TypeError(f"Cache actor got an unexpected message {type(msg).__name__}")

    async def _insert(self, msg: CacheInsert) -> None:
        snap = self.kv_table.take(msg.handle)
        if snap is None:
            return
        if snap.held:  # materialised by the Decoder: the host copy is bytes only, here, off the MLX thread
            try:
                self.kv_table.free_later(await anyio.to_thread.run_sync(self._copy, snap))
            except BaseException:  # (a crash: the snapshot is not stored; its MLX arrays are freed all the same)
                self.kv_table.free_later(snap.held)
                snap.held = []
                raise
        owner = msg.session_id
        if owner is not None and owner not in self.sessions:
            self.sessions.append(owner)
            self.prefix.live_owners.add(owner)
            while len(self.sessions) > self.max_sessions:
                self.prefix.release_owner(self.sessions.popleft())
        _, writes = self.prefix.insert(snap, owner)
        self._queue(writes)

    def _copy(self, snap) -> list:
        """Worker thread: the host copy of a materialised snapshot (fault point "copy": tests crash actors here)."""
        if self.fault_hook is not None:
            self.fault_hook(self.name, "copy", {"tokens": snap.n_tokens})
        return snap.copy_views()

    async def _lookup(self, msg: CacheLookup) -> CacheLookupReply:
        from mach_runtime.engine.prefix_saver import PrefixHit

        self.lookups += 1
        entry, n = self.prefix.lookup_request(msg.prompt_ids, msg.session_id)
        disk = self.prefix.disk
        if disk is not None and self.prefix.shared and (entry is None or n < len(msg.prompt_ids) - 1) \
                and disk.changed(self.prefix.known_on_disk()):  # another runtime sharing the directory wrote
            scanned = await anyio.to_thread.run_sync(disk.scan, self.prefix.known_on_disk())
            self.prefix.apply_scan(*scanned)
            entry, n = self.prefix.lookup_request(msg.prompt_ids, msg.session_id)
        snap = None
        if entry is not None and entry.tier == "l1":
            snap = self.prefix.take_l1(entry.key, n)
        elif entry is not None:
            key = entry.key
            snap = await anyio.to_thread.run_sync(self.prefix.read_l2, key)
            if snap is None:
                self.prefix.forget(key)
            else:
                self.prefix.promote(key, snap, n)
        if snap is None:
            return CacheLookupReply(msg.session_id, None, 0)
        self.hits += 1
        self.reused += n
        return CacheLookupReply(msg.session_id, self.kv_table.put(PrefixHit(snap, n)), n,
                                "l1" if entry.tier == "l1" else "l2")

    # -- L2 writes -----------------------------------------------------------------------------------------
    def _queue(self, writes) -> None:
        if self.prefix.disk is None:
            return
        for key, snap in writes:
            if key not in self._queued:
                self._queued.add(key)
                self._writes.append((key, snap))
        if self._writes:
            self._idle = anyio.Event() if self._idle.is_set() else self._idle
            self._wake.set()

    async def _writer(self) -> None:
        while True:
            if not self._writes:
                self._idle.set()
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            key, snap = self._writes.popleft()
            try:
                await anyio.to_thread.run_sync(self.prefix.disk.save, key, snap, self.prefix.hashes_of(snap))
                self.prefix.mark_on_disk(key)
            except OSError:  # a full or read-only disk: the entry stays in L1 only
                self.prefix.n["skipped"] += 1
            finally:
                self._queued.discard(key)

    async def _flush(self) -> int:
        """Shutdown: every L1 entry not on disk yet is written; returns how many were queued."""
        pending = self.prefix.unsaved()
        self._queue(pending)
        t0 = time.monotonic()
        while self._writes or not self._idle.is_set():
            await self._idle.wait()
            if time.monotonic() - t0 > 60:
                break
        return len(pending)

    def close(self) -> None:
        self.sessions.clear()
