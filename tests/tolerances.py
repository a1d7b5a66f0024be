"""The suite's tolerance rule, in one place (docs/testing.md gives the measurements behind each number).

Every numeric comparison names the KIND of difference it allows; the number follows from the backend's arithmetic:

* ``EXACT`` (bitwise): the same kernel on the same inputs and shapes. MLX's kernels are deterministic on the CPU
  and on CUDA (``bench/backend_numerics.py`` runs each twice), so only this kind may use ``array_equal``.
* ``reorder(cpu)``: the same float32 math in another order — another kernel or GEMM shape, a compiled (fused)
  graph, a prefill split into chunks, a bank slot instead of a stacked expert. On MLX's CPU each test keeps the
  bound it measured there (``cpu``: MLX's CPU kernels give each output the same sum whatever the shape, so these
  are 1e-6..1e-5) — with MLX's reference BLAS; mach's default OpenBLAS (docs/cpu_blas.md) blocks each GEMM by its
  shape like a GPU kernel, so on it the GPU bound below applies (``shape_dependent_gemm``). On a GPU kernels pick their tiling and split-K per shape and fuse multiply-adds: one float32
  dot product of K terms moves by ~sqrt(K)·2**-24 (H200: 2e-7 at K=64, 8e-7 at K=1024), the tiny models amplify a
  per-GEMM error at most ~9x into their logits, so ``GPU_REORDER`` = 64·sqrt(64)·2**-24 ≈ 3e-5 (relative to the
  largest logit) keeps 7x headroom over 9·8·2**-24 and still fails on any real fault: a wrong or stale expert, a
  lost KV row or a mis-masked window moves logits by 1e-2 and more.
* ``INDEPENDENT`` = 1e-4: against another implementation of the model (transformers + torch on the CPU,
  mlx-lm's forward): float32 in a different order through every layer, on every backend.
* ``half(dtype, cpu)``: two implementations of one bfloat16 / float16 forward. On the CPU the test's own bound
  (MLX rounds each op's float32 result once, so the implementations agree to ~1e-5). On a GPU, GEMMs of
  different shapes round their half-precision outputs differently (one ulp in an intermediate): 4·eps(dtype)
  (bf16 3.1e-2, fp16 3.9e-3; the H200 measured 1.2 and 0.9 eps).

TF32: MLX's CUDA backend runs float32 GEMMs on TF32 tensor cores by default (``MLX_ENABLE_TF32=1``: inputs rounded
to 10 mantissa bits, 3e-4 relative per GEMM on the H200, 5e-4..2.7e-3 at the tiny models' logits). That would
leave the float32 checks no power to find a subtle fault, so ``tests/conftest.py`` sets ``MLX_ENABLE_TF32=0`` for
the suite (and its subprocesses) unless the caller set it: every backend then multiplies float32 exactly. A run
that keeps TF32 on gets ``TF32_BOUND`` (16·2**-11 ≈ 7.8e-3, 3x the largest TF32 error measured) for both float32
kinds: it still catches a wrong layout or format (0.1 and more), not a subtle one.
"""

from __future__ import annotations

import os

import mlx.core as mx

GPU = mx.default_device() == mx.gpu
CUDA = GPU and hasattr(mx, "cuda") and mx.cuda.is_available()  # MLX's CUDA backend (not Metal)
TF32 = GPU and os.environ.get("MLX_ENABLE_TF32", "1") != "0"

EXACT = 0.0
GPU_REORDER = 64 * 8 * 2.0**-24  # 64 x sqrt(K=64) x float32 unit roundoff ~= 3.05e-5
TF32_BOUND = 16 * 2.0**-11  # 16 x TF32 unit roundoff ~= 7.8e-3
INDEPENDENT = TF32_BOUND if TF32 else 1e-4
_EPS = {mx.bfloat16: 2.0**-7, mx.float16: 2.0**-10}


def shape_dependent_gemm() -> bool:
    """Whether a float32 GEMM may sum an output in another order when the call's shape changes (rows, batch): a
    GPU's kernels pick tiling and split-K per shape, and so does OpenBLAS, which mach puts under MLX's CPU matmuls
    by default (docs/cpu_blas.md); MLX's own reference BLAS gives each output the same sum whatever the shape."""
    if GPU:
        return True
    from mach_runtime.backend.cpu_blas import cpu_blas_status

    return cpu_blas_status().active == "openblas"


def reorder(cpu: float) -> float:
    """Same float32 math in another order: ``cpu`` on MLX's CPU with its reference BLAS, ``GPU_REORDER`` (or the
    TF32 bound on a GPU) where GEMMs round per shape (a GPU, or the CPU on OpenBLAS: ``shape_dependent_gemm``)."""
    if not shape_dependent_gemm():
        return cpu
    return max(cpu, TF32_BOUND if TF32 else GPU_REORDER)


def independent(cpu: float = INDEPENDENT) -> float:
    """Against another implementation: ``cpu`` (1e-4 unless a test measured its own) on every backend, the TF32
    bound when TF32 is on."""
    return max(cpu, TF32_BOUND) if TF32 else cpu


_PROBED: dict = {}


def quantized_kernel_error(mode: str, bits: int, group: int) -> float:
    """The backend's own float32 quantized matmuls (``quantized_matmul`` and ``gather_qmm``, 1 and 16 rows — MLX
    picks other kernels for one row —, 128 x 128 and 128 -> 256 like the tiny models' attention and experts) against float32 matmuls of the same dequantized
    weights on MLX's CPU: the largest relative error, measured once per process (0 on the CPU)."""
    key = (mode, bits, group)
    if not GPU:
        return 0.0
    if key not in _PROBED:
        import numpy as np

        cpu, errs = mx.cpu, []
        key_ = mx.random.key(7)
        for n in (128, 256):
            w = mx.random.normal((2, n, 128), key=key_) / 128**0.5
            q = mx.quantize(w, group, bits, mode=mode, stream=cpu)
            wq, sc, bi = q[0], q[1], (q[2] if len(q) > 2 else None)
            deq = mx.dequantize(wq, sc, bi, group, bits, mode=mode, dtype=mx.float32, stream=cpu)
            for rows in (1, 16):  # one row (a decode step, a streaming token group) and a block: other kernels
                x = mx.random.normal((rows, 128), key=key_)
                idx = mx.array([[0, 1]] * rows, dtype=mx.uint32)
                got = [mx.quantized_matmul(x, wq[0], sc[0], None if bi is None else bi[0], transpose=True,
                                           group_size=group, bits=bits, mode=mode),
                       mx.gather_qmm(x[:, None, None, :], wq, sc, bi, rhs_indices=idx, transpose=True,
                                     group_size=group, bits=bits, mode=mode)]
                want = [mx.matmul(x, deq[0].T, stream=cpu),
                        mx.matmul(x[:, None, None, :], deq[idx].swapaxes(-1, -2), stream=cpu)]
                for g, r in zip(got, want):
                    g, r = np.array(g, dtype=np.float64), np.array(r, dtype=np.float64)
                    errs.append(float(np.max(np.abs(g - r)) / np.max(np.abs(r))))
        _PROBED[key] = max(errs)
    return _PROBED[key]


def quantized_vs_dequantized(mode: str, bits: int, group: int, cpu: float = INDEPENDENT) -> float:
    """A model run through the backend's quantized kernels against the same model with its weights dequantized
    (float32 matmuls), by the class of ``quantized_kernel_error`` (the kernels measured against float32 matmuls of
    the same dequantized weights):

    * at most GPU_REORDER / 8: the kernels multiply float32 exactly (every CPU; MLX CUDA's affine / mxfp4 / mxfp8
      kernels: 1e-7..6e-7 on the H200) -> ``independent(cpu)``;
    * at most 2**-10, what tensor cores fed 10-bit mantissas give (whatever MLX_ENABLE_TF32 says) -> the TF32 rule's
      ``TF32_BOUND``;
    * worse: ``independent(cpu)``, and the test fails (a wrong format, scale or expert is off by 1e-1 and more)."""
    e = quantized_kernel_error(mode, bits, group)
    if GPU_REORDER / 8 < e <= 2.0**-10:
        return max(cpu, TF32_BOUND)
    return independent(cpu)


def half(dtype, cpu: float) -> float:
    """Two implementations of one half-precision forward: ``cpu`` on MLX's CPU, 4 eps(dtype) on a GPU."""
    return cpu if not GPU else max(cpu, 4 * _EPS[dtype])


def assert_close(got, want, tol: float, what: str = "") -> None:
    """max |got - want| <= tol x max |want| (the suite's relative error; tol 0 is bitwise equality)."""
    import numpy as np

    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = float(np.max(np.abs(got - want), initial=0.0))
    scale = float(np.max(np.abs(want), initial=0.0))
    assert np.all(np.isfinite(got)) and err <= tol * scale, f"{what}: max diff {err:.3g} > {tol:g} x {scale:.3g}"


def reorder_in(dtype, cpu: float) -> float:
    """``reorder(cpu)`` for float32 results, ``half(dtype, cpu)`` for half-precision ones (one ulp of a bf16 /
    fp16 intermediate rounded another way moves its logits by about one eps of that dtype)."""
    return half(dtype, cpu) if dtype in _EPS else reorder(cpu)
