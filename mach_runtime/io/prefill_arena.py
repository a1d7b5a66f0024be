"""The prefill arena: a long prompt streams its experts through transient slots, not through the decode bank.

A prefill chunk routes hundreds of tokens, so it needs far more distinct experts per layer than decode does. Fed
through the decode bank, it would evict the bank's hot set (the experts decode keeps hitting) for experts the
prompt used once. Instead, when a sync-mode MoE call of at least ``ARENA_MIN_ROWS`` rows would have to evict, its
experts go through one arena of ``store.arena_slots`` slots shared by every layer (all layers' experts have the
same shapes):

* an expert resident in the decode bank is copied device-to-device into the arena (a hit);
* any other is read from disk into the arena (a miss), and also into a *free* slot of the decode bank while
  there is one (a cold bank warms up from the prompt; nothing is ever evicted);
* tokens are computed in consecutive groups whose experts fit the arena, each group evaluated before the next
  overwrites the arena, the last one too (the next layer reuses it).

The decode bank's tables, slots and eviction policy are left as they were (apart from free slots filled). The
arena's arrays exist while prefill chunks come and are dropped by the next small (decode) forward
(``release``), so its memory is transient. ``store.arena_slots = 0`` turns the arena off.
"""

from __future__ import annotations

import time

import numpy as np

from .slot_writes import host_views, write_slot

ARENA_MIN_ROWS = 33  # calls with fewer token rows (decode, verify blocks) use the bank itself


class PrefillArena:
    """The arena's arrays (one set for all layers), built from the first bank it serves."""

    def __init__(self, glu, slots: int):
        import mlx.core as mx

        from .gather_switch_glu import ExpertProjection

        self.slots = slots
        self.projs = {}
        for name in ("gate_up", "down"):
            src = getattr(glu, name)
            arrays = {c: mx.zeros((slots, *src[c].shape[1:]), dtype=src[c].dtype)
                      for c in ("weight", "scales", "biases", "bias") if c in src}
            self.projs[id(src)] = ExpertProjection(arrays.pop("weight"), quant=src.quant, **arrays)
        self.gate_up = self.projs[id(glu.gate_up)]
        self.down = self.projs[id(glu.down)]

    def rebind(self, glu) -> None:
        """Points the arena at another layer's projections (same shapes, same arrays)."""
        self.projs = {id(glu.gate_up): self.gate_up, id(glu.down): self.down}


def wants_arena(store, bank, inds: np.ndarray) -> bool:
    """Whether this sync-mode call should go through the arena: long, and it would evict from the bank."""
    if store.arena_slots < inds.shape[-1] or inds.shape[0] < ARENA_MIN_ROWS:
        return False
    needed = np.unique(inds)
    return int((bank.lut[needed] < 0).sum()) > len(bank.free)


def arena_forward(glu, xf, inds: np.ndarray):
    """y [rows, k, D] for the rows ``xf`` routed to ``inds`` (host), computed over the arena."""
    import mlx.core as mx

    from .disk_switch_glu import token_groups
    from .gather_switch_glu import switch_glu

    store, bank = glu._store, glu._bank
    arena = store.arena
    if arena is None or arena.slots != store.arena_slots:
        arena = store.arena = PrefillArena(glu, store.arena_slots)
    arena.rebind(glu)
    outs = []
    for a, b in token_groups(inds, arena.slots):
        chunk = inds[a:b]
        needed = np.unique(chunk).tolist()
        where = {e: i for i, e in enumerate(needed)}  # expert -> arena slot
        fill_arena(store, bank, arena, where)
        slot_idx = mx.array(np.vectorize(where.__getitem__, otypes=[np.int32])(chunk))
        y = switch_glu(xf[a:b], slot_idx, arena.gate_up, arena.down, glu._activation, glu.inter)
        mx.eval(y)  # the next group, or the next layer, overwrites the arena
        outs.append(y)
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)


def fill_arena(store, bank, arena, where: dict) -> None:
    """Puts the experts ``where`` names (expert -> arena slot) into the prefill arena: bank-resident ones by a
    device copy (hits), the others from disk (misses), those also into free bank slots while any are left
    (never evicting): the store's reads, slot writes and counters."""
    bank.last_used = tuple(sorted(where))
    if store.trace is not None:
        store.trace.append((bank.source.layer, bank.last_used))
    pairs = {(id(t.proj), t.comp): (t.proj, t.comp) for t in bank.targets.values()}
    resident = [e for e in where if bank.lut[e] >= 0]
    missing = [e for e in where if bank.lut[e] < 0]
    for e in resident:
        for proj, comp in pairs.values():
            getattr(arena.projs[id(proj)], comp)[where[e]] = getattr(proj, comp)[int(bank.lut[e])]
    store.hits += len(resident)
    if not missing:
        return
    added = []
    host = host_views(store, bank, arena.projs)  # evaluates the copies above first
    t0 = time.perf_counter()
    try:
        for e, views, bufs in store._read_iter(bank, missing):
            store.read_seconds += time.perf_counter() - t0
            write_slot(bank, where[e], views, arena.projs, host)
            if bank.free:  # a free decode slot: keep it too (warms a cold bank, evicts nothing)
                slot = bank.free.pop()
                write_slot(bank, slot, views, host=host)
                bank.lut[e], bank.slot_expert[slot] = slot, e
                added.append(e)
            store.reader.release(bufs)
            store.misses += 1
            t0 = time.perf_counter()
    finally:
        if added:
            bank.policy.step(added)
            bank.version += 1
            if bank.glu is not None:
                bank.glu.slot_of = bank.device_table()
