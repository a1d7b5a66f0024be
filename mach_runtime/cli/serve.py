"""``mach-serve``: the OpenAI- and Anthropic-compatible HTTP server (FastAPI + uvicorn).

    mach-serve [CKPT] (--streaming | --no-streaming) [--draft D | --no-draft] [--spec-batch N]
               [--host 127.0.0.1] [--port 8080]
               [--expert-cache-gb G] [--max-batch N] [--max-queue N] [--api-key KEY | $MACH_API_KEY]
               [--served-model-name NAME] [--prefix-cache | --no-prefix-cache] [--disk-kv-dir DIR]
               [--disk-kv-budget-gb G] [--kv-bits B [--kv-group-size G] [--quantized-kv-start N]]
               [--pin-experts TRACE]
               [--distributed [--dist-mode expert|pipeline] [--dist-backend B] [--dist-placement TRACE]]

``--distributed`` under ``mlx.launch`` (docs/distributed.md): rank 0 serves HTTP, the other ranks follow its steps.

No checkpoint: the bundled demo model, on a GPU with its trained DFlash draft in the spec batch (``--no-draft``:
without; on the CPU drafting does not pay: target-only batching). Loopback only unless ``--host`` says
otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mach-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", default=None, help="checkpoint directory (default: the demo model)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--streaming", dest="streaming", action="store_true", default=None,
                      help="experts streamed from SSD into a bounded bank")
    mode.add_argument("--no-streaming", dest="streaming", action="store_false",
                      help="every expert resident (stacked)")
    dr = p.add_mutually_exclusive_group()
    dr.add_argument("--draft", default=None,
                    help="DFlash draft checkpoint: speculative decoding (default: the bundled draft when serving the "
                         "bundled demo model on a GPU, else none)")
    dr.add_argument("--no-draft", action="store_true", help="no speculative decoding, even for the demo model")
    p.add_argument("--spec-batch", type=int, default=None,
                   help="with a draft: up to N concurrent requests decoded speculatively together; more run "
                        "target-only continuous batching until that batch drains (0: only lone requests; default: "
                        "--max-batch, or 4 for the bundled demo pair)")
    p.add_argument("--block-policy", default=None,
                   choices=["fixed", "opencode-sampled-v1", "residency-aware", "throughput"],
                   help="with a draft: how many tokens to draft per cycle (default: the Runtime's; fixed for the "
                        "bundled demo pair)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--expert-cache-gb", type=float, default=None, help="streaming bank budget in GB")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (continuous batch)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait beyond the batch; more get 429 with Retry-After")
    p.add_argument("--api-key", default=None, help="require this key (default: $MACH_API_KEY; none: open)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the folder name)")
    pc = p.add_mutually_exclusive_group()
    pc.add_argument("--prefix-cache", dest="prefix_cache", action="store_true", default=None)
    pc.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false")
    p.add_argument("--disk-kv-dir", default=None, help="directory of the L2 (disk) prefix cache")
    p.add_argument("--disk-kv-budget-gb", type=float, default=None)
    p.add_argument("--kv-bits", type=int, default=None,
                   help="bits of KV cache quantization (mlx-lm's flag; default: none)")
    p.add_argument("--kv-group-size", type=int, default=64, help="group size of KV cache quantization")
    p.add_argument("--quantized-kv-start", type=int, default=5000,
                   help="with --kv-bits: a request's KV is quantized once it holds this many tokens")
    p.add_argument("--pin-experts", default=None, metavar="TRACE",
                   help="a `mach trace` file: pin each layer's most routed experts in half the bank (streaming)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM before they are failed")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--distributed", action="store_true",
                   help="one model over the processes of `mlx.launch` (rank 0 serves; docs/distributed.md)")
    p.add_argument("--dist-mode", default=None, choices=["expert", "pipeline"],
                   help="expert parallel (default) or pipeline parallel")
    p.add_argument("--dist-backend", default=None, choices=["auto", "ring", "nccl", "jaccl", "mpi"],
                   help="mlx.distributed backend (default auto: the one mlx.launch prepared)")
    p.add_argument("--dist-placement", default=None, help="a `mach trace` file: place experts by measured load")
    return p


# The bundled demo pair's best configuration, measured (docs/benchmarks.md, "Serving" and P3): on a GPU, requests
# decode speculatively with the trained draft and fixed 16-token blocks (2.1x mlx-lm alone; the adaptive policies
# shrink blocks that cost the same on a launch-bound GPU), up to 4 together in the spec batch (1.1-1.4x target-only
# batching at 2-4 requests; at 8 a [8, 16] verify is no longer launch-bound and loses, so more requests than that
# use the target-only batch, which keeps them until it drains: the scheduler's lane policy; H200, closed-8: target-only
# 1108 tok/s vs 669 for mlx_lm.server, docs/benchmarks.md). On the CPU a verify costs in proportion to its rows (MLX's
# CPU matmuls), so drafting never pays there: target-only continuous batching.
DEMO_SPEC_BATCH = 4


def demo_draft_pays() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.gpu


def settings_from(a: argparse.Namespace):
    from ..config import resolve_api_key
    from ..server.settings import ServerSettings

    draft, spec_batch, policy = a.draft, a.spec_batch, a.block_policy
    if draft is None and a.checkpoint is None and not a.no_draft and demo_draft_pays():
        from ..assets import default_draft

        draft = str(default_draft())  # the bundled demo model with its trained draft, decoded in the spec batch
        spec_batch = DEMO_SPEC_BATCH if spec_batch is None else spec_batch
        policy = policy or "fixed"
    open_kwargs = {"pin_experts": a.pin_experts} if a.pin_experts else {}
    if a.kv_bits is not None:  # quantized KV (Runtime.open checks kv_bits / kv_group_size / quantized_kv_start)
        open_kwargs.update(kv_bits=a.kv_bits, kv_group_size=a.kv_group_size, quantized_kv_start=a.quantized_kv_start)
    if policy is not None and draft is not None:
        from ..engine.specdec import BlockSpecDecEngineConfig

        open_kwargs["specdec"] = BlockSpecDecEngineConfig(policy=policy)
    if a.distributed:
        open_kwargs["distributed"] = {k: v for k, v in (("mode", a.dist_mode), ("backend", a.dist_backend),
                                                         ("placement", a.dist_placement)) if v is not None}
    return ServerSettings(
        checkpoint=a.checkpoint, streaming=a.streaming, draft=draft, spec_batch=spec_batch, host=a.host, port=a.port,
        expert_cache_gb=a.expert_cache_gb, max_batch=a.max_batch, max_queue=a.max_queue,
        api_key=resolve_api_key(a.api_key), served_model_name=a.served_model_name, prefix_cache=a.prefix_cache,
        disk_kv_dir=a.disk_kv_dir, disk_kv_budget_gb=a.disk_kv_budget_gb, shutdown_timeout=a.shutdown_timeout,
        open_kwargs=open_kwargs,
    )


def main(argv=None) -> int:
    """``mach-serve``; run as a program (``argv`` None) it keeps torch out of the process first (startup.py)."""
    if argv is None:
        from .startup import keep_torch_out

        keep_torch_out()
    a = parser().parse_args(argv)
    try:
        import uvicorn

        from ..server.production_app import create_app
    except ImportError as e:
        print(f"mach-serve: {e}; install the server extra: pip install 'mach-runtime[server]'", file=sys.stderr)
        return 2
    from ..errors import MachError

    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from(a)
        if settings.max_batch < 1 or settings.max_queue < 0:
            raise MachError("--max-batch must be >= 1 and --max-queue >= 0")
        if settings.spec_batch is not None and (settings.spec_batch < 0 or settings.spec_batch == 1):
            raise MachError("--spec-batch must be 0 (lone requests only) or >= 2")
        if a.distributed and follower_rank():
            return follow(settings)
        app = create_app(settings)
        config = uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level, lifespan="on",
                                timeout_graceful_shutdown=a.shutdown_timeout, access_log=False)
        server = uvicorn.Server(config)
        if a.distributed:
            drained_exit_zero(server)
        server.run()
    except MachError as e:
        print(f"mach-serve: {e}", file=sys.stderr)
        return 2
    return 0 if server.started else 1


def drained_exit_zero(server) -> None:
    """Rank 0 of ``--distributed``: exit 0 after a SIGTERM's / SIGINT's graceful shutdown. uvicorn re-raises the
    signal it captured once it has shut down, under the handler that was there before it; Python's default would
    end rank 0 by the signal, and mlx.launch answers a rank that ends non-zero by terminating the others (their
    shutdown cut short) and reporting a failure. The handler installed here asks uvicorn to exit, so a signal that
    arrives before uvicorn captures its own is not lost either."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: setattr(server, "should_exit", True))


def follower_rank() -> bool:
    from ..config import launched_rank

    return (launched_rank() or 0) > 0


def follow(settings) -> int:
    """A rank > 0 of ``mach-serve --distributed``: no HTTP; follows rank 0's steps until it shuts down."""
    import anyio

    from ..server.production_app import runtime_kwargs

    async def run():
        from mach_runtime import Runtime

        async with Runtime.open(settings.checkpoint, **runtime_kwargs(settings, Runtime.open)):
            pass  # never reached on a follower: Runtime.open follows, then exits

    try:
        anyio.run(run)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
