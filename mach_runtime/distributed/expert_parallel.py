"""Expert parallel: each rank applies its own share of every MoE layer's experts; ONE ``all_sum`` per MoE layer
adds the shares up. Installed on a loaded model by ``install_expert_parallel`` as hooks (``engine/hooks.py``).

Per MoE block (``<block>.switch_mlp`` and, where the family has one, ``<block>.shared_expert``):

* ``OwnedExperts`` on the routed MLP: routing is computed on every rank by the block itself (the router is
  replicated), so every rank sees the same top-k choices. The hook maps each chosen expert to the row this rank
  holds (``hook_rows``) and zeroes the output of the experts it does not own (``hook_mask``): the block's own
  weighted sum over k then gives this rank's partial output. In stacked residency the rank loaded only its own
  experts (``load_moe(shard=...)``), so its rows are a table over them; in streaming residency a non-owned
  choice is pointed at the rank's first owned expert (already resident, weighted by zero), so the bank and the
  reader of a rank only ever see its own experts and the aggregate bank grows with the number of ranks.
* ``SharedOnLeader`` on a shared expert, on ranks > 0 only: it returns zeros, so the replicated shared expert is
  computed once (on rank 0) and not counted N times by the sum.
* ``PartialSum`` on the block: ``mx.distributed.all_sum`` of the block's output (one collective per MoE layer,
  [tokens, hidden] floats, the same bytes whatever the top-k). It counts the bytes it sums
  (``collective_stats``).

Every rank ends a layer with the same hidden state (the ring all_sum hands every rank the same bytes), so the
attention, dense layers, head and sampling stay replicated and agree. The sum's order differs from the
single-process block (partials per rank, then across ranks): outputs match it to float rounding, not bitwise.

``collective_stats(model)`` -> calls and bytes summed so far (benchmarks). ``hooks.remove_hooks`` takes the hooks
off again (kinds "expert_parallel", "expert_parallel_sum", "expert_parallel_shared").
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..engine.hooks import ModuleHook, install
from ..errors import ConfigError

# families whose MoE block is router -> routed MLP -> weighted sum (+ a gated shared expert): tested against the
# single-process model (tests/test_distributed.py); others are refused rather than guessed at
SUPPORTED = ("qwen3_moe", "qwen3_5_moe")
SHARED_NAMES = ("shared_expert", "shared_experts")


class OwnedExperts(ModuleHook):
    """The routed MLP computing only this rank's experts; the others' outputs are zero."""

    kind = "expert_parallel"

    def __init__(self, inner, owned: list[int], num_experts: int, local_rows: bool):
        super().__init__(inner)
        owned = sorted(int(e) for e in owned)
        mask = np.zeros(num_experts, dtype=np.float32)
        mask[owned] = 1.0
        if local_rows:  # stacked: the rank's weights hold its experts as rows 0..len(owned)-1
            rows = np.zeros(num_experts, dtype=np.int32)
            rows[owned] = np.arange(len(owned), dtype=np.int32)
        else:  # streaming: the bank is keyed by expert id; a non-owned choice reuses the first owned expert
            rows = np.full(num_experts, owned[0], dtype=np.int32)
            rows[owned] = owned
        self.hook_owned = tuple(owned)
        self.hook_rows = mx.array(rows)
        self.hook_mask = mx.array(mask)

    def __call__(self, x, indices):
        y = self.inner(x, self.hook_rows[indices])
        return y * mx.expand_dims(self.hook_mask[indices], -1).astype(y.dtype)


class SharedOnLeader(ModuleHook):
    """A replicated shared expert on a rank > 0: contributes nothing (rank 0's copy is the one summed)."""

    kind = "expert_parallel_shared"

    def __call__(self, x):
        return mx.zeros_like(x)


class PartialSum(ModuleHook):
    """The MoE block's output summed over the ranks: one all_sum per call."""

    kind = "expert_parallel_sum"

    def __init__(self, inner, group):
        super().__init__(inner)
        self.hook_group = group
        self.hook_calls = 0
        self.hook_bytes = 0

    def __call__(self, x):
        y = self.inner(x)
        self.hook_calls += 1
        self.hook_bytes += y.size * y.dtype.size
        return mx.distributed.all_sum(y, group=self.hook_group)


def install_expert_parallel(model, adapter, plan, group, streaming: bool) -> int:
    """Installs the hooks on every MoE layer the plan covers; returns how many blocks. ``group``: MLX's group
    object; ``streaming``: the routed MLPs are banks keyed by expert id (else stacked over the owned experts)."""
    if adapter.key not in SUPPORTED:
        raise ConfigError(f"expert parallel is implemented for {', '.join(SUPPORTED)}; {adapter.key} is not yet "
                          "(use mode='pipeline' where mlx-lm pipelines it, or one process)")
    n = 0
    for layer, owned in sorted(plan.owned.items()):
        path = adapter.switch_module_template.format(layer=layer)
        block = path.rsplit(".", 1)[0]
        install(model, path, OwnedExperts, owned, plan.num_experts, not streaming)
        if plan.rank > 0:
            node = _module(model, block)
            for name in SHARED_NAMES:
                if name in node:
                    install(model, f"{block}.{name}", SharedOnLeader)
        install(model, block, PartialSum, group)
        n += 1
    return n


def collective_stats(model) -> dict:
    """{"calls", "bytes"} summed by the expert-parallel all_sums so far."""
    calls = nbytes = 0
    for _, m in model.named_modules():
        if isinstance(m, PartialSum):
            calls += m.hook_calls
            nbytes += m.hook_bytes
    return {"calls": calls, "bytes": nbytes}


def _module(root, path: str):
    node = root
    for p in path.split("."):
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node
