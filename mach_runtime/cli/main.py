"""``mach``: the command-line entry point (subcommands: generate, demo, trace, make-tiny, check).

Import-light: MLX is imported only inside the subcommands that run a model.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..assets import default_checkpoint
from ..errors import MachError

DEFAULT_PROMPT = "def fibonacci(n):"  # ends on a token boundary the demo model saw in training


def _cmd_generate(a) -> int:
    from ..engine.generate import GenerationStats, stream_generate
    from ..io.load import load_moe

    ckpt = a.checkpoint or default_checkpoint()
    residency = None if a.streaming is None else ("streaming" if a.streaming else "stacked")
    t0 = time.perf_counter()
    model, tokenizer, store, cache = load_moe(
        ckpt, expert_residency=residency, expert_cache_gb=a.expert_cache_gb,
        eviction_policy=a.eviction_policy, direct_io=a.direct_io or None, progress=True,
    )
    load_s = time.perf_counter() - t0
    prompt = a.prompt
    if a.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    stats = GenerationStats()
    try:
        for chunk in stream_generate(model, tokenizer, prompt, max_tokens=a.max_tokens, temperature=a.temp,
                                     top_p=a.top_p, top_k=a.top_k, seed=a.seed, cache=cache, stats=stats):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        s = store.stats()
        print(
            f"[mach] load {load_s:.2f}s | prompt {stats.prompt_tokens} tok, {stats.prefill_tps:.1f} tok/s | "
            f"generated {stats.generated_tokens} tok, {stats.decode_tps:.1f} tok/s | finish: {stats.finish_reason}",
            file=sys.stderr,
        )
        if s.residency == "streaming":
            print(
                f"[mach] expert bank ({s.eviction_policy}): hit rate {s.hit_rate:.1%}, {s.hits} hits, {s.misses} "
                f"misses, {s.evictions} evictions, {s.bytes_read / 2**20:.1f} MiB read, "
                f"{s.resident_experts}/{s.capacity_experts} slots used",
                file=sys.stderr,
            )
    finally:
        store.close()
    return 0


def _cmd_make_tiny(a) -> int:
    from ..testing.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(
        a.out, layout=a.layout, dtype=a.dtype, quant_bits=a.quant_bits,
        shard_bytes=int(a.shard_mb * 2**20) if a.shard_mb else None, hidden=a.hidden, layers=a.layers,
        experts=a.experts, top_k=a.top_k, moe_inter=a.moe_inter,
    )
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mach", description="mach_runtime: MoE inference with experts streamed from disk")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a checkpoint")
    g.add_argument("checkpoint", nargs="?", help="checkpoint directory (default: the bundled demo model)")
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--streaming", dest="streaming", action="store_true", default=None,
                   help="streaming residency: experts stay on disk, a bounded bank holds the hot ones")
    g.add_argument("--no-streaming", dest="streaming", action="store_false",
                   help="stacked residency: every expert resident")
    g.add_argument("--expert-cache-gb", type=float, default=None, help="streaming bank budget (GiB, all layers)")
    g.add_argument("--eviction-policy", choices=("lru", "lrfu"), default=None)
    g.add_argument("--direct-io", action="store_true", help="read experts with O_DIRECT (bypass the page cache)")
    g.add_argument("--temp", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(func=_cmd_generate)

    t = sub.add_parser("make-tiny", help="build a small random qwen3_moe checkpoint (tests, demos)")
    t.add_argument("out")
    t.add_argument("--layout", choices=("per_expert", "stacked"), default="per_expert")
    t.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    t.add_argument("--quant-bits", type=int, default=None)
    t.add_argument("--shard-mb", type=float, default=None)
    t.add_argument("--hidden", type=int, default=64)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--experts", type=int, default=8)
    t.add_argument("--top-k", type=int, default=2)
    t.add_argument("--moe-inter", type=int, default=32)
    t.set_defaults(func=_cmd_make_tiny)

    from . import check as _check  # import-light: no MLX

    c = _check.build_parser(sub.add_parser("check", help="preflight a checkpoint: arch, layout, fit verdicts (no MLX)"))
    c.set_defaults(func=_check.run)

    from . import demo as _demo, trace as _trace  # import-light: MLX only when they run

    _demo.build_parser(sub.add_parser("demo", help="the bundled demo model writing Python, experts streaming from disk")
                       ).set_defaults(func=_demo.run)
    _trace.build_parser(sub.add_parser("trace", help="record a routing trace on held-out text; replay it through "
                                       "the bank (LRU, LRFU, Belady)")).set_defaults(func=_trace.run)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MachError as e:
        print(f"mach: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
