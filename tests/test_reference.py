"""load_moe against independent references: transformers (HF fixture) and mlx-lm's own forward."""

import mlx.core as mx
import pytest

from mach_runtime import load_moe
from tests import tolerances as tol
from tests.helpers import convert, greedy, mlx_lm_reference, quantize, reference_logits, rel_err

GIB = 1 << 30


def budget(expert_bytes: int, layers: int, slots: int) -> float:
    """expert_cache_gb that buys exactly ``slots`` slots per layer."""
    return (slots + 0.5) * layers * expert_bytes / GIB


def logits_of(path, ids, **kw):
    model, tok, store, cache = load_moe(path, **kw)
    try:
        return reference_logits(model, ids), store.stats()
    finally:
        store.close()


@pytest.mark.parametrize("residency,slots", [("stacked", None), ("streaming", 2), ("streaming", 3), ("streaming", 8)])
def test_hf_checkpoint_matches_transformers(hf_reference, residency, slots):
    ids = hf_reference["prompt_ids"]
    kw = {"expert_residency": residency}
    if slots:
        kw["expert_cache_gb"] = budget(24576, 2, slots)
    got, stats = logits_of(hf_reference["path"], ids, **kw)
    assert got.shape == hf_reference["logits"].shape
    assert rel_err(got, hf_reference["logits"]) <= tol.independent()
    if slots:
        assert stats.capacity_experts == 2 * slots
        assert stats.misses > 0


@pytest.mark.parametrize("residency", ["stacked", "streaming"])
def test_hf_greedy_matches_transformers(hf_reference, residency):
    kw = {"expert_residency": residency}
    if residency == "streaming":
        kw["expert_cache_gb"] = budget(24576, 2, 2)  # a bank exactly top-k wide
    model, tok, store, cache = load_moe(hf_reference["path"], **kw)
    try:
        assert greedy(model, hf_reference["prompt_ids"], 24) == hf_reference["greedy_ids"]
    finally:
        store.close()


@pytest.mark.parametrize(
    "layout,shard_bytes",
    [("stacked", None), ("stacked", 200_000), ("per_expert", 150_000)],
    ids=["mlx-stacked", "mlx-stacked-sharded", "hf-per-expert-sharded"],
)
@pytest.mark.parametrize("residency", ["stacked", "streaming"])
def test_other_layouts_match_transformers(hf_reference, tmp_path, layout, shard_bytes, residency):
    path = convert(hf_reference["path"], tmp_path / "ckpt", layout=layout, shard_bytes=shard_bytes)
    if shard_bytes:
        assert (path / "model.safetensors.index.json").exists()
        assert len(list(path.glob("model-*.safetensors"))) > 1
    kw = {"expert_residency": residency}
    if residency == "streaming":
        kw["expert_cache_gb"] = budget(24576, 2, 3)
    got, _ = logits_of(path, hf_reference["prompt_ids"], **kw)
    assert rel_err(got, hf_reference["logits"]) <= tol.independent()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("residency", ["stacked", "streaming"])
def test_half_precision_checkpoint_matches_mlx_lm(hf_reference, tmp_path, dtype, residency):
    """bf16/fp16 HF checkpoints load; on the CPU they compute in fp32 (MLX's CPU gather_mm is fp32-only)."""
    from mlx.utils import tree_map

    from mach_runtime import load as mlx_lm_load  # mlx-lm's loader, the config normalised for it

    path = convert(hf_reference["path"], tmp_path / "ckpt", dtype=dtype)
    ref_model, _ = mlx_lm_load(str(path))
    ref_model.update(tree_map(lambda a: a.astype(mx.float32), ref_model.parameters()))
    ids = hf_reference["prompt_ids"]
    kw = {"expert_residency": residency}
    if residency == "streaming":
        kw["expert_cache_gb"] = budget(24576, 2, 3)  # fp32 bank: 2x the bf16 bytes on disk
    got, stats = logits_of(path, ids, **kw)
    want = reference_logits(ref_model, ids)
    assert rel_err(got, want) <= tol.half(getattr(mx, dtype), 1e-5)  # a GPU computes in the half dtype
    # the half-precision weights stay close to the fp32 transformers reference too
    assert rel_err(got, hf_reference["logits"]) <= 5e-2
    assert stats.expert_bytes == 24576 // 2


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("residency,slots", [("stacked", None), ("streaming", 2), ("streaming", 5)])
def test_quantized_checkpoint_matches_mlx_lm(hf_reference, tmp_path, bits, residency, slots):
    from mlx_lm import load as mlx_lm_load

    path = quantize(hf_reference["path"], tmp_path / "q", bits=bits, group_size=32, shard_bytes=120_000)
    ref_model = mlx_lm_reference(mlx_lm_load(str(path))[0])
    ids = hf_reference["prompt_ids"]
    kw = {"expert_residency": residency}
    if slots:
        from mach_runtime.io.arch_registry import REGISTRY
        from mach_runtime.io.expert_layout import find_expert_layout
        from mach_runtime.io.safetensors_index import CheckpointIndex
        import json

        tc = json.loads((path / "config.json").read_text())
        layout = find_expert_layout(CheckpointIndex(path), REGISTRY["qwen3_moe"], tc, "config.json")
        assert layout.quant.bits == bits and layout.layout == "stacked"
        kw["expert_cache_gb"] = budget(layout.expert_bytes, 2, slots)
    got, _ = logits_of(path, ids, **kw)
    assert rel_err(got, reference_logits(ref_model, ids)) <= tol.independent()
    assert greedy(ref_model, ids, 8) == greedy_of(path, ids, 8, **kw)


def greedy_of(path, ids, n, **kw):
    model, tok, store, cache = load_moe(path, **kw)
    try:
        return greedy(model, ids, n)
    finally:
        store.close()


def test_random_tiny_matches_mlx_lm_forward(tiny_dir):
    """A 16-expert top-4 checkpoint: ours (both residencies) vs mlx-lm's qwen3_moe on the same weights."""
    from mlx_lm import load as mlx_lm_load

    ref_model, tok = mlx_lm_load(str(tiny_dir))
    ids = tok.encode("import os\nfor name in os.listdir('.'):\n    print(name)\n" * 3)
    want = reference_logits(ref_model, ids)
    for kw in ({"expert_residency": "stacked"}, {"expert_residency": "streaming", "expert_cache_gb": budget(24576, 2, 4)}):
        got, _ = logits_of(tiny_dir, ids, **kw)
        assert rel_err(got, want) <= tol.reorder(1e-5), kw
