"""``mach convert``: the expert sidecar (one aligned extent per (layer, expert)) computes what its source computes,
in both residencies, from checkpoints as transformers and mlx-lm write them; re-quantization equals mlx-lm's;
an interrupted conversion resumes to the identical directory; a damaged sidecar is a CheckpointError naming it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mach_runtime import load_moe
from mach_runtime.errors import CheckpointError, ConfigError
from mach_runtime.io.convert import JOURNAL, PARTIAL, convert_checkpoint
from mach_runtime.io.expert_sidecar import ALIGN, DATA_NAME, INDEX_NAME, read_index
from mach_runtime.io.safetensors_index import CheckpointIndex
from tests.family_helpers import FAMILIES, load_reference
from tests.helpers import HF_QWEN3_MOE, greedy, reference_logits, rel_err
from tests.quant_helpers import mlx_lm_convert, mlx_lm_quantize_save, qwen3_moe_source
from tests.tolerances import EXACT, independent, reorder

IDS = [100, 7, 300, 42, 511, 3, 250, 99, 18, 400, 64, 5]
SAME = EXACT  # source vs converted: the same bytes through the same kernels at the same shapes (tests/tolerances.py)


def _run(path, residency, ids=IDS, n=6, **kw):
    """(logits of ``ids``, greedy tokens, store stats) of a checkpoint loaded by load_moe."""
    model, _, store, _ = load_moe(path, expert_residency=residency, **kw)
    try:
        return reference_logits(model, ids), greedy(model, ids, n), store.stats()
    finally:
        store.close()


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def q_source(tmp_path_factory):
    """A random qwen3_moe in the HF hub layout (per-expert, fp32, the hub's config spelling mlx-lm reads)."""
    return qwen3_moe_source(tmp_path_factory.mktemp("qsrc") / "src", layers=2)


@pytest.fixture(scope="module")
def mlx_export(q_source, tmp_path_factory):
    """q_source exported by mlx-lm's own ``convert`` (stacked switch_mlp): fp32, or 4-bit affine group 64."""
    root, out = tmp_path_factory.mktemp("mlx"), {}

    def get(kind):
        if kind not in out:
            kw = dict(quantize=True, q_bits=4, q_group_size=64) if kind == "q4" else dict(dtype="float32")
            out[kind] = mlx_lm_convert(q_source, root / kind, **kw)
        return out[kind]

    return get


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Sources as real tools write them, each converted without quantization flags."""
    root = tmp_path_factory.mktemp("conv")
    out = {}

    def get(name, src):
        if name not in out:
            out[name] = convert_checkpoint(src, root / name, progress=False)
        return out[name]

    return get


@pytest.mark.parametrize("residency", ["stacked", "streaming"])
def test_hf_per_expert_converts_to_equal_outputs(converted, hf_reference, residency):
    dst = converted("hf_qwen3_moe", HF_QWEN3_MOE)
    kw = {"expert_slots": 3} if residency == "streaming" else {}
    ids = hf_reference["prompt_ids"]
    want, want_tokens, _ = _run(HF_QWEN3_MOE, residency, ids=ids, **kw)
    got, tokens, stats = _run(dst, residency, ids=ids, **kw)
    assert rel_err(got, want) <= SAME and tokens == want_tokens
    assert rel_err(got, hf_reference["logits"]) <= independent()  # and transformers' own forward
    idx = read_index(dst)
    assert idx.source.scheme == "hf_per_expert" and idx.requantized is None
    assert not [n for n in CheckpointIndex(dst).names() if ".experts." in n]  # experts only in the sidecar
    if residency == "streaming":
        assert stats.misses > 0 and stats.bytes_read == stats.misses * stats.expert_bytes


@pytest.mark.parametrize("kind", ["f32", "q4"])
def test_mlx_stacked_export_converts_to_equal_outputs(converted, mlx_export, kind):
    """mlx-lm ``convert`` exports (stacked switch_mlp, fp32 and 4-bit): the sidecar keeps their precision."""
    src = mlx_export(kind)
    dst = converted("mlx_" + kind, src)
    for residency in ("stacked", "streaming"):
        kw = {"expert_slots": 3} if residency == "streaming" else {}
        want, want_tokens, _ = _run(src, residency, **kw)
        got, tokens, _ = _run(dst, residency, **kw)
        assert rel_err(got, want) <= SAME and tokens == want_tokens, residency
    idx = read_index(dst)
    assert idx.source.scheme == "mlx_switch" and idx.source.layout == "stacked"
    assert {None if q is None else q.bits for la in idx.layers for q in la.quants.values()} == \
        ({4} if kind == "q4" else {None})


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "gpt_oss"])
def test_hf_fused_families_convert_to_equal_outputs(converted, arch):
    """transformers' fused experts (qwen3_5_moe gate_up_proj; gpt_oss transposed, interleaved, with biases)."""
    ref = load_reference(arch)
    dst = converted(arch, FAMILIES[arch])
    ids = ref["prompt_ids"]
    for residency in ("stacked", "streaming"):
        want, want_tokens, _ = _run(FAMILIES[arch], residency, ids=ids, n=4)
        got, tokens, _ = _run(dst, residency, ids=ids, n=4)
        assert rel_err(got, want) <= SAME and tokens == want_tokens, residency
        assert rel_err(got, ref["logits"]) <= independent(), residency  # transformers' own forward
    assert read_index(dst).source.layout == "stacked"


def test_a_streaming_miss_is_one_aligned_read(converted):
    """Every miss reads its expert's extent with one positional read at a 4096-aligned offset."""
    dst = converted("hf_qwen3_moe", HF_QWEN3_MOE)
    extents = {la.extent_bytes for la in read_index(dst).layers}
    model, _, store, _ = load_moe(dst, expert_residency="streaming", expert_slots=3)
    reads = []
    real = store.reader._read_range

    def counted(path, offset, nbytes):
        reads.append((os.path.basename(path), offset, nbytes))
        return real(path, offset, nbytes)

    store.reader._read_range = counted
    try:
        greedy(model, IDS, 4)
        s = store.stats()
    finally:
        store.close()
    assert s.misses > 0 and len(reads) == s.misses
    assert all(f == DATA_NAME and o % ALIGN == 0 and n in extents for f, o, n in reads)


def _experts_only(path, module):  # mlx-lm's quant_predicate: quantize the routed experts, nothing else
    return "switch_mlp" in path


@pytest.mark.parametrize("mode,bits,group", [("affine", 4, 64), ("mxfp4", 4, 32)])
def test_requantized_experts_equal_mlx_lm_quantization(q_source, tmp_path, mode, bits, group):
    dst = convert_checkpoint(q_source, tmp_path / "ours", q_bits=bits, q_group_size=group, q_mode=mode,
                             progress=False)
    ref = mlx_lm_quantize_save(q_source, tmp_path / "mlx", q_group_size=group, q_bits=bits, mode=mode,
                               quant_predicate=_experts_only)
    # the stored experts: mlx-lm's own tensors, per layer, projection and component
    from safetensors.numpy import load_file

    theirs = {}
    for f in ref.glob("model*.safetensors"):
        theirs.update(load_file(str(f)))
    model, _, store, _ = load_moe(dst, expert_residency="stacked")
    try:
        for layer in range(2):
            glu = model.model.layers[layer].mlp.switch_mlp
            pre = f"model.layers.{layer}.mlp.switch_mlp."
            w = np.concatenate([theirs[pre + "gate_proj.weight"], theirs[pre + "up_proj.weight"]], axis=1)
            assert np.array_equal(np.array(glu.gate_up["weight"]), w)
            assert np.array_equal(np.array(glu.down["weight"]), theirs[pre + "down_proj.weight"])
            s = np.concatenate([theirs[pre + "gate_proj.scales"], theirs[pre + "up_proj.scales"]], axis=1)
            assert np.allclose(np.array(glu.gate_up["scales"]), s, rtol=1e-6, atol=0)
        got = reference_logits(model, IDS)
    finally:
        store.close()
    from mlx_lm import load as mlx_lm_load

    ref_model, _ = mlx_lm_load(str(ref))
    assert rel_err(got, reference_logits(ref_model, IDS)) <= independent()
    got_s, _, _ = _run(dst, "streaming", n=1)
    assert rel_err(got_s, got) <= reorder(1e-6)  # bank slots instead of stacked experts: another GEMM shape
    assert read_index(dst).requantized.mode == mode


def test_interrupted_conversion_resumes_to_the_identical_directory(tmp_path):
    whole = convert_checkpoint(HF_QWEN3_MOE, tmp_path / "whole", progress=False)

    class Stop(Exception):
        pass

    def stop(layer):
        raise Stop(layer)

    dst = tmp_path / "resumed"
    with pytest.raises(Stop):
        convert_checkpoint(HF_QWEN3_MOE, dst, progress=False, on_layer=stop)
    partial = tmp_path / ("resumed" + PARTIAL)
    assert not dst.exists() and (partial / JOURNAL).is_file()
    done = json.loads((partial / JOURNAL).read_text())["done"]
    assert list(done) == ["0"]
    with pytest.raises(ConfigError, match="other options"):  # the partial belongs to these options only
        convert_checkpoint(HF_QWEN3_MOE, dst, progress=False, q_bits=8, q_group_size=32)
    with open(partial / DATA_NAME, "r+b") as f:  # damage the layer written: resume must verify and rewrite it
        f.seek(100)
        f.write(b"\xff" * 8)
    convert_checkpoint(HF_QWEN3_MOE, dst, progress=False)
    assert not partial.exists()
    assert _files(dst) == _files(whole)
    with pytest.raises(ConfigError, match="already exists"):
        convert_checkpoint(HF_QWEN3_MOE, dst, progress=False)


@pytest.mark.parametrize("damage", ["truncated", "index_json", "index_shape", "index_offset", "missing_data"])
def test_damaged_sidecar_is_a_checkpoint_error_naming_the_file(converted, tmp_path, damage):
    import shutil

    dst = shutil.copytree(converted("hf_qwen3_moe", HF_QWEN3_MOE), tmp_path / "c")
    data, index = dst / DATA_NAME, dst / INDEX_NAME
    idx = json.loads(index.read_text())
    name = INDEX_NAME
    if damage == "truncated":
        os.truncate(data, os.path.getsize(data) - ALIGN)
        name = DATA_NAME
    elif damage == "missing_data":
        data.unlink()
        name = DATA_NAME
    elif damage == "index_json":
        index.write_text(index.read_text()[:-40])
    elif damage == "index_shape":
        idx["layers"][0]["components"][0]["shape"] = [7, 7]
        index.write_text(json.dumps(idx))
    else:
        idx["layers"][1]["offset"] += 16
        index.write_text(json.dumps(idx))
    for residency in ("stacked", "streaming"):
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            load_moe(dst, expert_residency=residency)


def test_mach_convert_cli_and_check(tmp_path, capsys):
    from mach_runtime.cli.check import check_checkpoint
    from mach_runtime.cli.main import main

    dst = tmp_path / "cli"
    assert main(["convert", str(HF_QWEN3_MOE), str(dst), "--q-bits", "8", "--q-group-size", "32"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(dst.absolute()) and "[mach convert] layer" in out.err
    assert read_index(dst).requantized.bits == 8
    report = check_checkpoint(dst)
    assert report["layout"] == "sidecar" and report["scheme"] == "mach_sidecar"
    assert main(["convert", str(HF_QWEN3_MOE), str(tmp_path / "bad"), "--q-mode", "mxfp4", "--q-bits", "8"]) == 2
    assert "mxfp4" in capsys.readouterr().err


def test_deepseek_v4_is_refused_clearly(tmp_path):
    with pytest.raises(ConfigError, match="deepseek_v4"):
        convert_checkpoint(HF_QWEN3_MOE.parent / "hf_deepseek_v4", tmp_path / "v4", progress=False)
    assert not (tmp_path / "v4").exists() and not (tmp_path / ("v4" + PARTIAL)).exists()
