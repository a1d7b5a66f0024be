"""The server's settings (resolved once, by the CLI or by the embedding program)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerSettings:
    checkpoint: str | None = None  # None: the bundled demo model
    streaming: bool | None = None  # --streaming / --no-streaming (None: the environment's default residency)
    draft: str | None = None
    spec_batch: int | None = None  # with a draft: requests decoded speculatively together (None: max_batch; 0: off)
    host: str = "127.0.0.1"
    port: int = 8080
    expert_cache_gb: float | None = None
    max_batch: int = 8
    max_queue: int = 64  # requests waiting beyond the running batch before new ones get 429
    api_key: str | None = None
    served_model_name: str | None = None
    prefix_cache: bool | None = None  # --prefix-cache / --no-prefix-cache (None: the Runtime's default)
    disk_kv_dir: str | None = None
    disk_kv_budget_gb: float | None = None
    max_request_bytes: int = 4 * 2**20
    max_stop_sequences: int = 4
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish on SIGTERM
    retry_after_s: int = 1
    open_kwargs: dict = field(default_factory=dict)  # extra Runtime.open arguments (embedding, tests)

    @property
    def spec_batch_size(self) -> int:
        """The Runtime's ``spec_batch``: 0 without a draft."""
        if self.draft is None:
            return 0
        n = self.max_batch if self.spec_batch is None else self.spec_batch
        return n if n >= 2 else 0

    @property
    def residency(self) -> str | None:
        return None if self.streaming is None else ("streaming" if self.streaming else "stacked")

    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.checkpoint:
            return str(self.checkpoint).rstrip("/").rsplit("/", 1)[-1]
        from mach_runtime.assets import DEMO_MODEL

        return DEMO_MODEL

    def public(self) -> dict:
        """What /v1/capabilities reports about this server (never the API key)."""
        return {
            "model": self.model_name(), "streaming": self.streaming, "draft": self.draft is not None,
            "spec_batch": self.spec_batch_size,
            "expert_cache_gb": self.expert_cache_gb, "max_batch": self.max_batch, "max_queue": self.max_queue,
            "auth": self.api_key is not None, "prefix_cache": self.prefix_cache,
            "disk_kv_budget_gb": self.disk_kv_budget_gb, "max_request_bytes": self.max_request_bytes,
        }
