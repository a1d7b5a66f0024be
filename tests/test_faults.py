"""One bad request never takes the runtime down (issue 20, items 1-2), under both anyio backends.

A request's own fault (its admission, its prefill, its step) fails it alone with an error naming the cause; the
others keep exactly their tokens and the runtime serves afterwards, with no Decoder restart. A batched step that
fails with an unknown culprit is retried row by row in isolation first. An abort is recorded in the ledger at
once: it survives a Decoder crash (never re-admitted) and the stream ends at once.
"""

import time

import anyio
import pytest

from mach_runtime import Runtime
from mach_runtime.errors import RequestError
from tests.test_runtime import LENGTHS, PROMPTS, reference  # noqa: F401  (the fixture)

pytestmark = pytest.mark.anyio
INNOCENT = (0, 1, 3, 5)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


async def _serve(rt, poison_kw, poison_prompt=PROMPTS[2]):
    got, errors = {}, {}

    async def client(i, prompt, **kw):
        try:
            got[i] = list((await rt.generate(prompt, max_tokens=LENGTHS[i] if i != "poison" else 12, **kw)).token_ids)
        except RequestError as e:
            errors[i] = str(e)

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            for i in INNOCENT:
                tg.start_soon(client, i, PROMPTS[i])
            tg.start_soon(lambda: client("poison", poison_prompt, request_id="poison", **poison_kw))
    return got, errors


async def test_poison_admission_fails_alone(tiny_dir, reference):
    def hook(actor, point, info):
        if actor == "decoder" and point == "admit" and info["request_id"] == "poison":
            raise TypeError("a parameter this engine cannot take")

    async with Runtime.open(tiny_dir, max_batch=8, fault_hook=hook, expert_residency="stacked") as rt:
        got, errors = await _serve(rt, {})
        assert set(errors) == {"poison"} and "TypeError" in errors["poison"] and "cannot take" in errors["poison"]
        for i in INNOCENT:
            assert got[i] == reference[PROMPTS[i]], i
        after = await rt.generate(PROMPTS[4], max_tokens=LENGTHS[4])  # it serves afterwards
        s = await rt.stats()
    assert list(after.token_ids) == reference[PROMPTS[4]]
    assert s.decoder_restarts == 0 and s.decoder.failed == 1 and s.live_requests == 0


async def test_poison_step_is_found_by_isolated_retries(tiny_dir, reference):
    """A logits processor that raises on its 3rd call fails its batched step: every row is retried alone once;
    only the poison request fails."""
    calls = []

    def poison(tokens, logits):
        calls.append(1)
        if len(calls) >= 3:
            raise ValueError("poison processor")
        return logits

    async with Runtime.open(tiny_dir, max_batch=8, expert_residency="stacked") as rt:
        got, errors = await _serve(rt, {"logits_processors": [poison]})
        s = await rt.stats()
        assert set(errors) == {"poison"} and "poison processor" in errors["poison"]
        for i in INNOCENT:
            assert got[i] == reference[PROMPTS[i]], i
        assert list((await rt.generate(PROMPTS[4], max_tokens=LENGTHS[4])).token_ids) == reference[PROMPTS[4]]
    assert s.decoder_restarts == 0 and s.decoder.failed == 1 and s.decoder.isolated_retries >= 2


@pytest.mark.parametrize("bad", [{"stop": [5]}, {"stop": [b"ab"]}, {"stop": [("a",)]}])
async def test_bad_parameters_are_refused_at_the_boundary(tiny_dir, bad):
    async with Runtime.open(tiny_dir, expert_residency="stacked") as rt:
        with pytest.raises(RequestError, match="stop"):
            await rt.generate(PROMPTS[0], max_tokens=4, **bad)
        assert (await rt.generate(PROMPTS[0], max_tokens=3)).finish_reason in ("length", "stop")


async def test_abort_survives_a_decoder_crash(tiny_dir, reference):
    """The Decoder crashes right after an abort is asked for: the stream has ended already, the restarted Decoder
    does not re-admit it, and the other request completes exactly."""
    aborted = anyio.Event()
    state = {"crashed": False}

    def hook(actor, point, info):
        if actor == "decoder" and point == "step":
            time.sleep(0.01)
            if aborted.is_set() and not state["crashed"]:
                state["crashed"] = True
                raise RuntimeError("injected crash after the abort")

    async with Runtime.open(tiny_dir, max_batch=4, fault_hook=hook, expert_residency="stacked") as rt:
        other = {}

        async def bystander():
            other["ids"] = list((await rt.generate(PROMPTS[5], max_tokens=LENGTHS[5])).token_ids)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(bystander)
                chunks = []
                async with rt.stream(PROMPTS[1], max_tokens=400, request_id="long") as s:
                    async for c in s:
                        chunks.append(c)
                        if len(chunks) == 3:
                            await rt.abort("long")
                            aborted.set()
                            t0 = time.monotonic()
                        if c.finish_reason:
                            break
                ended = time.monotonic() - t0
        st = await rt.stats()
    assert chunks[-1].finish_reason == "abort" and sum(len(c.token_ids) for c in chunks) < 50
    assert ended < 5  # at once, not after the request's 400 tokens
    assert state["crashed"] and st.decoder_restarts == 1 and st.live_requests == 0
    assert other["ids"] == reference[PROMPTS[5]]


async def test_close_stops_decoding_promptly(tiny_dir):
    """Leaving ``Runtime.open`` while a long request decodes: the close returns at once and the caller gets an
    error (not 2000 tokens later)."""
    errors = []

    async def long(rt):
        try:
            await rt.generate(PROMPTS[0], max_tokens=2000)
        except Exception as e:
            errors.append(e)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            async with Runtime.open(tiny_dir, max_batch=4, expert_residency="stacked") as rt:
                tg.start_soon(long, rt)
                while (steps := (await rt.stats()).decoder.steps) < 3:  # decoding steadily (a GPU compiles kernels
                    await anyio.sleep(0.01)  # during the first steps): the close then waits for one step at most
                t0 = time.monotonic()
            closed = time.monotonic() - t0
    assert closed < 5 and len(errors) == 1 and steps < 1000
