"""Writing safetensors checkpoints in shards, as the hub lays them out: the greedy shard plan, the shard file
names, the header and the index. ``mach convert`` (io/convert.py), ``mach make-tiny`` (testing/tiny.py) and
``bench/make_large_checkpoint.py`` write through these; each brings its own bytes (copied from a source
checkpoint, MLX arrays, generated chunks). No MLX here.
"""

from __future__ import annotations

import json
from typing import Callable, Iterable, Sequence, TypeVar

T = TypeVar("T")
INDEX = "model.safetensors.index.json"


def plan_shards(items: Iterable[T], nbytes: Callable[[T], int], shard_bytes: int) -> list[list[T]]:
    """``items`` in order, packed greedily into shards of at most ``shard_bytes`` (an item larger than that gets a
    shard of its own); always at least one (possibly empty) shard."""
    shards, cur, size = [], [], 0
    for it in items:
        n = nbytes(it)
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += n
    shards.append(cur)
    return shards


def shard_names(count: int, single: str | None = "model.safetensors") -> list[str]:
    """The hub's file names for ``count`` shards: ``model-00001-of-00003.safetensors``...; one shard is
    ``single`` (``model.safetensors``; None: numbered like the others)."""
    if count == 1 and single:
        return [single]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def header(entries: Sequence[tuple[str, str, Sequence[int], int]], metadata: dict | None = None) -> bytes:
    """A safetensors header for tensors stored back to back in ``entries`` order, each ``(name, dtype, shape,
    nbytes)``: the little-endian length, then the JSON padded with spaces to a multiple of 8."""
    h, pos = {}, 0
    if metadata:
        h["__metadata__"] = metadata
    for name, dtype, shape, nb in entries:
        h[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nb]}
        pos += nb
    raw = json.dumps(h, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def index_json(total_size: int, weight_map: dict[str, str], indent: int = 1) -> bytes:
    """``model.safetensors.index.json``: the total tensor bytes and each tensor's file."""
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=indent).encode()
