"""Slot writes: one expert's raw component bytes -> its slot in a layer bank's (or the prefill arena's) arrays.

Two ways, the same values:

* **in place** (the default wherever numpy can write the backend's arrays: the CPU, MLX CUDA's managed memory,
  Apple's unified memory; ``host_writes_reach_device`` probes it once): numpy copies each
  component from the reader's staging buffer straight into the array's own memory: one copy, no MLX op per
  expert (bf16/f16 -> f32 widening, when the bank computes in f32, is done exactly on the host). A load first
  evaluates the arrays it writes and the bank's fences (the latest outputs computed over that bank, which
  ``DiskSwitchGLU`` and the compiled MoE block register, ``LayerBank.add_fence``; prompt-sized outputs are
  computed at once instead), so no graph still to run can read a slot while its bytes change. Arrays whose
  components need a transform (transposes, de-interleaving, FP8 block scales) or a product (float FP8 scales) are
  never written in place: an array takes one way or the other, never both.
* **as MLX ops** (``MACH_IN_PLACE_WRITES=off``, or a backend whose arrays numpy cannot write):
  ``mx.array(bytes)`` and a slice update per component.

Why: the MLX-op way made the CPU's miss path copy every byte twice and run 9 ops per expert (216 per layer for
24 misses of a 30B-A3B-shaped layer): 52-139 ms per layer, against 22-28 ms in place (docs/benchmarks.md,
"Third pass"). On an H200 (MLX CUDA, managed memory) in place took the miss path from 0.39x to 0.66x of the
disk-bound rate ("Fourth pass").
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mach_runtime.backend.dtypes import dtype_name

from .safetensors_index import DTYPES

# numpy dtype through which an MLX dtype's memory is written (bfloat16 as its raw bits)
_HOST = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "uint32": np.uint32,
         "uint16": np.uint16, "uint8": np.uint8, "int8": np.int8, "int32": np.int32}
# safetensors dtype -> the MLX dtype it is written into unchanged
_SAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "U32": "uint32", "U16": "uint16", "U8": "uint8",
         "I8": "int8", "I32": "int32"}


_PROBED: dict = {}  # device -> whether host writes reach it (host_writes_reach_device)


def host_writes_reach_device() -> bool:
    """Whether numpy can write an evaluated MLX array's memory in place and the default device then computes on
    the written values, also after the device has used that memory (probed once per device, on 1 MiB: the
    allocator's path for slot-array-sized buffers)."""
    import mlx.core as mx

    dev = str(mx.default_device())
    if dev not in _PROBED:
        ok = False
        try:
            a = mx.zeros((1 << 18,), dtype=mx.uint32)
            mx.eval(a)
            v = np.array(a, copy=False)
            if v.flags.writeable and v.flags.c_contiguous and v.size == a.size:
                ok = True
                for salt in (1, 7):  # the second round writes memory the device has just read
                    want = np.arange(a.size, dtype=np.uint32) * np.uint32(salt)
                    v[:] = want
                    got = a + 0
                    mx.eval(got)
                    ok = ok and bool(np.array_equal(np.array(got), want))
        except Exception:  # noqa: BLE001 - any failure means "not this way"
            ok = False
        _PROBED[dev] = ok
    return _PROBED[dev]


def in_place_backend(mode: str | None = None) -> bool:
    """Whether streaming slot writes go in place (``MACH_IN_PLACE_WRITES``: auto follows the probe, on insists,
    off keeps the MLX-op way)."""
    from ..config import resolve_in_place_writes
    from ..errors import ConfigError

    mode = resolve_in_place_writes(mode)
    if mode == "off":
        return False
    ok = host_writes_reach_device()
    if mode == "on" and not ok:
        import mlx.core as mx

        raise ConfigError(f"in_place_writes=on (MACH_IN_PLACE_WRITES): numpy cannot write MLX arrays in place on "
                          f"{mx.default_device()}; use auto or off")
    return ok


def host_value(buf: np.ndarray, st_dtype: str, shape: tuple, arr_dtype) -> np.ndarray | None:
    """Raw bytes of one component as numpy values of the slot array's host dtype, exactly; None when the pair
    has no exact host conversion (the component is written as MLX ops)."""
    name = arr_dtype if isinstance(arr_dtype, str) else dtype_name(arr_dtype)
    if name not in _HOST or st_dtype not in DTYPES:
        return None
    src = buf.view(DTYPES[st_dtype][1]).reshape(shape)
    if _SAME.get(st_dtype) == name:
        return src
    if name == "float32" and st_dtype == "BF16":  # bf16 bits are the high half of the f32 bits
        return (src.astype(np.uint32) << 16).view(np.float32)
    if name == "float32" and st_dtype == "F16":
        return src.astype(np.float32)
    return None


def in_place_ok(target, comp) -> bool:
    """Whether one component may be written in place (its bytes land unchanged or exactly widened)."""
    import mlx.core as mx

    arr = getattr(target.proj, target.comp)
    if target.transform or target.multiply or comp.dtype not in DTYPES:
        return False
    probe = np.zeros(DTYPES[comp.dtype][0], dtype=np.uint8)
    return host_value(probe, comp.dtype, (1,), arr.dtype) is not None and isinstance(arr, mx.array)


def in_place_arrays(bank) -> frozenset:
    """The (id(projection), component) arrays of ``bank`` that every one of their components can fill in place
    (cached on the bank)."""
    keys = bank._in_place
    if keys is None:
        ok: dict = {}
        for key, comp in bank.source.components.items():
            t = bank.targets[key]
            k = (id(t.proj), t.comp)
            ok[k] = ok.get(k, True) and in_place_ok(t, comp)
        keys = bank._in_place = frozenset(k for k, v in ok.items() if v)
    return keys


class NotPlainBuffer(Exception):
    """A slot array whose memory numpy cannot write as one contiguous buffer (the load uses MLX ops instead)."""


class HostViews:
    """Writable numpy views of slot arrays for the span of one load (never kept longer: a later MLX update of
    the array may move it to other memory). ``arrays``: {(id(proj), comp): (proj, comp)} to view."""

    def __init__(self, arrays: dict, fences=()):
        import mlx.core as mx

        mx.eval(*fences, *[getattr(p, c) for p, c in arrays.values()])
        self.views = {}
        self.dtypes = {}  # the arrays' MLX dtype names: writes need no MLX object (they may run on other threads)
        for key, (proj, comp) in arrays.items():
            arr = getattr(proj, comp)
            self.dtypes[key] = dtype_name(arr.dtype)
            if arr.dtype == mx.bfloat16:
                arr = arr.view(mx.uint16)  # numpy has no bfloat16; the view shares the array's memory
                mx.eval(arr)
            v = np.array(arr, copy=False)
            if not (v.flags.writeable and v.flags.c_contiguous and v.size == arr.size):
                raise NotPlainBuffer(comp)
            self.views[key] = v

    def write(self, key, slot: int, rows: slice, value: np.ndarray) -> None:
        self.views[key][slot, rows] = value


def write_slot(bank, slot: int, views: list, projs: dict | None = None, host: HostViews | None = None) -> None:
    """One expert's raw component bytes -> its slot (every target projection), on the MLX thread. ``projs``
    redirects the bank's projections (by id) to others of the same shapes (the prefill arena); ``host`` holds the
    in-place views of the arrays ``in_place_arrays`` names (None: every component as MLX ops)."""
    import mlx.core as mx

    from .expert_bank import apply_transform, to_mx

    inplace = in_place_arrays(bank) if host is not None else ()
    for i, (key, comp) in enumerate(bank.source.components.items()):
        t = bank.targets[key]
        proj = projs.get(id(t.proj), t.proj) if projs else t.proj
        if (id(t.proj), t.comp) in inplace:  # numpy only: no MLX object is touched (SlotWriters' threads)
            key = (id(proj), t.comp)
            host.write(key, slot, t.rows, host_value(views[i], comp.dtype, comp.shape, host.dtypes[key]))
            continue
        arr = getattr(proj, t.comp)
        dt = mx.float32 if t.multiply else arr.dtype
        value = to_mx(views[i], comp.dtype, comp.shape, dt)
        if t.transform:
            value = apply_transform(value[None], t.transform)[0]
        if t.multiply:  # a scale onto the weight written just before (components are in weight-first order)
            value = (arr[slot, t.rows].astype(mx.float32) * value).astype(arr.dtype)
        arr[slot, t.rows] = value


def host_views(store, bank, projs: dict | None = None) -> HostViews | None:
    """HostViews of ``bank``'s in-place arrays (and, with ``projs``, of the arena's arrays that stand for them),
    or None when slot writes are MLX ops (``store.in_place_writes`` off: the backend cannot, or turned off)."""
    if not store.in_place_writes:
        return None
    keys = in_place_arrays(bank)
    if not keys:
        return None
    arrays = {}
    for t in bank.targets.values():
        if (id(t.proj), t.comp) in keys:
            arrays[(id(t.proj), t.comp)] = (t.proj, t.comp)
            if projs:
                p = projs.get(id(t.proj), t.proj)
                arrays[(id(p), t.comp)] = (p, t.comp)
    try:
        views = HostViews(arrays, bank.fences)
    except NotPlainBuffer:
        return None
    bank.fences.clear()
    return views


def whole_in_place(bank, host: HostViews | None) -> bool:
    """Whether every component of ``bank`` is written in place: ``write_slot`` is then numpy only, safe on any
    thread for distinct slots."""
    if host is None:
        return False
    keys = in_place_arrays(bank)
    return all((id(t.proj), t.comp) in keys for t in bank.targets.values())


class SlotWriters:
    """Worker threads for in-place slot writes: a missed expert's bytes are copied into its slot (numpy releases
    the GIL for the copy) while the MLX thread collects the next reads, so reads and writes overlap. On MLX CUDA a
    write is also where the slot's managed pages come back from the device: serial writes were half of a missed
    token there (docs/benchmarks.md, "Fourth pass")."""

    def __init__(self, threads: int):
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="mach-slot-write")

    def submit(self, bank, slot: int, views: list, host: HostViews, release):
        """Writes one expert into ``slot`` on a worker, then ``release()``s its staging buffers; a Future."""

        def run():
            try:
                write_slot(bank, slot, views, host=host)
            finally:
                release()

        return self._pool.submit(run)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
