"""``mach convert SRC DST``: a loadable checkpoint whose experts live in an expert sidecar (one aligned extent per
(layer, expert): a streaming miss is one read), optionally re-quantized.

    mach convert SRC DST [--q-bits B] [--q-group-size G] [--q-mode affine|mxfp4] [--quiet] [--revision REV]

Without quantization flags the source's precision is kept (bytes copied). A stopped conversion continues where
it stopped when the same command runs again (``DST.partial``); ``DST`` appears only when it is complete.
Import-light: MLX is imported only to re-quantize.
"""

from __future__ import annotations

import argparse


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("src", help="checkpoint directory (HF per-expert or fused, MLX export, or a converted one) or "
                   "a repository id in the local Hugging Face cache")
    p.add_argument("dst", help="output directory (must not exist; DST.partial holds a conversion in progress)")
    p.add_argument("--q-bits", type=int, default=None, help="re-quantize the experts to this many bits")
    p.add_argument("--q-group-size", type=int, default=None, help="quantization group size (affine: 64)")
    p.add_argument("--q-mode", choices=("affine", "mxfp4"), default=None, help="quantization mode (default affine)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a repository id (default main)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def run(a) -> int:
    from ..io.convert import convert_checkpoint

    dst = convert_checkpoint(a.src, a.dst, q_bits=a.q_bits, q_group_size=a.q_group_size, q_mode=a.q_mode,
                             progress=not a.quiet, revision=a.revision)
    print(dst)
    return 0
