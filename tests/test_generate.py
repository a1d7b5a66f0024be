"""The engine's generation loop against mlx-lm's own, and the mach CLI end to end."""

import os
import subprocess
import sys

import mlx.core as mx
import pytest

from mach_runtime import load_moe
from mach_runtime.engine.generate import GenerationStats, generate_tokens, make_sampler, stream_generate
from mach_runtime.errors import ConfigError
from tests.helpers import HF_QWEN3_MOE


@pytest.mark.parametrize("residency", ["stacked", "streaming"])
def test_generate_tokens_matches_mlx_lm_generate_step(tiny_dir, residency):
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    ref_model, tok = mlx_lm_load(str(tiny_dir))
    ids = tok.encode("while True:\n    line = input()\n" * 30)
    want = [int(t) for t, _ in zip((t for t, _ in generate_step(mx.array(ids), ref_model)), range(20))]
    model, tok, store, cache = load_moe(tiny_dir, expert_residency=residency)
    try:
        stats = GenerationStats()
        got = list(generate_tokens(model, ids, make_prompt_cache(model), make_sampler(), 20, stats))
        assert got == want
        assert stats.generated_tokens == 20 and stats.prompt_tokens == len(ids)
    finally:
        store.close()


def test_chunked_prefill_equals_one_shot(tiny_dir, monkeypatch):
    import mach_runtime.engine.generate as g
    from mlx_lm.models.cache import make_prompt_cache

    model, tok, store, cache = load_moe(tiny_dir)
    ids = tok.encode("x = [i * i for i in range(10)]\n" * 8)
    one = list(generate_tokens(model, ids, make_prompt_cache(model), make_sampler(), 12))
    monkeypatch.setattr(g, "PREFILL_STEP", 7)
    chunked = list(g.generate_tokens(model, ids, make_prompt_cache(model), make_sampler(), 12))
    assert one == chunked


def test_sampling_is_seeded(tiny_dir):
    model, tok, store, cache = load_moe(tiny_dir)
    runs = [
        [c.token for c in stream_generate(model, tok, "def", max_tokens=16, temperature=1.0, top_p=0.9, seed=s)]
        for s in (1, 1, 2)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_stream_generate_finish_reasons(tiny_dir):
    model, tok, store, cache = load_moe(tiny_dir)
    chunks = list(stream_generate(model, tok, "def", max_tokens=5))
    assert len(chunks) == 5 and chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    # force eos: make it the argmax by stopping at whatever greedy produces first
    first = chunks[0].token
    tok._eos_token_ids = {first}
    stopped = list(stream_generate(model, tok, "def", max_tokens=5))
    assert len(stopped) == 1 and stopped[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "kw,match",
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -3}, "top_k"), ({"max_tokens": 0}, "max_tokens")],
)
def test_bad_generation_params(tiny_dir, kw, match):
    model, tok, store, cache = load_moe(tiny_dir)
    with pytest.raises(ConfigError, match=match):
        list(stream_generate(model, tok, "def", **{"max_tokens": 4, **kw}))


def test_empty_prompt_rejected(tiny_dir):
    model, tok, store, cache = load_moe(tiny_dir)
    with pytest.raises(ConfigError, match="prompt is empty"):
        list(stream_generate(model, tok, [], max_tokens=4))


def _mach(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "mach_runtime.cli.main", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )


def test_cli_generate_streaming_reports_stats():
    r = _mach("generate", str(HF_QWEN3_MOE), "--prompt", "def f(x):", "--max-tokens", "12", "--streaming",
              "--expert-cache-gb", "0.0001")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "generated 12 tok" in r.stderr and "tok/s" in r.stderr
    assert "hit rate" in r.stderr and "misses" in r.stderr


def test_cli_generate_default_checkpoint_is_the_bundled_demo_model():
    from mach_runtime.assets import default_checkpoint, demo_model_path

    assert default_checkpoint() == str(demo_model_path())
    r = _mach("generate", "--max-tokens", "6", "--no-streaming")
    assert r.returncode == 0, r.stderr
    assert "generated 6 tok" in r.stderr and "hit rate" not in r.stderr


def test_cli_reports_errors_cleanly(tmp_path):
    r = _mach("generate", str(tmp_path / "missing"))
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = _mach("generate", str(HF_QWEN3_MOE), "--streaming", "--expert-cache-gb", "0.00000001")
    assert r.returncode == 2 and "raise expert_cache_gb" in r.stderr


@pytest.mark.slow  # a CLI subprocess (~6-10 s); the in-process tests cover the same code
def test_cli_make_tiny(tmp_path):
    out = tmp_path / "q"
    r = _mach("make-tiny", str(out), "--layout", "stacked", "--quant-bits", "4", "--shard-mb", "0.1")
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors.index.json").exists()
    model, tok, store, cache = load_moe(out, expert_residency="streaming", expert_cache_gb=0.0001)
    assert store.stats().expert_bytes > 0
    store.close()
