"""Serving benchmark: an OpenAI-protocol load generator against mach-serve and mlx_lm.server, same checkpoint,
one run (the servers one after the other, never at once: they would share the cores).

    python bench/serve_bench.py [--ckpt DIR] [--draft DIR] [--requests 24] [--max-tokens 64] [--rates 1,2,4]
                                [--warmup 16] [--servers mach-serve,mach-serve-target,mlx_lm.server] [--out JSON]

Each server is warmed up before anything is timed: once it answers, ``--warmup`` requests (default 16: two
waves) run untimed as a closed-8 scenario of the same prompts and lengths, so JIT compilation (MLX CUDA compiles
kernels per new shape: 26 s of one cold closed-8 run on an H200) and first-use allocations are not measured.
``--rates ''`` runs closed-8 only. The JSON records each server's command line and its startup log lines
(mach-serve's decode path, spec batch, lane and block policy) next to its results, and mach-serve's ``/v1/stats``
decoder counters at the end (batch sizes, spec-batch cycles and moves, prefill chunks). Each scenario records the
1-minute load average before and after it (the table's last column): CPU numbers taken on a busy machine compare
little. Ratios: every mach-serve kind against ``mlx_lm.server-openblas`` (like for like) and ``mlx_lm.server``,
whichever ran.

Servers: ``mach-serve`` with the bundled DFlash draft as its GPU default for the demo pair runs it (spec batch of
4, fixed blocks: ``mach_runtime/cli/serve.py``), ``mach-serve-target`` (no draft: target-only continuous batching,
its CPU default) and
``mlx_lm.server`` as users run it (``--draft-model`` does not apply: a DFlash draft is not an mlx-lm model), and
``mlx_lm.server-openblas`` (the same on mach's CPU OpenBLAS, docs/cpu_blas.md: like for like on the CPU), and
``mach-serve-target-layers`` (``mach-serve-target`` with ``MACH_SUBMIT_LAYERS=1``: each decode forward handed to
MLX layer by layer instead of whole, ``engine.batch.SubmittingCaches``).

Scenarios: ``closed-8`` (8 concurrent streaming clients, each sending its next request when the last one ends:
the issue's goal is >= 1.5x mlx_lm.server's throughput here with p99 TTFT no worse) and Poisson arrivals at each
rate in ``--rates`` (requests/s; open loop, every request streams). Per scenario: output throughput (completion
tokens / wall time from the first send to the last byte), TTFT p50/p99 (send -> first content), inter-token
latency p50/p99 (per request: (last - first content time) / (tokens - 1); tokens counted by the checkpoint's
tokenizer on the streamed text, the same way for both servers). Greedy (temperature 0), so both servers
generate the same text.

No checkpoint given: the bundled demo model converted to float32 by mlx-lm's own ``convert`` (MLX's CPU
``gather_mm`` supports float32 only, so mlx_lm.server cannot serve the fp16 original on the CPU; mach-serve
serves either). All servers get the same converted folder; mach-serve's draft is the bundled one (``--draft``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import _common

PROMPTS = ["def add(a, b):", "import os\nimport sys\n", "class Node:", "for i in range(10):", "# parse the file\n",
           "while True:", "try:\n    import json\nexcept ImportError:", "x = [", "def main():", "with open(path) as f:"]


def fp32_demo(root: Path) -> Path:
    out = root / "demo-qwen3-moe-fp32"
    if not (out / "config.json").exists():
        from mach_runtime.assets import demo_model_path

        subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(demo_model_path()), "--mlx-path",
                        str(out), "--dtype", "float32"], check=True)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_pair_flags(draft: str) -> list[str]:
    """mach-serve's default configuration for the bundled demo pair on a GPU (``cli/serve.py``), given explicitly
    because the benchmark serves a converted copy of the demo model."""
    from mach_runtime.cli.serve import DEMO_SPEC_BATCH

    return ["--draft", draft, "--spec-batch", str(DEMO_SPEC_BATCH), "--block-policy", "fixed"]


def start(kind: str, ckpt: Path, port: int, max_batch: int, log: Path, draft: str):
    if kind.startswith("mach-serve"):
        cmd = [sys.executable, "-m", "mach_runtime.cli.serve", str(ckpt), "--no-streaming", "--port", str(port),
               "--max-batch", str(max_batch), "--max-queue", "1024", "--served-model-name", "bench",
               "--log-level", "info"] + (demo_pair_flags(draft) if kind == "mach-serve" else ["--no-draft"])
    else:  # "mlx_lm.server-openblas": the same server on mach's CPU OpenBLAS (docs/cpu_blas.md), like for like
        run = ["-m", "mach_runtime.backend.cpu_blas", "mlx_lm"] if kind.endswith("-openblas") else ["-m", "mlx_lm"]
        cmd = [sys.executable, *run, "server", "--model", str(ckpt), "--port", str(port),
               "--decode-concurrency", str(max_batch), "--prompt-concurrency", str(max_batch),
               "--log-level", "WARNING"]
    env = dict(os.environ)
    if kind.endswith("-layers"):  # decode forwards submitted layer by layer (engine.batch.SubmittingCaches)
        env["MACH_SUBMIT_LAYERS"] = "1"
    return cmd, subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def startup_lines(log: Path) -> list[str]:
    """mach-serve's ``startup ...`` log lines (mode, bank, decode path, capabilities), timestamps cut."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return [ln.split(": ", 1)[1] for ln in lines if "mach_runtime.server: startup" in ln]


def wait_ready(base: str, model: str, proc, timeout=300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:  # a real generation: mlx_lm.server loads its model on the first request
            r = httpx.post(base + "/v1/chat/completions", timeout=120, json={
                "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0})
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(base)


async def one(client, base, model, prompt, max_tokens, tok):
    t0 = time.perf_counter()
    times, text = [], ""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    async with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            for c in obj.get("choices") or []:
                piece = (c.get("delta") or {}).get("content") or ""
                if piece:
                    times.append(time.perf_counter())
                    text += piece
    n = len(tok.encode(text, add_special_tokens=False)) if text else 0
    return {"start": t0, "end": time.perf_counter(), "ttft": (times[0] - t0) if times else None,
            "itl": (times[-1] - times[0]) / (n - 1) if n > 1 and len(times) > 1 else None, "tokens": n, "text": text,
            "prompt": prompt}


async def scenario(base, model, name, n, max_tokens, tok, rate=None, clients=None, seed=0):
    import anyio
    import httpx

    rng = random.Random(seed)
    results = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256)) as client:
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            if clients:
                queue = list(range(n))

                async def worker():
                    while queue:
                        i = queue.pop(0)
                        results.append(await one(client, base, model, PROMPTS[i % len(PROMPTS)], max_tokens, tok))

                for _ in range(clients):
                    tg.start_soon(worker)
            else:
                async def fire(i):
                    results.append(await one(client, base, model, PROMPTS[i % len(PROMPTS)], max_tokens, tok))

                for i in range(n):
                    tg.start_soon(fire, i)
                    await anyio.sleep(rng.expovariate(rate))
        wall = max(r["end"] for r in results) - t0
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    itl = sorted(r["itl"] for r in results if r["itl"] is not None)
    tokens = sum(r["tokens"] for r in results)
    return {"scenario": name, "requests": n, "tokens": tokens, "wall_s": wall, "throughput_tok_s": tokens / wall,
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "itl_p50_ms": 1e3 * pct(itl, 50), "itl_p99_ms": 1e3 * pct(itl, 99),
            "texts": {r["prompt"]: r["text"] for r in results}}


def pct(xs, p):
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rates", default="1,2,4")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=16, help="untimed closed-8 requests per server first (0: none)")
    ap.add_argument("--draft", default=None, help="mach-serve's DFlash draft (default: the bundled one)")
    ap.add_argument("--servers", default="mach-serve,mach-serve-target,mlx_lm.server")
    ap.add_argument("--out", default=_common.default_out("serve_bench"))
    a = ap.parse_args()
    import anyio
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    ckpt = Path(a.ckpt) if a.ckpt else fp32_demo(_common.default_ckpt_root())
    if a.draft is None:
        from mach_runtime.assets import default_draft

        a.draft = str(default_draft())
    tok = load_tokenizer(ckpt)
    rates = [float(x) for x in a.rates.split(",") if x]
    rows, out = [], {"machine": _common.machine_info(), "checkpoint": str(ckpt), "args": vars(a), "results": {}}
    for kind in a.servers.split(","):
        port = free_port()
        base, model = f"http://127.0.0.1:{port}", ("bench" if kind.startswith("mach-serve") else str(ckpt))
        log = Path(a.out).with_suffix(f".{kind}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd, proc = start(kind, ckpt, port, a.max_batch, log, a.draft)
        try:
            wait_ready(base, model, proc)
            info = out.setdefault("servers", {})[kind] = {"cmd": [str(c) for c in cmd[1:]]}
            if a.warmup:
                t = time.perf_counter()
                anyio.run(lambda: scenario(base, model, "warmup", a.warmup, a.max_tokens, tok, clients=8))
                info["warmup_s"] = round(time.perf_counter() - t, 2)
                print(f"{kind}: warm-up of {a.warmup} requests (closed-8) took {info['warmup_s']} s", flush=True)
            info["startup"] = startup_lines(log)
            for ln in info["startup"]:
                print(f"{kind}: {ln}", flush=True)
            runs = [("closed-8", dict(clients=8))] + [(f"poisson-{r:g}/s", dict(rate=r)) for r in rates]
            for name, kw in runs:
                load = os.getloadavg()[0]
                res = anyio.run(lambda: scenario(base, model, name, a.requests, a.max_tokens, tok, **kw))
                res["load_average"] = [round(load, 2), round(os.getloadavg()[0], 2)]  # 1-min, before / after
                out["results"].setdefault(kind, []).append(res)
                rows.append([kind, name, res["tokens"], f"{res['throughput_tok_s']:.1f}", f"{res['ttft_p50_ms']:.0f}",
                             f"{res['ttft_p99_ms']:.0f}", f"{res['itl_p50_ms']:.1f}", f"{res['itl_p99_ms']:.1f}",
                             "{:.1f}-{:.1f}".format(*res["load_average"])])
                print(_common.fmt_table(["server", "scenario", "tokens", "tok/s", "TTFT p50", "TTFT p99",
                                         "ITL p50", "ITL p99", "load"], rows[-1:]), flush=True)
            if kind.startswith("mach-serve"):  # lanes, moves, batch sizes, prefill chunks over warm-up + scenarios
                import httpx

                info["decoder_stats"] = httpx.get(base + "/v1/stats", timeout=60).json().get("decoder")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    print()
    print(_common.fmt_table(["server", "scenario", "tokens", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
                             "ITL p99 ms", "load avg"], rows))
    res = out["results"]
    bases = [b for b in ("mlx_lm.server-openblas", "mlx_lm.server") if b in res]  # like for like first (CPU)
    if bases:
        out["ratios"] = {}
        for kind, runs in res.items():
            for base_kind in bases:
                if kind.startswith("mlx_lm.server"):
                    continue
                for m, b in zip(runs, res[base_kind]):
                    same = sum(m["texts"].get(p) == b["texts"].get(p) for p in m["texts"])
                    out["ratios"].setdefault(f"{kind} / {base_kind}", {})[m["scenario"]] = {
                        "throughput_x": m["throughput_tok_s"] / b["throughput_tok_s"],
                        "ttft_p99_x": m["ttft_p99_ms"] / b["ttft_p99_ms"],
                        "same_text_prompts": f"{same}/{len(m['texts'])}"}
        print(json.dumps(out["ratios"], indent=1))
    _common.write_json(a.out, out)
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
