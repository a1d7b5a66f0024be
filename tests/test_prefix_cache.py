"""The prefix cache through the Runtime, for every family the Runtime serves: outputs after an L1 hit, an L2 hit in
a fresh Runtime in a new process, and a partial-prefix hit are token-identical to plain greedy decoding (mlx-lm's
KV cache loop, the independent reference); also with speculative decoding on. Plus: corrupt L2 files are misses,
budgets hold under churn, and a Decoder crash mid-save loses nothing already cached. Both anyio backends.

Which prefixes a family can serve (``kv_snapshot``): qwen3_moe's attention KV can be cut, so any common prefix of
an earlier request is reused; GatedDeltaNet state (qwen3_5_moe), wrapped sliding windows (gpt_oss, gemma4 with
a prompt longer than their window) and deepseek_v4's compressed caches cover exactly the tokens they were saved at,
so their partial hits come from block-boundary snapshots taken during an earlier prefill, ``warm_prefix`` points
or a session's previous turn.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import anyio
import pytest

from mach_runtime import Runtime, load_moe
from tests.family_helpers import FAMILIES
from tests.helpers import child_env, greedy, stream_tokens

PROMPT = [5, 17, 99, 3, 250, 77, 12, 40, 41, 7, 8, 9, 10] * 3  # 39 tokens: longer than the sliding windows (4)
OTHER = [3, 4, 5, 6, 200, 201]
CUT = 32  # a partial prefix: two blocks of 16
N = 10
OPEN = dict(expert_residency="stacked", prefix_block_size=16)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


def _path(family, tiny_dir):
    if family == "deepseek_v4":
        return os.path.join(os.path.dirname(FAMILIES["gpt_oss"]), "hf_deepseek_v4")
    return tiny_dir if family == "qwen3_moe" else FAMILIES[family]


@pytest.fixture(scope="module")
def refs(tiny_dir):
    """family -> (greedy continuations of PROMPT and of the partial-prefix prompt, eos ids, layer count)."""
    out = {}
    for family in ("qwen3_moe", "qwen3_5_moe", "gpt_oss", "gemma4", "deepseek_v4"):
        model, tok, _, _ = load_moe(_path(family, tiny_dir), expert_residency="stacked")
        eos = set(tok.eos_token_ids)
        out[family] = (_until_eos(greedy(model, PROMPT, N), eos), _until_eos(greedy(model, PROMPT[:CUT] + OTHER, N), eos),
                       len(model.layers))
        del model
    return out


def _until_eos(ids, eos):
    stop = [i for i, t in enumerate(ids) if t in eos]
    return ids[: stop[0] + 1] if stop else ids


async def _gen(rt, ids, **kw):  # (tests/helpers.py)
    return await stream_tokens(rt, ids, N, **kw)


CHILD = r"""
import json, sys, anyio
from mach_runtime import Runtime
ckpt, d, draft, backend = sys.argv[1], sys.argv[2], sys.argv[3] or None, sys.argv[4]
prompts = json.loads(sys.argv[5])
async def main():
    out = []
    async with Runtime.open(ckpt, draft=draft, prefix_cache_dir=d, expert_residency="stacked",
                            prefix_block_size=16) as rt:
        for p in prompts:
            toks, usage = [], None
            async for c in rt._stream_ids(p, max_tokens=%d):
                toks += c.token_ids
                usage = c.usage or usage
            out.append([toks, usage])
        s = await rt.stats()
    print(json.dumps({"out": out, "l2_hits": s.prefix_cache.l2.hits, "corrupt": s.prefix_cache.disk.corrupt_dropped}))
anyio.run(main, backend=backend)
""" % N


def run_child(ckpt, directory, prompts, draft=None, backend="asyncio") -> dict:
    """A fresh Runtime in a new process over the same L2 directory."""
    r = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(directory), str(draft or ""), backend,
                        json.dumps(prompts)], capture_output=True, text=True, timeout=600,
                       env=child_env(os.getcwd()))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# every family on asyncio; on trio qwen3_moe in the default suite, the other families with -m slow (the event-loop
# side of a hit is family-independent; each case starts a new process for its L2 hit: ~8 s)
HIT_CASES = [pytest.param(b, f, marks=pytest.mark.slow) if b == "trio" and f != "qwen3_moe" else (b, f)
             for f in ("qwen3_moe", "qwen3_5_moe", "gpt_oss", "gemma4", "deepseek_v4") for b in ("asyncio", "trio")]


@pytest.mark.parametrize("anyio_backend,family", HIT_CASES)
async def test_hits_are_token_identical(family, tiny_dir, refs, tmp_path, anyio_backend):
    """Exact-only caches (GatedDeltaNet state, wrapped windows, deepseek_v4's compressed KV, which also runs one
    request at a time) serve the partial prefix from the block-boundary snapshot (16 and 32 tokens) taken during
    the first request's prefill; qwen3_moe's KV is cut from the admission snapshot."""
    ref, ref_partial, _ = refs[family]
    path = _path(family, tiny_dir)
    partial = PROMPT[:CUT] + OTHER
    async with Runtime.open(path, prefix_cache_dir=tmp_path, **OPEN) as rt:
        cold, u0 = await _gen(rt, PROMPT)
        l1, u1 = await _gen(rt, PROMPT)  # the admission snapshot (PROMPT[:-1]) or the finished one, cut
        s = await rt.stats()
        assert s.prefix_cache.l1.hits == 1
        part, up = await _gen(rt, partial)
        s = await rt.stats()
        # qwen3_moe: admission + finish snapshots; exact-only: + the two boundary snapshots
        assert s.prefix_cache.l1.entries >= (2 if family == "qwen3_moe" else 4), s
        assert s.decoder_restarts == 0 and s.cache_restarts == 0, s
    assert cold == ref and l1 == ref and part == ref_partial
    assert u0["cached_tokens"] == 0 and u0["prefilled_tokens"] == len(PROMPT) - 1
    assert u1["cached_tokens"] == len(PROMPT) - 1 and u1["prefilled_tokens"] == 0
    assert up["cached_tokens"] == CUT and up["prefilled_tokens"] == len(partial) - 1 - CUT, (up, s)

    # L2: a fresh runtime in a new process restores from disk, identically
    child = run_child(path, tmp_path, [PROMPT, partial], backend=anyio_backend)
    (t1, c1), (t2, c2) = child["out"]
    assert t1 == ref and t2 == ref_partial
    assert child["l2_hits"] >= 1 and c1["cached_tokens"] == len(PROMPT) - 1 and c2["cached_tokens"] >= CUT
    assert child["corrupt"] == 0


@pytest.fixture(scope="module")
def drafts(tmp_path_factory, refs):
    from mach_runtime.engine.specdec.draft import save_dflash_draft
    from tests.test_specdec import random_draft

    out = {}
    for family, (_, _, layers) in refs.items():
        if family == "deepseek_v4":
            continue
        ids = [0, 2] if layers > 2 else [0, 1]
        out[family] = save_dflash_draft(random_draft(layers, ids), tmp_path_factory.mktemp(f"pd_{family}") / "dflash")
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_5_moe", "gpt_oss", "gemma4"])
async def test_hits_with_speculative_decoding(family, tiny_dir, refs, drafts, tmp_path, anyio_backend):
    """A lone request decodes speculatively (solo lane); its finished KV + the draft's context is the snapshot; a
    repeat restores it (L1), a fresh runtime from disk (L2); output equals greedy decoding. The solo lane's prefill
    takes the block-boundary snapshots exact-only caches need for a partial hit, and so does ``warm_prefix``'s."""
    ref, ref_partial, _ = refs[family]
    path = _path(family, tiny_dir)
    async with Runtime.open(path, draft=drafts[family], prefix_cache_dir=tmp_path, **OPEN) as rt:
        cold, _ = await _gen(rt, PROMPT)
        again, u1 = await _gen(rt, PROMPT)
        part, up = await _gen(rt, PROMPT[:CUT] + OTHER)  # exact-only: the boundary at 32 of the first prefill
        s = await rt.stats()
    assert s.decoder.spec_requests == 3 and s.prefix_cache.l1.hits >= 2
    assert cold == ref and again == ref and part == ref_partial
    assert u1["cached_tokens"] > 0 and up["cached_tokens"] == CUT
    warm = [(7 * i) % 300 + 20 for i in range(len(PROMPT))]
    async with Runtime.open(path, draft=drafts[family], prefix_cache_dir=tmp_path, **OPEN) as rt:
        fresh, uf = await _gen(rt, PROMPT)
        s = await rt.stats()
        await rt.warm_prefix(warm)
        _, uw = await _gen(rt, warm[:CUT] + OTHER)  # exact-only: the warm prefill's boundary at 32
    assert fresh == ref and uf["cached_tokens"] > 0 and s.prefix_cache.l2.hits == 1
    assert uw["cached_tokens"] == CUT


@pytest.mark.slow  # the bundled pair, two runtimes and a subprocess (23 s for both backends); per-family L2 hits stay in the default suite
async def test_demo_model_with_its_draft_l2_in_a_new_process(tmp_path, anyio_backend):
    """The bundled demo model and its DFlash draft: a chat prompt's KV (with the draft's context) saved by one
    runtime is restored by a fresh runtime in another process; outputs equal greedy decoding."""
    from mach_runtime.assets import default_checkpoint

    ckpt = default_checkpoint()
    draft = os.path.join(os.path.dirname(ckpt), "demo-qwen3-moe-dflash")
    model, tok, _, _ = load_moe(ckpt, expert_residency="stacked")
    ids = tok.apply_chat_template([{"role": "system", "content": "You are a helpful assistant. " * 6},
                                   {"role": "user", "content": "Write a function that sums a list."}],
                                  add_generation_prompt=True)
    ref = _until_eos(greedy(model, ids, N), set(tok.eos_token_ids))
    async with Runtime.open(ckpt, draft=draft, prefix_cache_dir=tmp_path, **OPEN) as rt:
        cold, _ = await _gen(rt, ids)
        hit, u = await _gen(rt, ids)
    assert cold == ref and hit == ref and u["cached_tokens"] == len(ids) - 1
    child = run_child(ckpt, tmp_path, [ids], draft=draft, backend=anyio_backend)
    assert child["out"][0][0] == ref and child["l2_hits"] == 1


async def test_corrupt_l2_file_is_a_counted_miss(tiny_dir, refs, tmp_path, anyio_backend):
    ref = refs["qwen3_moe"][0]
    async with Runtime.open(tiny_dir, prefix_cache_dir=tmp_path, **OPEN) as rt:
        await _gen(rt, PROMPT)
    files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".safetensors")]
    assert files
    for f in files:  # flip bytes in the middle of every array section
        with open(f, "r+b") as fh:
            fh.seek(os.path.getsize(f) - 64)
            fh.write(b"\xff" * 32)
    async with Runtime.open(tiny_dir, prefix_cache_dir=tmp_path, **OPEN) as rt:
        out, u = await _gen(rt, PROMPT)
        s = await rt.stats()
    assert out == ref and u["cached_tokens"] == 0
    assert s.prefix_cache.disk.corrupt_dropped >= 1 and s.prefix_cache.l2.hits == 0


async def test_budgets_hold_under_churn(tiny_dir, tmp_path, anyio_backend):
    model, tok, _, _ = load_moe(tiny_dir, expert_residency="stacked")
    async with Runtime.open(tiny_dir, prefix_cache_dir=tmp_path, prefix_cache_max_entries=3,
                            prefix_cache_gb=60_000 / (1 << 30), disk_kv_budget_gb=150_000 / (1 << 30), **OPEN) as rt:
        prompts = [[(7 * k + i) % 500 + 1 for i in range(40)] for k in range(10)]
        for p in prompts:
            out, _ = await _gen(rt, p)
            assert out == _until_eos(greedy(model, p, N), set(tok.eos_token_ids))
            s = (await rt.stats()).prefix_cache
            assert s.l1.entries <= 3 and s.l1.bytes <= 60_000
        s = (await rt.stats()).prefix_cache
    assert s.l1.evictions > 0 and s.disk.evictions > 0
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp_path) for f in fs)
    assert size <= 150_000 + 4096  # + the lock file


@pytest.mark.parametrize("anyio_backend", ["asyncio", pytest.param("trio", marks=pytest.mark.slow)])
async def test_decoder_crash_mid_save_loses_nothing_cached(tiny_dir, refs, tmp_path, anyio_backend):
    ref = refs["qwen3_moe"][0]
    crashed = []

    def hook(actor, point, info):
        if actor == "decoder" and point == "snapshot" and armed and not crashed:
            crashed.append(info)
            raise RuntimeError("injected crash while saving a snapshot")

    armed = False
    async with Runtime.open(tiny_dir, prefix_cache_dir=tmp_path, fault_hook=hook, **OPEN) as rt:
        await _gen(rt, PROMPT)  # cached (L1, and L2 by the writer)
        armed = True
        other = [(3 * i) % 400 + 2 for i in range(40)]
        out_other, _ = await _gen(rt, other)  # its save crashes the Decoder; the request is re-admitted
        again, u = await _gen(rt, PROMPT)
        s = await rt.stats()
    assert crashed and s.decoder_restarts == 1
    assert again == ref and u["cached_tokens"] == len(PROMPT) - 1
    model, tok, _, _ = load_moe(tiny_dir, expert_residency="stacked")
    assert out_other == _until_eos(greedy(model, other, N), set(tok.eos_token_ids))
    child = run_child(tiny_dir, tmp_path, [PROMPT])
    assert child["out"][0][0] == ref and child["l2_hits"] == 1 and child["corrupt"] == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio", pytest.param("trio", marks=pytest.mark.slow)])
async def test_crash_during_the_cache_actors_copy_loses_nothing_cached(tiny_dir, refs, tmp_path, anyio_backend):
    """The Cache actor copies a snapshot the Decoder materialised (worker thread) while (1) the Cache actor itself
    crashes in that copy, then (2) the Decoder crashes mid-copy: each crashed actor is restarted; the snapshot in
    the crashed copy is dropped (its MLX arrays freed), the one copied across the Decoder's crash is stored; the
    requests finish with greedy output (the Decoder's is replayed); what was cached before still hits; no hang."""
    import threading

    ref = refs["qwen3_moe"][0]
    mode, copying, decoder_down = [None], threading.Event(), threading.Event()

    def hook(actor, point, info):
        if actor == "cache" and point == "copy" and mode[0] == "cache":
            mode[0] = None
            raise RuntimeError("injected Cache actor crash during a snapshot copy")
        if actor == "cache" and point == "copy" and mode[0] == "decoder":
            copying.set()
            assert decoder_down.wait(60), "the Decoder never crashed during the copy"
        if actor == "decoder" and point == "step" and mode[0] == "decoder" and copying.is_set():
            mode[0] = None
            decoder_down.set()
            raise RuntimeError("injected Decoder crash during the Cache actor's copy")

    model, tok, _, _ = load_moe(tiny_dir, expert_residency="stacked")
    eos = set(tok.eos_token_ids)
    others = [[(3 * i + k) % 400 + 2 for i in range(40)] for k in (1, 2)]
    async with Runtime.open(tiny_dir, prefix_cache_dir=tmp_path, fault_hook=hook, **OPEN) as rt:
        with anyio.fail_after(120):
            await _gen(rt, PROMPT)  # cached before any crash
            mode[0] = "cache"
            out1, _ = await _gen(rt, others[0])
            s1 = await rt.stats()
            mode[0] = "decoder"
            out2, _ = await _gen(rt, others[1])
            again, u = await _gen(rt, PROMPT)
            _, u2 = await _gen(rt, others[1])
            s = await rt.stats()
    assert s1.cache_restarts == 1 and s.decoder_restarts == 1 and decoder_down.is_set()
    assert out1 == _until_eos(greedy(model, others[0], N), eos) and out2 == _until_eos(greedy(model, others[1], N), eos)
    assert again == ref and u["cached_tokens"] == len(PROMPT) - 1
    assert u2["cached_tokens"] == len(others[1]) - 1


async def test_prefix_cache_off_keeps_sessions_only(tiny_dir, tmp_path, anyio_backend):
    from mach_runtime.errors import ConfigError

    async with Runtime.open(tiny_dir, prefix_cache=False, **OPEN) as rt:
        await _gen(rt, PROMPT)
        _, u = await _gen(rt, PROMPT)
        s = await rt.stats()
        async with rt.session(system="You write short Python.") as sess:
            for user in ("a function that adds", "now one that subtracts"):
                async for _ in sess.send(user, max_tokens=6):
                    pass
        with pytest.raises(ConfigError, match="prefix_cache=False"):
            await rt.warm_prefix(PROMPT)
    assert u["cached_tokens"] == 0 and s.prefix_cache.l1.entries == 0 and s.prefix_cache.l2 is None
    assert sess.turns[1].usage["cached_tokens"] > 0  # a session still reuses its own earlier turn


async def test_a_session_turn_serves_any_request(tiny_dir, tmp_path, anyio_backend):
    """Sessions are ordinary users of the cache: another request that starts with a session's history reuses it
    (and the session's next turn reuses it too); outputs equal greedy decoding."""
    model, tok, _, _ = load_moe(tiny_dir, expert_residency="stacked")
    async with Runtime.open(tiny_dir, **OPEN) as rt:
        async with rt.session() as sess:
            async for _ in sess.send("write a long function that adds two numbers " * 3, max_tokens=N):
                pass
            history = sess._history_ids
            other = history + OTHER
            out, u = await _gen(rt, other)
            async for _ in sess.send("and one that subtracts", max_tokens=N):
                pass
    assert out == _until_eos(greedy(model, other, N), set(tok.eos_token_ids))
    assert u["cached_tokens"] >= len(history) - 1
    assert sess.turns[1].usage["cached_tokens"] >= len(history) - 1


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_5_moe"])
async def test_max_kv_size_bounds_live_requests_and_snapshots(family, tiny_dir, tmp_path, anyio_backend):
    """max_kv_size=16 turns full-attention KV into mlx-lm's RotatingKVCache(16, keep=0) in every lane: output equals
    greedy decoding over those caches, cold, after an L1 hit and from L2; a wrapped window is an exact-only
    snapshot."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

    path = _path(family, tiny_dir)
    model, tok, _, _ = load_moe(path, expert_residency="stacked")
    cache = [RotatingKVCache(max_size=16, keep=0) if type(c) is KVCache else c for c in make_prompt_cache(model)]
    logits, ref = model(mx.array([PROMPT]), cache=cache), []
    for _ in range(N):
        ref.append(int(mx.argmax(logits[0, -1]).item()))
        logits = model(mx.array([[ref[-1]]]), cache=cache)
    ref = _until_eos(ref, set(tok.eos_token_ids))
    async with Runtime.open(path, max_kv_size=16, prefix_cache_dir=tmp_path, **OPEN) as rt:
        cold, _ = await _gen(rt, PROMPT)
        hit, u = await _gen(rt, PROMPT)
    assert cold == ref and hit == ref and u["cached_tokens"] == len(PROMPT) - 1
    async with Runtime.open(path, max_kv_size=16, prefix_cache_dir=tmp_path, **OPEN) as rt:
        l2, u2 = await _gen(rt, PROMPT)
        s = await rt.stats()
    assert l2 == ref and s.prefix_cache.l2.hits == 1
    async with Runtime.open(path, prefix_cache_dir=tmp_path, **OPEN) as rt:  # another layout: another salt
        _, u3 = await _gen(rt, PROMPT)
    assert u3["cached_tokens"] == 0


async def test_kv_knobs_refused_where_they_cannot_apply(tiny_dir, anyio_backend):
    from mach_runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="max_kv_size"):  # (kv_bits: tests/test_kv_bits.py)
        async with Runtime.open(tiny_dir, max_kv_size=0, **OPEN):
            pass
    with pytest.raises(ConfigError, match="compressed"):
        async with Runtime.open(os.path.join(os.path.dirname(FAMILIES["gpt_oss"]), "hf_deepseek_v4"),
                                max_kv_size=64, **OPEN):
            pass
    with pytest.raises(ConfigError, match="prefix_block_size"):
        async with Runtime.open(tiny_dir, expert_residency="stacked", prefix_block_size=0):
            pass


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_5_moe", "gpt_oss"])
@pytest.mark.parametrize("spec", [False, True])
async def test_exact_hit_restores_the_last_logits(family, spec, tiny_dir, refs, drafts, tmp_path, anyio_backend):
    """A prompt equal to a warmed prefix restores every token and its last logits: the first token comes from them
    (no forward), then decoding continues (batch or speculative lane); output equals greedy decoding, also for
    exact-only caches (GatedDeltaNet state, wrapped windows), from L1 and from L2."""
    ref = refs[family][0]
    path = _path(family, tiny_dir)
    kw = dict(draft=drafts[family]) if spec else {}
    async with Runtime.open(path, prefix_cache_dir=tmp_path, **kw, **OPEN) as rt:
        await rt.warm_prefix(PROMPT)
        out, u = await _gen(rt, PROMPT)
    # (the speculative engine counts feeding the first token, which a batch step does, as its prefill)
    assert out == ref and u["cached_tokens"] == len(PROMPT) and u["prefilled_tokens"] == (1 if spec else 0)
    async with Runtime.open(path, prefix_cache_dir=tmp_path, **kw, **OPEN) as rt:
        toks, u2 = [], None
        async for c in rt._stream_ids(list(PROMPT), max_tokens=1):
            toks += c.token_ids
            u2 = c.usage or u2
        again, _ = await _gen(rt, PROMPT)
    assert toks == ref[:1] and u2["cached_tokens"] == len(PROMPT) and u2["completion_tokens"] == 1
    assert again == ref
