"""Exact GatedDeltaNet rollback by tape replay: undo the rejected tail of a verify without a target forward.

A verify forward runs b tokens through every GatedDeltaNet (GDN) layer; after a partial acceptance of ``keep``
tokens each layer's ``ArraysCache`` must hold [conv_state, recurrent_state] after exactly those ``keep`` tokens.
While a ``GDNTape`` records, each GDN layer keeps references to what its own forward already computed:

* the depthwise conv's input rows ``conv_input = [conv_state_0 ; qkv]`` ([B, K-1+b, conv_dim], the masked
  in_proj_qkv rows after the previous conv window) → the conv window after ``keep`` tokens is
  ``conv_input[:, keep : keep + K - 1]``, which is what the layer itself stores (``conv_input[:, -(K-1):]``) when
  it is run over exactly the kept tokens;
* the arguments of its ``gated_delta_update`` call (q, k, v, a, b, A_log, dt_bias, state_0, mask and keyword
  options) → the recurrent state after ``keep`` tokens is that same function run on the first ``keep`` rows
  from ``state_0``: the recurrence alone (no projections, conv, attention, MoE or other layer).

Replay calls the layer's own ``gated_delta_update`` (kernel or ops fallback, whichever the layer would pick)
with the same per-token rows a re-run would feed it, so the state is the re-run's up to the projections'
row-count dependence (bitwise on MLX CPU; tests/test_gdn_tape.py). ``q`` is not kept: the state does not depend
on it (only the discarded output does), so replay passes ``k`` in its place.

Hooks (no re-implementation, no global monkeypatching, no class swapping; ``engine/hooks.py``): each GDN layer
is wrapped in a ``GDNTapeHook`` whose ``__call__`` calls the layer when unarmed (one dict lookup) and, when armed,
runs the layer class's own ``__call__`` code bound to a private copy of its module globals in which
``gated_delta_update`` is routed through a recorder; the layer's ``conv1d`` child is wrapped in a
``ConvInputHook`` that keeps its input when armed. Parameter names do not change (hooks carry the original's
tree).

Memory per token and GDN layer (bf16 activations): conv row ``2·key_dim + value_dim`` + k ``key_dim`` + v
``value_dim`` + a, b ``2·Hv`` elements, plus K-1 conv rows once per layer. Qwen3.5-35B-A3B (key_dim 2048,
value_dim 4096, Hv 32, 30 GDN layers): 14 400 elements = 28.8 KB per layer, 864 KB per token, 13.8 MB for a
16-token block (+1.5 MB of conv windows). References only: the arrays are the forward's own intermediates,
released on the next recording or ``clear``.

Use (engine)::

    tape = GDNTape(target_ops)                      # installs the GDN hooks (once per model)
    ckpt = Checkpoint(cache)
    with tape.recording():
        vlogits, vh = target_ops.forward(block, cache, capture)
    ...
    rollback(cache, ckpt, b, keep, tape=tape)       # target.py: replays the GDN caches, trims attention → False
"""

from __future__ import annotations

import inspect
import types
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

from ..hooks import ModuleHook, install, unwrap

_ARMED: dict[int, "_Slot"] = {}  # id(GDN hook) and id(its conv hook) -> slot, while a recording is armed
_CURRENT: list["_Slot"] = []  # the slot of the GDN layer whose armed call is running
_ROUTED: dict[type, tuple] = {}  # GDN class -> (its __call__ over private globals, those globals, cache position)
_SIGNATURES: dict = {}  # gated_delta_update function -> its signature
_UPDATE = "gated_delta_update"
_PER_TOKEN = ("q", "k", "v", "a", "b", "mask")  # gated_delta_update arguments with a time axis (axis 1)


def is_gdn_layer(module) -> bool:
    """A GatedDeltaNet layer of the mlx-lm shape this tape understands (qwen3_5, qwen3_next): a ``conv1d``
    child, ``conv_kernel_size``, and a ``__call__`` that calls the module-level ``gated_delta_update``. A layer
    under a ``GDNTapeHook`` counts (the hook is found again, not stacked)."""
    module = unwrap(module)
    if not isinstance(module, nn.Module) or not isinstance(unwrap(getattr(module, "conv1d", None)), nn.Conv1d):
        return False
    if not isinstance(getattr(module, "conv_kernel_size", None), int):
        return False
    call = getattr(type(module), "__call__", None)
    code = getattr(call, "__code__", None)
    return code is not None and _UPDATE in code.co_names and _UPDATE in call.__globals__


def _routed(cls: type) -> tuple:
    if cls not in _ROUTED:
        base_call = cls.__call__
        routed_globals = dict(base_call.__globals__)
        routed = types.FunctionType(base_call.__code__, routed_globals, base_call.__name__,
                                    base_call.__defaults__, base_call.__closure__)
        routed.__kwdefaults__ = base_call.__kwdefaults__
        params = list(inspect.signature(base_call).parameters)
        cache_pos = params.index("cache") - 1 if "cache" in params else None  # among the args after self
        _ROUTED[cls] = (routed, routed_globals, cache_pos)
    return _ROUTED[cls]


class GDNTapeHook(ModuleHook):
    """A GatedDeltaNet layer whose recurrence arguments are recorded while a ``GDNTape`` records."""

    kind = "gdn_tape"

    def __call__(self, *args, **kwargs):
        slot = _ARMED.get(id(self))
        if slot is None:
            return self.inner(*args, **kwargs)
        layer = self.inner
        routed, _, cache_pos = _routed(type(layer))
        cache = kwargs.get("cache")
        if cache is None and cache_pos is not None and len(args) > cache_pos:
            cache = args[cache_pos]
        return slot.call(routed, layer, cache, args, kwargs)


class ConvInputHook(ModuleHook):
    """A GDN layer's ``conv1d`` that keeps its input (the conv window rows) while a ``GDNTape`` records."""

    kind = "gdn_conv_input"

    def __call__(self, x, *args, **kwargs):
        slot = _ARMED.get(id(self))
        if slot is not None:
            slot.conv_input = x
        return self.inner(x, *args, **kwargs)


def _routed_update(*args, **kwargs):
    """Stands in for ``gated_delta_update`` inside an armed GDN call: runs the real one and records."""
    slot = _CURRENT[-1]
    fn = slot.original_update()
    out = fn(*args, **kwargs)
    slot.update = (fn, args, kwargs, out[1])
    return out


class _Entry:
    """One GDN cache's record of the last recorded forward over it."""

    __slots__ = ("cache", "n_keep", "steps", "conv_input", "fn", "arguments", "state_out")

    def __init__(self, cache, n_keep, conv_input, fn, args, kwargs, state_out):
        self.cache = cache
        self.n_keep = n_keep
        self.steps = int(conv_input.shape[1]) - n_keep
        self.conv_input = conv_input
        self.fn = fn
        sig = _SIGNATURES.get(fn)
        if sig is None:
            sig = _SIGNATURES[fn] = inspect.signature(fn)
        bound = sig.bind(*args, **kwargs)
        bound.arguments.pop("q", None)  # the state does not depend on q; replay passes k
        self.arguments = dict(bound.arguments)
        self.state_out = state_out

    @property
    def nbytes(self) -> int:
        arrays = [self.conv_input] + [self.arguments.get(n) for n in _PER_TOKEN]
        return sum(a.nbytes for a in arrays if isinstance(a, mx.array))


class _Slot:
    """Per GDN layer: the tape it records into and the pieces of the call in progress."""

    __slots__ = ("tape", "layer", "conv_input", "update")

    def __init__(self, tape, layer):
        self.tape, self.layer = tape, layer
        self.conv_input = self.update = None

    def original_update(self):
        return type(unwrap(self.layer)).__call__.__globals__[_UPDATE]  # the module's current one

    def call(self, routed, layer, cache, args, kwargs):
        self.conv_input = self.update = None
        _CURRENT.append(self)
        try:
            out = routed(layer, *args, **kwargs)
        finally:
            _CURRENT.pop()
        conv_input, update = self.conv_input, self.update
        self.conv_input = self.update = None
        if cache is None:
            return out
        if conv_input is None or update is None:
            self.tape._entries.pop(id(cache), None)
            return out
        fn, uargs, ukwargs, state_out = update
        entry = _Entry(cache, layer.conv_kernel_size - 1, conv_input, fn, uargs, ukwargs, state_out)
        if entry.n_keep > 0 and entry.steps >= 0 and cache[1] is state_out:
            self.tape._entries[id(cache)] = entry
        else:  # not the cache layout this tape replays: leave this cache to the snapshot + re-run path
            self.tape._entries.pop(id(cache), None)
        return out


class GDNTape:
    """Records the GatedDeltaNet layers of a target during a verify forward and replays any prefix of it."""

    def __init__(self, target):
        """``target``: a ``TargetOps`` or a model (anything with ``.layers``). Installs the GDN hooks (idempotent:
        hooks already there are shared; unarmed they cost one dict lookup per GDN layer call)."""
        self.layers = []  # the GDNTapeHook of every GDN layer
        for layer in target.layers:
            for path, m in layer.named_modules():
                if is_gdn_layer(m):
                    hook = m if isinstance(m, GDNTapeHook) else install(layer, path, GDNTapeHook) if path else None
                    if hook is None:
                        raise ValueError("GDNTape: give the decoder layers that hold the GatedDeltaNet layers")
                    install(hook, "conv1d", ConvInputHook)
                    self.layers.append(hook)
        self._slots = [_Slot(self, m) for m in self.layers]
        self._entries: dict[int, _Entry] = {}

    def __len__(self) -> int:
        return len(self.layers)

    @contextmanager
    def recording(self):
        """Arms the recording for the forwards run inside; the previous record is dropped on entry."""
        self._entries = {}
        armed = {}
        for cls in {type(unwrap(slot.layer)) for slot in self._slots}:
            g = _routed(cls)[1]
            g.update(cls.__call__.__globals__)  # follow the module's current names
            g[_UPDATE] = _routed_update
        for slot in self._slots:
            armed[id(slot.layer)] = slot
            armed[id(slot.layer["conv1d"])] = slot
        _ARMED.update(armed)
        try:
            yield self
        finally:
            for k in armed:
                _ARMED.pop(k, None)

    def clear(self) -> None:
        self._entries = {}

    @property
    def nbytes(self) -> int:
        """Bytes the current record keeps alive (array references into the recorded forward)."""
        return sum(e.nbytes for e in self._entries.values())

    def _entry(self, cache_entry, steps: int | None):
        e = self._entries.get(id(cache_entry))
        if e is None or e.cache is not cache_entry or cache_entry[1] is not e.state_out:
            return None
        return e if steps is None or e.steps == steps else None

    def can_replay(self, cache_entry, steps: int | None = None, *, rows: bool = False) -> bool:
        """True if ``cache_entry`` (one layer's cache) was advanced by the last recorded forward (over ``steps``
        tokens, when given) and has not changed since. ``rows``: a batched cache, to be replayed per row
        (``replay_rows``); otherwise batched / left-padded caches are refused (``replay`` is for one request)."""
        if self._entry(cache_entry, steps) is None:
            return False
        if not rows and (getattr(cache_entry, "lengths", None) is not None
                         or getattr(cache_entry, "left_padding", None) is not None):
            return False
        return True

    def replay(self, cache_entry, keep: int) -> None:
        """Sets ``cache_entry`` to its state after the first ``keep`` tokens of the recorded forward (lazy)."""
        if not self.can_replay(cache_entry):
            raise RuntimeError("GDNTape.replay: this cache was not advanced by the last recorded forward")
        e = self._entries.pop(id(cache_entry))
        if not 0 <= keep <= e.steps:
            raise ValueError(f"GDNTape.replay: keep={keep} outside [0, {e.steps}]")
        conv = mx.contiguous(e.conv_input[:, keep : keep + e.n_keep, :])
        if keep == 0:
            state = e.arguments.get("state")
        else:
            a = dict(e.arguments)
            for name in _PER_TOKEN:
                if name != "q" and a.get(name) is not None:
                    a[name] = a[name][:, :keep]
            a["q"] = a["k"]
            _, state = e.fn(**a)
        cache_entry[0] = conv
        cache_entry[1] = state

    def replay_rows(self, cache_entry, keeps: mx.array, kmax: int | None = None) -> None:
        """A batched cache (rows of several requests verified together) → each row's state after its own first
        ``keeps[i]`` tokens of the recorded forward (lazy): the conv window gathered per row, the recurrence
        re-run from the recorded start over the first ``kmax`` (default max(keeps)) steps with each row's later
        steps masked (a masked step keeps the state; any mask the forward had still applies)."""
        if self._entry(cache_entry, None) is None:
            raise RuntimeError("GDNTape.replay_rows: this cache was not advanced by the last recorded forward")
        e = self._entries.pop(id(cache_entry))
        kmax = int(mx.max(keeps).item()) if kmax is None else kmax
        positions = (keeps[:, None] + mx.arange(e.n_keep)[None])[..., None]
        conv = mx.take_along_axis(e.conv_input, positions, axis=1)
        a = dict(e.arguments)
        for name in _PER_TOKEN:
            if a.get(name) is not None:
                a[name] = a[name][:, :kmax]
        mask = mx.arange(kmax)[None] < keeps[:, None]
        a["mask"] = mask if a.get("mask") is None else (a["mask"] & mask)
        a["q"] = a["k"]  # the state does not depend on q
        _, state = e.fn(**a)
        cache_entry[0] = conv
        cache_entry[1] = state

    def rollback(self, cache, keep: int, steps: int | None = None) -> list[int]:
        """Replays every cache entry of ``cache`` this tape can replay; returns their indices (the caller trims
        the attention caches)."""
        done = []
        for i, c in enumerate(cache):
            if self.can_replay(c, steps):
                self.replay(c, keep)
                done.append(i)
        return done
