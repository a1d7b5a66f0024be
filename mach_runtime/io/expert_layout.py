"""Finds the routed-expert tensors of a checkpoint and where each expert's bytes live on disk.

Two real layouts, both reduced to the same thing — one byte range per (layer, projection, component, expert):

* **per-expert** (HF hub checkpoints): ``...experts.{e}.gate_proj.weight`` — each expert its own tensor;
* **stacked** (MLX exports, ``switch_mlp``): ``...switch_mlp.gate_proj.weight`` of shape ``[E, out, in]``, or
  HF fused 3-D tensors (``experts.gate_up_proj [E, 2I, H]``) — expert ``e`` is the contiguous slice at
  ``offset + e * stride``. Streaming reads exactly that slice and never the whole tensor.

Which names a family uses is declared by its adapter as ``ExpertScheme``s (``expert_schemes.py``); the first
scheme whose probe tensor exists wins. A component may need a host-side transform (transpose, de-interleave)
to become rows of the engine's fused ``gate_up`` / ``down`` projections.

Components are ``weight`` plus, for quantized checkpoints, ``scales`` and ``biases`` (affine) or ``global_scale``
(nvfp4 with a per-expert tensor scale), and ``bias`` for families with expert biases. No MLX here: the discovery
commands use this module too.

**Quantization is per projection.** Each layer's ``gate_up`` and ``down`` projections carry their own
``QuantSpec`` recovered from the stored shapes (as mlx-lm's ``infer_quant_config`` does), so mlx-lm's mixed
recipes (``mixed_3_6``: 6-bit ``down_proj`` in some layers, 3-bit elsewhere) and per-module overrides load in
both residencies; the streaming bank of a layer holds each projection in its own format.

**Released low-precision formats** (DeepSeek-V4-Flash; ``quant_formats.py``) map onto MLX's quantized layouts
without dequantizing: FP4 (e2m1, two per byte, ``I8 [out, in/2]``) with ue8m0 ``.scale [out, in/32]`` *is*
mxfp4 (the bytes are viewed as ``U32 [out, in/8]``); FP8 (``F8_E4M3 [out, in]``) with ue8m0 block scales
``[ceil(out/bm), ceil(in/bk)]`` becomes mxfp8 (the same bytes as ``U32 [out, in/4]``; each block scale repeated
over its rows and its 32-wide groups, exact because a ue8m0 scale is a power of two shared by the block). FP8
with float block scales (DeepSeek-V3 / Qwen3-FP8 ``weight_scale_inv``) has no exact MX layout: its weight is held
dequantized, the scale component multiplied into it (transform ``dequant:...``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

from ..errors import CheckpointError
from .adapter import MoeArchAdapter
from .expert_schemes import SCALE_ALIASES, U8_BLOCKS_AS_U32, ExpertScheme, ExpertTensorSpec
from .quant_formats import BLOCKS, DEQUANT, QuantSpec, released_format
from .safetensors_index import CheckpointIndex, TensorInfo

COMPONENTS = ("weight", "scales", "biases", "global_scale", "bias")
_FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class ExpertComponent:
    """One component (e.g. ``gate_proj.weight``) of every expert of one layer, and where it lands in the bank."""

    part: str  # gate | up | gate_up | down (see expert_schemes)
    comp: str  # weight | scales | biases | bias
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]  # shape of ONE expert's slice as stored
    nbytes: int  # bytes of one expert's slice
    sources: tuple[tuple[str, int], ...]  # (file, absolute offset) per expert
    tensor_names: tuple[str, ...]  # the stacked tensor (1 name) or the per-expert tensors (E names)
    target: str = "gate_up"  # engine projection it fills: "gate_up" (gate rows then up rows) or "down"
    rows: tuple[int, int] | None = None  # rows of the target it fills; None = all
    transform: str = ""  # host-side reshaping to the engine's [out, in] rows (expert_schemes.TRANSFORMS)

    @property
    def proj(self) -> str:  # backwards-compatible name
        return self.part


@dataclass(frozen=True)
class ExpertLayerSource:
    layer: int
    num_experts: int
    components: dict[tuple[str, str], ExpertComponent]
    quant: QuantSpec | None  # the gate_up projection's (kept for callers that assume one format per layer)
    # target ("gate_up" | "down"), or part ("gate" | "up" | "down") when gate and up differ -> QuantSpec | None
    quants: dict = dataclasses.field(default_factory=dict)

    def quant_of(self, target: str) -> QuantSpec | None:
        """QuantSpec of a target ("gate_up" | "down") or part ("gate" | "up" | "down")."""
        if not self.quants:
            return self.quant
        if target in self.quants:
            return self.quants[target]
        if target == "gate_up":  # split: gate and up differ; the gate's
            return self.quants.get("gate")
        return self.quants.get("gate_up")

    @property
    def split_gate_up(self) -> bool:
        """Gate and up stored in different formats (per-module quantization): computed as two projections."""
        return "gate" in self.quants

    @property
    def expert_bytes(self) -> int:
        return sum(c.nbytes for c in self.components.values())

    def ranges(self, expert: int) -> list[tuple[str, int, int]]:
        """(file, offset, nbytes) of every component of one expert, in ``components`` order."""
        return [(c.sources[expert][0], c.sources[expert][1], c.nbytes) for c in self.components.values()]


@dataclass(frozen=True)
class ExpertLayout:
    layout: str  # "per_expert" | "stacked"
    layers: tuple[ExpertLayerSource, ...]
    num_experts: int
    top_k: int
    hidden_size: int
    moe_intermediate: int
    expert_tensor_names: frozenset[str]
    scheme: str = ""  # the adapter's scheme name, e.g. "hf_fused", "mlx_switch"

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert (all its components) as stored on disk: equal in every layer, except with
        per-module quantization (mixed recipes), where it is the mean over the layers (rounded up) and
        ``ExpertLayerSource.expert_bytes`` gives each layer's own."""
        if not self.layers:
            return 0
        return -(-sum(layer.expert_bytes for layer in self.layers) // len(self.layers))

    @property
    def total_expert_bytes(self) -> int:
        return sum(layer.expert_bytes * layer.num_experts for layer in self.layers)

    @property
    def quant(self) -> QuantSpec | None:
        return self.layers[0].quant if self.layers else None


def _infer_quant(name: str, weight: TensorInfo, scales: TensorInfo, in_dims: int) -> QuantSpec:
    """Recovers bits / group size / mode from packed shapes, as mlx-lm does, and validates them."""
    packed = weight.shape[-1]
    groups = scales.shape[-1]
    if weight.dtype != "U32" or groups <= 0 or in_dims % groups or (packed * 32) % in_dims:
        raise CheckpointError(
            f"{weight.file}: quantized tensor {name!r} has inconsistent shapes (weight {list(weight.shape)} "
            f"{weight.dtype}, scales {list(scales.shape)}) for an input dimension of {in_dims}"
        )
    bits, group = packed * 32 // in_dims, in_dims // groups
    if scales.dtype == "U8":
        modes = {(4, 32): "mxfp4", (8, 32): "mxfp8", (4, 16): "nvfp4"}
        if (bits, group) not in modes:
            raise CheckpointError(f"{weight.file}: cannot infer the quantization mode of {name!r}")
        return QuantSpec(bits, group, modes[(bits, group)])
    if bits not in (2, 3, 4, 5, 6, 8) or group not in (32, 64, 128):
        raise CheckpointError(f"{weight.file}: {name!r} has unsupported quantization ({bits} bits, group {group})")
    return QuantSpec(bits, group, "affine")


def _expected_shape(comp: str, out_dim: int, in_dim: int, quant: QuantSpec | None) -> tuple[int, ...]:
    if comp == "bias":
        return (out_dim,)
    if comp == "global_scale":
        return ()
    if quant is None:
        return (out_dim, in_dim)
    if comp == "weight":
        return (out_dim, in_dim * quant.bits // 32)
    return (out_dim, in_dim // quant.group_size)


def _transformed_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    """Per-expert shape after the host-side transform (a transpose swaps the last two axes of 2-D parts)."""
    if "t" in transform.split("+") and len(shape) == 2:
        return (shape[1], shape[0])
    if transform.startswith(BLOCKS + ":"):
        _, _, _, out_dim, in_dim = transform.split(":")
        return (int(out_dim), int(in_dim) // 32)
    if transform.startswith(DEQUANT + ":"):
        _, _, _, out_dim, in_dim = transform.split(":")
        return (int(out_dim), int(in_dim))
    return tuple(shape)


def _part_dims(part: str, H: int, inter: int) -> tuple[int, int, tuple[int, int] | None]:
    """(out rows, in dim, rows in the target) of one part."""
    return {
        "gate": (inter, H, (0, inter)),
        "up": (inter, H, (inter, 2 * inter)),
        "gate_up": (2 * inter, H, None),
        "down": (H, inter, None),
    }[part]


def _detect_scheme(index: CheckpointIndex, adapter: MoeArchAdapter, layer: int, alias=str) -> ExpertScheme:
    tried = []
    for scheme in adapter.expert_schemes:
        probe = scheme.probe
        name = alias(probe.name(layer, "weight", 0 if probe.per_expert else None))
        if name in index:
            return scheme
        tried.append(f"{name!r} ({scheme.name})")
    raise CheckpointError(
        f"{index.directory}: no routed-expert tensors found for layer {layer}: the tensor names match no known "
        f"{adapter.key} layout; expected one of {', '.join(tried)}. Is this a {adapter.key} checkpoint?"
    )


def _view(info: TensorInfo, view: str | None) -> TensorInfo:
    """The tensor as the engine reads it: ``U8_BLOCKS_AS_U32`` turns U8 [..., G, 16] into U32 [..., G * 4]."""
    if not view:
        return info
    if view != U8_BLOCKS_AS_U32 or info.dtype != "U8" or len(info.shape) < 3 or info.shape[-1] % 4:
        raise CheckpointError(
            f"{info.file}: tensor {info.name!r} ({info.dtype} {list(info.shape)}) is not an mxfp4 block tensor "
            "(U8 [..., groups, 16])"
        )
    return dataclasses.replace(info, dtype="U32", shape=(*info.shape[:-2], info.shape[-2] * info.shape[-1] // 4))


def _suffixes(spec: ExpertTensorSpec, comp: str) -> tuple[str, ...]:
    suffix = spec.components[comp]
    return (suffix, *SCALE_ALIASES.get(suffix, ())) if comp == "scales" else (suffix,)


def _component(index, spec: ExpertTensorSpec, layer: int, comp: str, E: int, alias=str):
    """(infos, sources, tensor_names, stored shape) of one component, or None when absent."""
    view = spec.views.get(comp)
    for suffix in _suffixes(spec, comp):
        found = _component_named(index, spec, layer, comp, E, alias, suffix, view)
        if found is not None:
            return found
    return None


def _component_named(index, spec: ExpertTensorSpec, layer: int, comp: str, E: int, alias, suffix: str, view):
    def name(expert=None):
        return alias(spec.template.format(layer=layer, expert=expert) + suffix)

    if not spec.per_expert:
        tname = name()
        if tname not in index:
            return None
        info = _view(index[tname], view)
        if len(info.shape) < 1 or info.shape[0] != E:
            raise CheckpointError(
                f"{info.file}: stacked expert tensor {tname!r} has shape {list(info.shape)}; "
                f"its first axis must be the {E} experts"
            )
        stride = info.nbytes // E
        offsets = range(info.offset, info.offset + E * stride, stride) if stride else itertools.repeat(info.offset, E)
        sources = tuple(zip(itertools.repeat(info.file, E), offsets))  # (file, offset) of each expert's slice
        return [info], sources, (tname,), tuple(info.shape[1:])
    tnames = [name(e) for e in range(E)]
    present = [t in index for t in tnames]
    if not any(present):
        return None
    if not all(present):
        missing = tnames[present.index(False)]
        raise CheckpointError(
            f"{index.directory}: expert tensor {missing!r} is missing (the checkpoint has "
            f"{sum(present)} of {E} experts for layer {layer}); the checkpoint is incomplete"
        )
    infos = [_view(index[t], view) for t in tnames]
    for info in infos:
        if info.dtype != infos[0].dtype or info.shape != infos[0].shape:
            raise CheckpointError(f"{info.file}: expert tensor {info.name!r} differs in dtype/shape from its siblings")
    return infos, tuple((i.file, i.offset) for i in infos), tuple(tnames), tuple(infos[0].shape)


def find_expert_layout(index: CheckpointIndex, adapter: MoeArchAdapter, tc: dict, source: str) -> ExpertLayout:
    """Classifies the checkpoint's expert layout and maps every expert to byte ranges; validates shapes."""
    E = adapter.num_experts(tc, source)
    top_k = adapter.top_k(tc, source)
    H = adapter.hidden_size(tc, source)
    inter = adapter.moe_intermediate(tc, source)
    if top_k > E:
        raise CheckpointError(f"{source}: {adapter.top_k_field}={top_k} exceeds {adapter.num_experts_field}={E}")
    moe_layers = adapter.moe_layers(tc)
    if not moe_layers:
        raise CheckpointError(f"{source}: the config describes no routed-expert (MoE) layers")
    # the adapter may store some layers under other names (deepseek_v4's MTP layers n+i live under mtp.{i})
    alias = adapter.expert_tensor_alias(tc) if adapter.expert_tensor_alias else str
    scheme = _detect_scheme(index, adapter, moe_layers[0], alias)

    layers, names = [], set()
    for layer in moe_layers:
        comps: dict[tuple[str, str], ExpertComponent] = {}
        part_quant: dict[str, QuantSpec | None] = {}
        for spec in scheme.tensors:
            out_dim, in_dim, rows = _part_dims(spec.part, H, inter)
            found = {}
            for comp in COMPONENTS:
                if comp not in spec.components:
                    continue
                f = _component(index, spec, layer, comp, E, alias)
                if f is None:
                    if comp == "weight":
                        want = alias(spec.name(layer, comp, 0 if spec.per_expert else None))
                        raise CheckpointError(f"{index.directory}: missing expert tensor {want!r}")
                    continue
                found[comp] = f
            # (dtype, shape, transform) per component as the engine holds it
            held = {comp: (f[0][0].dtype, f[3], spec.transform) for comp, f in found.items()}
            quant = None
            if "scales" in found:
                w, s = found["weight"], found["scales"]
                released = released_format(w[2][0], w[0][0], w[3], s[0][0], s[3], out_dim, in_dim, tc, spec.transform)
                if released is not None:
                    wd, ws, sd, ss, st, quant = released
                    held["weight"] = (wd, ws, spec.transform)
                    held["scales"] = (sd, ss if not st else s[3], st)
                else:
                    quant = _infer_quant(w[2][0], w[0][0], s[0][0], in_dim)
            part_quant[spec.part] = quant
            for comp, (infos, sources, tensor_names, shape) in found.items():
                dtype, hshape, transform = held[comp]
                nbytes = math.prod(shape) * infos[0].itemsize  # bytes as stored (a view keeps them)
                comps[(spec.part, comp)] = ExpertComponent(
                    spec.part, comp, dtype, tuple(hshape), nbytes, sources, tensor_names, spec.target, rows, transform,
                )
                names.update(tensor_names)
        quants = {}
        for part, q in part_quant.items():
            quants["down" if part == "down" else "gate_up"] = q
        if "gate" in part_quant and part_quant["gate"] != part_quant.get("up"):
            # per-module quantization gave gate and up different formats (e.g. mlx-lm's dynamic_quant): they
            # cannot share one fused projection, so each keeps its own
            quants = {"gate": part_quant["gate"], "up": part_quant.get("up"), "down": quants.get("down")}
        # shapes are checked once quantization is known
        for (part, comp), c in comps.items():
            out_dim, in_dim, _ = _part_dims(part, H, inter)
            q = quants[part] if part in quants else quants["down" if part == "down" else "gate_up"]
            want = _expected_shape(comp, out_dim, in_dim, q if comp != "bias" else None)
            if _transformed_shape(c.shape, c.transform) != want:
                stored = list(_transformed_shape(want, c.transform))
                raise CheckpointError(
                    f"{index[c.tensor_names[0]].file}: expert tensor {c.tensor_names[0]!r} has shape "
                    f"{list(c.shape)} per expert, expected {stored} from config.json "
                    f"(hidden_size={H}, {adapter.moe_intermediate_field}={inter}); config and weights do not match"
                )
            dequant = comp == "weight" and c.dtype == "F8_E4M3" and (part, "scales") in comps
            if comp == "weight" and q is None and c.dtype not in _FLOAT_DTYPES and not dequant:
                raise CheckpointError(
                    f"{index[c.tensor_names[0]].file}: expert tensor {c.tensor_names[0]!r} is {c.dtype} without "
                    "scales; unquantized experts must be F32, F16 or BF16"
                )
            if comp == "global_scale" and (q is None or q.mode != "nvfp4"):
                raise CheckpointError(
                    f"{index[c.tensor_names[0]].file}: {c.tensor_names[0]!r}: a global scale belongs to nvfp4 "
                    f"weights, these are {q}"
                )
        if adapter.has_expert_bias != any(comp == "bias" for _, comp in comps):
            raise CheckpointError(
                f"{index.directory}: layer {layer}: {adapter.key} experts "
                f"{'need' if adapter.has_expert_bias else 'have no'} per-expert biases"
            )
        layers.append(ExpertLayerSource(layer, E, comps, quants.get("gate_up", quants.get("gate")), quants))
    return ExpertLayout(scheme.layout, tuple(layers), E, top_k, H, inter, frozenset(names), scheme.name)
