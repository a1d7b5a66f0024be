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


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Parses one safetensors file's header and checks every tensor lies inside the file."""
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
                f"{path}: corrupt or truncated safetensors file (header claims {n} bytes, file has {size}); "
                "re-download or re-convert the checkpoint"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e}); re-copy the file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        nbytes = end - begin
        if nbytes != math.prod(shape) * DTYPES[dtype][0] or begin < 0:
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
            data = json.loads(index.read_text())
            self._weight_map = dict(data["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r}); it needs a 'weight_map'") from None
        files = sorted(set(self._weight_map.values()))
        for f in files:
            require_regular_file(self.directory / f, f"{self.directory / f}: shard listed in {index.name} is "
                                 f"missing; copy every shard ({len(files)} files) into {self.directory}")
        return files

    def _check_index_matches(self, index: Path) -> None:
        for name, fname in self._weight_map.items():
            info = self.tensors.get(name)
            if info is None or os.path.basename(info.file) != fname:
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
