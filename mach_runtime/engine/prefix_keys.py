"""Prefix identity: model fingerprints, chained block hashes, and the in-RAM longest-prefix index.

A snapshot of a prompt cache is named by the tokens it covers. Tokens are cut into fixed-size blocks
(``block_size``); block i's hash is ``sha1(hash(i-1) || tokens of block i as little-endian uint32)``, the chain
starting from a *salt* that names everything else the KV depends on: the model fingerprint (the weights' safetensors
headers and config.json), the cache layout (quantized KV bits, rotating window size) and the draft's fingerprint
when speculative decoding keeps draft context in the snapshot. Two runtimes with the same salt and the same
tokens compute the same names; anything else differs in the first block already. A snapshot's content address is
``sha1(last full block hash || the tail tokens || the token count)``.

``PrefixIndex`` answers "which stored snapshot gives the most reusable tokens for this request": every snapshot
registers the chain hashes of its full blocks; a lookup walks the request's chain from its longest matching
block downwards and checks the candidates' exact tokens (a hash never stands in for the token comparison, so a
collision cannot return a wrong prefix). A snapshot whose caches can be cut (plain attention KV) serves any
common prefix; one that cannot (recurrent state, a wrapped sliding window, compressed caches) serves exactly the
tokens it covers.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field

import numpy as np

MAX_HEADER = 100 << 20  # a safetensors header larger than this is not one we hash


def _header_bytes(path: str) -> bytes:
    """The 8-byte length + JSON header of a safetensors file (what the weights *are*, without reading them)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return head
        (n,) = struct.unpack("<Q", head)
        return head + f.read(min(n, MAX_HEADER))


def model_fingerprint(checkpoint: str | os.PathLike) -> str:
    """sha1 over a checkpoint's config.json and every safetensors header (names, dtypes, shapes, offsets):
    a different model, a re-quantized or re-exported one gets a different fingerprint."""
    root = os.fspath(checkpoint)
    h = hashlib.sha1(b"mach-model-v1")
    files = sorted(f for f in os.listdir(root) if f.endswith(".safetensors") or f == "config.json")
    for name in files:
        h.update(name.encode() + b"\0")
        p = os.path.join(root, name)
        if name == "config.json":
            with open(p, "rb") as f:
                h.update(f.read())
        else:
            h.update(_header_bytes(p))
    return h.hexdigest()


def prefix_salt(model_fp: str, layout: dict, draft_fp: str | None = None) -> bytes:
    """The chain's start: model fingerprint + cache layout (a JSON-able dict) + draft fingerprint."""
    text = json.dumps({"model": model_fp, "layout": layout, "draft": draft_fp}, sort_keys=True)
    return hashlib.sha1(text.encode()).digest()


def _as_u32(tokens) -> np.ndarray:
    return np.asarray(tokens, dtype="<u4")


def block_hashes(tokens, block_size: int, salt: bytes) -> list[bytes]:
    """Chain hashes of the full blocks of ``tokens``."""
    t = _as_u32(tokens)
    out, prev = [], salt
    for i in range(len(t) // block_size):
        prev = hashlib.sha1(prev + t[i * block_size : (i + 1) * block_size].tobytes()).digest()
        out.append(prev)
    return out


def content_key(tokens, hashes: list[bytes], block_size: int, salt: bytes) -> str:
    """The content address of a snapshot covering exactly ``tokens`` (hex)."""
    t = _as_u32(tokens)
    last = hashes[-1] if hashes else salt
    tail = t[len(hashes) * block_size :]
    return hashlib.sha1(last + tail.tobytes() + struct.pack("<Q", len(t))).hexdigest()


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


@dataclass
class IndexEntry:
    key: str
    tokens: np.ndarray  # uint32: the tokens the snapshot covers
    cuttable: bool  # its caches can be cut to any shorter prefix
    tier: str  # "l1" or "l2" (where the bytes are; an L1 entry may also be on disk)
    nbytes: int
    hashes: list[bytes] = field(default_factory=list)
    has_logits: bool = False  # holds the last token's logits: an exact hit needs no forward at all

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def usable(self, tokens: np.ndarray, limit: int) -> int:
        """Tokens of ``tokens`` (at most ``limit``) this snapshot can restore."""
        lcp = common_prefix(self.tokens, tokens[:limit])
        if self.cuttable:
            return lcp
        return self.n_tokens if lcp >= self.n_tokens else 0


class PrefixIndex:
    """key -> IndexEntry, and block hash -> keys of the entries whose chain passes through it."""

    def __init__(self, block_size: int, salt: bytes):
        self.block_size = block_size
        self.salt = salt
        self.entries: dict[str, IndexEntry] = {}
        self._by_block: dict[bytes, set[str]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def hashes(self, tokens) -> list[bytes]:
        return block_hashes(tokens, self.block_size, self.salt)

    def key_of(self, tokens, hashes: list[bytes] | None = None) -> str:
        hashes = self.hashes(tokens) if hashes is None else hashes
        return content_key(tokens, hashes, self.block_size, self.salt)

    def add(self, entry: IndexEntry) -> None:
        self.remove(entry.key)
        if not entry.hashes:
            entry.hashes = self.hashes(entry.tokens)
        self.entries[entry.key] = entry
        for h in entry.hashes:
            self._by_block.setdefault(h, set()).add(entry.key)

    def remove(self, key: str) -> IndexEntry | None:
        e = self.entries.pop(key, None)
        if e is not None:
            for h in e.hashes:
                keys = self._by_block.get(h)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._by_block[h]
        return e

    def lookup(self, tokens, limit: int, accept=None) -> tuple[IndexEntry | None, int]:
        """(entry, n): the entry restoring the most of ``tokens[:limit]`` (n tokens), or (None, 0).

        Snapshots shorter than one block are never found (too little to be worth a restore). ``accept(entry)``
        filters candidates (e.g. a session's own entries only). Among equal n: a snapshot of exactly n tokens with
        their logits first (it needs no forward), then an L1 entry over an L2 one."""
        t = _as_u32(tokens)
        limit = min(limit, len(t))
        hashes = self.hashes(t[:limit])
        best, best_rank, seen = None, (0,), set()
        B = self.block_size
        for j in range(len(hashes), 0, -1):
            if best_rank[0] >= (j + 1) * B:  # nothing that shares only j blocks can restore more
                break
            for key in self._by_block.get(hashes[j - 1], ()):
                if key in seen:
                    continue
                seen.add(key)
                e = self.entries[key]
                if accept is not None and not accept(e):
                    continue
                n = e.usable(t, limit)
                rank = (n, e.has_logits and e.n_tokens == n, e.tier == "l1")
                if n > 0 and rank > best_rank:
                    best, best_rank = e, rank
        return (best, best_rank[0]) if best is not None else (None, 0)
