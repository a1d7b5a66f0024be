"""A shard that vanishes, shrinks or is replaced by a FIFO/directory while the Runtime serves (streaming
residency): the requests that need it fail with a ``CheckpointError`` naming the file, the Decoder and the
ExpertStore stay up (no restart), and requests succeed again — with the reference tokens — once the file is back.
"""

import json
import os
import re

import anyio
import pytest

from mach_runtime import Runtime, load_moe
from mach_runtime.errors import CheckpointError, CheckpointNotFoundError, RequestError
from tests.helpers import HF_QWEN3_MOE, convert, greedy

pytestmark = pytest.mark.anyio

PROMPTS = [list(range(1, 40)), list(range(7, 47))]  # long enough that every layer routes to nearly every expert
N = 12


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The HF fixture as shards (per-expert layout) and the greedy tokens of mlx-lm's own model class (loaded by
    ``mach_runtime.load``: mlx-lm's loader with the transformers-5 config normalised for it)."""
    from mach_runtime import load as mlx_lm_load

    path = convert(HF_QWEN3_MOE, tmp_path_factory.mktemp("shards") / "ckpt", shard_bytes=150_000)
    model, _ = mlx_lm_load(str(path))
    ref = [greedy(model, p, N) for p in PROMPTS]
    wm = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    counts = {}
    for name, f in wm.items():
        if ".experts." in name:
            counts[f] = counts.get(f, 0) + 1
    expert_shard = max(counts, key=counts.get)  # the shard holding the most expert tensors
    return path, ref, expert_shard


def _streaming():
    return {"expert_residency": "streaming", "expert_slots": 2}  # top-k slots: nearly every step reads


async def _run(rt, prompt, n=N):
    out = []
    async for c in rt.stream(prompt, max_tokens=n):
        out.extend(c.token_ids)
    return out


async def _all(rt, prompts):
    """Runs the prompts concurrently: (tokens or the exception) per prompt."""
    res = [None] * len(prompts)

    async def one(i):
        try:
            res[i] = await _run(rt, prompts[i])
        except Exception as e:  # noqa: BLE001 - the test inspects it
            res[i] = e

    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(one, i)
    return res


async def _no_restarts(rt):
    s = await rt.stats()
    assert s.restarts == {"decoder": 0, "expert_store": 0, "cache": 0} and not s.closed and s.live_requests == 0


async def test_shard_renamed_away_and_back(sharded, tmp_path):
    path, ref, shard = sharded
    f, away = path / shard, tmp_path / (shard + ".moved")
    async with Runtime.open(path, max_batch=4, **_streaming()) as rt:
        os.rename(f, away)  # after open, before any expert of it was read
        try:
            with anyio.fail_after(120):
                res = await _all(rt, PROMPTS)
            for r in res:
                assert isinstance(r, CheckpointNotFoundError) and not isinstance(r, RequestError), r
                assert str(f) in str(r) and "put it back" in str(r)
            await _no_restarts(rt)
        finally:
            os.rename(away, f)
        with anyio.fail_after(120):
            assert await _all(rt, PROMPTS) == ref  # the file is back: reopened on the next read
        await _no_restarts(rt)


async def test_shard_truncated_mid_run_then_restored(sharded):
    path, ref, shard = sharded
    f = path / shard
    data = f.read_bytes()
    shrunk = []

    def shrink_at_step_2(actor, point, info):  # on the MLX thread, between two decode steps of the request
        if actor == "decoder" and point == "step" and info["steps"] == 2 and not shrunk:
            with open(f, "r+b") as fh:
                fh.truncate(4096)
            shrunk.append(True)

    async with Runtime.open(path, max_batch=4, fault_hook=shrink_at_step_2, **_streaming()) as rt:
        got, err = [], None
        with anyio.fail_after(120):
            try:
                async for c in rt.stream(PROMPTS[0], max_tokens=40):
                    got.extend(c.token_ids)
            except Exception as e:  # noqa: BLE001
                err = e
            finally:
                f.write_bytes(data)  # restored in place (same inode)
        assert shrunk and 2 <= len(got) < 40
        assert isinstance(err, CheckpointError) and not isinstance(err, RequestError), err
        assert str(f) in str(err) and "unexpected end of file" in str(err)
        assert got == ref[0][: len(got)]  # what was delivered before the fault was right
        await _no_restarts(rt)
        with anyio.fail_after(120):
            assert await _all(rt, PROMPTS) == ref
        await _no_restarts(rt)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
async def test_fifo_or_directory_in_place_of_a_shard_while_serving(sharded, tmp_path, kind):
    path, ref, shard = sharded
    f, away = path / shard, tmp_path / (shard + ".moved")
    async with Runtime.open(path, max_batch=4, **_streaming()) as rt:
        os.rename(f, away)
        os.mkfifo(f) if kind == "fifo" else f.mkdir()
        try:
            with anyio.fail_after(60):  # a FIFO is never opened for a blocking read: no hang
                res = await _all(rt, PROMPTS[:1])
            want = "a FIFO (named pipe)" if kind == "fifo" else "a directory"
            assert isinstance(res[0], CheckpointError) and f"{f}: is {want}" in str(res[0]), res[0]
            await _no_restarts(rt)
        finally:
            os.rmdir(f) if kind == "directory" else os.unlink(f)
            os.rename(away, f)
        with anyio.fail_after(120):
            assert await _all(rt, PROMPTS[:1]) == ref[:1]


@pytest.mark.parametrize("residency", ["stacked", "streaming"])
@pytest.mark.parametrize("kind", ["fifo", "directory"])
@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_fifo_or_directory_in_place_of_a_shard_at_load(tmp_path, kind, layout, residency):
    path = convert(HF_QWEN3_MOE, tmp_path / "ckpt", shard_bytes=150_000 if layout == "sharded" else None)
    f = sorted(path.glob("model*.safetensors"))[-1]
    f.unlink()
    os.mkfifo(f) if kind == "fifo" else f.mkdir()
    want = "a FIFO (named pipe)" if kind == "fifo" else "a directory"
    with pytest.raises(CheckpointError, match=re.escape(f"{f.name}: is {want}, not a safetensors file")) as e:
        load_moe(path, expert_residency=residency)
    assert not isinstance(e.value, CheckpointNotFoundError)  # not "missing"
