"""One small module per MoE family; ADAPTERS lists them all (the registry reads only this)."""

from .qwen3_moe import ADAPTER as QWEN3_MOE

ADAPTERS = (QWEN3_MOE,)
