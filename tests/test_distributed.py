"""Distributed runtime (mach_runtime/distributed, actors/distributed.py): expert and pipeline parallel under a real
``mlx.launch`` (ring backend, this machine's CPU), against the single-process model and Runtime.

The launched runs are slow (each starts N processes that load the model, 12-50 s each on 2 idle cores): marked
``slow``. The default suite keeps the pure parts (placement, pipeline split, backend choice, settings, mach check
--hosts) and the expert-parallel hooks of two ranks run in one process. ``pytest -m slow
tests/test_distributed.py`` runs the launched matrix (13 runs); mach-serve under mlx.launch:
tests/test_distributed_serve.py; killed, frozen and diverged ranks: tests/test_distributed_faults.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mach_runtime.config import resolve_distributed_config
from mach_runtime.distributed.group import choose_backend
from mach_runtime.distributed.plan import ShardPlan, balanced_placement, contiguous_share, pipeline_range
from mach_runtime.errors import ConfigError
from tests.distributed_helpers import launch
from tests.distributed_worker import collect, forward_logits

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "mach_runtime" / "assets" / "demo-qwen3-moe"
DEMO_DRAFT = REPO / "mach_runtime" / "assets" / "demo-qwen3-moe-dflash"
IDS = [5, 17, 42, 99, 3, 250, 7, 11]
REQUESTS = [
    {"name": "a", "prompt": "def fib(n):", "params": {"max_tokens": 8, "logprobs": True}},
    {"name": "b", "prompt": "import os\nimport sys", "params": {"max_tokens": 6, "logprobs": True}},
    {"name": "c", "prompt": "class Queue:", "params": {"max_tokens": 10, "logprobs": True}},
    {"name": "s", "prompt": "for i in range(", "params": {"max_tokens": 6, "temperature": 0.8, "seed": 7}},
]
# logits: float32 sums in another order (per-rank partials, then across ranks): rounding, times depth
ATOL = 2e-4


# -- pure parts (default suite) -------------------------------------------------------------------------------
def test_contiguous_shares_cover_every_expert_once():
    for E, N in ((8, 2), (8, 3), (32, 4), (7, 4)):
        shares = [contiguous_share(E, r, N) for r in range(N)]
        assert sorted(e for s in shares for e in s) == list(range(E))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_balanced_placement_spreads_measured_load():
    counts = np.array([100, 90, 5, 5, 4, 3, 2, 1])
    shares = balanced_placement(counts, 2)
    assert sorted(shares[0] + shares[1]) == list(range(8)) and len(shares[0]) == len(shares[1]) == 4
    assert {0, 1} - set(shares[0]) and {0, 1} - set(shares[1])  # the two hot experts on different ranks
    loads = [int(counts[s].sum()) for s in shares]
    contiguous = [int(counts[:4].sum()), int(counts[4:].sum())]
    assert max(loads) < max(contiguous)


def test_pipeline_ranges_follow_mlx_lm_split():
    # mlx-lm's PipelineMixin: rank 0 runs the last layers, the low ranks get the extra layers
    assert [pipeline_range(8, r, 4) for r in range(4)] == [(6, 8), (4, 6), (2, 4), (0, 2)]
    assert [pipeline_range(3, r, 2) for r in range(2)] == [(1, 3), (0, 1)]
    plan = ShardPlan.build("pipeline", 1, 2, 3, [0, 2], 8)
    assert plan.keeps_weight("model.layers.0.self_attn.q_proj.weight")
    assert not plan.keeps_weight("model.layers.2.mlp.gate.weight") and plan.keeps_weight("lm_head.weight")


def test_plans_refuse_impossible_splits():
    with pytest.raises(ConfigError, match="at least 4 decoder layers"):
        ShardPlan.build("pipeline", 0, 4, 3, [0, 2], 8)
    with pytest.raises(ConfigError, match="at least 16 experts"):
        ShardPlan.build("expert", 0, 16, 3, [0, 2], 8)
    with pytest.raises(ConfigError, match="distributed mode"):
        resolve_distributed_config(mode="tensor")


@pytest.mark.parametrize("family,moe_layers,residency", [("hf_qwen3_moe", [0, 2], "stacked"),
                                                         ("hf_qwen3_5_moe", [0, 1, 2], "streaming")])
def test_each_rank_computes_only_its_pairs_and_the_shares_sum_to_the_block(family, moe_layers, residency):
    """The expert-parallel hooks of rank 0 and rank 1 of 2 (real ``load_moe(shard=...)`` loads, run here in one
    process, before the all_sum): each computes only the (token, choice) pairs routed to its experts, every pair
    exactly once over the two, and the two partial MoE block outputs add up to the single-process block
    (qwen3_5_moe: the gated shared expert counted once, on rank 0)."""
    import mlx.core as mx

    from mach_runtime.distributed.expert_parallel import collective_stats, install_expert_parallel
    from mach_runtime.io.arch_registry import adapter_for_config, read_config
    from mach_runtime.io.load import load_moe
    from tests import tolerances as tol

    ckpt = FIXTURES / family
    adapter = adapter_for_config(read_config(str(ckpt)))
    block = adapter.switch_module_template.format(layer=0).rsplit(".", 1)[0]
    kw = {"expert_slots": 4} if residency == "streaming" else {}
    ref = load_moe(ckpt, expert_residency=residency, **kw)[0]
    x = mx.random.normal((1, 6, 64), key=mx.random.key(3))
    want = module_at(ref, block)(x)
    one = mx.distributed.init(strict=False)  # a group of one: each rank's all_sum returns its own partial
    parts, stats = [], []
    for rank in range(2):
        plan = ShardPlan.build("expert", rank, 2, 3, moe_layers, 8)
        model, _tok, store, _cache = load_moe(ckpt, expert_residency=residency, shard=plan, **kw)
        install_expert_parallel(model, adapter, plan, one, streaming=residency == "streaming")
        parts.append(module_at(model, block)(x))
        stats.append(collective_stats(model))
    tol.assert_close(parts[0] + parts[1], want, tol.reorder(1e-5), f"{family} {residency} block")
    assert stats[0]["pairs"] == stats[1]["pairs"] == 6 * 2  # 6 tokens, top-2
    assert stats[0]["computed"] + stats[1]["computed"] == 12 and 0 < stats[0]["computed"] < 12, stats


def module_at(root, path: str):
    node = root
    for p in path.split("."):
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node


def test_backend_choice_and_nccl_fallback():
    assert choose_backend("auto", "ring", False) == ("ring", None)
    assert choose_backend("auto", "nccl", True) == ("nccl", None)
    assert choose_backend("auto", None, True)[0] == "nccl"
    backend, note = choose_backend("nccl", None, False)
    assert backend == "ring" and "CUDA" in note and "--backend ring" in note
    assert choose_backend("nccl", "nccl", True) == ("nccl", None)


def test_check_hosts_reports_per_rank_share():
    from mach_runtime.cli.check import check_checkpoint, format_report

    one = check_checkpoint(FIXTURES / "hf_qwen3_moe", memory_gb=16)
    four = check_checkpoint(FIXTURES / "hf_qwen3_moe", memory_gb=16, hosts=4)
    assert one["per_rank"] is None
    ep = four["per_rank"]["expert_parallel"]
    assert ep["experts_per_layer"] == 2  # 8 experts over 4 ranks
    assert ep["stacked"]["need_bytes"] < one["stacked"]["need_bytes"]
    assert four["per_rank"]["pipeline_parallel"] is None  # 3 decoder layers cannot split over 4 ranks
    two = check_checkpoint(FIXTURES / "hf_qwen3_moe", memory_gb=16, hosts=2)
    assert two["per_rank"]["pipeline_parallel"]["layers"] == 2
    text = format_report(four)
    assert "per rank of 4" in text and "2 experts per layer" in text


# -- launched runs --------------------------------------------------------------------------------------------
def reference_logits(ckpt, residency, slots):
    from mach_runtime.io.load import load_moe

    model, _tok, _store, cache = load_moe(ckpt, expert_residency=residency, expert_slots=slots)
    return forward_logits(model, cache, IDS)


def reference_runs(ckpt, residency, slots, requests, draft=None):
    import anyio

    from actors.runtime import Runtime

    async def go():
        kw = {"expert_slots": slots} if slots else {}
        async with Runtime.open(ckpt, expert_residency=residency, max_batch=4, prefix_cache=False, draft=draft,
                                **kw) as rt:
            # one at a time: the distributed run batches them, which must not matter
            return {r["name"]: await collect(rt, r) for r in requests}

    return anyio.run(go)


def check_run(tmp_path, ckpt, n, mode, residency, slots=None, requests=REQUESTS, draft=None):
    out = tmp_path / f"{mode}-{residency}-{n}"
    args = ["--ckpt", ckpt, "--mode", mode, "--residency", residency, "--ids", json.dumps(IDS),
            "--requests", json.dumps(requests)]
    if slots:
        args += ["--slots", slots]
    if draft:
        args += ["--draft", draft]
    r = launch(n, out, *args)
    assert (out / "result.json").exists(), f"rank 0 wrote no result:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    got = np.load(out / "logits.npy")
    want = reference_logits(ckpt, residency, slots)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    res = json.loads((out / "result.json").read_text())
    ref = reference_runs(ckpt, residency, slots, requests, draft)
    for r in requests:
        assert "error" not in res[r["name"]], res[r["name"]]
        assert res[r["name"]]["tokens"] == ref[r["name"]]["tokens"], r["name"]
        np.testing.assert_allclose(res[r["name"]]["logprobs"], ref[r["name"]]["logprobs"], atol=ATOL)
    return res


@pytest.mark.slow  # 20-50 s (two processes load the model): over the default suite's per-test budget
def test_expert_parallel_two_ranks_equals_one_process(tmp_path):
    check_run(tmp_path, FIXTURES / "hf_qwen3_moe", 2, "expert", "stacked")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["hf_qwen3_moe", "hf_qwen3_5_moe"])
@pytest.mark.parametrize("n,residency", [(4, "stacked"), (2, "streaming"), (4, "streaming")])
def test_expert_parallel_equals_one_process(tmp_path, family, n, residency):
    if family == "hf_qwen3_moe" and (n, residency) == (2, "stacked"):
        pytest.skip("test_expert_parallel_two_ranks_equals_one_process")
    check_run(tmp_path, FIXTURES / family, n, "expert", residency, slots=2 if residency == "streaming" else None)


@pytest.mark.slow
def test_expert_parallel_qwen3_5_two_ranks_stacked(tmp_path):
    check_run(tmp_path, FIXTURES / "hf_qwen3_5_moe", 2, "expert", "stacked")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["hf_qwen3_moe", "hf_qwen3_5_moe"])
@pytest.mark.parametrize("residency", ["stacked", "streaming"])
def test_pipeline_parallel_two_ranks(tmp_path, family, residency):
    # qwen3_5_moe: GatedDeltaNet layers (recurrent state in ArraysCache) on both sides of the split
    check_run(tmp_path, FIXTURES / family, 2, "pipeline", residency, slots=2 if residency == "streaming" else None)


@pytest.mark.slow
def test_pipeline_parallel_four_ranks_demo(tmp_path):
    check_run(tmp_path, DEMO, 4, "pipeline", "stacked", requests=REQUESTS[:2])


@pytest.mark.slow
def test_speculative_request_expert_parallel(tmp_path):
    spec = [{"name": "spec", "prompt": "def parse(text):", "alone": True,
             "params": {"max_tokens": 24, "specdec": "native_v7"}},
            *REQUESTS[:2]]
    res = check_run(tmp_path, DEMO, 2, "expert", "stacked", requests=spec, draft=DEMO_DRAFT)
    assert res["_stats"]["spec_cycles"] > 0  # the lone request decoded speculatively, in step on both ranks
