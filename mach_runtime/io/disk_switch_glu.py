"""DiskSwitchGLU: the routed-expert MLP in streaming residency.

Same contract as ``GatherSwitchGLU`` (``(x[..., D], indices[..., k]) -> y[..., k, D]``), but the weights it
multiplies are the layer's *bank* of slots, not all experts. Two paths:

* **optimistic** (the default for decode steps and short forwards, ``optimistic.py``): the slot ids are computed
  on the device from the bank's expert -> slot table (``slot_of``, a missing expert maps to slot 0) and the
  routing is recorded; nothing waits on the host. The forward is checked once at its end and redone in sync mode
  when any layer missed.
* **compiled** (``engine/compiled_moe.py``, opt-in like stacked blocks): the optimistic path with the whole MoE
  block (router, top-k, slot gather, expert matmuls, weighting) as one ``mx.compile``d function whose outputs are
  the block's output and its routing; the block's hook records the routing.
* **sync**: reads the router's choices to the host (one sync per layer), makes those experts resident (hits are
  free, misses are read from disk into slots), remaps expert ids to slot ids and runs the gather matmuls.

A long sync-mode call (a prefill chunk) that would evict from the bank goes through the prefill arena instead
(``prefill_arena.py``), so the decode bank keeps its hot set. Otherwise, when a call needs more distinct experts
than the bank has slots, the tokens are split into
consecutive groups whose distinct experts fit, and each group is computed — and evaluated, so its slots may be
overwritten — before the next group loads. Any bank with at least top-k slots therefore gives the same result as
stacked residency.
"""

from __future__ import annotations

import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .expert_bank import LayerBank, StreamingExpertStore
from .gather_switch_glu import ExpertProjection, activation_for, switch_glu
from .next_layer_prefetch import MAX_ROWS as MAX_PREDICT_ROWS
from .prefill_arena import arena_forward, wants_arena


def token_groups(inds: np.ndarray, slots: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) token ranges whose distinct experts each fit in ``slots``."""
    n = inds.shape[0]
    if len(np.unique(inds)) <= slots:
        return [(0, n)]
    groups, start, seen = [], 0, set()
    for t in range(n):
        row = set(inds[t].tolist())
        if len(seen | row) > slots:
            groups.append((start, t))
            start, seen = t, set()
        seen |= row
    groups.append((start, n))
    return groups


class DiskSwitchGLU(nn.Module):
    def __init__(
        self,
        gate_up: ExpertProjection,
        down: ExpertProjection,
        swiglu_variant: str,
        inter: int,
        store: StreamingExpertStore,
        bank: LayerBank,
        **act,
    ):
        super().__init__()
        self.gate_up = gate_up  # [slots, 2I, D] (the bank's arrays are this module's parameters)
        self.down = down
        self.inter = inter
        self.swiglu_variant = swiglu_variant
        self._activation = activation_for(swiglu_variant, **act)
        self._store = store
        self._bank = bank
        self.slot_of = bank.device_table()  # expert -> slot on the device (int32 [E]); a module array, not a weight
        self.next_layer = None  # (prefetcher, next bank, next router, its top-k): next_layer_prefetch.py
        self._sink = None  # set while a compiled streaming MoE block traces this module (engine/compiled_moe.py)
        bank.glu = self

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        if self._sink is not None:  # traced inside mx.compile: the block hands the routing out as an output
            self._sink.append(indices)
            return switch_glu(x, self.slot_of[indices], self.gate_up, self.down, self._activation, self.inter)
        rec = self._store.optimistic.recording
        if rec is not None:  # optimistic: no host sync; checked once per forward
            self._store.optimistic.record(self._bank, indices)
            y = switch_glu(x, self.slot_of[indices], self.gate_up, self.down, self._activation, self.inter)
            if self._store.in_place_writes:
                self._bank.add_fence(y)
            return y
        lead, k, D = indices.shape[:-1], indices.shape[-1], x.shape[-1]
        nl = self.next_layer
        rows = indices.size // k
        predict = nl is not None and rows <= MAX_PREDICT_ROWS
        t0 = time.perf_counter()
        if predict:  # the next layer's likely experts, read back in the same sync as this layer's routing
            pf, nxt, gate, nk = nl
            logits = gate(x.reshape(-1, D))
            guess = mx.argpartition(logits, kth=-nk, axis=-1)[..., -nk:]
            host = np.array(mx.concatenate([indices.reshape(-1).astype(mx.int32), guess.reshape(-1).astype(mx.int32)]))
            inds, predicted = host[: indices.size].reshape(-1, k), host[indices.size :]
        else:
            inds = np.array(indices).reshape(-1, k)  # the host readback (one sync per layer)
        self._store.sync_seconds += time.perf_counter() - t0
        self._store.count_sync()
        if self._store.next_layer is not None:
            self._store.next_layer.score(self._bank.index, inds)
        for observe in self._store.routing_observers:
            observe(self._bank, inds)
        xf = x.reshape(-1, D)
        if wants_arena(self._store, self._bank, inds):  # a long prompt: keep the decode bank's hot set
            return arena_forward(self, xf, inds).reshape(*lead, k, D)
        outs = []
        groups = token_groups(inds, self._bank.group_slots)
        for gi, (a, b) in enumerate(groups):
            chunk = inds[a:b]
            self._store.ensure(self._bank, np.unique(chunk))
            if predict and gi + 1 == len(groups):  # this layer's reads are issued: the next layer's may start
                pf.issue(nxt, predicted)
            slot_idx = mx.array(self._bank.lut[chunk])
            y = switch_glu(xf[a:b], slot_idx, self.gate_up, self.down, self._activation, self.inter)
            if gi + 1 < len(groups):
                mx.eval(y)  # the next group may overwrite slots this one reads
            outs.append(y)
        y = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
        if self._store.in_place_writes:
            self._bank.add_fence(y)
        return y.reshape(*lead, k, D)
