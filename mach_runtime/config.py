"""Configuration, read in one place: explicit argument → environment variable → default.

Nothing else in the project reads ``os.environ``; callers ask this module.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .errors import ConfigError

RESIDENCIES = ("stacked", "streaming")
EVICTION_POLICIES = ("lru", "lrfu")

# name -> (environment variable, default)
_ENV = {
    "expert_residency": ("MACH_EXPERT_RESIDENCY", "stacked"),
    "expert_cache_gb": ("MACH_EXPERT_CACHE_GB", None),
    "eviction_policy": ("MACH_EVICTION_POLICY", "lrfu"),
    "lrfu_lambda": ("MACH_LRFU_LAMBDA", 0.02),  # LRFU decay per bank step (io/eviction.py); half-life 1/lambda
    "io_threads": ("MACH_IO_THREADS", 4),
    "direct_io": ("MACH_DIRECT_IO", False),
    "prefetch_mb": ("MACH_PREFETCH_MB", 0.0),  # next-layer prefetch budget (MB); 0: off
    "in_place_writes": ("MACH_IN_PLACE_WRITES", "auto"),  # streaming slot writes by numpy (io/slot_writes.py)
    "api_key": ("MACH_API_KEY", None),
    "prefix_cache": ("MACH_PREFIX_CACHE", True),
    "prefix_cache_gb": ("MACH_PREFIX_CACHE_GB", 2.0),
    "prefix_cache_max_entries": ("MACH_PREFIX_CACHE_MAX_ENTRIES", 64),
    "prefix_cache_dir": ("MACH_PREFIX_CACHE_DIR", None),
    "disk_kv_budget_gb": ("MACH_DISK_KV_BUDGET_GB", 20.0),
    "prefix_block_size": ("MACH_PREFIX_BLOCK_SIZE", 256),
    "dist_backend": ("MACH_DIST_BACKEND", "auto"),
    "dist_mode": ("MACH_DIST_MODE", "expert"),
    "dist_timeout": ("MACH_DIST_TIMEOUT", 30.0),
    "dist_heartbeat": ("MACH_DIST_HEARTBEAT", 1.0),
    "dist_placement": ("MACH_DIST_PLACEMENT", None),
    "import_torch": ("MACH_IMPORT_TORCH", False),  # let transformers import torch in our CLI processes
    "cpu_blas": ("MACH_CPU_BLAS", "auto"),
    "cpu_blas_threads": ("MACH_CPU_BLAS_THREADS", 1),
    "submit_layers": ("MACH_SUBMIT_LAYERS", False),  # decode forwards handed to the stream layer by layer
}

# Fraction of the routed-expert bytes the streaming bank gets when no budget is given.
DEFAULT_BANK_FRACTION = 0.25


def _raw(name: str, value):
    if value is not None:
        return value, "argument"
    env, default = _ENV[name]
    if env in os.environ and os.environ[env] != "":
        return os.environ[env], f"environment variable {env}"
    return default, "default"


def _as_bool(text, where: str) -> bool:
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{where}: expected a boolean (1/0/true/false), got {text!r}")


@dataclass(frozen=True)
class StoreConfig:
    """Resolved settings for the expert store of one loaded model."""

    expert_residency: str
    expert_cache_gb: float | None
    eviction_policy: str
    io_threads: int
    direct_io: bool


def resolve_store_config(
    expert_residency: str | None = None,
    expert_cache_gb: float | None = None,
    eviction_policy: str | None = None,
    io_threads: int | None = None,
    direct_io: bool | None = None,
) -> StoreConfig:
    """Resolve every store setting from arguments, then ``MACH_*`` env vars, then defaults."""
    residency, where = _raw("expert_residency", expert_residency)
    residency = str(residency).strip().lower()
    if residency not in RESIDENCIES:
        raise ConfigError(
            f"{where}: expert_residency must be one of {', '.join(RESIDENCIES)}, got {residency!r}"
        )

    gb, where = _raw("expert_cache_gb", expert_cache_gb)
    if gb is not None:
        try:
            gb = float(gb)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expert_cache_gb must be a number of GB, got {gb!r}") from None
        if not (gb > 0 and math.isfinite(gb)):
            raise ConfigError(f"{where}: expert_cache_gb must be > 0 and finite (GiB), got {gb!r}")

    policy, where = _raw("eviction_policy", eviction_policy)
    policy = str(policy).strip().lower()
    if policy not in EVICTION_POLICIES:
        raise ConfigError(
            f"{where}: eviction_policy must be one of {', '.join(EVICTION_POLICIES)}, got {policy!r}"
        )

    threads, where = _raw("io_threads", io_threads)
    try:
        threads = int(threads)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: io_threads must be an integer, got {threads!r}") from None
    if threads < 1:
        raise ConfigError(f"{where}: io_threads must be >= 1, got {threads}")

    direct, where = _raw("direct_io", direct_io)
    return StoreConfig(residency, gb, policy, threads, _as_bool(direct, where))


def resolve_lrfu_lambda(lrfu_lambda=None) -> float:
    """The LRFU policy's decay per bank step (``io/eviction.py``): argument, then ``MACH_LRFU_LAMBDA``, then 0.02
    (tuned on the first half of the trained routing trace, docs/benchmarks.md "Eviction policies")."""
    lam, where = _raw("lrfu_lambda", lrfu_lambda)
    lam = _number("lrfu_lambda", lam, float, 0.0, where)
    if not 0 < lam <= 1:
        raise ConfigError(f"{where}: lrfu_lambda must be in (0, 1] (1: LRU, near 0: LFU), got {lam!r}")
    return lam


def resolve_prefetch_bytes(prefetch_mb=None) -> int:
    """The next-layer prefetch budget in bytes (``io/next_layer_prefetch.py``): argument, then ``MACH_PREFETCH_MB``,
    then 0 (off: opt-in until it is measured on a realistic routing trace on an accelerator)."""
    mb, where = _raw("prefetch_mb", prefetch_mb)
    return int(_number("prefetch_mb", mb, float, 0.0, where) * 1e6)


def resolve_in_place_writes(in_place_writes=None) -> str:
    """How streaming slot writes reach the bank (``io/slot_writes.py``): argument, then ``MACH_IN_PLACE_WRITES``,
    then ``auto`` (in place wherever a probe finds the backend's arrays in host-writable memory: the CPU, MLX
    CUDA's managed memory, Apple's unified memory); ``on`` insists (an error where the probe fails), ``off`` keeps
    the MLX-op way."""
    mode, where = _raw("in_place_writes", in_place_writes)
    if str(mode).strip().lower() == "auto":
        return "auto"
    try:
        return "on" if _as_bool(mode, where) else "off"
    except ConfigError:
        raise ConfigError(f"{where}: in_place_writes must be auto, on or off, got {mode!r}") from None


@dataclass(frozen=True)
class PrefixCacheConfig:
    """Resolved prefix-cache settings (``Runtime.open``): L1 in RAM, L2 on disk when ``directory`` is set."""

    enabled: bool  # False: only a session's own turns are reused, nothing goes to disk
    l1_bytes: int
    max_entries: int
    directory: str | None
    disk_budget_bytes: int
    block_size: int


def _number(name: str, value, cast, minimum, where: str):
    try:
        v = cast(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not v >= minimum:
        raise ConfigError(f"{where}: {name} must be >= {minimum}, got {value!r}")
    return v


def resolve_prefix_config(prefix_cache=None, prefix_cache_gb=None, prefix_cache_dir=None, disk_kv_budget_gb=None,
                          prefix_block_size=None, prefix_cache_max_entries=None) -> PrefixCacheConfig:
    """Every prefix-cache setting from arguments, then ``MACH_*`` env vars, then defaults."""
    on, where = _raw("prefix_cache", prefix_cache)
    on = _as_bool(on, where)
    gb, where = _raw("prefix_cache_gb", prefix_cache_gb)
    gb = _number("prefix_cache_gb", gb, float, 0.0, where)
    entries, where = _raw("prefix_cache_max_entries", prefix_cache_max_entries)
    entries = _number("prefix_cache_max_entries", entries, int, 1, where)
    directory, where = _raw("prefix_cache_dir", prefix_cache_dir)
    if directory is not None:
        directory = os.path.expanduser(os.fspath(directory))
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ConfigError(f"{where}: prefix_cache_dir {directory!r} exists and is not a directory")
    disk_gb, where = _raw("disk_kv_budget_gb", disk_kv_budget_gb)
    disk_gb = _number("disk_kv_budget_gb", disk_gb, float, 0.0, where)
    block, where = _raw("prefix_block_size", prefix_block_size)
    block = _number("prefix_block_size", block, int, 1, where)
    if isinstance(prefix_block_size, float):
        raise ConfigError(f"{where}: prefix_block_size must be an integer, got {prefix_block_size!r}")
    return PrefixCacheConfig(on, int(gb * (1 << 30)), entries, directory if on else None,
                             int(disk_gb * (1 << 30)), block)



def resolve_api_key(api_key: str | None = None) -> str | None:
    """mach-serve's API key: ``--api-key``, else ``MACH_API_KEY``, else None (no authentication)."""
    key, _ = _raw("api_key", api_key)
    return key or None


def resolve_import_torch(import_torch: bool | None = None) -> bool:
    """Whether ``mach`` / ``mach-serve`` let transformers import torch (``MACH_IMPORT_TORCH``; default no: they use
    transformers for tokenizers and configs only, and torch would cost each start seconds: cli/startup.py)."""
    value, where = _raw("import_torch", import_torch)
    return _as_bool(value, where)


DIST_BACKENDS = ("auto", "ring", "nccl", "jaccl", "mpi")
DIST_MODES = ("expert", "pipeline")
# environment variables mlx.launch sets for each backend (mlx/_distributed_utils/launch.py): how "auto" finds out
# which backend the launcher prepared
_LAUNCH_MARKERS = (("NCCL_HOST_IP", "nccl"), ("MLX_JACCL_COORDINATOR", "jaccl"), ("MLX_MPI_LIBNAME", "mpi"),
                   ("MLX_HOSTFILE", "ring"))


@dataclass(frozen=True)
class DistributedConfig:
    """Resolved settings of a distributed runtime (``Runtime.open(distributed=True)``, ``mach-serve
    --distributed``; docs/distributed.md).

    backend: the mlx.distributed backend ("auto": the one mlx.launch prepared, see ``launched_backend``); mode:
    "expert" (each rank owns a share of every layer's experts) or "pipeline" (contiguous layer ranges); timeout:
    seconds a rank may go without completing a step before the group is declared lost; heartbeat: seconds
    between rank 0's idle heartbeats (followers expect one at least every heartbeat + timeout); placement: a
    ``mach trace`` file whose measured expert load places the experts (None: contiguous ranges)."""

    backend: str
    mode: str
    timeout: float
    heartbeat: float
    placement: str | None


def launched_backend() -> str | None:
    """The backend whose environment mlx.launch set up for this process, or None (not launched)."""
    for var, backend in _LAUNCH_MARKERS:
        if os.environ.get(var):
            return backend
    return None


def launched_rank() -> int | None:
    """This process's rank as mlx.launch numbered it (``MLX_RANK``), or None (not launched)."""
    r = os.environ.get("MLX_RANK")
    return int(r) if r and r.isdigit() else None


def resolve_distributed_config(backend=None, mode=None, timeout=None, heartbeat=None,
                               placement=None) -> DistributedConfig:
    """Every distributed setting from arguments, then ``MACH_DIST_*`` env vars, then defaults."""
    b, where = _raw("dist_backend", backend)
    b = str(b).strip().lower()
    if b not in DIST_BACKENDS:
        raise ConfigError(f"{where}: distributed backend must be one of {', '.join(DIST_BACKENDS)}, got {b!r}")
    m, where = _raw("dist_mode", mode)
    m = str(m).strip().lower()
    if m not in DIST_MODES:
        raise ConfigError(f"{where}: distributed mode must be one of {', '.join(DIST_MODES)} (expert parallel or "
                          f"pipeline parallel), got {m!r}")
    t, where = _raw("dist_timeout", timeout)
    t = _number("dist_timeout", t, float, 0.5, where)
    h, where = _raw("dist_heartbeat", heartbeat)
    h = _number("dist_heartbeat", h, float, 0.05, where)
    p, where = _raw("dist_placement", placement)
    if p is not None:
        p = os.path.expanduser(os.fspath(p))
        if not os.path.isfile(p):
            raise ConfigError(f"{where}: expert placement trace {p!r} does not exist; record one with `mach trace`")
    return DistributedConfig(b, m, float(t), float(h), p)


CPU_BLAS_MODES = ("auto", "openblas", "off")


@dataclass(frozen=True)
class CpuBlasConfig:
    """Which BLAS serves MLX's float32 CPU matmuls on Linux (``backend/cpu_blas.py``, docs/cpu_blas.md).

    mode: "auto" (OpenBLAS from scipy-openblas32 where MLX's wheel runs on netlib's reference BLAS, else leave it),
    "openblas" (the same, and an error when it cannot be done), "off" (MLX's own reference BLAS). threads:
    OpenBLAS threads per call (1 by default: on the 2-core machines measured, a second thread competed with MLX's
    own threads and lost; docs/benchmarks.md "CPU BLAS")."""

    mode: str
    threads: int


def resolve_cpu_blas_config(mode=None, threads=None) -> CpuBlasConfig:
    """The CPU BLAS settings from arguments, then ``MACH_CPU_BLAS`` / ``MACH_CPU_BLAS_THREADS``, then defaults."""
    m, where = _raw("cpu_blas", mode)
    m = str(m).strip().lower()
    if m in ("1", "true", "on", "yes"):
        m = "openblas"
    elif m in ("0", "false", "no", "none", "reference"):
        m = "off"
    if m not in CPU_BLAS_MODES:
        raise ConfigError(f"{where}: cpu_blas must be one of {', '.join(CPU_BLAS_MODES)}, got {m!r}")
    t, where = _raw("cpu_blas_threads", threads)
    if isinstance(t, float) and not t.is_integer():
        raise ConfigError(f"{where}: cpu_blas_threads must be an integer >= 1, got {t!r}")
    t = _number("cpu_blas_threads", t, int, 1, where)
    return CpuBlasConfig(m, int(t))


def resolve_submit_layers(submit_layers=None) -> bool:
    """Whether a batch decode forward is handed to the MLX stream layer by layer (``engine.batch.SubmittingCaches``):
    argument, then ``MACH_SUBMIT_LAYERS`` (1/0), then off."""
    v, where = _raw("submit_layers", submit_layers)
    return _as_bool(v, where)
