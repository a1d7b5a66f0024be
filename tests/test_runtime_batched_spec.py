"""The runtime's spec batch (``Runtime.open(spec_batch=N)``) under both anyio backends: 2..N concurrent requests
of which one at least is speculative run together in a ``BatchedSpecDecoder``; more than N move to the target-only
batch and back, a lone request starts in the solo lane. Every output must equal sequential greedy decoding, every
token position must arrive once (KV handed over between lanes: nothing delivered twice or lost, nothing computed
prefilled again), through a Decoder crash, an abort, sessions, and on the hybrid qwen3_5_moe."""

from __future__ import annotations

import anyio
import pytest

from mach_runtime import BlockSpecDecEngineConfig, Runtime, load_moe
from mach_runtime.errors import ConfigError
from tests.family_helpers import FAMILIES
from tests.helpers import greedy, slow_steps
from tests.test_runtime import CrashAt
from tests.test_specdec import random_draft

pytestmark = pytest.mark.anyio

PROMPTS = [
    [5, 17, 99, 3, 250, 77, 12, 40, 41],
    [7, 8, 9],
    [100, 200, 300, 400, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
    [42, 43],
    [31, 32, 33, 34, 35],
]
SPEC = BlockSpecDecEngineConfig(mode="native_v7", block_size=4, policy="fixed")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


def _until_eos(ids, eos) -> list[int]:
    stop = [i for i, t in enumerate(ids) if t in eos]
    return ids[: stop[0] + 1] if stop else ids


class _Ref:
    """Sequential greedy completions of one family (what every runtime path must produce)."""

    def __init__(self, path):
        self.model, self.tok, _, _ = load_moe(path, expert_residency="stacked")
        self.eos = set(self.tok.eos_token_ids)
        self._memo = {}

    def __call__(self, prompt, n) -> list[int]:
        key = (tuple(prompt), n)
        if key not in self._memo:
            self._memo[key] = _until_eos(greedy(self.model, list(prompt), n), self.eos)
        return self._memo[key]


@pytest.fixture(scope="module")
def families(tiny_dir, tmp_path_factory):
    from mach_runtime.engine.specdec.draft import save_dflash_draft

    root = tmp_path_factory.mktemp("rbs")
    return {
        "qwen3": (tiny_dir, save_dflash_draft(random_draft(2, [0, 1]), root / "d2"), _Ref(tiny_dir)),
        "hybrid": (FAMILIES["qwen3_5_moe"], save_dflash_draft(random_draft(3, [0, 2]), root / "d3"),
                   _Ref(FAMILIES["qwen3_5_moe"])),
    }


async def _client(rt, got, i, prompt, n, kw=None):
    kw = kw or {}
    ids, chunks = [], []
    async for c in rt.stream(prompt, max_tokens=n, **kw):
        ids.extend(c.token_ids)
        chunks.append(c)
    got[i] = (ids, chunks)


def _check(got, ref, jobs):
    """Exact tokens; positions contiguous (each delivered once); nothing prefilled twice (a lane move hands the
    KV over: the solo lane prefills the whole prompt, a batch all but its last token)."""
    for i, (prompt, n, *_) in jobs.items():
        ids, chunks = got[i]
        assert ids == ref(prompt, n), i
        assert [c.index for c in chunks] == [sum(len(x.token_ids) for x in chunks[:k]) for k in range(len(chunks))]
        u = chunks[-1].usage
        assert u["cached_tokens"] == 0 and u["prefilled_tokens"] in (len(prompt) - 1, len(prompt)), (i, u)


async def test_concurrent_speculative_streams_run_as_one_spec_batch(families):
    path, draft, ref = families["qwen3"]
    jobs = {i: (PROMPTS[i], 16) for i in range(4)}
    got = {}
    async with Runtime.open(path, draft=draft, specdec=SPEC, spec_batch=4, max_batch=4,
                            expert_residency="stacked") as rt:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i, (p, n) in jobs.items():
                    tg.start_soon(_client, rt, got, i, p, n)
        s = await rt.stats()
    _check(got, ref, jobs)
    d = s.decoder
    assert s.decoder_restarts == 0
    assert d.spec_batch_cycles > 0 and 4 in d.spec_batch_histogram  # the four verified together
    assert d.steps == 0 and d.spec_requests == 4 and d.completed == 4 and d.active == 0
    assert d.prefilled_tokens == sum(got[i][1][-1].usage["prefilled_tokens"] for i in jobs)
    assert s.specdec_batch["batch_steps"] == d.spec_batch_cycles and s.specdec_batch["specdec_drafted"] > 0


@pytest.mark.parametrize("family", ["qwen3", "hybrid"])
async def test_a_fifth_request_moves_the_group_to_target_only_batching_until_it_drains(families, family):
    """4 rows (DFlash, target-only, prompt lookup: each its own mode) run in the spec batch; a 5th arrives → all
    five in the target-only batch (the four move with their KV); the shortest finishes → the other four stay there
    (the lane policy: a batch that outgrew the spec lane keeps its requests until it drains, no flapping)."""
    path, draft, ref = families[family]
    lookup = {"specdec": "prompt_lookup"}
    jobs = {0: (PROMPTS[0], 10, {}), 1: (PROMPTS[1], 28, {"specdec": None}), 2: (PROMPTS[2], 28, {}),
            3: (PROMPTS[3], 28, lookup), 4: (PROMPTS[4], 24, lookup)}
    got, started = {}, {}
    async with Runtime.open(path, draft=draft, specdec=SPEC, spec_batch=4, max_batch=8, fault_hook=slow_steps(),
                            expert_residency="stacked") as rt:

        async def early(i):
            ids, chunks = [], []
            async for c in rt.stream(jobs[i][0], max_tokens=jobs[i][1], **jobs[i][2]):
                ids.extend(c.token_ids)
                chunks.append(c)
                started[i] = True
            got[i] = (ids, chunks)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(early, i)
                while len(started) < 4:  # all four are running (in the spec batch) ...
                    await anyio.sleep(0.005)
                tg.start_soon(_client, rt, got, 4, *jobs[4])  # ... when the fifth arrives
        s = await rt.stats()
    _check(got, ref, jobs)
    d = s.decoder
    assert s.decoder_restarts == 0
    assert d.steps > 0 and max(d.batch_histogram) == 5  # target-only batching of all five
    assert d.spec_batch_moves == 4  # four out of the spec batch, none back in
    # the three speculative ones of the first four: the fifth never ran speculatively
    assert d.spec_batch_cycles > 0 and d.completed == 5 and d.active == 0 and d.spec_requests == 3
    assert 4 in d.batch_histogram  # after the shortest finished, the four stayed in the target-only batch


async def test_a_target_only_row_left_alone_returns_to_the_target_only_batch(families):
    path, draft, ref = families["qwen3"]
    jobs = {0: (PROMPTS[0], 4, {}), 1: (PROMPTS[2], 24, {"specdec": None})}
    got = {}
    async with Runtime.open(path, draft=draft, specdec=SPEC, spec_batch=2, max_batch=2, fault_hook=slow_steps(),
                            expert_residency="stacked") as rt:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i, job in jobs.items():
                    tg.start_soon(_client, rt, got, i, *job)
        s = await rt.stats()
    _check(got, ref, jobs)
    d = s.decoder
    assert s.decoder_restarts == 0 and d.spec_requests == 1
    # (the target-only request may also have started alone in the target-only batch and moved in)
    assert 2 in d.spec_batch_histogram and d.spec_batch_moves >= 1 and d.steps > 0 and d.batch_histogram == {1: d.steps}


async def test_decoder_crash_mid_stream_loses_and_duplicates_nothing(families):
    path, draft, ref = families["qwen3"]
    lookup = {"specdec": "prompt_lookup"}
    jobs = {0: (PROMPTS[0], 20, {}), 1: (PROMPTS[1], 20, {}), 3: (PROMPTS[3], 24, lookup), 4: (PROMPTS[4], 24, lookup)}
    got = {}
    async with Runtime.open(path, draft=draft, specdec=SPEC, spec_batch=4, max_batch=4,
                            fault_hook=CrashAt("decoder", "step", calls={4, 12}), expert_residency="stacked") as rt:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i, job in jobs.items():
                    tg.start_soon(_client, rt, got, i, *job)
        s = await rt.stats()
    assert s.decoder_restarts == 2 and s.decoder.spec_batch_cycles > 0 and s.decoder.active == 0
    for i, (p, n, _) in jobs.items():
        ids, chunks = got[i]
        assert ids == ref(p, n), i  # replayed as prompt + delivered tokens: continues at the next position
        assert [c.index for c in chunks] == [sum(len(x.token_ids) for x in chunks[:k]) for k in range(len(chunks))]


async def test_abort_of_one_row_frees_it_and_the_others_finish(families):
    path, draft, ref = families["qwen3"]
    jobs = {i: (PROMPTS[i], 16) for i in (1, 2, 3)}
    got = {}
    async with Runtime.open(path, draft=draft, specdec=SPEC, spec_batch=4, max_batch=4, fault_hook=slow_steps(),
                            expert_residency="stacked") as rt:

        async def breaker():
            n = 0
            async for _ in rt.stream(PROMPTS[0], max_tokens=200):
                n += 1
                if n == 3:
                    break

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(breaker)
                for i, (p, n) in jobs.items():
                    tg.start_soon(_client, rt, got, i, p, n)
            for _ in range(100):  # the abort is processed at the Decoder's next iteration
                s = await rt.stats()
                if s.live_requests == 0:
                    break
                await anyio.sleep(0.01)
    _check(got, ref, jobs)
    d = s.decoder
    assert s.decoder_restarts == 0
    assert d.aborted == 1 and d.completed == 3 and d.active == 0 and s.live_requests == 0
    assert 4 in d.spec_batch_histogram and d.steps == 0


async def test_sessions_in_the_spec_batch_store_kv_and_draft_context(families):
    """Two sessions' turns run side by side in the spec batch; each finished turn stores its KV (with the
    draft's context) and the next turn prefills only the new tokens."""
    path, draft, ref = families["qwen3"]
    turns = {}
    async with Runtime.open(path, draft=draft, specdec=SPEC, spec_batch=2, max_batch=4,
                            expert_residency="stacked") as rt:

        async def converse(k):
            out = []
            async with rt.session(system=f"Session {k}.") as s:
                for user in ("a function that adds", "now one that subtracts"):
                    ids = s._prompt_ids(user)[0]
                    async for _ in s.send(user, max_tokens=8):
                        pass
                    out.append((ids, s.turns[-1]))
            turns[k] = out

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(converse, 0)
                tg.start_soon(converse, 1)
        s = await rt.stats()
    assert s.decoder.spec_batch_cycles > 0 and s.decoder_restarts == 0
    for k in (0, 1):
        (ids0, c0), (ids1, c1) = turns[k]
        assert list(c0.token_ids) == ref(ids0, 8) and list(c1.token_ids) == ref(ids1, 8)
        history = len(ids0) + len(c0.token_ids)
        assert history - 1 <= c1.usage["cached_tokens"] <= history  # the whole first turn was reused
        assert c1.usage["prefilled_tokens"] <= c1.usage["prompt_tokens"] - c1.usage["cached_tokens"]


async def test_families_without_batched_verification_fall_back(families):
    with pytest.raises(ConfigError, match="spec_batch"):
        async with Runtime.open(families["qwen3"][0], spec_batch=1):
            pass
    # gpt_oss (sliding windows): no spec batch, today's lanes, still lossless
    lookup = BlockSpecDecEngineConfig(mode="prompt_lookup", block_size=4, policy="fixed")
    async with Runtime.open(FAMILIES["gpt_oss"], specdec=lookup, spec_batch=2, expert_residency="stacked") as rt:
        assert rt._spec_batch is None
        model, tok, _, _ = load_moe(FAMILIES["gpt_oss"], expert_residency="stacked")
        got = {}
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in (0, 1):
                    tg.start_soon(_client, rt, got, i, PROMPTS[i], 8)
        s = await rt.stats()
    for i in (0, 1):
        assert got[i][0] == _until_eos(greedy(model, PROMPTS[i], 8), set(tok.eos_token_ids))
    assert s.decoder.spec_batch_cycles == 0 and s.specdec_batch is None and s.decoder_restarts == 0
