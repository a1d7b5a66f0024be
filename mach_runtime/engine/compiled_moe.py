"""Compiled MoE blocks for small forwards (decode steps, speculative verify blocks).

On a GPU, a decode step or a 16-token verify of an MoE model is bound by how many kernels the host can encode
and launch, not by arithmetic: MLX's CUDA backend builds a CUDA graph node per primitive (and commits every 20).
The routed-expert block is the busiest part of a layer (router matmul, softmax, top-k, gathers, the expert
matmuls, weighting, sum; plus the sort/unsort for >= 64 routed rows). ``mx.compile`` of that block fuses its
elementwise chains and replays the traced graph without Python (timings: docs/benchmarks.md, "Measurements the
code's design rests on"). The results equal the block's own on MLX CPU (the same primitives;
tests/test_compiled_moe.py).

``compile_moe_blocks(model)`` puts a ``CompiledMoeBlock`` hook (``hooks.py``) in place of every module that
directly holds a ``GatherSwitchGLU`` or a ``DiskSwitchGLU``: a call whose inputs are arrays with at most ``max_rows``
token rows runs through one ``mx.compile``d function per block (MLX traces it once per input shape); larger calls
(prefill chunks) run the original block. The block's parameters are the compiled function's implicit inputs, so
weight updates stay visible.

* **Stacked** residency (all experts resident): the block is a pure function of its inputs and parameters.
* **Streaming** residency, optimistic forwards (``io/optimistic.py``): the hit path as one compiled function. The
  bank's device slot table (``DiskSwitchGLU.slot_of``) and slot arrays are implicit inputs, so the gather indices of
  resident experts are computed on the device and a table updated after a load is seen by the next call; the
  function returns the block's output *and its routing* (``DiskSwitchGLU`` hands the traced indices out through a
  sink), and the hook records that routing for the forward's one check. Sync-mode calls (the per-layer host
  readback that loads misses) run the original block.

It applies to the model object, so every engine that decodes with it benefits; ``hooks.remove_hooks(model,
"compiled_moe")`` takes it off.
"""

from __future__ import annotations

import mlx.core as mx

from ..io.disk_switch_glu import DiskSwitchGLU
from ..io.gather_switch_glu import GatherSwitchGLU
from .hooks import ModuleHook, install


class CompiledMoeBlock(ModuleHook):
    """A routed-expert block whose small calls run through ``mx.compile`` (``hook_fn``); the rest run it as is."""

    kind = "compiled_moe"

    def __init__(self, inner, max_rows: int = 64):
        super().__init__(inner)
        self.hook_max_rows = int(max_rows)
        glu = next((c for c in inner.children().values() if isinstance(c, DiskSwitchGLU)), None)
        self.hook_glu = glu
        if glu is None:
            self.hook_fn = mx.compile(lambda *a: inner(*a), inputs=inner)
        else:
            self.hook_fn = mx.compile(lambda *a: _traced_streaming(inner, glu, a), inputs=inner)

    def __call__(self, *args, **kwargs):
        if (not kwargs and args and all(isinstance(a, mx.array) for a in args)
                and args[0].size // max(1, args[0].shape[-1]) <= self.hook_max_rows):
            glu = self.hook_glu
            if glu is None:
                return self.hook_fn(*args)
            runner = glu._store.optimistic
            if runner.recording is not None:  # an optimistic forward: compiled, routing recorded for its check
                y, indices = self.hook_fn(*args)
                runner.record(glu._bank, indices)
                if glu._store.in_place_writes:  # slot writes in place wait for it (io/slot_writes.py)
                    glu._bank.add_fence(y)
                return y
        return self.inner(*args, **kwargs)


def _traced_streaming(inner, glu, args):
    """The streaming block's body under ``mx.compile``: (output, routing indices of its one DiskSwitchGLU call)."""
    sink: list = []
    object.__setattr__(glu, "_sink", sink)  # a plain attribute, not part of the module tree
    try:
        y = inner(*args)
    finally:
        object.__setattr__(glu, "_sink", None)
    if len(sink) != 1:
        raise RuntimeError(f"a compiled streaming MoE block called its experts {len(sink)} times (expected once)")
    return y, sink[0]


def moe_blocks(model) -> list:
    """The modules of ``model`` that directly hold a ``GatherSwitchGLU`` or ``DiskSwitchGLU`` (the routed MoE
    blocks); a compiled block is listed as its hook."""
    return [m for _, m in _moe_block_paths(model)]


def _moe_block_paths(model) -> list:
    return [(path, m) for path, m in model.named_modules()
            if any(isinstance(c, (GatherSwitchGLU, DiskSwitchGLU)) for c in m.children().values())]


def compile_moe_blocks(model, max_rows: int = 64) -> int:
    """Installs ``CompiledMoeBlock`` on ``model``'s MoE blocks (idempotent); returns how many it covers."""
    blocks = _moe_block_paths(model)
    for path, _ in blocks:
        install(model, path, CompiledMoeBlock, max_rows)
    return len(blocks)
