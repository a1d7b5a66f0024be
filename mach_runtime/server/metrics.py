"""Prometheus metrics (prometheus-client), one registry per app.

Request-side series are updated as requests run (TTFT and inter-token latency histograms, token counters,
requests by endpoint and status, 429 rejections, requests in flight); runtime-side gauges (queue depth, active
batch, expert bank hit rate, bytes read, prefix-cache hits, restarts) are refreshed from ``Runtime.stats()``
at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the /metrics route)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mach_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.rejected = Counter("mach_rejected_requests", "requests answered 429 (admission queue full)", registry=r)
        self.ttft = Histogram("mach_time_to_first_token_seconds", "time from request to first token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("mach_inter_token_latency_seconds", "time between consecutive tokens of a request",
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        self.prompt_tokens = Counter("mach_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("mach_generation_tokens", "tokens generated", registry=r)
        self.cached_tokens = Counter("mach_prefix_cache_hit_tokens", "prompt tokens served from the prefix cache",
                                     registry=r)
        self.in_flight = Gauge("mach_requests_in_flight", "requests admitted by the server", registry=r)
        self.queue_depth = Gauge("mach_queue_depth", "requests submitted, not yet in the batch", registry=r)
        self.active = Gauge("mach_batch_active", "requests in the running batch", registry=r)
        self.hit_rate = Gauge("mach_expert_bank_hit_rate", "expert bank hits / lookups", registry=r)
        self.bytes_read = Gauge("mach_expert_bytes_read", "bytes of experts read from disk (cumulative)", registry=r)
        self.restarts = Gauge("mach_decoder_restarts", "Decoder actor restarts", registry=r)

    def record_usage(self, usage: dict) -> None:
        self.prompt_tokens.inc(usage.get("prompt_tokens", 0))
        self.generation_tokens.inc(usage.get("completion_tokens", 0))
        self.cached_tokens.inc(usage.get("cached_tokens", 0))

    def refresh(self, stats) -> None:
        d, e = stats.decoder, stats.experts
        self.queue_depth.set(d.queued)
        self.active.set(d.active)
        self.hit_rate.set(getattr(e, "hit_rate", 1.0))
        self.bytes_read.set(getattr(e, "bytes_read", 0))
        self.restarts.set(stats.decoder_restarts)

    def render(self) -> bytes:
        return generate_latest(self.registry)
