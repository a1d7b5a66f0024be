"""THE protocol: every message the actors exchange, as frozen, tagged msgspec Structs.

No MLX arrays travel in a message: token ids, text, slot/expert ids, session ids and cache handles do. The tag
(``"type"`` field) makes every message self-describing, so a ``Union`` of them decodes by tag if it ever crosses
a process boundary (``msgspec.msgpack.encode`` / ``decode(..., type=DecoderMessage)``).
"""

from __future__ import annotations

import msgspec

from mach_runtime.engine.params import SamplingParams  # THE request-parameter type (re-exported)


# --- Runtime/Supervisor → Decoder ---------------------------------------------------------------------


class Submit(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    resume_ids: tuple[int, ...] = ()  # tokens already delivered (re-admission after a Decoder restart)
    session_id: str | None = None
    cache_handle: int | None = None  # KV handed over by the Cache actor (reused prefix)
    cached_tokens: int = 0  # how many leading prompt tokens that KV covers
    warm: bool = False  # warm_prefix: prefill every prompt token, snapshot it (with the last logits), generate none


class Abort(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    reason: str = "abort"  # "stop": the ledger found a stop string (the request ends normally, its KV kept)


class Shutdown(msgspec.Struct, frozen=True, tag=True):
    pass


# --- Decoder → request output slots (through the Supervisor's ledger) ---------------------------------


class TokenOutput(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    index: int  # position of token_ids[0] in the request's completion
    token_ids: tuple[int, ...]  # ids only: the ledger detokenizes (engine.emit.Emitter)
    # per token, when the request asked for logprobs: (its logprob, ((top token id, logprob), ...))
    logprobs: tuple[tuple[float, tuple[tuple[int, float], ...]], ...] | None = None


class Finish(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    request_id: str
    reason: str  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV was reused instead of prefilled
    prefilled_tokens: int  # tokens actually run through prefill for this request


class RequestFailed(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    message: str
    error: str = "RequestError"  # the mach_runtime.errors class the caller gets (e.g. CheckpointError)

    def exception(self) -> Exception:
        """The exception to raise in the caller's task (by name: messages carry no objects)."""
        from mach_runtime import errors

        cls = getattr(errors, self.error, None)
        if not (isinstance(cls, type) and issubclass(cls, errors.MachError)):
            cls = errors.RequestError
        return cls(self.message)


# --- ExpertStore actor ---------------------------------------------------------------------------------


class StepRouting(msgspec.Struct, frozen=True, tag=True):
    """The distinct experts one decode step used, per MoE layer (bank index order): predictor input."""

    experts: tuple[tuple[int, ...], ...]


# --- Cache actor ---------------------------------------------------------------------------------------


class CacheLookup(msgspec.Struct, frozen=True, tag=True):
    """The longest cached prefix of ``prompt_ids`` (any request's; a session's own when sharing is off)."""

    session_id: str | None
    prompt_ids: tuple[int, ...]


class CacheLookupReply(msgspec.Struct, frozen=True, tag=True):
    session_id: str | None
    handle: int | None  # KVTable handle of a PrefixHit to hand to the Decoder, None on a miss
    cached_tokens: int  # leading prompt tokens it restores
    tier: str | None = None  # "l1" | "l2"


class CacheInsert(msgspec.Struct, frozen=True, tag=True):
    """The Decoder put a host KV snapshot (``kv_snapshot.Snapshot``) under ``handle``; it covers ``token_ids``
    (after a request's first token, at its end, or a warmed prefix). ``session_id``: the session that owns it."""

    session_id: str | None
    handle: int
    token_ids: tuple[int, ...]


class CacheFlush(msgspec.Struct, frozen=True, tag=True):
    """Shutdown: write every L1 snapshot not on disk yet and wait for the L2 writes."""


class CacheRelease(msgspec.Struct, frozen=True, tag=True):
    session_id: str


# --- stats ---------------------------------------------------------------------------------------------


class StatsRequest(msgspec.Struct, frozen=True, tag=True):
    pass


class DecoderStats(msgspec.Struct, frozen=True, kw_only=True):
    active: int  # requests in the running batch
    queued: int  # submitted, not yet admitted
    max_batch: int
    steps: int  # batched decode steps
    generated_tokens: int
    prefilled_tokens: int
    cached_tokens: int
    completed: int
    aborted: int
    batch_histogram: dict[int, int]  # batch size -> steps
    spec_cycles: int = 0  # speculative draft/verify cycles run for lone requests
    spec_requests: int = 0  # requests that ran (at least partly) speculatively
    spec_demoted: int = 0  # speculative requests moved out of the solo lane when others arrived
    spec_batch_cycles: int = 0  # draft/verify cycles of the spec batch (Runtime.open(spec_batch=N))
    spec_batch_moves: int = 0  # requests moved out of the spec batch or the target-only batch into the other
    spec_batch_histogram: dict[int, int] = msgspec.field(default_factory=dict)  # spec batch rows -> cycles
    batching: str = "continuous"  # or "one at a time: <why>" where the family's caches cannot merge
    prefill_chunks: int = 0  # prefill chunks run between decode steps
    failed: int = 0  # requests failed alone by a fault of their own
    isolated_retries: int = 0  # requests retried alone after a failure of a group with an unknown culprit


class RuntimeStats(msgspec.Struct, frozen=True, kw_only=True):
    decoder: DecoderStats
    experts: object  # mach_runtime ExpertStoreStats
    sessions: int
    live_requests: int
    decoder_restarts: int
    expert_store_restarts: int
    prefetch: dict[str, int]
    cache_restarts: int = 0
    restarts: dict[str, int] = msgspec.field(default_factory=dict)  # every actor's restarts, by actor name
    closed: bool = False  # the runtime has shut down (closed by its owner, or failed past its restart limit)
    specdec: dict | None = None  # BlockSpecDecEngine.stats() when the runtime has speculative decoding
    specdec_batch: dict | None = None  # BatchedSpecDecoder.stats() when the runtime has a spec batch
    prefix_cache: object = None  # PrefixCacheStats: lookups, per-tier hits / tokens restored / bytes / evictions


DecoderMessage = Submit | Abort | Shutdown


class StepOps(msgspec.Struct, frozen=True, tag=True):
    """Distributed runtime: what rank 0's Decoder took from its mailbox before step ``seq`` (Submits without KV
    handles, Aborts, a Shutdown), broadcast so every rank's scheduler takes the same step (actors/distributed.py)."""

    seq: int
    msgs: tuple[Submit | Abort | Shutdown, ...] = ()
OutputMessage = TokenOutput | Finish | RequestFailed
ExpertStoreMessage = StepRouting | StatsRequest
CacheMessage = CacheLookup | CacheInsert | CacheRelease | CacheFlush | StatsRequest
