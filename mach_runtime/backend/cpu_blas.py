"""Fast float32 matmuls for MLX on Linux CPUs: OpenBLAS instead of netlib's reference BLAS.

MLX's Linux CPU wheel (``mlx-cpu``) links ``mlx_cpu.libs/libblas-*.so.3.10.0``, netlib's reference BLAS: one
thread, no blocking for caches, 1.6–2.3 GFLOP/s for a float32 ``[rows x 2048] @ [2048 x 2048]`` on the dev VM
where OpenBLAS does 22–27. Every float32 ``matmul``, ``addmm`` and ``gather_mm`` on the CPU goes through
``cblas_sgemm`` (half-precision matmuls, ``quantized_matmul`` and attention use MLX's own kernels; measured in
docs/cpu_blas.md).

How: ``libmlx.so`` reaches ``cblas_sgemm`` / ``cblas_dgemm`` / ``cblas_cgemm`` through slots of its global offset
table. ``install_cpu_blas`` points those three slots at the same functions of OpenBLAS from the
``scipy-openblas32`` wheel (numpy/scipy's own OpenBLAS build: LP64, the same C ABI, its symbols carry a
``scipy_`` prefix, which is why loading it with RTLD_GLOBAL before MLX would not do: nothing it exports is named
``cblas_sgemm``). It works whether or not ``mlx.core`` was imported first. Before writing, each slot must hold
the reference BLAS's function (or libmlx's own lazy-binding stub); after writing, a float32 matmul on the CPU is
checked against numpy in float64, and anything unexpected leaves (or puts back) the reference BLAS and says why.
LAPACK (``mx.linalg``) stays on MLX's reference LAPACK.

Configuration (``config.resolve_cpu_blas_config``): ``MACH_CPU_BLAS=auto|openblas|off`` (default auto),
``MACH_CPU_BLAS_THREADS`` (default 1). Every model load (``load``, ``load_moe``, so ``Runtime.open``, ``mach
generate``, ``mach-serve``) calls ``ensure_cpu_blas()``: the environment's choice, unless the program made its own
with ``install_cpu_blas(mode)`` / ``restore_reference_blas()``. Any other MLX program gets the same with
``python -m mach_runtime.backend.cpu_blas MODULE ARGS`` (for instance ``mlx_lm.server``, see ``__main__``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading

import msgspec

from ..config import resolve_cpu_blas_config
from ..errors import ConfigError
from . import elf_slots

log = logging.getLogger("mach_runtime.cpu_blas")

BLAS_SYMBOLS = ("cblas_sgemm", "cblas_dgemm", "cblas_cgemm")


class CpuBlasStatus(msgspec.Struct, frozen=True):
    """Which BLAS serves MLX's CPU matmuls in this process.

    active: "openblas" (installed here), "reference" (netlib's, as MLX's wheel ships), "platform" (not Linux:
    MLX's own platform BLAS, e.g. Accelerate), "other" (some other library already serves them), "unknown".
    library: the file that serves ``cblas_sgemm`` now; version: its own description where it has one."""

    active: str
    mode: str
    library: str | None = None
    version: str | None = None
    threads: int | None = None
    reason: str = ""


class _State:
    def __init__(self):
        self.lock = threading.RLock()
        self.openblas = None  # ctypes.CDLL of libscipy_openblas
        self.originals: dict[int, int] = {}  # slot address -> the value it held before we wrote it
        self.status: CpuBlasStatus | None = None
        self.slots: dict[str, tuple] = {}  # libmlx.so path -> (slot addresses by symbol, RELRO range)
        self.libmlx: str | None = None  # found once it is loaded (a loaded library stays where it is)
        self.explicit = False  # the program chose (install_cpu_blas(mode) / restore_reference_blas): loads keep it


_STATE = _State()


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def libmlx_path() -> str | None:
    """The loaded ``libmlx.so`` of this process (None: MLX's library is not loaded, or not a separate file)."""
    if _STATE.libmlx is None:
        _STATE.libmlx = _find_libmlx()  # stays None (and is looked for again) until MLX is loaded
    return _STATE.libmlx


def _find_libmlx() -> str | None:
    paths = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and os.path.basename(parts[5].strip()) == "libmlx.so":
                paths.add(parts[5].strip())
    return paths.pop() if len(paths) == 1 else None


def _load_base(path: str) -> int:
    handle = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)  # already loaded: the same handle
    link_map = ctypes.c_void_p()
    for lib in (_libc(), ctypes.CDLL(ctypes.util.find_library("dl") or "libdl.so.2")):
        dlinfo = getattr(lib, "dlinfo", None)
        if dlinfo is not None:
            break
    dlinfo.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    rtld_di_linkmap = 2
    if dlinfo(ctypes.c_void_p(handle._handle), rtld_di_linkmap, ctypes.byref(link_map)) != 0:
        raise OSError(f"dlinfo failed for {path}")
    return ctypes.c_size_t.from_address(link_map.value).value  # link_map.l_addr


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _owner(address: int) -> str | None:
    """The file of the loaded object that contains ``address`` (dladdr)."""
    info = _DlInfo()
    dladdr = _libc().dladdr
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    if not address or dladdr(ctypes.c_void_p(address), ctypes.byref(info)) == 0 or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode(errors="replace"))


def _openblas():
    if _STATE.openblas is None:
        import scipy_openblas32  # noqa: PLC0415  (Linux-only dependency, declared in pyproject.toml)

        lib = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(True)))
        lib.scipy_openblas_get_config.restype = ctypes.c_char_p
        lib.scipy_openblas_set_num_threads.argtypes = [ctypes.c_int]
        _STATE.openblas = lib
    return _STATE.openblas


def _write_pointer(address: int, value: int, relro: tuple[int, int] | None) -> None:
    """Store one pointer; lift the read-only protection of a RELRO page for the write and put it back."""
    slot = ctypes.c_void_p.from_address(address)
    if relro is None or not (relro[0] <= address < relro[1]):
        slot.value = value
        return
    page = os.sysconf("SC_PAGE_SIZE")
    start = address & ~(page - 1)
    mprotect = _libc().mprotect
    mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    prot_read, prot_write = 1, 2
    if mprotect(ctypes.c_void_p(start), page, prot_read | prot_write) != 0:
        raise OSError(ctypes.get_errno(), "mprotect(RW) of a RELRO page of libmlx.so failed")
    try:
        slot.value = value
    finally:
        mprotect(ctypes.c_void_p(start), page, prot_read)


def _slots(path: str) -> tuple[dict[str, list[int]], tuple[int, int] | None]:
    """Addresses of libmlx.so's slots for BLAS_SYMBOLS, and its RELRO range (cached: a loaded library stays put)."""
    if path not in _STATE.slots:
        base = _load_base(path)
        found = elf_slots.import_slots(path, BLAS_SYMBOLS)
        relro = elf_slots.relro_range(path)
        _STATE.slots[path] = ({name: [base + s.offset for s in slots] for name, slots in found.items()},
                              None if relro is None else (base + relro[0], base + relro[1]))
    return _STATE.slots[path]


def _classify(path: str, address: int) -> tuple[str, str | None]:
    owner = _owner(address)
    if owner is None:
        return "unknown", None
    name = os.path.basename(owner)
    if name.startswith("libscipy_openblas") and "64" not in name:  # scipy-openblas32 (numpy's is ILP64: other)
        _openblas()
        return "openblas", owner
    if owner == os.path.realpath(path) or name.startswith("libblas"):  # lazy stub or netlib's libblas.so.3
        return "reference", owner
    return "other", owner


def _check_matmul() -> float:
    """Largest relative error of MLX's float32 CPU matmuls (plain, transposed, addmm) against numpy float64."""
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(s).astype(np.float32) for s in ((37, 129), (129, 23), (37, 23)))
    got = [mx.matmul(mx.array(a), mx.array(b), stream=mx.cpu),
           mx.matmul(mx.array(a), mx.array(np.ascontiguousarray(b.T)).T, stream=mx.cpu),
           mx.addmm(mx.array(c), mx.array(a), mx.array(b), alpha=0.5, beta=2.0, stream=mx.cpu)]
    mx.eval(got)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    refs = [ref, ref, 0.5 * ref + 2.0 * c]
    return max(float(np.abs(np.array(g) - r).max() / np.abs(r).max()) for g, r in zip(got, refs))


def _status(mode: str, reason: str) -> CpuBlasStatus:
    path = libmlx_path()
    if path is None:
        return CpuBlasStatus("unknown", mode, reason=reason or "libmlx.so is not loaded")
    slots, _ = _slots(path)
    addresses = slots.get("cblas_sgemm", [])
    if not addresses:
        return CpuBlasStatus("other", mode, path, reason=reason or "libmlx.so does not import cblas_sgemm")
    active, owner = _classify(path, ctypes.c_void_p.from_address(addresses[0]).value or 0)
    version = threads = None
    if active == "openblas":
        lib = _STATE.openblas
        version = lib.scipy_openblas_get_config().decode()
        threads = int(lib.scipy_openblas_get_num_threads())
    elif active == "reference":
        version = "netlib reference BLAS (MLX's wheel)"
    return CpuBlasStatus(active, mode, owner, version, threads, reason)


def cpu_blas_status() -> CpuBlasStatus:
    """What serves MLX's CPU matmuls now (reads the slots; changes nothing)."""
    with _STATE.lock:
        if sys.platform != "linux":
            return CpuBlasStatus("platform", "n/a", reason=f"{sys.platform}: MLX uses its platform BLAS")
        mode = _STATE.status.mode if _STATE.status else "n/a"
        return _status(mode, _STATE.status.reason if _STATE.status else "")


def restore_reference_blas() -> CpuBlasStatus:
    """Put back what libmlx.so's slots held before ``install_cpu_blas`` (benchmarks switch back and forth)."""
    with _STATE.lock:
        path = libmlx_path()
        if path and _STATE.originals:
            _, relro = _slots(path)
            for address, value in _STATE.originals.items():
                _write_pointer(address, value, relro)
            _STATE.originals.clear()
        _STATE.status = _status("off", "reference BLAS put back")
        _STATE.explicit = True
        return _STATE.status


def _refuse(mode: str, reason: str) -> CpuBlasStatus:
    if mode == "openblas":
        raise ConfigError(f"cpu_blas=openblas (MACH_CPU_BLAS): cannot serve MLX's matmuls with OpenBLAS: {reason}; "
                          "use MACH_CPU_BLAS=auto or off")
    return _status(mode, reason)


def _install(mode: str, threads: int) -> CpuBlasStatus:
    import mlx.core  # noqa: F401  (loads libmlx.so; harmless when the caller imported it already)

    path = libmlx_path()
    if path is None:
        return _refuse(mode, "libmlx.so is not loaded in this process (an MLX build without it)")
    try:
        slots, relro = _slots(path)
    except (OSError, elf_slots.ElfError) as e:
        return _refuse(mode, f"cannot read libmlx.so's import table: {e}")
    if "cblas_sgemm" not in slots:
        return _refuse(mode, f"{path} does not call cblas_sgemm (built with another GEMM)")
    try:
        lib = _openblas()
    except (ImportError, OSError) as e:
        return _refuse(mode, f"scipy-openblas32 is not usable ({e}); pip install scipy-openblas32")
    lib.scipy_openblas_set_num_threads(threads)
    planned = []
    for name, addresses in slots.items():
        target = ctypes.cast(getattr(lib, "scipy_" + name), ctypes.c_void_p).value
        for address in addresses:
            current = ctypes.c_void_p.from_address(address).value or 0
            kind, owner = _classify(path, current)
            if kind == "openblas":
                continue
            if kind != "reference":
                return _refuse(mode, f"{name} is served by {owner or hex(current)}, not MLX's reference BLAS: left "
                                     "as it is")
            planned.append((address, current, target))
    for address, current, target in planned:
        _write_pointer(address, target, relro)
        _STATE.originals.setdefault(address, current)
    try:
        error = _check_matmul()
    except Exception as e:  # noqa: BLE001  (whatever went wrong, the reference BLAS goes back)
        error = float("nan")
        log.warning("CPU BLAS check failed: %r", e)
    if not error < 1e-4:
        restore_reference_blas()
        return _refuse(mode, f"float32 matmul through OpenBLAS was off by {error:.2e} (relative): reference BLAS put "
                             "back")
    return _status(mode, "installed" if planned else "already installed")


def install_cpu_blas(mode: str | None = None, threads: int | None = None) -> CpuBlasStatus:
    """Serve MLX's float32 CPU matmuls with OpenBLAS (mode/threads: argument → MACH_CPU_BLAS /
    MACH_CPU_BLAS_THREADS → auto / 1). Idempotent and cheap after the first call; safe to call after ``import
    mlx.core``. Returns what is active; logs one line when that changes. ``mode="off"`` puts the reference BLAS
    back if this process had installed OpenBLAS. Raises ConfigError only for ``mode="openblas"`` when it cannot."""
    cfg = resolve_cpu_blas_config(mode, threads)
    with _STATE.lock:
        before = _STATE.status
        _STATE.explicit = mode is not None or threads is not None
        if sys.platform != "linux":
            status = CpuBlasStatus("platform", cfg.mode, reason=f"{sys.platform}: MLX uses its platform BLAS")
        elif cfg.mode == "off":
            status = restore_reference_blas() if _STATE.originals else _status("off", "MACH_CPU_BLAS=off")
        elif (before is not None and before.active == "openblas" and before.threads == cfg.threads
              and before.mode == cfg.mode and _status(cfg.mode, "").active == "openblas"):
            return before
        else:
            status = _install(cfg.mode, cfg.threads)
        _STATE.status = status
        _STATE.explicit = mode is not None or threads is not None  # (restore_reference_blas marks its own call)
        if before is None or (before.active, before.threads, before.library) != (status.active, status.threads,
                                                                                   status.library):
            log.info("CPU BLAS for MLX matmuls: %s%s (%s)%s", status.active,
                     f", {status.threads} thread(s)" if status.threads else "", status.version or status.library,
                     f": {status.reason}" if status.reason else "")
        return status


def ensure_cpu_blas() -> CpuBlasStatus:
    """What every model load calls: ``install_cpu_blas()`` from the environment (MACH_CPU_BLAS...), unless the
    program already chose with ``install_cpu_blas(mode)`` or ``restore_reference_blas()`` (that choice stays)."""
    with _STATE.lock:
        if _STATE.explicit and _STATE.status is not None:
            return _STATE.status
        return install_cpu_blas()


def main(argv=None) -> int:
    """``python -m mach_runtime.backend.cpu_blas [--threads N] [--off] [MODULE ARGS...]``: with a module, run it
    (like ``python -m MODULE ARGS``) with OpenBLAS serving MLX's CPU matmuls, e.g. ``mlx_lm.server --model M``
    or ``mlx_lm.generate ...``; without one, print which BLAS is active as JSON."""
    import runpy

    args = list(sys.argv[1:] if argv is None else argv)
    threads, mode = None, None
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag == "--threads" and args:
            threads = args.pop(0)
        elif flag == "--off":
            mode = "off"
        else:
            print(main.__doc__, file=sys.stderr)
            return 2
    status = install_cpu_blas(mode, threads)
    if not args:
        print(msgspec.json.encode(status).decode())
        return 0
    module = args[0]
    sys.argv = [module] + args[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":  # run through the package's module, so its state is the one mach_runtime uses
    from mach_runtime.backend.cpu_blas import main as _main

    raise SystemExit(_main())
