"""Checkpoints exactly as the installed transformers saves them (``save_pretrained``, built at test time with
torch on the CPU, nothing rewritten) load in both residencies and match transformers' logits; every config
spelling transformers 4.x / 5.x and the hub use is accepted (tests/transformers_saved.py builds them)."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mach_runtime import load_moe
from mach_runtime.cli.check import check_checkpoint
from mach_runtime.errors import CheckpointError
from mach_runtime.io.arch_registry import REGISTRY, detect_arch, registry_summary
from tests.helpers import rel_err
from tests.tolerances import independent
from tests.transformers_saved import BUILDERS, PROMPT_IDS, save_transformers_checkpoint

# fp32 on both sides; the two implementations sum in different orders: a few ulps per layer (measured ~1e-6)
TOL = independent()  # tests/tolerances.py


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            arch, ref = save_transformers_checkpoint(name, out)
            cache[name] = (out, arch, ref)
        return cache[name]

    return get


def logits_of(path, **kw):
    model, _, store, _ = load_moe(path, **kw)
    try:
        return np.array(model(mx.array([PROMPT_IDS]))[0].astype(mx.float32)), store.stats()
    finally:
        store.close()


@pytest.mark.parametrize("residency", ["stacked", "streaming"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_transformers_saved_checkpoint_matches_transformers(saved, name, residency):
    path, arch, ref = saved(name)
    assert detect_arch(path) == arch
    kw = {"expert_residency": residency}
    if residency == "streaming":
        kw["expert_slots"] = 3  # fewer slots than experts: misses are read from disk
    got, stats = logits_of(path, **kw)
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= TOL
    if residency == "streaming":
        assert stats.misses > 0
    report = check_checkpoint(path, memory_gb=16)  # mach check agrees with what load_moe accepted
    assert report["arch"] == arch and report["loadable"]
    model_type = json.loads((path / "config.json").read_text())["model_type"]
    row = next(r for r in registry_summary() if r["arch"] == arch)  # what mach-archs --json prints
    assert model_type in row["model_types"] and row["implemented"]


@pytest.mark.parametrize("name,prefix", [("qwen3_5_moe", "model.visual."), ("gemma4", "model.vision_tower.")])
def test_vision_tower_skipped_with_one_log_line(saved, capfd, name, prefix):
    path, _, _ = saved(name)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "np") as f:
        assert any(k.startswith(prefix) for k in f.keys())
    capfd.readouterr()
    logits_of(path, expert_residency="stacked")
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "non-text tensors" in ln]
    assert len(lines) == 1 and prefix in lines[0]


def _aliases(arch):
    import importlib

    return importlib.import_module(f"mach_runtime.io.adapters.{arch}").ALIASES


def test_config_aliases_cover_transformers_attribute_map():
    """Every alias pair of transformers' config classes' ``attribute_map`` is one of the adapter's aliases."""
    import transformers

    classes = {"qwen3_moe": ["Qwen3MoeConfig"], "qwen3_5_moe": ["Qwen3_5MoeConfig", "Qwen3_5MoeTextConfig"],
               "gpt_oss": ["GptOssConfig"], "gemma4": ["Gemma4Config", "Gemma4TextConfig"],
               "deepseek_v4": ["DeepseekV4Config"]}
    assert set(classes) == set(REGISTRY)
    for arch, names in classes.items():
        pairs = {frozenset(p) for p in getattr(__import__(f"mach_runtime.io.adapters.{arch}", fromlist=["x"]),
                                               "ALIASES", ())}
        for cls in names:
            for a, b in getattr(transformers, cls).attribute_map.items():
                assert frozenset((a, b)) in pairs, (arch, cls, a, b)


def _hub_qwen3_moe(cfg):
    """The hub's Qwen3-30B-A3B / transformers 4.x spelling: num_experts, rope_theta, rope_scaling null."""
    cfg["num_experts"] = cfg.pop("num_local_experts")
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg["rope_scaling"] = None
    return cfg


def _hub_gpt_oss(cfg):
    """num_experts (the attribute name) instead of num_local_experts; rope_theta + rope_scaling (hub config)."""
    cfg["num_experts"] = cfg.pop("num_local_experts")
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = rp
    return cfg


def _flat_qwen3_5(cfg):
    """A wrapped model_type with its text settings at the top level (no text_config)."""
    tc = cfg.pop("text_config")
    cfg.pop("vision_config", None)
    return {**tc, **{k: v for k, v in cfg.items() if k not in tc}, "model_type": "qwen3_5_moe"}


def _old_rope_qwen3_5(cfg):
    """Qwen3.5 text config with the pre-rope_parameters spelling (rope_theta, partial_rotary_factor,
    rope_scaling carrying the mrope settings)."""
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["partial_rotary_factor"] = rp.pop("partial_rotary_factor")
    cfg["rope_scaling"] = rp
    return cfg


def _v4_alias(cfg):
    cfg["num_local_experts"] = cfg.pop("n_routed_experts")
    return cfg


@pytest.mark.parametrize("name,respell", [
    ("qwen3_moe", _hub_qwen3_moe), ("gpt_oss", _hub_gpt_oss), ("qwen3_5_moe", _flat_qwen3_5),
    ("qwen3_5_moe_text", _old_rope_qwen3_5), ("deepseek_v4", _v4_alias),
], ids=["qwen3_moe-hub", "gpt_oss-hub", "qwen3_5_moe-flat", "qwen3_5_moe_text-old-rope", "deepseek_v4-alias"])
def test_other_config_spellings_load(saved, tmp_path, name, respell):
    src, arch, ref = saved(name)
    dst = tmp_path / name
    shutil.copytree(src, dst)
    cfg = respell(json.loads((dst / "config.json").read_text()))
    (dst / "config.json").write_text(json.dumps(cfg))
    got, _ = logits_of(dst, expert_residency="stacked")
    assert rel_err(got, ref) <= TOL


def test_conflicting_aliases_are_a_checkpoint_error(saved, tmp_path):
    src, _, _ = saved("qwen3_moe")
    dst = tmp_path / "c"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["num_experts"] = cfg["num_local_experts"] + 1
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="num_experts.*num_local_experts"):
        load_moe(dst)
    with pytest.raises(CheckpointError, match="num_experts.*num_local_experts"):
        check_checkpoint(dst, memory_gb=16)


@pytest.mark.parametrize("name", ["qwen3_moe"])
def test_mlx_lm_compatible_load_reads_transformers_saves(saved, name):
    """``load`` (mlx-lm's loader) gets the adapter's normalised config: transformers 5's spellings load there
    too (mlx-lm alone stops at qwen3_moe's missing num_experts). The weights stay mlx-lm's business: its
    sanitize does not read gpt-oss's bf16 layout or per-expert Qwen3.5 experts (load_moe reads both)."""
    from mach_runtime import load

    path, _, ref = saved(name)
    model, _ = load(path)
    from mlx.utils import tree_map

    model.update(tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a,
                          model.parameters()))
    got = np.array(model(mx.array([PROMPT_IDS]))[0].astype(mx.float32))
    assert rel_err(got, ref) <= TOL
