"""Quantization as exported in the wild, against mlx-lm's own forward of the same export, in stacked and
streaming residency: every affine bit width and group size, mxfp4 / nvfp4 (with and without its tensor scale) /
mxfp8, mlx-lm's ``quant_predicate`` recipes (per-module overrides in ``config.json["quantization"]``: 6-bit
``down_proj`` beside 3-bit gate/up in some layers, 8-bit routers) and a per-module predicate giving gate and up
different formats, on qwen3_moe (from a random HF-format source), qwen3_5_moe (from the transformers-saved
fixture) and gpt_oss (expert biases); and the backend's gather_qmm itself against dequantized matmuls."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mach_runtime import load_moe
from tests.helpers import mlx_lm_reference
from tests.tolerances import quantized_kernel_error, quantized_vs_dequantized, reorder
from tests.quant_helpers import (PROMPT, assert_matches, logits_of, mlx_lm_convert, mlx_lm_model,
                                 mlx_lm_quantize_save, qwen3_moe_source)

RESIDENCIES = [("stacked", None), ("streaming", 3)]  # streaming: 3 of 8 experts per layer (top-2)
# the streaming variant of some cases runs only with -m slow (the default suite stays fast on 2 cores)
STACKED_ONLY = [RESIDENCIES[0], pytest.param(*RESIDENCIES[1], marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def qwen_src(tmp_path_factory):
    return qwen3_moe_source(tmp_path_factory.mktemp("qsrc") / "hf")


def ours(path, residency, slots):
    kw = {"expert_residency": residency}
    if slots:
        kw["expert_slots"] = slots
    model, _, store, _ = load_moe(path, **kw)
    return model, store


def check(path, residency, slots, tol=None, ref=None):
    model, store = ours(path, residency, slots)
    try:
        assert_matches(model, ref or mlx_lm_model(path), tol=tol)
        if slots:
            s = store.stats()
            assert s.misses > 0 and s.evictions > 0  # the bank really streamed
        return model, store
    finally:
        store.close()


def expert_formats(model):
    """(bits, group, mode) of every routed projection, per layer: [(gate_up, down), ...]."""
    out = []
    for layer in model.layers:
        glu = layer.mlp.switch_mlp
        out.append(tuple(None if p.quant is None else (p.quant.bits, p.quant.group_size, p.quant.mode)
                         for p in (glu.gate_up, glu.down)))
    return out


# every (bits, group) pair in both residencies; the default suite runs a diagonal that still covers each bit
# width and group size stacked, and three of them streaming (the rest: -m slow)
_FAST = {(2, 32), (3, 64), (4, 128), (5, 32), (6, 64), (8, 128), (4, 32), (8, 32)}
_FAST_STREAMING = {(3, 64), (4, 32), (8, 128)}
AFFINE = [pytest.param(b, g, r, n, marks=() if (b, g) in (_FAST if n is None else _FAST_STREAMING) else pytest.mark.slow)
          for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128) for r, n in RESIDENCIES]


@pytest.mark.parametrize("bits,group,residency,slots", AFFINE)
def test_affine_bits_and_groups(qwen_src, tmp_path, bits, group, residency, slots):
    dst = mlx_lm_convert(qwen_src, tmp_path / "q", quantize=True, q_bits=bits, q_group_size=group)
    model, _ = check(dst, residency, slots)
    assert expert_formats(model) == [((bits, group, "affine"),) * 2] * 4


@pytest.mark.parametrize("residency,slots", RESIDENCIES)
@pytest.mark.parametrize("mode,bits,group", [("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)])
def test_float_modes(qwen_src, tmp_path, mode, bits, group, residency, slots):
    dst = mlx_lm_convert(qwen_src, tmp_path / "q", quantize=True, q_mode=mode)
    cfg = json.loads((dst / "config.json").read_text())["quantization"]
    assert cfg["mode"] == mode
    model, _ = check(dst, residency, slots)
    assert expert_formats(model) == [((bits, group, mode),) * 2] * 4


def dequantized(model):
    """mlx-lm's model with every quantized layer replaced by its float weights: ``mx.dequantize`` with the
    nvfp4 tensor scale for switch layers that carry one (mlx-lm 0.32.2's ``dequantize_model`` drops that scale:
    its weights come out 2688x too large), ``dequantize_model`` for the rest.

    The tensor-scale dequantize runs on MLX's CPU, whose values equal the format's definition (e2m1 x e4m3 x
    g / 2688) in numpy within 1e-7. MLX 0.32.4 CUDA's, called like this (no ``dtype=``), returns float32 at
    bfloat16 precision: 1.8e-3..2.9e-3 from the CPU's on the H200, exact with ``dtype=mx.float32``
    (docs/testing.md). On the GPU the reference, not the model, was the one that was off."""
    from mlx.utils import tree_unflatten
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
    from mlx_lm.utils import dequantize_model

    swaps = []
    for path, m in model.named_modules():
        if isinstance(m, QuantizedSwitchLinear) and m.global_scale is not None:
            w = mx.stack([mx.dequantize(m.weight[e], m.scales[e], None, m.group_size, m.bits, mode=m.mode,
                                        global_scale=m.global_scale[e], stream=mx.cpu) for e in range(m.num_experts)])
            lin = SwitchLinear(m.input_dims, m.output_dims, m.num_experts, bias="bias" in m)
            lin.weight = w
            if "bias" in m:
                lin.bias = m.bias
            swaps.append((path, lin))
    model.update_modules(tree_unflatten(swaps))
    return dequantize_model(model)


@pytest.mark.parametrize("residency,slots", RESIDENCIES)
def test_nvfp4_global_scale(qwen_src, tmp_path, residency, slots):
    """nvfp4 with one tensor scale per expert (``global_scale``; gather_qmm takes it only on the GPU): ours ==
    mlx-lm's export dequantized with MLX's own ``mx.dequantize(..., global_scale=)``, and the scale matters."""
    dst = mlx_lm_quantize_save(qwen_src, tmp_path / "q", mode="nvfp4", global_scale=True)
    cfg = json.loads((dst / "config.json").read_text())["quantization"]
    assert cfg["model.layers.0.mlp.switch_mlp.gate_proj"]["global_scale"] is True
    ref = mlx_lm_model(dst)
    g = ref.layers[0].mlp.switch_mlp.gate_proj.global_scale
    assert g.shape == (8,) and float(mx.max(mx.abs(g / 2688.0 - 1))) > 0.01  # not a no-op scale
    if mx.default_device() == mx.cpu:
        with pytest.raises(ValueError, match="only supported on the GPU"):
            logits_of(ref, PROMPT)  # why the reference is the dequantized model
    model, store = ours(dst, residency, slots)
    try:
        try:
            assert_matches(model, dequantized(ref), tol=quantized_vs_dequantized("nvfp4", 4, 16))
        except AssertionError as e:  # say which class the backend's kernels measured in (tests/tolerances.py)
            err = quantized_kernel_error("nvfp4", 4, 16)
            raise AssertionError(f"{e}; this backend's nvfp4 kernels measured {err:.3g} per GEMM") from None
        glu = model.layers[0].mlp.switch_mlp
        assert glu.gate_up.global_scale.shape[1:] == (256,) and glu.down.global_scale.shape[1:] == (128,)
    finally:
        store.close()


@pytest.mark.parametrize("residency,slots", RESIDENCIES)
@pytest.mark.parametrize("recipe,low,high", [("mixed_2_6", 2, 6), pytest.param("mixed_3_4", 3, 4, marks=pytest.mark.slow),
                                             ("mixed_3_6", 3, 6), pytest.param("mixed_4_6", 4, 6, marks=pytest.mark.slow)])
def test_mixed_recipes(qwen_src, tmp_path, recipe, low, high, residency, slots):
    """mlx-lm's quant_predicate recipes write per-module overrides: layers 2-3 (of 4) get a ``high``-bit
    ``down_proj`` beside ``low``-bit gate/up; the bank holds each projection in its own format."""
    dst = mlx_lm_convert(qwen_src, tmp_path / "q", quantize=True, q_group_size=64, quant_predicate=recipe)
    q = json.loads((dst / "config.json").read_text())["quantization"]
    assert q["model.layers.3.mlp.switch_mlp.down_proj"]["bits"] == high
    assert q["model.layers.0.mlp.switch_mlp.down_proj"]["bits"] == low
    model, store = check(dst, residency, slots)
    lo, hi = (low, 64, "affine"), (high, 64, "affine")
    assert expert_formats(model) == [(lo, lo), (lo, lo), (lo, hi), (lo, hi)]
    layout = store.layout
    sizes = [src.expert_bytes for src in layout.layers]
    assert sizes[0] == sizes[1] < sizes[2] == sizes[3]  # each layer streams its own bytes
    assert layout.expert_bytes == -(-sum(sizes) // 4)


def test_recipe_without_group_size(qwen_src, tmp_path):
    """``mlx_lm.convert --quant-predicate mixed_3_6`` without ``--q-group-size`` writes ``"group_size": null``
    per module; the group size then is MLX's default (64), read from the shapes."""
    dst = mlx_lm_convert(qwen_src, tmp_path / "q", quantize=True, quant_predicate="mixed_3_6")
    q = json.loads((dst / "config.json").read_text())["quantization"]
    assert q["model.layers.0.mlp.switch_mlp.gate_proj"]["group_size"] is None
    model, _ = check(dst, "stacked", None)
    assert expert_formats(model)[3] == ((3, 64, "affine"), (6, 64, "affine"))
    from mach_runtime.cli.check import check_checkpoint, format_report

    report = check_checkpoint(dst)  # mach check says what load_moe builds
    assert report["expert_formats"] == ["affine 3-bit g64", "affine 6-bit g64"]
    assert "mixed: affine 3-bit g64 / affine 6-bit g64" in format_report(report)


def test_router_and_non_expert_overrides(qwen_src, tmp_path):
    """mlx-lm's default predicate keeps routers at 8 bits (group 64) beside 4-bit group-32 experts; a recipe
    gives ``lm_head`` / ``v_proj`` 6 bits: the non-expert modules are quantized exactly as config.json says."""
    plain = mlx_lm_convert(qwen_src, tmp_path / "plain", quantize=True, q_bits=4, q_group_size=32)
    q = json.loads((plain / "config.json").read_text())["quantization"]
    assert q["model.layers.0.mlp.gate"] == {"group_size": 64, "bits": 8}
    model, store = ours(plain, "stacked", None)
    try:
        gate = model.layers[0].mlp.gate
        assert (gate.bits, gate.group_size) == (8, 64)
        assert expert_formats(model)[0] == ((4, 32, "affine"),) * 2
        assert (model.layers[0].self_attn.q_proj.bits, model.layers[0].self_attn.q_proj.group_size) == (4, 32)
    finally:
        store.close()
    mixed = mlx_lm_convert(qwen_src, tmp_path / "mixed", quantize=True, q_group_size=64, quant_predicate="mixed_4_6")
    q = json.loads((mixed / "config.json").read_text())["quantization"]
    model, store = ours(mixed, "stacked", None)
    try:
        assert model.lm_head.bits == q["lm_head"]["bits"] == 6
        assert model.layers[3].self_attn.v_proj.bits == q["model.layers.3.self_attn.v_proj"]["bits"] == 6
        assert model.layers[0].self_attn.v_proj.bits == q["model.layers.0.self_attn.v_proj"]["bits"] == 4
    finally:
        store.close()


def per_module(path, module):
    """A user's quant_predicate (what mlx-lm's dynamic_quant produces: bits chosen per module): gate and up of one
    layer in different formats, modes mixed across layers and projections."""
    if ".switch_mlp." not in path:
        return True
    layer = int(path.split(".")[2])
    even = {"gate_proj": {"group_size": 64, "bits": 8}, "up_proj": {"group_size": 32, "bits": 4},
            "down_proj": {"group_size": 32, "bits": 4, "mode": "mxfp4"}}
    odd = {"gate_proj": {"group_size": 16, "bits": 4, "mode": "nvfp4"}, "up_proj": True,
           "down_proj": {"group_size": 32, "bits": 8, "mode": "mxfp8"}}
    return (even if layer % 2 == 0 else odd)[path.rsplit(".", 1)[1]]


@pytest.mark.parametrize("residency,slots", RESIDENCIES)
def test_per_module_predicate_gate_and_up_differ(qwen_src, tmp_path, residency, slots):
    """mlx_lm.convert with a per-module quant_predicate: gate 8-bit g64 beside up 4-bit g32 (computed as two
    projections), nvfp4 gate beside affine up, mxfp4 / mxfp8 down projections."""
    dst = mlx_lm_convert(qwen_src, tmp_path / "q", quantize=True, q_bits=4, q_group_size=64, quant_predicate=per_module)
    q = json.loads((dst / "config.json").read_text())["quantization"]
    assert q["model.layers.0.mlp.switch_mlp.gate_proj"]["bits"] == 8
    model, _ = check(dst, residency, slots)
    glu = model.layers[0].mlp.switch_mlp
    assert type(glu.gate_up).__name__ == "SplitProjection"
    fmt = [(p.quant.bits, p.quant.group_size, p.quant.mode) for p in (glu.gate_up.gate, glu.gate_up.up, glu.down)]
    assert fmt == [(8, 64, "affine"), (4, 32, "affine"), (4, 32, "mxfp4")]
    glu = model.layers[1].mlp.switch_mlp
    fmt = [(p.quant.bits, p.quant.group_size, p.quant.mode) for p in (glu.gate_up.gate, glu.gate_up.up, glu.down)]
    assert fmt == [(4, 16, "nvfp4"), (4, 64, "affine"), (8, 32, "mxfp8")]


@pytest.mark.parametrize("residency,slots", STACKED_ONLY)
@pytest.mark.parametrize("q", [dict(q_bits=4, q_group_size=32), dict(quant_predicate="mixed_3_6", q_group_size=32),
                               dict(q_mode="mxfp4")], ids=["affine4-g32", "mixed_3_6-g32", "mxfp4"])
def test_qwen3_5_moe_from_transformers_fixture(tmp_path, q, residency, slots):
    """mlx_lm.convert straight from the transformers-saved qwen3_5_moe fixture (fused experts). Its expert width
    (16) is below every group size, so mlx-lm leaves ``down_proj`` unquantized beside quantized gate/up."""
    from tests.family_helpers import FAMILIES

    dst = mlx_lm_convert(FAMILIES["qwen3_5_moe"], tmp_path / "q", quantize=True, **q)
    model, store = ours(dst, residency, slots)
    try:
        ref = mlx_lm_model(dst)
        assert_matches(model, ref)
        glu = model.language_model.model.layers[0].mlp.switch_mlp
        assert glu.gate_up.quant is not None and glu.down.quant is None
    finally:
        store.close()


@pytest.fixture(scope="module")
def gpt_oss_src(tmp_path_factory):
    """The gpt_oss fixture as an unquantized MLX export (mlx-lm's sanitize cannot read transformers' bf16 gpt-oss
    layout, so mlx_lm.convert starts from this one)."""
    from tests.family_helpers import to_mlx_layout

    path, _ = to_mlx_layout("gpt_oss", tmp_path_factory.mktemp("gsrc") / "mlx")
    cfg = json.loads((path / "config.json").read_text())
    cfg["torch_dtype"] = "float32"
    rp = cfg.pop("rope_parameters")  # rope spelled as the hub's gpt-oss configs spell it (mlx-lm reads these)
    cfg["rope_theta"] = rp["rope_theta"]
    cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def gpt_oss_reference(path):
    """mlx-lm's loader (``load_model``: its sanitize, its per-module quantization) over the model class
    mach_runtime uses for gpt_oss (mlx-lm's own, with transformers' untruncated YaRN)."""
    from mlx_lm.utils import load_model

    from mach_runtime.io.arch_registry import REGISTRY

    model, _ = load_model(path, get_model_classes=lambda config: REGISTRY["gpt_oss"].model_classes())
    return mlx_lm_reference(model)


@pytest.mark.parametrize("residency,slots", STACKED_ONLY)
@pytest.mark.parametrize("q", [dict(q_bits=4, q_group_size=32), dict(q_bits=8, q_group_size=32),
                               pytest.param(dict(q_bits=3, q_group_size=32), marks=pytest.mark.slow),
                               dict(q_mode="mxfp4"), pytest.param(dict(q_mode="mxfp8"), marks=pytest.mark.slow),
                               dict(quant_predicate="mixed_2_6", q_group_size=32)],
                         ids=["affine4-g32", "affine8-g32", "affine3-g32", "mxfp4", "mxfp8", "mixed_2_6-g32"])
def test_gpt_oss_exports(gpt_oss_src, tmp_path, q, residency, slots):
    """Expert biases beside every quantized format (the group-size-32 4/8-bit cases failed on CUDA, issue 18)."""
    dst = mlx_lm_convert(gpt_oss_src, tmp_path / "q", quantize=True, **q)
    check(dst, residency, slots, ref=gpt_oss_reference(dst))


@pytest.mark.parametrize("T", [1, 40])
@pytest.mark.parametrize("N", [32, 64])
@pytest.mark.parametrize("sorted_indices", [False, True])
@pytest.mark.parametrize("mode,bits,group", [("affine", 4, 32), ("affine", 8, 32), ("affine", 4, 64),
                                             ("mxfp4", 4, 32), ("mxfp8", 8, 32), ("nvfp4", 4, 16)])
@pytest.mark.parametrize("K", [32, 64, 96, 128])
def test_gather_qmm_matches_dequantized(mode, bits, group, K, sorted_indices, N, T):
    """The backend's gather_qmm against plain matmuls over gathered, dequantized weights at the expert shapes of
    the tiny fixtures: K = 32 is gpt_oss's down_proj (the K-tail case where backends have had kernel bugs), N = 64
    our fused gate_up, N = 32 mlx-lm's separate gate / up, T = 1 decode. Pins a quantized mismatch on a backend
    (issue 18: group-32 4/8-bit checkpoints on CUDA) to the kernel or clears it."""
    if K % group:
        pytest.skip("input width not a multiple of the group")
    mx.random.seed(K + bits + N)
    E, k = 8, 2
    w = mx.random.normal((E, N, K)) / K**0.5
    q = mx.quantize(w, group, bits, mode=mode)
    wq, scales, biases = q[0], q[1], (q[2] if len(q) > 2 else None)
    deq = mx.dequantize(wq, scales, biases, group, bits, mode=mode, dtype=mx.float32)
    x = mx.random.normal((T, 1, 1, K))
    idx = mx.random.randint(0, E, (T, k)).astype(mx.uint32)
    if sorted_indices:
        order = mx.argsort(idx.flatten())
        x, idx = x.flatten(0, -3)[order // k], idx.flatten()[order]
    got = mx.gather_qmm(x, wq, scales, biases, rhs_indices=idx, transpose=True, group_size=group, bits=bits,
                        mode=mode, sorted_indices=sorted_indices)
    # [..., 1, K] @ [..., K, N] on the CPU (exact float32 products, no gather kernel, no TF32)
    want = mx.matmul(x, deq[idx].swapaxes(-1, -2), stream=mx.cpu)
    got, want = np.array(got), np.array(want)
    assert got.shape == want.shape and np.all(np.isfinite(got))
    # float32 accumulation in another order (~3e-7 here on the CPU and the H200's CUDA kernels; no TF32 in the
    # quantized kernels): tests/tolerances.py
    tol = reorder(1e-4)
    assert np.max(np.abs(got - want)) <= tol * max(1.0, float(np.max(np.abs(want))))
