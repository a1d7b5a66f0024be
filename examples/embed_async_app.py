"""Many concurrent clients on one embedded Runtime (asyncio or trio).

    python examples/embed_async_app.py [--backend trio] [--clients 8] [CHECKPOINT]

Each client streams its own completion; the Decoder batches them together (continuous batching), so the
aggregate tokens/s grows with the number of clients. Runs offline on the bundled default checkpoint.
"""

import argparse
import time

import anyio

from mach_runtime import Runtime

PROMPTS = ["def parse(line):", "import os\n", "class Cache:", "for i in range(", "def main():\n    args =",
           "try:\n    ", "with open(path) as f:", "return sorted("]


async def main(args):
    async with Runtime.open(args.checkpoint, expert_residency="streaming", max_batch=args.clients) as rt:
        counts = {}

        async def client(i):
            n = 0
            async for chunk in rt.stream(PROMPTS[i % len(PROMPTS)], max_tokens=args.max_tokens, temperature=0.7,
                                         seed=i):
                n += len(chunk.token_ids)
                if i == 0:
                    print(chunk.text, end="", flush=True)
            counts[i] = n

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(args.clients):
                tg.start_soon(client, i)
        dt = time.perf_counter() - t0
        stats = await rt.stats()
        print(f"\n\n{args.clients} clients, {sum(counts.values())} tokens in {dt:.2f}s "
              f"({sum(counts.values()) / dt:.1f} tok/s aggregate)")
        print(f"batch sizes seen (size: steps): {dict(sorted(stats.decoder.batch_histogram.items()))}")
        print(f"expert bank hit rate {stats.experts.hit_rate:.1%}, {stats.experts.bytes_read / 2**20:.1f} MiB read")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48)
    a = p.parse_args()
    anyio.run(main, a, backend=a.backend)
