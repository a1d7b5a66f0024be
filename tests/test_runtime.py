"""The actor runtime under both anyio backends: multiplexing, abort/cancel, crash recovery, sessions, errors."""

import anyio
import pytest

from mach_runtime import Runtime
from mach_runtime.errors import RequestError, RuntimeFailedError, UnknownRequestError
from tests.helpers import greedy

pytestmark = pytest.mark.anyio

PROMPTS = [
    "def add(a, b):",
    "import sys\nfor line in sys.stdin:",
    "class Node:\n    def __init__(self, value):\n        self.value = value",
    "x = [",
    "# compute the mean of a list\ndef mean(xs):\n    return",
    "while True:",
    "print('hello",
    "from collections import defaultdict\ncounts = defaultdict(int)\nfor w in words:",
    "try:\n    import json\nexcept ImportError:",
    "lambda",
]
LENGTHS = [12, 20, 7, 16, 9, 24, 5, 14, 11, 18]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Sequential greedy completions from mlx-lm's own model: the tokens every runtime path must produce."""
    from mlx_lm import load as mlx_lm_load

    model, tok = mlx_lm_load(str(tiny_dir))
    out = {}
    for p, n in zip(PROMPTS, LENGTHS):
        ids = greedy(model, tok.encode(p), n)
        stop = [i for i, t in enumerate(ids) if t in tok.eos_token_ids]
        out[p] = ids[: stop[0] + 1] if stop else ids  # generation ends at (and includes) eos
    return out


def streaming_kw():
    return {"expert_residency": "streaming", "expert_cache_gb": 6.5 * 2 * 24576 / 2**30}  # 6 of 16 slots


@pytest.mark.parametrize("residency", ["stacked", "streaming"])
async def test_concurrent_streams_equal_sequential_greedy(tiny_dir, reference, residency):
    kw = streaming_kw() if residency == "streaming" else {"expert_residency": "stacked"}
    got, chunks_seen = {}, {}
    async with Runtime.open(tiny_dir, max_batch=4, **kw) as rt:

        async def client(i):
            await anyio.sleep(0.01 * (i % 5))  # some join a batch that is already running
            ids, chunks = [], []
            async for c in rt.stream(PROMPTS[i], max_tokens=LENGTHS[i]):
                ids.extend(c.token_ids)
                chunks.append(c)
            got[i], chunks_seen[i] = ids, chunks

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(len(PROMPTS)):
                    tg.start_soon(client, i)
        stats = await rt.stats()
    for i, p in enumerate(PROMPTS):
        assert got[i] == reference[p], p
        cs = chunks_seen[i]
        assert cs[-1].finish_reason == ("length" if len(got[i]) == LENGTHS[i] else "stop")
        assert all(c.finish_reason is None for c in cs[:-1])
        assert [c.index for c in cs] == [sum(len(x.token_ids) for x in cs[:k]) for k in range(len(cs))]
    assert stats.decoder.completed == len(PROMPTS) and stats.decoder.active == 0
    assert max(stats.decoder.batch_histogram) == 4  # the batch really filled up
    if residency == "streaming":
        assert stats.experts.misses > 0 and stats.experts.capacity_experts == 12


async def test_break_and_cancel_free_the_slot(tiny_dir, reference):
    async with Runtime.open(tiny_dir, max_batch=4) as rt:
        other = {}

        async def steady():
            other["ids"] = list((await rt.generate(PROMPTS[5], max_tokens=LENGTHS[5])).token_ids)

        async def breaker():
            n = 0
            async for c in rt.stream(PROMPTS[0], max_tokens=200):
                n += 1
                if n == 3:
                    break

        async def cancelled():  # cancelled mid-stream, once it decodes (not a deadline: a GPU's first steps
            with anyio.CancelScope() as scope:  # compile kernels for seconds)
                async for _ in rt.stream(PROMPTS[1], max_tokens=400):
                    scope.cancel()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(steady)
                tg.start_soon(breaker)
                tg.start_soon(cancelled)
            for _ in range(100):  # the aborts are processed at the Decoder's next iteration
                s = await rt.stats()
                if s.live_requests == 0:
                    break
                await anyio.sleep(0.01)
        assert s.decoder.aborted == 2 and s.decoder.active == 0 and s.live_requests == 0
        assert other["ids"] == reference[PROMPTS[5]]


async def test_explicit_abort(tiny_dir):
    async with Runtime.open(tiny_dir) as rt:
        stream = rt.stream(PROMPTS[2], max_tokens=500, request_id="long-one")
        first = await stream.__anext__()
        await rt.abort("long-one")
        rest = [c async for c in stream]
        assert (rest or [first])[-1].finish_reason == "abort"
        with pytest.raises(UnknownRequestError, match="no live request with id 'long-one'"):
            await rt.abort("long-one")
        # the runtime keeps serving
        assert (await rt.generate(PROMPTS[0], max_tokens=3)).finish_reason == "length"


class CrashAt:
    """Fault hook: crash ``actor`` at its ``point`` the given call numbers."""

    def __init__(self, actor, point, calls):
        self.actor, self.point, self.calls, self.n = actor, point, set(calls), 0

    def __call__(self, actor, point, info):
        if actor == self.actor and point == self.point:
            self.n += 1
            if self.n in self.calls:
                raise RuntimeError(f"injected crash #{self.n}")


async def test_decoder_crash_mid_stream_loses_and_duplicates_nothing(tiny_dir, reference):
    hook = CrashAt("decoder", "step", calls={6, 15})
    got = {}
    async with Runtime.open(tiny_dir, max_batch=4, fault_hook=hook, **streaming_kw()) as rt:

        async def client(i):
            ids, idx = [], []
            async for c in rt.stream(PROMPTS[i], max_tokens=LENGTHS[i]):
                idx.append(c.index)
                ids.extend(c.token_ids)
            got[i] = (ids, idx)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(client, i)
        stats = await rt.stats()
    assert stats.decoder_restarts == 2
    for i in range(8):
        ids, idx = got[i]
        assert ids == reference[PROMPTS[i]]
        assert idx == sorted(set(idx))  # strictly increasing positions: nothing delivered twice


async def test_crashes_beyond_intensity_fail_every_caller(tiny_dir):
    hook = CrashAt("decoder", "step", calls=range(1, 1000))
    errors = []
    async with Runtime.open(tiny_dir, fault_hook=hook, restart_intensity=2, restart_period=60) as rt:

        async def client(i):
            try:
                async for _ in rt.stream(PROMPTS[i], max_tokens=30):
                    pass
            except RuntimeFailedError as e:
                errors.append(str(e))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(5):
                    tg.start_soon(client, i)
        assert len(errors) == 5 and "crashed more than 2 times" in errors[0]
        with pytest.raises(RuntimeFailedError):
            rt.stream("more", max_tokens=2)


async def test_async_actor_crash_is_restarted(tiny_dir, reference):
    hook = CrashAt("expert_store", "message", calls={3})
    async with Runtime.open(tiny_dir, fault_hook=hook, **streaming_kw()) as rt:
        with anyio.fail_after(60):
            c = await rt.generate(PROMPTS[3], max_tokens=LENGTHS[3])
            stats = await rt.stats()
    assert list(c.token_ids) == reference[PROMPTS[3]]
    assert stats.expert_store_restarts == 1


async def test_session_reuses_previous_turns(tiny_dir):
    async with Runtime.open(tiny_dir) as rt:
        async with rt.session(system="You write short Python.") as s:
            for turn in ("a function that adds", "now one that subtracts", "and multiplies"):
                async for _ in s.send(turn, max_tokens=6):
                    pass
        usages = [t.usage for t in s.turns]
    assert usages[0]["cached_tokens"] == 0
    for prev, cur in zip(usages, usages[1:]):
        # everything the previous turn left in the KV is reused: its prompt and its whole reply (the pipelined
        # decoder had already fed the reply's last token when the turn finished)
        assert cur["cached_tokens"] == prev["prompt_tokens"] + prev["completion_tokens"]
        assert cur["prefilled_tokens"] == cur["prompt_tokens"] - cur["cached_tokens"] - 1


async def test_slow_consumer_gets_merged_chunks_without_slowing_others(tiny_dir, reference):
    """Event-driven: the slow consumer stops reading after its first chunk until the quick request has finished
    (it would never finish if the Decoder waited for the slow consumer); what was produced for the slow one
    meanwhile arrives merged into its next chunk."""
    async with Runtime.open(tiny_dir, max_batch=4) as rt:
        slow_chunks, fast = [], {}
        quick_done = anyio.Event()

        async def slow():
            async for c in rt.stream(PROMPTS[5], max_tokens=LENGTHS[5]):
                slow_chunks.append(c)
                if len(slow_chunks) == 1:
                    await quick_done.wait()

        async def quick():
            fast["ids"] = list((await rt.generate(PROMPTS[7], max_tokens=LENGTHS[7])).token_ids)
            fast["slow_chunks_read"] = len(slow_chunks)
            quick_done.set()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(slow)
                tg.start_soon(quick)
    ids = [t for c in slow_chunks for t in c.token_ids]
    assert ids == reference[PROMPTS[5]] and len(ids) >= 3
    assert fast["ids"] == reference[PROMPTS[7]] and fast["slow_chunks_read"] <= 1
    assert any(len(c.token_ids) > 1 for c in slow_chunks)  # merged while the consumer was not reading


async def test_sampling_is_reproducible_alone_and_batched(tiny_dir):
    async with Runtime.open(tiny_dir, max_batch=4) as rt:
        kw = dict(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
        alone = (await rt.generate(PROMPTS[0], **kw)).token_ids
        results = {}

        async def run(i, p, k):
            results[i] = (await rt.generate(p, **k)).token_ids

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, 0, PROMPTS[0], kw)
            tg.start_soon(run, 1, PROMPTS[1], kw)
            tg.start_soon(run, 2, PROMPTS[0], {**kw, "seed": 99})
    assert results[0] == alone
    assert results[2] != alone


async def test_stop_strings_and_tokens(tiny_dir, reference):
    from mlx_lm import load as mlx_lm_load

    _, tok = mlx_lm_load(str(tiny_dir))
    ref = reference[PROMPTS[5]]
    full_text = tok.decode(ref)
    async with Runtime.open(tiny_dir) as rt:
        # stop token: the 4th reference token
        c = await rt.generate(PROMPTS[5], max_tokens=LENGTHS[5], stop_token_ids=[ref[3]])
        assert list(c.token_ids) == ref[: ref.index(ref[3]) + 1] and c.finish_reason == "stop"
        # stop string: a piece of the reference text; output ends right before it, nothing after
        stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 3]
        c = await rt.generate(PROMPTS[5], max_tokens=LENGTHS[5], stop=stop)
        assert c.finish_reason == "stop" and stop not in c.text
        assert full_text.startswith(c.text) and c.text == full_text[: full_text.index(stop)]
        assert len(c.token_ids) < len(ref)


async def test_chat_messages_and_bad_input(tiny_dir):
    async with Runtime.open(tiny_dir, max_batch=2) as rt:
        c = await rt.generate([{"role": "user", "content": "hi"}], max_tokens=3)
        assert c.usage["prompt_tokens"] > 3 and len(c.token_ids) == 3
        for kw, match in [
            ({"max_tokens": 0}, "max_tokens must be a positive integer"),
            ({"temperature": -0.5}, "temperature"),
            ({"top_p": 1.5}, "top_p"),
            ({"top_k": -1}, "top_k"),
        ]:
            with pytest.raises(RequestError, match=match):
                rt.stream("x = 1", **kw)
        with pytest.raises(RequestError, match="prompt is empty"):
            rt.stream("")
        with pytest.raises(RequestError, match="exceeds the model's context"):
            rt.stream("x " * 10, max_tokens=40000)
        with pytest.raises(RequestError, match="needs 'role' and 'content'"):
            rt.stream([{"role": "user"}])
        with pytest.raises(RequestError, match="prompt must be"):
            rt.stream(3.14)
        with pytest.raises(UnknownRequestError):
            await rt.abort("never-submitted")
        with pytest.raises(RequestError, match="already in use"):
            s1 = rt.stream("a", max_tokens=50, request_id="dup")
            await s1.__anext__()
            s2 = rt.stream("b", max_tokens=5, request_id="dup")
            await s2.__anext__()
        await s1.aclose()
        # still serving
        c = await rt.generate("ok", max_tokens=4)
        assert c.finish_reason in ("length", "stop") and 1 <= len(c.token_ids) <= 4


async def test_prefetch_predictor_keeps_output_and_reconciles(tiny_dir, reference):
    from actors.expert_store import RecentExpertsPredictor

    kw = {"expert_residency": "streaming", "expert_cache_gb": 4.5 * 2 * 24576 / 2**30}  # bank = top-k
    async with Runtime.open(tiny_dir, predictor=RecentExpertsPredictor(window=8), **kw) as rt:
        c = await rt.generate(PROMPTS[9], max_tokens=LENGTHS[9])
        s = (await rt.stats()).experts
    assert list(c.token_ids) == reference[PROMPTS[9]]
    assert s.prefetched > 0
    assert s.bytes_read == (s.misses - s.prefetch_used + s.prefetched) * s.expert_bytes


async def test_caller_exception_propagates_unwrapped(tiny_dir):
    with pytest.raises(KeyError, match="mine"):
        async with Runtime.open(tiny_dir) as rt:
            await rt.generate("x", max_tokens=2)
            raise KeyError("mine")


async def test_open_errors_are_clear_and_leave_no_threads(tmp_path):
    import threading

    from mach_runtime.errors import CheckpointNotFoundError, ConfigError

    before = {t.name for t in threading.enumerate()}
    with anyio.fail_after(30):
        with pytest.raises(CheckpointNotFoundError, match="does not exist"):
            async with Runtime.open(tmp_path / "missing"):
                pass
        with pytest.raises(ConfigError, match="max_batch"):
            async with Runtime.open(tmp_path / "missing", max_batch=0):
                pass
    for _ in range(50):
        if not {t.name for t in threading.enumerate()} - before:
            break
        await anyio.sleep(0.02)
    assert not {t.name for t in threading.enumerate() if t.name.startswith("mach-")} - before


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    from mach_runtime.engine.specdec.draft import save_dflash_draft
    from tests.test_specdec import random_draft

    return save_dflash_draft(random_draft(2, [0, 1]), tmp_path_factory.mktemp("rt_draft") / "dflash")


async def test_lone_request_decodes_speculatively_and_losslessly(tiny_dir, reference, draft_dir):
    from mach_runtime import BlockSpecDecEngineConfig

    async with Runtime.open(tiny_dir, draft=draft_dir, warmup=True, **streaming_kw()) as rt:
        c = await rt.generate(PROMPTS[5], max_tokens=LENGTHS[5])
        s = await rt.stats()
    assert list(c.token_ids) == reference[PROMPTS[5]]
    assert s.decoder.spec_requests == 1 and s.decoder.spec_cycles > 0 and s.decoder.steps == 0
    assert s.specdec["specdec_cycles"] > 0 and s.specdec["specdec_drafted"] >= s.specdec["specdec_accepted"]
    # prompt lookup needs no draft; a request may choose its own mode and policy
    cfg = BlockSpecDecEngineConfig(mode="prompt_lookup", block_size=4, policy="fixed")
    async with Runtime.open(tiny_dir, specdec=cfg) as rt:
        c = await rt.generate(PROMPTS[7], max_tokens=LENGTHS[7])
        plain = await rt.generate(PROMPTS[7], max_tokens=LENGTHS[7], specdec=None)
        with pytest.raises(RequestError, match="needs a DFlash draft"):
            rt.stream("x", specdec="native_v7")
        with pytest.raises(RequestError, match="unknown policy"):
            rt.stream("x", specdec_policy="yolo")
    assert list(c.token_ids) == list(plain.token_ids) == reference[PROMPTS[7]]


async def test_speculative_cycles_feed_the_expert_predictor(tiny_dir, reference, draft_dir):
    from actors.expert_store import RecentExpertsPredictor

    kw = {"expert_residency": "streaming", "expert_cache_gb": 4.5 * 2 * 24576 / 2**30}  # bank = top-k
    async with Runtime.open(tiny_dir, draft=draft_dir, predictor=RecentExpertsPredictor(window=8), **kw) as rt:
        c = await rt.generate(PROMPTS[9], max_tokens=LENGTHS[9])
        s = await rt.stats()
    assert list(c.token_ids) == reference[PROMPTS[9]]
    assert s.decoder.spec_cycles > 0 and s.decoder.steps == 0  # the lone request ran speculatively only
    e = s.experts
    assert e.prefetched > 0  # from the routing its cycles reported
    assert e.bytes_read == (e.misses - e.prefetch_used + e.prefetched) * e.expert_bytes


async def test_speculative_request_joins_the_batch_when_company_arrives(tiny_dir, reference, draft_dir):
    """Event-driven: the Decoder is held after the lone request's first speculative cycle until the two others
    are submitted, so they arrive while it runs alone (in the solo lane) whatever the machine's speed."""
    import threading

    from actors.slot import call_soon, loop_token

    crash = CrashAt("decoder", "step", calls={9})
    alone, company = anyio.Event(), threading.Event()
    token = loop_token()

    def hook(actor, point, info):
        if actor == "decoder" and point == "step" and not company.is_set():
            call_soon(token, alone.set)  # the lone request has run a cycle alone
            company.wait(timeout=60)  # the Decoder waits (on the MLX thread) for the company
        crash(actor, point, info)

    got = {}
    try:
        async with Runtime.open(tiny_dir, draft=draft_dir, max_batch=4, fault_hook=hook) as rt:

            async def consume(i, stream):
                got[i] = [t async for c in stream for t in c.token_ids]

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(consume, 5, rt.stream(PROMPTS[5], max_tokens=LENGTHS[5]))
                    await alone.wait()
                    for i in (2, 7):  # submitted (in the ledger, sent to the Decoder) before it steps again
                        s = rt.stream(PROMPTS[i], max_tokens=LENGTHS[i])
                        await s._start()
                        tg.start_soon(consume, i, s)
                    company.set()
            s = await rt.stats()
    finally:
        company.set()
    for i in (5, 2, 7):
        assert got[i] == reference[PROMPTS[i]], i
    assert s.decoder.spec_requests >= 1 and s.decoder.spec_demoted >= 1 and s.decoder_restarts == 1


