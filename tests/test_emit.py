"""THE emitter: text and stop strings in one place, whatever the engines' chunking.

The engines emit token ids; the ledger's ``Emitter`` turns them into text. So a request's text cannot depend on how
its tokens arrive (one per step, whole accepted blocks, a lane move, a replay after a crash): checked here on the
demo model's tokenizer for stop strings that complete and ones that only start (held back, then released), and
through the Runtime for a request that moves from the solo speculative lane into the batch mid-stream with a stop
string, against the same request decoded alone.
"""

from __future__ import annotations

import random

import anyio
import pytest

from mach_runtime import Runtime, load_moe
from mach_runtime.assets import demo_model_path
from mach_runtime.engine.emit import Emitter
from mach_runtime.engine.sampling import SamplingParams

DEMO = demo_model_path()
PROMPT = "def main():\n    parser = argparse.ArgumentParser("


@pytest.fixture(scope="module")
def demo():
    model, tok, store, _ = load_moe(DEMO, expert_residency="stacked")
    from mach_runtime.engine.generate import stream_generate

    toks = [c.token for c in stream_generate(model, tok, PROMPT, max_tokens=40,
                                             params=SamplingParams(max_tokens=40, ignore_eos=True))]
    store.close()
    return tok, toks


def _emit(tok, params, toks, splits):
    em, text, kept, finish, i = Emitter(tok, params), "", [], None, 0
    for n in splits:
        t, finish, k = em.push(toks[i : i + n])
        text, kept, i = text + t, kept + toks[i : i + k], i + n
        if finish:
            break
    if not finish:
        text += em.close("length")
    return text, kept, finish


@pytest.mark.parametrize("kind", ["completes", "breaks", "none"])
def test_text_does_not_depend_on_chunking(demo, kind):
    tok, toks = demo
    full = tok.decode(toks)
    cut = len(tok.decode(toks[:12]))
    stop = {"completes": full[cut - 2 : cut + 3], "breaks": full[cut - 2 : cut] + "\x00\x01", "none": None}[kind]
    params = SamplingParams(max_tokens=len(toks), stop=(stop,) if stop else (), ignore_eos=True)
    ref = _emit(tok, params, toks, [1] * len(toks))
    if kind == "completes":
        assert ref[2] == "stop" and ref[0] == full[: full.find(stop)] and len(ref[1]) < len(toks)
    else:
        assert ref[0] == full and ref[1] == toks
    rng = random.Random(0)
    for _ in range(20):
        splits = []
        while sum(splits) < len(toks):
            splits.append(rng.randint(1, 9))
        assert _emit(tok, params, toks, splits) == ref


@pytest.mark.anyio
async def test_stop_string_across_a_lane_move(demo):
    """The speculative request starts alone (solo lane) and moves into the batch when company arrives; its text
    with a stop string equals its text decoded alone without company."""
    import time

    tok, toks = demo
    full = tok.decode(toks)
    cut = len(tok.decode(toks[:20]))
    stop = full[cut - 1 : cut + 3]

    def slow(actor, point, info):
        if actor == "decoder" and point == "step":
            time.sleep(0.02)

    async with Runtime.open(DEMO, draft=DEMO.parent / "demo-qwen3-moe-dflash", max_batch=4, fault_hook=slow,
                            expert_residency="stacked") as rt:
        alone = await rt.generate(PROMPT, max_tokens=40, stop=[stop])
        out = {}

        async def client(name, prompt, delay, **kw):
            await anyio.sleep(delay)
            out[name] = await rt.generate(prompt, max_tokens=40, **kw)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: client("moved", PROMPT, 0, stop=[stop]))
                tg.start_soon(lambda: client("mate", "import os\n", 0.1))
        s = await rt.stats()
    assert alone.finish_reason == "stop" and alone.text == full[: full.find(stop)]
    assert out["moved"].text == alone.text and out["moved"].token_ids == alone.token_ids
    assert s.decoder.spec_demoted >= 1
