"""Quantized KV (``kv_bits``) through the Runtime: greedy output equals mlx-lm's own ``generate_step`` with the
same ``kv_bits`` / ``kv_group_size`` / ``quantized_kv_start`` (the independent reference), solo and in a batch,
after L1 and L2 prefix-cache hits (the snapshots hold the quantized arrays), with speculative decoding (a lone
request, and concurrent ones in the batched speculative lane); a quantized and an unquantized runtime never share
prefix-cache entries; families and settings that cannot quantize fail with a ConfigError naming the flag; where the
backend lacks the quantized attention kernel (MLX CUDA) the caches attend over dequantized K/V. Both anyio
backends."""

from __future__ import annotations

import os

import anyio
import mlx.core as mx
import numpy as np
import pytest

from mach_runtime import Runtime, load_moe
from mach_runtime.errors import ConfigError
from tests import tolerances as tol
from tests.family_helpers import FAMILIES
from tests.helpers import HF_QWEN3_MOE, stream_tokens

PROMPT = [5, 17, 99, 3, 250, 77, 12, 40, 41, 7, 8, 9, 10] * 3  # 39 tokens
OTHERS = [[12, 40, 41, 9, 300, 18], [101, 7, 7, 300, 18, 42, 64, 65, 66, 2, 3], [200, 201]]
CUT, TAIL, N = 32, [3, 4, 5, 6, 200, 201], 10
OPEN = dict(expert_residency="stacked", prefix_block_size=16, kv_bits=8)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random tiny qwen3_moe whose attention head dimension (64) takes mlx-lm's default kv_group_size."""
    from mach_runtime.testing.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("kvq") / "ckpt", hidden=64, layers=2, heads=2, head_dim=64,
                                experts=8, top_k=2, moe_inter=32, tokenizer_from=HF_QWEN3_MOE)


class Ref(list):
    """mlx-lm's greedy tokens, with each step's top-2 logit margin relative to its largest logit (``margins``)."""

    margins: list


def mlx_lm_generate(model, ids, eos, *, start: int, bits: int = 8, n: int = N) -> Ref:
    """mlx-lm's own generate loop with its KV quantization (greedy), cut at the first eos as the Runtime stops. It
    runs on the CPU stream: MLX 0.32.4 CUDA lacks the quantized_matmul its quantized attention needs
    (tests/test_backend_faults.py), and on the CPU that is the default device anyway."""
    from mlx_lm.generate import generate_step

    margins = []

    def record(_, logits):
        top2 = mx.topk(logits[0].astype(mx.float32), 2)
        margins.append(abs(float(top2[1] - top2[0])) / max(1e-30, float(mx.abs(logits).max())))
        return logits

    out = Ref()
    for t, _ in generate_step(mx.array(ids), model, mx.cpu, max_tokens=n, kv_bits=bits, kv_group_size=64,
                              quantized_kv_start=start, prefill_step_size=512, logits_processors=[record]):
        out.append(int(t))
        if t in eos:
            break
    out.margins = margins[: len(out)]
    return out


def same(got, want: Ref) -> bool:
    """``got`` is mlx-lm's greedy output: every token on the CPU (the same kernels); on a GPU (another device than
    the reference's) every token up to the first step whose top-2 margin is inside the float32 tolerance of two
    implementations (tests/tolerances.py: there either token is a correct greedy choice)."""
    if not tol.GPU:
        return list(got) == list(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if want.margins[i] <= 4 * tol.independent():
            return True
        if g != w:
            return False
    return len(got) == len(want)


@pytest.fixture(scope="module")
def refs(ckpt):
    model, tok, store, _ = load_moe(ckpt, expert_residency="stacked")
    eos = set(tok.eos_token_ids)
    ref = {(tuple(p), s): mlx_lm_generate(model, p, eos, start=s)
           for s in (0, 45) for p in [PROMPT, PROMPT[:CUT] + TAIL, *OTHERS]}
    store.close()
    return ref


async def _gen(rt, ids, **kw):  # (tests/helpers.py)
    return await stream_tokens(rt, ids, N, **kw)


async def test_kv_bits_equals_mlx_lm_solo_batched_and_after_hits(ckpt, refs, tmp_path, anyio_backend):
    partial = PROMPT[:CUT] + TAIL
    async with Runtime.open(ckpt, quantized_kv_start=0, prefix_cache_dir=tmp_path, max_batch=4, **OPEN) as rt:
        cold, u0 = await _gen(rt, PROMPT)
        got = {}

        async def client(i, p):
            got[i] = (await _gen(rt, p))[0]

        with anyio.fail_after(120):  # concurrent requests: one continuous batch of quantized rows
            async with anyio.create_task_group() as tg:
                for i, p in enumerate(OTHERS):
                    tg.start_soon(client, i, p)
        l1, u1 = await _gen(rt, PROMPT)
        part, up = await _gen(rt, partial)
        s = await rt.stats()
    assert same(cold, refs[(tuple(PROMPT), 0)]) and u0["cached_tokens"] == 0
    assert all(same(got[i], refs[(tuple(p), 0)]) for i, p in enumerate(OTHERS))
    assert max(s.decoder.batch_histogram) > 1  # the rows really ran together
    assert l1 == cold and u1["cached_tokens"] == len(PROMPT) - 1
    assert same(part, refs[(tuple(partial), 0)]) and up["cached_tokens"] >= CUT
    quant_bytes = s.prefix_cache.l1.bytes

    # L2: a fresh runtime restores the quantized snapshot from disk
    async with Runtime.open(ckpt, quantized_kv_start=0, prefix_cache_dir=tmp_path, **OPEN) as rt:
        l2, u2 = await _gen(rt, PROMPT)
        s2 = await rt.stats()
    assert l2 == cold and u2["cached_tokens"] == len(PROMPT) - 1 and s2.prefix_cache.l2.hits == 1

    # an unquantized runtime over the same directory shares nothing (the layout salts every key), and its
    # snapshots of the same requests are larger: the quantized ones hold packed 8-bit K/V
    plain = dict(OPEN, kv_bits=None)
    async with Runtime.open(ckpt, prefix_cache_dir=tmp_path, max_batch=4, **plain) as rt:
        _, u3 = await _gen(rt, PROMPT)
        for p in OTHERS:
            await _gen(rt, p)
        await _gen(rt, PROMPT)
        await _gen(rt, partial)
        s3 = await rt.stats()
    assert u3["cached_tokens"] == 0
    assert quant_bytes < 0.5 * s3.prefix_cache.l1.bytes


async def test_quantized_kv_start_converts_mid_decode(ckpt, refs, anyio_backend):
    """quantized_kv_start=45: the 39-token prompt's KV stays plain until the decode reaches 45 tokens, then is
    quantized (mlx-lm converts after the forward that reaches the start); output equals mlx-lm's."""
    async with Runtime.open(ckpt, quantized_kv_start=45, prefix_cache=False, **OPEN) as rt:
        out, _ = await _gen(rt, PROMPT)
    assert same(out, refs[(tuple(PROMPT), 45)])


async def test_kv_bits_with_speculative_decoding(ckpt, refs, tmp_path, anyio_backend):
    """A lone request decodes speculatively over the quantized cache (rejected draft tokens are trimmed from it):
    output equals mlx-lm's greedy decoding with the same quantization, also after an L1 hit."""
    from mach_runtime.engine.specdec.draft import save_dflash_draft
    from tests.test_specdec import random_draft

    draft = save_dflash_draft(random_draft(2, [0, 1]), tmp_path / "dflash")
    async with Runtime.open(ckpt, draft=draft, quantized_kv_start=0, **OPEN) as rt:
        cold, _ = await _gen(rt, PROMPT)
        hit, u = await _gen(rt, PROMPT)
        s = await rt.stats()
    assert s.decoder.spec_requests == 2
    assert same(cold, refs[(tuple(PROMPT), 0)]) and hit == cold and u["cached_tokens"] > 0

    # spec_batch: concurrent requests verify their blocks in one batched forward over quantized batch caches, each
    # row's rejected tail trimmed (or rolled into left padding) alone; equal to the non-speculative run
    async with Runtime.open(ckpt, draft=draft, quantized_kv_start=0, spec_batch=3, **OPEN) as rt:
        got = {}

        async def client(i, p):
            got[i] = (await _gen(rt, p))[0]

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i, p in enumerate([PROMPT, *OTHERS[:2]]):
                    tg.start_soon(client, i, p)
        s = await rt.stats()
    assert s.decoder.spec_batch_cycles > 0 and max(s.decoder.spec_batch_histogram) > 1, s.decoder
    assert got[0] == cold and all(same(got[i + 1], refs[(tuple(p), 0)]) for i, p in enumerate(OTHERS[:2]))


async def test_kv_bits_refused_where_it_cannot_apply(ckpt, tiny_dir, tmp_path, anyio_backend):
    deepseek = os.path.join(os.path.dirname(FAMILIES["gpt_oss"]), "hf_deepseek_v4")
    cases = [
        (FAMILIES["gpt_oss"], {}, "kv_bits: this family's sliding-window"),
        (FAMILIES["gemma4"], {}, "kv_bits: this family's sliding-window"),
        (deepseek, {}, "kv_bits: this family's compressed"),
        (ckpt, {"max_kv_size": 64}, "kv_bits cannot be combined with max_kv_size"),
        (ckpt, {"kv_bits": 7}, "kv_bits must be one of"),
        (ckpt, {"kv_group_size": 48}, "kv_group_size must be one of"),
        (tiny_dir, {}, r"kv_group_size=64 must divide the attention head dimension \(16\)"),
    ]
    for path, kw, match in cases:
        with pytest.raises(ConfigError, match=match):
            async with Runtime.open(path, **{**OPEN, **kw}):
                pass


def test_batch_cache_moves_keep_every_row_exact():
    """Engine level: merge (padding), extend, filter and extract of quantized rows keep each row's packed K/V and
    offsets exactly (quantization is per token, so moving rows never changes values)."""
    from mach_runtime.engine.quantized_kv import BatchQuantKV, PendingQuantKV, QuantKV, merge_quant

    mx.random.seed(0)
    rows = []
    for n in (5, 9, 3):
        c = PendingQuantKV(4, 32, 0)
        c.update_and_fetch(mx.random.normal((1, 2, n, 64)), mx.random.normal((1, 2, n, 64)))
        c.update_and_fetch(mx.random.normal((1, 2, 1, 64)), mx.random.normal((1, 2, 1, 64)))  # converts first
        assert isinstance(c, QuantKV) and c.offset == n + 1
        rows.append(c)
    a, b = merge_quant(rows[:2]), merge_quant(rows[2:])
    assert isinstance(a, BatchQuantKV)
    a.extend(b)
    a.filter([0, 2])
    for i, src in zip((0, 1), (rows[0], rows[2])):
        got = a.extract(i)
        assert got.offset == src.offset
        for x, y in zip(got.keys + got.values, src.keys + src.values):
            assert np.array_equal(np.array(x), np.array(y[..., : src.offset, :]))


def test_mach_serve_kv_flags_reach_runtime_open():
    """mach-serve takes mlx-lm's --kv-bits / --kv-group-size / --quantized-kv-start and hands them to
    Runtime.open (which checks them); without --kv-bits nothing is passed."""
    from mach_runtime.cli.serve import parser, settings_from

    kv = {"kv_bits", "kv_group_size", "quantized_kv_start"}
    a = parser().parse_args(["--no-streaming", "--kv-bits", "4", "--kv-group-size", "32", "--quantized-kv-start", "0"])
    got = settings_from(a).open_kwargs  # (other keys: the device's defaults, e.g. ``specdec`` on a GPU)
    assert {k: got[k] for k in kv if k in got} == {"kv_bits": 4, "kv_group_size": 32, "quantized_kv_start": 0}
    assert not kv & set(settings_from(parser().parse_args(["--no-streaming"])).open_kwargs)


def test_dequantized_attention_route_computes_the_quantized_attention(ckpt, monkeypatch):
    """Where the backend lacks quantized_matmul for KV attention (MLX 0.32.4 CUDA; ``io.backend_faults``), the
    quantized caches hand attention their K/V dequantized: the logits of a prefill and decode steps, single and
    batched, equal those of the quantized kernel (run on the CPU; the route forced there) up to float reordering;
    the stored K/V are the same quantized bytes either way."""
    from mlx_lm.models.cache import make_prompt_cache

    import mach_runtime.engine.quantized_kv as qkv
    from mach_runtime.io.backend_faults import quantized_kv_attention_missing

    if not tol.GPU:
        assert not quantized_kv_attention_missing(8, 64)  # the CPU keeps the quantized kernel
    model, _, store, _ = load_moe(ckpt, expert_residency="stacked")

    def run(route: bool):
        monkeypatch.setattr(qkv, "quantized_kv_attention_missing", lambda bits, group: route)
        single = qkv.quantizing_cache(make_prompt_cache(model), 8, 64, 0)
        out = [model(mx.array([PROMPT]), cache=single)[0, -1]]
        for t in (7, 11, 300):
            out.append(model(mx.array([[t]]), cache=single)[0, -1])
        rows = [qkv.quantizing_cache(make_prompt_cache(model), 8, 64, 0) for _ in OTHERS[:2]]
        for c, p in zip(rows, OTHERS[:2]):
            model(mx.array([p]), cache=c)
        batch = [type(layer[0]).merge(list(layer)) for layer in zip(*rows)]
        out.append(model(mx.array([[5], [6]]), cache=batch)[:, -1])
        mx.eval(out)
        assert all(isinstance(c, (qkv.QuantKV, qkv.BatchQuantKV)) for c in single + batch)
        assert hasattr(single[0], "bits") != route  # what sends mlx-lm's attention down one path or the other
        return [np.array(o) for o in out], [np.array(p) for p in single[0].keys]

    with mx.stream(mx.cpu):  # the quantized kernel, where it exists (on CUDA: the reference on the CPU)
        want, kq = run(False)
    got, kd = run(True)
    store.close()
    for i, (g, w) in enumerate(zip(got, want)):
        tol.assert_close(g, w, tol.reorder(1e-5), f"forward {i}")
    if not tol.GPU:  # on a GPU the reference ran on the CPU: its K projections differ by reordering, so may its codes
        assert all(np.array_equal(a, b) for a, b in zip(kq, kd))
