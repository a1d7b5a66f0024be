"""Minimal repros of MLX backend kernels that are wrong or missing (measured on an H200, MLX 0.32.4 CUDA), beside
the check that mach_runtime's detour (``mach_runtime/io/backend_faults.py``) computes the right values. On the
CPU (and Metal) every repro is an ordinary correctness test. On CUDA the kernel repros are expected failures: once MLX fixes
a kernel, its repro passes (strict xfail: the suite then fails and says which detour to remove)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mach_runtime.io.backend_faults import dequantize_one_group_rows
from tests import tolerances as tol

ONE_GROUP = pytest.mark.xfail(
    tol.CUDA, strict=True,
    reason="MLX 0.32.4 CUDA (Hopper): quantized_matmul with one affine group per row and more than one row returns "
           "wrong, run-to-run different values (H200: rel. error 1.0-1.4); mach_runtime holds such layers "
           "dequantized (io/backend_faults.py)")


def _cpu_reference(x, wq, scales, biases, group, bits):
    w = mx.dequantize(wq, scales, biases, group, bits, dtype=mx.float32, stream=mx.cpu)
    return np.array(mx.matmul(x, w.T, stream=mx.cpu))


@ONE_GROUP
@pytest.mark.parametrize("width,bits", [(64, 4), (64, 8), (128, 4), (128, 8)])
def test_quantized_matmul_one_group_per_row(width, bits):
    """x [1, 16, K] @ W[64, K]^T quantized with group_size == K: the router shape of the tiny models (K = 64,
    8-bit, group 64) and mlx-lm exports at group 128 of 128-wide layers."""
    mx.random.seed(width + bits)
    w = mx.random.normal((64, width)) / width**0.5
    wq, scales, biases = mx.quantize(w, width, bits)
    x = mx.random.normal((1, 16, width))
    got = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=width, bits=bits)
    tol.assert_close(np.array(got), _cpu_reference(x, wq, scales, biases, width, bits), tol.reorder(1e-5))


@pytest.mark.parametrize("width,group", [(64, 64), (128, 128), (128, 64), (64, 32)])
def test_detour_computes_the_quantized_layer(width, group):
    """A model's one-group-per-row QuantizedLinear layers are replaced on CUDA (only there) by float layers of
    the same dequantized weights and bias: the outputs equal the CPU kernel's for prefill and decode shapes."""
    mx.random.seed(width)
    model = nn.Sequential(nn.Linear(width, 96, bias=True))
    nn.quantize(model, group_size=group, bits=8)
    q = model.layers[0]
    swapped = dequantize_one_group_rows(model)
    assert swapped == (["layers.0"] if tol.CUDA and group >= width else [])
    for rows in (1, 16):
        x = mx.random.normal((1, rows, width))
        want = _cpu_reference(x, q.weight, q.scales, q.biases, group, 8) + np.array(q.bias)
        tol.assert_close(np.array(model(x)), want, tol.reorder(1e-5), f"{rows} rows")


@pytest.mark.xfail(tol.CUDA, raises=RuntimeError, strict=True,
                   reason="MLX 0.32.4 CUDA has no quantized_matmul for a slice of a larger quantized buffer (mlx-lm's "
                          "QuantizedKVCache, --kv-bits): 'No implementation for problem shape: 1x11x32x2'; "
                          "mach_runtime's quantized KV caches attend over dequantized K/V there (io/backend_faults.py)")
def test_quantized_kv_attention_over_a_cache_slice():
    """mlx-lm's quantized KV cache hands attention a slice of its 256-row buffer: queries [1, 2, 1, 32] against
    keys [1, 2, 11, 32] quantized 4-bit, group 32 (``mlx_lm.generate --kv-bits 4 --kv-group-size 32``)."""
    mx.random.seed(3)
    keys = mx.random.normal((1, 2, 256, 32))
    wq, scales, biases = (a[..., :11, :] for a in mx.quantize(keys, 32, 4))
    q = mx.random.normal((1, 2, 1, 32))
    got = mx.quantized_matmul(q, wq, scales, biases, transpose=True, group_size=32, bits=4)
    want = mx.matmul(q, mx.dequantize(wq, scales, biases, 32, 4, stream=mx.cpu).swapaxes(-1, -2), stream=mx.cpu)
    tol.assert_close(np.array(got), np.array(want), tol.reorder(1e-5))


def test_quantized_kv_probe_sees_the_kernel_gap():
    """The capability probe behind the dequantized KV attention (``quantized_kv_attention_missing``) reports the gap
    exactly where mlx-lm's quantized attention shape has no kernel: never on the CPU."""
    from mach_runtime.io.backend_faults import quantized_kv_attention_missing

    keys = mx.random.normal((1, 2, 256, 64))
    kv = [a[..., :39, :] for a in mx.quantize(keys, 64, 8)]
    try:
        mx.eval(mx.quantized_matmul(mx.random.normal((1, 2, 1, 64)), *kv, transpose=True, group_size=64, bits=8))
        gap = False
    except RuntimeError:
        gap = True
    assert tol.CUDA or not gap  # only MLX's CUDA build lacks it (one that gains the kernel has no gap)
    assert quantized_kv_attention_missing(8, 64) == gap


def test_float32_gemms_run_at_the_precision_the_tolerances_assume():
    """The suite's premise (tests/tolerances.py): float32 GEMMs on the default device are within the float32
    reorder bound of the CPU's — on CUDA that needs TF32 off (conftest), which a TF32 GEMM misses by 10x (3e-4)."""
    mx.random.seed(0)
    a = mx.random.normal((16, 1024))
    b = mx.random.normal((1024, 64)) / 32
    bound = tol.TF32_BOUND if tol.TF32 else tol.reorder(1e-6)
    tol.assert_close(np.array(a @ b), np.array(mx.matmul(a, b, stream=mx.cpu)), bound)
