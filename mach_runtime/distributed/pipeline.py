"""Pipeline parallel through mlx-lm's own ``PipelineMixin``: contiguous decoder-layer ranges per rank.

mlx-lm's pipelined text models (qwen3_moe, qwen3_5 / qwen3_5_moe, deepseek_v3, ...) split their layers with
``model.pipeline(group)`` (rank 0 the last layers, rank N-1 the first), and their forward does the rest: each
rank receives the hidden state from the rank before it in the pipeline (``mx.distributed.recv_like``), runs its
layers, sends it on (``mx.distributed.send``), and an ``all_gather`` hands every rank the final hidden state, so
every rank computes the same logits. ``pipeline_model`` applies that split before the weights load, so a rank
never reads the layers it does not run (``load_moe(shard=...)`` skips their experts and weights); a rank's KV
caches cover its own layers only (``model.layers`` is the rank's range).

The pipeline runs one rank at a time per forward (no micro-batching), so it adds memory, not speed: it is for
models whose non-expert part does not fit on one machine.
"""

from __future__ import annotations

from ..errors import ConfigError


class _RankSize:
    """What ``PipelineMixin.pipeline`` reads of a group: ``rank()`` and ``size()``."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def pipelined_text_model(model):
    """The ``PipelineMixin`` module of ``model`` (its text model), or None."""
    from mlx_lm.models.pipeline import PipelineMixin

    found = [m for _, m in model.named_modules() if isinstance(m, PipelineMixin)]
    return found[0] if len(found) == 1 else None


def pipeline_model(model, plan, family: str) -> None:
    """Splits ``model``'s decoder layers as ``plan`` says (before its weights are loaded)."""
    text = pipelined_text_model(model)
    if text is None:
        raise ConfigError(f"pipeline parallel needs an mlx-lm model with pipeline support; {family}'s has none "
                          "(use mode='expert')")
    start, end = plan.layers
    text.pipeline(_RankSize(plan.rank, plan.size))
    if (text.start_idx, text.end_idx) != (start, end):  # pragma: no cover - mlx-lm changed its split rule
        raise ConfigError(f"mlx-lm split the layers as [{text.start_idx}, {text.end_idx}) on rank {plan.rank}, the "
                          f"plan expected [{start}, {end}): mlx-lm's pipeline rule changed")
