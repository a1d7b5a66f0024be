"""Speculative requests reuse and hand over KV caches: a speculative session turn continues from the session's
cached prefix and stores its KV (and the draft's context) for the next turn, whichever lane that turn takes; a
lone speculative request demoted into the batch brings the KV it built, so nothing is prefilled twice.

Engine level (``BlockSpecDecEngine.generate(prefix=)`` / ``SpecDecRun.handover``) on qwen3_moe, the hybrid
qwen3_5_moe (GatedDeltaNet state, tape and re-run rollback) and the sliding-window families; runtime level
(sessions, demotion) under both anyio backends. Every output is checked against plain greedy decoding."""

from __future__ import annotations

import time

import anyio
import mlx.core as mx
import pytest

from mach_runtime import BlockSpecDecEngine, BlockSpecDecEngineConfig, Runtime, load_moe
from mach_runtime.engine.batch import BatchEngine
from mach_runtime.engine.specdec.draft import DFlashDrafter, DraftState
from mach_runtime.engine.specdec.engine import SpecDecKV
from tests.family_helpers import FAMILIES
from tests.helpers import greedy
from tests.test_specdec import OracleDrafter, random_draft

from actors.messages import SamplingParams

PROMPT = [5, 17, 99, 3, 250, 77, 12, 40, 41, 7, 8, 9, 10] * 3  # longer than the sliding windows (4)
MORE = [3, 4, 5, 6]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


def _tokens(run) -> list[int]:
    return [t for c in run for t in c.token_ids]


def _until_eos(ids, eos) -> list[int]:
    stop = [i for i, t in enumerate(ids) if t in eos]
    return ids[: stop[0] + 1] if stop else ids


def _finish_batch(be: BatchEngine, out: dict) -> dict:
    while be.active:
        for o in be.step():
            out[o.request_id].append(o.token)
            if o.finish_reason:
                be.remove(o.request_id)
    return out


# -- engine level ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tiny_dir):
    out = {}
    for name, path in (("qwen3", tiny_dir), ("qwen3_5_moe", FAMILIES["qwen3_5_moe"]), ("gpt_oss", FAMILIES["gpt_oss"]),
                       ("gemma4", FAMILIES["gemma4"])):
        model, tok, _, _ = load_moe(path, expert_residency="stacked")
        out[name] = (model, tok, greedy(model, PROMPT, 40))
    return out


@pytest.mark.parametrize("family,tape", [("qwen3", True), ("qwen3_5_moe", True), ("qwen3_5_moe", False),
                                         ("gpt_oss", True), ("gemma4", True)])
def test_handover_then_prefix_or_batch_is_lossless(models, family, tape):
    """A run that stops inside an accepted block hands over exactly the committed tokens (the accepted drafts past
    the stop are undone: trimmed, or GatedDeltaNet state restored + re-run); the next request continues from it,
    prefilling only its new tokens; a run closed mid-stream continues in the batch next to another request."""
    model, tok, ref = models[family]
    draft = random_draft(len(model.layers), [0, 2] if len(model.layers) > 2 else [0, 1])
    cfg = BlockSpecDecEngineConfig(block_size=8, policy="fixed", gdn_tape=tape)
    plain = BlockSpecDecEngine(model, tok, draft, config=cfg)
    oracle = BlockSpecDecEngine(model, tok, draft, config=cfg,
                                drafter=OracleDrafter(draft, plain.target, ref, len(PROMPT), corrupt=0.0))
    # a stop among the accepted drafts of a whole block (cycle k commits ref[8k-7 : 8k+1]; ref[8k] is its bonus)
    i = next(i for i in range(1, 24) if i % 8 and ref[i] not in ref[:i])
    run = oracle.generate(PROMPT, max_tokens=40, stop_token_ids=(ref[i],), ignore_eos=True)
    out = _tokens(run)
    assert out == ref[: i + 1] and oracle.stats()["acceptance_length_histogram"][-1] >= 1
    kv = run.handover()
    assert isinstance(kv, SpecDecKV) and kv.n_tokens == len(PROMPT) + i + 1  # the stop token was fed: all of it
    assert not any("Bucketed" in type(c).__name__ or "Exact" in type(c).__name__ for c in kv)  # plain classes
    assert run.handover() is None  # handed over once

    p2 = PROMPT + out + MORE
    ref2 = greedy(model, p2, 16)
    run2 = plain.generate(p2, max_tokens=16, ignore_eos=True, prefix=kv)
    assert _tokens(run2) == ref2
    assert (run2.cached_tokens, run2.prefilled_tokens) == (kv.n_tokens, len(MORE))

    run3 = plain.generate(p2, max_tokens=16, ignore_eos=True)  # closed mid-stream, like a demotion
    got = []
    for c in run3:
        got += c.token_ids
        if len(got) >= 5:
            break
    kv3 = run3.handover()
    assert kv3.n_tokens == len(p2) + len(got) - 1  # everything but the staged token
    be = BatchEngine(model, tok, 4)
    seq = be.add("x", tuple(p2), SamplingParams(max_tokens=16), resume_ids=tuple(got), kv=kv3,
                 cached_tokens=kv3.n_tokens)
    be.add("y", tuple(PROMPT), SamplingParams(max_tokens=12))
    assert seq.prefilled_tokens == 0
    res = _finish_batch(be, {"x": list(got), "y": []})
    assert res["x"] == ref2 and res["y"] == ref[:12]


def test_prefix_from_the_batch_and_prefix_fitting(models):
    """A batch-made KV (plain mlx-lm caches) is a prefix for the engine; one longer than the prompt allows is
    trimmed where it can be, and dropped where it cannot (hybrid: recurrent state covers an exact count)."""
    for family in ("qwen3", "qwen3_5_moe"):
        model, tok, ref = models[family]
        engine = BlockSpecDecEngine(model, tok, random_draft(len(model.layers), [0, 1]),
                                    config=BlockSpecDecEngineConfig(block_size=4, policy="fixed"))
        be = BatchEngine(model, tok, 2)
        be.add("a", tuple(PROMPT), SamplingParams(max_tokens=6))
        for _ in range(5):
            be.step()
        kv, n = be.extract_kv("a")
        assert n == len(PROMPT) + 5  # prompt + 5 tokens (the pipelined step in flight fed the newest)
        p = PROMPT + ref[:5] + MORE
        run = engine.generate(p, max_tokens=10, ignore_eos=True, prefix=(kv, n))
        assert _tokens(run) == greedy(model, p, 10) and run.cached_tokens == n
        # the whole prompt cached: the last token must still be fed
        kv2 = run.handover()
        p_short = p[: kv2.n_tokens]
        run = engine.generate(p_short, max_tokens=6, ignore_eos=True, prefix=kv2)
        assert _tokens(run) == greedy(model, p_short, 6)
        expect = len(p_short) - 1 if family == "qwen3" else 0
        assert run.cached_tokens == expect and run.prefilled_tokens == len(p_short) - expect


def test_draft_state_resumes_the_drafters_context(models):
    """With the drafter's snapshot the resumed draft proposes what a draft that saw the whole prompt proposes;
    without it the draft starts from the uncached tokens only (lossless all the same)."""
    model, tok, _ = models["qwen3"]
    draft = random_draft(2, [0, 1])

    class Recording(DFlashDrafter):
        def __init__(self):
            super().__init__(draft, plain.target)
            self.proposals = []

        def propose(self, history, staged, n):
            out = super().propose(history, staged, n)
            self.proposals.append(out.tolist())
            return out

    cfg = BlockSpecDecEngineConfig(block_size=6, policy="fixed")
    plain = BlockSpecDecEngine(model, tok, draft, config=cfg)
    rec = Recording()
    engine = BlockSpecDecEngine(model, tok, draft, config=cfg, drafter=rec)
    run = engine.generate(PROMPT, max_tokens=9, ignore_eos=True)
    out = _tokens(run)
    kv = run.handover()
    assert isinstance(kv.draft_state, DraftState) and kv.draft_state.n_tokens == kv.n_tokens
    p2 = PROMPT + out + MORE
    ref2 = greedy(model, p2, 12)

    rec.proposals = []
    assert _tokens(engine.generate(p2, max_tokens=12, ignore_eos=True)) == ref2  # from scratch
    scratch = rec.proposals

    first = kv.draft_state.cache[0]
    rec.proposals = []
    run = engine.generate(p2, max_tokens=12, ignore_eos=True, prefix=kv)
    assert _tokens(run) == ref2 and run.cached_tokens == kv.n_tokens
    assert rec.cache[0] is first  # the stored context continued
    assert rec.proposals == scratch

    kv2 = run.handover()
    p3 = p2 + ref2 + MORE
    run = engine.generate(p3, max_tokens=8, ignore_eos=True, prefix=(list(kv2), kv2.n_tokens))  # no draft state
    assert _tokens(run) == greedy(model, p3, 8)
    assert rec.cache[0].positions is None or int(rec.cache[0].positions[0].item()) >= kv2.n_tokens


def test_wrapped_window_trimmed_short_becomes_a_plain_cache(models):
    """A wrapped sliding window trimmed back to max_size - 1 rows (possible only between a rollback and its re-run)
    still converts to a plain RotatingKVCache the batch can merge and continue exactly."""
    from mach_runtime.engine.specdec.target import TargetOps
    from mach_runtime.engine.specdec.verify_cache import plain_caches

    model, tok, ref = models["gpt_oss"]
    ops = TargetOps(model)
    cache = ops.make_cache()
    ops.forward(mx.array(PROMPT[:-1], dtype=mx.uint32), cache, logits="none")
    ops.forward(mx.array([1, 2, 3], dtype=mx.uint32), cache, logits="none")
    for c in cache:
        c.trim(3)
    assert any(c.keys.shape[2] < c.max_size <= c.offset for c in cache if hasattr(c, "max_size"))
    kv = plain_caches(cache)
    be = BatchEngine(model, tok, 2)
    be.add("x", tuple(PROMPT), SamplingParams(max_tokens=10), kv=kv, cached_tokens=len(PROMPT) - 1)
    be.add("y", tuple(PROMPT[:20]), SamplingParams(max_tokens=6))
    res = _finish_batch(be, {"x": [], "y": []})
    assert res["x"] == ref[:10] and res["y"] == greedy(model, PROMPT[:20], 6)


# -- runtime level ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    from mach_runtime.engine.specdec.draft import save_dflash_draft

    return save_dflash_draft(random_draft(2, [0, 1]), tmp_path_factory.mktemp("ss_draft") / "dflash")


@pytest.fixture(scope="module")
def hybrid_draft_dir(tmp_path_factory):
    from mach_runtime.engine.specdec.draft import save_dflash_draft

    return save_dflash_draft(random_draft(3, [0, 2]), tmp_path_factory.mktemp("ss_hdraft") / "dflash")


async def _converse(rt, turns, specdecs, max_tokens=10):
    """Runs a session; returns [(prompt ids, Completion)] per turn."""
    out = []
    async with rt.session(system="You write short Python.") as s:
        for user, spec in zip(turns, specdecs):
            ids = s._prompt_ids(user)[0]  # what send() will submit
            kw = {} if spec == "default" else {"specdec": spec}
            async for _ in s.send(user, max_tokens=max_tokens, **kw):
                pass
            out.append((ids, s.turns[-1]))
    return out


def _check_turns(model, tok, turns, spec_turns):
    eos = set(tok.eos_token_ids)
    for k, (ids, c) in enumerate(turns):
        assert list(c.token_ids) == _until_eos(greedy(model, ids, 10), eos), k
        u = c.usage
        if k == 0:
            assert u["cached_tokens"] == 0
        else:
            prev_ids, prev = turns[k - 1]
            history = len(prev_ids) + len(prev.token_ids)
            # the previous turn's KV covers its prompt and reply (a speculative turn: all but its last token, unless
            # the last cycle had fed it)
            assert history - 1 <= u["cached_tokens"] <= history, k
        # a speculative turn prefills every uncached prompt token; a batched one leaves the last to its first step
        assert u["prefilled_tokens"] == u["prompt_tokens"] - u["cached_tokens"] - (0 if k in spec_turns else 1), k


@pytest.mark.anyio
async def test_speculative_session_prefills_only_new_tokens(tiny_dir, draft_dir, models):
    model, tok, _ = models["qwen3"]
    users = ("a function that adds", "now one that subtracts", "and multiplies")
    async with Runtime.open(tiny_dir, draft=draft_dir, expert_residency="stacked") as rt:
        spec = await _converse(rt, users, ["default"] * 3)
        stats = await rt.stats()
        plain = await _converse(rt, users, [None] * 3)
    assert stats.decoder.spec_requests == 3 and stats.decoder.steps == 0
    assert stats.decoder.cached_tokens == sum(c.usage["cached_tokens"] for _, c in spec) > 0
    assert stats.decoder.prefilled_tokens == sum(c.usage["prefilled_tokens"] for _, c in spec)
    _check_turns(model, tok, spec, {0, 1, 2})
    _check_turns(model, tok, plain, set())
    assert [c.token_ids for _, c in spec] == [c.token_ids for _, c in plain]


@pytest.mark.anyio
async def test_speculative_and_batched_turns_share_the_session(tiny_dir, draft_dir, models):
    model, tok, _ = models["qwen3"]
    users = ("a function that adds", "now one that subtracts", "and multiplies", "and divides")
    async with Runtime.open(tiny_dir, draft=draft_dir, expert_residency="stacked") as rt:
        turns = await _converse(rt, users, ["default", None, "default", None])
        stats = await rt.stats()
    assert stats.decoder.spec_requests == 2 and stats.decoder.steps > 0
    _check_turns(model, tok, turns, {0, 2})


@pytest.mark.anyio
async def test_demoted_request_brings_its_kv_to_the_batch(tiny_dir, draft_dir, models):
    """A lone speculative request (a session's second turn) gets company mid-stream: it joins the batch with the
    KV it built, so its prefill count is what the speculative run prefilled and nothing more."""
    model, tok, _ = models["qwen3"]
    eos = set(tok.eos_token_ids)

    def hook(actor, point, info):  # slow the decoder down so the lone request is still running when company comes
        if actor == "decoder" and point == "step":
            time.sleep(0.005)

    companion = tok.encode("import sys\nfor line in sys.stdin:")
    async with Runtime.open(tiny_dir, draft=draft_dir, expert_residency="stacked", fault_hook=hook) as rt:
        async with rt.session(system="You write short Python.") as s:
            async for _ in s.send("a function that adds", max_tokens=8):
                pass
            ids = s._prompt_ids("now a long one")[0]
            got = {}

            async def lone():
                n = 0
                async for c in s.send("now a long one", max_tokens=40):
                    n += len(c.token_ids)
                    if n >= 3 and not started.is_set():
                        started.set()

            async def company():
                await started.wait()
                got["c"] = await rt.generate(companion, max_tokens=12, specdec=None)

            started = anyio.Event()
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(lone)
                    tg.start_soon(company)
            async for _ in s.send("thanks", max_tokens=6):  # alone again: speculative, from the batch-stored KV
                pass
        stats = await rt.stats()
    turn1, turn2, turn3 = s.turns
    assert stats.decoder.spec_demoted == 1 and stats.decoder.spec_requests == 3
    assert list(turn2.token_ids) == _until_eos(greedy(model, ids, 40), eos)
    assert list(got["c"].token_ids) == _until_eos(greedy(model, companion, 12), eos)
    u = turn2.usage
    assert u["cached_tokens"] >= len(turn1.token_ids)  # the session's prefix ...
    assert u["prefilled_tokens"] == u["prompt_tokens"] - u["cached_tokens"]  # ... and no re-prefill when demoted
    assert got["c"].usage["prefilled_tokens"] == len(companion) - 1
    assert turn3.usage["cached_tokens"] >= u["prompt_tokens"] + u["completion_tokens"]  # the batch stored turn 2
    assert stats.decoder.prefilled_tokens == sum(c.usage["prefilled_tokens"] for c in (*s.turns, got["c"]))
    assert stats.decoder.cached_tokens == sum(c.usage["cached_tokens"] for c in (*s.turns, got["c"]))


@pytest.mark.anyio
async def test_hybrid_speculative_session(draft_dir, hybrid_draft_dir, models):
    """qwen3_5_moe (GatedDeltaNet + attention): session KV handed between speculative and batched turns; the
    recurrent state covers exactly the tokens stored with it."""
    model, tok, _ = models["qwen3_5_moe"]
    users = ("a function that adds", "now one that subtracts", "and multiplies")
    async with Runtime.open(FAMILIES["qwen3_5_moe"], draft=hybrid_draft_dir, expert_residency="stacked") as rt:
        turns = await _converse(rt, users, ["default", "default", None])
        stats = await rt.stats()
    assert stats.decoder.spec_requests == 2
    _check_turns(model, tok, turns, {0, 1})
    assert all(c.usage["cached_tokens"] > 0 for _, c in turns[1:])


@pytest.mark.anyio
async def test_hybrid_prefix_shorter_than_its_state_is_not_reused(hybrid_draft_dir, models):
    """A session KV whose recurrent state covers more tokens than the next prompt shares cannot be trimmed: both
    lanes prefill from scratch (GatedDeltaNet layers come first in the cache list: the token count is read from
    the first cache that has one)."""
    model, tok, _ = models["qwen3_5_moe"]
    first = PROMPT[:20]
    async with Runtime.open(FAMILIES["qwen3_5_moe"], draft=hybrid_draft_dir, expert_residency="stacked") as rt:
        for k, spec in enumerate(("default", None)):
            sid = f"diverge-{k}"
            other = "default" if spec is None else None
            async for _ in rt._stream_ids(first, session_id=sid, max_tokens=6, specdec=other):
                pass
            second = PROMPT[:8] + MORE  # shares 8 tokens with the 26 the stored state covers
            toks, usage = [], None
            async for c in rt._stream_ids(second, session_id=sid, max_tokens=8, specdec=spec):
                toks += c.token_ids
                usage = c.usage or usage
            assert toks == _until_eos(greedy(model, second, 8), set(tok.eos_token_ids)), spec
            assert usage["cached_tokens"] == 0 and usage["prefilled_tokens"] >= len(second) - 1, spec
