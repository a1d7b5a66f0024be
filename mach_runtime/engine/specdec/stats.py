"""Counters of the draft/verify cycle (the names match mach's ``GET /v1/stats``)."""

from __future__ import annotations

from collections import deque


class SpecDecStats:
    """Cumulative over an engine's requests.

    A *cycle* is one target forward that verified at least one drafted token; a *target-only step* verified
    none (plain decoding: policy said so, nothing to copy, context above the fallback length, TARGET_ONLY).
    ``acceptance_histogram[a]`` counts cycles that accepted ``a`` drafts, so it sums to ``specdec_cycles``.
    """

    def __init__(self, block_size: int, recent_window: int = 32, low_alpha: float = 0.25):
        self.block_size = block_size
        self.low_alpha = low_alpha
        self.drafted = self.accepted = self.cycles = self.target_only_steps = 0
        self.committed = self.low_cycles = self.rerun_tokens = self.target_tokens = 0
        self.histogram = [0] * max(block_size, 1)
        self.block_histogram: dict[int, int] = {}
        self._recent: deque = deque(maxlen=recent_window)

    def record(self, block_len: int, drafted: int, accepted: int, committed: int, rerun: int = 0) -> None:
        self.committed += committed
        self.target_tokens += block_len + rerun
        self.rerun_tokens += rerun
        self.block_histogram[block_len] = self.block_histogram.get(block_len, 0) + 1
        if drafted == 0:
            self.target_only_steps += 1
            return
        self.cycles += 1
        self.drafted += drafted
        self.accepted += accepted
        self.histogram[accepted] += 1
        self._recent.append((drafted, accepted))
        if accepted < self.low_alpha * drafted:
            self.low_cycles += 1

    def add_prompt_commit(self) -> None:
        self.committed += 1  # the first token comes out of prefill

    @property
    def recent_alpha(self) -> float:
        d = sum(x for x, _ in self._recent)
        return sum(a for _, a in self._recent) / d if d else 0.0

    def as_dict(self) -> dict:
        return {
            "specdec_drafted": self.drafted,
            "specdec_accepted": self.accepted,
            "specdec_cycles": self.cycles,
            "specdec_target_only_steps": self.target_only_steps,
            "specdec_committed": self.committed,
            "specdec_target_tokens": self.target_tokens,  # tokens run through the target after prefill
            "specdec_rerun_tokens": self.rerun_tokens,  # hybrid rollback re-runs (included above)
            "recent_alpha": self.recent_alpha,
            "observed_cycles": len(self._recent),
            "low_cycles": self.low_cycles,
            "acceptance_length_histogram": list(self.histogram),
            "block_length_histogram": dict(sorted(self.block_histogram.items())),
            "mean_accepted_per_cycle": self.accepted / self.cycles if self.cycles else 0.0,
            "tokens_per_target_forward": (
                self.committed / (self.cycles + self.target_only_steps) if self.cycles + self.target_only_steps else 0.0
            ),
        }


def engine_stats(stats: SpecDecStats, config, store) -> dict:
    """An engine's stats: the cycle counters, its mode / policy / block size and, streaming, the expert bank's."""
    out = stats.as_dict()
    out["mode"] = config.mode.value
    out["policy"] = config.policy
    out["block_size"] = config.block_size
    if store is not None:
        s = store.stats()
        out["expert_bytes_read"] = s.bytes_read
        out["expert_hit_rate"] = s.hit_rate
    return out
