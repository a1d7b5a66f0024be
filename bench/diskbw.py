#!/usr/bin/env python3
"""Measure a disk's own read bandwidth on one file, bypassing the page cache.

Reads go through O_DIRECT (Linux) into page-aligned buffers, so neither a
warm page cache nor kernel read-ahead inflates the numbers. Where O_DIRECT is
unavailable (macOS, tmpfs, some network filesystems) the file is read
normally after asking the OS not to cache it: F_NOCACHE on macOS,
posix_fadvise(POSIX_FADV_DONTNEED) elsewhere; the result's "mode" says which
was used, and a warning is printed because such numbers may be cache-served.

Library use:

    from bench.diskbw import odirect_bandwidth, drop_page_cache
    odirect_bandwidth(path, pattern="random", threads=4)["mb_per_s"]

CLI (prints sequential/random x 1/4 threads):

    python bench/diskbw.py /path/to/model-00001-of-00004.safetensors

MB here are 10**6 bytes.
"""

import argparse
import errno
import mmap
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# O_DIRECT needs buffer addresses, file offsets and lengths aligned to the
# device's logical block size; 4096 covers all common devices.
ALIGN = 4096


def _open_uncached(path):
    """Open `path` for reads that bypass (or at least avoid) the page cache.

    Returns (fd, mode) with mode "O_DIRECT", "F_NOCACHE" or "fadvise".
    """
    if hasattr(os, "O_DIRECT"):
        fd = None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            # Some filesystems accept the flag at open() but reject the reads.
            with mmap.mmap(-1, ALIGN) as probe:
                os.preadv(fd, [probe], 0)
            return fd, "O_DIRECT"
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            if fd is not None:
                os.close(fd)
            reason = f"O_DIRECT unsupported for {path} ({e.strerror})"
    else:
        reason = f"O_DIRECT not available on {sys.platform}"

    fd = os.open(path, os.O_RDONLY)
    if sys.platform == "darwin":
        import fcntl

        fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
        mode = "F_NOCACHE"
    else:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        mode = "fadvise"
    print(f"warning: {reason}; using {mode} instead, reads may be served from cache",
          file=sys.stderr)
    return fd, mode


def _block_offsets(file_bytes, block_bytes, total_bytes, pattern, start_bytes, seed):
    """Byte offsets of the blocks to read (whole blocks inside the file)."""
    n_file = file_bytes // block_bytes
    n = min(total_bytes // block_bytes, n_file)
    if n == 0:
        raise ValueError(f"file ({file_bytes} B) is smaller than one block ({block_bytes} B)")
    if pattern == "sequential":
        # Start at start_bytes, wrapping to the beginning at the end of the file.
        first = start_bytes // block_bytes
        return [((first + i) % n_file) * block_bytes for i in range(n)]
    if pattern == "random":
        return [b * block_bytes for b in random.Random(seed).sample(range(n_file), n)]
    raise ValueError(f"unknown pattern {pattern!r}")


def odirect_bandwidth(path, block_bytes=2 << 20, total_bytes=512 << 20,
                      pattern="sequential", threads=1, start_bytes=0, seed=0):
    """Read `total_bytes` of `path` in `block_bytes` blocks and time it.

    pattern: "sequential" (consecutive blocks from `start_bytes`) or "random"
    (distinct block-aligned blocks anywhere in the file, drawn with `seed`).
    threads: number of concurrent readers; blocks are dealt round-robin, so
    with several threads a sequential read becomes interleaved streams that
    keep several requests in flight.

    Returns dict(mb_per_s, bytes, seconds, mode, pattern, threads, block_bytes).
    """
    if block_bytes % ALIGN:
        raise ValueError(f"block_bytes must be a multiple of {ALIGN}")
    offsets = _block_offsets(os.path.getsize(path), block_bytes, total_bytes,
                             pattern, start_bytes, seed)
    fd, mode = _open_uncached(path)
    # mmap-allocated buffers are page aligned, as O_DIRECT requires.
    buffers = [mmap.mmap(-1, block_bytes) for _ in range(threads)]

    def read_blocks(t):
        for off in offsets[t::threads]:
            got = os.preadv(fd, [buffers[t]], off)
            if got != block_bytes:
                raise OSError(f"short read at {off}: {got} of {block_bytes} bytes")

    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            t0 = time.perf_counter()
            # list() propagates exceptions from the readers.
            list(pool.map(read_blocks, range(threads)))
            seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
        for b in buffers:
            b.close()
    nbytes = len(offsets) * block_bytes
    return {
        "mb_per_s": nbytes / seconds / 1e6,
        "bytes": nbytes,
        "seconds": seconds,
        "mode": mode,
        "pattern": pattern,
        "threads": threads,
        "block_bytes": block_bytes,
    }


def drop_page_cache(path):
    """Evict `path` (and, as root on Linux, all clean pages) from the page cache.

    Tries posix_fadvise(POSIX_FADV_DONTNEED) on the file, then writing "3" to
    /proc/sys/vm/drop_caches. Returns {"fadvise": msg, "drop_caches": msg}
    where each msg is "ok" or why it did not work.
    """
    report = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        # Dirty pages cannot be dropped: write them back first.
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        report["fadvise"] = "ok"
    except (AttributeError, OSError) as e:  # AttributeError: no fadvise (macOS)
        report["fadvise"] = f"failed: {e}"
    finally:
        os.close(fd)

    if not os.path.exists("/proc/sys/vm/drop_caches"):
        report["drop_caches"] = "unavailable (no /proc/sys/vm/drop_caches)"
    elif os.geteuid() != 0:
        report["drop_caches"] = "skipped (not root)"
    else:
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            report["drop_caches"] = "ok"
        except OSError as e:  # e.g. read-only /proc/sys inside a container
            report["drop_caches"] = f"failed: {e}"
    return report


def main():
    p = argparse.ArgumentParser(description="Uncached read bandwidth of one file.")
    p.add_argument("path")
    p.add_argument("--block-mb", type=float, default=2.0, help="read size (MiB)")
    p.add_argument("--total-mb", type=float, default=512.0, help="bytes per measurement (MiB)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    p.add_argument("--drop-cache", action="store_true",
                   help="call drop_page_cache(path) first and print what worked")
    a = p.parse_args()

    block = int(a.block_mb * (1 << 20)) // ALIGN * ALIGN
    total = int(a.total_mb * (1 << 20))
    size = os.path.getsize(a.path)
    if a.drop_cache:
        print("drop_page_cache:", drop_page_cache(a.path))
    print(f"{a.path}: {size / 1e9:.2f} GB, block {block >> 10} KiB, "
          f"{total / 1e6:.0f} MB per measurement")
    print(f"{'pattern':<11} {'threads':>7} {'MB/s':>8} {'MB':>6} {'s':>6}  mode")
    # Each measurement reads its own region / block sample, so that no run
    # can be served by a cache (e.g. a VM host's) warmed by an earlier one.
    run = 0
    for pattern in ("sequential", "random"):
        for threads in a.threads:
            r = odirect_bandwidth(a.path, block, total, pattern, threads,
                                  start_bytes=run * total, seed=run)
            run += 1
            print(f"{pattern:<11} {threads:>7} {r['mb_per_s']:>8.0f} "
                  f"{r['bytes'] / 1e6:>6.0f} {r['seconds']:>6.2f}  {r['mode']}")


if __name__ == "__main__":
    main()
