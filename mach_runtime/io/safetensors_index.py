"""Reads safetensors headers (single file or sharded) without MLX and without reading tensor data.

A safetensors file is: 8 bytes little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data; offsets are
relative to the first byte after the header. This module turns that into absolute file offsets so experts can
be read with positional reads, and validates everything a truncated or corrupt file would get wrong.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, CheckpointNotFoundError
from .file_kind import require_regular_file

# safetensors dtype name -> (bytes per element, numpy dtype name used to view the raw bytes)
DTYPES = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "uint16"),  # numpy has no bfloat16: keep the raw bits, MLX views them as bfloat16
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U64": (8, "uint64"),
    "U32": (4, "uint32"),
    "U16": (2, "uint16"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
    "F8_E4M3": (1, "uint8"),
    "F8_E5M2": (1, "uint8"),
    "F8_E8M0": (1, "uint8"),  # ue8m0 block scales (DeepSeek-V4 ``.scale``): the exponent byte, 2**(b - 127)
}

_MAX_HEADER = 100 << 20  # the safetensors spec caps headers at 100 MB


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live on disk."""

    name: str
    file: str  # absolute path
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element in ``file``
    nbytes: int

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][0]


_MAX_DEPTH = 3  # {name: {"shape": [...]}}: a valid header nests three levels deep, never more


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _nesting_depth(raw: bytes) -> int:
    """Deepest bracket nesting of a JSON text, without parsing it (strings blanked first), in C-speed passes."""
    import re

    import numpy as np

    text = re.sub(rb'"(?:[^"\\]|\\.)*"', b'""', raw)
    b = np.frombuffer(text, dtype=np.uint8)
    step = (b == ord("{")).astype(np.int32) + (b == ord("[")) - (b == ord("}")) - (b == ord("]"))
    return int(step.cumsum().max()) if step.size else 0


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _parse_header(raw: bytes, path: str) -> dict:
    """The header's JSON, bounded: nesting checked before parsing, duplicate keys refused."""
    if _nesting_depth(raw) > _MAX_DEPTH:
        raise CheckpointError(f"{path}: corrupt safetensors header (nested deeper than a tensor table can be); "
                              "re-copy or re-convert the file")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: corrupt safetensors header ({e}); re-copy the file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header


def _entry(path: str, name: str, meta) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, every field type-checked."""
    if not isinstance(meta, dict) or set(meta) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: it must be an object with exactly "
                              f"'dtype', 'shape' and 'data_offsets', got {str(meta)[:120]}")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r}: field 'shape' must be a list of non-negative integers, "
                              f"got {str(shape)[:120]}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: tensor {name!r}: field 'data_offsets' must be two integers "
                              f"0 <= begin <= end, got {str(offsets)[:120]}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Parses one safetensors file's header (bounded in size and nesting, every field typed) and checks every
    tensor lies inside the file without overlapping another."""
    path = os.path.abspath(path)
    require_regular_file(path, f"{path}: safetensors file not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header); re-copy it")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file (header claims {n} bytes, file has {size}, "
                f"headers are at most {_MAX_HEADER}); re-download or re-convert the checkpoint"
            )
        header = _parse_header(f.read(n), path)
    meta = header.get("__metadata__")
    if meta is not None and not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header ('__metadata__' must be an object)")
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _entry(path, name, meta)
        nbytes = end - begin
        if nbytes != math.prod(shape) * DTYPES[dtype][0]:
            raise CheckpointError(
                f"{path}: tensor {name!r} header is inconsistent (shape {list(shape)} {dtype} "
                f"but {nbytes} bytes); the file is corrupt"
            )
        if base + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte {base + end} but the file "
                f"has {size} bytes; re-copy or re-download this file"
            )
        out[name] = TensorInfo(name, path, dtype, shape, base + begin, nbytes)
        if nbytes:
            spans.append((begin, end, name))
    spans.sort()
    for (_, end0, a), (begin1, _, b) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensors {a!r} and {b!r} overlap")
    return out


class CheckpointIndex:
    """All tensors of a checkpoint directory, from ``model.safetensors.index.json`` or the ``*.safetensors``."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).resolve()
        self.tensors: dict[str, TensorInfo] = {}
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            files = self._files_from_index(index)
        else:
            files = sorted(p.name for p in self.directory.glob("model*.safetensors"))  # as mlx-lm does
            if not files:
                raise CheckpointNotFoundError(
                    f"{self.directory}: no model*.safetensors weight files; point at a directory with "
                    "model.safetensors or a sharded model.safetensors.index.json"
                )
        self.files = [str(self.directory / f) for f in files]
        for f in self.files:
            for name, info in read_header(f).items():
                if name in self.tensors:
                    raise CheckpointError(f"{f}: tensor {name!r} also appears in {self.tensors[name].file}")
                self.tensors[name] = info
        if index.exists():
            self._check_index_matches(index)

    def _files_from_index(self, index: Path) -> list[str]:
        try:
            data = json.loads(index.read_bytes().decode("utf-8"))
            self._weight_map = dict(data["weight_map"])
        except (OSError, UnicodeDecodeError, RecursionError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r}); it needs a 'weight_map'") from None
        checked = set()  # a few shards named by many tensors: each name checked once
        for name, fname in self._weight_map.items():
            if isinstance(fname, str) and fname in checked:
                continue
            if (not isinstance(fname, str) or not fname or os.path.isabs(fname) or ".." in Path(fname).parts
                    or not fname.endswith(".safetensors")):
                raise CheckpointError(
                    f"{index}: field 'weight_map' maps tensor {name!r} to {fname!r}; each value must be the name "
                    "of a .safetensors shard in this directory"
                )
            checked.add(fname)
        files = sorted(set(self._weight_map.values()))
        for f in files:
            require_regular_file(self.directory / f, f"{self.directory / f}: shard listed in {index.name} is "
                                 f"missing; copy every shard ({len(files)} files) into {self.directory}")
        return files

    def _check_index_matches(self, index: Path) -> None:
        base = {f: os.path.basename(f) for f in self.files}  # every tensor came from one of these
        for name, fname in self._weight_map.items():
            info = self.tensors.get(name)
            if info is None or base[info.file] != fname:
                raise CheckpointError(
                    f"{index}: tensor {name!r} is mapped to {fname} but that shard does not contain it; "
                    "the index and the shards are out of sync"
                )

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def names(self) -> list[str]:
        return list(self.tensors)

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
