"""The Cache actor: owns prefix-cache state (sessions now; the L1/L2 prefix cache builds on it).

It decides *what* to reuse; the KV arrays themselves are MLX objects that only the MLX thread touches, so they
live in a ``KVTable`` under integer handles and only handles and token ids travel in messages. A session keeps
the KV of its last turn (prompt + reply); the next turn's lookup reuses the longest common token prefix, so a
multi-turn conversation never prefills again what it already has. A lookup hands the KV over to the Decoder
(which extends it in place) and the finished turn's KV comes back with ``CacheInsert``.
"""

from __future__ import annotations

import itertools
import threading

import msgspec

from .actor import AsyncActor
from .messages import CacheInsert, CacheLookup, CacheLookupReply, CacheRelease, StatsRequest


class KVTable:
    """handle → KV cache object. put/take run on the MLX thread; drop may come from anywhere and is
    collected (the arrays freed) on the MLX thread."""

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


class _Session(msgspec.Struct):
    handle: int
    token_ids: tuple[int, ...]


class CacheActor(AsyncActor):
    name = "cache"

    def __init__(self, kv_table: KVTable, max_sessions: int = 64):
        super().__init__()
        self.kv_table = kv_table
        self.max_sessions = max_sessions
        self.sessions: dict[str, _Session] = {}  # insertion order = LRU order
        self.lookups = self.hits = self.reused = 0

    # -- state ---------------------------------------------------------------------------------------------
    def handle(self, msg):
        if isinstance(msg, CacheLookup):
            return self._lookup(msg)
        if isinstance(msg, CacheInsert):
            old = self.sessions.pop(msg.session_id, None)
            if old is not None:
                self.kv_table.drop(old.handle)
            self.sessions[msg.session_id] = _Session(msg.handle, msg.token_ids)
            while len(self.sessions) > self.max_sessions:
                sid = next(iter(self.sessions))
                self.kv_table.drop(self.sessions.pop(sid).handle)
            return None
        if isinstance(msg, CacheRelease):
            old = self.sessions.pop(msg.session_id, None)
            if old is not None:
                self.kv_table.drop(old.handle)
            return None
        if isinstance(msg, StatsRequest):
            return CacheStats(len(self.sessions), self.lookups, self.hits, self.reused)
        raise TypeError(f"Cache actor got an unexpected message {type(msg).__name__}")

    def _lookup(self, msg: CacheLookup) -> CacheLookupReply:
        self.lookups += 1
        s = self.sessions.pop(msg.session_id, None)  # handed over: the Decoder owns the KV now
        if s is None:
            return CacheLookupReply(msg.session_id, None, 0)
        n = 0
        for a, b in zip(s.token_ids, msg.prompt_ids):
            if a != b:
                break
            n += 1
        if n == 0:
            self.kv_table.drop(s.handle)
            return CacheLookupReply(msg.session_id, None, 0)
        self.hits += 1
        self.reused += n
        return CacheLookupReply(msg.session_id, s.handle, n)

    def close(self) -> None:
        for s in self.sessions.values():
            self.kv_table.drop(s.handle)
        self.sessions.clear()
