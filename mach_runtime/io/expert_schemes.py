"""How a family names its routed-expert tensors on disk: plain data the adapters declare (no MLX here).

A *scheme* is one real on-disk layout (HF per-expert, HF fused 3-D, MLX ``switch_mlp`` stacked, ...). It lists
tensor *specs*; each spec says which rows of the engine's fused expert projections it fills:

* ``part="gate"`` / ``"up"``: rows ``[0:I]`` / ``[I:2I]`` of the fused ``gate_up`` projection;
* ``part="gate_up"``: all ``2I`` rows at once (HF fused ``experts.gate_up_proj``, gate first, or interleaved);
* ``part="down"``: the ``down`` projection.

``transform`` names the host-side reshaping from the stored layout to the engine's ``[out, in]`` rows:
``"t"`` (stored ``[in, out]``: transpose), ``"deinterleave"`` (gate/up rows alternate, as gpt-oss stores them:
rows ``[0::2]`` are gate, ``[1::2]`` up), or both (``"t+deinterleave"``; transpose first). Each expert of a spec
is still one contiguous byte range on disk, so streaming reads exactly one expert's bytes and transforms them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# component name -> tensor-name suffix
MLX_COMPONENTS = {"weight": ".weight", "scales": ".scales", "biases": ".biases", "bias": ".bias",
                  "global_scale": ".global_scale"}  # global_scale: nvfp4's per-expert tensor scale (MLX exports)
# other names of the ``scales`` component (tried in order when ``.scales`` is absent): DeepSeek-V4's released
# checkpoints (``w1.scale``: ue8m0 block scales of FP8 / FP4 weights) and DeepSeek-V3-style FP8 (``weight_scale_inv``)
SCALE_ALIASES = {".scales": (".scale", ".weight_scale_inv")}
HF_FUSED_COMPONENTS = {"weight": "", "bias": "_bias"}  # e.g. experts.gate_up_proj, experts.gate_up_proj_bias
# OpenAI mxfp4 (gpt-oss hub checkpoints): *_blocks U8 [.., out, in/32, 16] (= MLX's U32 [.., out, in/8]),
# *_scales U8 [.., out, in/32] (e8m0), *_bias
MXFP4_COMPONENTS = {"weight": "_blocks", "scales": "_scales", "bias": "_bias"}
U8_BLOCKS_AS_U32 = "u8_blocks_as_u32"  # a view: U8 [..., G, 16] read as U32 [..., G * 4] (same bytes)
PARTS = ("gate", "up", "gate_up", "down")
TRANSFORMS = ("", "t", "deinterleave", "t+deinterleave")


@dataclass(frozen=True)
class ExpertTensorSpec:
    template: str  # tensor name without component suffix; {layer} and, when per_expert, {expert}
    part: str  # gate | up | gate_up | down
    per_expert: bool  # one tensor per expert, or one tensor stacked on axis 0 over the experts
    components: dict = field(default_factory=lambda: dict(MLX_COMPONENTS))
    transform: str = ""
    views: dict = field(default_factory=dict)  # component -> dtype view of the stored bytes (U8_BLOCKS_AS_U32)

    def __post_init__(self):
        assert self.part in PARTS and self.transform in TRANSFORMS, (self.part, self.transform)

    def name(self, layer: int, comp: str, expert: int | None = None) -> str:
        base = self.template.format(layer=layer, expert=expert)
        return base + self.components[comp]

    @property
    def target(self) -> str:
        return "down" if self.part == "down" else "gate_up"


@dataclass(frozen=True)
class ExpertScheme:
    name: str  # e.g. "hf_per_expert", "hf_fused", "mlx_switch"
    layout: str  # "per_expert" | "stacked" (what ``mach check`` reports)
    tensors: tuple[ExpertTensorSpec, ...]

    @property
    def probe(self) -> ExpertTensorSpec:
        """The spec whose expert-0 weight of the first MoE layer identifies this scheme."""
        return self.tensors[0]


def per_expert_scheme(prefix: str, gate="gate_proj", up="up_proj", down="down_proj", name="hf_per_expert"):
    """``{prefix}.{expert}.gate_proj.weight`` ... (HF hub checkpoints of qwen3_moe, deepseek)."""
    t = prefix + ".{expert}."
    return ExpertScheme(
        name,
        "per_expert",
        (
            ExpertTensorSpec(t + gate, "gate", True),
            ExpertTensorSpec(t + up, "up", True),
            ExpertTensorSpec(t + down, "down", True),
        ),
    )


def switch_scheme(prefix: str, gate="gate_proj", up="up_proj", down="down_proj", name="mlx_switch"):
    """``{prefix}.gate_proj.weight [E, out, in]`` (MLX exports: mlx-lm's SwitchGLU parameter names)."""
    return ExpertScheme(
        name,
        "stacked",
        (
            ExpertTensorSpec(f"{prefix}.{gate}", "gate", False),
            ExpertTensorSpec(f"{prefix}.{up}", "up", False),
            ExpertTensorSpec(f"{prefix}.{down}", "down", False),
        ),
    )


def mxfp4_scheme(prefix: str, name="hf_mxfp4"):
    """gpt-oss hub checkpoints: ``{prefix}.gate_up_proj_blocks [E, 2I, H/32, 16]`` (rows interleaved gate/up),
    ``_scales``, ``_bias``; ``down_proj_blocks [E, H, I/32, 16]`` (rows = outputs, not transposed)."""
    views = {"weight": U8_BLOCKS_AS_U32}
    return ExpertScheme(
        name,
        "stacked",
        (
            ExpertTensorSpec(f"{prefix}.gate_up_proj", "gate_up", False, dict(MXFP4_COMPONENTS), "deinterleave", views),
            ExpertTensorSpec(f"{prefix}.down_proj", "down", False, dict(MXFP4_COMPONENTS), "", views),
        ),
    )


def fused_scheme(prefix: str, transform_gate_up="", transform_down="", name="hf_fused"):
    """``{prefix}.gate_up_proj [E, 2I, H]`` + ``{prefix}.down_proj [E, H, I]`` (transformers 5 / hub Qwen3.5,
    Gemma 4; gpt-oss with ``[E, H, 2I]`` interleaved and ``[E, I, H]``, plus ``_bias``)."""
    return ExpertScheme(
        name,
        "stacked",
        (
            ExpertTensorSpec(f"{prefix}.gate_up_proj", "gate_up", False, dict(HF_FUSED_COMPONENTS), transform_gate_up),
            ExpertTensorSpec(f"{prefix}.down_proj", "down", False, dict(HF_FUSED_COMPONENTS), transform_down),
        ),
    )
