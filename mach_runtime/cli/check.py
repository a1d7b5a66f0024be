"""``mach check CKPT [--json] [--memory-gb N]``: will this checkpoint run here, and how — before any weight loads.

Reads ``config.json`` and the safetensors *headers* only (no tensor data, no MLX import), so it runs on any
host. It reports the detected architecture, the expert layout, parameter and byte counts, a verdict for each
residency, and whether continuous batching is possible for the family's KV cache.

The rules behind the verdicts (``M`` = memory, ``W`` = non-expert weight bytes, ``X`` = all routed-expert bytes,
``O`` = runtime overhead: KV cache, activations, MLX buffers, taken as ``OVERHEAD_GIB`` (0.5 GiB) + 5 % of the
bytes that stay resident — ``W + X`` stacked, ``W`` streaming):

* **stacked** (every expert resident) needs ``W + X + O``: ``fits`` if that is at most ``HEADROOM`` (80 %) of
  ``M`` (the rest is the OS and other programs), ``tight`` if it is at most ``M`` (it runs, but expect memory
  pressure and swapping), else ``wont_fit``.
* **streaming** (experts on disk, a bank per MoE layer) needs ``W + O + bank``. The bank it would use is what
  the headroom leaves after ``W + O``, capped at all experts: ``bank = min(X, 0.8 M - W - O)`` rounded down to
  whole experts per layer. ``fits`` if the bank holds at least ``DEFAULT_BANK_FRACTION`` (25 %) of each
  layer's experts (published routing locality: LRU over 25-40 % of experts gives most of the hits); ``tight``
  if it holds less but at least top-k experts per layer (one token's experts: it runs, mostly from disk);
  ``wont_fit`` if even top-k experts per layer do not fit in ``M``.
* **continuous batching** follows ``kv_cache_kind`` (``continuous_batching_capability``): ``standard`` and
  ``hybrid_gdn`` yes; ``compressed`` no; ``rotating`` only when the cache keeps no prefix (``keep == 0``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .pipe import quiet_on_closed_pipe

VERDICT_RULES = """verdicts (M memory, W non-expert bytes, X expert bytes, O overhead = 0.5 GiB + 5% of resident bytes):
  stacked:   fits if W+X+O <= 80% of M; tight if <= M; else wont_fit
  streaming: bank = min(X, 80% M - W - O) in whole experts per layer; fits if the bank holds >= 25% of each
             layer's experts; tight if >= top-k per layer; else wont_fit
  batching:  standard, hybrid_gdn yes; compressed no; rotating only when keep == 0"""
GIB = 1 << 30
HEADROOM = 0.8
OVERHEAD_GIB = 0.5
OVERHEAD_FRACTION = 0.05
DEFAULT_BANK_FRACTION = 0.25  # the same default as load_moe's streaming bank (mach_runtime.config)


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _param_count(index, layout, quant_bits: int) -> tuple[int, int]:
    """(all parameters, routed-expert parameters); packed quantized weights count their unpacked values."""
    total = experts = 0
    for name, t in index.tensors.items():
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if base and f"{base}.scales" in index:
            bits = layout.quant.bits if (name in layout.expert_tensor_names and layout.quant) else quant_bits
            n = math.prod(t.shape) * (t.itemsize * 8 // bits)
        elif name.endswith((".scales", ".biases")) and f"{name.rsplit('.', 1)[0]}.weight" in index:
            continue  # quantization metadata, not parameters
        elif name.endswith("_blocks") and t.dtype == "U8":  # mxfp4: two 4-bit values per byte
            n = 2 * math.prod(t.shape)
        elif name.endswith("_scales") and f"{name[: -len('_scales')]}_blocks" in index:
            continue
        else:
            n = math.prod(t.shape)
        total += n
        if name in layout.expert_tensor_names:
            experts += n
    return total, experts


def verdicts(weights: int, experts: int, n_layers: int, num_experts: int, top_k: int, memory: int) -> dict:
    """The verdict rules of the module docstring, on plain byte counts."""
    overhead = int(OVERHEAD_GIB * GIB + OVERHEAD_FRACTION * (weights + experts))
    usable = HEADROOM * memory
    need = weights + experts + overhead
    stacked = "fits" if need <= usable else "tight" if need <= memory else "wont_fit"
    overhead_s = int(OVERHEAD_GIB * GIB + OVERHEAD_FRACTION * weights)
    per_expert = experts / max(1, n_layers * num_experts)
    slots_room = int((usable - weights - overhead_s) // (n_layers * per_expert)) if per_expert else num_experts
    slots = max(0, min(num_experts, slots_room))
    want = max(top_k, math.ceil(DEFAULT_BANK_FRACTION * num_experts))
    min_need = weights + overhead_s + n_layers * top_k * per_expert
    if slots >= want:
        streaming = "fits"
    elif min_need <= memory:
        streaming = "tight"
        slots = max(slots, top_k)
    else:
        streaming = "wont_fit"
    bank = int(slots * n_layers * per_expert)
    return {
        "stacked": {"verdict": stacked, "need_bytes": need, "overhead_bytes": overhead},
        "streaming": {
            "verdict": streaming,
            "need_bytes": weights + overhead_s + bank,
            "bank_bytes": bank,
            "bank_gb": round(bank / GIB, 3),
            "bank_experts_per_layer": slots if streaming != "wont_fit" else 0,
            "bank_fraction": round(slots / num_experts, 4) if streaming != "wont_fit" else 0.0,
            "overhead_bytes": overhead_s,
        },
    }


def per_rank(hosts: int, index, layout, weights: int, experts: int, num_layers: int, mem: int) -> dict:
    """What one rank holds and the verdicts for it over ``hosts`` ranks (docs/distributed.md): expert parallel
    (non-expert weights replicated, ceil(E/N) experts per MoE layer) and pipeline parallel (the largest rank's
    ceil(L/N) decoder layers, their experts, plus the embeddings, final norm and head every rank keeps)."""
    import re

    from ..distributed.plan import pipeline_split

    E, L = layout.num_experts, max(1, num_layers)
    e_rank = -(-E // hosts)
    ep = verdicts(weights, experts * e_rank // E, len(layout.layers), e_rank, min(layout.top_k, e_rank), mem)
    shared = sum(t.nbytes for n, t in index.tensors.items()
                 if n not in layout.expert_tensor_names and not re.search(r"(?:^|\.)layers\.\d+\.", n))
    most = max(pipeline_split(L, hosts)) if hosts <= L else 0
    pp = None
    if most:
        moe_here = -(-len(layout.layers) * most // L)
        pp = verdicts(shared + (weights - shared) * most // L, experts * moe_here // max(1, len(layout.layers)),
                      moe_here, E, layout.top_k, mem)
    return {"hosts": hosts, "expert_parallel": {"experts_per_layer": e_rank, **ep},
            "pipeline_parallel": None if pp is None else {"layers": most, **pp}}


def check_checkpoint(path, memory_gb: float | None = None, revision: str | None = None,
                     hosts: int | None = None) -> dict:
    from ..errors import CheckpointError
    from ..io.arch_registry import adapter_for_config, continuous_batching_capability, read_config
    from ..io.expert_sidecar import expert_layout_for
    from ..io.load import require_tokenizer_files
    from ..io.safetensors_index import CheckpointIndex

    from ..io.hf_cache import resolve_checkpoint

    directory = os.path.abspath(resolve_checkpoint(path, revision))
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory; pass the checkpoint directory")
    source = os.path.join(directory, "config.json")
    config = read_config(directory)
    adapter = adapter_for_config(config, source)
    tc = adapter.text_config(config, source)
    index = CheckpointIndex(directory)
    tc = adapter.resolve_config(tc, index.__contains__)
    layout = expert_layout_for(directory, index, adapter, tc, source)
    require_tokenizer_files(Path(directory))  # what load_moe needs beyond the weights
    if memory_gb is None:
        mem = physical_memory_bytes()
        if mem is None:
            raise CheckpointError("cannot read this machine's memory size; pass --memory-gb")
    else:
        if memory_gb <= 0:
            from ..errors import ConfigError

            raise ConfigError(f"--memory-gb must be positive, got {memory_gb}")
        mem = int(memory_gb * GIB)
    from ..io.quant_formats import dequantized_non_expert_extra, held_expert_bytes

    total = index.total_bytes()
    experts = layout.total_expert_bytes
    if layout.layout == "sidecar":  # the experts live in experts.mach (mach convert), not in the safetensors
        total += experts
    weights = total - experts
    # bytes once loaded: released FP8 / FP4 formats are expanded or dequantized (io/quant_formats.py)
    held_experts = held_expert_bytes(layout)
    held_weights = weights + dequantized_non_expert_extra(index, layout.expert_tensor_names)
    quant = config.get("quantization") or {}
    params, expert_params = _param_count(index, layout, int(quant.get("bits", 4)) if isinstance(quant, dict) else 4)
    if layout.layout == "sidecar":  # gate, up and down [I, H] per expert, plus any expert biases
        expert_params = sum(src.num_experts * (3 * layout.hidden_size * layout.moe_intermediate + sum(
            math.prod(c.shape) for c in src.components.values() if c.comp == "bias")) for src in layout.layers)
        params += expert_params
    v = verdicts(held_weights, held_experts, len(layout.layers), layout.num_experts, layout.top_k, mem)
    ok, reason = continuous_batching_capability(adapter.kv_cache_kind, adapter.rotating_keep)
    q = layout.quant
    if hosts is not None and hosts < 1:
        from ..errors import ConfigError

        raise ConfigError(f"--hosts must be >= 1, got {hosts}")
    ranks = None if not hosts else per_rank(hosts, index, layout, held_weights, held_experts,
                                              int(tc.get("num_hidden_layers") or len(layout.layers)), mem)
    return {
        "checkpoint": directory,
        "arch": adapter.key,
        "model_type": config.get("model_type"),
        "loadable": adapter.implemented,
        "layout": layout.layout,
        "scheme": layout.scheme,
        "expert_quantization": None if q is None else {"bits": q.bits, "group_size": q.group_size, "mode": q.mode},
        # every format the routed projections use (per-module quantization mixes them across layers / projections)
        "expert_formats": sorted({"float" if x is None else f"{x.mode} {x.bits}-bit g{x.group_size}"
                                  for src in layout.layers for x in (src.quants or {"": src.quant}).values()}),
        "expert_dtype": next(iter(layout.layers[0].components.values())).dtype,
        "moe_layers": len(layout.layers),
        "num_experts": layout.num_experts,
        "top_k": layout.top_k,
        "params": params,
        "expert_params": expert_params,
        "total_bytes": total,
        "expert_bytes": layout.expert_bytes,
        "total_expert_bytes": experts,
        "non_expert_bytes": weights,
        "memory_bytes": mem,
        "memory_gb": round(mem / GIB, 3),
        "stacked": v["stacked"],
        "streaming": v["streaming"],
        "kv_cache_kind": adapter.kv_cache_kind,
        "continuous_batching": {"possible": ok, "reason": reason},
        "per_rank": ranks,
    }


def _gib(n: int) -> str:
    return f"{n / GIB:.3f} GiB" if n >= GIB / 100 else f"{n / 2**20:.2f} MiB"


def format_report(r: dict) -> str:
    s, st = r["stacked"], r["streaming"]
    q = r["expert_quantization"]
    lines = [
        f"checkpoint      {r['checkpoint']}",
        f"arch            {r['arch']} (model_type {r['model_type']}){'' if r['loadable'] else '  [not loadable yet]'}",
        f"layout          {r['layout']} ({r['scheme']}), experts {r['expert_dtype']}"
        + (f", mixed: {' / '.join(r['expert_formats'])}" if len(r.get("expert_formats", ())) > 1
           else f", {q['mode']} {q['bits']}-bit g{q['group_size']}" if q else ""),
        f"experts         {r['moe_layers']} MoE layers x {r['num_experts']} experts, top-{r['top_k']}; "
        f"{_gib(r['expert_bytes'])} per expert",
        f"parameters      {r['params']:,} ({r['expert_params']:,} in routed experts)",
        f"bytes           {_gib(r['total_bytes'])} total = {_gib(r['non_expert_bytes'])} non-expert + "
        f"{_gib(r['total_expert_bytes'])} experts",
        f"memory          {r['memory_gb']} GiB (headroom {int(HEADROOM * 100)} %)",
        f"stacked         {s['verdict']}: needs {_gib(s['need_bytes'])}",
        f"streaming       {st['verdict']}: bank {_gib(st['bank_bytes'])} = {st['bank_experts_per_layer']} experts "
        f"per layer ({st['bank_fraction']:.0%}), needs {_gib(st['need_bytes'])}",
        f"batching        {'possible' if r['continuous_batching']['possible'] else 'not possible'} "
        f"({r['kv_cache_kind']}: {r['continuous_batching']['reason']})",
    ]
    pr = r.get("per_rank")
    if pr:
        ep, pp = pr["expert_parallel"], pr["pipeline_parallel"]
        lines.append(f"per rank of {pr['hosts']} (mlx.launch; docs/distributed.md):")
        for name, v, what in (("expert parallel", ep, f"{ep['experts_per_layer']} experts per layer"),
                              ("pipeline", pp, f"{pp['layers']} decoder layers" if pp else "")):
            if v is None:
                lines.append(f"  {name:<16}wont_fit: fewer decoder layers than hosts")
                continue
            lines.append(f"  {name:<16}{what}; stacked {v['stacked']['verdict']} (needs "
                         f"{_gib(v['stacked']['need_bytes'])}), streaming {v['streaming']['verdict']} (bank "
                         f"{v['streaming']['bank_experts_per_layer']} experts per layer)")
    return "\n".join(lines)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="mach check", description="preflight a checkpoint (no weights loaded)")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = VERDICT_RULES
    p.add_argument("checkpoint", help="checkpoint directory (config.json + *.safetensors) or a repository id in the "
                   "local Hugging Face cache")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a repository id (default: main)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--memory-gb", type=float, default=None, help="memory to plan for (default: this machine's RAM)")
    p.add_argument("--hosts", type=int, default=None,
                   help="also say what fits on each of N ranks (expert / pipeline parallel, docs/distributed.md)")
    return p


def run(a) -> int:
    report = check_checkpoint(a.checkpoint, a.memory_gb, a.revision, a.hosts)
    if a.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(report))
    return 0


@quiet_on_closed_pipe
def main(argv=None) -> int:
    from ..errors import MachError

    a = build_parser().parse_args(argv)
    try:
        return run(a)
    except MachError as e:
        print(f"mach check: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
