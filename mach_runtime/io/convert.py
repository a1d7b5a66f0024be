"""``mach convert SRC DST``: rewrites a checkpoint so that its routed experts live in an expert sidecar
(``expert_sidecar.py``: one aligned extent per (layer, expert), one read per streaming miss).

Any expert layout the loader reads is a source: HF per-expert (as transformers saves it), HF fused
(``experts.gate_up_proj``, transposed / interleaved for gpt-oss, mxfp4 blocks), MLX stacked exports
(``switch_mlp``, mlx-lm's ``convert``, quantized or not), or another converted checkpoint. Families: those
with an adapter, except deepseek_v4 (its MTP layers are found by tensor name). Tested: qwen3_moe, qwen3_5_moe,
gpt_oss. The source's experts are found the way ``load_moe`` finds them (``expert_layout_for``), so there is
one reader of checkpoints.

* Without quantization flags the bytes are copied as they are: the same dtypes, scales and host-side transforms.
  The converted checkpoint computes exactly what the source computes.
* ``--q-bits`` / ``--q-group-size`` / ``--q-mode affine|mxfp4`` re-quantize every expert projection with MLX's
  ``mx.quantize``. Quantized sources are dequantized first. The transforms (transpose, de-interleave) are
  applied before quantizing, so the stored components are the engine's rows.
* Non-expert tensors are copied byte for byte into ``model.safetensors`` (sharded above 5 GiB) under the names
  the source uses. config.json, the tokenizer and every other top-level file are copied unchanged.

Resumable: everything is written into ``DST.partial``. ``convert-journal.json`` records the source fingerprint,
the parameters, the planned layout and the CRC32 of every layer written (the data is fsynced before the journal
is). Running the same command again checks the journal matches, re-reads each done layer and verifies its CRC,
rewrites the layers that fail, and continues. The finish is atomic: the sidecar index is written last, the
journal is removed, and ``DST.partial`` is renamed to ``DST``. The output is deterministic, so an interrupted and
resumed conversion gives the same files as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import time
import zlib
from pathlib import Path

import msgspec
import numpy as np

from ..errors import CheckpointError, ConfigError
from .expert_layout import ExpertLayerSource, ExpertLayout, _part_dims
from .expert_sidecar import (ALIGN, DATA_NAME, FORMAT, INDEX_NAME, VERSION, SidecarComponent, SidecarIndex,
                             SidecarLayer, SidecarQuant, SidecarSource, encode_index, expert_layout_for)
from .quant_formats import QuantSpec
from .safetensors_index import DTYPES, CheckpointIndex
from .safetensors_write import INDEX, header, index_json, plan_shards, shard_names

JOURNAL = "convert-journal.json"
PARTIAL = ".partial"
SHARD_BYTES = 5 << 30
_COPY_CHUNK = 64 << 20
_FLOATS = ("F32", "F16", "BF16")


class Journal(msgspec.Struct, forbid_unknown_fields=True):
    fingerprint: str
    params: dict
    plan: str  # sha256 of the planned sidecar index (CRCs zeroed)
    done: dict[str, int] = {}  # layer -> crc32 of its bytes, for the layers written and synced
    non_experts: bool = False


def resolve_quant(bits=None, group_size=None, mode=None) -> QuantSpec | None:
    """The re-quantization the flags ask for, or None (keep the source's precision)."""
    if bits is None and group_size is None and mode is None:
        return None
    mode = mode or "affine"
    if mode == "mxfp4":
        bits, group_size = bits or 4, group_size or 32
        if (bits, group_size) != (4, 32):
            raise ConfigError(f"--q-mode mxfp4 is 4 bits in groups of 32; got --q-bits {bits} --q-group-size "
                              f"{group_size}")
    elif mode == "affine":
        bits, group_size = bits or 4, group_size or 64
        if bits not in (2, 3, 4, 5, 6, 8) or group_size not in (32, 64, 128):
            raise ConfigError(f"--q-bits must be one of 2, 3, 4, 5, 6, 8 and --q-group-size one of 32, 64, 128; "
                              f"got {bits} and {group_size}")
    else:
        raise ConfigError(f"--q-mode must be affine or mxfp4, got {mode!r}")
    return QuantSpec(int(bits), int(group_size), mode)


def source_fingerprint(directory: Path, index: CheckpointIndex) -> str:
    """sha256 of config.json, every shard's name, size and header, and the source's own sidecar index if any."""
    h = hashlib.sha256((directory / "config.json").read_bytes())
    for f in index.files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            h.update(os.path.basename(f).encode() + str(os.path.getsize(f)).encode() + fh.read(n))
    if (directory / INDEX_NAME).is_file():
        h.update((directory / INDEX_NAME).read_bytes())
    return h.hexdigest()


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def _float_dtype(src: ExpertLayerSource, part: str) -> str:
    """The float dtype a part is re-quantized in: its weight's, else its scales', else BF16."""
    for comp in ("weight", "scales"):
        c = src.components.get((part, comp))
        if c is not None and c.dtype in _FLOATS:
            return c.dtype
    return "BF16"


def _planned_components(src: ExpertLayerSource, layout: ExpertLayout, q: QuantSpec | None):
    """[(part, comp, dtype, shape, target, rows, transform)] of one expert in the sidecar, in extent order."""
    if q is None:
        return [(c.part, c.comp, c.dtype, c.shape, c.target, c.rows, c.transform) for c in src.components.values()]
    out = []
    parts = list(dict.fromkeys(c.part for c in src.components.values()))
    for part in parts:
        if (part, "global_scale") in src.components:
            raise ConfigError("re-quantizing nvfp4 experts with a global scale is not supported; convert without "
                              "--q-bits/--q-mode to keep them as they are")
        out_dim, in_dim, _ = _part_dims(part, layout.hidden_size, layout.moe_intermediate)
        if in_dim % q.group_size:
            raise ConfigError(f"--q-group-size {q.group_size} does not divide the {part} projection's input "
                              f"dimension {in_dim}; choose a group size that does (32 divides more)")
        w = src.components[(part, "weight")]
        fdt = _float_dtype(src, part)
        out.append((part, "weight", "U32", (out_dim, in_dim * q.bits // 32), w.target, w.rows, ""))
        if q.mode == "affine":
            out.append((part, "scales", fdt, (out_dim, in_dim // q.group_size), w.target, w.rows, ""))
            out.append((part, "biases", fdt, (out_dim, in_dim // q.group_size), w.target, w.rows, ""))
        else:
            out.append((part, "scales", "U8", (out_dim, in_dim // q.group_size), w.target, w.rows, ""))
        b = src.components.get((part, "bias"))
        if b is not None:
            out.append((part, "bias", b.dtype, (out_dim,), b.target, b.rows, ""))
    return out


def plan(layout: ExpertLayout, q: QuantSpec | None) -> list[SidecarLayer]:
    """Every layer's extents and components (CRCs 0): deterministic from the source layout and ``q``."""
    layers, offset = [], 0
    for src in layout.layers:
        comps, pos = [], 0
        for part, comp, dtype, shape, target, rows, transform in _planned_components(src, layout, q):
            pos = _align(pos, DTYPES[dtype][0])
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][0]
            comps.append(SidecarComponent(part, comp, dtype, tuple(shape), pos, nbytes, target, rows, transform))
            pos += nbytes
        stride = _align(pos, ALIGN)
        if q is None:
            quants = {k: (None if v is None else SidecarQuant(v.bits, v.group_size, v.mode))
                      for k, v in (src.quants or {"gate_up": src.quant}).items()}
        else:
            quants = {"gate_up": SidecarQuant(q.bits, q.group_size, q.mode),
                      "down": SidecarQuant(q.bits, q.group_size, q.mode)}
        layers.append(SidecarLayer(src.layer, offset, stride, pos, 0, comps, quants))
        offset += stride * src.num_experts
    return layers


class _SourceBytes:
    """Positional reads of the source's expert components (buffered: the whole checkpoint is read once)."""

    def __init__(self):
        self._fds: dict[str, int] = {}

    def read(self, path: str, offset: int, nbytes: int) -> np.ndarray:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot open the source shard ({e.strerror or e})") from None
        buf = np.empty(nbytes, dtype=np.uint8)
        view, done = memoryview(buf), 0
        while done < nbytes:
            if hasattr(os, "preadv"):
                n = os.preadv(fd, [view[done:]], offset + done)
            else:  # pragma: no cover - platforms without preadv
                chunk = os.pread(fd, nbytes - done, offset + done)
                n = len(chunk)
                view[done : done + n] = chunk
            if n == 0:
                raise CheckpointError(f"{path}: unexpected end of file reading {nbytes} bytes at {offset}; the "
                                      "source shard is truncated")
            done += n
        return buf

    def component(self, c, E: int) -> np.ndarray:
        """One component of every expert: uint8 [E, nbytes] (one read when the experts are contiguous)."""
        (f0, o0), n = c.sources[0], c.nbytes
        if all(f == f0 and o == o0 + e * n for e, (f, o) in enumerate(c.sources)):
            return self.read(f0, o0, E * n).reshape(E, n)
        return np.stack([self.read(f, o, n) for f, o in c.sources])

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _layer_bytes(src: ExpertLayerSource, planned: SidecarLayer, q: QuantSpec | None, reader: _SourceBytes):
    """The layer's extents, ``num_experts * stride`` bytes."""
    E = src.num_experts
    buf = np.zeros((E, planned.stride), dtype=np.uint8)
    if q is None:
        parts = {(c.part, c.comp): reader.component(c, E) for c in src.components.values()}
    else:
        from .requantize import requantize_layer

        parts = requantize_layer(src, q, lambda part: _float_dtype(src, part), lambda c: reader.component(c, E))
    for c in planned.components:
        data = parts[(c.part, c.comp)]
        if data.shape != (E, c.nbytes):
            raise CheckpointError(f"layer {src.layer}: {c.part}.{c.comp} came out as {data.shape[1]} bytes per "
                                  f"expert, planned {c.nbytes}")
        buf[:, c.offset : c.offset + c.nbytes] = data
    return buf.reshape(-1)


def _pwrite_all(fd: int, buf: np.ndarray, offset: int) -> None:
    view, done = memoryview(buf), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _crc_of(fd: int, offset: int, nbytes: int) -> int:
    crc, pos = 0, 0
    while pos < nbytes:
        chunk = os.pread(fd, min(_COPY_CHUNK, nbytes - pos), offset + pos)
        if not chunk:
            return -1
        crc = zlib.crc32(chunk, crc)
        pos += len(chunk)
    return crc


def _write_json_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[mach convert] {msg}", file=sys.stderr, flush=True)


def convert_checkpoint(src, dst, *, q_bits=None, q_group_size=None, q_mode=None, progress: bool = True,
                       shard_bytes: int = SHARD_BYTES, revision: str | None = None, on_layer=None) -> Path:
    """Converts ``src`` (a checkpoint directory or a repository id in the local HF cache) into ``dst`` with an
    expert sidecar; see the module docstring. ``on_layer(layer)`` is called after each layer is written and
    journaled (progress hooks; tests interrupt a conversion there). Returns ``dst``."""
    from .arch_registry import adapter_for_config, read_config
    from .load import _local_dir

    q = resolve_quant(q_bits, q_group_size, q_mode)
    directory = _local_dir(src, revision)
    dst = Path(dst).absolute()
    if dst.exists():
        raise ConfigError(f"{dst}: already exists; remove it or choose another destination (a stopped conversion "
                          f"continues from {dst.name}{PARTIAL} when the same command runs again)")
    if dst.resolve() == directory or directory in dst.resolve().parents:
        raise ConfigError(f"{dst}: the destination must lie outside the source checkpoint {directory}")
    source = str(directory / "config.json")
    config = read_config(directory)
    adapter = adapter_for_config(config, source)
    tc = adapter.text_config(config, source)
    if adapter.checkpoint_config is not None:  # its MoE layers depend on which tensors the checkpoint holds
        raise ConfigError(f"{source}: mach convert does not support {adapter.key} yet (its MTP layers are found by "
                          "tensor name, which a sidecar hides); load the checkpoint as it is")
    index = CheckpointIndex(directory)
    tc = adapter.resolve_config(tc, index.__contains__)
    layout = expert_layout_for(directory, index, adapter, tc, source)
    layers = plan(layout, q)
    total = sum(la.stride * layout.num_experts for la in layers)
    qstruct = None if q is None else SidecarQuant(q.bits, q.group_size, q.mode)
    sidecar = SidecarIndex(FORMAT, VERSION, DATA_NAME, total, ALIGN,
                           SidecarSource(source_fingerprint(directory, index), layout.layout, layout.scheme), qstruct,
                           layout.num_experts, layout.top_k, layout.hidden_size, layout.moe_intermediate, layers)
    plan_hash = hashlib.sha256(encode_index(sidecar)).hexdigest()
    params = {"q_bits": None if q is None else q.bits, "q_group_size": None if q is None else q.group_size,
              "q_mode": None if q is None else q.mode, "shard_bytes": int(shard_bytes)}

    work = dst.with_name(dst.name + PARTIAL)
    jpath = work / JOURNAL
    journal = _open_journal(work, jpath, sidecar.source.fingerprint, params, plan_hash, progress)
    fd = os.open(work / DATA_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    reader = _SourceBytes()
    try:
        if os.fstat(fd).st_size != total:
            os.ftruncate(fd, total)
        _verify_done(fd, layers, layout.num_experts, journal, work / DATA_NAME, progress)
        _write_json_atomic(jpath, msgspec.json.encode(journal))
        todo = [(ls, la) for ls, la in zip(layout.layers, layers) if str(la.layer) not in journal.done]
        how = f"re-quantized {q.mode} {q.bits}-bit, groups of {q.group_size}" if q else "the source's precision"
        _say(progress, f"{directory} -> {dst}: {len(layers)} MoE layers x {layout.num_experts} experts, "
             f"{total / 1e9:.2f} GB of extents ({how}); {len(layers) - len(todo)} layers already done")
        t0, written = time.perf_counter(), 0
        for i, (layer_src, la) in enumerate(todo):
            buf = _layer_bytes(layer_src, la, q, reader)
            _pwrite_all(fd, buf, la.offset)
            os.fsync(fd)
            journal.done[str(la.layer)] = zlib.crc32(buf)
            _write_json_atomic(jpath, msgspec.json.encode(journal))
            written += buf.nbytes
            dt = time.perf_counter() - t0
            left = sum(la2.stride for _, la2 in todo[i + 1:]) * layout.num_experts
            _say(progress, f"layer {la.layer} ({i + 1}/{len(todo)}): {written / 1e9:.2f} GB written, "
                 f"{written / 1e6 / max(dt, 1e-9):.0f} MB/s, ETA {left / max(written / max(dt, 1e-9), 1):.0f} s")
            if on_layer is not None:
                on_layer(la.layer)
        if not journal.non_experts:
            _write_non_experts(index, layout, work, shard_bytes, progress)
            journal.non_experts = True
            _write_json_atomic(jpath, msgspec.json.encode(journal))
    finally:
        reader.close()
        os.close(fd)
    _copy_meta_files(directory, work)
    done = [msgspec.structs.replace(la, crc32=journal.done[str(la.layer)]) for la in layers]
    _write_json_atomic(work / INDEX_NAME, encode_index(msgspec.structs.replace(sidecar, layers=done)))
    jpath.unlink()
    _fsync_dir(work)
    os.rename(work, dst)
    _fsync_dir(dst.parent)
    _say(progress, f"done: {dst}")
    return dst


def _open_journal(work: Path, jpath: Path, fingerprint: str, params: dict, plan_hash: str, progress) -> Journal:
    if not work.exists():
        work.mkdir(parents=True)
        journal = Journal(fingerprint, params, plan_hash)
        _write_json_atomic(jpath, msgspec.json.encode(journal))
        return journal
    if not jpath.is_file():
        raise ConfigError(f"{work}: exists but holds no {JOURNAL}; it is not a conversion this command can "
                          "continue: remove it")
    try:
        journal = msgspec.json.decode(jpath.read_bytes(), type=Journal)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
        raise CheckpointError(f"{jpath}: damaged conversion journal ({e}); remove {work} and convert again") from None
    if (journal.fingerprint, journal.params, journal.plan) != (fingerprint, params, plan_hash):
        raise ConfigError(f"{jpath}: this partial conversion was started from another source or with other "
                          f"options ({journal.params}); run that command again to finish it, or remove {work}")
    _say(progress, f"resuming {work}: {len(journal.done)} layers written before")
    return journal


def _verify_done(fd: int, layers, E: int, journal: Journal, data: Path, progress) -> None:
    """Re-reads every layer the journal calls done; those whose CRC differs are written again."""
    for la in layers:
        key = str(la.layer)
        if key in journal.done and _crc_of(fd, la.offset, la.stride * E) != journal.done[key]:
            _say(progress, f"{data}: layer {la.layer} does not match its journaled CRC32; writing it again")
            del journal.done[key]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _copy_meta_files(directory: Path, work: Path) -> None:
    """config.json, the tokenizer and every other top-level file but the weights (HF-cache symlinks followed)."""
    skip = {"model.safetensors.index.json", INDEX_NAME, DATA_NAME}
    for p in sorted(directory.iterdir()):
        if p.name.startswith(".") or p.name.endswith(".safetensors") or p.name in skip or not p.is_file():
            continue
        shutil.copyfile(p, work / p.name)


def _source_metadata(path: str) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n)).get("__metadata__") or {}
    return {k: v for k, v in meta.items() if isinstance(k, str) and isinstance(v, str)}


def _write_non_experts(index: CheckpointIndex, layout: ExpertLayout, work: Path, shard_bytes: int, progress) -> None:
    """Every non-expert tensor, byte for byte, under its source name, in shards of at most ``shard_bytes``."""
    names = sorted(n for n in index.names() if n not in layout.expert_tensor_names)
    shards = plan_shards(names, lambda n: index[n].nbytes, shard_bytes)
    meta = _source_metadata(index.files[0]) if index.files else {}
    files = shard_names(len(shards))
    for old in work.glob("model*.safetensors*"):
        old.unlink()
    reader = _SourceBytes()
    try:
        for fname, shard in zip(files, shards):
            _write_safetensors(work / fname, shard, index, meta, reader)
    finally:
        reader.close()
    if len(shards) > 1:
        wmap = {n: f for f, shard in zip(files, shards) for n in shard}
        _write_json_atomic(work / INDEX, index_json(sum(index[n].nbytes for n in names), wmap))
    _say(progress, f"non-expert tensors: {len(names)} in {len(files)} file(s)")


def _write_safetensors(path: Path, names: list[str], index: CheckpointIndex, meta: dict, reader) -> None:
    with open(path, "wb") as f:
        f.write(header([(n, index[n].dtype, index[n].shape, index[n].nbytes) for n in names], meta))
        for n in names:
            t = index[n]
            for start in range(0, t.nbytes, _COPY_CHUNK):
                f.write(reader.read(t.file, t.offset + start, min(_COPY_CHUNK, t.nbytes - start)))
        f.flush()
        os.fsync(f.fileno())
