"""mlx.distributed scale-out: one MoE over several processes / hosts (docs/distributed.md).

* ``plan.py``: which rank holds what (expert shares, pipeline layer ranges); no MLX.
* ``group.py``: the group mlx.launch started, the backend choice (ring / nccl / jaccl / mpi), the step exchange
  (one all_sum of host bytes) and the watchdog.
* ``expert_parallel.py``: the hooks that make a loaded model expert parallel (one all_sum per MoE layer).
* ``pipeline.py``: mlx-lm's pipeline split applied before the weights load.
* ``stop.py``: a stop at any rank (a signal, the launcher gone) routed to rank 0's clean shutdown.

The runtime side (rank 0 serves, ranks > 0 follow its steps) is ``actors/distributed.py``;
``Runtime.open(..., distributed=True)`` and ``mach-serve --distributed`` start it.
"""
