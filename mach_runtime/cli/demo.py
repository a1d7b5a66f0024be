"""``mach demo``: the bundled demo model writing Python, with its experts streaming from disk.

    mach demo [CKPT] [--slots 8] [--max-tokens 64] [--temp 0.7] [--seed 0] [--prompt P ...]

Loads the checkpoint (default: the bundled demo model) in streaming residency with a bank smaller than its
experts (``--slots`` per layer, default a quarter of them), runs several generations, streams their text, and
prints live stats after each one (tok/s, bank hit rate, misses, bytes read) and a summary at the end.

The generations run one after another through ``stream_generate`` (``sequential_streams``). The rest of the
command only consumes ``DemoEvent``s, so running the requests concurrently through the async Runtime means
replacing that one producer.

Import-light: MLX is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

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


@dataclass(frozen=True)
class DemoEvent:
    request: int  # index into the request list
    text: str  # new text ("" is allowed)
    finish_reason: str | None = None  # set on the request's last event
    tokens: int = 0  # tokens generated so far by this request
    prompt_tokens: int = 0
    seconds: float = 0.0  # since the request started


def sequential_streams(model, tokenizer, requests: list[DemoRequest]) -> Iterator[DemoEvent]:
    """Runs the requests one after another with ``stream_generate``; yields their text as it is produced."""
    from ..engine.generate import GenerationStats, stream_generate

    for i, r in enumerate(requests):
        stats = GenerationStats()
        t0 = time.perf_counter()
        for chunk in stream_generate(model, tokenizer, r.prompt, max_tokens=r.max_tokens, temperature=r.temperature,
                                     top_p=r.top_p, seed=r.seed, stats=stats):
            yield DemoEvent(i, chunk.text, chunk.finish_reason, stats.generated_tokens, stats.prompt_tokens,
                            time.perf_counter() - t0)


class _Printer:
    """Streams request text to ``out`` and prints a stats line when a request finishes."""

    def __init__(self, out, requests, store):
        self.out, self.requests, self.store = out, requests, store
        self.current: int | None = None
        self.prev = store.stats()
        self.done: list[DemoEvent] = []

    def __call__(self, ev: DemoEvent) -> None:
        w = self.out.write
        if ev.request != self.current:
            self.current = ev.request
            w(f"\n\033[1m── request {ev.request + 1}/{len(self.requests)} ──\033[0m\n" if self.out.isatty()
              else f"\n── request {ev.request + 1}/{len(self.requests)} ──\n")
            w(self.requests[ev.request].prompt)
        w(ev.text)
        self.out.flush()
        if ev.finish_reason is not None:
            s = self.store.stats()
            hits, misses = s.hits - self.prev.hits, s.misses - self.prev.misses
            rate = hits / (hits + misses) if hits + misses else 1.0
            tps = ev.tokens / ev.seconds if ev.seconds else 0.0
            w(f"\n[stats] {ev.tokens} tok in {ev.seconds:.2f}s ({tps:.1f} tok/s) | bank hit rate {rate:.1%} "
              f"({hits} hits, {misses} misses) | read {(s.bytes_read - self.prev.bytes_read) / 2**20:.1f} MiB | "
              f"cumulative hit rate {s.hit_rate:.1%}, {s.bytes_read / 2**20:.1f} MiB read\n")
            self.out.flush()
            self.prev = s
            self.done.append(ev)


def run_demo(checkpoint=None, *, slots: int | None = None, requests: list[DemoRequest] | None = None,
             policy: str | None = None, out=None,
             streams: Callable[..., Iterator[DemoEvent]] = sequential_streams) -> dict:
    """Runs the demo and returns its summary (tokens, seconds, tok/s, hit rate, bytes read, bank size)."""
    import json
    from pathlib import Path

    from ..assets import demo_model_path
    from ..io.load import load_moe
    from ..io.trace_replay import budget_for_slots

    out = out or sys.stdout
    ckpt = Path(checkpoint) if checkpoint else demo_model_path()
    requests = list(requests) if requests is not None else [DemoRequest(p, seed=i) for i, p in enumerate(DEMO_PROMPTS)]
    cfg = json.loads((ckpt / "config.json").read_text())
    E, k = int(cfg["num_experts"]), int(cfg["num_experts_per_tok"])
    slots = slots or max(k, E // 4)
    t0 = time.perf_counter()
    model, tok, store, _ = load_moe(ckpt, expert_residency="streaming", expert_cache_gb=budget_for_slots(ckpt, slots),
                                    eviction_policy=policy)
    load_s = time.perf_counter() - t0
    try:
        s0 = store.stats()
        per_layer = s0.capacity_experts // s0.layers
        total = s0.layers * s0.num_experts * s0.expert_bytes
        name = "the bundled demo model" if checkpoint is None else str(ckpt)
        out.write(
            f"mach demo: {name} — qwen3_moe, {s0.layers} MoE layers x {s0.num_experts} experts, top-{k}\n"
            f"experts stream from disk into a bank of {per_layer}/{s0.num_experts} slots per layer "
            f"({per_layer / s0.num_experts:.0%} of {total / 2**20:.1f} MiB of experts), {s0.eviction_policy} "
            f"eviction; loaded in {load_s:.2f}s\n"
        )
        printer = _Printer(out, requests, store)
        t1 = time.perf_counter()
        for ev in streams(model, tok, requests):
            printer(ev)
        secs = time.perf_counter() - t1
        s = store.stats()
    finally:
        store.close()
    n = sum(ev.tokens for ev in printer.done)
    summary = {"requests": len(printer.done), "tokens": n, "seconds": secs, "tok_per_s": n / secs if secs else 0.0,
               "hit_rate": s.hit_rate, "hits": s.hits, "misses": s.misses, "bytes_read": s.bytes_read,
               "slots_per_layer": per_layer, "num_experts": s.num_experts, "expert_bytes_total": total,
               "load_seconds": load_s}
    out.write(
        f"\n[demo] {summary['requests']} generations, {n} tokens in {secs:.1f}s ({summary['tok_per_s']:.1f} tok/s) | "
        f"expert bank hit rate {s.hit_rate:.1%} with {per_layer}/{s.num_experts} experts resident per layer | "
        f"{s.misses} experts streamed from disk, {s.bytes_read / 2**20:.1f} MiB read "
        f"({s.bytes_read / total:.1f}x the model's expert bytes)\n"
    )
    out.flush()
    return summary


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory (default: the bundled demo model)")
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
