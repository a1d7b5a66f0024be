"""Which rank holds what: the shard plan of one model over a distributed group (pure data, no MLX).

Two modes:

* **expert parallel** (``mode="expert"``): every rank keeps the whole non-expert model (attention, router,
  dense and shared MLPs, embeddings, head) and, in every MoE layer, a disjoint share of the routed experts. The
  shares are contiguous ranges (rank r owns experts ``[r*E/N, (r+1)*E/N)``, the first ``E mod N`` ranks one more)
  or, given a ``mach trace`` file, a placement that balances the measured routing load: per layer, the experts in
  decreasing order of how often the trace routed to them, each to the rank with the least load so far among
  those with room (every rank holds ceil(E/N) or floor(E/N) experts, so memory stays balanced too).
* **pipeline parallel** (``mode="pipeline"``): contiguous layer ranges, mlx-lm's split (``PipelineMixin``: the
  last layers on rank 0, the first on rank N-1; the low ranks get the extra layers). Every rank keeps all of its
  layers' experts.

The loader asks the plan ``experts_of(layer)`` (expert parallel: the rows to load or to stream) and
``keeps_layer(layer)`` (pipeline parallel); ``mach check --hosts N`` asks it what one rank holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError


def contiguous_share(num_experts: int, rank: int, size: int) -> list[int]:
    """Rank ``rank``'s experts when ``num_experts`` are split into ``size`` contiguous ranges."""
    base, extra = divmod(num_experts, size)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (1 if rank < extra else 0)))


def balanced_placement(counts: np.ndarray, size: int) -> list[list[int]]:
    """Experts per rank balancing ``counts`` (the routing load per expert), each rank holding ceil(E/N) or
    floor(E/N) experts: greedy, heaviest expert first, to the least-loaded rank with room (ties: lowest rank)."""
    E = len(counts)
    base, extra = divmod(E, size)
    room = [base + (1 if r < extra else 0) for r in range(size)]
    load = [0] * size
    out: list[list[int]] = [[] for _ in range(size)]
    for e in np.argsort(-np.asarray(counts), kind="stable"):
        r = min((r for r in range(size) if room[r] > 0), key=lambda r: (load[r], r))
        out[r].append(int(e))
        room[r] -= 1
        load[r] += int(counts[e])
    return [sorted(x) for x in out]


def pipeline_split(num_layers: int, size: int) -> list[int]:
    """Layers per rank as mlx-lm's ``PipelineMixin.pipeline`` splits them (even; the low ranks get the extra)."""
    base, extra = divmod(num_layers, size)
    return [base + (1 if r < extra else 0) for r in range(size)]


def pipeline_range(num_layers: int, rank: int, size: int) -> tuple[int, int]:
    """[start, end) of the decoder layers rank ``rank`` runs (rank 0 the last ones, as mlx-lm's pipeline)."""
    split = pipeline_split(num_layers, size)
    start = sum(split[rank + 1:])
    return start, start + split[rank]


@dataclass(frozen=True)
class ShardPlan:
    """What rank ``rank`` of ``size`` holds. ``owned``: {MoE layer index: sorted experts it owns} (expert
    parallel); ``layers``: [start, end) of the decoder layers it runs (pipeline parallel; all layers otherwise)."""

    mode: str  # "expert" | "pipeline"
    rank: int
    size: int
    num_layers: int
    num_experts: int
    owned: dict = field(default_factory=dict)
    layers: tuple[int, int] = (0, 0)
    placement: str | None = None  # the trace file the expert placement came from, if any

    @classmethod
    def build(cls, mode: str, rank: int, size: int, num_layers: int, moe_layers: list[int], num_experts: int,
              placement: str | None = None) -> "ShardPlan":
        if mode not in ("expert", "pipeline"):
            raise ConfigError(f"distributed mode must be 'expert' or 'pipeline', got {mode!r}")
        if not 0 <= rank < size:
            raise ConfigError(f"rank {rank} is outside a group of {size}")
        if mode == "pipeline":
            if size > num_layers:
                raise ConfigError(f"pipeline parallel over {size} ranks needs at least {size} decoder layers; this "
                                  f"model has {num_layers}: use fewer ranks or mode='expert'")
            return cls(mode, rank, size, num_layers, num_experts, layers=pipeline_range(num_layers, rank, size))
        if size > num_experts:
            raise ConfigError(f"expert parallel over {size} ranks needs at least {size} experts per layer; this model "
                              f"has {num_experts}: use fewer ranks")
        if placement is None:
            share = contiguous_share(num_experts, rank, size)
            owned = {layer: share for layer in moe_layers}
        else:
            owned = {layer: balanced_placement(counts, size)[rank]
                     for layer, counts in trace_counts(placement, moe_layers, num_experts).items()}
        return cls(mode, rank, size, num_layers, num_experts, owned=owned, layers=(0, num_layers),
                   placement=placement)

    @property
    def expert_parallel(self) -> bool:
        return self.mode == "expert" and self.size > 1

    @property
    def pipeline(self) -> bool:
        return self.mode == "pipeline" and self.size > 1

    def experts_of(self, layer: int) -> list[int] | None:
        """The experts of MoE layer ``layer`` this rank holds, or None for all of them."""
        if not self.expert_parallel:
            return None
        return list(self.owned[layer])

    def keeps_layer(self, layer: int) -> bool:
        return not self.pipeline or self.layers[0] <= layer < self.layers[1]

    def keeps_weight(self, name: str) -> bool:
        """Whether this rank loads the non-expert weight ``name`` (pipeline parallel: its layers' and the shared
        embeddings, final norm and head)."""
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        return m is None or self.keeps_layer(int(m.group(1)))

    def describe(self) -> str:
        if self.pipeline:
            return f"rank {self.rank}/{self.size}: pipeline parallel, decoder layers [{self.layers[0]}, {self.layers[1]})"
        if not self.expert_parallel:
            return f"rank {self.rank}/{self.size}: the whole model"
        counts = sorted({len(v) for v in self.owned.values()})
        how = f"placed by {self.placement}" if self.placement else "contiguous ranges"
        return (f"rank {self.rank}/{self.size}: expert parallel, {'/'.join(map(str, counts))} of {self.num_experts} "
                f"experts in each of {len(self.owned)} MoE layers ({how})")


def trace_counts(path: str, moe_layers: list[int], num_experts: int) -> dict[int, np.ndarray]:
    """{layer: routed-token count per expert} from a ``mach trace`` file (every MoE layer; one the trace lacks
    gets zeros, so it is split evenly by index)."""
    from ..analysis.trace_replay import RoutingTrace

    try:
        trace = RoutingTrace.load(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{path}: cannot read a routing trace for the expert placement ({e}); record one with "
                          "`mach trace CKPT --out trace.json`") from None
    if trace.num_experts != num_experts:
        raise ConfigError(f"{path}: the trace has {trace.num_experts} experts per layer, this model {num_experts}: "
                          "it was recorded on another model")
    per = trace.per_layer()
    out = {}
    for layer in moe_layers:
        counts = np.zeros(num_experts, dtype=np.int64)
        for experts in per.get(layer, []):
            counts[list(experts)] += 1
        out[layer] = counts
    return out
