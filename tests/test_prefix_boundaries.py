"""Block-boundary snapshots during a batched, chunked prefill (engine level, qwen3_5_moe: GatedDeltaNet state that
cannot be cut): two requests of different lengths prefill together (right-padded) in chunks that end at their
boundaries; each boundary capture restores to exactly the state after its first t tokens, so continuing greedy
decoding from it equals greedy decoding of the whole prompt (mlx-lm's cache loop)."""

from __future__ import annotations

import mlx.core as mx

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


def test_boundary_captures_in_a_right_padded_group_restore_exact_states():
    model, tok, store, _ = load_moe(FAMILIES["qwen3_5_moe"], expert_residency="stacked")
    got = {}
    eng = BatchEngine(model, tok, max_batch=2, prefill_step=512)
    eng.on_boundary = lambda rid, extract, tokens: got.setdefault((rid, len(tokens)), capture(extract(), tokens))
    p = SamplingParams(max_tokens=4, temperature=0.0)
    pf = eng.begin([Admission("a", tuple(A), p, boundaries=(16, 32)), Admission("b", tuple(B), p, boundaries=(16,))])
    chunks = []
    while not pf.done:
        chunks.append(pf.advance())
    assert chunks == [16, 16, 6]  # the 512-token chunk was split at the boundaries
    assert sorted(got) == [("a", 16), ("a", 32), ("b", 16)]
    for (rid, n), snap in got.items():
        prompt = A if rid == "a" else B
        caches, m, _ = snap.to_host().restore()
        assert m == n and list(snap.tokens) == prompt[:n]
        logits = model(mx.array([prompt[n:]]), cache=caches)
        out = []
        for _ in range(6):
            out.append(int(mx.argmax(logits[0, -1]).item()))
            logits = model(mx.array([[out[-1]]]), cache=caches)
        assert out == greedy(model, prompt, 6), (rid, n)
    store.close()
