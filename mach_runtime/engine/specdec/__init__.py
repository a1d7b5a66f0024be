"""Block speculative decoding (DFlash v7 drafting, prompt lookup, target-only) with adaptive and
residency-aware block policies. See ``engine.py`` for the cycle."""

from .config import POLICIES, BlockSpecDecEngineConfig, BlockSpecDecEngineMode
from .engine import BlockSpecDecEngine
from .output import SpecDecChunk

__all__ = ["BlockSpecDecEngine", "BlockSpecDecEngineConfig", "BlockSpecDecEngineMode", "SpecDecChunk", "POLICIES"]
