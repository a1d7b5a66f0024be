"""The expert sidecar ``mach convert`` writes: every (layer, expert) is one aligned extent holding all its
projections (weights, scales, biases), so a streaming miss is one positional read.

Two files beside ``config.json`` and the non-expert ``model*.safetensors``:

* ``experts.mach``: the data. Layers follow each other; extent ``e`` of a layer starts at
  ``layer.offset + e * layer.stride``, and ``offset`` and ``stride`` are multiples of ``ALIGN`` (4096). An
  ``O_DIRECT`` read of one extent therefore reads nothing else. Inside an extent the components lie back to
  back in the index's order, each at a multiple of its element size. ``ExpertReader.coalesce`` merges them, so
  one ``pread`` returns the whole expert.
* ``experts.mach.json``: the index (msgspec JSON). It holds the format and version, the fingerprint of the
  source checkpoint, the re-quantization (if any), and per layer the extents, a CRC32 of the layer's bytes and
  the components. Each component has its dtype, shape, offset in the extent, the rows of the engine projection
  it fills, and the host-side transform, exactly as ``expert_layout.ExpertComponent`` describes them.

``expert_layout_for`` is the one way the loader, ``mach check`` and ``mach convert`` find a checkpoint's
experts: the sidecar when the directory has one, else the safetensors tensors (``find_expert_layout``). No MLX
at import; ``stacked_reader`` imports it when called.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import msgspec
import numpy as np

from ..errors import CheckpointError
from .expert_layout import ExpertComponent, ExpertLayerSource, ExpertLayout, _expected_shape, _part_dims
from .expert_layout import _transformed_shape, find_expert_layout
from .quant_formats import QuantSpec
from .safetensors_index import DTYPES

FORMAT = "mach-expert-sidecar"
VERSION = 1
INDEX_NAME = "experts.mach.json"
DATA_NAME = "experts.mach"
ALIGN = 4096
LAYOUT = "sidecar"  # ExpertLayout.layout of a sidecar checkpoint


class SidecarQuant(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    bits: int
    group_size: int
    mode: str


class SidecarComponent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    part: str  # gate | up | gate_up | down
    comp: str  # weight | scales | biases | bias | global_scale
    dtype: str  # safetensors dtype name of the bytes as the engine views them
    shape: tuple[int, ...]  # one expert's shape
    offset: int  # bytes from the start of the extent
    nbytes: int
    target: str  # gate_up | down
    rows: tuple[int, int] | None = None
    transform: str = ""


class SidecarLayer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    layer: int
    offset: int  # first extent, from the start of the data file
    stride: int  # bytes from one extent to the next (a multiple of ALIGN)
    extent_bytes: int  # bytes of each extent that hold data
    crc32: int  # zlib.crc32 of the layer's num_experts * stride bytes
    components: list[SidecarComponent]
    quants: dict[str, SidecarQuant | None]


class SidecarSource(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    fingerprint: str  # sha256 of the source's config.json and safetensors headers (convert.source_fingerprint)
    layout: str  # the source's expert layout: per_expert | stacked | sidecar
    scheme: str  # the adapter scheme it matched, e.g. hf_per_expert, mlx_switch, hf_fused


class SidecarIndex(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: str
    version: int
    data_file: str
    data_bytes: int
    align: int
    source: SidecarSource
    requantized: SidecarQuant | None  # None: the source's precision, bytes copied as they were
    num_experts: int
    top_k: int
    hidden_size: int
    moe_intermediate: int
    layers: list[SidecarLayer]


def has_sidecar(directory) -> bool:
    return (Path(directory) / INDEX_NAME).is_file()


def encode_index(index: SidecarIndex) -> bytes:
    return msgspec.json.format(msgspec.json.encode(index), indent=1) + b"\n"


def read_index(directory) -> SidecarIndex:
    """The sidecar's index, decoded and type-checked; a damaged one is a CheckpointError naming it."""
    path = Path(directory) / INDEX_NAME
    try:
        index = msgspec.json.decode(path.read_bytes(), type=SidecarIndex)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the expert sidecar's index ({e.strerror or e}); re-run "
                              "`mach convert`") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise CheckpointError(f"{path}: not a valid expert sidecar index ({e}); the file is damaged: re-run "
                              "`mach convert SRC DST`") from None
    if index.format != FORMAT or index.version != VERSION:
        raise CheckpointError(f"{path}: sidecar format {index.format!r} version {index.version}, this build reads "
                              f"{FORMAT!r} version {VERSION}; re-run `mach convert` with this build")
    return index


def _quant(q: SidecarQuant | None) -> QuantSpec | None:
    return None if q is None else QuantSpec(q.bits, q.group_size, q.mode)


def sidecar_layout(directory, adapter, tc: dict, source: str) -> ExpertLayout:
    """The ExpertLayout of a converted checkpoint: every component of expert ``e`` points into its extent.

    Checked against config.json (experts, MoE layers, shapes) and the data file (its size, each extent inside
    it); a truncated data file or an index that does not describe it is a CheckpointError naming the file.
    """
    directory = Path(directory)
    ipath = directory / INDEX_NAME
    idx = read_index(directory)
    if os.path.basename(idx.data_file) != idx.data_file or not idx.data_file:
        raise CheckpointError(f"{ipath}: field 'data_file' must name a file in {directory}, got {idx.data_file!r}")
    data = directory / idx.data_file
    try:
        size = os.stat(data).st_size
    except OSError as e:
        raise CheckpointError(f"{data}: the expert sidecar's data file is missing or unreadable "
                              f"({e.strerror or e}); re-run `mach convert`") from None
    if size < idx.data_bytes:
        raise CheckpointError(f"{data}: truncated expert sidecar ({size} bytes, the index {ipath.name} says "
                              f"{idx.data_bytes}); re-run `mach convert` to finish or rewrite it")
    E, H, inter = adapter.num_experts(tc, source), adapter.hidden_size(tc, source), adapter.moe_intermediate(tc, source)
    want_layers = adapter.moe_layers(tc)
    got = (idx.num_experts, idx.hidden_size, idx.moe_intermediate, [la.layer for la in idx.layers])
    if got != (E, H, inter, list(want_layers)):
        raise CheckpointError(
            f"{ipath}: the sidecar describes {idx.num_experts} experts, hidden {idx.hidden_size}, intermediate "
            f"{idx.moe_intermediate}, MoE layers {got[3][:8]}; {source} says {E}, {H}, {inter}, "
            f"{list(want_layers)[:8]}: the index does not belong to this checkpoint; re-run `mach convert`")
    layers = []
    for la in idx.layers:
        layers.append(_layer_source(la, E, H, inter, str(data), idx.data_bytes, ipath))
    return ExpertLayout(LAYOUT, tuple(layers), E, adapter.top_k(tc, source), H, inter, frozenset(), "mach_sidecar")


def _layer_source(la: SidecarLayer, E: int, H: int, inter: int, data: str, data_bytes: int, ipath) -> ExpertLayerSource:
    def bad(why):
        return CheckpointError(f"{ipath}: layer {la.layer}: {why}; the index is damaged: re-run `mach convert`")

    if la.offset % ALIGN or la.stride % ALIGN or la.stride < la.extent_bytes or la.offset < 0:
        raise bad(f"extents must start at multiples of {ALIGN} bytes (offset {la.offset}, stride {la.stride})")
    if la.offset + E * la.stride > data_bytes:
        raise bad(f"its extents end at byte {la.offset + E * la.stride}, past the data ({data_bytes} bytes)")
    quants = {k: _quant(q) for k, q in la.quants.items()}
    comps, end = {}, 0
    if not la.components or la.components[0].offset != 0:
        raise bad("its first component must start its extent (offset 0)")
    for c in la.components:
        if c.dtype not in DTYPES or c.nbytes != math.prod(c.shape) * DTYPES[c.dtype][0]:
            raise bad(f"component {c.part}.{c.comp}: {c.dtype} {list(c.shape)} is not {c.nbytes} bytes")
        if c.offset < end or c.offset + c.nbytes > la.extent_bytes:
            raise bad(f"component {c.part}.{c.comp} at {c.offset}+{c.nbytes} overlaps another or leaves its extent "
                      f"({la.extent_bytes} bytes)")
        end = c.offset + c.nbytes
        try:
            out_dim, in_dim, _ = _part_dims(c.part, H, inter)
        except KeyError:
            raise bad(f"unknown part {c.part!r}") from None
        q = quants.get(c.part, quants.get(c.target))
        if c.comp not in ("global_scale", "bias") and not c.transform:
            want = _expected_shape(c.comp, out_dim, in_dim, q)
            if _transformed_shape(c.shape, c.transform) != want:
                raise bad(f"component {c.part}.{c.comp} has shape {list(c.shape)}, config.json implies {list(want)}")
        first = la.offset + c.offset
        offsets = range(first, first + E * la.stride, la.stride) if la.stride else itertools.repeat(first, E)
        sources = tuple(zip(itertools.repeat(data, E), offsets))  # (file, offset) of expert e's component
        comps[(c.part, c.comp)] = ExpertComponent(c.part, c.comp, c.dtype, tuple(c.shape), c.nbytes, sources, (),
                                                  c.target, tuple(c.rows) if c.rows else None, c.transform)
    main = quants.get("gate_up", quants.get("gate"))
    return ExpertLayerSource(la.layer, E, comps, main, quants)


def expert_layout_for(directory, index, adapter, tc: dict, source: str) -> ExpertLayout:
    """The checkpoint's experts: from its sidecar when it has one (``mach convert``), else its safetensors."""
    if has_sidecar(directory):
        return sidecar_layout(directory, adapter, tc, source)
    return find_expert_layout(index, adapter, tc, source)


def stacked_reader(layout: ExpertLayout):
    """``read(src, component) -> mx.array [E, *shape]`` (the stored dtype; BF16 as bfloat16) for stacked
    residency: each layer's extents are read in one sequential read, then every component is a strided view."""
    import mlx.core as mx

    cache: dict = {}

    def region(src: ExpertLayerSource):
        if cache.get("layer") != src.layer:
            first = next(iter(src.components.values()))  # at offset 0 of its extent (sidecar_layout checks)
            path, start = first.sources[0]
            stride = first.sources[1][1] - start if src.num_experts > 1 else 0
            last = list(src.components.values())[-1]
            nbytes = stride * (src.num_experts - 1) + last.sources[0][1] - start + last.nbytes
            buf = np.empty(nbytes, dtype=np.uint8)
            try:
                with open(path, "rb", buffering=0) as f:
                    f.seek(start)
                    got, view = 0, memoryview(buf)
                    while got < nbytes:
                        n = f.readinto(view[got:])
                        if not n:
                            break
                        got += n
            except OSError as e:
                raise CheckpointError(f"{path}: cannot read the expert sidecar ({e.strerror or e})") from None
            if got != nbytes:
                raise CheckpointError(f"{path}: truncated expert sidecar: layer {src.layer} needs bytes "
                                      f"{start}..{start + nbytes}; re-run `mach convert`")
            cache.update(layer=src.layer, buf=buf, start=start, stride=stride)
        return cache["buf"], cache["start"], cache["stride"]

    def read(src: ExpertLayerSource, c: ExpertComponent):
        buf, start, stride = region(src)
        off = c.sources[0][1] - start
        rows = np.lib.stride_tricks.as_strided(buf[off:], shape=(src.num_experts, c.nbytes), strides=(stride, 1))
        a = np.ascontiguousarray(rows).view(DTYPES[c.dtype][1]).reshape(src.num_experts, *c.shape)
        out = mx.array(a)
        return out.view(mx.bfloat16) if c.dtype == "BF16" else out

    return read
