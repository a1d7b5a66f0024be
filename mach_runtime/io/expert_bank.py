"""The expert bank: a bounded set of slots per MoE layer holding the experts that stream from disk.

``LayerBank`` keeps the host-side bookkeeping of one layer (expert → slot table, eviction policy) and the slot
arrays themselves (the ``ExpertProjection`` weights of that layer's ``DiskSwitchGLU``). ``StreamingExpertStore``
owns every layer bank, the I/O reader and the statistics. Hits cost no I/O; a miss is read from its byte ranges
by the reader's threads (bytes only), then written into its slot on the calling (MLX) thread.

Stats reconcile exactly: ``bytes_read == (misses - prefetch_used + prefetched) * expert_bytes`` (without
prefetch: ``misses * expert_bytes``) and ``hits + misses`` is the number of (step, layer, distinct expert)
lookups.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from functools import partial

import msgspec
import numpy as np

from ..errors import ExpertCacheTooSmallError
from .eviction import EvictionPolicy, make_table
from .expert_layout import ExpertLayerSource, ExpertLayout
from .expert_reader import ExpertReader
from .safetensors_index import DTYPES
from .slot_writes import SlotWriters, host_views, in_place_backend, whole_in_place, write_slot

GIB = 1 << 30
MAX_FENCES = 2  # outputs remembered per bank for in-place slot writes (LayerBank.add_fence)
FENCE_MAX_BYTES = 1 << 20  # larger outputs (prompt-sized calls) are computed at once instead of being remembered


class ExpertStoreStats(msgspec.Struct, frozen=True):
    residency: str  # "stacked" | "streaming"
    layers: int  # MoE layers
    num_experts: int  # routed experts per layer
    expert_bytes: int  # bytes of one expert on disk
    hits: int
    misses: int
    evictions: int
    bytes_read: int
    resident_experts: int  # experts currently resident (all layers)
    capacity_experts: int  # slots (all layers)
    hit_rate: float  # hits / (hits + misses); 1.0 before any lookup
    read_seconds: float  # wall time spent waiting for expert reads
    eviction_policy: str
    direct_io: bool
    prefetched: int = 0  # experts read ahead of need (bytes_read counts them too)
    prefetch_used: int = 0  # misses served from prefetched bytes (no wait on the disk)
    host_syncs: int = 0  # routing readbacks: one per MoE layer in sync mode, one per verified optimistic forward
    optimistic_forwards: int = 0  # forwards computed assuming every routed expert was resident
    redone_forwards: int = 0  # of those, forwards that missed and were redone (retried, else sync mode)
    retried_forwards: int = 0  # optimistic retries after loading a missed layer's experts
    pinned_experts: int = 0  # experts pinned from a routing trace (all layers; never evicted)
    write_seconds: float = 0.0  # MLX-thread time turning read bytes into slot writes (host copies, graph building)
    sync_seconds: float = 0.0  # MLX-thread time waiting for per-layer routing readbacks (sync mode)
    next_layer_predicted: int = 0  # experts the next-layer predictor named (next_layer_prefetch.py)
    next_layer_correct: int = 0  # of those, experts the next layer then used


def to_mx(buf: np.ndarray, st_dtype: str, shape: tuple[int, ...], dtype):
    """Raw little-endian bytes of one tensor → mx.array of ``dtype`` (call on the MLX thread)."""
    import mlx.core as mx

    a = mx.array(buf.view(DTYPES[st_dtype][1]).reshape(shape))
    if st_dtype == "BF16":
        a = a.view(mx.bfloat16)
    elif st_dtype == "F8_E4M3":  # FP8 experts with float block scales are held dequantized (expert_layout)
        a = mx.from_fp8(a, dtype=mx.float32)
    return a if a.dtype == dtype else a.astype(dtype)


def apply_transform(a, transform: str):
    """Host-side reshaping of expert components ``a [n, ...]`` to the engine's ``[n, out, in]`` rows.

    ``t`` swaps the last two axes of 2-D parts; ``deinterleave`` moves the even rows (gate) before the odd rows
    (up); ``blocks:bm:bk:out:in`` repeats FP8 block scales over their rows and 32-wide groups (expert_layout).
    MLX ops on the MLX thread; exact (pure data movement).
    """
    import mlx.core as mx

    for step in transform.split("+") if transform else ():
        if step == "t":
            if a.ndim >= 3:
                a = a.swapaxes(-1, -2)
        elif step == "deinterleave":
            a = mx.concatenate([a[:, 0::2], a[:, 1::2]], axis=1)
        elif step.startswith(("blocks:", "dequant:")):  # block scales [n, gr, gc] -> [n, out, in/32 or in]
            _, bm, bk, out_dim, in_dim = (int(v) if v.isdigit() else v for v in step.split(":"))
            per = 32 if step.startswith("blocks:") else 1
            a = mx.repeat(a, bm, axis=-2)[..., :out_dim, :]
            a = mx.repeat(a, bk // per, axis=-1)[..., : in_dim // per]
        else:
            raise ValueError(f"unknown expert transform {step!r}")
    return mx.contiguous(a) if transform else a


@dataclass
class _Target:
    """Where one source component lands in the bank: projection, component name, row range, transform."""

    proj: object  # ExpertProjection
    comp: str
    rows: slice
    transform: str = ""
    multiply: bool = False  # multiply into the slot's rows instead of writing them (float FP8 block scales)


class LayerBank:
    """Slots of one MoE layer. Not thread-safe: used only from the MLX thread."""

    def __init__(self, index: int, source: ExpertLayerSource, slots: int, policy: EvictionPolicy, targets: dict):
        self.index = index  # position among the store's banks
        self.source = source
        self.slots = slots
        self.lut = np.full(source.num_experts, -1, dtype=np.int32)  # expert -> slot
        self.slot_expert = np.full(slots, -1, dtype=np.int32)  # slot -> expert
        self.free = list(range(slots - 1, -1, -1))
        self.policy = policy  # this bank's row of the store's PolicyTable
        self._last_used = ()  # distinct experts of the latest step (a tuple, or a sorted int array)
        self.targets: dict[tuple[str, str], _Target] = targets  # (proj, comp) -> bank target
        self.version = 0  # bumped whenever the expert -> slot table changes
        self.pinned: set[int] = set()  # experts never evicted (StreamingExpertStore.pin_from_trace)
        self.glu = None  # the DiskSwitchGLU computing over this bank (holds the device copy of the table)
        self._in_place = None  # the arrays slot_writes.in_place_arrays may write in place (cached there)
        self.fences: list = []  # latest outputs computed over this bank, evaluated before slots change in place

    def device_table(self):
        """The expert -> slot table as a device array; a missing expert maps to slot 0 (see optimistic.py)."""
        import mlx.core as mx

        return mx.array(np.maximum(self.lut, 0))

    @property
    def last_used(self) -> tuple[int, ...]:
        return self._last_used if isinstance(self._last_used, tuple) else tuple(self._last_used.tolist())

    @last_used.setter
    def last_used(self, value) -> None:
        self._last_used = value

    def add_fence(self, y) -> None:
        """Remembers an output computed over this bank (slot_writes.py evaluates them before writing in place);
        the oldest beyond ``MAX_FENCES`` and any over ``FENCE_MAX_BYTES`` (its memory) are evaluated at once."""
        import mlx.core as mx

        if y.nbytes > FENCE_MAX_BYTES:
            return mx.eval(y)
        self.fences.append(y)
        if len(self.fences) > MAX_FENCES:
            mx.eval(self.fences.pop(0))

    @property
    def resident(self) -> int:
        return self.slots - len(self.free)

    @property
    def group_slots(self) -> int:
        """Slots a token group may fill: all but the pinned experts'."""
        return self.slots - len(self.pinned)


class StreamingExpertStore:
    """Every layer's bank, the reader, and the stats of a streaming model."""

    residency = "streaming"

    def __init__(self, layout: ExpertLayout, slots: int, policy: str, io_threads: int, direct_io: bool):
        self.layout = layout
        self.slots = slots
        self.policy_name = policy
        self.policy_table = make_table(policy, 0, layout.num_experts)  # one row per bank (eviction.py)
        self.reader = ExpertReader(io_threads, direct_io)
        self.banks: list[LayerBank] = []
        self.hits = self.misses = self.evictions = 0
        self.read_seconds = self.write_seconds = self.sync_seconds = 0.0
        self.trace: list[tuple[int, tuple[int, ...]]] | None = None  # (layer, experts) per step when tracing
        # prefetch staging: (bank index, expert) -> Future of its bytes; filled from any thread, consumed on
        # the MLX thread by the next miss of that expert
        self._staged: dict[tuple[int, int], object] = {}
        self._staged_lock = threading.Lock()
        self.max_staged = 0  # per store; 0 disables prefetch
        self.prefetched = self.prefetch_used = 0
        # told every MoE call's per-token routing (bank, host int array [tokens, top_k]) on the MLX thread before
        # the bank is touched; the store's stats do not see them (e.g. draft-informed prefetch learns from them)
        self.routing_observers: list = []
        # the prefill arena (prefill_arena.py): slots shared by every layer for long prompts; 0 disables it
        self.arena_slots = slots
        self.arena = None
        self.next_layer = None  # NextLayerPrefetch (next_layer_prefetch.py), when installed
        self.preloaded: dict[int, set] = {}  # bank index -> experts an optimistic retry loaded before sync mode
        self.host_syncs = 0  # routing readbacks to the host (per layer in sync mode, per forward when optimistic)
        self.in_place_writes = in_place_backend()  # slot writes by numpy into host memory (slot_writes.py)
        self.writers: SlotWriters | None = SlotWriters(io_threads)  # None: in-place writes on the MLX thread
        from .optimistic import OptimisticRunner

        self.optimistic = OptimisticRunner(self)

    @staticmethod
    def slots_for_budget(layout: ExpertLayout, budget_gb: float, bank_expert_bytes: int) -> int:
        """Slots per layer a budget buys; raises if it cannot hold one token's top-k experts."""
        n_layers = len(layout.layers)
        slots = int(budget_gb * GIB) // (n_layers * bank_expert_bytes)
        if slots < layout.top_k:
            need = layout.top_k * n_layers * bank_expert_bytes / GIB
            raise ExpertCacheTooSmallError(
                f"expert_cache_gb={budget_gb:g} holds {slots} experts per layer, but one token needs "
                f"top-k={layout.top_k} experts in each of {n_layers} MoE layers; raise expert_cache_gb to at "
                f"least {need:.4g} (GiB), or use stacked residency"
            )
        return min(slots, layout.num_experts)

    @staticmethod
    def check_slots(layout: ExpertLayout, slots) -> int:
        """An explicit bank size in slots per layer: at least top-k, capped at the experts."""
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < layout.top_k:
            raise ExpertCacheTooSmallError(
                f"expert_slots={slots!r}: one token needs top-k={layout.top_k} experts per MoE layer, so the bank "
                f"needs at least {layout.top_k} slots per layer"
            )
        return min(slots, layout.num_experts)

    def add_layer(self, source: ExpertLayerSource, targets: dict) -> LayerBank:
        bank = LayerBank(len(self.banks), source, self.slots, self.policy_table.row(len(self.banks)), targets)
        self.banks.append(bank)
        return bank

    def pin_from_trace(self, path, per_layer: int) -> dict[int, list[int]]:
        """Loads and pins, in every bank, the ``per_layer`` experts a ``mach trace`` file routed to most often
        (at most slots - top-k, so any token still fits); pinned experts are never evicted. Returns
        {layer: pinned experts}."""
        from ..analysis.trace_replay import RoutingTrace
        from ..errors import ConfigError

        try:
            trace = RoutingTrace.load(path)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"{path}: cannot read a routing trace to pin experts from ({e}); record one with "
                              "`mach trace CKPT --out trace.json`") from None
        if trace.num_experts != self.layout.num_experts:
            raise ConfigError(f"{path}: the trace has {trace.num_experts} experts per layer, this model "
                              f"{self.layout.num_experts}: it was recorded on another model")
        n = max(0, min(int(per_layer), self.slots - self.layout.top_k))
        per = trace.per_layer()
        out = {}
        for bank in self.banks:
            counts = np.zeros(self.layout.num_experts, dtype=np.int64)
            for experts in per.get(bank.source.layer, []):
                counts[list(experts)] += 1
            hot = [int(e) for e in np.argsort(-counts, kind="stable")[:n] if counts[e] > 0]
            bank.pinned = set()
            if hot:
                self.ensure(bank, np.array(sorted(hot)))
            bank.pinned = set(hot)
            out[bank.source.layer] = sorted(hot)
        return out

    def start_trace(self) -> None:
        """Records (layer, distinct experts) of every bank step from now on, for offline policy replay."""
        self.trace = []

    def ensure(self, bank: LayerBank, needed: np.ndarray) -> None:
        """Makes every expert in ``needed`` (distinct ids) resident in ``bank``; reads the misses."""
        if len(needed) > bank.slots:
            raise RuntimeError(f"{len(needed)} experts requested from a {bank.slots}-slot bank")
        bank.last_used = tuple(needed.tolist())
        if self.trace is not None:
            self.trace.append((bank.source.layer, bank.last_used))
        hits = int((bank.lut[needed] >= 0).sum())
        pre = self.preloaded.pop(bank.index, None) if self.preloaded else None
        if pre:  # loaded (and counted as misses) by an optimistic retry of this same forward
            hits -= len(pre.intersection(needed.tolist()))
        self.hits += hits
        self.load_missing(bank, needed)
        bank.policy.step(needed.tolist())

    def count_sync(self) -> None:
        self.host_syncs += 1

    def account_hits(self, bank: LayerBank, inds: np.ndarray, loaded=()) -> None:
        """Bookkeeping of a verified optimistic MoE call (every expert was resident): what ``ensure`` does,
        after the fact (``loaded``: experts this forward's retry loaded, already counted as misses); routing
        observers are told too."""
        for observe in self.routing_observers:
            observe(bank, inds)
        # sorted distinct experts, as ensure() steps the policy; one row (decode) needs no np.unique
        needed = sorted(set(inds[0].tolist())) if inds.shape[0] == 1 else np.unique(inds).tolist()
        bank.last_used = tuple(needed)
        if self.trace is not None:
            self.trace.append((bank.source.layer, bank.last_used))
        self.hits += len(needed) - len(loaded)
        bank.policy.step(needed)

    def account_rows(self, banks: list[LayerBank], inds: np.ndarray) -> None:
        """``account_hits`` for one-row calls of distinct banks at once (a verified decode forward: ``inds [n, k]``
        is each bank's routing), with no per-expert Python: the hits are counted, every bank's policy steps in one
        vectorised update (``PolicyTable.step_rows``); routing observers and the trace are told per bank."""
        used = np.sort(inds, axis=1)
        if self.routing_observers or self.trace is not None:
            for bank, row in zip(banks, inds):
                for observe in self.routing_observers:
                    observe(bank, row[None])
                if self.trace is not None:
                    self.trace.append((bank.source.layer, tuple(np.unique(row).tolist())))
        for bank, row in zip(banks, used):
            bank.last_used = row
        self.hits += used.size
        self.policy_table.step_rows(np.array([b.index for b in banks]), used)

    def load_missing(self, bank: LayerBank, needed: np.ndarray) -> list[int]:
        """Makes ``needed`` resident, counting only the misses (a retried optimistic forward accounts its hits
        when it verifies); returns the experts it loaded."""
        missing = needed[bank.lut[needed] < 0]
        if len(missing):
            try:
                self._load(bank, missing, set(needed.tolist()))
            finally:
                bank.version += 1
                if bank.glu is not None:
                    bank.glu.slot_of = bank.device_table()
        return missing.tolist()

    def _load(self, bank: LayerBank, missing: np.ndarray, needed: set) -> None:
        # free slots first, then victims; each expert is written to the device as soon as its bytes are in,
        # while the others are still being read. A failed read leaves the bank consistent: experts already
        # written are resident, the victims are gone, the unused slots are free again.
        n_free = min(len(bank.free), len(missing))
        slots = bank.free[len(bank.free) - n_free :][::-1]
        victims, exclude = [], set(needed) | bank.pinned
        for _ in range(len(missing) - n_free):
            victim = bank.policy.victim(exclude)
            exclude.add(victim)
            victims.append(victim)
        slots += [int(bank.lut[v]) for v in victims]
        experts = missing.tolist()
        slot_of = dict(zip(experts, slots))
        del bank.free[len(bank.free) - n_free :]
        for v in victims:
            bank.policy.remove(v)
            bank.lut[v] = -1
            bank.slot_expert[bank.slot_expert == v] = -1
        self.evictions += len(victims)
        t0 = time.perf_counter()
        host = host_views(self, bank)  # in place: evaluates the bank and its fences first
        writes: list | None = [] if self.writers and whole_in_place(bank, host) else None  # on writer threads
        done: list = []
        try:
            for e, views, bufs in self._read_iter(bank, experts):
                t1 = time.perf_counter()
                self.read_seconds += t1 - t0
                if writes is not None:
                    writes.append((e, self.writers.submit(bank, slot_of[e], views, host, partial(
                        self.reader.release, bufs))))
                else:
                    write_slot(bank, slot_of[e], views, host=host)  # device copy while the other reads run
                    self.reader.release(bufs)
                    done.append(e)
                t0 = time.perf_counter()
                self.write_seconds += t0 - t1
        finally:
            t0 = time.perf_counter()
            done += [e for e, fut in writes or () if fut.exception() is None]  # waits for every write
            self.write_seconds += time.perf_counter() - t0
            for e in done:
                bank.lut[e], bank.slot_expert[slot_of[e]] = slot_of[e], e
            self.misses += len(done)
            for e in experts:  # slots whose expert never arrived go back to the free list
                if bank.lut[e] < 0 and slot_of[e] not in bank.free:
                    bank.free.append(slot_of[e])
        for _, fut in writes or ():
            fut.result()  # a failed write raises here (its expert is not resident)

    def _read_iter(self, bank: LayerBank, experts: list[int]):
        """(expert, views, staging buffers) for each expert: prefetched bytes first, then fresh reads as they
        complete."""
        with self._staged_lock:
            staged = {e: self._staged.pop((bank.index, e), None) for e in experts}
        cold = [e for e in experts if staged[e] is None]
        for e in experts:
            if staged[e] is not None:
                views, bufs = staged[e].result()
                self.prefetch_used += 1
                yield e, views, bufs
        if cold:
            for i, views, bufs in self.reader.read_iter([bank.source.ranges(e) for e in cold]):
                yield cold[i], views, bufs

    def prefetch(self, bank_index: int, experts) -> int:
        """Starts background reads of ``experts`` of one bank that are neither resident nor staged.

        Safe from any thread (the bytes land in staging; slot writes still happen on the MLX thread).
        Returns how many reads were started. Staging holds at most ``max_staged`` experts: the oldest are
        dropped first.
        """
        bank = self.banks[bank_index]
        started = 0
        with self._staged_lock:
            for e in experts:
                key = (bank_index, int(e))
                if self.max_staged <= 0 or bank.lut[e] >= 0 or key in self._staged:
                    continue
                while len(self._staged) >= self.max_staged:
                    self._staged.pop(next(iter(self._staged)))
                self._staged[key] = self.reader.submit(bank.source.ranges(int(e)))
                started += 1
            self.prefetched += started
        return started

    def stats(self) -> ExpertStoreStats:
        lookups = self.hits + self.misses
        return ExpertStoreStats(
            residency=self.residency,
            layers=len(self.banks),
            num_experts=self.layout.num_experts,
            expert_bytes=self.layout.expert_bytes,
            hits=self.hits,
            misses=self.misses,
            evictions=self.evictions,
            bytes_read=self.reader.bytes_read,  # measured by the reader; equals misses * expert_bytes
            resident_experts=sum(b.resident for b in self.banks),
            capacity_experts=self.slots * len(self.banks),
            hit_rate=self.hits / lookups if lookups else 1.0,
            read_seconds=self.read_seconds,
            write_seconds=self.write_seconds,
            sync_seconds=self.sync_seconds,
            next_layer_predicted=self.next_layer.predicted if self.next_layer is not None else 0,
            next_layer_correct=self.next_layer.correct if self.next_layer is not None else 0,
            eviction_policy=self.policy_name,
            direct_io=self.reader.direct,
            prefetched=self.prefetched,
            prefetch_used=self.prefetch_used,
            host_syncs=self.host_syncs,
            retried_forwards=self.optimistic.retried_forwards,
            optimistic_forwards=self.optimistic.optimistic_forwards,
            redone_forwards=self.optimistic.redone_forwards,
            pinned_experts=sum(len(b.pinned) for b in self.banks),
        )

    def close(self) -> None:
        self.arena = None
        with self._staged_lock:
            self._staged.clear()
        self.reader.close()
        if self.writers is not None:
            self.writers.close()


class ResidentExpertStore:
    """Stacked residency: every expert is resident; nothing is ever read after load."""

    residency = "stacked"

    def __init__(self, layout: ExpertLayout):
        self.layout = layout

    def stats(self) -> ExpertStoreStats:
        n = len(self.layout.layers) * self.layout.num_experts
        return ExpertStoreStats(
            residency=self.residency,
            layers=len(self.layout.layers),
            num_experts=self.layout.num_experts,
            expert_bytes=self.layout.expert_bytes,
            hits=0,
            misses=0,
            evictions=0,
            bytes_read=0,
            resident_experts=n,
            capacity_experts=n,
            hit_rate=1.0,
            read_seconds=0.0,
            eviction_policy="none",
            direct_io=False,
        )

    def close(self) -> None:
        pass
