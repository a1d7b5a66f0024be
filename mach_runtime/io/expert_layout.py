"""Finds the routed-expert tensors of a checkpoint and where each expert's bytes live on disk.

Two real layouts, both reduced to the same thing — one byte range per (layer, projection, component, expert):

* **per-expert** (HF hub checkpoints): ``...experts.{e}.gate_proj.weight`` — each expert its own tensor;
* **stacked** (MLX exports, ``switch_mlp``): ``...switch_mlp.gate_proj.weight`` of shape ``[E, out, in]`` —
  expert ``e`` is the contiguous slice at ``offset + e * stride``. Streaming reads exactly that slice and never
  the whole tensor.

Components are ``weight`` plus, for quantized checkpoints, ``scales`` and ``biases`` (affine), and ``bias`` for
families with expert biases. No MLX here: the discovery commands use this module too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import CheckpointError
from .arch_registry import MoeArchAdapter
from .safetensors_index import CheckpointIndex, TensorInfo

COMPONENTS = ("weight", "scales", "biases", "bias")
_FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    mode: str = "affine"


@dataclass(frozen=True)
class ExpertComponent:
    """One component (e.g. ``gate_proj.weight``) of every expert of one layer."""

    proj: str
    comp: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]  # shape of ONE expert's slice
    nbytes: int  # bytes of one expert's slice
    sources: tuple[tuple[str, int], ...]  # (file, absolute offset) per expert
    tensor_names: tuple[str, ...]  # the stacked tensor (1 name) or the per-expert tensors (E names)


@dataclass(frozen=True)
class ExpertLayerSource:
    layer: int
    num_experts: int
    components: dict[tuple[str, str], ExpertComponent]
    quant: QuantSpec | None

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

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert (all its components) as stored on disk; equal in every layer."""
        return self.layers[0].expert_bytes if self.layers else 0

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
    if quant is None:
        return (out_dim, in_dim)
    if comp == "weight":
        return (out_dim, in_dim * quant.bits // 32)
    return (out_dim, in_dim // quant.group_size)


def find_expert_layout(index: CheckpointIndex, adapter: MoeArchAdapter, tc: dict, source: str) -> ExpertLayout:
    """Classifies the checkpoint's expert layout and maps every expert to byte ranges; validates shapes."""
    E = adapter.num_experts(tc, source)
    top_k = adapter.top_k(tc, source)
    H = adapter.hidden_size(tc, source)
    inter = adapter.moe_intermediate(tc, source)
    if top_k > E:
        raise CheckpointError(f"{source}: {adapter.top_k_field}={top_k} exceeds {adapter.num_experts_field}={E}")
    gate, up, down = adapter.projections
    dims = {gate: (inter, H), up: (inter, H), down: (H, inter)}  # (out, in)
    moe_layers = adapter.moe_layers(tc)
    if not moe_layers:
        raise CheckpointError(f"{source}: the config describes no routed-expert (MoE) layers")

    def stacked_name(layer, proj, comp):
        return f"{adapter.stacked_template.format(layer=layer, proj=proj)}.{comp}"

    def expert_name(layer, expert, proj, comp):
        return f"{adapter.per_expert_template.format(layer=layer, expert=expert, proj=proj)}.{comp}"

    first = moe_layers[0]
    if stacked_name(first, gate, "weight") in index:
        layout = "stacked"
    elif expert_name(first, 0, gate, "weight") in index:
        layout = "per_expert"
    else:
        raise CheckpointError(
            f"{index.directory}: no routed-expert tensors found for layer {first}: expected "
            f"{expert_name(first, 0, gate, 'weight')!r} (HF per-expert layout) or "
            f"{stacked_name(first, gate, 'weight')!r} (MLX stacked layout). Is this a {adapter.key} checkpoint?"
        )

    layers, names = [], set()
    for layer in moe_layers:
        comps: dict[tuple[str, str], ExpertComponent] = {}
        quant = None
        for proj in adapter.projections:
            out_dim, in_dim = dims[proj]
            for comp in COMPONENTS:
                if layout == "stacked":
                    tname = stacked_name(layer, proj, comp)
                    if tname not in index:
                        if comp == "weight":
                            raise CheckpointError(f"{index.directory}: missing expert tensor {tname!r}")
                        continue
                    info = index[tname]
                    if len(info.shape) < 2 or info.shape[0] != E:
                        raise CheckpointError(
                            f"{info.file}: stacked expert tensor {tname!r} has shape {list(info.shape)}; "
                            f"its first axis must be the {E} experts"
                        )
                    stride = info.nbytes // E
                    sources = tuple((info.file, info.offset + e * stride) for e in range(E))
                    infos, tensor_names = [info], (tname,)
                    shape = info.shape[1:]
                else:
                    tnames = [expert_name(layer, e, proj, comp) for e in range(E)]
                    present = [t in index for t in tnames]
                    if not any(present):
                        if comp == "weight":
                            raise CheckpointError(f"{index.directory}: missing expert tensor {tnames[0]!r}")
                        continue
                    if not all(present):
                        missing = tnames[present.index(False)]
                        raise CheckpointError(
                            f"{index.directory}: expert tensor {missing!r} is missing (the checkpoint has "
                            f"{sum(present)} of {E} experts for layer {layer}); the checkpoint is incomplete"
                        )
                    infos = [index[t] for t in tnames]
                    sources = tuple((i.file, i.offset) for i in infos)
                    tensor_names = tuple(tnames)
                    shape = infos[0].shape
                if comp == "scales":
                    w = comps[(proj, "weight")]
                    winfo = index[w.tensor_names[0]]
                    quant_here = _infer_quant(w.tensor_names[0], winfo, infos[0], in_dim)
                    if quant is not None and quant_here != quant:
                        raise CheckpointError(f"{infos[0].file}: layer {layer} mixes expert quantizations")
                    quant = quant_here
                for info, tname in zip(infos, tensor_names):
                    ishape = info.shape[1:] if layout == "stacked" else info.shape
                    if info.dtype != infos[0].dtype or ishape != shape:
                        raise CheckpointError(f"{info.file}: expert tensor {tname!r} differs in dtype/shape from its siblings")
                comps[(proj, comp)] = ExpertComponent(
                    proj, comp, infos[0].dtype, tuple(shape), math.prod(shape) * infos[0].itemsize, sources, tensor_names
                )
                names.update(tensor_names)
        # shapes are checked once quantization is known (weights come before scales in COMPONENTS)
        for (proj, comp), c in comps.items():
            out_dim, in_dim = dims[proj]
            want = _expected_shape(comp, out_dim, in_dim, quant if comp != "bias" else None)
            if c.shape != want:
                raise CheckpointError(
                    f"{index[c.tensor_names[0]].file}: expert tensor {c.tensor_names[0]!r} has shape "
                    f"{list(c.shape)} per expert, expected {list(want)} from config.json "
                    f"(hidden_size={H}, {adapter.moe_intermediate_field}={inter}); config and weights do not match"
                )
            if comp == "weight" and quant is None and c.dtype not in _FLOAT_DTYPES:
                raise CheckpointError(
                    f"{index[c.tensor_names[0]].file}: expert tensor {c.tensor_names[0]!r} is {c.dtype} without "
                    "scales; unquantized experts must be F32, F16 or BF16"
                )
        if adapter.has_expert_bias != any(comp == "bias" for _, comp in comps):
            raise CheckpointError(
                f"{index.directory}: layer {layer}: {adapter.key} experts "
                f"{'need' if adapter.has_expert_bias else 'have no'} per-expert biases"
            )
        layers.append(ExpertLayerSource(layer, E, comps, quant))
    return ExpertLayout(layout, tuple(layers), E, top_k, H, inter, frozenset(names))
