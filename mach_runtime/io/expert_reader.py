"""Positional reads of expert bytes from safetensors files, on a pool of I/O threads.

Bytes only: the threads fill numpy buffers with ``os.preadv`` (``os.pread`` where preadv is missing) at the
absolute offsets the safetensors headers give; turning bytes into MLX arrays happens on the MLX thread. With
``direct=True`` files are opened with ``O_DIRECT`` (Linux) or ``F_NOCACHE`` (macOS) so reads bypass the page
cache; the aligned superset of each range is read into an aligned buffer and the wanted bytes are a view of it.
Buffered descriptors get ``posix_fadvise(RANDOM)`` where the platform has it: expert reads are random, and the
kernel's readahead otherwise pulled 1.8x the wanted bytes through the page cache.

Staging buffers are page-aligned and reused: ``release()`` gives a request's buffers back once their bytes have
been copied (``StagingPool``), so steady streaming allocates nothing per miss. ``read_iter`` hands each request's
buffers out as soon as its ranges are in, so the caller copies one expert to the device while the next is read.

A shard that is missing, not a regular file, unreadable or shorter than its header says when it is read (moved,
deleted or truncated after the checkpoint was opened) raises a ``CheckpointError`` naming the file; its handle is
forgotten, so the next read opens the path again and succeeds once the file is back.
"""

from __future__ import annotations

import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np

from ..errors import CheckpointError, CheckpointNotFoundError
from .file_kind import not_a_file_error

_ALIGN = 4096


def _aligned_empty(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    return raw[start : start + nbytes]


class StagingPool:
    """Page-aligned byte buffers, reused by size (every expert of a checkpoint has the same range sizes).

    ``take(n)`` returns a free buffer of exactly ``n`` bytes (allocating only when none is free); ``give`` returns
    it. At most ``cap_bytes`` of free buffers are kept. Thread-safe.
    """

    def __init__(self, cap_bytes: int = 512 << 20):
        self.cap_bytes = cap_bytes
        self._free: dict[int, list[np.ndarray]] = {}
        self._free_bytes = 0
        self._lock = threading.Lock()
        self.allocated = 0  # buffers ever allocated (stays flat once streaming is steady)

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                self._free_bytes -= nbytes
                return free.pop()
            self.allocated += 1
        return _aligned_empty(nbytes)

    def give(self, buf: np.ndarray) -> None:
        with self._lock:
            if self._free_bytes + buf.nbytes > self.cap_bytes:
                return
            self._free.setdefault(buf.nbytes, []).append(buf)
            self._free_bytes += buf.nbytes


def coalesce(ranges: list[tuple[str, int, int]]) -> list[tuple[tuple[str, int, int], list[int]]]:
    """Merges runs of ranges that follow each other in one file: ``[(merged range, [length of each part])]``.

    The HF per-expert layout stores an expert's projections next to each other, and a ``mach convert`` sidecar
    stores each expert as one extent, so a miss becomes one read instead of one per tensor.
    """
    out: list = []
    for path, off, n in ranges:
        if out and out[-1][0][0] == path and out[-1][0][1] + out[-1][0][2] == off:
            (p, o, m), lens = out[-1]
            out[-1] = ((p, o, m + n), lens + [n])
        else:
            out.append(((path, off, n), [n]))
    return out


def _split(got: list, runs: list) -> list[np.ndarray]:
    """The wanted bytes of each original range, as views into the merged reads."""
    views = []
    for (_, view), (_, lens) in zip(got, runs):
        pos = 0
        for n in lens:
            views.append(view[pos : pos + n])
            pos += n
    return views


class ExpertReader:
    """Reads lists of (file, offset, nbytes) ranges in parallel."""

    def __init__(self, threads: int = 4, direct: bool = False):
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mach-io")
        self._fds: dict[str, int] = {}
        self._stale: list[int] = []  # handles of files that failed a read: closed at close() (a reader may still use one)
        self._lock = threading.Lock()
        self.direct_requested = direct
        self.direct = direct and (hasattr(os, "O_DIRECT") or hasattr(__import__("fcntl"), "F_NOCACHE"))
        self.bytes_read = 0  # bytes requested (the wanted ranges), not the aligned supersets
        self.pool = StagingPool()

    # -- file handles ------------------------------------------------------------------------------------
    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._open(path)
                self._fds[path] = fd
            return fd

    def _open(self, path: str) -> int:
        fd = self._open_fd(path)
        try:  # O_NONBLOCK made opening a FIFO return at once instead of waiting for a writer; reads block as usual
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise not_a_file_error(path, mode, "a safetensors shard")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_fd(self, path: str) -> int:
        nonblock = getattr(os, "O_NONBLOCK", 0)
        if self.direct and hasattr(os, "O_DIRECT"):
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT | nonblock)
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                raise
            except OSError:  # e.g. tmpfs does not support O_DIRECT: fall back to buffered reads
                self.direct = False
        fd = os.open(path, os.O_RDONLY | nonblock)
        if not self.direct and hasattr(os, "posix_fadvise"):
            try:  # random access: no readahead (it read 1.8x the wanted bytes)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            except OSError:
                pass
        if self.direct:
            import fcntl

            if hasattr(fcntl, "F_NOCACHE"):  # macOS: the page cache is bypassed per descriptor
                fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
        return fd

    # -- reads -------------------------------------------------------------------------------------------
    def _forget(self, path: str, fd: int) -> None:
        """Drops a failed file's handle: the next read opens the path again (the file may be back by then)."""
        with self._lock:
            if self._fds.get(path) == fd:
                del self._fds[path]
                self._stale.append(fd)

    def _read_range(self, path: str, offset: int, nbytes: int) -> tuple[np.ndarray, np.ndarray]:
        """(staging buffer, view of the wanted bytes in it); a failure is a ``CheckpointError`` naming the file."""
        try:
            fd = self._fd(path)
        except OSError as e:
            raise _file_error(path, e) from None
        try:
            return self._pread(fd, path, offset, nbytes)
        except (OSError, CheckpointError) as e:
            self._forget(path, fd)
            if isinstance(e, CheckpointError):
                raise
            raise _file_error(path, e) from None

    def _pread(self, fd: int, path: str, offset: int, nbytes: int) -> tuple[np.ndarray, np.ndarray]:
        direct = self.direct and hasattr(os, "O_DIRECT")
        if direct:
            start = offset - offset % _ALIGN
            end = -(-(offset + nbytes) // _ALIGN) * _ALIGN
            pos = start
        else:
            start, end, pos = offset, offset + nbytes, offset
        buf = self.pool.take(end - start)
        view = memoryview(buf)
        done = 0
        while done < len(buf):
            if hasattr(os, "preadv"):
                n = os.preadv(fd, [view[done:]], pos + done)
            else:  # pragma: no cover - platforms without preadv
                chunk = os.pread(fd, len(buf) - done, pos + done)
                n = len(chunk)
                view[done : done + n] = chunk
            if n == 0:
                if direct and done >= (offset - start) + nbytes:
                    break  # the aligned superset ran past EOF; the wanted bytes are complete
                self.pool.give(buf)
                raise CheckpointError(
                    f"{path}: unexpected end of file reading {nbytes} bytes at offset {offset}; "
                    "the file was truncated after the checkpoint was opened; put the complete file back"
                )
            done += n
        return buf, buf[offset - start : offset - start + nbytes]

    def read_iter(self, requests: list[list[tuple[str, int, int]]]):
        """Yields ``(request index, [wanted bytes per range], [staging buffers])`` as each request completes.

        Ranges (not requests) are the unit of work, so even one expert's components are read in parallel; the
        caller copies a finished request's bytes while the others are still being read, then ``release``s its
        staging buffers.
        """
        self._count(sum(n for req in requests for _, _, n in req))
        runs = [coalesce(req) for req in requests]  # adjacent ranges of one file: one read
        flat = [(i, j, r) for i, rr in enumerate(runs) for j, (r, _) in enumerate(rr)]
        if len(flat) == 1 or self.threads == 1:
            for i, rr in enumerate(runs):
                got = [self._read_range(*r) for r, _ in rr]
                yield i, _split(got, rr), [b for b, _ in got]
            return
        futs = {self._pool.submit(self._read_range, *r): (i, j) for i, j, r in flat}
        left = [len(rr) for rr in runs]
        parts: list[list] = [[None] * len(rr) for rr in runs]
        try:
            for fut in as_completed(futs):
                i, j = futs[fut]
                parts[i][j] = fut.result()
                left[i] -= 1
                if left[i] == 0:
                    yield i, _split(parts[i], runs[i]), [b for b, _ in parts[i]]
        finally:
            for fut in futs:  # an error or an abandoned iterator: cancel what has not started
                fut.cancel()

    def read(self, requests: list[list[tuple[str, int, int]]]) -> list[list[np.ndarray]]:
        """Reads every expert's ranges; returns one list of byte buffers per request, in order."""
        out: list = [None] * len(requests)
        for i, views, _ in self.read_iter(requests):
            out[i] = views
        return out

    def release(self, buffers) -> None:
        """Gives staging buffers (from ``read_iter`` / ``submit``) back for reuse; their views become invalid."""
        for b in buffers:
            self.pool.give(b)

    def _count(self, n: int) -> None:
        with self._lock:  # reads start from the MLX thread and from prefetching actors
            self.bytes_read += n

    def submit(self, ranges: list[tuple[str, int, int]]):
        """Starts reading one expert's ranges in the background; a Future of ``(views, staging buffers)``."""
        self._count(sum(n for _, _, n in ranges))

        def job():
            runs = coalesce(ranges)
            got = [self._read_range(*r) for r, _ in runs]
            return _split(got, runs), [b for b, _ in got]

        return _Prefetch(self, ranges, job, self._pool.submit(job))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for fd in [*self._fds.values(), *self._stale]:
                os.close(fd)
            self._fds.clear()
            self._stale.clear()


class _Prefetch:
    """A background read of one expert. A read that failed (its file was missing or short then) is not an error
    by itself: ``result()`` reads again on the calling thread, and that read decides."""

    def __init__(self, reader: ExpertReader, ranges, job, future):
        self._reader, self._ranges, self._job, self._future = reader, ranges, job, future

    def result(self):
        try:
            return self._future.result()
        except CheckpointError:
            self._reader._count(sum(n for _, _, n in self._ranges))
            return self._job()

    def __getattr__(self, name):  # done(), cancel(), ... of the underlying future
        return getattr(self._future, name)


def _file_error(path: str, e: OSError) -> CheckpointError:
    """A ``CheckpointError`` naming the file for an OS error met while opening or reading an expert's shard."""
    if isinstance(e, FileNotFoundError):
        return CheckpointNotFoundError(
            f"{path}: the shard is gone (moved or deleted after the checkpoint was opened); put it back: requests "
            "that need its experts fail until it is there again"
        )
    if isinstance(e, IsADirectoryError):
        return CheckpointError(f"{path}: is a directory, not a safetensors shard; put the file itself there")
    if isinstance(e, PermissionError):
        return CheckpointError(f"{path}: permission denied reading the shard; make it readable")
    return CheckpointError(f"{path}: cannot read the shard ({e.strerror or e}); check the file and the disk")
