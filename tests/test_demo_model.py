"""The bundled demo model: assets, transformers parity, tokenizer, routing traces + replay, mach demo / trace."""

import json
import random
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mach_runtime import load_moe
from mach_runtime.assets import demo_model_path
from mach_runtime.analysis.trace_replay import (
    RoutingTrace,
    default_slot_sizes,
    replay,
    routing_stats,
    sweep,
)
from tests import tolerances as tol
from tests.helpers import FIXTURES, child_env, greedy, reference_logits, rel_err

DEMO = demo_model_path()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_ref():
    from safetensors.numpy import load_file

    ref = json.loads((FIXTURES / "demo_reference.json").read_text())
    ref["logits"] = load_file(str(FIXTURES / ref["logits_file"]))[ref["logits_key"]]
    return ref


def test_assets_fit_the_budget_and_are_hf_per_expert():
    files = sorted(p.name for p in DEMO.iterdir())
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"} <= set(files)
    assert sum(p.stat().st_size for p in DEMO.iterdir()) <= 30_000_000
    cfg = json.loads((DEMO / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    names = json.loads((DEMO / "model.safetensors.index.json").read_text())["weight_map"]
    E, L = cfg["num_experts"], cfg["num_hidden_layers"]
    for layer in (0, L - 1):
        for e in (0, E - 1):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" in names
    assert not any("switch_mlp" in n or "gate_up_proj" in n for n in names)


def test_transformers_reads_config_and_tokenizer():
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(str(DEMO), local_files_only=True)
    assert cfg.model_type == "qwen3_moe" and cfg.num_experts == 32 and cfg.num_experts_per_tok == 4
    tok = AutoTokenizer.from_pretrained(str(DEMO), local_files_only=True)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|endoftext|>" and tok.convert_tokens_to_ids("<|endoftext|>") == cfg.eos_token_id


@pytest.mark.parametrize("residency,slots", [("stacked", None), ("streaming", 4), ("streaming", 12)])
def test_assets_match_transformers(demo_ref, residency, slots):
    kw = {"expert_residency": residency}
    if slots:
        kw["expert_slots"] = slots
    model, tok, store, _ = load_moe(DEMO, **kw)
    try:
        assert tok.encode(demo_ref["prompt"]) == demo_ref["prompt_ids"]
        ids = demo_ref["prompt_ids"]
        got = reference_logits(model, ids)[demo_ref["logits_start"]:]
        # float16 weights: the CPU computes in float32 (its gather_mm), a GPU in float16 (tests/tolerances.py)
        assert rel_err(got, demo_ref["logits"]) <= tol.half(mx.float16, tol.independent())
        assert greedy(model, ids, len(demo_ref["greedy_ids"])) == demo_ref["greedy_ids"]
        if slots:
            s = store.stats()
            assert s.capacity_experts == slots * s.layers and s.misses > 0
    finally:
        store.close()


def test_tokenizer_round_trips_heldout_text():
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from mach_runtime.demo_corpus import corpus_files

    raw = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(DEMO), local_files_only=True)
    files = corpus_files("heldout")
    assert files, "no held-out files in this Python's stdlib"
    n = 0
    for f in files:
        text = f.read()
        ids = raw.encode(text).ids
        assert raw.decode(ids) == text, f.relpath
        n += len(ids)
    sample = files[0].read()[:2000]
    assert hf.decode(hf.encode(sample)) == sample
    assert n > 1000


def test_corpus_split_is_deterministic_and_disjoint():
    from mach_runtime.demo_corpus import corpus_files, is_heldout

    train, held = corpus_files("train"), corpus_files("heldout")
    assert [f.relpath for f in train] == sorted(f.relpath for f in train)
    assert not {f.relpath for f in train} & {f.relpath for f in held}
    assert all(is_heldout(f.relpath) for f in held) and not any(is_heldout(f.relpath) for f in train)
    assert 0.01 < len(held) / (len(held) + len(train)) < 0.06


# --- trace replay --------------------------------------------------------------------------------------------


def _random_trace(seed=0, layers=2, E=12, k=3, tokens=300, sticky=0.6) -> RoutingTrace:
    rng = random.Random(seed)
    steps, prev = [], {layer: rng.sample(range(E), k) for layer in range(layers)}
    for _ in range(tokens):
        for layer in range(layers):
            keep = [e for e in prev[layer] if rng.random() < sticky]
            new = keep + rng.sample([e for e in range(E) if e not in keep], k - len(keep))
            prev[layer] = new
            steps.append((layer, tuple(sorted(new))))
    return RoutingTrace(E, k, list(range(layers)), steps)


def test_replay_bounds_and_belady_is_the_ceiling():
    for seed in range(5):
        tr = _random_trace(seed)
        distinct = sum(len({e for _, ex in tr.steps if _ == layer for e in ex}) for layer in tr.layers)
        for slots in (3, 5, 8, 12):
            r = {p: replay(tr, slots, p) for p in ("lru", "lrfu", "belady")}
            total = sum(len(ex) for _, ex in tr.steps)
            for x in r.values():
                assert x.hits + x.misses == total and x.misses >= distinct
            assert r["belady"].hits >= max(r["lru"].hits, r["lrfu"].hits)
            if slots == 12:  # everything fits: only compulsory misses, no evictions
                assert all(x.misses == distinct and x.evictions == 0 for x in r.values())


def test_belady_on_a_hand_trace():
    # one layer, 2 slots, top-1: a b c a b  → MIN: a, b miss; c evicts b (a is next) ; a hit; b miss → 1 hit
    tr = RoutingTrace(3, 1, [0], [(0, (e,)) for e in (0, 1, 2, 0, 1)])
    assert (replay(tr, 2, "belady").hits, replay(tr, 2, "lru").hits) == (1, 0)
    with pytest.raises(ValueError):
        replay(RoutingTrace(8, 4, [0], [(0, (0, 1, 2, 3))]), 3, "lru")


def test_routing_stats_on_a_synthetic_trace():
    # layer 0 repeats the same experts every token; layer 1 cycles through disjoint sets
    steps = []
    for t in range(32):
        steps += [(0, (0, 1)), (1, tuple(sorted({(2 * t) % 8, (2 * t + 1) % 8})))]
    st = routing_stats(RoutingTrace(8, 2, [0, 1], steps, segments=[0, 16]), window=2, block=4)
    l0, l1 = st["layers"]
    assert l0["reuse_next"] == 1.0 and l0["reuse_within_2"] == 1.0 and l0["block_union"] == 2
    assert l0["unused_experts"] == 6 and abs(l0["entropy_bits"] - 1.0) < 1e-9
    assert l1["reuse_next"] == 0.0 and l1["reuse_within_2"] == 0.0 and l1["block_union"] == 8
    assert abs(l1["entropy_norm"] - 1.0) < 1e-9
    assert st["uniform"]["reuse_next"] == 2 / 8
    with pytest.raises(ValueError):
        routing_stats(RoutingTrace(8, 2, [0], [], granularity="mixed"))


@pytest.mark.parametrize("policy,slots", [pytest.param("lru", 6, marks=pytest.mark.slow), ("lrfu", 10)])
def test_trace_replay_reconciles_with_live_stats(tmp_path, policy, slots):
    """Teacher-forced held-out decoding and a sampled generation (with its multi-token prefill steps): replaying
    the recorded trace at the same bank size and policy reproduces the live counters exactly."""
    from mach_runtime.cli.trace import heldout_segments, reconcile, record
    from mach_runtime.engine.generate import stream_generate

    model, tok, store, _ = load_moe(DEMO, expert_residency="streaming", expert_slots=slots,
                                    eviction_policy=policy)
    try:
        assert store.stats().capacity_experts == slots * store.stats().layers
        starts, nll, scored = record(model, store, heldout_segments(tok, 40, 20, DEMO))
        assert starts == [0, 20] and scored == 38 and 0 < nll / scored < 6
        tr = RoutingTrace.from_store(store, segments=starts)
        assert tr.tokens == 40 and all(len(ex) == 4 for _, ex in tr.steps)
        s = store.stats()
        assert reconcile(tr, s, slots) == {"hits": s.hits, "misses": s.misses, "evictions": s.evictions}
        assert s.bytes_read == s.misses * s.expert_bytes
        list(stream_generate(model, tok, "import os\nimport sys\n\n\ndef main(argv):", max_tokens=12,
                             temperature=0.8, seed=3))
        mixed = RoutingTrace.from_store(store, granularity="mixed")
        assert max(len(ex) for _, ex in mixed.steps) > 4  # the prompt's prefill step
        s = store.stats()
        reconcile(mixed, s, slots)
        saved = RoutingTrace.load(mixed.save(tmp_path / "t.json"))
        assert saved == mixed and replay(saved, slots, policy).hits == s.hits
    finally:
        store.close()


def _mach(*args, timeout=120):
    env = child_env(ROOT, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "mach_runtime.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def test_mach_demo_runs_offline_and_prints_text_and_stats():
    r = _mach("demo", "--max-tokens", "10")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "bank of 8/32 slots per layer" in out
    assert out.count("[stats]") == 4 and "tok/s" in out and "hit rate" in out and "MiB read" in out
    assert "[demo] 4 generations" in out and "experts streamed from disk" in out
    # the generated text (between each prompt and its stats line) is not empty
    for block in out.split("── request ")[1:]:
        body = block.split("\n", 1)[1].split("[stats]")[0]
        assert len(body.strip()) > 0
    from mach_runtime.cli.demo import DEMO_PROMPTS

    for p in DEMO_PROMPTS:
        assert p in out


@pytest.mark.slow  # five full demo runs (38 s); test_mach_demo_runs_offline_and_prints_text_and_stats checks one exit
def test_mach_demo_exits_cleanly_every_time():
    """The process must not abort at exit: MLX's per-thread streams were left to interpreter teardown, which
    aborted ~1 run in 4 with "terminate called without an active exception" (exit -6) until the MLX thread
    released them (actors/decoder.py, MLXThread). Five runs: a regression fails this with probability ~0.76."""
    for _ in range(5):
        r = _mach("demo", "--max-tokens", "3")
        assert r.returncode == 0 and "terminate called" not in r.stderr, (r.returncode, r.stderr[-500:])


@pytest.mark.slow  # a CLI subprocess (~6-10 s); the in-process tests cover the same code
def test_mach_trace_cli(tmp_path):
    out = tmp_path / "trace.json"
    r = _mach("trace", "--out", str(out), "--tokens", "24", "--seq", "12", "--slots", "6", "--sizes", "4,8,16",
              "--report", str(tmp_path / "report.json"))
    assert r.returncode == 0, r.stderr
    assert "reproduces the live hits, misses and evictions exactly" in r.stdout
    assert "belady" in r.stdout and "reuse@1" in r.stdout
    tr = RoutingTrace.load(out)
    assert tr.tokens == 24 and tr.segments == [0, 12] and tr.meta["live_slots"] == 6
    rep = json.loads((tmp_path / "report.json").read_text())
    assert {x["slots"] for x in rep["sweep"]} == {4, 8, 16}
    assert default_slot_sizes(tr) == [4, 8, 12, 16, 20, 24]
    assert len(sweep(tr, [4], ("lru",))) == 1
