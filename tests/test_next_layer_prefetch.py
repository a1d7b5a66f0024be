"""Next-layer prefetch (io/next_layer_prefetch.py): the next MoE layer's likely experts are read while this layer
works; lossless, within its budget, and it stops reading when its predictions stop being right."""

import numpy as np
import pytest

from mach_runtime import load_moe
from mach_runtime.config import resolve_prefetch_bytes
from mach_runtime.errors import ConfigError
from mach_runtime.io.next_layer_prefetch import MIN_PRECISION, install
from tests.test_optimistic import _decode, _stacked


def _sync_streaming(tiny_dir, slots, monkeypatch, mb="0.1"):
    monkeypatch.setenv("MACH_PREFETCH_MB", mb)  # off by default; 0.1 MB: 4 experts of the tiny model
    model, _, store, _ = load_moe(tiny_dir, expert_residency="streaming", expert_slots=slots)
    store.optimistic.enabled = False  # the per-layer path, where misses are read (and predicted)
    return model, store


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_prefetch_is_lossless_and_reconciles(tiny_dir, temperature, monkeypatch):
    want = _decode(_stacked(tiny_dir), temperature)
    model, store = _sync_streaming(tiny_dir, 5, monkeypatch)
    try:
        assert store.next_layer is not None  # installed at load (2 MoE layers: layer 0 predicts layer 1)
        assert _decode(model, temperature) == want
        s = store.stats()
        assert s.next_layer_predicted > 0 and s.prefetched > 0
        assert s.next_layer_correct <= s.next_layer_predicted
        assert s.sync_seconds > 0 and s.write_seconds > 0  # the per-layer path's timers (bench/p2_hits.py shares)
        # every read is counted once: misses served from staging read nothing more
        assert s.bytes_read == (s.misses - s.prefetch_used + s.prefetched) * s.expert_bytes
    finally:
        store.close()


def test_reads_stop_when_predictions_are_wrong_and_resume_when_right(tiny_dir, monkeypatch):
    model, store = _sync_streaming(tiny_dir, 5, monkeypatch)
    try:
        pf = store.next_layer
        seq = store.optimistic.seq
        bank = store.banks[1]
        for _ in range(40):  # predictions that never match the layer's routing
            pf.issue(1, np.array([0, 1, 2, 3]))
            store.optimistic.seq = seq  # the same forward
            pf.score(1, np.array([[8, 9, 10, 11]]))
        assert pf.precision < MIN_PRECISION and not pf.active
        before = store.stats().prefetched
        assert pf.issue(1, np.array([12, 13, 14, 15])) == 0 and store.stats().prefetched == before
        for _ in range(40):  # right again: the reads resume
            pf.issue(1, np.array([4, 5, 6, 7]))
            pf.score(1, np.array([[4, 5, 6, 7]]))
        assert pf.active
        assert pf.issue(1, np.array([12, 13])) == int((bank.lut[[12, 13]] < 0).sum()) > 0
        assert pf.stats()["predicted"] == 4 * 80
    finally:
        store.close()


def test_off_by_default_and_with_budget_zero(tiny_dir, monkeypatch):
    monkeypatch.delenv("MACH_PREFETCH_MB", raising=False)
    assert resolve_prefetch_bytes() == 0 and resolve_prefetch_bytes(2.5) == 2_500_000
    model, store = _sync_streaming(tiny_dir, 5, monkeypatch, mb="0")
    try:
        assert store.next_layer is None and install(model, store, 0) is None
        assert all(b.glu.next_layer is None for b in store.banks)
    finally:
        store.close()
    monkeypatch.setenv("MACH_PREFETCH_MB", "-1")
    with pytest.raises(ConfigError, match="MACH_PREFETCH_MB"):
        resolve_prefetch_bytes()
