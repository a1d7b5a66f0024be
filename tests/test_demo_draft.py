"""The bundled DFlash draft of the demo model (``mach_runtime/assets/demo-qwen3-moe-dflash``, recipe
``examples/train_demo_draft.py``): format and size, greedy losslessness and real acceptance on held-out text."""

import json

import pytest

pytest.importorskip("dflash_mlx")

from mach_runtime import BlockSpecDecEngine, BlockSpecDecEngineConfig, BlockSpecDecEngineMode  # noqa: E402
from mach_runtime.assets import demo_model_path  # noqa: E402
from mach_runtime.demo_corpus import corpus_files  # noqa: E402

DEMO = demo_model_path()
DRAFT = DEMO.parent / "demo-qwen3-moe-dflash"


def test_draft_assets_are_a_small_dflash_checkpoint():
    files = {p.name for p in DRAFT.iterdir()}
    assert {"config.json", "model.safetensors"} <= files
    size = sum(p.stat().st_size for p in DRAFT.iterdir())
    assert size <= 10_000_000  # issue 6: the draft ≤ 10 MB
    assert size + sum(p.stat().st_size for p in DEMO.iterdir()) <= 30_000_000  # issue 5: target + draft ≤ 30 MB
    cfg = json.loads((DRAFT / "config.json").read_text())
    target = json.loads((DEMO / "config.json").read_text())
    assert cfg["block_size"] == 16 and cfg["num_target_layers"] == target["num_hidden_layers"]
    assert cfg["hidden_size"] == target["hidden_size"]
    ids = cfg["dflash_config"]["target_layer_ids"]
    assert ids and all(0 <= i < target["num_hidden_layers"] for i in ids)
    assert isinstance(cfg["dflash_config"]["mask_token_id"], int)
    import mlx.core as mx

    w = mx.load(str(DRAFT / "model.safetensors"))
    assert not any("embed" in n or "lm_head" in n for n in w)  # borrows the target's
    # the engine computes the draft in fc's dtype: float32 (MLX's CPU quantized matmul is very slow in float16)
    assert w["fc.weight"].dtype == mx.float32


@pytest.fixture(scope="module")
def engine():
    cfg = BlockSpecDecEngineConfig(mode=BlockSpecDecEngineMode.NATIVE_V7, block_size=16, policy="fixed")
    return BlockSpecDecEngine.from_checkpoint(target_checkpoint=DEMO, draft_checkpoint=DRAFT, config=cfg,
                                              expert_residency="stacked")


def heldout_prompt(tok, n_tokens: int = 128, skip: int = 256) -> list[int]:
    """Tokens [skip, skip + n_tokens) of the first long-enough held-out stdlib file (never trained on)."""
    for f in corpus_files("heldout"):
        ids = tok.encode(f.read())
        if len(ids) >= skip + n_tokens + 64:
            return ids[skip : skip + n_tokens]
    pytest.skip("no held-out stdlib file long enough")


def test_native_v7_greedy_equals_target_only_and_accepts(engine):
    ids = heldout_prompt(engine.tokenizer)
    engine.reset_stats()
    spec = [t for c in engine.generate(ids, max_tokens=64, ignore_eos=True) for t in c.token_ids]
    s = engine.stats()
    base = [t for c in engine.generate(ids, max_tokens=64, ignore_eos=True, mode=BlockSpecDecEngineMode.TARGET_ONLY)
            for t in c.token_ids]
    assert spec == base and len(spec) == 64
    assert s["specdec_cycles"] > 0
    tau = 1 + s["specdec_accepted"] / s["specdec_cycles"]  # acceptance length: accepted drafts + the bonus token
    assert tau > 1.0, s
