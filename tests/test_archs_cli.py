"""The registry (one source of truth), mach-archs, mach check (no MLX import), deepseek_v4's registration."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mach_runtime.cli.check import GIB, check_checkpoint, verdicts
from mach_runtime.errors import ArchNotImplementedError, CheckpointError, UnsupportedArchError
from mach_runtime.io.arch_registry import (
    REGISTRY,
    adapter_for_config,
    arch_summary,
    continuous_batching_capability,
    detect_arch,
    registry_summary,
)
from tests.family_helpers import FAMILIES
from tests.helpers import HF_QWEN3_MOE

ROOT = Path(__file__).resolve().parent.parent
FIVE = {"qwen3_moe", "qwen3_5_moe", "gpt_oss", "gemma4", "deepseek_v4"}
REQUIRED = {"model_type", "kv_cache_kind", "specdec_kind", "swiglu", "expert_bias", "wrapped", "stacked",
            "model_module", "bits", "group"}


def _run_no_mlx(code: str) -> str:
    """Runs ``code`` in a fresh interpreter, then asserts MLX was never imported; returns stdout."""
    prog = code + "\nimport sys\nassert not [m for m in sys.modules if m == 'mlx' or m.startswith('mlx.')], 'mlx imported'\n"
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_registry_has_the_five_families():
    assert set(REGISTRY) == FIVE
    rows = registry_summary()
    assert [r["arch"] for r in rows] == sorted(FIVE)
    json.dumps(rows)  # serialisable
    for r in rows:
        assert REQUIRED <= set(r)
        assert r == arch_summary(REGISTRY[r["arch"]])
    by = {r["arch"]: r for r in rows}
    assert {a for a, r in by.items() if r["expert_bias"]} == {"gpt_oss"}
    assert {a for a, r in by.items() if r["wrapped"]} == {"qwen3_5_moe", "gemma4"}
    assert {a for a, r in by.items() if not r["stacked"]} == {"deepseek_v4"}
    assert by["gpt_oss"]["swiglu"] == "silu_limited" and by["gemma4"]["swiglu"] == "plain_geglu"
    assert by["qwen3_moe"]["swiglu"] == by["qwen3_5_moe"]["swiglu"] == "plain_swiglu"
    assert {a: r["kv_cache_kind"] for a, r in by.items()} == {
        "qwen3_moe": "standard", "qwen3_5_moe": "hybrid_gdn", "gpt_oss": "rotating", "gemma4": "rotating",
        "deepseek_v4": "compressed",
    }


def test_continuous_batching_rule():
    assert continuous_batching_capability("standard")[0]
    assert continuous_batching_capability("hybrid_gdn")[0]
    assert not continuous_batching_capability("compressed")[0]
    assert continuous_batching_capability("rotating", keep=0)[0]
    assert not continuous_batching_capability("rotating", keep=4)[0]
    assert {a: REGISTRY[a].continuous_batching() for a in FIVE} == {
        "qwen3_moe": True, "qwen3_5_moe": True, "gpt_oss": True, "gemma4": True, "deepseek_v4": False,
    }


def test_mach_archs_json_is_registry_summary_without_mlx():
    out = _run_no_mlx("from mach_runtime.cli.archs import main; main(['--json'])")
    assert json.loads(out) == registry_summary()
    table = _run_no_mlx("from mach_runtime.cli.archs import main; main([])")
    for arch in FIVE:
        assert arch in table


def test_mach_archs_console_script():
    exe = Path(sys.executable).parent / "mach-archs"
    if not exe.exists():
        pytest.skip("mach-archs console script not installed in this environment")
    r = subprocess.run([str(exe), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout) == registry_summary()


@pytest.mark.parametrize("arch", ["qwen3_moe", *sorted(FAMILIES)])
def test_mach_check_fixtures_without_mlx(arch):
    path = HF_QWEN3_MOE if arch == "qwen3_moe" else FAMILIES[arch]
    out = _run_no_mlx(f"from mach_runtime.cli.main import main; main(['check', {str(path)!r}, '--json', '--memory-gb', '16'])")
    r = json.loads(out)
    assert r["arch"] == arch and r["loadable"]
    assert r["layout"] == ("per_expert" if arch == "qwen3_moe" else "stacked")
    assert r["stacked"]["verdict"] == "fits" and r["streaming"]["verdict"] == "fits"
    assert r["continuous_batching"]["possible"]
    assert r["total_expert_bytes"] + r["non_expert_bytes"] == r["total_bytes"]
    assert r["expert_bytes"] * r["num_experts"] * r["moe_layers"] == r["total_expert_bytes"]
    assert 0 < r["expert_params"] < r["params"]


def test_mach_check_text_output(capsys):
    from mach_runtime.cli.check import main

    assert main([str(FAMILIES["gpt_oss"]), "--memory-gb", "8"]) == 0
    out = capsys.readouterr().out
    assert "gpt_oss" in out and "stacked         fits" in out and "batching        possible" in out


def test_verdicts_on_crafted_sizes():
    G = GIB
    # 2 GiB weights, 60 GiB experts (48 layers x 128 experts), top-8
    args = dict(weights=2 * G, experts=60 * G, n_layers=48, num_experts=128, top_k=8)
    v = verdicts(**args, memory=128 * G)
    assert v["stacked"]["verdict"] == "fits" and v["streaming"]["verdict"] == "fits"
    assert v["streaming"]["bank_experts_per_layer"] == 128
    v = verdicts(**args, memory=72 * G)  # needs ~65.6 GiB: under 72 GiB but over 80 % of it
    assert v["stacked"]["verdict"] == "tight"
    v = verdicts(**args, memory=32 * G)
    assert v["stacked"]["verdict"] == "wont_fit"
    assert v["streaming"]["verdict"] == "fits"  # room for >= 25 % of each layer's experts
    assert 32 <= v["streaming"]["bank_experts_per_layer"] < 128
    assert v["streaming"]["need_bytes"] <= 0.8 * 32 * G
    v = verdicts(**args, memory=8 * G)
    assert v["streaming"]["verdict"] == "tight"  # more than top-k, less than a quarter
    assert 8 <= v["streaming"]["bank_experts_per_layer"] < 32
    v = verdicts(**args, memory=3 * G)
    assert v["streaming"]["verdict"] == "wont_fit" and v["stacked"]["verdict"] == "wont_fit"


def _write_header_only(path: Path, tensors: dict) -> None:
    """A safetensors file whose data region is a sparse hole: headers are all mach check reads."""
    header, off = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = 2 if dtype == "BF16" else 4
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)


def _crafted_deepseek_v4(dst: Path, layers=4, experts=64, hidden=1024, inter=512) -> Path:
    dst.mkdir()
    cfg = {"model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"], "hidden_size": hidden,
           "num_hidden_layers": layers, "n_routed_experts": experts, "num_experts_per_tok": 6,
           "moe_intermediate_size": inter, "vocab_size": 4096,
           "mlp_layer_types": ["hash_moe"] * 2 + ["moe"] * (layers - 2)}
    (dst / "config.json").write_text(json.dumps(cfg))
    t = {"embed.weight": ("BF16", (4096, hidden)), "head.weight": ("BF16", (4096, hidden))}
    for L in range(layers):
        t[f"layers.{L}.attn.wq_a.weight"] = ("BF16", (hidden, hidden))
        for e in range(experts):
            p = f"layers.{L}.ffn.experts.{e}"
            t[f"{p}.w1.weight"] = ("BF16", (inter, hidden))
            t[f"{p}.w3.weight"] = ("BF16", (inter, hidden))
            t[f"{p}.w2.weight"] = ("BF16", (hidden, inter))
    _write_header_only(dst / "model.safetensors", t)
    return dst


def test_deepseek_v4_registered_checked(tmp_path):
    path = _crafted_deepseek_v4(tmp_path / "v4")
    assert detect_arch(path / "config.json") == "deepseek_v4"
    with pytest.raises(CheckpointError, match="no tokenizer files"):  # load_moe would refuse it too
        check_checkpoint(path, memory_gb=0.75)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (path / f).write_bytes((HF_QWEN3_MOE / f).read_bytes())
    r = check_checkpoint(path, memory_gb=0.75)
    assert r["arch"] == "deepseek_v4" and r["loadable"]
    assert r["layout"] == "per_expert" and r["scheme"] == "upstream_per_expert"
    assert r["expert_bytes"] == 3 * 1024 * 512 * 2
    assert r["total_expert_bytes"] == 4 * 64 * r["expert_bytes"]  # 768 MiB of experts
    assert r["stacked"]["verdict"] == "wont_fit"
    assert r["streaming"]["verdict"] in ("tight", "fits")
    assert not r["continuous_batching"]["possible"] and "compressed" in r["continuous_batching"]["reason"]
    out = _run_no_mlx(f"from mach_runtime.cli.check import main; main([{str(path)!r}, '--json', '--memory-gb', '64'])")
    assert json.loads(out)["stacked"]["verdict"] == "fits"
    from mach_runtime import load_moe

    with pytest.raises(CheckpointError, match="weights do not match the deepseek_v4 model"):
        load_moe(path)  # header-only crafted checkpoint: the attention / router tensors are missing
    from mach_runtime import load_v4_flash

    with pytest.raises(CheckpointError, match="weights do not match the deepseek_v4 model"):
        load_v4_flash(path, expert_residency="streaming")
    with pytest.raises(CheckpointError, match="load_v4_flash loads DeepSeek-V4.*qwen3_moe"):
        load_v4_flash(HF_QWEN3_MOE)


def test_unimplemented_adapter_raises_arch_not_implemented(monkeypatch):
    import dataclasses

    from mach_runtime import load_moe
    from mach_runtime.io import arch_registry

    stub = dataclasses.replace(REGISTRY["qwen3_moe"], implemented=False)
    monkeypatch.setitem(arch_registry.REGISTRY, "qwen3_moe", stub)
    with pytest.raises(ArchNotImplementedError, match="qwen3_moe.*not implemented"):
        load_moe(HF_QWEN3_MOE)


def test_unknown_model_type_lists_all_five(tmp_path):
    with pytest.raises(UnsupportedArchError) as e:
        adapter_for_config({"model_type": "llama4"}, "x/config.json")
    for t in ("qwen3_moe", "qwen3_5_moe", "gpt_oss", "gemma4", "deepseek_v4"):
        assert t in str(e.value)


def test_mach_check_errors(tmp_path, capsys):
    from mach_runtime.cli.check import main

    assert main([str(tmp_path / "missing")]) == 2
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    assert main([str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "not supported" in err and "gemma4" in err


def test_physical_memory_default():
    from mach_runtime.cli.check import physical_memory_bytes

    if hasattr(os, "sysconf"):
        assert physical_memory_bytes() > GIB // 4


def test_mach_check_mxfp4_param_count(tmp_path):
    from tests.family_helpers import to_gpt_oss_mxfp4

    path = to_gpt_oss_mxfp4(tmp_path / "mxfp4")
    r = check_checkpoint(path, memory_gb=8)
    assert r["expert_quantization"] == {"bits": 4, "group_size": 32, "mode": "mxfp4"}
    assert r["expert_params"] == 2 * 8 * (64 * 64 + 32 * 64) + 2 * 8 * (64 + 64)  # weights + biases, 2 layers
