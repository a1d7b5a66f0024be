"""One rank of a distributed test run, started by ``mlx.launch`` (tests/test_distributed.py); not a test itself.

Every rank: a model-level forward of ``--ids`` through ``load_moe(shard=...)`` + the expert-parallel hooks (rank
0 saves the logits), then ``Runtime.open(distributed=...)``: rank 0 runs the requests of ``--requests`` (a JSON
list of {"name", "prompt", "params"}) concurrently and writes what they returned to ``--out``/result.json; the
other ranks follow it and exit when it closes. ``--hold``: rank 0 then starts one long request and waits for it
to fail (the test kills a follower meanwhile), writing the error and how long it took to arrive.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path


def parse(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--residency", default="stacked")
    p.add_argument("--mode", default="expert")
    p.add_argument("--slots", type=int, default=None)
    p.add_argument("--draft", default=None)
    p.add_argument("--ids", default="[]")
    p.add_argument("--requests", default="[]")
    p.add_argument("--out", required=True)
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("--hold", action="store_true")
    return p.parse_args(argv)


def forward_logits(model, cache, ids):
    """float32 logits of ``ids`` and of one greedy decode step on the same cache ([len(ids) + 1, vocab]): the
    model-level comparison of a rank (``forward``) and of the single-process reference (the test)."""
    import mlx.core as mx
    import numpy as np

    logits = model(mx.array([ids]), cache=cache)[0]
    step = model(mx.array([[int(mx.argmax(logits[-1]).item())]]), cache=cache)[0]
    return np.array(mx.concatenate([logits, step]).astype(mx.float32))


async def collect(rt, r: dict) -> dict:
    """Streams request ``r`` ({"prompt", "params"}) through ``rt``: {"tokens", "logprobs" (the chosen token's)}.
    The distributed run (``serve``) and the single-process reference (the test) read requests the same way."""
    toks, lps = [], []
    async for c in rt.stream(r["prompt"], **r["params"]):
        toks.extend(c.token_ids)
        if c.logprobs:
            lps.extend(lp[0] for lp in c.logprobs)
    return {"tokens": toks, "logprobs": lps}


def forward(a, out: Path, rank_holder: list) -> None:
    import numpy as np

    from actors.distributed import Distributed
    from mach_runtime.io.load import load_moe

    ids = json.loads(a.ids)
    d = Distributed({"mode": a.mode, "timeout": a.timeout}, a.ckpt)
    rank_holder.append(d.group.rank)
    model, _tok, store, cache = load_moe(a.ckpt, expert_residency=a.residency, expert_slots=a.slots, shard=d.plan)
    d.after_load(model, store, None, None)
    # evaluated on every rank: a graph one rank leaves unevaluated leaves its peers' all_sums unmatched
    logits = forward_logits(model, cache, ids)
    if d.group.rank == 0:
        np.save(out / "logits.npy", logits)
    d.close()


async def serve(a, out: Path, rank: int) -> None:
    import anyio

    from actors.runtime import Runtime

    kw = {"expert_slots": a.slots} if a.slots else {}
    reqs = json.loads(a.requests)
    (out / f"rank{rank}.pid").write_text(str(os.getpid()))
    settings = {"mode": a.mode, "timeout": a.timeout, "heartbeat": 0.5}
    async with Runtime.open(a.ckpt, expert_residency=a.residency, distributed=settings, max_batch=4, draft=a.draft,
                            **kw) as rt:
        results = {}

        async def one(r):
            try:
                results[r["name"]] = await collect(rt, r)
            except Exception as e:  # the fault tests: what rank 0's caller saw
                results[r["name"]] = {"error": type(e).__name__, "message": str(e)}

        async with anyio.create_task_group() as tg:
            for r in reqs:
                if not r.get("alone"):
                    tg.start_soon(one, r)
        for r in reqs:
            if r.get("alone"):
                await one(r)
        if not any("error" in v for v in results.values()):
            stats = await rt.stats()
            results["_stats"] = {"spec_cycles": stats.decoder.spec_cycles, "steps": stats.decoder.steps,
                                 "batch_histogram": {str(k): v for k, v in stats.decoder.batch_histogram.items()}}
        (out / "result.json").write_text(json.dumps(results))
        if a.hold:
            (out / "holding").write_text("1")
            t0 = time.monotonic()
            try:
                async for c in rt.stream("def main():", max_tokens=4000):
                    if not (out / "streaming").exists():
                        (out / "streaming").write_text("1")
                    t0 = time.monotonic()  # the last token's time
                err = {"error": None}
            except Exception as e:
                err = {"error": type(e).__name__, "message": str(e), "seconds": time.monotonic() - t0}
            (out / "killed.json").write_text(json.dumps(err))


def diverge(rank: int) -> None:
    """Test-only fault (env ``MACH_TEST_DIVERGE_RANK``): on that rank, every request rank 0 admits asks for one
    token fewer than on rank 0, so this rank's scheduler finishes it a step early — a real divergence of the
    follower's state, for rank 0's digest check to catch (tests/test_distributed_faults.py)."""
    want = os.environ.get("MACH_TEST_DIVERGE_RANK")
    if want is None or int(want) != rank:
        return
    import msgspec

    from actors.distributed import StepSync
    from actors.messages import Submit

    take = StepSync.take

    def take_shortened(self, decoder, block):
        return [msgspec.structs.replace(m, params=msgspec.structs.replace(m.params, max_tokens=m.params.max_tokens - 1))
                if isinstance(m, Submit) else m for m in take(self, decoder, block)]

    StepSync.take = take_shortened


def main(argv=None) -> int:
    a = parse(argv)
    diverge(int(os.environ.get("MLX_RANK", "0")))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.hold:  # mlx.launch terminates the other ranks when one dies: rank 0 must live to report
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    rank = []
    if json.loads(a.ids):
        forward(a, out, rank)
    import anyio

    try:
        anyio.run(serve, a, out, rank[0] if rank else int(os.environ.get("MLX_RANK", "0")))
    except SystemExit as e:  # a follower: rank 0 closed
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
