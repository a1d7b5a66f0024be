"""BatchedSpecDecoder: several speculative requests verified in one target forward over [B, b], each row
accepting its own prefix and the batch caches rolled back per row. Greedy rows must equal plain greedy decoding
of each request alone; sampled rows must not depend on their batch mates and stay lossless in distribution."""

from __future__ import annotations

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

from mach_runtime.engine.batch import Admission
from mach_runtime.engine.specdec.batched import BatchedSpecDecoder, SpecParams
from mach_runtime.engine.specdec.config import BlockSpecDecEngineConfig
from mach_runtime.errors import ConfigError
from tests.family_helpers import FAMILIES
from tests.helpers import detokenize, greedy
from tests.test_specdec import OracleDrafter, _SecondChoice, assert_matches, check_stats, exact_paths, random_draft

PROMPTS = [
    [5, 17, 99, 3, 250, 77, 12, 40, 41],
    [7, 8, 9],
    [100, 200, 300, 400, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
    [42],  # one token: nothing to prefill, the first step cannot draft from hidden context
    [31, 32, 33, 34, 35],
]
N = 32
GREEDY = SpecParams(max_tokens=N, ignore_eos=True)


def _load(path):
    from mach_runtime import load_moe

    model, tok, _, _ = load_moe(path, expert_residency="stacked")
    return model, tok, [greedy(model, p, N) for p in PROMPTS]


@pytest.fixture(scope="module")
def qwen3(tiny_dir):
    return _load(tiny_dir)


@pytest.fixture(scope="module")
def hybrid():
    return _load(FAMILIES["qwen3_5_moe"])


def _decoder(model, tok, layers=(0, 1), block=6, **cfg):
    draft = random_draft(len(model.layers), list(layers))
    config = BlockSpecDecEngineConfig(block_size=block, policy="fixed", **cfg)
    return BatchedSpecDecoder(model, tok, draft, config=config, max_batch=6), draft


def _oracle(dec, draft, ref, i, corrupt=0.8):
    return OracleDrafter(draft, dec.target, ref, len(PROMPTS[i]), corrupt=corrupt, seed=100 + i)


def _cache_consistent(dec) -> None:
    """Every row's cache holds exactly its committed tokens but the staged one, at its own RoPE offset."""
    for i, r in enumerate(dec.rows):
        kv = [c.extract(i) for c in dec.cache]
        n = len(r.history) - 1
        assert all(c.offset == n for c in kv if isinstance(getattr(c, "offset", None), int)), r.request_id


# -- greedy losslessness ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bucket", [64, 4, None])
@pytest.mark.parametrize("family", ["qwen3", "hybrid"])
def test_oracle_partial_acceptance_per_row_is_lossless(family, bucket, request, monkeypatch):
    """B=5 prompts of lengths 1..17; oracle drafts corrupted at a random position per row and cycle: rows keep
    different counts every step (per-row KV roll, growing left padding, per-row RoPE offsets). ``bucket``: the
    KV length multi-token forwards attend over is rounded up to it (4: the common left padding is also sliced
    off often, and the batched prefill runs in chunks of 5); None: plain BatchKVCache."""
    from mach_runtime.engine.specdec import verify_cache

    model, tok, refs = request.getfixturevalue(family)
    if bucket is not None:
        monkeypatch.setattr(verify_cache, "KV_BUCKET", bucket)
    tapes = (True, False) if family == "hybrid" else (True,)  # hybrid: tape replay per row, or snapshot + re-run
    for tape in tapes:
        dec, draft = _decoder(model, tok, layers=(0, 1) if family == "qwen3" else (0, 2), gdn_tape=tape,
                              bucket_kv=bucket is not None, prefill_step=5 if bucket == 4 else 512)
        assert (dec.tape is not None) == (family == "hybrid" and tape)
        # admitted together: one right-padded prefill, each drafter handed its own rows' hidden states
        dec.add_many([Admission(f"r{i}", tuple(p), GREEDY) for i, p in enumerate(PROMPTS)],
                     [_oracle(dec, draft, refs[i], i) for i in range(len(PROMPTS))])
        got = {}
        while dec.rows:
            for o in dec.step():
                got.setdefault(o.request_id, []).extend(o.token_ids)
                if o.finish_reason:
                    assert o.finish_reason == "length"
                    dec.remove(o.request_id)
            _cache_consistent(dec)
        for i in range(len(PROMPTS)):
            assert got[f"r{i}"] == refs[i], (tape, i)
        s = dec.stats()
        check_stats(s)
        assert sum(s["acceptance_length_histogram"][1:5]) > 0  # partial acceptances
        assert s["specdec_accepted"] > s["specdec_drafted"] // 3
        assert s["batch_rows_histogram"]["5"] > 3  # verified together
        assert s["specdec_committed"] == N * len(PROMPTS)
        assert (s["specdec_rerun_tokens"] > 0) == (family == "hybrid" and not tape)
        assert (dec.counters["compactions"] > 0) == (bucket == 4)


def test_rows_join_and_leave_mid_way(qwen3):
    """Requests join a running batch (one with replayed tokens), one is removed mid-way, max_tokens differ."""
    model, tok, refs = qwen3
    dec, draft = _decoder(model, tok)
    lengths = {0: N, 1: 11, 2: N, 3: 20, 4: N}
    schedule = {0: [0, 1], 2: [2], 3: [3, 4]}
    got = {i: [] for i in lengths}
    step = 0
    while step <= max(schedule) or dec.rows:
        joining = schedule.get(step, [])
        resumes = {i: refs[i][:5] if i == 4 else [] for i in joining}  # r4: a replay, continues at index 5
        dec.add_many([Admission(f"r{i}", tuple(PROMPTS[i]), SpecParams(max_tokens=lengths[i], ignore_eos=True),
                                tuple(resumes[i])) for i in joining],
                     [_oracle(dec, draft, refs[i], i) for i in joining])
        for i in joining:
            got[i] = list(resumes[i])
        if step == 5:
            dec.remove("r2")  # aborted
        for o in dec.step():
            i = int(o.request_id[1:])
            assert o.index == len(got[i])
            got[i].extend(o.token_ids)
            if o.finish_reason:
                dec.remove(o.request_id)
        _cache_consistent(dec)
        step += 1
    assert dec.active == 0 and dec.cache is None
    for i, n in lengths.items():
        if i == 2:
            assert 0 < len(got[2]) < N and got[2] == refs[2][: len(got[2])]
        else:
            assert got[i] == refs[i][:n], i


def test_mix_of_spec_lookup_and_target_only_rows(qwen3):
    """DFlash (oracle) rows, a prompt-lookup row, target-only rows (one reusing a prefix KV) in one batch."""
    from mach_runtime.engine.specdec.target import TargetOps

    model, tok, refs = qwen3
    dec, draft = _decoder(model, tok)
    lookup_prompt = PROMPTS[0] + refs[0][:20] + PROMPTS[0]  # holds its own continuation: copies get accepted
    lookup_ref = greedy(model, lookup_prompt, 24)
    dec.add("spec0", PROMPTS[0], GREEDY, drafter=_oracle(dec, draft, refs[0], 0))
    # the Decoder's admissions: actors.messages.SamplingParams (specdec None = target-only), eos from the decoder
    from actors.messages import SamplingParams

    dec.eos = frozenset()
    dec.add_many([Admission("plain1", tuple(PROMPTS[1]), SamplingParams(max_tokens=N))])
    dec.add("look", lookup_prompt, SpecParams(max_tokens=24, ignore_eos=True, specdec="prompt_lookup"))
    # a target-only row whose first 10 prompt tokens come from a reused KV
    kv = TargetOps(model).make_cache(bucket_kv=False)
    model(mx.array([PROMPTS[2][:10]]), cache=kv)
    row = dec.add("plain2", PROMPTS[2], SpecParams(max_tokens=N, ignore_eos=True, specdec="target_only"), kv=kv,
                  cached_tokens=10)
    assert row.cached_tokens == 10 and row.prefilled_tokens == len(PROMPTS[2]) - 11
    dec.add("native4", PROMPTS[4], SpecParams(max_tokens=N, ignore_eos=True, specdec="native_v7"))  # random draft
    got = dec.run()
    assert got["spec0"] == refs[0] and got["plain1"] == refs[1] and got["plain2"] == refs[2]
    assert got["look"] == lookup_ref and got["native4"] == refs[4]
    s = dec.stats()
    check_stats(s)
    assert s["batch_padded_tokens"] > 0  # target-only rows rode along in drafting steps


def test_stop_tokens_and_strings_inside_accepted_blocks(qwen3):
    """Perfect drafts (whole blocks accepted); each row stops at its own token mid-block and leaves while the
    others go on. Nothing past a stop is released. Stop strings are the front end's (``emit.Emitter`` over the
    ids): the row with one runs on, and the emitter cuts its text at the stop."""
    model, tok, refs = qwen3
    dec, draft = _decoder(model, tok, block=8)
    stops = {}
    for i in (0, 1, 2):
        ref = refs[i]
        j = next(j for j in range(4 + 3 * i, N) if ref[j] not in ref[:j])
        stops[i] = j
        dec.add(f"r{i}", PROMPTS[i], SpecParams(max_tokens=N, ignore_eos=True, stop_token_ids=(ref[j],)),
                drafter=_oracle(dec, draft, ref, i, corrupt=0.0))

    full = detokenize(tok, refs[4])
    start = len(detokenize(tok, refs[4][:10]))
    stop = next(full[j : j + 3] for j in range(start, len(full) - 3)
                if full[j : j + 3].strip() and full.find(full[j : j + 3]) == j)
    dec.add("r4", PROMPTS[4], SpecParams(max_tokens=N, ignore_eos=True, stop=(stop,)),
            drafter=_oracle(dec, draft, refs[4], 4, corrupt=0.0))
    toks, reasons, trimmed = {}, {}, 0
    while dec.rows:
        for o in dec.step():
            toks.setdefault(o.request_id, []).extend(o.token_ids)
            if o.finish_reason:
                reasons[o.request_id] = o.finish_reason
                # the KV handed to a session covers delivered tokens only (not those accepted past the stop)
                covered = len(dec.row(o.request_id).history) - 1
                delivered = len(PROMPTS[int(o.request_id[1:])]) + len(toks[o.request_id])
                kv, n = dec.extract_kv(o.request_id)
                assert n == min(covered, delivered) and all(c.offset == n for c in kv)
                trimmed += covered > delivered
                dec.remove(o.request_id)
    for i, j in stops.items():
        assert toks[f"r{i}"] == refs[i][: j + 1] and reasons[f"r{i}"] == "stop"
    from mach_runtime.engine.emit import Emitter

    assert toks["r4"] == refs[4] and reasons["r4"] == "length"
    text, finish, kept = Emitter(tok, SpecParams(max_tokens=N, ignore_eos=True, stop=(stop,))).push(toks["r4"])
    assert text == full[: full.find(stop)] and finish == "stop"
    assert stop in detokenize(tok, toks["r4"][:kept]) and stop not in detokenize(tok, toks["r4"][: kept - 1])
    assert dec.stats()["acceptance_length_histogram"][-1] >= 3  # whole blocks were accepted
    assert trimmed >= 1  # a stop inside an accepted block: the cache held tokens past it


# -- batched draft pass ---------------------------------------------------------------------------------------
def test_batched_draft_pass_equals_per_row_draft_passes(qwen3):
    """One draft pass over rows with contexts of different lengths (sink + window caches that have dropped
    rows) gives each row's own ``draft_logits``, round after round."""
    from mach_runtime.engine.specdec.draft import DFlashDrafter, batchable_dflash, batched_dflash_logits
    from mach_runtime.engine.specdec.target import TargetOps

    model, _, _ = qwen3
    draft, ops = random_draft(2, [0, 1]), TargetOps(model)
    rng = np.random.default_rng(0)
    pairs = []
    for L in (5, 9, 1, 23):
        a, b = DFlashDrafter(draft, ops, sink=2, window=8), DFlashDrafter(draft, ops, sink=2, window=8)
        a.start([]), b.start([])
        pairs.append((a, b))
    for rnd, n in enumerate((7, 3, 5)):
        for k, (a, b) in enumerate(pairs):  # new committed context rows, a different count per row
            h = mx.array(rng.normal(size=(1 + (k * 3 + rnd * 5) % 11, 2 * 64)).astype(np.float32))
            a.observe(h), b.observe(h)
        staged = [int(t) for t in rng.integers(3, 500, size=len(pairs))]
        ref = mx.stack([a.draft_logits(t, n) for (a, _), t in zip(pairs, staged)])
        got = batched_dflash_logits([b for _, b in pairs], staged, n)
        assert batchable_dflash(pairs[0][1])
        assert np.allclose(np.array(ref), np.array(got), atol=1e-4), rnd
        assert [b.cache[0].offset for _, b in pairs] == [a.cache[0].offset for a, _ in pairs]


def test_batched_draft_rows_are_lossless_and_draft_like_per_row(qwen3):
    model, tok, refs = qwen3
    results = []
    for batched in (True, False):
        draft = random_draft(2, [0, 1])
        dec = BatchedSpecDecoder(model, tok, draft, config=BlockSpecDecEngineConfig(block_size=6, policy="fixed"),
                                 max_batch=5, batched_draft=batched)
        dec.add_many([Admission(f"r{i}", tuple(p), SpecParams(max_tokens=N, ignore_eos=True, specdec="native_v7"))
                      for i, p in enumerate(PROMPTS)])
        got = dec.run()
        assert all(got[f"r{i}"] == refs[i] for i in range(len(PROMPTS)))
        assert (dec.counters["batched_draft_passes"] > 0) == batched
        s = dec.stats()
        results.append((s["specdec_drafted"], s["acceptance_length_histogram"]))
    assert results[0] == results[1]


# -- sampling ---------------------------------------------------------------------------------------------------
def test_sampled_row_does_not_depend_on_batch_mates(qwen3):
    model, tok, refs = qwen3
    params = SpecParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True, specdec="native_v7")
    outs = []
    for mates in ([], [0, 2], [1, 3, 4]):
        dec, _ = _decoder(model, tok, block=4)
        dec.add("x", PROMPTS[4], params)
        for i in mates:  # greedy and sampled neighbours with other seeds, different prompt lengths
            mate = SpecParams(max_tokens=30, temperature=0.7 * (i % 2), seed=i, ignore_eos=True, specdec="native_v7")
            dec.add(f"m{i}", PROMPTS[i], mate)
        outs.append(dec.run()["x"])
    assert outs[0] == outs[1] == outs[2]
    assert outs[0] != refs[4][:24]  # really sampled


def test_sampled_rows_are_lossless_in_distribution(qwen3):
    """(t0, t1, t2) of rows sampled side by side (8 seeds per batch, one 2-token block per cycle with the
    target's 2nd choice as the draft: accepted sometimes, resampled often) vs the exact target distribution."""
    model, tok, _ = qwen3
    prompt = PROMPTS[0][:4]
    temp, top_k = 1.5, 3

    exact = exact_paths(model, prompt, temp, top_k)
    dec = BatchedSpecDecoder(model, tok, config=BlockSpecDecEngineConfig(block_size=2, policy="fixed"), max_batch=8)
    n, counts = 400, Counter()
    for start in range(0, n, 8):
        for seed in range(start, start + 8):
            dec.add(f"s{seed}", prompt, SpecParams(max_tokens=3, temperature=temp, top_k=top_k, seed=seed,
                                                  ignore_eos=True), drafter=_SecondChoice(model))
        for toks in dec.run().values():
            counts[tuple(toks)] += 1
    s = dec.stats()
    assert 0 < s["specdec_accepted"] < s["specdec_drafted"]
    assert_matches(counts, exact, n)


# -- families ---------------------------------------------------------------------------------------------------
def test_sliding_window_family_is_a_config_error():
    from mach_runtime import load_moe

    model, tok, _, _ = load_moe(FAMILIES["gpt_oss"], expert_residency="stacked")
    with pytest.raises(ConfigError, match="RotatingKVCache.*BatchEngine"):
        BatchedSpecDecoder(model, tok)
