"""``mach demo``: the bundled demo model writing Python, its experts streaming from disk, several requests at once.

    mach demo [CKPT] [--slots 8] [--max-tokens 64] [--temp 0.6] [--seed 0] [--prompt P ...]

Opens the async ``Runtime`` on the checkpoint (default: the bundled demo model) in streaming residency with a
bank smaller than its experts (``--slots`` per layer, default a quarter of them) and sends every prompt at once:
the Decoder decodes them together in one continuous batch. The first request's text streams live; each other
request is printed when it finishes, with a stats line (its tok/s, and the bank's hit rate and bytes read so
far); a summary closes (aggregate tok/s, batch sizes, hit rate, experts streamed).

Import-light: MLX is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

# each prompt ends where a token naturally ends (not on a newline or indentation the model would merge)
DEMO_PROMPTS = (
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""',
    'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):',
    "import os\nimport sys\n\n\ndef main(argv):",
    "class TestSplitLines(unittest.TestCase):\n\n    def test_empty(self):",
)


@dataclass(frozen=True)
class DemoRequest:
    prompt: str
    max_tokens: int = 64
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int = 0


class _Printer:
    """Request 0 streams live; the others print whole when they finish (after request 0), each with stats."""

    def __init__(self, out, requests):
        self.out, self.requests = out, requests
        self.live_open = False
        self.waiting: list[tuple[int, str, int, float, object]] = []
        self.done: list[tuple[int, int, float]] = []

    def _head(self, i: int) -> None:
        bold = self.out.isatty()
        title = f"── request {i + 1}/{len(self.requests)} ──"
        self.out.write(f"\n\033[1m{title}\033[0m\n" if bold else f"\n{title}\n")
        self.out.write(self.requests[i].prompt)

    def live(self, text: str) -> None:
        if not self.live_open:
            self._head(0)
            self.live_open = True
        self.out.write(text)
        self.out.flush()

    def finished(self, i: int, text: str, tokens: int, seconds: float, bank) -> None:
        if i == 0:
            self._stats(0, tokens, seconds, bank)
            for item in self.waiting:
                self._block(*item)
            self.waiting.clear()
        elif any(d[0] == 0 for d in self.done):
            self._block(i, text, tokens, seconds, bank)
        else:
            self.waiting.append((i, text, tokens, seconds, bank))

    def _block(self, i, text, tokens, seconds, bank) -> None:
        self._head(i)
        self.out.write(text)
        self._stats(i, tokens, seconds, bank)

    def _stats(self, i, tokens, seconds, bank) -> None:
        self.done.append((i, tokens, seconds))
        tps = tokens / seconds if seconds else 0.0
        self.out.write(
            f"\n[stats] {tokens} tok in {seconds:.2f}s ({tps:.1f} tok/s for this request) | bank hit rate so far "
            f"{bank.hit_rate:.1%} ({bank.hits} hits, {bank.misses} misses) | {bank.bytes_read / 2**20:.1f} MiB read\n"
        )
        self.out.flush()


async def _run(ckpt, slots, requests, policy, out) -> dict:
    import anyio

    from actors.runtime import Runtime

    t0 = time.perf_counter()
    async with Runtime.open(ckpt, expert_residency="streaming", expert_slots=slots,
                            eviction_policy=policy, max_batch=len(requests)) as rt:
        load_s = time.perf_counter() - t0
        s0 = (await rt.stats()).experts
        per_layer = s0.capacity_experts // s0.layers
        total = s0.layers * s0.num_experts * s0.expert_bytes
        out.write(
            f"mach demo: {ckpt.name} — qwen3_moe, {s0.layers} MoE layers x {s0.num_experts} experts\n"
            f"experts stream from disk into a bank of {per_layer}/{s0.num_experts} slots per layer "
            f"({per_layer / s0.num_experts:.0%} of {total / 2**20:.1f} MiB of experts), {s0.eviction_policy} "
            f"eviction; loaded in {load_s:.2f}s; {len(requests)} requests decode together in one batch\n"
        )
        printer = _Printer(out, requests)

        async def client(i: int, r: DemoRequest) -> None:
            start, parts, n = time.perf_counter(), [], 0
            async for c in rt.stream(r.prompt, max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p,
                                     seed=r.seed):
                n += len(c.token_ids)
                if i == 0:
                    printer.live(c.text)
                else:
                    parts.append(c.text)
            printer.finished(i, "".join(parts), n, time.perf_counter() - start, rt._sup.store.stats())

        t1 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i, r in enumerate(requests):
                tg.start_soon(client, i, r)
        secs = time.perf_counter() - t1
        st = await rt.stats()
    s, n = st.experts, sum(d[1] for d in printer.done)
    summary = {"requests": len(printer.done), "tokens": n, "seconds": secs, "tok_per_s": n / secs if secs else 0.0,
               "hit_rate": s.hit_rate, "hits": s.hits, "misses": s.misses, "bytes_read": s.bytes_read,
               "slots_per_layer": per_layer, "num_experts": s.num_experts, "expert_bytes_total": total,
               "load_seconds": load_s, "batch_histogram": st.decoder.batch_histogram}
    out.write(
        f"\n[demo] {summary['requests']} generations, {n} tokens in {secs:.1f}s ({summary['tok_per_s']:.1f} tok/s "
        f"aggregate; batch sizes {dict(sorted(st.decoder.batch_histogram.items()))}) | expert bank hit rate "
        f"{s.hit_rate:.1%} with {per_layer}/{s.num_experts} experts resident per layer | {s.misses} experts "
        f"streamed from disk, {s.bytes_read / 2**20:.1f} MiB read ({s.bytes_read / total:.1f}x the model's "
        f"expert bytes)\n"
    )
    out.flush()
    return summary


def run_demo(checkpoint=None, *, slots: int | None = None, requests: list[DemoRequest] | None = None,
             policy: str | None = None, out=None, backend: str = "asyncio") -> dict:
    """Runs the demo and returns its summary (tokens, seconds, tok/s, hit rate, bytes read, bank size)."""
    import anyio

    from ..assets import demo_model_path

    out = out or sys.stdout
    from ..io.arch_registry import experts_and_top_k
    from ..io.hf_cache import resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint) if checkpoint else demo_model_path()
    requests = list(requests) if requests is not None else [DemoRequest(p, seed=i) for i, p in enumerate(DEMO_PROMPTS)]
    E, k = experts_and_top_k(ckpt)
    return anyio.run(_run, ckpt, slots or max(k, E // 4), requests, policy, out, backend=backend)


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory or a repository id in the local Hugging Face cache (default: the bundled demo model)")
    p.add_argument("--slots", type=int, default=None, help="bank slots per MoE layer (default: a quarter of the experts)")
    p.add_argument("--eviction-policy", choices=("lru", "lrfu"), default=None)
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per generation")
    p.add_argument("--temp", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several; default: 4 built in)")
    return p


def run(a) -> int:
    prompts = a.prompt or list(DEMO_PROMPTS)
    reqs = [DemoRequest(p, a.max_tokens, a.temp, a.top_p, a.seed + i) for i, p in enumerate(prompts)]
    run_demo(a.checkpoint, slots=a.slots, requests=reqs, policy=a.eviction_policy)
    return 0
