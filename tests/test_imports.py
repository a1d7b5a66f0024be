"""Every module of mach_runtime and actors imports as the FIRST module of a fresh interpreter, and the layers
do not import each other in a circle at import time.

A cycle that only breaks when a particular module is imported first (e.g. an adapter module importing the
registry that imports the adapters) passes any test that happens to import the other side first, so each module
is the entry point of a process of its own. To keep that cheap, one subprocess preloads the third-party
libraries (MLX, mlx-lm, transformers, ...: none of ours) and forks one child per module, a few at a time; a fork
copies an interpreter in which no module of ours is loaded yet. Forking a process that runs other threads (MLX's
CUDA build, a BLAS pool) can leave a child stuck on a lock one of them held: every child has a deadline, and
where the parent had other threads a child that failed or hung is judged again in a fresh ``python -c`` of its
own (a real failure fails there too), so the result never depends on the fork. Before, a parent with more than
one thread (the GPU machine) ran every module in a fresh interpreter: 125 of them took over 90 s there.

Layer rules checked in every child after its import (static checks would miss lazy imports done at import time):
* ``mach_runtime.*`` never loads ``actors`` (the engine does not depend on the concurrency layer);
* ``actors.*`` never loads ``mach_runtime.cli`` (the library does not depend on its command line);
* ``mach_runtime.io.adapter`` and ``mach_runtime.io.adapters.*`` never load ``mach_runtime.io.arch_registry``
  (the registry reads the adapters, not the reverse).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import child_env

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mach_runtime", "actors")
CHILD_DEADLINE_S = 60  # one module's import in a forked child (they take 0.1-1 s)


def all_modules() -> list[str]:
    """Every module of the two packages, from the source tree (nothing imported to find them)."""
    names = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join(parts))
    return names


_CHILD = r"""
import importlib, json, os, sys, traceback

PRELOAD = ("numpy", "mlx.core", "mlx.nn", "mlx.utils", "mlx_lm", "mlx_lm.models.cache", "mlx_lm.utils",
           "mlx_lm.generate", "mlx_lm.sample_utils", "transformers", "tokenizers", "safetensors", "anyio", "msgspec",
           "tqdm", "huggingface_hub", "pydantic", "starlette", "fastapi", "fastapi.responses", "uvicorn",
           "prometheus_client", "dflash_mlx", "dflash_mlx.model", "statistics", "mlx_lm.models.switch_layers",
           "mlx_lm.models.gpt_oss", "pydantic.v1")  # (the server's web stack, the [dflash] extra, what our modules
# import from outside at import time: seconds per child that imports them otherwise; one not installed is skipped)
for name in PRELOAD:
    try:
        importlib.import_module(name)
    except Exception:
        pass
ours = [m for m in sys.modules if m.split(".")[0] in ("mach_runtime", "actors")]
assert not ours, f"preloading third-party libraries loaded our modules: {ours}"


def violations(module):
    loaded = set(sys.modules)
    out = []
    if module.split(".")[0] == "mach_runtime":
        out += [f"{module} loads {m}" for m in loaded if m == "actors" or m.startswith("actors.")]
    if module.split(".")[0] == "actors":
        out += [f"{module} loads {m}" for m in loaded if m.startswith("mach_runtime.cli")]
    if module == "mach_runtime.io.adapter" or module.startswith("mach_runtime.io.adapters"):
        if "mach_runtime.io.arch_registry" in loaded:
            out.append(f"{module} loads mach_runtime.io.arch_registry")
    return sorted(out)


def one(module):
    try:
        importlib.import_module(module)
    except BaseException:
        return {"module": module, "error": traceback.format_exc(limit=8)}
    return {"module": module, "violations": violations(module)}


def threads():
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def start(module):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            data = json.dumps(one(module)).encode()
            with os.fdopen(w, "wb") as f:
                f.write(data)
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


modules = json.loads(sys.argv[1])
deadline_s = float(sys.argv[2])
parent_threads = threads()
results = {}
if hasattr(os, "fork"):
    import selectors
    import time
    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)  # 3.12: fork() of a process with threads
    width = max(1, min(4, os.cpu_count() or 1))
    todo, running, sel = list(modules), {}, selectors.DefaultSelector()
    while todo or running:
        while todo and len(running) < width:
            m = todo.pop(0)
            pid, fd = start(m)
            running[fd] = (m, pid, time.monotonic(), [])
            sel.register(fd, selectors.EVENT_READ)
        for key, _ in sel.select(timeout=1.0):
            fd = key.fd
            m, pid, t0, chunks = running[fd]
            chunk = os.read(fd, 1 << 16)
            if chunk:
                chunks.append(chunk)
                continue
            sel.unregister(fd)
            os.close(fd)
            del running[fd]
            _, status = os.waitpid(pid, 0)
            data = b"".join(chunks)
            results[m] = json.loads(data) if data else {"module": m, "error": f"child died (wait status {status})"}
        now = time.monotonic()
        for fd, (m, pid, t0, _) in list(running.items()):
            if now - t0 > deadline_s:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                sel.unregister(fd)
                os.close(fd)
                del running[fd]
                results[m] = {"module": m, "error": f"import did not finish in {deadline_s:.0f} s (forked child)"}
out = []
for m in modules:
    r = results.get(m, {"module": m, "nofork": True})
    if "error" in r and parent_threads != 1:
        r = {"module": m, "nofork": True, "forked_error": r["error"]}  # judged again in a fresh interpreter
    out.append(r)
print("RESULTS" + json.dumps({"threads": parent_threads, "results": out}))
"""

_SINGLE = _CHILD.split("def start(module)")[0] + r"""
print("RESULTS" + json.dumps({"threads": threads(), "results": [one(sys.argv[1])]}))
"""


def _run(code: str, *args: str) -> dict:
    # one BLAS / OpenMP thread: numpy's OpenBLAS otherwise starts a pool at import (the parent forks best with
    # none but its own)
    env = child_env(ROOT, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    line = next(l for l in r.stdout.splitlines() if l.startswith("RESULTS"))
    return json.loads(line[len("RESULTS"):])


def test_every_module_imports_first_in_a_fresh_interpreter_without_layer_cycles():
    modules = all_modules()
    assert "mach_runtime.io.adapters.qwen3_moe" in modules and "actors.runtime" in modules
    run = _run(_CHILD, json.dumps(modules), str(CHILD_DEADLINE_S))
    # what a forked child could not settle (no fork, or a failure where the parent had other threads) is judged
    # in an interpreter of its own: a few at most, or the run would take minutes (say why instead)
    refork = [r["module"] for r in run["results"] if r.get("nofork")]
    first = next((r.get("forked_error", "") for r in run["results"] if r.get("nofork")), "")
    assert len(refork) <= 10, (f"{len(refork)} modules could not be judged in a forked child (the parent ran "
                               f"{run['threads']} threads): {refork[:10]}; the first: {first[-2000:]}")
    results = [r if not r.get("nofork") else _run(_SINGLE, r["module"])["results"][0] for r in run["results"]]
    assert [r["module"] for r in results] == modules
    errors = {r["module"]: r["error"] for r in results if "error" in r}
    assert not errors, "\n\n".join(f"{m}:\n{e}" for m, e in errors.items())
    bad = [v for r in results for v in r["violations"]]
    assert not bad, bad


def test_an_adapter_module_imports_alone():
    """The cycle issue 14 names: the adapter module first, in a plain fresh interpreter."""
    r = subprocess.run([sys.executable, "-c", "import mach_runtime.io.adapters.qwen3_moe as m; print(m.ADAPTER.key)"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=child_env(ROOT))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "qwen3_moe"


def test_public_contract_of_the_registry_module():
    from mach_runtime.io.adapter import MoeArchAdapter as Base
    from mach_runtime.io.arch_registry import REGISTRY, MoeArchAdapter, arch_summary, registry_summary

    assert MoeArchAdapter is Base
    assert all(isinstance(a, MoeArchAdapter) for a in REGISTRY.values())
    assert [row["arch"] for row in registry_summary()] == sorted(REGISTRY)
    assert arch_summary(REGISTRY["qwen3_moe"])["model_type"] == "qwen3_moe"
