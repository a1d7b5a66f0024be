"""The expert bank: a bounded set of slots per MoE layer holding the experts that stream from disk.

``LayerBank`` keeps the host-side bookkeeping of one layer (expert → slot table, eviction policy) and the slot
arrays themselves (the ``ExpertProjection`` weights of that layer's ``DiskSwitchGLU``). ``StreamingExpertStore``
owns every layer bank, the I/O reader and the statistics. Hits cost no I/O; a miss is read from its byte ranges
by the reader's threads (bytes only), then written into its slot on the calling (MLX) thread.

Stats reconcile exactly: ``bytes_read == misses * expert_bytes`` and ``hits + misses`` is the number of
(step, layer, distinct expert) lookups.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgspec
import numpy as np

from ..errors import ExpertCacheTooSmallError
from .eviction import make_policy
from .expert_layout import ExpertLayerSource, ExpertLayout
from .expert_reader import ExpertReader
from .safetensors_index import DTYPES

GIB = 1 << 30


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


def to_mx(buf: np.ndarray, st_dtype: str, shape: tuple[int, ...], dtype):
    """Raw little-endian bytes of one tensor → mx.array of ``dtype`` (call on the MLX thread)."""
    import mlx.core as mx

    a = mx.array(buf.view(DTYPES[st_dtype][1]).reshape(shape))
    if st_dtype == "BF16":
        a = a.view(mx.bfloat16)
    return a if a.dtype == dtype else a.astype(dtype)


@dataclass
class _Target:
    """Where one source component lands in the bank: projection, component name, row range."""

    proj: object  # ExpertProjection
    comp: str
    rows: slice


class LayerBank:
    """Slots of one MoE layer. Not thread-safe: used only from the MLX thread."""

    def __init__(self, source: ExpertLayerSource, slots: int, policy: str, targets: dict):
        self.source = source
        self.slots = slots
        self.lut = np.full(source.num_experts, -1, dtype=np.int32)  # expert -> slot
        self.slot_expert = np.full(slots, -1, dtype=np.int32)  # slot -> expert
        self.free = list(range(slots - 1, -1, -1))
        self.policy = make_policy(policy)
        self.targets: dict[tuple[str, str], _Target] = targets  # (proj, comp) -> bank target

    @property
    def resident(self) -> int:
        return self.slots - len(self.free)


class StreamingExpertStore:
    """Every layer's bank, the reader, and the stats of a streaming model."""

    residency = "streaming"

    def __init__(self, layout: ExpertLayout, slots: int, policy: str, io_threads: int, direct_io: bool):
        self.layout = layout
        self.slots = slots
        self.policy_name = policy
        self.reader = ExpertReader(io_threads, direct_io)
        self.banks: list[LayerBank] = []
        self.hits = self.misses = self.evictions = 0
        self.read_seconds = 0.0
        self.trace: list[tuple[int, tuple[int, ...]]] | None = None  # (layer, experts) per step when tracing

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

    def add_layer(self, source: ExpertLayerSource, targets: dict) -> LayerBank:
        bank = LayerBank(source, self.slots, self.policy_name, targets)
        self.banks.append(bank)
        return bank

    def start_trace(self) -> None:
        """Records (layer, distinct experts) of every bank step from now on, for offline policy replay."""
        self.trace = []

    def ensure(self, bank: LayerBank, needed: np.ndarray) -> None:
        """Makes every expert in ``needed`` (distinct ids) resident in ``bank``; reads the misses."""
        if len(needed) > bank.slots:
            raise RuntimeError(f"{len(needed)} experts requested from a {bank.slots}-slot bank")
        if self.trace is not None:
            self.trace.append((bank.source.layer, tuple(int(e) for e in needed)))
        missing = needed[bank.lut[needed] < 0]
        self.hits += len(needed) - len(missing)
        if len(missing):
            self._load(bank, missing, set(needed.tolist()))
        bank.policy.step(needed.tolist())

    def _load(self, bank: LayerBank, missing: np.ndarray, needed: set) -> None:
        import mlx.core as mx

        # choose free slots, then victims, without touching the tables: a failed read leaves the bank intact
        n_free = min(len(bank.free), len(missing))
        slots = bank.free[len(bank.free) - n_free :][::-1]
        victims, exclude = [], set(needed)
        for _ in range(len(missing) - n_free):
            victim = bank.policy.victim(exclude)
            exclude.add(victim)
            victims.append(victim)
        slots += [int(bank.lut[v]) for v in victims]
        t0 = time.perf_counter()
        bufs = self.reader.read([bank.source.ranges(e) for e in missing.tolist()])
        self.read_seconds += time.perf_counter() - t0
        del bank.free[len(bank.free) - n_free :]
        for v in victims:
            bank.policy.remove(v)
            bank.lut[v] = -1
        self.evictions += len(victims)
        for e, slot in zip(missing.tolist(), slots):
            bank.lut[e] = slot
            bank.slot_expert[slot] = e
        self.misses += len(missing)
        idx = mx.array(slots)
        for i, (key, comp) in enumerate(bank.source.components.items()):
            t = bank.targets[key]
            arr = getattr(t.proj, t.comp)
            values = mx.stack([to_mx(b[i], comp.dtype, comp.shape, arr.dtype) for b in bufs])
            arr[idx, t.rows] = values

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
            eviction_policy=self.policy_name,
            direct_io=self.reader.direct,
        )

    def close(self) -> None:
        self.reader.close()


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
