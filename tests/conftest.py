import json
import os

# float32 GEMMs at full precision on every backend (MLX CUDA defaults to TF32): the tolerance rule in
# tests/tolerances.py; set before MLX runs its first matmul, inherited by the suite's subprocesses
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import pytest  # noqa: E402

from tests.helpers import HF_QWEN3_MOE  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# each test decides its residency explicitly; a user's environment must not leak in
for var in ("MACH_EXPERT_RESIDENCY", "MACH_EXPERT_CACHE_GB", "MACH_EVICTION_POLICY", "MACH_IO_THREADS", "MACH_DIRECT_IO"):
    os.environ.pop(var, None)

# the CPU BLAS under MLX's float32 matmuls, chosen once before any fixture computes a reference (MACH_CPU_BLAS,
# default OpenBLAS; docs/cpu_blas.md): a model load would otherwise switch it mid-session, and references computed
# before it (mlx-lm's own load) would differ from results after it by float32 reordering
from mach_runtime.backend.cpu_blas import ensure_cpu_blas  # noqa: E402

ensure_cpu_blas()


@pytest.fixture(scope="session")
def hf_reference():
    """The transformers-generated tiny qwen3_moe and its reference outputs."""
    from safetensors.numpy import load_file

    ref = json.loads((HF_QWEN3_MOE / "reference.json").read_text())
    ref["logits"] = load_file(str(HF_QWEN3_MOE / ref["logits_file"]))[ref["logits_key"]]
    ref["path"] = HF_QWEN3_MOE
    return ref


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random tiny qwen3_moe checkpoint (HF per-expert layout, fp32) with 16 experts, top-4."""
    from mach_runtime.testing.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny") / "ckpt", hidden=64, layers=2, experts=16, top_k=4, moe_inter=32,
        tokenizer_from=HF_QWEN3_MOE,
    )
