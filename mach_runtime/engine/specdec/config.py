"""Configuration of ``BlockSpecDecEngine``: the decode mode and the knobs of the draft/verify cycle."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ...errors import ConfigError


class BlockSpecDecEngineMode(str, enum.Enum):
    NATIVE_V7 = "native_v7"  # DFlash block drafting (a block-diffusion draft checkpoint)
    PROMPT_LOOKUP = "prompt_lookup"  # draft-free: copy the continuation of an earlier n-gram (CopySpec-style)
    TARGET_ONLY = "target_only"  # plain decoding through the same engine (the ablation baseline)


POLICIES = ("fixed", "opencode-sampled-v1", "residency-aware", "throughput")


@dataclass(frozen=True)
class BlockSpecDecEngineConfig:
    mode: BlockSpecDecEngineMode = BlockSpecDecEngineMode.NATIVE_V7
    block_size: int = 16  # tokens verified per cycle at most (the staged token + block_size - 1 drafts)
    policy: str = "opencode-sampled-v1"  # how many tokens to draft each cycle (see policies.py)
    target_only_above_context: int = 0  # context length above which decoding falls back to target-only; 0 = off
    prefill_step: int = 512
    draft_sink: int = 64  # draft context cache: first tokens kept ...
    draft_window: int = 1024  # ... plus this many most recent
    lookup_max_ngram: int = 4  # PROMPT_LOOKUP: longest suffix n-gram searched for ...
    lookup_min_ngram: int = 2  # ... and the shortest
    recent_window: int = 32  # cycles behind ``recent_alpha``
    low_alpha: float = 0.25  # a drafting cycle accepting less than this fraction of its drafts is a "low" cycle
    bucket_kv: bool = True  # multi-token forwards attend over KV lengths rounded up to 64 (static shapes; target.py)
    gdn_tape: bool = True  # GatedDeltaNet rollback replays the recorded recurrence (gdn_tape.py) instead of a re-run
    draft_prefetch: bool = False  # streaming: prefetch the experts a verify's tokens are predicted to route to
    compile_moe: bool = True  # mx.compile the MoE blocks for forwards of <= 64 rows (compiled_moe.py)
    compile_verify: bool = True  # qwen3_moe, stacked, bucket_kv: the verify forward as one compiled graph
    compile_draft: bool = True  # the DFlash draft pass (context append + block + head) as one compiled graph

    def __post_init__(self):
        try:
            object.__setattr__(self, "mode", BlockSpecDecEngineMode(self.mode))
        except ValueError:
            names = ", ".join(m.name for m in BlockSpecDecEngineMode)
            raise ConfigError(f"mode: unknown speculative decoding mode {self.mode!r}; use one of {names}") from None
        if not isinstance(self.block_size, int) or not 1 <= self.block_size <= 64:
            raise ConfigError(f"block_size must be an integer in [1, 64], got {self.block_size!r}")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy: unknown block policy {self.policy!r}; use one of {', '.join(POLICIES)}")
        if self.target_only_above_context < 0:
            raise ConfigError(f"target_only_above_context must be >= 0, got {self.target_only_above_context}")
        if self.prefill_step < 1:
            raise ConfigError(f"prefill_step must be >= 1, got {self.prefill_step}")
        if not 1 <= self.lookup_min_ngram <= self.lookup_max_ngram:
            raise ConfigError(
                f"lookup n-gram range [{self.lookup_min_ngram}, {self.lookup_max_ngram}] is empty; "
                "need 1 <= lookup_min_ngram <= lookup_max_ngram"
            )
