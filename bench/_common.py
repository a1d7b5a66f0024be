"""Shared helpers for the bench/p*.py benchmarks (not a benchmark itself).

Every script runs with ``bench/`` first on ``sys.path`` (``python bench/pN_*.py``), so ``import _common`` and
``import diskbw`` work without ``bench`` being a package. Nothing here needs tqdm (the GPU machine lacks it).
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
import importlib.util  # noqa: E402

if importlib.util.find_spec("mach_runtime") is None:  # no install and no PYTHONPATH entry: use this checkout
    sys.path.insert(1, str(REPO))

RANDOM_ROUTING_NOTE = (
    "NOTE: random (untrained) checkpoints. Uniform random routing caps the hit rate at ~ bank slots / experts, "
    "so with uniform routing hit rates are a FLOOR; trained routers have strong locality (Qwen3-30B-A3B, "
    "published: 45% of a layer's experts repeat at the next token, 80% within 8 tokens; LRU over 40% of "
    "experts -> 90-95% hits). Random WEIGHTS do not guarantee uniform routing, though: the locality measured on "
    "the checkpoint is printed (repeat@1, cover@8 vs uniform) - only --routing uniform is a guaranteed floor."
)


def default_ckpt_root() -> Path:
    return Path(os.environ.get("MACH_BENCH_CKPTS", "/tmp/mach_bench_ckpts"))


def machine_info() -> dict:
    """Backend, device name, CPU, versions: goes into every JSON so numbers are never separated from where."""
    import mlx.core as mx
    import mlx_lm

    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "default_device": str(mx.default_device()),
        "backend": "gpu" if mx.default_device() == mx.gpu else "cpu",
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_total_gib": round(_meminfo().get("MemTotal", 0) / (1 << 20), 1),
    }
    info.update(mach_runtime_source())
    if info["backend"] == "gpu":
        try:
            info["gpu"] = mx.device_info().get("device_name", "?")
        except Exception:  # pragma: no cover - older MLX
            info["gpu"] = "?"
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = out.stdout.strip()
        except Exception as e:  # pragma: no cover
            info["nvidia_smi"] = f"unavailable ({e})"
    return info


def mach_runtime_source() -> dict:
    """Which mach_runtime is measured: its directory and a hash of its .py files (the checkout may be dirty,
    and the GPU machine's copy has no .git)."""
    import hashlib

    import mach_runtime

    root = Path(mach_runtime.__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return {"mach_runtime_dir": str(root), "mach_runtime_sha256": h.hexdigest()[:16]}


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _meminfo() -> dict:
    out = {}
    try:
        for line in open("/proc/meminfo"):
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0])  # kB
    except OSError:
        pass
    return out


def mem_available_gib() -> float:
    return _meminfo().get("MemAvailable", 0) / (1 << 20)


def is_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.gpu


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def freeze_gc() -> None:
    """Collects, then moves every object alive now (model parameters, tokenizer, ...) out of the collector's
    reach, as ``Runtime.open`` does: long-lived objects no longer lengthen the collections decode triggers."""
    gc.collect()
    gc.freeze()


def free_mlx():
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def drop_caches(paths) -> dict:
    """Evicts the given files from the page cache and, as root, drops every clean page (echo 3 > drop_caches).

    diskbw.drop_page_cache does fsync + POSIX_FADV_DONTNEED on one file and the global drop; the other files
    get the fadvise only (the global drop covers them anyway where it works). Returns drop_page_cache's report.
    """
    from diskbw import drop_page_cache

    paths = [str(p) for p in paths]
    for p in paths[1:]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (AttributeError, OSError):
            pass
        finally:
            os.close(fd)
    return drop_page_cache(paths[0]) if paths else {}


def safetensors_files(ckpt) -> list[str]:
    """The checkpoint's weight files: its safetensors shards and, after ``mach convert``, the expert sidecar."""
    return sorted(str(p) for p in [*Path(ckpt).glob("*.safetensors"), *Path(ckpt).glob("experts.mach")])


def ensure_tiny_checkpoint(root: Path, name: str, **kwargs) -> Path:
    """make_tiny_checkpoint into root/name, reused when the same arguments made it before."""
    from mach_runtime.testing.tiny import make_tiny_checkpoint

    out = root / name
    marker = out / "bench_params.json"
    want = json.dumps(kwargs, sort_keys=True, default=str)
    if marker.exists() and marker.read_text() == want and safetensors_files(out):
        return out
    t0 = time.perf_counter()
    print(f"[bench] making checkpoint {out} {kwargs}", flush=True)
    make_tiny_checkpoint(out, **kwargs)
    free_mlx()
    marker.write_text(want)
    size = sum(os.path.getsize(f) for f in safetensors_files(out))
    print(f"[bench]   {size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def checkpoint_bytes(ckpt) -> int:
    return sum(os.path.getsize(f) for f in safetensors_files(ckpt))


def make_prompt(tokenizer, n_tokens: int) -> list[int]:
    """The first n_tokens ids of a fixed English+code text (repeated if the tokenizer compresses it well)."""
    text = (
        "The quick brown fox jumps over the lazy dog. def fibonacci(n):\n    a, b = 0, 1\n"
        "    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
        "Mixture-of-experts models route every token to a few experts; the rest stay on disk. "
    )
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += tokenizer.encode(text)
    return ids[:n_tokens]


def timed_tokens(gen, n_expected: int, on_token=None):
    """Drains a token generator; returns (tokens, [t at each token]); on_token(i) runs after each."""
    toks, times = [], []
    for i, t in enumerate(gen):
        toks.append(int(t))
        times.append(time.perf_counter())
        if on_token is not None:
            on_token(i)
        if len(toks) >= n_expected:
            break
    return toks, times


def decode_tps(times) -> float:
    """Steady decode tok/s: tokens after the first over the time from the first token to the last.

    The first token comes out of prefill, so it is excluded; the same definition is applied to every engine.
    """
    if len(times) < 2:
        return float("nan")
    return (len(times) - 1) / (times[-1] - times[0])


def fmt_table(headers, rows) -> str:
    cols = [[str(h)] + [str(r[i]) for r in rows] for i, h in enumerate(headers)]
    w = [max(len(c) for c in col) for col in cols]
    line = lambda cells: "  ".join(str(c).rjust(w[i]) if i else str(c).ljust(w[i]) for i, c in enumerate(cells))
    sep = "  ".join("-" * x for x in w)
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def write_json(path, payload) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def default_out(name: str) -> str:
    return str(BENCH_DIR / "results" / f"{name}.json")
