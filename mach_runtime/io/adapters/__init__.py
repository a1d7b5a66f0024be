"""One small module per MoE family; ADAPTERS lists them all (the registry reads only this)."""

from .deepseek_v4 import ADAPTER as DEEPSEEK_V4
from .gemma4 import ADAPTER as GEMMA4
from .gpt_oss import ADAPTER as GPT_OSS
from .qwen3_5_moe import ADAPTER as QWEN3_5_MOE
from .qwen3_moe import ADAPTER as QWEN3_MOE

ADAPTERS = (QWEN3_MOE, QWEN3_5_MOE, GPT_OSS, GEMMA4, DEEPSEEK_V4)
