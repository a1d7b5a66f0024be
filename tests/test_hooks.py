"""The one hook mechanism (engine/hooks.py): what a speculative engine installs on the shared model is listed by
``installed_hooks``, no module changes class, the parameter tree (names and arrays) stays the model's own, writes
through the model reach the original modules, outputs are unchanged, and ``remove_hooks`` restores the model."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from mach_runtime import load_moe
from mach_runtime.assets import demo_model_path
from mach_runtime.engine.hooks import ModuleHook, installed_hooks, remove_hooks, unwrap
from tests.family_helpers import FAMILIES
from tests.helpers import small_forwards

DEMO = demo_model_path()
DRAFT = DEMO.parent / "demo-qwen3-moe-dflash"
PROMPT = [5, 17, 99, 3, 250, 77, 12, 40, 41, 8, 9, 10]


def _classes(model) -> dict:
    return {path: type(unwrap(m)) for path, m in model.named_modules()}


def _tree(model) -> list:
    return [(k, id(v)) for k, v in tree_flatten(model.parameters())]


def _forwards(model) -> list:
    return small_forwards(model, PROMPT)


def test_spec_engine_lists_its_hooks_and_changes_no_class():
    from mach_runtime import BlockSpecDecEngine, BlockSpecDecEngineConfig, BlockSpecDecEngineMode
    from mach_runtime.engine.specdec.draft import load_dflash_draft

    model, tok, store, _ = load_moe(DEMO, expert_residency="stacked")
    classes, tree = _classes(model), _tree(model)
    ref = _forwards(model)
    assert installed_hooks(model) == []
    draft = load_dflash_draft(DRAFT)
    engine = BlockSpecDecEngine(model, tok, draft, store=store,
                                config=BlockSpecDecEngineConfig(mode=BlockSpecDecEngineMode.NATIVE_V7))
    hooks = installed_hooks(model)
    taps = sorted(int(h["path"].split(".")[2]) for h in hooks if h["kind"] == "tap")
    assert taps == sorted(set(int(i) for i in draft.target_layer_ids))
    assert all(h["path"] == f"model.layers.{i}" and h["wraps"] == "Qwen3MoeDecoderLayer"
               for h, i in zip([h for h in hooks if h["kind"] == "tap"], taps))
    moe = [h for h in hooks if h["kind"] == "compiled_moe"]
    assert [h["path"] for h in moe] == sorted(f"model.layers.{i}.mlp" for i in range(len(model.model.layers)))
    assert {h["kind"] for h in hooks} == {"tap", "compiled_moe"}  # qwen3_moe: no GatedDeltaNet layers
    # the same modules, of the same classes, with the same parameter names and arrays
    assert _classes(model) == classes and _tree(model) == tree
    assert all(type(m) is c for path, m in model.named_modules() if not isinstance(m, ModuleHook)
               for c in [classes[path]])
    # a second engine over the same model shares the hooks (nothing wrapped twice)
    BlockSpecDecEngine(model, tok, draft, store=store)
    assert installed_hooks(model) == hooks
    got = _forwards(model)  # the model's own forward through the hooks (compiled MoE blocks for small calls)
    # compiled blocks may fuse elementwise chains differently on a GPU backend: dtype epsilon x depth (bitwise on
    # MLX CPU, tests/test_compiled_moe.py); the taps add no arithmetic
    tol = 8 * float(mx.finfo(ref[0].dtype).eps) * len(model.model.layers)
    for a, b in zip(ref, got):
        assert a.shape == b.shape and mx.allclose(a, b, rtol=tol, atol=tol).item()
    out = "".join(c.text for c in engine.generate(PROMPT, max_tokens=8, temperature=0.0))
    assert out
    assert remove_hooks(model) == len(hooks)
    # (array ids are not compared after decoding: mx.compile(inputs=...) puts equal arrays back after tracing)
    assert installed_hooks(model) == [] and _classes(model) == classes
    assert [k for k, _ in _tree(model)] == [k for k, _ in tree]
    assert all(not isinstance(m, ModuleHook) for _, m in model.named_modules())


def test_taps_change_no_output_and_record_the_layer_outputs():
    from mach_runtime.engine.specdec.target import TargetOps

    model, _, _, _ = load_moe(DEMO, expert_residency="stacked")
    ref = _forwards(model)
    ops = TargetOps(model)
    ops.tap([1, 3])
    assert [(h["path"], h["kind"]) for h in installed_hooks(model)] == [("model.layers.1", "tap"),
                                                                       ("model.layers.3", "tap")]
    got = _forwards(model)
    for a, b in zip(ref, got):  # the same code runs: bitwise
        assert mx.array_equal(a, b).item()
    # the captured hidden states are the layers' own outputs (a forward over the layers by hand)
    tokens = mx.array(PROMPT, dtype=mx.uint32)
    _, hidden = ops.forward(tokens, make_prompt_cache(model), capture=(1, 3))
    cache = make_prompt_cache(model)
    h = model.model.embed_tokens(tokens[None])
    mask = "causal"
    outs = {}
    for i, layer in enumerate(model.model.layers):
        h = unwrap(layer)(h, mask, cache[i])
        outs[i] = h
    expect = mx.concatenate([outs[1], outs[3]], axis=-1)[0]
    assert mx.array_equal(hidden, expect).item()


def test_writes_through_the_model_reach_the_original_modules():
    from mach_runtime.engine.compiled_moe import compile_moe_blocks, moe_blocks

    model, _, _, _ = load_moe(DEMO, expert_residency="stacked")
    compile_moe_blocks(model)
    hook = moe_blocks(model)[0]
    assert isinstance(hook, ModuleHook) and hook.kind == "compiled_moe"
    w = hook.gate.weight
    model.update({"model": {"layers": [{"mlp": {"gate": {"weight": w * 2}}}]}}, strict=False)
    assert hook.inner.gate.weight is hook.gate.weight  # a child module: shared
    model.train()
    assert hook.inner.training and hook.training
    model.eval()
    assert not hook.inner.training
    hook.extra = mx.zeros((2,))  # an array set through the hook lands in the original's tree too
    assert "extra" in hook.inner and hook.inner.extra is hook.extra
    hook.plain = 3  # a plain attribute as well
    assert hook.inner.plain == 3


def test_gdn_tape_hooks_are_listed_and_removable():
    from mach_runtime.engine.specdec.gdn_tape import GDNTape
    from mach_runtime.engine.specdec.target import TargetOps

    model, _, _, _ = load_moe(FAMILIES["qwen3_5_moe"], expert_residency="stacked")
    classes, tree = _classes(model), _tree(model)
    ref = _forwards(model)
    tape = GDNTape(TargetOps(model))
    assert len(tape) > 0
    hooks = installed_hooks(model)
    gdn = [h for h in hooks if h["kind"] == "gdn_tape"]
    conv = [h for h in hooks if h["kind"] == "gdn_conv_input"]
    assert len(gdn) == len(conv) == len(tape)
    assert all(h["wraps"] == "GatedDeltaNet" for h in gdn) and all(h["wraps"] == "Conv1d" for h in conv)
    assert [c["path"] for c in conv] == [g["path"] + ".conv1d" for g in gdn]
    assert GDNTape(TargetOps(model)).layers == tape.layers  # installed once, shared
    assert _classes(model) == classes and _tree(model) == tree
    got = _forwards(model)
    for a, b in zip(ref, got):  # unarmed hooks run the layers' own code: bitwise
        assert mx.array_equal(a, b).item()
    assert remove_hooks(model, "gdn_conv_input") == len(conv)
    assert {h["kind"] for h in installed_hooks(model)} == {"gdn_tape"}
    assert remove_hooks(model) == len(gdn)
    assert installed_hooks(model) == [] and _classes(model) == classes


@pytest.mark.parametrize("residency", ["streaming"])
def test_streaming_residency_compiles_its_hit_path_under_the_optimistic_runner(residency):
    from mach_runtime import BlockSpecDecEngine, BlockSpecDecEngineConfig, BlockSpecDecEngineMode

    model, tok, store, _ = load_moe(DEMO, expert_residency=residency, expert_slots=8)
    try:
        BlockSpecDecEngine(model, tok, store=store,
                           config=BlockSpecDecEngineConfig(mode=BlockSpecDecEngineMode.PROMPT_LOOKUP))
        # the optimistic runner (installed at load, around the text model), then one compiled block per MoE layer
        # (its optimistic calls; sync-mode calls run the block itself)
        hooks = installed_hooks(model)
        assert hooks[0] == {"path": "model", "kind": "optimistic", "wraps": "Qwen3MoeModel"}
        assert [h["path"] for h in hooks[1:]] == [f"model.layers.{i}.mlp" for i in range(len(store.banks))]
        assert all(h["kind"] == "compiled_moe" and h["wraps"] == "Qwen3MoeSparseMoeBlock" for h in hooks[1:])
    finally:
        store.close()


def _expected(path: str, residency: str, caps, taps) -> list[tuple[str, str, str]]:
    """What the plan asks for, read off the model loaded without it: (path, kind, wrapped class), sorted as
    ``installed_hooks`` lists them (outermost first at one path)."""
    from mach_runtime.engine.specdec.gdn_tape import is_gdn_layer
    from mach_runtime.io.disk_switch_glu import DiskSwitchGLU
    from mach_runtime.io.gather_switch_glu import GatherSwitchGLU

    model, _, store, _ = load_moe(path, expert_residency=residency, **_slots(residency))
    try:
        mods = dict(model.named_modules())
        out = [(p, "optimistic", type(unwrap(m)).__name__) for p, m in mods.items() if isinstance(m, ModuleHook)]
        out += [(p, "compiled_moe", type(m).__name__) for p, m in mods.items()  # both residencies (streaming: the
                if any(isinstance(c, (GatherSwitchGLU, DiskSwitchGLU)) for c in m.children().values())]  # hit path)
        for p, m in mods.items():
            if is_gdn_layer(m):
                out += [(p, "gdn_tape", type(m).__name__), (p + ".conv1d", "gdn_conv_input", "Conv1d")]
        layers = getattr(model, "language_model", model).model.layers
        out += [(f"{_layers_path(model)}.{i}", "tap", type(layers[i]).__name__) for i in taps if caps.hidden_taps]
    finally:
        store.close()
    return sorted(out, key=lambda h: (h[0], {"tap": 0, "gdn_tape": 0}.get(h[1], 1)))


def _layers_path(model) -> str:
    return "language_model.model.layers" if "language_model" in model else "model.layers"


def _slots(residency: str) -> dict:
    return {"expert_slots": 8} if residency == "streaming" else {}


ARCHS = ["qwen3_moe", "qwen3_5_moe", "gpt_oss", "gemma4", "deepseek_v4"]


@pytest.mark.parametrize("residency", ["stacked", "streaming"])
@pytest.mark.parametrize("arch", ARCHS)
def test_load_installs_the_speculative_hooks_of_each_family_and_residency(arch, residency):
    """``load_moe(speculative=plan)`` installs, at load, what the family's capabilities and the plan call for:
    taps on the draft's layers (families whose layers output hidden states), GDN tape hooks on GatedDeltaNet
    layers, compiled MoE blocks in both residencies (streaming: its optimistic hit path, under the optimistic hook);
    a second installation and every engine built over the model change nothing."""
    from mach_runtime import BlockSpecDecEngine, BlockSpecDecEngineConfig
    from mach_runtime.engine.hooks import HookPlan, hook_plan, install_spec_hooks
    from mach_runtime.io.arch_registry import REGISTRY
    from tests.family_helpers import FIXTURES

    path, caps = FIXTURES / f"hf_{arch}", REGISTRY[arch].capabilities()
    taps = (0, 1) if caps.hidden_taps else ()
    plan = HookPlan(tap_layers=taps)
    model, tok, store, _ = load_moe(path, expert_residency=residency, speculative=plan, **_slots(residency))
    try:
        listed = [(h["path"], h["kind"], h["wraps"]) for h in installed_hooks(model)]
        assert listed == _expected(path, residency, caps, taps)
        kinds = {k for _, k, _ in listed}
        assert "compiled_moe" in kinds and ("optimistic" in kinds) == (residency == "streaming")
        assert ("tap" in kinds) == caps.hidden_taps
        assert ("gdn_tape" in kinds) == (arch == "qwen3_5_moe") and hook_plan(model) == plan
        before = {p: m for p, m in model.named_modules()}
        assert install_spec_hooks(model, plan) == installed_hooks(model)  # idempotent
        BlockSpecDecEngine(model, tok, store=store, config=BlockSpecDecEngineConfig(mode="prompt_lookup"))
        if caps.spec_batch:
            from mach_runtime.engine.specdec.batched import BatchedSpecDecoder

            BatchedSpecDecoder(model, tok, store=store, max_batch=2)
        # building engines rewrote nothing: the very same module objects at every path
        assert [(h["path"], h["kind"], h["wraps"]) for h in installed_hooks(model)] == listed
        assert all(m is before[p] for p, m in model.named_modules())
    finally:
        store.close()


def test_an_engine_needing_more_than_the_loaded_plan_raises_instead_of_rewriting():
    from mach_runtime import BlockSpecDecEngine
    from mach_runtime.engine.hooks import HookPlan
    from mach_runtime.errors import ConfigError
    from tests.test_specdec import random_draft

    from tests.family_helpers import FIXTURES

    path = FIXTURES / "hf_qwen3_moe"
    model, tok, store, _ = load_moe(path, expert_residency="stacked", speculative=HookPlan(tap_layers=(0, 1)))
    listed = installed_hooks(model)
    with pytest.raises(ConfigError, match="never rewrites a loaded model"):
        BlockSpecDecEngine(model, tok, random_draft(len(model.model.layers), [0, 2]))
    assert installed_hooks(model) == listed
    store.close()
