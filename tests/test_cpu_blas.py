"""OpenBLAS for MLX's CPU matmuls (mach_runtime/backend/cpu_blas.py): same logits as MLX's reference BLAS within
float32 reordering, the active BLAS reported, refusals when libmlx.so's slots hold something unexpected."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mach_runtime.errors import ConfigError
from tests import tolerances as tol

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="MLX's Linux wheels only (macOS uses Accelerate)")
# a dependency on Linux (pyproject.toml), so always here after `pip install`; the GPU machine's kit lacks it (the
# carry has no room for its 7.9 MB wheel: docs/testing.md)
needs_openblas = pytest.mark.skipif(importlib.util.find_spec("scipy_openblas32") is None,
                                    reason="scipy-openblas32 is not installed (not in the GPU machine's kit)")

# a slot that holds neither the reference BLAS nor OpenBLAS: auto leaves it, openblas refuses with a ConfigError
_FOREIGN = r"""
import ctypes, json
import mlx.core as mx
from mach_runtime.backend import cpu_blas as cb
from mach_runtime.errors import ConfigError
path = cb.libmlx_path()
slots, _ = cb._slots(path)
address = slots["cblas_sgemm"][0]
original = ctypes.c_void_p.from_address(address).value
foreign = ctypes.cast(ctypes.CDLL(None).printf, ctypes.c_void_p).value  # libc: neither BLAS (never called)
ctypes.c_void_p.from_address(address).value = foreign
auto = cb.install_cpu_blas("auto")
try:
    cb.install_cpu_blas("openblas")
    refused = None
except ConfigError as e:
    refused = str(e)
untouched = ctypes.c_void_p.from_address(address).value == foreign
ctypes.c_void_p.from_address(address).value = original
print(json.dumps({"active": auto.active, "reason": auto.reason, "refused": refused, "untouched": untouched}))
"""


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def _logits(model, ids):
    import mlx.core as mx

    with mx.stream(mx.cpu):  # the CPU's GEMMs whatever the default device (the suite also runs on MLX CUDA)
        out = model(ids)
        mx.eval(out)
    return np.array(out)


@needs_openblas
def test_openblas_logits_match_reference_blas(tiny_dir, monkeypatch):
    """MACH_CPU_BLAS=off: load_moe leaves (or puts back) MLX's reference BLAS; then OpenBLAS and back, in one
    process, on the tiny model's logits of a 3-row x 7-token prefill (GEMMs with M > 1)."""
    import mlx.core as mx

    from mach_runtime import load_moe
    from mach_runtime.backend.cpu_blas import cpu_blas_status, ensure_cpu_blas, install_cpu_blas

    monkeypatch.setenv("MACH_CPU_BLAS", "off")
    try:
        model, *_ = load_moe(tiny_dir, expert_residency="stacked")
        off = cpu_blas_status()
        assert off.active == "reference" and off.mode == "off", off
        assert os.path.basename(off.library).startswith("libblas")  # MLX's wheel: netlib's libblas.so.3
        ids = mx.array(np.random.default_rng(0).integers(1, 200, (3, 7)))
        ref = _logits(model, ids)
        inst = install_cpu_blas("openblas")
        assert inst.active == "openblas" and "scipy_openblas32" in inst.library, inst
        assert inst.version.startswith("OpenBLAS") and inst.threads == 1
        assert ensure_cpu_blas().active == "openblas"  # a later load keeps the program's choice over the env's off
        fast = _logits(model, ids)
        assert install_cpu_blas("off").active == "reference"
        again = _logits(model, ids)
    finally:
        monkeypatch.delenv("MACH_CPU_BLAS")
        install_cpu_blas()  # the suite's default again
    scale = np.abs(ref).max()
    # another GEMM kernel: the same float32 products summed in another order (tests/tolerances.py, reorder)
    assert np.abs(fast - ref).max() / scale < tol.reorder(1e-5)
    assert not np.array_equal(fast, ref)  # OpenBLAS really computed them (its blocking rounds differently)
    assert np.array_equal(again, ref)  # putting the reference back restores MLX's own results exactly


@needs_openblas
def test_default_is_openblas_and_reported(tiny_dir):
    from mach_runtime import load_moe
    from mach_runtime.backend.cpu_blas import cpu_blas_status

    if os.environ.get("MACH_CPU_BLAS", "auto") not in ("", "auto", "openblas"):
        pytest.skip("MACH_CPU_BLAS set off by the caller")
    load_moe(tiny_dir, expert_residency="stacked")  # mlx.core was imported long before: still installed
    s = cpu_blas_status()
    assert s.active == "openblas" and s.mode in ("auto", "openblas"), s
    assert s.library.endswith(".so") and os.path.exists(s.library)


@needs_openblas
def test_foreign_slot_is_left_alone():
    r = json.loads(_run(_FOREIGN))
    assert r["active"] == "other" and "left as it is" in r["reason"], r
    assert r["refused"] and "MACH_CPU_BLAS" in r["refused"]
    assert r["untouched"]


def test_config_errors_name_the_variable(monkeypatch):
    from mach_runtime.config import resolve_cpu_blas_config

    monkeypatch.setenv("MACH_CPU_BLAS", "fastest")
    with pytest.raises(ConfigError, match="MACH_CPU_BLAS.*auto, openblas, off"):
        resolve_cpu_blas_config()
    monkeypatch.setenv("MACH_CPU_BLAS", "off")
    monkeypatch.setenv("MACH_CPU_BLAS_THREADS", "0")
    with pytest.raises(ConfigError, match="MACH_CPU_BLAS_THREADS"):
        resolve_cpu_blas_config()
    assert resolve_cpu_blas_config("openblas", 2).threads == 2


def test_elf_reader_finds_libmlx_imports(tmp_path):
    import mlx.core  # noqa: F401

    from mach_runtime.backend import elf_slots
    from mach_runtime.backend.cpu_blas import libmlx_path

    path = libmlx_path()
    found = elf_slots.import_slots(path, ("cblas_sgemm", "no_such_function"))
    assert [s.symbol for s in found["cblas_sgemm"]] == ["cblas_sgemm"] and "no_such_function" not in found
    bad = tmp_path / "not.so"
    bad.write_bytes(b"#!/bin/sh\n" * 10)
    with pytest.raises(elf_slots.ElfError, match="not an ELF64"):
        elf_slots.import_slots(str(bad), ("cblas_sgemm",))
