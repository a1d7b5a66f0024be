"""The ExpertStore actor: owns the expert bank's I/O side — prefetch, predictors, stats, lifecycle.

The bank's slot tables and slot writes are used synchronously by each ``DiskSwitchGLU`` on the MLX thread (a miss
must be resident before the layer can compute). This actor works *around* that path: after every decode step the
Decoder reports which experts each layer used (``StepRouting``); a predictor turns that history into guesses for
the next step and the actor starts background reads of guessed experts that are not resident
(``StreamingExpertStore.prefetch``), so a later miss finds its bytes already in memory. Bytes only: slots are written on the MLX thread.

Predictors plug in through ``observe(step)`` / ``predict()``. ``RecentExpertsPredictor(window=1)`` is "the
previous token's experts per layer"; with a window of several tokens it re-fetches experts that were evicted
but used recently, which is where routing locality (80 % reuse within 8 tokens on Qwen3-30B-A3B) pays.
"""

from __future__ import annotations

from collections import deque

from .actor import AsyncActor
from .messages import StatsRequest, StepRouting


class RecentExpertsPredictor:
    """Predicts, per layer, the experts used in the last ``window`` steps (most recent first)."""

    def __init__(self, window: int = 1, per_layer: int | None = None):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.per_layer = per_layer
        self.history: deque = deque(maxlen=window)

    def observe(self, step: tuple[tuple[int, ...], ...]) -> None:
        self.history.append(step)

    def predict(self) -> list[tuple[int, ...]]:
        if not self.history:
            return []
        out = []
        for bank in range(len(self.history[-1])):
            seen, order = set(), []
            for step in reversed(self.history):
                for e in step[bank] if bank < len(step) else ():
                    if e not in seen:
                        seen.add(e)
                        order.append(e)
            out.append(tuple(order[: self.per_layer] if self.per_layer else order))
        return out


class ExpertStoreActor(AsyncActor):
    name = "expert_store"
    mailbox_size = 256  # routing reports are best-effort: dropped rather than queued without bound

    def __init__(self, store, predictor=None, max_staged: int | None = None):
        super().__init__()
        self.store = store  # StreamingExpertStore or ResidentExpertStore
        self.streaming = getattr(store, "residency", "") == "streaming"
        self.predictor = predictor if predictor is not None else RecentExpertsPredictor(window=1)
        if self.streaming:
            # staging for at most one step's worth of experts in every layer
            store.max_staged = max_staged if max_staged is not None else store.layout.top_k * len(store.banks)

    def routing_source(self):
        """Called on the MLX thread after each step: the distinct experts of each bank's latest step."""
        if not self.streaming:
            return None
        return tuple(b.last_used for b in self.store.banks)

    def handle(self, msg):
        if isinstance(msg, StepRouting):
            if self.streaming:
                self.predictor.observe(msg.experts)
                for bank, experts in enumerate(self.predictor.predict()):
                    if experts:
                        self.store.prefetch(bank, experts)
            return None
        if isinstance(msg, StatsRequest):
            return self.store.stats()
        raise TypeError(f"ExpertStore actor got an unexpected message {type(msg).__name__}")
