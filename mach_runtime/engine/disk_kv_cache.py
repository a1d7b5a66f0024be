"""``DiskKVCache``: the L2 prefix cache, one content-addressed file per KV snapshot.

Layout: ``<dir>/<salt[:16]>/<key>.safetensors`` where ``key`` is the snapshot's content address
(``prefix_keys.content_key``) and the sub-directory is the prefix salt (model fingerprint + cache layout + draft),
so runtimes of different models can share one directory without touching each other's files. Each file is a
safetensors file (arrays only; bf16 as its uint16 view) whose ``__metadata__["mach_kv"]`` is a msgspec JSON
``SnapshotHeader``: format version, salt, token count, block hashes, the tokens, the per-layer records, and a
checksum (CRC-32 of every array's bytes in name order).

Writes are bytes only (no MLX): ``save`` serialises the numpy arrays, writes a temp file in the same directory,
fsyncs it, renames it onto its name and fsyncs the directory, so a reader sees a whole file or none; a crash
leaves at most a temp file, removed by the next scan. An ``fcntl`` lock on ``<dir>/.lock`` serialises renames,
budget eviction and scans between threads and processes sharing the directory. A file that is truncated, fails
its checksum, belongs to another salt or has an old format version is a miss: it is deleted and counted, never
raised and never restored.

Eviction keeps the directory under ``budget_bytes``: lowest value first, value = ``(hits + 1) * tokens / bytes``
halved for every ``half_life_s`` since the file was last written or hit (a hit touches its mtime, which every
process sharing the directory sees).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
import time
import zlib

import msgspec
import numpy as np

from .kv_snapshot import LayerRecord, Snapshot

FORMAT_VERSION = 1
SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: threads of one process are still serialised
    fcntl = None


class SnapshotHeader(msgspec.Struct, frozen=True, kw_only=True):
    format: int
    salt: str
    key: str
    n_tokens: int
    block_size: int
    block_hashes: list[str]
    tokens: list[int]
    layers: list[tuple[str, dict, list]]
    draft_layers: list[tuple[str, dict, list]] = []
    draft_tokens: int = 0
    dtypes: dict[str, str] = {}
    has_logits: bool = False
    checksum: int = 0
    created: float = 0.0


class DiskStats(msgspec.Struct, frozen=True, kw_only=True):
    files: int
    bytes: int
    budget_bytes: int
    writes: int
    write_bytes: int
    save_seconds_total: float
    save_seconds_max: float
    loads: int
    load_bytes: int
    load_seconds_total: float
    evictions: int
    corrupt_dropped: int
    foreign_dropped: int
    old_format_dropped: int


class CorruptSnapshot(Exception):
    """A file that must be dropped; ``kind`` is corrupt | foreign | old_format."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _checksum(arrays: dict) -> int:
    crc = 0
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        crc = zlib.crc32(name.encode(), crc)
        if a.size:  # (an empty array has no bytes; memoryview cannot cast it)
            crc = zlib.crc32(memoryview(a).cast("B"), crc)
    return crc


def _read_header(raw: bytes, path: str) -> tuple[dict, int]:
    """(safetensors JSON header, data start) of a file's first bytes."""
    if len(raw) < 8:
        raise CorruptSnapshot("corrupt", f"{path}: truncated (no safetensors header)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8 or n > (100 << 20):
        raise CorruptSnapshot("corrupt", f"{path}: truncated header")
    try:
        return json.loads(raw[8 : 8 + n]), 8 + n
    except ValueError as e:
        raise CorruptSnapshot("corrupt", f"{path}: unreadable header ({e})") from None


def _decode_meta(st_header: dict, path: str, salt: str) -> SnapshotHeader:
    text = (st_header.get("__metadata__") or {}).get("mach_kv")
    if text is None:
        raise CorruptSnapshot("foreign", f"{path}: not a mach KV snapshot")
    try:
        fmt = json.loads(text).get("format")
    except ValueError:
        raise CorruptSnapshot("corrupt", f"{path}: unreadable snapshot header") from None
    if fmt != FORMAT_VERSION:
        raise CorruptSnapshot("old_format", f"{path}: format {fmt!r}, this runtime reads {FORMAT_VERSION}")
    try:
        h = msgspec.json.decode(text, type=SnapshotHeader)
    except msgspec.DecodeError as e:
        raise CorruptSnapshot("corrupt", f"{path}: bad snapshot header ({e})") from None
    if h.salt != salt:
        raise CorruptSnapshot("foreign", f"{path}: another model or cache layout")
    if h.n_tokens != len(h.tokens):
        raise CorruptSnapshot("corrupt", f"{path}: token count does not match its tokens")
    return h


class DiskKVCache:
    def __init__(self, root: str | os.PathLike, salt: bytes, block_size: int, budget_bytes: int,
                 half_life_s: float = 3600.0):
        self.salt = salt.hex()
        self.block_size = block_size
        self.dir = os.path.join(os.fspath(root), self.salt[:16])
        os.makedirs(self.dir, exist_ok=True)
        self.budget_bytes = int(budget_bytes)
        self.half_life_s = half_life_s
        self._tlock = threading.Lock()  # threads of this process (fcntl locks are per process)
        self.hits: dict[str, int] = {}
        self.token_counts: dict[str, int] = {}  # key -> tokens, for the files this process has seen
        self.evicted_keys: list[str] = []  # evicted since the owner last drained it (to drop them from its index)
        self.c = dict(writes=0, write_bytes=0, loads=0, load_bytes=0, evictions=0, corrupt=0, foreign=0,
                      old_format=0)
        self.save_s = [0.0, 0.0]  # total, max
        self._scanned_mtime = None
        self.load_s = 0.0

    # -- locking ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        with self._tlock:
            fd = os.open(os.path.join(os.path.dirname(self.dir), ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    def path(self, key: str) -> str:
        return os.path.join(self.dir, key + SUFFIX)

    # -- drop ------------------------------------------------------------------------------------------------
    def _drop(self, path: str, kind: str) -> None:
        self.c[kind] += 1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    # -- scan ------------------------------------------------------------------------------------------------
    def changed(self, known=None) -> bool:
        """Whether the directory changed since the last ``scan``: its mtime moved and (given ``known``, the keys the
        caller knows are on disk) its snapshot files are not exactly ``known``, so this runtime's own writes and
        evictions do not count (one ``listdir``, no lock, no header read: a lookup's hot path)."""
        try:
            if os.stat(self.dir).st_mtime_ns == self._scanned_mtime:
                return False
            if known is None:
                return True
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return True
        return {n[: -len(SUFFIX)] for n in names if n.endswith(SUFFIX) and not n.startswith(TMP_PREFIX)} != set(known)

    def scan(self, known=frozenset()) -> tuple[list[SnapshotHeader], set[str]]:
        """(headers of the valid files not in ``known``, every key present). Reads headers only; bad files are
        deleted and counted, stale temp files of dead writers removed."""
        out, present = [], set()
        with self._locked():
            self._scanned_mtime = os.stat(self.dir).st_mtime_ns
            names = os.listdir(self.dir)
        for name in names:
            p = os.path.join(self.dir, name)
            if name.startswith(TMP_PREFIX):
                self._clean_tmp(p, name)
                continue
            if not name.endswith(SUFFIX):
                continue
            if name[: -len(SUFFIX)] in known:
                present.add(name[: -len(SUFFIX)])
                continue
            try:
                with open(p, "rb") as f:
                    raw = f.read(8)
                    if len(raw) == 8:
                        raw += f.read(min(struct.unpack("<Q", raw)[0], 100 << 20))
                st, _ = _read_header(raw, p)
                h = _decode_meta(st, p, self.salt)
                if h.key + SUFFIX != name:
                    raise CorruptSnapshot("corrupt", f"{p}: file name does not match its key")
                out.append(h)
                present.add(h.key)
                self.token_counts[h.key] = h.n_tokens
            except CorruptSnapshot as e:
                self._drop(p, e.kind)
            except FileNotFoundError:
                continue
        return out, present

    def _clean_tmp(self, path: str, name: str) -> None:
        try:
            pid = int(name[len(TMP_PREFIX) :].split("-")[0])
            os.kill(pid, 0)
            alive = True
        except (ValueError, ProcessLookupError):
            alive = False
        except PermissionError:
            alive = True
        if not alive:  # a crashed writer's leftover (a live writer renames it soon)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # -- save ------------------------------------------------------------------------------------------------
    def save(self, key: str, snap: Snapshot, hashes: list[bytes]) -> int:
        """Writes ``snap`` under ``key`` atomically (bytes only); returns the file's size. Then evicts down to the
        budget. Call from a worker thread, never the MLX thread."""
        from safetensors.numpy import save

        t0 = time.perf_counter()
        tensors = {k: np.ascontiguousarray(v) for k, v in snap.arrays.items()}
        tensors["tokens"] = snap.tokens
        if snap.logits is not None:
            tensors["logits"] = np.asarray(snap.logits, dtype=np.float32)
        header = SnapshotHeader(
            format=FORMAT_VERSION, salt=self.salt, key=key, n_tokens=snap.n_tokens, block_size=self.block_size,
            block_hashes=[h.hex() for h in hashes], tokens=snap.tokens.tolist(),
            layers=[(r.cls, r.meta, r.names) for r in snap.layers],
            draft_layers=[(r.cls, r.meta, r.names) for r in snap.draft_layers], draft_tokens=snap.draft_tokens,
            dtypes=dict(snap.dtypes), has_logits=snap.logits is not None, checksum=_checksum(tensors),
            created=time.time(),
        )
        data = save(tensors, metadata={"mach_kv": msgspec.json.encode(header).decode()})
        tmp = os.path.join(self.dir, f"{TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{key}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        self.token_counts[key] = snap.n_tokens
        with self._locked():
            os.replace(tmp, self.path(key))
            _fsync_dir(self.dir)
            self._evict_to_budget(keep=key)
        dt = time.perf_counter() - t0
        self.c["writes"] += 1
        self.c["write_bytes"] += len(data)
        self.save_s[0] += dt
        self.save_s[1] = max(self.save_s[1], dt)
        return len(data)

    # -- load ------------------------------------------------------------------------------------------------
    def load(self, key: str) -> Snapshot | None:
        """The snapshot stored under ``key``, or None (missing, or bad: then deleted and counted). Bytes only."""
        from safetensors.numpy import load

        p = self.path(key)
        t0 = time.perf_counter()
        try:
            with open(p, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            st, _ = _read_header(raw, p)
            h = _decode_meta(st, p, self.salt)
            if h.key != key:
                raise CorruptSnapshot("corrupt", f"{p}: holds another key")
            try:
                tensors = load(raw)
            except Exception as e:  # safetensors raises its own error types for truncated data
                raise CorruptSnapshot("corrupt", f"{p}: unreadable arrays ({e})") from None
            if _checksum(tensors) != h.checksum:
                raise CorruptSnapshot("corrupt", f"{p}: checksum mismatch")
            tokens = tensors.pop("tokens").astype(np.uint32)
            if tokens.tolist() != h.tokens:
                raise CorruptSnapshot("corrupt", f"{p}: tokens do not match the header")
            logits = tensors.pop("logits", None) if h.has_logits else None
            layers = [LayerRecord(c, m, n) for c, m, n in h.layers]
            names = {n for r in layers for n in r.names if n is not None}
            if not names <= set(tensors):
                raise CorruptSnapshot("corrupt", f"{p}: arrays missing")
        except CorruptSnapshot as e:
            self._drop(p, e.kind)
            return None
        snap = Snapshot(tokens, layers, tensors, dict(h.dtypes), logits,
                        [LayerRecord(c, m, n) for c, m, n in h.draft_layers], h.draft_tokens)
        self.hits[key] = self.hits.get(key, 0) + 1
        with contextlib.suppress(OSError):
            os.utime(p)  # recency, shared with every process using the directory
        self.c["loads"] += 1
        self.c["load_bytes"] += len(raw)
        self.load_s += time.perf_counter() - t0
        return snap

    def exists(self, key: str) -> bool:
        return os.path.exists(self.path(key))

    # -- eviction --------------------------------------------------------------------------------------------
    def _value(self, key: str, tokens: int, size: int, mtime: float, now: float) -> float:
        age = max(0.0, now - mtime)
        return (self.hits.get(key, 0) + 1) * tokens / max(size, 1) * 0.5 ** (age / self.half_life_s)

    def _evict_to_budget(self, keep: str | None = None) -> list[str]:
        """Under the lock: deletes the lowest-value files until the directory fits the budget."""
        files, total = [], 0
        now = time.time()
        for name in os.listdir(self.dir):
            if not name.endswith(SUFFIX) or name.startswith(TMP_PREFIX):
                continue
            try:
                st = os.stat(os.path.join(self.dir, name))
            except FileNotFoundError:
                continue
            key = name[: -len(SUFFIX)]
            total += st.st_size
            files.append((key, st.st_size, st.st_mtime))
        evicted = []
        if total <= self.budget_bytes:
            return evicted
        # files another process wrote (not seen here) count as one token: they go first unless recently used
        tokens = self.token_counts
        files.sort(key=lambda f: self._value(f[0], tokens.get(f[0], 1), f[1], f[2], now))
        for key, size, _ in files:
            if total <= self.budget_bytes:
                break
            if key == keep and len(files) > 1:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(key))
            total -= size
            evicted.append(key)
            self.hits.pop(key, None)
            self.token_counts.pop(key, None)
        self.c["evictions"] += len(evicted)
        self.evicted_keys += evicted
        return evicted

    def usage(self) -> tuple[int, int]:
        """(files, bytes) in the directory now."""
        n = b = 0
        for name in os.listdir(self.dir):
            if name.endswith(SUFFIX) and not name.startswith(TMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    b += os.stat(os.path.join(self.dir, name)).st_size
                    n += 1
        return n, b

    def stats(self) -> DiskStats:
        files, nbytes = self.usage()
        c = self.c
        return DiskStats(files=files, bytes=nbytes, budget_bytes=self.budget_bytes, writes=c["writes"],
                         write_bytes=c["write_bytes"], save_seconds_total=self.save_s[0],
                         save_seconds_max=self.save_s[1], loads=c["loads"], load_bytes=c["load_bytes"],
                         load_seconds_total=self.load_s, evictions=c["evictions"], corrupt_dropped=c["corrupt"],
                         foreign_dropped=c["foreign"], old_format_dropped=c["old_format"])


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
