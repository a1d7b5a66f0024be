"""``mach``: the command-line entry point (subcommands: generate, demo, trace, make-tiny, check, convert).

Import-light: MLX is imported only inside the subcommands that run a model.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import MachError
from .pipe import quiet_on_closed_pipe
from .startup import keep_torch_out


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

    from . import generate as _generate  # import-light: MLX only when it runs

    _generate.build_parser(sub.add_parser("generate", help="generate text (mlx-lm's generate flags, plus residency)")
                           ).set_defaults(func=_generate.run)

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
    from . import convert as _convert  # import-light: MLX only to re-quantize

    _convert.build_parser(sub.add_parser("convert", help="rewrite a checkpoint with its experts in a sidecar (one "
                                         "read per expert), optionally re-quantized")).set_defaults(func=_convert.run)
    return p


@quiet_on_closed_pipe
def main(argv=None) -> int:
    """``mach``; run as a program (``argv`` None: the console script, ``python -m``) it keeps torch out of the
    process first (startup.py), called with ``argv`` from Python it leaves the caller's imports alone."""
    if argv is None:
        keep_torch_out()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MachError as e:
        print(f"mach: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
