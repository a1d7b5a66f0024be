"""Positional reads of expert bytes from safetensors files, on a pool of I/O threads.

Bytes only: the threads fill numpy buffers with ``os.preadv`` (``os.pread`` where preadv is missing) at the
absolute offsets the safetensors headers give; turning bytes into MLX arrays happens on the MLX thread. With
``direct=True`` files are opened with ``O_DIRECT`` (Linux) or ``F_NOCACHE`` (macOS) so reads bypass the page
cache; the aligned superset of each range is read into an aligned buffer and the wanted bytes are a view of it.

A shard that is missing, not a regular file, unreadable or shorter than its header says when it is read (moved,
deleted or truncated after the checkpoint was opened) raises a ``CheckpointError`` naming the file; its handle is
forgotten, so the next read opens the path again and succeeds once the file is back.
"""

from __future__ import annotations

import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import CheckpointError, CheckpointNotFoundError
from .file_kind import not_a_file_error

_ALIGN = 4096


def _aligned_empty(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    return raw[start : start + nbytes]


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

    def _read_range(self, path: str, offset: int, nbytes: int) -> np.ndarray:
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

    def _pread(self, fd: int, path: str, offset: int, nbytes: int) -> np.ndarray:
        direct = self.direct and hasattr(os, "O_DIRECT")
        if direct:
            start = offset - offset % _ALIGN
            end = -(-(offset + nbytes) // _ALIGN) * _ALIGN
            buf = _aligned_empty(end - start)
            pos = start
        else:
            buf = np.empty(nbytes, dtype=np.uint8)
            pos = offset
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
                raise CheckpointError(
                    f"{path}: unexpected end of file reading {nbytes} bytes at offset {offset}; "
                    "the file was truncated after the checkpoint was opened; put the complete file back"
                )
            done += n
        return buf[offset - start : offset - start + nbytes] if direct else buf

    def read(self, requests: list[list[tuple[str, int, int]]]) -> list[list[np.ndarray]]:
        """Reads every expert's ranges; returns one list of byte buffers per request, in order.

        Ranges (not experts) are the unit of work, so even a single missing expert's components are read
        in parallel.
        """
        flat = [r for req in requests for r in req]
        if len(flat) == 1 or self.threads == 1:
            bufs = [self._read_range(*r) for r in flat]
        else:
            bufs = list(self._pool.map(lambda r: self._read_range(*r), flat))
        self._count(sum(n for _, _, n in flat))
        out, i = [], 0
        for req in requests:
            out.append(bufs[i : i + len(req)])
            i += len(req)
        return out

    def _count(self, n: int) -> None:
        with self._lock:  # reads start from the MLX thread and from prefetching actors
            self.bytes_read += n

    def submit(self, ranges: list[tuple[str, int, int]]):
        """Starts reading one expert's ranges in the background; a Future of its list of buffers."""
        self._count(sum(n for _, _, n in ranges))
        return _Prefetch(self, ranges, self._pool.submit(lambda: [self._read_range(*r) for r in ranges]))

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

    def __init__(self, reader: ExpertReader, ranges, future):
        self._reader, self._ranges, self._future = reader, ranges, future

    def result(self):
        try:
            return self._future.result()
        except CheckpointError:
            self._reader._count(sum(n for _, _, n in self._ranges))
            return [self._reader._read_range(*r) for r in self._ranges]

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
