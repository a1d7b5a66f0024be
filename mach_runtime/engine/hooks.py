"""Hooks: explicit wrapper modules that stand in for modules of a loaded model. The one hook mechanism.

The engines need three things mlx-lm's model classes do not offer:

* ``tap`` (``specdec/target.py``): the output of the decoder layers a DFlash draft reads;
* ``gdn_tape`` and ``gdn_conv_input`` (``specdec/gdn_tape.py``): what each GatedDeltaNet layer feeds its
  recurrence and its conv during a verify forward, to roll the layer back without re-running it;
* ``compiled_moe`` (``compiled_moe.py``): a routed-expert block run through ``mx.compile`` for small forwards.

Each is a ``ModuleHook`` subclass put in place of the original module in its parent (``parent.key`` or
``parent.list[i]``). No object changes class: the original keeps its class and its code, and the hook calls it
(``hook.inner``), so mlx-lm's model source still says what the original computes and the hook's ``__call__`` says
what is added around it.

A hook carries the original's own parameter tree: the same child modules and arrays under the same names (its
dict is a copy of the original's). ``model.parameters()``, ``named_modules()`` paths, ``mx.compile(inputs=model)``
and attribute access (``layer.self_attn``, ``layer.conv_kernel_size``) see the model as loaded. Writes made through
the model after installation (``model.update``, ``load_weights``, ``hook.x = array``, ``train()``/``eval()``) reach
the original as well; a write made through a reference to the original taken before installation does not reach
the hook's copy of the tree.

Who installs what, and when: ``install_spec_hooks(model, plan)``, at load. ``load_moe(..., speculative=plan)``
(called so by ``Runtime.open`` with a draft or ``specdec``, ``BlockSpecDecEngine.from_checkpoint`` and ``mach
generate``) installs, driven by the family's capabilities and the ``HookPlan`` (``HookPlan.for_engine(config,
draft)``): taps on the layers the draft reads (``hidden_taps`` families), the GDN tape hooks on GatedDeltaNet
layers, compiled MoE blocks (stacked, and streaming's hit path under ``load_moe``'s optimistic hook), and seals
the model with that plan. Engines built over it install nothing: one that needs more than the plan raises
``ConfigError`` (a shared model is never rewritten after load). A model loaded without a plan (``load_moe`` alone,
mlx-lm's ``load``) belongs to its caller: the first engine built over it installs what it needs, through the same
function. Every installation is idempotent. Unarmed, a tap or GDN hook costs one Python call and one dict lookup
per layer call. ``installed_hooks(model)`` lists what is installed; ``remove_hooks(model)`` puts the original
modules back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

_TREE_TYPES = (mx.array, dict, list, tuple)


class ModuleHook(nn.Module):
    """Stands in for ``inner`` in its parent; subclasses override ``__call__`` (and set ``kind``).

    Attributes of the hook itself (not of the module it stands in for) are ``inner`` and names starting with
    ``hook_``; every other attribute write goes to both."""

    kind = "hook"

    def __init__(self, inner: nn.Module):
        # not nn.Module.__init__: it would reset the original's training mode and frozen set through __setattr__
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "_no_grad", inner._no_grad)
        object.__setattr__(self, "_training", inner._training)
        dict.update(self, inner)

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def __getattr__(self, key: str):
        if key in self:
            return self[key]
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(key)
        return getattr(inner, key)

    def __setattr__(self, key: str, val):
        if key == "inner" or key.startswith("hook_"):
            object.__setattr__(self, key, val)
            return
        super().__setattr__(key, val)  # tree values go through __setitem__ (which mirrors them)
        if not isinstance(val, _TREE_TYPES):
            setattr(self.inner, key, val)

    def __setitem__(self, key, val):
        super().__setitem__(key, val)
        self.inner[key] = val

    def _extra_repr(self) -> str:
        return f"{self.kind} hook on {type(self.inner).__name__}"


def unwrap(module):
    """The original module under any hooks (``module`` itself when it is not a hook)."""
    while isinstance(module, ModuleHook):
        module = module.inner
    return module


def find_hook(module, cls: type):
    """The hook of class ``cls`` among ``module`` and the hooks it wraps, or None."""
    while isinstance(module, ModuleHook):
        if isinstance(module, cls):
            return module
        module = module.inner
    return None


def _container(root, path: str):
    parts = path.split(".")
    node = root
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    last = parts[-1]
    return node, (int(last) if isinstance(node, list) else last)


def install(root: nn.Module, path: str, hook_cls: type, *args, **kwargs) -> ModuleHook:
    """Wraps the module at ``path`` in ``hook_cls(module, *args, **kwargs)``, or returns the ``hook_cls`` hook
    already there (idempotent)."""
    node, key = _container(root, path)
    current = node[key]
    found = find_hook(current, hook_cls)
    if found is not None:
        return found
    hook = hook_cls(current, *args, **kwargs)
    node[key] = hook
    return hook


def installed_hooks(model: nn.Module) -> list[dict]:
    """What is installed on ``model``: one ``{"path", "kind", "wraps"}`` per hook (``wraps``: the original's class
    name), sorted by path; a module with several hooks lists the outermost first."""
    out = []
    for path, m in model.named_modules():
        depth = 0
        while isinstance(m, ModuleHook):
            out.append({"path": path, "kind": m.kind, "wraps": type(unwrap(m)).__name__, "_depth": depth})
            m, depth = m.inner, depth + 1
    out.sort(key=lambda h: (h["path"], h.pop("_depth")))
    return out


def remove_hooks(model: nn.Module, kind: str | None = None) -> int:
    """Puts the original modules back (only the hooks of ``kind``, when given); returns how many were removed.
    Innermost paths first, so a hook inside another hook's tree is removed from both."""
    found = [(path, m) for path, m in model.named_modules() if isinstance(m, ModuleHook)]
    removed = 0
    for path, m in sorted(found, key=lambda pm: -pm[0].count(".")):
        node, key = _container(model, path)
        outer = node[key]
        if kind is None:
            node[key] = unwrap(outer)
            removed += sum(1 for _ in _chain(outer))
            continue
        kept = [h for h in _chain(outer) if h.kind != kind]
        removed += sum(1 for h in _chain(outer) if h.kind == kind)
        rebuilt = unwrap(outer)
        for h in reversed(kept):  # re-wrap the hooks of other kinds around the original, innermost first
            object.__setattr__(h, "inner", rebuilt)
            rebuilt = h
        node[key] = rebuilt
    return removed


def _chain(module):
    while isinstance(module, ModuleHook):
        yield module
        module = module.inner


# -- what the speculative engines need, installed at load --------------------------------------------------------
@dataclass(frozen=True)
class HookPlan:
    """The hooks the speculative engines over a model need (``install_spec_hooks``)."""

    tap_layers: tuple = field(default=())  # decoder layers a DFlash draft reads (its ``target_layer_ids``)
    gdn_tape: bool = True  # GatedDeltaNet tape hooks (``specdec/gdn_tape.py``), on families with GDN layers
    compile_moe: bool = True  # compiled MoE blocks (``compiled_moe.py``): stacked, and streaming's hit path

    @classmethod
    def for_engine(cls, config=None, draft=None) -> "HookPlan":
        """The plan of a ``BlockSpecDecEngineConfig`` (None: the default one) with ``draft``: a DFlash draft model,
        its checkpoint directory, or None."""
        taps = ()
        if draft is not None:
            if hasattr(draft, "target_layer_ids"):
                taps = draft.target_layer_ids
            else:
                from .specdec.draft import read_draft_config

                taps = read_draft_config(draft)["dflash_config"].get("target_layer_ids", ())
        return cls(tuple(sorted({int(i) for i in taps})), bool(getattr(config, "gdn_tape", True)),
                   bool(getattr(config, "compile_moe", True)))

    def covers(self, other: "HookPlan") -> bool:
        return (set(other.tap_layers) <= set(self.tap_layers) and (self.gdn_tape or not other.gdn_tape)
                and (self.compile_moe or not other.compile_moe))


def install_spec_hooks(model: nn.Module, plan: HookPlan, *, seal: bool = False) -> list[dict]:
    """Installs what ``plan`` asks for that the family has (idempotent): compiled MoE blocks on routed-expert
    blocks (both residencies), the GDN tape hooks on GatedDeltaNet layers, taps on ``plan.tap_layers``
    (``ConfigError`` where the family's capabilities rule out speculation or hidden-state taps). ``seal``: the
    model is loaded for serving (``load_moe(speculative=)``): engines may use it, never add to it. Returns
    ``installed_hooks(model)``."""
    from .compiled_moe import compile_moe_blocks
    from .specdec.gdn_tape import GDNTape
    from .specdec.target import TargetOps

    sealed = getattr(model, "_mach_hook_plan", None)
    if sealed is not None:
        if not sealed.covers(plan):
            raise _not_covered(sealed, plan)
        return installed_hooks(model)
    ops = TargetOps(model)
    if plan.compile_moe:
        compile_moe_blocks(model)
    if plan.gdn_tape:
        GDNTape(ops)  # a no-op without GatedDeltaNet layers
    if plan.tap_layers:
        ops.tap(plan.tap_layers)
    if seal:
        object.__setattr__(model, "_mach_hook_plan", plan)
    return installed_hooks(model)


def hook_plan(model: nn.Module) -> HookPlan | None:
    """The plan ``model`` was sealed with at load, or None."""
    return getattr(model, "_mach_hook_plan", None)


def _not_covered(sealed: HookPlan, plan: HookPlan):
    from ..errors import ConfigError

    return ConfigError(f"this engine needs hooks {plan} but the model was loaded with {sealed}; an engine never "
                       "rewrites a loaded model: pass a plan that covers it to load_moe(speculative=HookPlan(...)) "
                       "(Runtime.open and BlockSpecDecEngine.from_checkpoint derive it from the draft and config)")
