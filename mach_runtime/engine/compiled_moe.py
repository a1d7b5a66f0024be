"""Compiled MoE blocks for small forwards (decode steps, speculative verify blocks).

On a GPU, a decode step or a 16-token verify of an MoE model is bound by how many kernels the host can encode
and launch, not by arithmetic: MLX's CUDA backend builds a CUDA graph node per primitive (and commits every 20).
The routed-expert block is the busiest part of a layer (router matmul, softmax, top-k, gathers, the expert
matmuls, weighting, sum; plus the sort/unsort for >= 64 routed rows). ``mx.compile`` of that block fuses its
elementwise chains and replays the traced graph without Python (timings: docs/benchmarks.md, "Measurements the
code's design rests on"). The results equal the block's own on MLX CPU (the same primitives;
tests/test_compiled_moe.py).

``compile_moe_blocks(model)`` puts a ``CompiledMoeBlock`` hook (``hooks.py``) in place of every module that
directly holds a ``GatherSwitchGLU`` (stacked residency: all experts resident, so the block is a pure function of
its inputs and parameters): a call whose inputs are arrays with at most ``max_rows`` token rows runs through one
``mx.compile``d function per block (MLX traces it once per input shape); larger calls (prefill chunks) run the
original block. The block's parameters are the compiled function's implicit inputs, so weight updates stay visible.
Streaming residency (``DiskSwitchGLU`` reads routing on the host to fetch experts) is left alone. It applies to
the model object, so every engine that decodes with it benefits; ``hooks.remove_hooks(model, "compiled_moe")``
takes it off.
"""

from __future__ import annotations

import mlx.core as mx

from ..io.gather_switch_glu import GatherSwitchGLU
from .hooks import ModuleHook, install


class CompiledMoeBlock(ModuleHook):
    """A routed-expert block whose small calls run through ``mx.compile`` (``hook_fn``); the rest run it as is."""

    kind = "compiled_moe"

    def __init__(self, inner, max_rows: int = 64):
        super().__init__(inner)
        self.hook_max_rows = int(max_rows)
        self.hook_fn = mx.compile(lambda *a: inner(*a), inputs=inner)

    def __call__(self, *args, **kwargs):
        if (not kwargs and args and all(isinstance(a, mx.array) for a in args)
                and args[0].size // max(1, args[0].shape[-1]) <= self.hook_max_rows):
            return self.hook_fn(*args)
        return self.inner(*args, **kwargs)


def moe_blocks(model) -> list:
    """The modules of ``model`` that directly hold a ``GatherSwitchGLU`` (the routed MoE blocks, stacked); a
    compiled block is listed as its hook."""
    return [m for _, m in _moe_block_paths(model)]


def _moe_block_paths(model) -> list:
    return [(path, m) for path, m in model.named_modules()
            if any(isinstance(c, GatherSwitchGLU) for c in m.children().values())]


def compile_moe_blocks(model, max_rows: int = 64) -> int:
    """Installs ``CompiledMoeBlock`` on ``model``'s stacked MoE blocks (idempotent); returns how many it covers."""
    blocks = _moe_block_paths(model)
    for path, _ in blocks:
        install(model, path, CompiledMoeBlock, max_rows)
    return len(blocks)
