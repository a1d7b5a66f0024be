#!/usr/bin/env python3
"""Block policies replayed on recorded acceptance: how close each policy gets to the best of fixed blocks and
target-only under a machine's costs, without spending GPU time.

1. Records, on this machine (CPU, greedy, the bundled pair), the accepted drafts of every 16-token cycle of
   ``BlockSpecDecEngine`` with ``fixed`` blocks over the model card's held-out prompts (``--prompts`` x
   ``--new-tokens``). A cycle at position p that accepted a drafts says the draft's run from p was a, from p + 1
   a − 1, … (a draft pass always covers the draft's whole block, so a shorter verify accepts min(run, b − 1)).
2. Replays each policy (``fixed``, ``opencode-sampled-v1``, ``throughput``) and target-only over those runs, the
   real policy objects deciding, each cycle's seconds drawn from a cost model with multiplicative noise
   (lognormal, ``--noise``) and rare kernel-build spikes: ``gpu`` = an H100/H200 as measured in P3 (target-only
   step 2.1 ms; draft pass 1.44 ms; verify 2.2 ms + 0.04 ms per token; 0.3 ms accept/emit), ``cpu`` = this
   2-core VM (step 10 ms; a cycle 55 ms + 4 ms per token). ``--rounds`` passes over the prompts per seed (the
   engine's shared timings and acceptance carry over, as in one engine); the first pass is dropped.

Prints tok/s and tokens per target pass per policy and cost model and the ratios to fixed blocks and to
target-only; writes JSON. The replay is a model: the absolute tok/s are the cost model's, and acceptance at a
shorter block is the truncated run (exact since drafts cover the whole block).

    python bench/policy_replay.py                 # records (~70 s on the CPU VM), then replays
    python bench/policy_replay.py --cycles bench/results/p3_cycles.json   # replay a recording
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import _common as C

ASSETS = C.REPO / "mach_runtime" / "assets"
COSTS = {  # seconds of a cycle of b tokens (b = 1: a pipelined target-only step)
    "gpu": lambda b: 2.1e-3 if b == 1 else 1.44e-3 + 2.2e-3 + 0.04e-3 * b + 0.3e-3,
    "cpu": lambda b: 10e-3 if b == 1 else 55e-3 + 4e-3 * b,
}


def record(prompts: int, new_tokens: int) -> list[list[int]]:
    from mlx_lm.utils import load_tokenizer

    from mach_runtime import BlockSpecDecEngine, BlockSpecDecEngineConfig
    from mach_runtime.demo_corpus import heldout_prompts

    target, draft = ASSETS / "demo-qwen3-moe", ASSETS / "demo-qwen3-moe-dflash"
    tok = load_tokenizer(target)
    eng = BlockSpecDecEngine.from_checkpoint(
        target_checkpoint=str(target), draft_checkpoint=str(draft), expert_residency="stacked",
        config=BlockSpecDecEngineConfig(mode="native_v7", block_size=16, policy="fixed"))
    runs: list[list[int]] = []
    for _, ids in heldout_prompts(tok, prompts, 128, 256, new_tokens):
        gen = eng.generate(ids, max_tokens=new_tokens, ignore_eos=True)
        next(gen)  # the prompt's token: the request's policy exists now, its cycles are still to come
        policy, seen = eng.last_policy, []
        observe = policy.observe

        def recording(b, accepted, *rest, seen=seen, observe=observe):
            if b > 1:
                seen.append(accepted)
            observe(b, accepted, *rest)

        policy.observe = recording
        for _ in gen:
            pass
        runs.append(seen)
    return runs


def draft_runs(cycles: list[int], pad: int = 64) -> list[int]:
    """The draft's accepted run length at every position, from one request's fixed-block cycles."""
    out = []
    for a in cycles:
        out += [a - j for j in range(a + 1)]
    return out + [0] * pad


def replay(name: str, runs: list[list[int]], cost, *, new_tokens: int, rounds: int, seed: int, noise: float,
           spike: float) -> list[tuple[float, float]]:
    from mach_runtime.engine.specdec.policies import PolicyMemory, make_policy

    rng = random.Random(seed)
    memory = PolicyMemory()
    out = []
    for _ in range(rounds + 1):
        seconds = tokens = passes = 0
        for run in runs:
            policy = make_policy("fixed" if name == "target_only" else name, 16, memory=memory)
            pos = 0
            while pos < new_tokens:
                b = 1 if name == "target_only" else max(1, min(policy.block_len(pos), new_tokens - pos))
                accepted = min(run[pos], b - 1)
                t = cost(b) * rng.lognormvariate(0, noise) + (0.05 if rng.random() < spike else 0.0)
                policy.observe(b, accepted, 0, t)
                seconds += t
                pos += accepted + 1
                passes += 1
            tokens += pos
        out.append((tokens / seconds, tokens / passes))
    return out[1:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", help="a recording (JSON list of per-prompt accepted counts) instead of recording")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--noise", type=float, default=0.15, help="lognormal sigma of each cycle's time")
    p.add_argument("--spike", type=float, default=0.01, help="share of cycles that take 50 ms more")
    p.add_argument("--out", default=C.default_out("policy_replay"))
    a = p.parse_args()

    runs = json.loads(Path(a.cycles).read_text()) if a.cycles else record(a.prompts, a.new_tokens)
    if not a.cycles:
        C.write_json(Path(a.out).with_name("p3_cycles.json"), runs)
    n_cycles = sum(len(r) for r in runs)
    print(f"[replay] {len(runs)} prompts, {n_cycles} recorded cycles, "
          f"{sum(map(sum, runs)) / n_cycles:.2f} accepted drafts per 16-token cycle")
    positions = [draft_runs(r) for r in runs]
    results, rows = {"machine": C.machine_info(), "replays": {}}, []  # the cycles: p3_cycles.json / --cycles
    for costs in ("gpu", "cpu"):
        stats = {}
        for name in ("fixed", "opencode-sampled-v1", "throughput", "target_only"):
            got = [x for s in range(a.seeds) for x in replay(name, positions, COSTS[costs], new_tokens=a.new_tokens,
                                                             rounds=a.rounds, seed=s, noise=a.noise, spike=a.spike)]
            stats[name] = (statistics.mean(t for t, _ in got), statistics.mean(p for _, p in got))
        for name, (tps, tpp) in stats.items():
            rows.append([costs, name, f"{tps:.1f}", f"{tpp:.2f}", f"{tps / stats['fixed'][0]:.3f}",
                         f"{tps / stats['target_only'][0]:.3f}"])
            results["replays"][f"{costs}/{name}"] = dict(tps=tps, tokens_per_pass=tpp)
    C.write_json(a.out, results)
    print(C.fmt_table(["costs", "policy", "tok/s (model)", "tokens/target pass", "vs fixed", "vs target-only"],
                      rows))
    print(f"JSON: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
