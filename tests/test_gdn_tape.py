"""GDNTape: GatedDeltaNet rollback by replaying the recorded recurrence equals the snapshot + re-run path for
every accepted prefix (stacked and streaming experts), the recording hooks do not change a layer's output, and a
greedy speculative loop using the tape is token-identical to plain greedy decoding."""

from __future__ import annotations

import random

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mach_runtime.engine.specdec.gdn_tape import ConvInputHook, GDNTape, GDNTapeHook, is_gdn_layer
from mach_runtime.engine.specdec.target import Checkpoint, TargetOps, rollback
from mach_runtime.engine.specdec.verify_cache import bucket_kv_caches
from tests.family_helpers import FAMILIES
from tests import tolerances as tol
from tests.helpers import greedy

PROMPT = [5, 17, 99, 3, 250, 77, 12, 40, 41]
N = 40


def _load(**kw):
    from mach_runtime import load_moe

    model, _, store, _ = load_moe(FAMILIES["qwen3_5_moe"], **kw)
    ops = TargetOps(model)
    return model, ops, GDNTape(ops), store


@pytest.fixture(scope="module")
def stacked():
    return _load(expert_residency="stacked")


def _cycle(model, ops, tape, block, keep, use_tape):
    """prefill PROMPT → verify ``block`` (tape armed) → roll back to ``keep`` tokens → logits of one token more."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    bucket_kv_caches(cache)
    ops.prefill(PROMPT, cache, 512)
    ckpt = Checkpoint(cache)
    blk = mx.array(block, dtype=mx.uint32)
    with tape.recording():
        ops.forward(blk, cache, (), logits="none")
    mx.eval([c.state for c in cache])
    rerun = rollback(cache, ckpt, len(block), keep, tape=tape if use_tape else None)
    assert rerun == (not use_tape and keep < len(block))
    if rerun:
        ops.forward(blk[:keep], cache, (), logits="none")
    mx.eval([c.state for c in cache])
    logits, _ = ops.forward(mx.array([7], dtype=mx.uint32), cache, (), logits="all")
    mx.eval(logits)
    return cache, logits


def _arrays(c):
    if type(c).__name__ == "ArraysCache":
        return list(c.cache)
    return [c.offset, *c.state]


def _assert_same(c_tape, c_rerun):
    for a, b in zip(c_tape, c_rerun, strict=True):
        assert type(a) is type(b)
        for x, y in zip(_arrays(a), _arrays(b), strict=True):
            if isinstance(x, int):
                assert x == y
                continue
            x, y = np.array(x), np.array(y)
            assert x.shape == y.shape
            if tol.shape_dependent_gemm():  # another GEMM shape for the replayed rows: tests/tolerances.py
                tol.assert_close(x, y, tol.reorder(1e-6))
            else:
                np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)  # bitwise on MLX CPU's reference BLAS


@pytest.mark.parametrize("residency,block", [("stacked", 8), ("stacked", 16), ("streaming", 8)])
def test_replay_equals_rerun_for_every_keep(residency, block, stacked):
    model, ops, tape, store = stacked if residency == "stacked" else _load(expert_residency="streaming",
                                                                             expert_slots=2)
    try:
        assert len(tape) == 2 and all(is_gdn_layer(m) for m in tape.layers)
        toks = [int(t) for t in np.random.default_rng(block).integers(0, 500, block)]
        for keep in range(1, block + 1):
            c_tape, l_tape = _cycle(model, ops, tape, toks, keep, use_tape=True)
            c_rerun, l_rerun = _cycle(model, ops, tape, toks, keep, use_tape=False)
            _assert_same(c_tape, c_rerun)
            if tol.shape_dependent_gemm():
                tol.assert_close(np.array(l_tape), np.array(l_rerun), tol.reorder(1e-6))
            else:
                np.testing.assert_allclose(np.array(l_tape), np.array(l_rerun), rtol=1e-6, atol=1e-6)
    finally:
        if residency == "streaming":
            store.close()


def test_stale_tape_falls_back_to_rerun(stacked):
    from mlx_lm.models.cache import make_prompt_cache

    model, ops, tape, _ = stacked
    cache = make_prompt_cache(model)
    ops.prefill(PROMPT, cache, 512)
    blk = mx.array([1, 2, 3, 4], dtype=mx.uint32)
    ckpt = Checkpoint(cache)
    with tape.recording():
        ops.forward(blk, cache, (), logits="none")
    assert tape.nbytes > 0
    gdn = [c for c in cache if type(c).__name__ == "ArraysCache"]
    assert all(tape.can_replay(c, 4) for c in gdn) and not any(tape.can_replay(c, 3) for c in gdn)
    ops.forward(blk[:1], cache, (), logits="none")  # the caches moved on: the record no longer applies
    assert not any(tape.can_replay(c) for c in gdn)
    assert rollback(cache, ckpt, 5, 2, tape=tape) is True  # snapshot + re-run path
    tape.clear()
    assert tape.nbytes == 0


def test_recording_does_not_change_the_layer(stacked):
    from mlx_lm.models.cache import ArraysCache

    from mach_runtime import load_moe

    model, ops, tape, _ = stacked
    fresh, _, _, _ = load_moe(FAMILIES["qwen3_5_moe"], expert_residency="stacked")
    assert [k for k, _ in tree_flatten(model.parameters())] == [k for k, _ in tree_flatten(fresh.parameters())]
    layer = tape.layers[0]
    assert isinstance(layer, GDNTapeHook) and type(layer.inner).__name__ == "GatedDeltaNet"
    assert isinstance(layer.conv1d, ConvInputHook) and layer.inner.conv1d is layer.conv1d
    original = layer.inner
    mx.random.seed(3)
    x = mx.random.normal((1, 6, layer.hidden_size))
    conv0 = mx.random.normal((1, layer.conv_kernel_size - 1, layer.conv_dim))
    rec0 = mx.random.normal((1, layer.num_v_heads, layer.head_v_dim, layer.head_k_dim)) * 0.1

    def run(call):
        c = ArraysCache(2)
        c[0], c[1] = conv0, rec0
        out = call(x, None, c)
        mx.eval(out, c.cache)
        return c, np.array(out), [np.array(a) for a in c.cache]

    _, ref, ref_state = run(lambda *a: original(*a))  # the unwrapped mlx-lm layer
    _, plain, plain_state = run(layer)  # installed, unarmed
    with tape.recording():
        c_rec, rec, rec_state = run(layer)  # armed
    for out, state in ((plain, plain_state), (rec, rec_state)):
        np.testing.assert_array_equal(out, ref)
        for a, b in zip(state, ref_state):
            np.testing.assert_array_equal(a, b)
    # replaying a prefix equals the unwrapped layer run over that prefix only
    assert tape.can_replay(c_rec, 6)
    tape.replay(c_rec, 4)
    c_pre, _, _ = run(lambda x_, m, c: original(x_[:, :4], m, c))
    for a, b in zip(c_rec.cache, c_pre.cache):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_greedy_loop_with_tape_matches_plain_greedy(stacked):
    """A minimal greedy speculative loop (reference continuation as drafts, one token corrupted per block)
    that rolls the GatedDeltaNet state back with the tape only: token-identical to plain greedy decoding."""
    from mlx_lm.models.cache import make_prompt_cache

    model, ops, tape, _ = stacked
    ref = greedy(model, PROMPT, N)
    rng = random.Random(0)
    cache = make_prompt_cache(model)
    bucket_kv_caches(cache)
    staged = int(mx.argmax(ops.prefill(PROMPT, cache, 512)).item())
    out, partial = [staged], 0
    while len(out) < N:
        b = min(8, N - len(out) + 1)
        drafts = list(ref[len(out) : len(out) + b - 1])
        if drafts:
            i = rng.randrange(len(drafts))
            drafts[i] = (drafts[i] + 1) % 500
        block = mx.array([staged] + drafts, dtype=mx.uint32)
        ckpt = Checkpoint(cache)
        with tape.recording():
            logits, _ = ops.forward(block, cache, ())
        choice = mx.argmax(logits, axis=-1).tolist()
        acc = 0
        while acc < len(drafts) and drafts[acc] == choice[acc]:
            acc += 1
        partial += acc < len(drafts)
        assert rollback(cache, ckpt, len(block), acc + 1, tape=tape) is False  # never a re-run
        out += drafts[:acc] + [choice[acc]]
        staged = choice[acc]
    assert out[:N] == ref
    assert partial >= 5
