"""Slot writes in place (the CPU; MLX CUDA's managed memory): the same bank bytes as the MLX-op writes, exact dtype widening, and a pending output
over a bank is computed before its slots change."""

import mlx.core as mx
import numpy as np
import pytest

from mach_runtime import load_moe
from mach_runtime.io.expert_bank import to_mx
from mach_runtime.io.slot_writes import host_value, host_writes_reach_device, in_place_arrays
from tests.helpers import convert, quantize

pytestmark = pytest.mark.skipif(not host_writes_reach_device(), reason="numpy cannot write this backend's arrays in place")


@pytest.fixture(scope="module", params=["fp32", "bf16", "q4"])
def ckpt(request, tiny_dir, tmp_path_factory):
    if request.param == "fp32":
        return tiny_dir
    dst = tmp_path_factory.mktemp(request.param) / "ckpt"
    return convert(tiny_dir, dst, dtype="bfloat16") if request.param == "bf16" else quantize(tiny_dir, dst, bits=4)


def _bank_arrays(store):
    return [{(t.comp, str(t.rows)): np.array(getattr(t.proj, t.comp).astype(mx.float32))
             for t in b.targets.values()} for b in store.banks]


@pytest.mark.parametrize("src,dst", [("BF16", mx.float32), ("F16", mx.float32), ("BF16", mx.bfloat16),
                                     ("F32", mx.float32), ("U32", mx.uint32)])
def test_host_value_matches_mlx_conversion(src, dst):
    raw = np.random.default_rng(0).integers(0, 256, size=4 * 96, dtype=np.uint8)
    if src in ("BF16", "F16", "F32"):  # finite values only (NaN payloads need not survive a float conversion)
        w = {"BF16": 2, "F16": 2, "F32": 4}[src]
        raw[w - 1 :: w] &= 0x3F
    want = to_mx(raw, src, (len(raw) // {"BF16": 2, "F16": 2, "F32": 4, "U32": 4}[src],), dst)
    got = host_value(raw, src, want.shape, dst)
    want_bits = np.array(want.view(mx.uint16) if dst == mx.bfloat16 else want)
    assert got.dtype == want_bits.dtype and np.array_equal(got.view(np.uint8), want_bits.view(np.uint8))


def test_in_place_equals_mlx_op_writes(ckpt):
    """The same experts loaded (with evictions) through both ways leave bitwise-equal banks."""
    rng = np.random.default_rng(1)
    order = [np.sort(rng.choice(16, 4, replace=False)) for _ in range(6)]
    banks = []
    for in_place in (False, True):
        _, _, store, _ = load_moe(ckpt, expert_residency="streaming", expert_slots=5)
        store.in_place_writes = in_place
        try:
            assert all(in_place_arrays(b) for b in store.banks)  # every array qualifies on these layouts
            for needed in order:
                for bank in store.banks:
                    store.ensure(bank, needed)
            assert store.stats().evictions > 0
            banks.append((_bank_arrays(store), [b.lut.copy() for b in store.banks]))
        finally:
            store.close()
    (ops, lut_ops), (inplace, lut_in) = banks
    assert all(np.array_equal(a, b) for a, b in zip(lut_ops, lut_in))
    for a, b in zip(ops, inplace):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_pending_output_is_computed_before_its_slots_change(tiny_dir):
    """A lazy output over a bank (not yet evaluated) must see the experts it was built over, even when a later load
    overwrites their slots in place: the bank's fence is evaluated first."""
    _, _, store, _ = load_moe(tiny_dir, expert_residency="streaming", expert_slots=4)
    try:
        assert store.in_place_writes
        bank = store.banks[0]
        glu = bank.glu
        x = mx.random.normal((1, 1, 64), key=mx.random.key(0))
        idx = mx.array([[[0, 1, 2, 3]]])
        y = glu(x, idx)  # sync path: loads 0..3, builds y lazily over slots 0..3
        want = np.array(glu(x, idx))  # evaluated twin (all hits, same slots)
        store.ensure(bank, np.array([4, 5, 6, 7]))  # evicts all four, writing their slots in place
        assert (bank.lut[:4] < 0).all()
        assert np.array_equal(np.array(y), want)
    finally:
        store.close()


def test_in_place_mode_follows_config_and_probe(tiny_dir, monkeypatch):
    """auto follows the probe (numpy writes reach the device: true on the CPU and on MLX CUDA's managed memory),
    off keeps the MLX-op way, anything else is a ConfigError naming the variable."""
    from mach_runtime.errors import ConfigError
    from mach_runtime.io.slot_writes import in_place_backend

    assert in_place_backend() == host_writes_reach_device()
    if mx.default_device() == mx.cpu:
        assert host_writes_reach_device()
    monkeypatch.setenv("MACH_IN_PLACE_WRITES", "off")
    _, _, store, _ = load_moe(tiny_dir, expert_residency="streaming", expert_slots=4)
    try:
        assert not store.in_place_writes
    finally:
        store.close()
    monkeypatch.setenv("MACH_IN_PLACE_WRITES", "sometimes")
    with pytest.raises(ConfigError, match="MACH_IN_PLACE_WRITES"):
        in_place_backend()
