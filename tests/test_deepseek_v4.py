"""deepseek_v4 against transformers (fixture: tests/fixtures/make_hf_deepseek_v4.py): hub-named checkpoint through
``load_moe`` and ``load_v4_flash`` in stacked and streaming residency (bank smaller than the experts), hybrid
routing (hash layers route by ``tid2eid[input_ids]`` exactly like transformers), the MTP draft hook, the
compressed caches (chunked prefill, snapshot / restore, the engine's generate loop) and the other name layouts."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file

from mach_runtime import load_moe, load_v4_flash
from mach_runtime.io.arch_registry import REGISTRY
from mach_runtime.io.expert_layout import find_expert_layout
from mach_runtime.io.safetensors_index import CheckpointIndex
from tests.family_helpers import FIXTURES, logits
from tests.helpers import greedy, rel_err
from tests import tolerances as tol

PATH = FIXTURES / "hf_deepseek_v4"
GIB = 1 << 30


@pytest.fixture(scope="module")
def ref():
    r = json.loads((PATH / "reference.json").read_text())
    r["logits"] = load_file(str(PATH / r["logits_file"]))[r["logits_key"]]
    r["mtp_logits"] = load_file(str(PATH / r["mtp_logits_file"]))[r["mtp_logits_key"]]
    return r


def layout_of(path):
    adapter = REGISTRY["deepseek_v4"]
    tc = json.loads((path / "config.json").read_text())
    tc = adapter.resolve_config(tc, CheckpointIndex(path).__contains__)
    return find_expert_layout(CheckpointIndex(path), adapter, tc, "config.json")


def budget(layout, slots: int) -> float:
    return (slots + 0.5) * len(layout.layers) * layout.expert_bytes / GIB


def record_indices(model) -> dict:
    """Wraps every routed-expert module so the indices it receives are recorded per layer."""
    from mach_runtime.engine.hooks import ModuleHook, install

    seen = {}

    class Recording(ModuleHook):
        kind = "test_record_indices"

        def __call__(self, x, indices):
            seen.setdefault(self.hook_layer, []).append(np.array(indices).reshape(-1, indices.shape[-1]))
            return self.inner(x, indices)

    for L in range(len(model.model.layers)):
        install(model, f"model.layers.{L}.mlp.experts", Recording).hook_layer = L
    return seen


def test_layout_and_adapter():
    layout = layout_of(PATH)
    assert layout.layout == "per_expert" and layout.scheme == "upstream_per_expert"
    assert [src.layer for src in layout.layers] == [0, 1, 2, 3, 4]  # 4 layers + the MTP block
    mtp = layout.layers[4].components[("gate", "weight")]
    assert mtp.tensor_names[0] == "mtp.0.ffn.experts.0.w1.weight"
    assert REGISTRY["deepseek_v4"].implemented and REGISTRY["deepseek_v4"].kv_cache_kind == "compressed"


@pytest.mark.parametrize("loader", [load_moe, load_v4_flash], ids=["load_moe", "load_v4_flash"])
@pytest.mark.parametrize("residency,slots", [("stacked", None), ("streaming", 2), ("streaming", 3)])
def test_matches_transformers(ref, loader, residency, slots):
    """Logits, greedy tokens, hybrid routing and MTP draft logits equal transformers'; bank < experts."""
    layout = layout_of(PATH)
    kw = {"expert_residency": residency}
    if slots:
        assert layout.top_k <= slots < layout.num_experts
        kw["expert_cache_gb"] = budget(layout, slots)
    model, tok, store, cache = loader(PATH, **kw)
    try:
        assert [type(c).__name__ for c in cache] == ["CompressedKVCache"] * 4
        seen = record_indices(model)
        lg, hidden = model(mx.array([ref["prompt_ids"]]), return_hidden=True)
        assert rel_err(np.array(lg[0]), ref["logits"]) <= tol.independent()
        # the last call per layer: a streamed forward that missed is redone, and the redo's routing is the exact one
        for L, want in ref["expert_indices"].items():  # every MoE layer routes like transformers
            assert np.sort(seen[int(L)][-1], axis=-1).tolist() == want
        table = load_file(str(PATH / "model.safetensors"))
        for L in (0, 1):  # the hash layers: exactly tid2eid[input_ids]
            tid2eid = table[f"layers.{L}.ffn.gate.tid2eid"]
            assert (seen[L][-1] == tid2eid[ref["prompt_ids"]]).all()
        draft = model.mtp_draft(hidden, mx.array([ref["mtp_next_ids"]]), model.make_mtp_cache())
        assert rel_err(np.array(draft[0]), ref["mtp_logits"]) <= tol.independent()
        assert greedy(model, ref["prompt_ids"], len(ref["greedy_ids"])) == ref["greedy_ids"]
        if slots:
            stats = store.stats()
            assert stats.capacity_experts == slots * len(layout.layers)
            assert stats.misses > 0 and stats.evictions > 0
            assert stats.bytes_read == stats.misses * layout.expert_bytes
    finally:
        store.close()


def test_mtp_incremental_and_caches(ref):
    """The MTP hook token by token with its cache == all at once; chunked prefill == one pass; snapshot /
    restore rolls the compressed caches back; the engine's generate loop reproduces transformers' greedy ids."""
    from mach_runtime.engine.generate import generate_tokens, make_sampler

    model, _, store, cache = load_v4_flash(PATH, expert_residency="streaming",
                                           expert_cache_gb=budget(layout_of(PATH), 2))
    try:
        ids, nxt = ref["prompt_ids"], ref["mtp_next_ids"]
        _, hidden = model(mx.array([ids]), return_hidden=True)
        mc = model.make_mtp_cache()
        steps = [np.array(model.mtp_draft(hidden[:, i:i + 1], mx.array([nxt[i:i + 1]]), mc)[0]) for i in range(len(ids))]
        assert rel_err(np.concatenate(steps), ref["mtp_logits"]) <= tol.independent()

        full = ids + ref["greedy_ids"]
        whole = logits(model, full)
        c = model.make_cache()
        parts = [np.array(model(mx.array([full[a:a + 6]]), c)[0]) for a in range(0, 18, 6)]
        snaps = [x.snapshot() for x in c]
        assert not any(x.is_trimmable() for x in c)
        after = [np.array(model(mx.array([full[a:a + 1]]), c)[0]) for a in range(18, 22)]
        for x, s in zip(c, snaps):
            x.restore(s)
        again = [np.array(model(mx.array([full[18:22]]), c)[0])]
        got = np.concatenate(parts + after)
        assert rel_err(got, whole[:22]) <= tol.reorder(1e-5)
        assert rel_err(np.concatenate(again), whole[18:22]) <= tol.reorder(1e-5)

        out = list(generate_tokens(model, ids, model.make_cache(), make_sampler(), len(ref["greedy_ids"])))
        assert out == ref["greedy_ids"]
    finally:
        store.close()


def _rewrite(dst, fn):
    shutil.copytree(PATH, dst)
    w = mx.load(str(dst / "model.safetensors"))
    mx.save_safetensors(str(dst / "model.safetensors"), fn(w))
    return dst


def test_without_mtp_tensors(ref, tmp_path):
    """transformers drops mtp.*: such a checkpoint loads without the block and mtp_draft says so."""
    dst = _rewrite(tmp_path / "nomtp", lambda w: {k: v for k, v in w.items() if not k.startswith("mtp.")})
    assert len(layout_of(dst).layers) == 4
    model, _, store, _ = load_moe(dst, expert_residency="streaming", expert_cache_gb=budget(layout_of(dst), 2))
    try:
        assert rel_err(logits(model, ref["prompt_ids"]), ref["logits"]) <= tol.independent()
        with pytest.raises(RuntimeError, match="no MTP block"):
            model.mtp_draft(mx.zeros((1, 1, 4, 32)), mx.array([[1]]))
    finally:
        store.close()


@pytest.mark.parametrize("form", ["hf_saved_per_expert", "hf_fused"])
def test_other_name_layouts(ref, tmp_path, form):
    """transformers' save_pretrained names (``model.layers.L.ffn.experts.e.w1``) and its module names with the
    stacked ``mlp.experts.gate_up_proj [E, 2I, H]`` (sliced per expert when streaming)."""
    from mach_runtime.models.deepseek_v4 import rename

    def convert(w):
        w = {k: v for k, v in w.items() if not k.startswith("mtp.")}
        if form == "hf_saved_per_expert":
            return {("model." + k if k.startswith("layers.") else k): v for k, v in w.items()}
        out = {}
        for L in range(4):
            e = [f"layers.{L}.ffn.experts.{i}" for i in range(8)]
            gu = [mx.concatenate([w.pop(f"{p}.w1.weight"), w.pop(f"{p}.w3.weight")]) for p in e]
            out[f"model.layers.{L}.mlp.experts.gate_up_proj"] = mx.stack(gu)
            out[f"model.layers.{L}.mlp.experts.down_proj"] = mx.stack([w.pop(f"{p}.w2.weight") for p in e])
        return {**out, **{rename(k, 4): v for k, v in w.items()}}

    dst = _rewrite(tmp_path / form, convert)
    layout = layout_of(dst)
    assert layout.scheme == form
    for residency in ("stacked", "streaming"):
        model, _, store, _ = load_moe(dst, expert_residency=residency, expert_cache_gb=budget(layout, 2))
        try:
            assert rel_err(logits(model, ref["prompt_ids"]), ref["logits"]) <= tol.independent()
        finally:
            store.close()
