"""A distributed runtime: rank 0 runs the Runtime (actors, API, server); every other rank runs a follower Decoder
that takes exactly the steps rank 0's Decoder takes (docs/distributed.md).

Each Decoder iteration on rank 0 drains its mailbox as usual, then ``StepSync.take`` broadcasts what it took
(``messages.StepOps``: Submits, Aborts, a Shutdown) to every rank through ``distributed.group.exchange`` (one
all_sum of a small uint8 buffer), and every rank's scheduler takes the same step with the same requests. The
forwards then meet in their collectives (expert parallel: one all_sum per MoE layer; pipeline parallel: send /
recv / all_gather). Nothing else crosses: scheduling is deterministic given the same inputs and the same logits
(every rank computes identical logits; sampling is seeded per request), so the lanes, prefill chunks,
speculative cycles and finishes coincide. The exchange also carries each rank's status back to rank 0: a digest
of its scheduler state (live requests, step counters), which fails the runtime with ``DistributedError`` the
step a follower diverges, and a stop request (a follower signalled, or its launcher gone:
``mach_runtime/distributed/stop.py``), on which rank 0 shuts the group down as if signalled itself.

What a distributed runtime leaves out, so every rank stays in step: the prefix cache (KV that only rank 0 holds:
Submits lose their KV handle and prefill in full; sessions still work, re-prefilling their history),
``warm_prefix``, logits processors (Python callables cannot cross processes), time- or byte-driven block
policies ("residency-aware", "throughput": a rank's own timings and reads would pick different blocks), the
optimistic streaming forward (a rank that missed would redo a forward alone: streaming runs its synchronous path),
and actor restarts (a crashed Decoder cannot rejoin its peers mid-collective: the runtime fails instead).

Liveness: rank 0 sends an empty step (a heartbeat) after ``heartbeat`` idle seconds; every rank guards its steps
and exchanges with the ``Watchdog``. A collective that fails (a killed peer closes its sockets) or outlasts the
timeout fails every request in flight with ``DistributedError``; a follower that loses rank 0 exits.
"""

from __future__ import annotations

import hashlib
import queue
import sys
from contextlib import nullcontext

import msgspec

from mach_runtime.distributed import stop
from mach_runtime.errors import DistributedError

from .messages import Abort, RequestFailed, Shutdown, StepOps, Submit

DETERMINISTIC_POLICIES = ("fixed", "opencode-sampled-v1")


DIGEST = 16  # status bytes 0..15: the state digest; byte 16: this rank asks the group to stop (distributed/stop.py)


def state_digest(sched) -> bytes:
    """16 bytes that differ when two ranks' schedulers hold different requests or have taken different steps."""
    if sched is None:
        return bytes(DIGEST)
    ids = sorted(sched.live) + [r.request_id for r in sched.pending]
    if sched.solo is not None:
        ids.append("solo:" + sched.solo.req.request_id)
    c = sched.counters
    text = "|".join(ids) + f"#{c['steps']},{c['spec_cycles']},{c['spec_batch_cycles']},{c['generated']},{c['completed']}"
    return hashlib.blake2b(text.encode(), digest_size=DIGEST).digest()


class StepSync:
    """One per process: rank 0 leads (broadcasts its Decoder's inputs), ranks > 0 follow."""

    def __init__(self, group, config):
        from mach_runtime.distributed.group import Watchdog

        self.group = group
        self.config = config
        self.seq = 0
        self.on_lost = None  # rank 0: callable(DistributedError) failing the requests in flight (the Supervisor)
        self.on_peer_stop = stop.stop_leader  # rank 0: callable(why), a follower asked the group to stop
        self._peer_stop_seen = False
        self.lost: DistributedError | None = None
        self.watchdog = Watchdog(config.timeout, self._timed_out)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(StepOps)

    @property
    def leader(self) -> bool:
        return self.group.rank == 0

    def guard(self, what: str, timeout: float | None = None):
        return self.watchdog.guard(what, timeout) if self.group.size > 1 else nullcontext()

    def close(self) -> None:
        self.watchdog.stop()

    # -- the Decoder's inbox ---------------------------------------------------------------------------
    def take(self, decoder, block: bool) -> list:
        """The messages the Decoder applies before its next step, the same on every rank."""
        payload = None
        if self.leader:
            payload = self._encoder.encode(StepOps(self.seq, tuple(self._admissible(decoder, self._drain(decoder,
                                                                                                      block)))))
        # a follower waits for rank 0's next step: at most a step + a heartbeat. The first exchange waits for every
        # rank to finish loading (a rank that dies meanwhile closes its sockets, which fails it at once)
        limit = 1e9 if self.seq == 0 else None if self.leader else self.config.timeout + self.config.heartbeat
        mine = state_digest(decoder.sched)
        try:
            with self.guard("step exchange", limit):
                data, statuses = self._exchange(payload, mine + bytes([stop.requested()]))
        except DistributedError:
            raise
        except Exception as e:
            raise self._lose("the step exchange failed", f"{type(e).__name__}: {e}") from None
        if self.leader:
            for r, st in enumerate(statuses[1:], start=1):
                if st[:DIGEST] != mine:
                    raise self._lose(f"rank {r} diverged from rank 0 before step {self.seq}",
                                     "its scheduler holds other requests or took other steps",
                                     "Every rank must run the same mach_runtime, MLX and checkpoint files; restart "
                                     "every rank (mlx.launch)")
                if st[DIGEST] and not self._peer_stop_seen:  # a follower was signalled / lost its launcher
                    self._peer_stop_seen = True
                    self.on_peer_stop(f"rank {r} asked the group to stop (a signal, or its launcher is gone)")
        ops = self._decoder.decode(data)
        if ops.seq != self.seq:
            raise self._lose("out of step", f"rank 0 sent step {ops.seq}, this rank expected {self.seq}")
        self.seq += 1
        return list(ops.msgs)

    def _exchange(self, payload, status):
        from mach_runtime.distributed.group import exchange

        if self.group.size == 1:
            return payload, [status]
        return exchange(self.group, payload, status)

    def _drain(self, decoder, block: bool) -> list:
        msgs = []
        if block:  # idle: wait for work, but send a heartbeat every `heartbeat` seconds
            try:
                msgs.append(decoder.mailbox.get(timeout=self.config.heartbeat))
            except queue.Empty:
                return msgs
        while True:
            try:
                msgs.append(decoder.mailbox.get_nowait())
            except queue.Empty:
                return msgs

    def _admissible(self, decoder, msgs) -> list:
        """Rank 0: what may be broadcast; a request a distributed runtime cannot run fails alone here."""
        out = []
        for m in msgs:
            if isinstance(m, Submit):
                why = self._refused(m)
                if m.cache_handle is not None:  # KV only rank 0 holds: every rank prefills instead
                    decoder.kv_table.drop(m.cache_handle)
                    m = msgspec.structs.replace(m, cache_handle=None, cached_tokens=0)
                if why is not None:
                    decoder._outbox.append(RequestFailed(m.request_id, why, "ConfigError"))
                    continue
            out.append(m)
        return out

    @staticmethod
    def _refused(m: Submit) -> str | None:
        p = m.params
        if m.warm:
            return "warm_prefix is not available in a distributed runtime (it has no prefix cache)"
        if p.processors:
            return ("logits processors are Python callables of this process: a distributed runtime cannot run them "
                    "on every rank; use grammar= or the sampling parameters")
        if p.specdec_policy is not None and p.specdec_policy not in DETERMINISTIC_POLICIES:
            return (f"specdec_policy {p.specdec_policy!r} decides from this rank's own timings or reads, so the ranks "
                    f"would verify different blocks; a distributed runtime takes {' or '.join(DETERMINISTIC_POLICIES)}")
        return None

    # -- losing the group --------------------------------------------------------------------------------
    def _lose(self, what: str, cause, fix: str | None = None) -> DistributedError:
        from mach_runtime.distributed.group import lost_error

        err = lost_error(self.group, what, cause, *([fix] if fix else []))
        if self.lost is None:
            self.lost = err
            if self.on_lost is not None:
                self.on_lost(err)
        return self.lost

    def _timed_out(self, what: str, seconds: float) -> None:
        err = self._lose(f"{what} has not finished after {seconds:.1f}s (timeout {self.config.timeout:g}s)",
                         "no answer from a peer")
        if not self.leader:  # the MLX thread is stuck in a collective: nothing left to serve
            stop.say(f"[mach] distributed rank {self.group.rank}: {err}")
            import os

            os._exit(3)

    def step_error(self, e: BaseException) -> DistributedError | None:
        """The group-loss error for an exception a step raised, if a collective failed (else None)."""
        from mach_runtime.distributed.group import collective_failure

        if self.lost is not None:
            return self.lost
        if collective_failure(e):
            return self._lose("a collective of the step failed", f"{type(e).__name__}: {e}")
        return None


def unlink_next_layer_prefetch(model, store) -> None:
    """Expert parallel, streaming: next-layer prefetch off (``MACH_PREFETCH_MB``). Its predictions come from the
    replicated next router, so they name other ranks' experts too, which this rank must never read."""
    from mach_runtime.io.disk_switch_glu import DiskSwitchGLU

    for _, m in model.named_modules():
        if isinstance(m, DiskSwitchGLU):
            object.__setattr__(m, "next_layer", None)
    store.next_layer = None
    stop.say("[mach] distributed: next-layer prefetch is off in expert parallel (it would read other ranks' experts)")


def run_follower(model, tokenizer, *, caps, max_batch: int, spec, spec_batch, prefill_chunk, sync: StepSync) -> None:
    """A rank > 0: a Decoder fed by rank 0's steps, outputs dropped, until rank 0 shuts down (MLX thread)."""
    from .cache import KVTable
    from .decoder import Decoder

    d = Decoder(model, tokenizer, max_batch=max_batch, sink=lambda msgs: None, kv_table=KVTable(), caps=caps,
                spec=spec, spec_batch=spec_batch, prefill_chunk=prefill_chunk, step_sync=sync)
    try:
        d.run()
    finally:
        d.release()
    stop.say(f"[mach] distributed rank {sync.group.rank}: rank 0 shut the group down; this rank ends")


__all__ = ["StepSync", "run_follower", "state_digest", "Abort", "Shutdown"]


class Distributed:
    """``Runtime.open(distributed=...)``'s setup on this rank: the group, the shard plan, the step sync."""

    def __init__(self, settings, checkpoint):
        """On the MLX thread. ``settings``: True (every setting from MACH_DIST_* / defaults) or a dict of
        ``backend``, ``mode``, ``timeout``, ``heartbeat``, ``placement``."""
        import os

        from mach_runtime.config import resolve_distributed_config
        from mach_runtime.distributed import group as dgroup
        from mach_runtime.distributed.plan import ShardPlan
        from mach_runtime.errors import ConfigError
        from mach_runtime.io.arch_registry import adapter_for_config, read_config
        from mach_runtime.io.expert_layout import find_expert_layout
        from mach_runtime.io.safetensors_index import CheckpointIndex

        if settings is True:
            settings = {}
        if not isinstance(settings, dict):
            raise ConfigError(f"distributed must be True/False or a dict of backend, mode, timeout, heartbeat, "
                              f"placement; got {settings!r}")
        unknown = sorted(set(settings) - {"backend", "mode", "timeout", "heartbeat", "placement"})
        if unknown:
            raise ConfigError(f"distributed: unknown setting(s) {unknown}; known: backend, mode, timeout, heartbeat, "
                              "placement")
        self.config = resolve_distributed_config(**settings)
        self.group = dgroup.init(self.config.backend)
        directory = os.fspath(checkpoint)
        config = read_config(directory)
        self.adapter = adapter_for_config(config)
        tc = self.adapter.text_config(config)
        index = CheckpointIndex(directory)
        tc = self.adapter.resolve_config(tc, index.__contains__)
        layout = find_expert_layout(index, self.adapter, tc, os.path.join(directory, "config.json"))
        self.plan = ShardPlan.build(self.config.mode, self.group.rank, self.group.size, int(tc["num_hidden_layers"]),
                                    [src.layer for src in layout.layers], layout.num_experts, self.config.placement)
        self.sync = StepSync(self.group, self.config)
        print(f"[mach] distributed ({self.group.backend}): {self.plan.describe()}", file=sys.stderr, flush=True)
        # the launcher gone: rank 0 shuts the group down, a follower asks it to (distributed/stop.py)
        stop.watch_launcher(stop.stop_leader if self.leader else stop.request)

    def follow_signals(self) -> bool:
        """A follower's SIGTERM / SIGINT ask rank 0 to shut the group down (call on the main thread)."""
        return not self.leader and stop.follow_signals(self.group.rank)

    @property
    def leader(self) -> bool:
        return self.group.rank == 0

    def after_load(self, model, store, specdec, draft):
        """Expert parallel: the hooks; streaming: the synchronous forward (MLX thread). Returns the speculative
        config to use (``specdec``)."""
        if self.plan.expert_parallel:
            from mach_runtime.distributed.expert_parallel import install_expert_parallel

            install_expert_parallel(model, self.adapter, self.plan, self.group.mx_group,
                                    streaming=hasattr(store, "optimistic"))
            if getattr(store, "next_layer", None) is not None:  # it would read the next layer's foreign experts
                unlink_next_layer_prefetch(model, store)
        if hasattr(store, "optimistic") and self.group.size > 1:
            store.optimistic.enabled = False  # a rank that missed would redo a forward alone
        return self.specdec(specdec, draft)

    def specdec(self, specdec, draft):
        """The speculative config every rank can follow in step (or a ConfigError)."""
        import dataclasses

        from mach_runtime.engine.specdec import BlockSpecDecEngineConfig, BlockSpecDecEngineMode
        from mach_runtime.errors import ConfigError

        if draft is None and specdec is None:
            return None
        if self.plan.pipeline:
            raise ConfigError("speculative decoding is not available with pipeline parallel (the draft reads hidden "
                              "states of layers other ranks hold): use mode='expert' or no draft")
        cfg = specdec or BlockSpecDecEngineConfig(mode=BlockSpecDecEngineMode.NATIVE_V7)
        if cfg.policy not in DETERMINISTIC_POLICIES:
            raise ConfigError(f"specdec policy {cfg.policy!r} decides from this rank's own timings or reads; a "
                              f"distributed runtime takes {' or '.join(DETERMINISTIC_POLICIES)}")
        # collectives stay outside mx.compile'd graphs: the MoE blocks hold the expert-parallel all_sum
        return dataclasses.replace(cfg, compile_moe=False, compile_verify=False)

    def close(self) -> None:
        self.sync.close()
