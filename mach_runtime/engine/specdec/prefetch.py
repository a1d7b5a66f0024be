"""Draft-informed expert prefetch for speculative decoding in streaming residency.

In streaming residency every MoE layer of a forward reads the router's top-k to the host and reads the experts
its bank is missing from disk before it computes. A verify over ``[staged, d1 … d(b−1)]`` touches the union of
the block's experts per layer. Once the drafts are known (before the verify runs), ``DraftPrefetcher`` guesses
that union per layer and starts background reads of the guessed experts that are not resident, through the
store's own prefetch staging (``StreamingExpertStore.prefetch``: bytes only, consumed by the next miss of that
expert on the MLX thread). A layer that misses a prefetched expert then waits only for whatever of its read is
still in flight, while the reads of later layers overlap the compute of earlier ones. A target-only step is a
block of one (its staged token is known before it runs too) and is prefetched for the same way.

Predictor (``TokenRoutingTable``): per token id, the experts each MoE layer routed that token to the last
``memory`` times it was seen. The guess for a layer is the union over the block's tokens of their entries.
Assumptions, stated plainly:

* routing is largely a function of the token itself (exactly so for hash-routed layers, mostly for early
  layers; deeper layers mix in context, so there the guess is weaker);
* the table is filled only from the forwards this prefetcher prefetched for (verifies: every block row,
  accepted or not; target-only steps: the staged token), through ``store.routing_observers``: those are the
  forwards whose token ids it is told. Prompt prefills and rollback re-runs are not learned from;
* unseen tokens predict nothing (no fallback): "the previous step's experts" is no useful fallback here, since
  the bank's eviction policy keeps exactly those resident, and resident experts are never prefetched.

What it cannot help: a verify whose block routes to more distinct experts than the bank has slots is computed in
token groups (``disk_switch_glu.token_groups``) that evict each other's experts; an expert resident when the
verify starts but evicted by an earlier group is read again on demand, and staged bytes serve one miss only.
Slot writes (bytes → arrays on the MLX thread) are not overlapped either: prefetch removes disk waits only.

Memory is bounded: the table holds at most ``capacity`` token ids (least recently seen dropped first), each an
int array [memory, layers, top_k]; staging holds at most ``max_staged`` experts (the store drops the oldest), by
default one bank's worth (slots × MoE layers), and one forward issues at most ``max_staged // layers`` reads per
layer (earliest block positions first: the verify's first token group consumes them first).

Stats (``stats()``): predicted experts (and how many the forward then used: the predictor's precision / recall),
prefetch reads issued and their bytes, hits (prefetched experts a forward then missed and took from staging
instead of the disk), the forward's misses (experts it needed that were not resident when its layer ran), and
wasted bytes (issued reads no prefetched-for forward used). Hits and waste are exact while this prefetcher is the
only one staging into the store (its bookkeeping mirrors the store's FIFO staging).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


class TokenRoutingTable:
    """Per token id, the top-k experts of every MoE layer of its last ``memory`` observations (LRU-bounded)."""

    def __init__(self, layers: int, top_k: int, num_experts: int, capacity: int = 4096, memory: int = 1):
        if capacity < 1 or memory < 1:
            raise ValueError(f"capacity and memory must be >= 1, got {capacity}, {memory}")
        self.layers, self.top_k, self.capacity, self.memory = layers, top_k, capacity, memory
        self.dtype = np.int16 if num_experts < 2**15 else np.int32
        self._rows: OrderedDict[int, np.ndarray] = OrderedDict()  # token -> [memory, layers, top_k], -1 = empty

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, token: int) -> bool:
        return int(token) in self._rows

    def observe(self, layer: int, tokens, inds: np.ndarray) -> None:
        """Row ``r`` of ``inds`` [rows, top_k] is the routing of ``tokens[r]`` at MoE layer ``layer``."""
        for t, row in zip(tokens, inds):
            t = int(t)
            entry = self._rows.get(t)
            if entry is None:
                entry = self._rows[t] = np.full((self.memory, self.layers, self.top_k), -1, self.dtype)
                if len(self._rows) > self.capacity:
                    self._rows.popitem(last=False)
            else:
                self._rows.move_to_end(t)
            if self.memory > 1:
                entry[1:, layer] = entry[:-1, layer]
            entry[0, layer] = row[: self.top_k]

    def experts(self, token: int, layer: int) -> list[int]:
        """The distinct experts ``token`` was routed to at ``layer`` (most recent observation first)."""
        entry = self._rows.get(int(token))
        if entry is None:
            return []
        out: list[int] = []
        for e in entry[:, layer].reshape(-1).tolist():
            if e >= 0 and e not in out:
                out.append(e)
        return out

    def predict(self, layer: int, tokens) -> list[int]:
        """The union of ``tokens``' experts at ``layer``, in block order (earliest position first)."""
        seen, out = set(), []
        for t in tokens:
            for e in self.experts(t, layer):
                if e not in seen:
                    seen.add(e)
                    out.append(e)
        return out


class DraftPrefetcher:
    """Prefetches the experts a verify is predicted to need, given its block ``[staged, drafts…]``.

    ``prefetch(block)`` is called on the MLX thread with the block's token ids, right before the verify forward
    (a 1-token block is a target-only step: the staged token is known before it runs too; ``target_only_steps``
    False skips those).
    Attaches itself to ``store.routing_observers`` to learn from (and score) that verify; ``close()`` detaches.
    """

    def __init__(self, store, *, capacity: int = 4096, memory: int = 1, max_staged: int | None = None,
                 target_only_steps: bool = True):
        if getattr(store, "residency", "") != "streaming":
            raise ValueError("draft-informed prefetch needs streaming residency")
        self.store = store
        banks = store.banks
        self.layers = len(banks)
        self.expert_bytes = store.layout.expert_bytes
        self.table = TokenRoutingTable(self.layers, store.layout.top_k, store.layout.num_experts, capacity, memory)
        self.max_staged = int(max_staged) if max_staged is not None else store.slots * self.layers
        store.max_staged = max(int(store.max_staged), self.max_staged)  # another prefetcher may need more
        self.per_layer = max(1, self.max_staged // max(1, self.layers))
        self.target_only_steps = target_only_steps  # also prefetch (and learn) for 1-token forwards
        self._outstanding: OrderedDict[tuple[int, int], None] = OrderedDict()  # staged by us, not yet consumed
        self._armed: list[tuple[int, ...] | None] = [None] * self.layers  # block of the verify to come, per bank
        self._predicted: list[set] = [set() for _ in range(self.layers)]
        self.cycles = self.predicted = self.predicted_used = self.needed = 0
        self.issued = self.hits = self.verify_misses = self.used_elsewhere = 0
        store.routing_observers.append(self._observe)

    # -- the cycle ----------------------------------------------------------------------------------------
    def prefetch(self, block) -> int:
        """Starts reads of the experts ``block``'s verify is predicted to need; returns how many were started."""
        tokens = tuple(int(t) for t in block)
        if len(tokens) < 2 and not self.target_only_steps:
            return 0
        self.cycles += 1
        started = 0
        for i, bank in enumerate(self.store.banks):
            self._armed[i] = tokens
            guess = self.table.predict(i, tokens)
            self._predicted[i] = set(guess)
            self.predicted += len(guess)
            n = 0
            for e in guess:
                if n >= self.per_layer:
                    break
                key = (i, e)
                if bank.lut[e] >= 0:
                    continue  # resident: nothing to read
                n += 1
                if key in self._outstanding:
                    continue  # still staged from an earlier cycle
                if self.store.prefetch(i, (e,)):
                    started += 1
                    self._outstanding[key] = None
                    while len(self._outstanding) > self.store.max_staged:  # the store dropped its oldest too
                        self._outstanding.popitem(last=False)
        self.issued += started
        return started

    def _observe(self, bank, inds: np.ndarray) -> None:
        """A MoE layer's routing (MLX thread, before its bank is touched): learn and score an armed verify;
        any call consumes the staged experts it misses (as the store does)."""
        i = bank.index
        needed = np.unique(inds)
        missing = needed[bank.lut[needed] < 0].tolist()
        used = [e for e in missing if (i, e) in self._outstanding]
        for e in used:
            del self._outstanding[(i, e)]
        tokens, self._armed[i] = self._armed[i], None
        if tokens is None:  # a forward we were not told about (prefill, rollback re-run, skipped target-only step)
            self.used_elsewhere += len(used)
            return
        self.table.observe(i, tokens, inds[: len(tokens)])
        needed_set = set(needed.tolist())
        self.needed += len(needed_set)
        self.predicted_used += len(self._predicted[i] & needed_set)
        self.verify_misses += len(missing)
        self.hits += len(used)

    # -- stats / lifecycle --------------------------------------------------------------------------------
    def stats(self) -> dict:
        eb = self.expert_bytes
        return dict(
            cycles=self.cycles,
            table_tokens=len(self.table),
            predicted=self.predicted,
            predicted_used=self.predicted_used,
            needed=self.needed,
            predictor_precision=self.predicted_used / self.predicted if self.predicted else 0.0,
            predictor_recall=self.predicted_used / self.needed if self.needed else 0.0,
            issued=self.issued,
            prefetched_bytes=self.issued * eb,
            hits=self.hits,
            hit_bytes=self.hits * eb,
            verify_misses=self.verify_misses,
            demand_misses=self.verify_misses - self.hits,
            used_elsewhere=self.used_elsewhere,
            wasted_bytes=(self.issued - self.hits) * eb,
            precision=self.hits / self.issued if self.issued else 0.0,
            recall=self.hits / self.verify_misses if self.verify_misses else 0.0,
        )

    def close(self) -> None:
        if self._observe in self.store.routing_observers:
            self.store.routing_observers.remove(self._observe)
