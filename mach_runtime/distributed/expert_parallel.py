"""Expert parallel: each rank applies its own share of every MoE layer's experts; ONE ``all_sum`` per MoE layer
adds the shares up. Installed on a loaded model by ``install_expert_parallel`` as hooks (``engine/hooks.py``).

Per MoE block (``<block>.switch_mlp`` and, where the family has one, ``<block>.shared_expert``):

* ``OwnedExperts`` on the routed MLP: routing is computed on every rank by the block itself (the router is
  replicated), so every rank sees the same top-k choices. The hook reads the choices to the host (one sync per
  MoE layer), keeps the (token, choice) pairs routed to experts this rank owns (about 1/N of them), and runs the
  inner module over those pairs only — each as one row choosing one expert, mapped to the row this rank holds
  (``hook_rows``) — so a rank's expert FLOPs, like its expert bytes, are its share. The outputs go back to their
  pairs' places in a zero [..., k, hidden] array: the block's own weighted sum over k then gives this rank's
  partial output (the foreign pairs add exact zeros). In stacked residency the rank loaded only its own experts
  (``load_moe(shard=...)``), so its rows are a table over them; in streaming residency the bank is keyed by
  expert id and its reader only ever sees this rank's experts, so the aggregate bank grows with the ranks.
* ``SharedOnLeader`` on a shared expert, on ranks > 0 only: it returns zeros, so the replicated shared expert is
  computed once (on rank 0) and not counted N times by the sum.
* ``PartialSum`` on the block: ``mx.distributed.all_sum`` of the block's output (one collective per MoE layer,
  [tokens, hidden] floats, the same bytes whatever the top-k). It counts the bytes it sums
  (``collective_stats``).

Every rank ends a layer with the same hidden state (the ring all_sum hands every rank the same bytes), so the
attention, dense layers, head and sampling stay replicated and agree. The sum's order differs from the
single-process block (partials per rank, then across ranks): outputs match it to float rounding, not bitwise.

``collective_stats(model)`` -> calls and bytes summed so far, pairs routed and computed (benchmarks). ``hooks.remove_hooks`` takes the hooks
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
    """The routed MLP computing only the (token, choice) pairs routed to this rank's experts; the other pairs'
    outputs are zero."""

    kind = "expert_parallel"

    def __init__(self, inner, owned: list[int], num_experts: int, local_rows: bool):
        super().__init__(inner)
        owned = sorted(int(e) for e in owned)
        mine = np.zeros(num_experts, dtype=bool)
        mine[owned] = True
        # the row of each owned expert in the inner module: stacked, the rank's weights hold its experts as rows
        # 0..len(owned)-1; streaming, the bank is keyed by expert id
        rows = np.full(num_experts, -1, dtype=np.int32)
        rows[owned] = np.arange(len(owned), dtype=np.int32) if local_rows else owned
        self.hook_owned = tuple(owned)
        self.hook_mine = mine
        self.hook_rows = rows
        self.hook_pairs = 0  # (token, choice) pairs routed to any expert, and those this rank computed
        self.hook_computed = 0

    def __call__(self, x, indices):
        lead, k, D = indices.shape[:-1], indices.shape[-1], x.shape[-1]
        chosen = np.array(indices).reshape(-1)  # the host readback of the routing (one sync per MoE layer)
        pos = np.flatnonzero(self.hook_mine[chosen])  # the pairs this rank computes
        self.hook_pairs += chosen.size
        self.hook_computed += pos.size
        if pos.size == 0:
            return mx.zeros((*lead, k, D), dtype=x.dtype)
        # each own pair as one token choosing one expert: the inner module's own gather matmuls over M pairs
        y = self.inner(x.reshape(-1, D)[mx.array(pos // k)], mx.array(self.hook_rows[chosen[pos]])[:, None])
        out = mx.zeros((chosen.size, y.shape[-1]), dtype=y.dtype)
        out[mx.array(pos)] = y.reshape(pos.size, -1)
        return out.reshape(*lead, k, -1)


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
    """{"calls", "bytes"} summed by the expert-parallel all_sums so far; {"pairs", "computed"}: (token, choice)
    pairs the routers chose and those this rank's experts computed (about pairs / ranks)."""
    calls = nbytes = pairs = computed = 0
    for _, m in model.named_modules():
        if isinstance(m, PartialSum):
            calls += m.hook_calls
            nbytes += m.hook_bytes
        elif isinstance(m, OwnedExperts):
            pairs += m.hook_pairs
            computed += m.hook_computed
    return {"calls": calls, "bytes": nbytes, "pairs": pairs, "computed": computed}


def _module(root, path: str):
    node = root
    for p in path.split("."):
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node
