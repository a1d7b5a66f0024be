"""Model assets shipped inside the package.

``demo-qwen3-moe/``: the project's own demo model — a 12.5M-parameter qwen3_moe (8 layers, 32 experts, top-4)
trained on the Python standard library's sources (``docs/model_card.md``; recipe in ``examples/``). HF
per-expert safetensors layout, fp16, loads with ``load_moe`` and with transformers. It is the default
checkpoint of ``mach generate``, ``mach demo``, ``mach trace`` and ``Runtime.open()`` (``default_checkpoint``).
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL = "demo-qwen3-moe"


def demo_model_path() -> Path:
    """Directory of the bundled demo checkpoint (config.json, sharded safetensors, tokenizer)."""
    return Path(__file__).resolve().parent / DEMO_MODEL


def default_checkpoint() -> str:
    """The bundled default checkpoint: the project's own trained demo model, shipped inside the package."""
    return str(demo_model_path())


def default_draft() -> Path:
    """Directory of the demo model's trained DFlash draft (``demo-qwen3-moe-dflash/``): mach-serve's default draft
    when it serves the bundled demo model."""
    return Path(__file__).resolve().parent / (DEMO_MODEL + "-dflash")
