"""Pinning the most routed experts of a ``mach trace`` file: ``load_moe(pin_experts=)``, ``Runtime.open(pin_experts=)``
and the ``--pin-experts`` flags; pinned experts are never evicted and are counted in the store's stats."""

from __future__ import annotations

import numpy as np
import pytest

from mach_runtime import Runtime, load_moe
from mach_runtime.analysis.trace_replay import RoutingTrace
from mach_runtime.errors import ConfigError
from tests.helpers import greedy

PROMPT = list(range(5, 45))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.fixture(scope="module")
def trace(tiny_dir, tmp_path_factory):
    """A routing trace written by ``mach trace`` on the checkpoint itself."""
    from mach_runtime.cli.main import main

    out = tmp_path_factory.mktemp("trace") / "trace.json"
    assert main(["trace", str(tiny_dir), "--out", str(out), "--tokens", "24", "--seq", "12", "--slots", "8",
                 "--sizes", "8"]) == 0
    return out


def _counts(trace_path, layer: int, E: int) -> np.ndarray:
    counts = np.zeros(E, dtype=np.int64)
    for experts in RoutingTrace.load(trace_path).per_layer()[layer]:
        counts[list(experts)] += 1
    return counts


def test_load_moe_pins_the_most_routed_experts_and_never_evicts_them(tiny_dir, trace):
    stacked, _, _, _ = load_moe(tiny_dir, expert_residency="stacked")
    want = greedy(stacked, PROMPT, 12)
    model, _, store, _ = load_moe(tiny_dir, expert_residency="streaming", expert_slots=8, pin_experts=trace)
    try:
        assert [len(b.pinned) for b in store.banks] == [4, 4]  # half the bank (8 slots; top-4 leaves room)
        for b in store.banks:
            counts = _counts(trace, b.source.layer, b.source.num_experts)
            pinned = sorted(b.pinned)
            rest = [e for e in range(b.source.num_experts) if e not in b.pinned]
            assert counts[pinned].min() >= counts[rest].max()  # the trace's most routed experts
        assert greedy(model, PROMPT, 12) == want
        s = store.stats()
        assert s.pinned_experts == 8 and s.evictions > 0  # the bank evicted, never a pinned expert
        assert all(b.lut[e] >= 0 for b in store.banks for e in b.pinned)
    finally:
        store.close()
    with pytest.raises(ConfigError, match="routing trace"):
        load_moe(tiny_dir, expert_residency="streaming", expert_slots=8, pin_experts=trace.with_name("nope.json"))


@pytest.mark.anyio
async def test_runtime_open_pins_experts(tiny_dir, trace):
    async with Runtime.open(tiny_dir, expert_residency="streaming", expert_slots=8, pin_experts=trace) as rt:
        await rt.generate("def add(a, b):", max_tokens=4)
        st = await rt.stats()
        assert st.experts.pinned_experts == 8


def test_pin_flags_reach_the_loader():
    from mach_runtime.cli import generate, serve

    import argparse

    g = generate.build_parser(argparse.ArgumentParser()).parse_args(["--model", "m", "--pin-experts", "t.json"])
    assert g.pin_experts == "t.json"
    s = serve.settings_from(serve.parser().parse_args(["m", "--streaming", "--pin-experts", "t.json"]))
    assert s.open_kwargs == {"pin_experts": "t.json"}
