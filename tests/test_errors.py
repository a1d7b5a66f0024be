"""Every bad input a user can cause raises the project's own error, naming the file or field and the fix."""

import json
import shutil
import threading

import mlx.core as mx
import pytest

from mach_runtime import load_moe
from mach_runtime.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    ExpertCacheTooSmallError,
    MachError,
    UnsupportedArchError,
)
from mach_runtime.io.arch_registry import detect_arch
from tests.helpers import HF_QWEN3_MOE, convert

GIB = 1 << 30


@pytest.fixture
def ckpt(tmp_path):
    """A fresh writable copy of the HF fixture (single file)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(HF_QWEN3_MOE, dst)
    return dst


def _io_threads():
    return [t for t in threading.enumerate() if t.name.startswith("mach-io")]


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist.*never downloads"):
        load_moe(tmp_path / "nope")


def test_path_is_a_file(ckpt):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_moe(ckpt / "config.json")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="config.json not found"):
        load_moe(ckpt)


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_moe(ckpt)


def test_unknown_model_type_lists_supported(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama_moe_9000"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchError, match="'llama_moe_9000' is not supported.*qwen3_moe"):
        load_moe(ckpt)
    with pytest.raises(UnsupportedArchError, match="qwen3_moe"):
        detect_arch(ckpt / "config.json")


def test_unknown_arch_argument(ckpt):
    with pytest.raises(UnsupportedArchError, match="known archs: .*qwen3_moe"):
        load_moe(ckpt, arch="nope")


def test_missing_config_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["num_experts_per_tok"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'num_experts_per_tok' must be a positive integer"):
        load_moe(ckpt)


def test_missing_shard(tmp_path):
    path = convert(HF_QWEN3_MOE, tmp_path / "sharded", shard_bytes=150_000)
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointNotFoundError, match=f"{victim.name}.*missing"):
        load_moe(path)


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        load_moe(ckpt)


def test_corrupt_header(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt"):
        load_moe(ckpt)


def test_tiny_garbage_file(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="truncated"):
        load_moe(ckpt)


def _rewrite(ckpt, fn):
    w = dict(mx.load(str(ckpt / "model.safetensors")))
    fn(w)
    mx.save_safetensors(str(ckpt / "model.safetensors"), w)


def test_expert_with_wrong_shape(ckpt):
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    _rewrite(ckpt, lambda w: w.__setitem__(name, mx.zeros((16, 64))))
    with pytest.raises(CheckpointError, match=f"'{name}' (has shape|differs)"):
        load_moe(ckpt)


def test_all_experts_with_wrong_shape(ckpt):
    def fn(w):
        for e in range(8):
            w[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] = mx.zeros((64, 16))

    _rewrite(ckpt, fn)
    with pytest.raises(CheckpointError, match=r"down_proj.weight' has shape \[64, 16\].*expected \[64, 32\]"):
        load_moe(ckpt)


def test_missing_expert(ckpt):
    def fn(w):
        for p in ("gate_proj", "up_proj", "down_proj"):
            del w[f"model.layers.2.mlp.experts.3.{p}.weight"]

    _rewrite(ckpt, fn)
    with pytest.raises(CheckpointError, match="experts.3.gate_proj.weight' is missing.*7 of 8"):
        load_moe(ckpt)


def test_no_expert_tensors(ckpt):
    def fn(w):
        for k in [k for k in w if ".experts." in k]:
            del w[k]

    _rewrite(ckpt, fn)
    with pytest.raises(CheckpointError, match="no routed-expert tensors found"):
        load_moe(ckpt)


@pytest.mark.parametrize("residency", ["stacked", "streaming"])
def test_wrong_non_expert_shape_returns_nothing_and_leaks_no_threads(ckpt, residency):
    before = len(_io_threads())
    _rewrite(ckpt, lambda w: w.__setitem__("lm_head.weight", mx.zeros((512, 32))))
    with pytest.raises(CheckpointError, match="'lm_head.weight' has shape"):
        load_moe(ckpt, expert_residency=residency)
    assert len(_io_threads()) == before


def test_missing_non_expert_tensor(ckpt):
    _rewrite(ckpt, lambda w: w.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match="missing 1 tensor.*model.norm.weight"):
        load_moe(ckpt)


def test_missing_tokenizer(ckpt):
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_moe(ckpt)


def test_expert_cache_too_small():
    with pytest.raises(ExpertCacheTooSmallError, match="top-k=2.*raise expert_cache_gb to at least"):
        load_moe(HF_QWEN3_MOE, expert_residency="streaming", expert_cache_gb=1.5 * 2 * 24576 / GIB)


def test_expert_slots_too_small_or_conflicting():
    with pytest.raises(ExpertCacheTooSmallError, match="expert_slots=1: .*at least 2 slots"):
        load_moe(HF_QWEN3_MOE, expert_residency="streaming", expert_slots=1)
    with pytest.raises(ConfigError, match="either expert_cache_gb or expert_slots"):
        load_moe(HF_QWEN3_MOE, expert_residency="streaming", expert_slots=4, expert_cache_gb=1.0)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"expert_residency": "ssd"}, "expert_residency must be one of"),
        ({"expert_cache_gb": -1}, "expert_cache_gb must be > 0"),
        ({"expert_cache_gb": "lots"}, "expert_cache_gb must be a number"),
        ({"eviction_policy": "random"}, "eviction_policy must be one of"),
        ({"io_threads": 0}, "io_threads must be >= 1"),
        ({"dtype": "float7"}, "unknown MLX dtype"),
    ],
)
def test_bad_settings(kw, match):
    with pytest.raises(ConfigError, match=match):
        load_moe(HF_QWEN3_MOE, **kw)


def test_bad_env_setting(monkeypatch):
    monkeypatch.setenv("MACH_EXPERT_RESIDENCY", "cloud")
    with pytest.raises(ConfigError, match="environment variable MACH_EXPERT_RESIDENCY"):
        load_moe(HF_QWEN3_MOE)


def test_file_truncated_after_open_fails_cleanly(ckpt):
    model, tok, store, cache = load_moe(ckpt, expert_residency="streaming", expert_cache_gb=2.5 * 2 * 24576 / GIB)
    try:
        f = ckpt / "model.safetensors"
        f.write_bytes(f.read_bytes()[:4096])
        with pytest.raises(CheckpointError, match="unexpected end of file"):
            mx.eval(model(mx.array([list(range(1, 40))])))
        # the failed read left the bank consistent: nothing marked resident that was not loaded
        for bank in store.banks:
            assert (bank.lut >= 0).sum() == bank.resident == (bank.slot_expert >= 0).sum()
    finally:
        store.close()


def test_errors_share_a_base_class():
    for cls in (CheckpointError, ConfigError, UnsupportedArchError, ExpertCacheTooSmallError):
        assert issubclass(cls, MachError)
