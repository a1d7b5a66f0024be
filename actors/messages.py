"""THE protocol: every message the actors exchange, as frozen, tagged msgspec Structs.

No MLX arrays travel in a message: token ids, text, slot/expert ids, session ids and cache handles do. The tag
(``"type"`` field) makes every message self-describing, so a ``Union`` of them decodes by tag if it ever crosses
a process boundary (``msgspec.msgpack.encode`` / ``decode(..., type=DecoderMessage)``).
"""

from __future__ import annotations

import msgspec


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0  # always set: the Runtime draws one when the caller gives none, so replays are exact
    stop: tuple[str, ...] = ()  # stop strings: output ends before the first occurrence
    stop_token_ids: tuple[int, ...] = ()  # in addition to the tokenizer's eos ids
    specdec: str | None = None  # speculative decoding mode (native_v7 / prompt_lookup); None = batched target-only
    specdec_policy: str | None = None  # block policy override (fixed / opencode-sampled-v1 / residency-aware)
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one (after temperature)
    presence_penalty: float = 0.0  # OpenAI penalties over the generated tokens, on the raw logits
    frequency_penalty: float = 0.0
    logprobs: bool = False  # report each token's log-probability (the model's own distribution)
    top_logprobs: int = 0  # ... and the k most likely alternatives at each position
    grammar: str | None = None  # an llguidance grammar (engine/constraints.py) every token must follow

    @property
    def host_bound(self) -> bool:
        """The next token's logits need this request's newest token on the host (penalties, a grammar)."""
        return self.grammar is not None or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def target_only(self) -> bool:
        """Uses what only the target-only batch implements (speculative lanes route such requests there)."""
        return self.host_bound or self.min_p > 0 or self.logprobs


# --- Runtime/Supervisor → Decoder ---------------------------------------------------------------------


class Submit(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    resume_ids: tuple[int, ...] = ()  # tokens already delivered (re-admission after a Decoder restart)
    resume_chars: int | None = None  # how much of their text was delivered (None: all; less: a held-back stop prefix)
    session_id: str | None = None
    cache_handle: int | None = None  # KV handed over by the Cache actor (reused prefix)
    cached_tokens: int = 0  # how many leading prompt tokens that KV covers


class Abort(msgspec.Struct, frozen=True, tag=True):
    request_id: str


class Shutdown(msgspec.Struct, frozen=True, tag=True):
    pass


# --- Decoder → request output slots (through the Supervisor's ledger) ---------------------------------


class TokenOutput(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    index: int  # position of token_ids[0] in the request's completion
    token_ids: tuple[int, ...]
    text: str
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


# --- Decoder → Supervisor -----------------------------------------------------------------------------


class ActorCrashed(msgspec.Struct, frozen=True, tag=True):
    actor: str
    error: str


# --- ExpertStore actor ---------------------------------------------------------------------------------


class Prefetch(msgspec.Struct, frozen=True, tag=True):
    """Read these experts of this MoE layer (bank index) into staging ahead of need."""

    bank: int
    experts: tuple[int, ...]


class StepRouting(msgspec.Struct, frozen=True, tag=True):
    """The distinct experts one decode step used, per MoE layer (bank index order): predictor input."""

    experts: tuple[tuple[int, ...], ...]


# --- Cache actor ---------------------------------------------------------------------------------------


class CacheLookup(msgspec.Struct, frozen=True, tag=True):
    session_id: str
    prompt_ids: tuple[int, ...]


class CacheLookupReply(msgspec.Struct, frozen=True, tag=True):
    session_id: str
    handle: int | None  # KV handle to hand to the Decoder, None on a miss
    cached_tokens: int  # leading prompt tokens the KV covers


class CacheInsert(msgspec.Struct, frozen=True, tag=True):
    """The Decoder stored a finished request's KV under ``handle``; it covers ``token_ids``."""

    session_id: str
    handle: int
    token_ids: tuple[int, ...]


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


class RuntimeStats(msgspec.Struct, frozen=True, kw_only=True):
    decoder: DecoderStats
    experts: object  # mach_runtime ExpertStoreStats
    sessions: int
    live_requests: int
    decoder_restarts: int
    expert_store_restarts: int
    prefetch: dict[str, int]
    specdec: dict | None = None  # BlockSpecDecEngine.stats() when the runtime has speculative decoding
    specdec_batch: dict | None = None  # BatchedSpecDecoder.stats() when the runtime has a spec batch


DecoderMessage = Submit | Abort | Shutdown
OutputMessage = TokenOutput | Finish | RequestFailed
ExpertStoreMessage = Prefetch | StepRouting | StatsRequest
CacheMessage = CacheLookup | CacheInsert | CacheRelease | StatsRequest
