"""Every family serves concurrent requests through the Runtime, as its capability table says (issue 14 item 4).

Families whose caches merge batch the requests; deepseek_v4 (compressed caches: ``Capabilities.batch`` False)
runs them one at a time with the others queued, and ``stats().decoder.batching`` says so. Every request's tokens
equal plain greedy decoding of the same model alone (``tests.helpers.greedy``: mlx-lm's cache loop).
"""

import anyio
import pytest

from mach_runtime import Runtime, load_moe
from mach_runtime.io.arch_registry import REGISTRY
from tests.helpers import greedy

from .family_helpers import FIXTURES

pytestmark = pytest.mark.anyio
ARCHS = ["qwen3_moe", "qwen3_5_moe", "gpt_oss", "gemma4", "deepseek_v4"]
PROMPTS = [[5, 17, 99, 3, 250, 77], [12, 40, 41, 9], [101, 7, 7, 300, 18, 2 * 21, 64, 65], [200]]
N = 8


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.fixture(scope="module", params=ARCHS)
def family(request):
    path = FIXTURES / f"hf_{request.param}"
    model, tok, store, _ = load_moe(path, expert_residency="stacked")
    eos = set(tok.eos_token_ids)
    refs = []
    for p in PROMPTS:
        ids = greedy(model, p, N)
        stop = [i for i, t in enumerate(ids) if t in eos]
        refs.append(ids[: stop[0] + 1] if stop else ids)
    store.close()
    return request.param, path, refs


async def test_concurrent_requests_follow_the_capabilities(family):
    arch, path, refs = family
    caps = REGISTRY[arch].capabilities()
    got = {}
    async with Runtime.open(path, max_batch=4, expert_residency="stacked") as rt:

        async def client(i):
            got[i] = list((await rt.generate(PROMPTS[i], max_tokens=N)).token_ids)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(len(PROMPTS)):
                    tg.start_soon(client, i)
        s = await rt.stats()
    for i in range(len(PROMPTS)):
        assert got[i] == refs[i], (arch, i)
    d = s.decoder
    assert d.completed == len(PROMPTS) and s.decoder_restarts == 0 and d.failed == 0
    if caps.batch:
        assert d.batching == "continuous" and max(d.batch_histogram) > 1
    else:  # one at a time, the others queued
        assert d.batching.startswith("one at a time") and max(d.batch_histogram) == 1 and d.max_batch == 1
