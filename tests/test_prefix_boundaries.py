"""Block-boundary snapshots during a chunked prefill (engine level, qwen3_5_moe: GatedDeltaNet state that cannot be
cut), in every lane (batch, batched speculative, solo speculative) and ``warm_prefix``'s prefill: chunks end at
the requests' boundaries; each boundary capture restores to exactly the state after its first t tokens, so
continuing greedy decoding from it equals greedy decoding of the whole prompt (mlx-lm's cache loop)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mach_runtime import load_moe
from mach_runtime.engine.batch import Admission, BatchEngine
from mach_runtime.engine.kv_snapshot import capture
from mach_runtime.engine.prefix_saver import PrefixSaver
from mach_runtime.engine.sampling import SamplingParams
from tests.family_helpers import FAMILIES
from tests.helpers import greedy

A = [5, 17, 99, 3, 250, 77, 12, 40, 41, 7, 8, 9, 10] * 3  # 39 tokens
B = [101, 7, 7, 300, 18, 42, 64, 65, 66, 2, 3, 4] * 2  # 24 tokens


def test_boundaries_are_block_multiples_bounded_and_only_for_exact_only_caches():
    saver = PrefixSaver(lambda *a: None, 16, exact_only=True)
    assert saver.boundaries(39, 0) == (16, 32)
    assert saver.boundaries(39, 16) == (32,)
    assert saver.boundaries(33, 0) == (16,)  # 32 = the prefill's end: the admission snapshot covers it
    assert saver.boundaries(20, 0) == ()
    big = saver.boundaries(4000, 0)
    assert len(big) == 4 and all(t % 16 == 0 for t in big) and big[-1] == 3984
    assert PrefixSaver(lambda *a: None, 16, exact_only=False).boundaries(4000, 0) == ()


@pytest.fixture(scope="module")
def gdn():
    model, tok, store, _ = load_moe(FAMILIES["qwen3_5_moe"], expert_residency="stacked")
    yield model, tok
    store.close()


def _lane(kind, model, tok):
    """The engine of a scheduler lane, as the Scheduler builds it."""
    from mach_runtime.engine.specdec import BlockSpecDecEngine, BlockSpecDecEngineConfig, BlockSpecDecEngineMode
    from mach_runtime.engine.specdec.batched import BatchedSpecDecoder

    cfg = BlockSpecDecEngineConfig(mode=BlockSpecDecEngineMode.PROMPT_LOOKUP, prefill_step=512)
    if kind == "batch":
        return BatchEngine(model, tok, max_batch=2, prefill_step=512)
    if kind == "spec_batch":
        return BatchedSpecDecoder(model, tok, config=cfg, max_batch=2)
    return BlockSpecDecEngine(model, tok, config=cfg)


@pytest.mark.parametrize("lane", ["batch", "spec_batch", "solo"])
def test_boundary_captures_in_every_lane_restore_exact_states(gdn, lane):
    """Every lane's prefill (``batch.boundary_prefill``) is split at the boundaries and captures there; in the
    batch lanes two requests of different lengths prefill together (right-padded)."""
    model, tok = gdn
    got = {}
    eng = _lane(lane, model, tok)
    eng.on_boundary = lambda rid, extract, tokens: got.setdefault((rid, len(tokens)), capture(extract(), tokens))
    p = SamplingParams(max_tokens=4, temperature=0.0, specdec="prompt_lookup" if lane != "batch" else None)
    group = [Admission("a", tuple(A), p, boundaries=(16, 32)), Admission("b", tuple(B), p, boundaries=(16,))]
    pf = eng.begin(group if lane != "solo" else group[:1], prefill_step=512)
    chunks = []
    while not pf.done:
        chunks.append(pf.advance())
    # the 512-token chunk was split at the boundaries; the batch and solo lanes feed the last prompt token too (its
    # logits draw the first token), the spec batch lane's first verify block starts with it
    assert chunks == [16, 16, 6 if lane == "spec_batch" else 7]
    assert sorted(got) == [("a", 16), ("a", 32), ("b", 16)][: 2 if lane == "solo" else 3]
    for (rid, n), snap in got.items():
        prompt = A if rid == "a" else B
        caches, m, _ = snap.to_host().restore()
        assert m == n and list(snap.tokens) == prompt[:n]
        logits = model(mx.array([prompt[n:]]), cache=caches)
        out = []
        for _ in range(6):
            out.append(int(mx.argmax(logits[0, -1]).item()))
            logits = model(mx.array([[out[-1]]]), cache=caches)
        assert out == greedy(model, prompt, 6), (lane, rid, n)


def test_warm_prefill_takes_boundary_snapshots_and_leaves_the_host_copy(gdn):
    """``warm_prefix``'s prefill (every token fed) goes through the same split; its snapshot is handed over
    materialised on the device (numpy views of MLX buffers), for the Cache actor to copy off the MLX thread."""
    from mach_runtime.engine.prefix_saver import warm_prefill

    model, _ = gdn
    got = {}
    snap = warm_prefill(model, A, None, 0, boundaries=(16, 32),
                        on_boundary=lambda rid, extract, tokens: got.setdefault(len(tokens), capture(extract(), tokens)))
    assert sorted(got) == [16, 32] and snap.n_tokens == len(A) and snap.logits is not None
    snap.materialize()
    assert snap.held and not all(a.flags.owndata for a in snap.arrays.values())  # views until ``copy_views``
    snap.copy_views()
    caches, _, _ = got[32].to_host().restore()
    logits = model(mx.array([A[32:]]), cache=caches)[0, -1]
    assert np.allclose(np.array(logits), snap.logits, rtol=0, atol=1e-5 * float(np.abs(snap.logits).max()))
