"""``load`` (mlx-lm compatible) and ``load_moe`` (MoE checkpoints in stacked or streaming residency).

The load pipeline: read config.json → pick the family's adapter → index the safetensors headers → find the
routed-expert tensors (per-expert or stacked layout) → start reading the non-expert weights on a background
thread (``non_experts.Prefetch``) → build the family's MLX model → swap every routed MLP for a ``GatherSwitchGLU``
(stacked: all experts resident) or ``DiskSwitchGLU`` (streaming: a bounded bank fed from disk) → load the
non-expert weights (the background read's arrays) → return ``(model, tokenizer, store, cache)``. The garbage
collector is paused meanwhile (``gc_pause``).

Nothing is downloaded: the path is a local checkpoint directory or a repository id already in the local
Hugging Face cache (``hf_cache.resolve_checkpoint``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..backend.cpu_blas import ensure_cpu_blas
from ..config import DEFAULT_BANK_FRACTION, resolve_store_config
from ..errors import ArchNotImplementedError, CheckpointError, ConfigError, UnsupportedArchError
from .arch_registry import REGISTRY, adapter_for_config, read_config
from .backend_faults import dequantize_one_group_rows
from .expert_layout import ExpertLayerSource, ExpertLayout, _transformed_shape
from .expert_sidecar import LAYOUT as SIDECAR
from .expert_sidecar import expert_layout_for, has_sidecar
from .gc_pause import gc_paused
from .non_experts import Prefetch, _Tensors, load_non_experts, non_expert_names, prefetched_names
from .quant_formats import MX_DTYPES as _MX_DTYPES
from .quant_formats import bank_expert_bytes, held_rows, multiplied
from .safetensors_index import CheckpointIndex
from .tokenizer_files import load_tokenizer as _load_tokenizer
from .tokenizer_files import require_tokenizer_files  # noqa: F401  (mach check imports it from here)

def _local_dir(path, revision: str | None = None) -> Path:
    """The checkpoint directory: a local path, or a repository id resolved through the Hugging Face cache."""
    from .hf_cache import resolve_checkpoint

    p = resolve_checkpoint(path, revision)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a directory; pass the checkpoint directory, not a file inside it")
    return p.resolve()


def load(path, revision: str | None = None, **kwargs):
    """mlx-lm's loader for any model mlx-lm supports: ``(model, tokenizer)``. ``path`` is a local directory or a
    repository id in the local Hugging Face cache (never downloaded); config.json and the safetensors headers
    are checked first, so a damaged checkpoint is a CheckpointError."""
    directory = _local_dir(path, revision)
    config = read_config(directory)  # clear error for a missing or broken config.json
    CheckpointIndex(directory)  # and for damaged safetensors headers or index
    if has_sidecar(directory):
        raise CheckpointError(f"{directory}: its experts live in an expert sidecar (`mach convert`), which mlx-lm "
                              "cannot read; load it with load_moe (or Runtime, mach generate, mach-serve)")
    from mlx_lm import load as mlx_lm_load

    ensure_cpu_blas()  # OpenBLAS for MLX's float32 CPU matmuls (MACH_CPU_BLAS; docs/cpu_blas.md)
    overrides = _mlx_lm_overrides(config, str(directory / "config.json"))
    if overrides:
        kwargs["model_config"] = {**overrides, **(kwargs.get("model_config") or {})}
    return mlx_lm_load(str(directory), **kwargs)


def _mlx_lm_overrides(config: dict, source: str) -> dict:
    """For a family mach_runtime has an adapter for: the config as the adapter normalises it (transformers 5's
    aliases and rope spelling, text-only variants), given to mlx-lm as ``model_config`` overrides."""
    try:
        adapter = adapter_for_config(config, source)
    except UnsupportedArchError:
        return {}
    tc = adapter.text_config(config, source)
    if adapter.wrapped or config.get("model_type") in adapter.unwrapped_model_types:
        return adapter.model_args_dict(config, tc)
    return {k: v for k, v in adapter.model_args_dict(config, tc).items() if config.get(k, object()) != v}


def _set_module(root, path: str, module) -> None:
    parts = path.split(".")
    obj = root
    for p in parts[:-1]:
        obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
    setattr(obj, parts[-1], module)


def _float_cast(layout: ExpertLayout, dtype):
    """The dtype every floating weight is cast to, or None to keep the checkpoint's dtypes.

    ``dtype=None`` is "auto": keep dtypes, except on the CPU backend when some expert projection is unquantized
    half precision — MLX's CPU gather_mm supports only float32 — where the whole model runs in float32.
    """
    import mlx.core as mx

    if dtype is not None:
        try:
            return getattr(mx, str(dtype)) if isinstance(dtype, str) else dtype
        except AttributeError:
            raise ConfigError(f"dtype: unknown MLX dtype {dtype!r} (use float32, float16 or bfloat16)") from None
    if mx.default_device() != mx.cpu:
        return None
    for src in layout.layers:
        for (part, comp), c in src.components.items():
            if comp == "weight" and src.quant_of(part) is None and c.dtype in ("F16", "BF16", "F8_E4M3"):
                return mx.float32
    return None


def _build_projections(src: ExpertLayerSource, make_array, cast, stacked: bool = True):
    """(gate_up, down) projections; gate rows then up rows along the output axis of ``gate_up``.

    ``make_array(component)`` gives one component as ``[E or slots, ...]`` in the engine's row layout. Each
    projection gets its own quantization (mixed recipes quantize ``down_proj`` differently from gate/up); when
    gate and up themselves differ, ``gate_up`` is a ``SplitProjection`` of two. Float FP8 block scales are
    multiplied into the weight here when stacked, per expert at read when streaming.
    """
    from .gather_switch_glu import SplitProjection

    comps = list(src.components.values())
    if src.split_gate_up:
        gate_up = SplitProjection(*(_projection(src, [c for c in comps if c.part == p], make_array, cast, stacked,
                                                src.quant_of(p)) for p in ("gate", "up")))
    else:
        gate_up = _projection(src, [c for c in comps if c.target == "gate_up"], make_array, cast, stacked,
                              src.quant_of("gate_up"))
    down = _projection(src, [c for c in comps if c.target == "down"], make_array, cast, stacked, src.quant_of("down"))
    return gate_up, down


def _projection(src, comps, make_array, cast, stacked, quant):
    """One ExpertProjection from its components (parts concatenated along the rows)."""
    import mlx.core as mx

    from .gather_switch_glu import ExpertProjection

    kwargs = {}
    for comp in sorted({c.comp for c in comps}, key=lambda c: (c != "weight", c)):  # weight first: scales may
        parts = sorted((c for c in comps if c.comp == comp), key=lambda c: (c.rows or (0, 0))[0])  # multiply it
        if all(multiplied(c) for c in parts):
            if stacked:
                scale = _concat_rows([make_array(c) for c in parts]) if len(parts) > 1 else make_array(parts[0])
                held = getattr(cast, "target", None) or getattr(mx, _MX_DTYPES["F8_E4M3"])
                kwargs["weight"] = (kwargs["weight"].astype(mx.float32) * scale).astype(held)
            continue
        arrays = [make_array(c) for c in parts]
        if comp == "global_scale":  # one per expert -> one per output row (gate rows and up rows differ)
            arrays = [mx.contiguous(mx.broadcast_to(a[:, None], (a.shape[0], held_rows(src, c))))
                      for a, c in zip(arrays, parts)]
        a = arrays[0] if len(arrays) == 1 else _concat_rows(arrays)
        kwargs[comp] = a if comp == "global_scale" else cast(a)
    return ExpertProjection(kwargs.pop("weight"), quant=quant, **kwargs)


def _concat_rows(parts):
    import mlx.core as mx

    return mx.concatenate(parts, axis=1)


def _build_stacked(src, adapter, tensors: _Tensors, cast, inter, act_kwargs, sidecar=None, rows=None):
    """All of a layer's experts resident; ``rows``: only these experts, in this order (expert parallel)."""
    import mlx.core as mx

    from .expert_bank import apply_transform
    from .gather_switch_glu import GatherSwitchGLU

    def make_array(c):
        if sidecar is not None:  # the layer's extents, read once (expert_sidecar.stacked_reader)
            a = sidecar(src, c)
            if rows is not None:
                a = a[mx.array(rows)]
        elif len(c.tensor_names) == 1:  # stacked layout: the tensor itself
            a = tensors[c.tensor_names[0]]
            if rows is not None:
                a = a[mx.array(rows)]
        else:
            a = mx.stack([tensors[c.tensor_names[e]] for e in (range(len(c.tensor_names)) if rows is None else rows)])
        want = getattr(mx, _MX_DTYPES[c.dtype])
        if c.dtype == "F8_E4M3":  # dequantized: multiplied by its float block scales in _build_projections
            a = mx.from_fp8(a, dtype=mx.float32)
        elif a.dtype != want and not mx.issubdtype(want, mx.floating):  # a byte view (mxfp4 blocks as U32)
            a = a.view(want).reshape(a.shape[0], *c.shape)
        return apply_transform(a, c.transform)

    gate_up, down = _build_projections(src, make_array, cast)
    glu = GatherSwitchGLU(gate_up, down, adapter.swiglu_variant, inter, **act_kwargs)
    mx.eval(glu.parameters())  # one layer at a time bounds peak memory
    return glu


def _build_streaming(src, adapter, store, cast, inter, act_kwargs):
    import mlx.core as mx

    from .disk_switch_glu import DiskSwitchGLU
    from .expert_bank import _Target

    S = store.slots

    def make_array(c):
        return mx.zeros((S, *_transformed_shape(c.shape, c.transform)), dtype=getattr(mx, _MX_DTYPES[c.dtype]))

    gate_up, down = _build_projections(src, make_array, cast, stacked=False)
    targets = {}
    for key, c in src.components.items():
        proj = down if c.target == "down" else gate_up
        rows = slice(*c.rows) if c.rows else slice(None)
        if src.split_gate_up and c.part in ("gate", "up"):  # each its own projection, all of its rows
            proj, rows = getattr(gate_up, c.part), slice(None)
        if multiplied(c):
            targets[key] = _Target(proj, "weight", rows, c.transform, multiply=True)
        else:
            targets[key] = _Target(proj, c.comp, rows, c.transform)
    bank = store.add_layer(src, targets)
    return DiskSwitchGLU(gate_up, down, adapter.swiglu_variant, inter, store, bank, **act_kwargs)


@gc_paused  # the load allocates many objects; full collections over the imported heap cost 0.2-0.35 s (P7)
def load_moe(
    path,
    arch: str | None = None,
    *,
    expert_residency: str | None = None,
    expert_cache_gb: float | None = None,
    expert_slots: int | None = None,
    eviction_policy: str | None = None,
    io_threads: int | None = None,
    direct_io: bool | None = None,
    dtype=None,
    progress: bool = False,
    revision: str | None = None,
    speculative=None,
    pin_experts=None,
    shard=None,
):
    """Loads an MoE checkpoint: ``(model, tokenizer, store, cache)``.

    expert_residency: "stacked" (all experts resident) or "streaming" (bounded bank per layer, misses read
        from disk); None → env MACH_EXPERT_RESIDENCY → "stacked".
    expert_cache_gb: streaming bank budget in GiB over all MoE layers; None → env MACH_EXPERT_CACHE_GB →
        a quarter of the routed-expert bytes.
    expert_slots: streaming bank size as slots per MoE layer instead of a byte budget (at least top-k; more
        than the experts is capped at the experts); exclusive with an ``expert_cache_gb`` argument.
    eviction_policy: "lru" or "lrfu" (frequency-aware LRU, default); io_threads: reader threads;
    direct_io: O_DIRECT / F_NOCACHE reads. dtype: cast floating weights (None = automatic, see _float_cast).
    path: a local checkpoint directory or a repository id in the local Hugging Face cache, at ``revision``
        (a branch, tag or commit; default main) — resolved as mlx-lm does, never downloaded.
    speculative: the model will serve speculative decoding: a ``engine.hooks.HookPlan`` (``HookPlan.for_engine(config,
        draft)``; True: the default plan, no draft). The hooks the engines need are installed now, driven by the
        family's capabilities (``engine.hooks.install_spec_hooks``), and engines built over the model later install
        nothing (``installed_hooks(model)`` lists them).
    pin_experts: a ``mach trace`` file; streaming pins each layer's most often routed experts in half of its bank
        (never evicted; ``stats().pinned_experts``). Stacked residency holds every expert anyway: ignored.
    shard: a ``distributed.plan.ShardPlan``: this rank's share (expert parallel: its experts of each MoE layer;
        pipeline parallel: its decoder layers, split before any weight is read). docs/distributed.md.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import make_prompt_cache

    settings = resolve_store_config(expert_residency, expert_cache_gb, eviction_policy, io_threads, direct_io)
    if expert_slots is not None and expert_cache_gb is not None:
        raise ConfigError("give either expert_cache_gb or expert_slots (the bank size), not both")
    directory = _local_dir(path, revision)
    source = str(directory / "config.json")
    config = read_config(directory)
    if arch is not None:
        if arch not in REGISTRY:
            raise UnsupportedArchError(f"arch {arch!r} is not registered; known archs: {', '.join(sorted(REGISTRY))}")
        adapter = REGISTRY[arch]
        if config.get("model_type") not in adapter.model_types:
            raise CheckpointError(
                f"{source}: model_type {config.get('model_type')!r} does not match arch={arch!r} "
                f"(expects {', '.join(adapter.model_types)}); omit arch to auto-detect"
            )
    else:
        adapter = adapter_for_config(config, source)
    tc = adapter.text_config(config, source)
    if not adapter.implemented:
        raise ArchNotImplementedError(
            f"{source}: {adapter.key} is a registered architecture (mach-archs, mach check work) but its MLX "
            f"model is not implemented yet, so load_moe cannot build it; supported for loading: "
            f"{', '.join(sorted(k for k, a in REGISTRY.items() if a.implemented))}"
        )
    index = CheckpointIndex(directory)
    tc = adapter.resolve_config(tc, index.__contains__)
    keep = shard.keeps_weight if shard is not None and shard.pipeline else None
    # the non-expert weights are read on a thread from here on, while the rest is built (non_experts.py); a
    # converted checkpoint's safetensors hold no experts, so its read starts before the sidecar's index is parsed
    names = prefetch = store = None
    if has_sidecar(directory):
        names = non_expert_names(index, frozenset(), adapter, config, keep)  # {name the model expects: on disk}
        prefetch = Prefetch(index, prefetched_names(index, names.values()))
    try:
        layout = expert_layout_for(directory, index, adapter, tc, source)  # the sidecar (mach convert) if present
        target = _float_cast(layout, dtype)
        if names is None:
            names = non_expert_names(index, layout.expert_tensor_names, adapter, config, keep)
            prefetch = Prefetch(index, prefetched_names(index, names.values())) if target is None else None
        elif target is not None:  # with a float cast every floating tensor is derived: read when evaluated instead
            prefetch.cancel()
            prefetch = None
        ensure_cpu_blas()  # OpenBLAS for MLX's float32 CPU matmuls (MACH_CPU_BLAS; docs/cpu_blas.md)
        tokenizer = _load_tokenizer(directory, config)
        Model, Args = adapter.model_classes()
        try:
            model = Model(Args.from_dict(adapter.model_args_dict(config, tc)))
        except TypeError as e:
            raise CheckpointError(f"{source}: config.json does not describe a valid {adapter.key} model "
                                  f"({e})") from None
        if shard is not None and shard.pipeline:
            from ..distributed.pipeline import pipeline_model

            pipeline_model(model, shard, adapter.key)

        def cast(a):
            if target is not None and mx.issubdtype(a.dtype, mx.floating) and a.dtype != target:
                return a.astype(target)
            return a

        cast.target = target
        streaming = settings.expert_residency == "streaming"
        if streaming:
            from .expert_bank import StreamingExpertStore

            if expert_slots is not None:
                slots = StreamingExpertStore.check_slots(layout, expert_slots)
            else:
                bank_bytes = bank_expert_bytes(layout, target)
                budget = settings.expert_cache_gb
                if budget is None:
                    budget = DEFAULT_BANK_FRACTION * layout.num_experts * len(layout.layers) * bank_bytes / (1 << 30)
                    budget = max(budget, layout.top_k * len(layout.layers) * bank_bytes / (1 << 30))
                slots = StreamingExpertStore.slots_for_budget(layout, budget, bank_bytes)
            if shard is not None and shard.expert_parallel:  # a rank's bank holds at most its own experts
                slots = min(slots, max(len(shard.experts_of(src.layer)) for src in layout.layers))
            store = StreamingExpertStore(layout, slots, settings.eviction_policy, settings.io_threads,
                                         settings.direct_io)
            if layout.layout == "stacked":
                print(
                    f"[mach] streaming residency on a stacked checkpoint ({index.directory}): experts are read as "
                    "lazy per-expert slices of the stacked tensors; the stacked tensors are never materialised. A "
                    "miss reads one range per tensor of an expert (weight, scales, biases of each projection): "
                    "`mach convert SRC DST` writes each expert as one extent, one read per miss (docs/convert.md)",
                    file=sys.stderr,
                )
        else:
            from .expert_bank import ResidentExpertStore

            store = ResidentExpertStore(layout)

        tensors = _Tensors(index, prefetch)
        sidecar = None
        if layout.layout == SIDECAR and not streaming:
            from .expert_sidecar import stacked_reader

            sidecar = stacked_reader(layout)
        act_kwargs = adapter.activation_kwargs(tc)
        swapped = []
        layers = layout.layers
        if progress:
            from tqdm import tqdm

            layers = tqdm(layers, desc=f"experts ({settings.expert_residency})", unit="layer", file=sys.stderr)
        for src in layers:
            if shard is not None and not shard.keeps_layer(src.layer):
                continue  # pipeline parallel: another rank runs this layer
            mpath = adapter.switch_module_template.format(layer=src.layer)
            if streaming:
                glu = _build_streaming(src, adapter, store, cast, layout.moe_intermediate, act_kwargs)
            else:
                rows = shard.experts_of(src.layer) if shard is not None else None
                glu = _build_stacked(src, adapter, tensors, cast, layout.moe_intermediate, act_kwargs, sidecar, rows)
            _set_module(model, mpath, glu)
            swapped.append(mpath)
        load_non_experts(model, index, names, tensors, config, swapped, cast)
        dequantize_one_group_rows(model)  # a wrong MLX CUDA kernel for these layers (backend_faults.py)
        if streaming:  # the bank's slot arrays stay lazy: a layer's bank is allocated when it is first used,
            # so load time and memory before decoding do not grow with the bank (P7)
            bank_arrays = {id(a) for bank in store.banks for t in bank.targets.values()
                           for a in [getattr(t.proj, t.comp)]}
            mx.eval([a for _, a in tree_flatten(model.parameters()) if id(a) not in bank_arrays])
        else:
            mx.eval(model.parameters())
        model.eval()
        if streaming:
            from ..config import resolve_prefetch_bytes
            from .next_layer_prefetch import install as install_prefetch
            from .optimistic import install

            install(model, store)
            install_prefetch(model, store, resolve_prefetch_bytes())
            if pin_experts is not None:
                store.pin_from_trace(pin_experts, store.slots // 2)
        if speculative is not None and speculative is not False:
            from ..engine.hooks import HookPlan, install_spec_hooks

            install_spec_hooks(model, HookPlan() if speculative is True else speculative, seal=True)
    except BaseException:
        if prefetch is not None:
            prefetch.cancel()
        if store is not None:
            store.close()
        raise
    return model, tokenizer, store, make_prompt_cache(model)


def load_v4_flash(path, **kwargs):
    """The DeepSeek-V4 loader: ``(model, tokenizer, store, cache)`` with hybrid routing (hash-routed layers, then
    learned-routed ones) and the MTP head as the speculative-decoding draft hook.

    Checks that ``path`` is a deepseek_v4 checkpoint, then loads it through ``load_moe`` (same keyword
    arguments; both residencies). The model (``mach_runtime.models.deepseek_v4``) routes its ``hash_moe`` layers
    by ``tid2eid[input_ids]`` and the rest by its learned router; ``cache`` is one ``CompressedKVCache`` per
    layer (not trimmable: roll back with ``snapshot()`` / ``restore()``). The MTP draft hook, when the
    checkpoint has ``mtp.*`` tensors: ``logits, hidden = model(ids, cache, return_hidden=True)``, then
    ``model.mtp_draft(hidden[:, -1:], next_token[None], mtp_cache)`` with ``mtp_cache = model.make_mtp_cache()``
    gives the logits of the token after ``next_token``.
    """
    directory = _local_dir(path, kwargs.pop("revision", None))
    config = read_config(directory)
    source = str(directory / "config.json")
    adapter = adapter_for_config(config, source)
    if adapter.key != "deepseek_v4":
        raise CheckpointError(
            f"{source}: load_v4_flash loads DeepSeek-V4 checkpoints, this one is {adapter.key} "
            f"(model_type {config.get('model_type')!r}); use load_moe"
        )
    return load_moe(directory, "deepseek_v4", **kwargs)
