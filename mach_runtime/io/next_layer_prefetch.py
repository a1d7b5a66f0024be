"""Next-layer prefetch: while one MoE layer reads its misses and computes, the next layer's likely experts are read.

In sync mode (the per-layer path that loads misses, ``disk_switch_glu.py``) a layer's reads can only start once its
routing is on the host, i.e. after the layer before it has computed: the disk idles while the device computes and
the device idles while the disk reads. The residual stream changes little from one layer to the next, so the next
layer's router applied to *this* layer's MoE input predicts most of the next layer's experts. ``NextLayerPrefetch``
does that for each streaming MoE block whose router is a plain linear layer (``gate``: top-k of its logits is the
top-k of a softmax router's probabilities):

* the predicted top-k is computed on the device beside the router and read back in the same host sync as the
  layer's own routing (no extra sync);
* after the layer has issued its own reads, the predicted experts the next bank lacks are read in the background
  into the store's prefetch staging (``StreamingExpertStore.prefetch``: bytes only), within a bytes budget
  (``budget_bytes``, at most that many bytes staged by this prefetcher per layer); the next layer's miss then takes
  them from staging instead of waiting for the disk;
* each prediction is scored when the next layer's routing arrives (precision: predicted experts the layer used); a
  running precision below ``MIN_PRECISION`` stops the reads (predictions continue, so they resume when it
  recovers): under routing nothing predicts (uniform random), it costs a few wasted reads, not the disk's bandwidth.

Outputs never depend on it: staged bytes are the same bytes a miss would read. Optimistic (all-hit) forwards do not
use it (they read nothing). Statistics: ``stats()``.
"""

from __future__ import annotations

import numpy as np

MAX_ROWS = 8  # predict for decode steps and small batches only (prefill chunks go through the arena)
MIN_PRECISION = 0.3  # below this running precision the prefetcher stops reading (it keeps predicting)
EMA = 0.1  # weight of the newest layer's precision in the running precision


class NextLayerPrefetch:
    """The prefetcher of one streaming store: links each DiskSwitchGLU to the router of the MoE block after it."""

    def __init__(self, store, budget_bytes: int):
        self.store = store
        self.budget_experts = max(0, int(budget_bytes) // max(1, store.layout.expert_bytes))
        store.max_staged = max(int(store.max_staged), 2 * self.budget_experts)  # this layer's and the next one's
        self.precision = 1.0  # running precision of the predictions (optimistic start)
        self.predicted = self.correct = self.issued = 0
        self._pending: dict[int, tuple] = {}  # bank index -> (forward, experts predicted for it in that forward)

    @property
    def active(self) -> bool:
        return self.budget_experts > 0 and self.precision >= MIN_PRECISION

    def score(self, bank_index: int, needed: np.ndarray) -> None:
        """The routing of a layer arrived: scores the prediction made for it, if any."""
        seq, pred = self._pending.pop(bank_index, (None, None))
        if pred is None or seq != self.store.optimistic.seq or not len(pred):  # made for another forward
            return
        hit = int(np.isin(pred, needed).sum())
        self.predicted += len(pred)
        self.correct += hit
        self.precision = (1 - EMA) * self.precision + EMA * hit / len(pred)

    def issue(self, next_bank: int, predicted: np.ndarray) -> int:
        """Remembers the prediction for ``next_bank`` and, while precise enough, reads its non-resident experts
        (at most ``budget_experts``) into staging; returns the reads started."""
        experts = np.unique(predicted)
        self._pending[next_bank] = (self.store.optimistic.seq, experts)
        if not self.active:
            return 0
        bank = self.store.banks[next_bank]
        cold = experts[bank.lut[experts] < 0][: self.budget_experts]
        started = self.store.prefetch(next_bank, cold.tolist()) if len(cold) else 0
        self.issued += started
        return started

    def stats(self) -> dict:
        return dict(predicted=self.predicted, correct=self.correct,
                    precision=self.correct / self.predicted if self.predicted else float("nan"),
                    running_precision=self.precision, reads_issued=self.issued, active=self.active)


def install(model, store, budget_bytes: int) -> NextLayerPrefetch | None:
    """Links every streaming MoE block's experts to the next block's router (``glu.next_layer``); returns the
    prefetcher, or None when ``budget_bytes`` is 0 or no two consecutive blocks have linear routers."""
    import mlx.nn as nn

    from .disk_switch_glu import DiskSwitchGLU

    if budget_bytes <= 0:
        return None
    blocks = []
    for _, m in model.named_modules():
        glu = next((c for c in m.children().values() if isinstance(c, DiskSwitchGLU)), None)
        if glu is not None:
            blocks.append((m, glu))
    blocks.sort(key=lambda b: b[1]._bank.index)
    pf = NextLayerPrefetch(store, budget_bytes)
    linked = 0
    for (_, glu), (nxt, nglu) in zip(blocks, blocks[1:]):
        gate = nxt.get("gate") if isinstance(nxt, dict) else None
        k = getattr(nxt, "top_k", None) or getattr(nxt, "num_experts_per_tok", None)
        if isinstance(gate, (nn.Linear, nn.QuantizedLinear)) and isinstance(k, int) and k > 0:
            object.__setattr__(glu, "next_layer", (pf, nglu._bank.index, gate, k))  # not part of the module tree
            linked += 1
    store.next_layer = pf if linked else None
    return store.next_layer
