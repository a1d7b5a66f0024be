"""Every module of mach_runtime and actors imports as the FIRST module of a fresh interpreter, and the layers
do not import each other in a circle at import time.

A cycle that only breaks when a particular module is imported first (e.g. an adapter module importing the
registry that imports the adapters) passes any test that happens to import the other side first, so each module
is the entry point of a process of its own. To keep that fast, one subprocess preloads the third-party
libraries (MLX, mlx-lm, transformers, ...: none of ours) and forks one child per module; a fork copies an
interpreter in which no module of ours is loaded yet. Forking is only done while the process has one thread
(checked in /proc; the subprocess runs with one BLAS thread so that it has one), otherwise every module gets a
fresh ``python -c`` of its own.

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
           "prometheus_client", "dflash_mlx", "dflash_mlx.model")  # (the server's web stack, the [dflash] extra:
# seconds per child that imports them otherwise; a preload that is not installed is skipped)
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


modules = json.loads(sys.argv[1])
results = []
can_fork = hasattr(os, "fork") and threads() == 1
for module in modules:
    if not can_fork:
        results.append({"module": module, "nofork": True})
        continue
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        data = json.dumps(one(module)).encode()
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if data:
        results.append(json.loads(data))
    else:
        results.append({"module": module, "error": f"child died (wait status {status})"})
print("RESULTS" + json.dumps(results))
"""

_SINGLE = _CHILD.split("modules = json.loads")[0] + r"""
print("RESULTS" + json.dumps([one(sys.argv[1])]))
"""


def _run(code: str, arg: str) -> list[dict]:
    # one BLAS / OpenMP thread: numpy's OpenBLAS otherwise starts a thread at import, and a process with more
    # than one thread must not fork
    env = child_env(ROOT, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code, arg], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    line = next(l for l in r.stdout.splitlines() if l.startswith("RESULTS"))
    return json.loads(line[len("RESULTS"):])


def test_every_module_imports_first_in_a_fresh_interpreter_without_layer_cycles():
    modules = all_modules()
    assert "mach_runtime.io.adapters.qwen3_moe" in modules and "actors.runtime" in modules
    results = _run(_CHILD, json.dumps(modules))
    # a process that was not single-threaded could not fork: those modules get an interpreter each
    results = [r if not r.get("nofork") else _run(_SINGLE, r["module"])[0] for r in results]
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
