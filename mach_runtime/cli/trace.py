"""``mach trace``: record a routing trace while decoding held-out text, then replay it through the bank.

    mach trace [CKPT] --out trace.json [--tokens 4096] [--seq 512] [--slots 8] [--policy lrfu]
               [--prompt TEXT --max-tokens N]   # trace a free-running generation instead
               [--report report.json]           # routing stats + hit-rate sweep as JSON

Loads the checkpoint (default: the bundled demo model) in streaming residency with a bank of ``--slots`` slots
per layer, decodes ``--tokens`` tokens of the held-out stdlib split token by token (teacher forcing: each
token is one forward with the KV cache, so each bank step is one token), in ``--seq``-token sequences spread
evenly over the split. Prints the live bank stats, checks that replaying the trace reproduces them exactly,
then prints hit rate vs bank size for LRU, LRFU and Belady's optimal and the routing-locality statistics.

Import-light: MLX is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ..analysis.trace_replay import POLICIES, RoutingTrace, default_slot_sizes, replay, routing_stats, sweep


def heldout_stream(tokenizer, checkpoint=None) -> list[int]:
    """The held-out split as one token stream, built like the training data: each file encoded on its own,
    files joined by the end-of-text token. Uses the checkpoint's tokenizer.json directly when it has one."""
    from ..demo_corpus import DOC_SEPARATOR, corpus_files

    encode = None
    if checkpoint is not None and (Path(checkpoint) / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        raw = Tokenizer.from_file(str(Path(checkpoint) / "tokenizer.json"))
        sep = raw.token_to_id(DOC_SEPARATOR)
        encode = lambda text: raw.encode(text, add_special_tokens=False).ids  # noqa: E731
    if encode is None:
        sep = tokenizer.convert_tokens_to_ids(DOC_SEPARATOR) if hasattr(tokenizer, "convert_tokens_to_ids") else None
        encode = tokenizer.encode
    stream: list[int] = []
    for f in corpus_files("heldout"):
        stream.extend(encode(f.read()))
        if sep is not None:
            stream.append(sep)
    return stream


def heldout_segments(tokenizer, tokens: int, seq: int, checkpoint=None) -> list[list[int]]:
    """``ceil(tokens/seq)`` windows of ``seq`` tokens (the last one shorter), evenly spread over the held-out
    split's token stream; together exactly ``tokens`` tokens."""
    stream = heldout_stream(tokenizer, checkpoint)
    n = max(1, math.ceil(tokens / seq))
    if len(stream) < tokens:
        raise ValueError(f"the held-out split has {len(stream)} tokens, fewer than --tokens {tokens}")
    stride = (len(stream) - seq) // n if n > 1 else 0
    out, left = [], tokens
    for i in range(n):
        m = min(seq, left)
        out.append(stream[i * stride : i * stride + m])
        left -= m
    return out


def record(model, store, segments: list[list[int]], progress=None) -> tuple[list[int], float, int]:
    """Feeds every segment token by token (fresh KV cache per segment) with tracing on.

    Returns (segment start token indices, summed next-token CE in nats, CE-scored tokens)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    starts, nll, scored, t = [], 0.0, 0, 0
    store.start_trace()
    for seg in segments:
        starts.append(t)
        cache = make_prompt_cache(model)
        for i, tok in enumerate(seg):
            logits = model(mx.array([[tok]]), cache=cache)[0, -1]
            if i + 1 < len(seg):
                lp = logits.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32))
                nll -= float(lp[seg[i + 1]].item())
                scored += 1
            else:
                mx.eval(logits)
            t += 1
        if progress is not None:
            progress(len(starts), len(segments), t)
    return starts, nll, scored


def record_generation(model, store, prompt_ids: list[int], max_tokens: int, temperature: float, seed: int):
    """Prompt fed token by token, then ``max_tokens`` sampled tokens; tracing on. Returns generated ids."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from ..engine.generate import make_sampler

    sampler = make_sampler(temperature, seed=seed)
    cache = make_prompt_cache(model)
    store.start_trace()
    logits = None
    for tok in prompt_ids:
        logits = model(mx.array([[tok]]), cache=cache)[:, -1]
    out = []
    for _ in range(max_tokens):
        nxt = int(sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True)).item())
        out.append(nxt)
        logits = model(mx.array([[nxt]]), cache=cache)[:, -1]
    mx.eval(logits)
    return out


def reconcile(trace: RoutingTrace, stats, slots: int) -> dict:
    """Replays ``trace`` at the live run's bank size and policy; raises if any counter differs."""
    r = replay(trace, slots, stats.eviction_policy)
    live = {"hits": stats.hits, "misses": stats.misses, "evictions": stats.evictions}
    sim = {"hits": r.hits, "misses": r.misses, "evictions": r.evictions}
    if live != sim:
        raise AssertionError(f"trace replay does not reconcile with the live bank: live {live}, replay {sim}")
    return sim


def format_sweep(results, num_experts: int) -> str:
    by = {}
    for r in results:
        by.setdefault(r.slots, {})[r.policy] = r
    pols = [p for p in POLICIES if any(p in v for v in by.values())]
    head = f"{'slots/layer':>11} {'bank':>6} " + " ".join(f"{p:>8}" for p in pols) + f" {'uniform':>8}"
    lines = [head]
    for s in sorted(by):
        row = f"{s:>11} {s / num_experts:>6.0%} " + " ".join(f"{by[s][p].hit_rate:>8.1%}" for p in pols)
        lines.append(row + f" {s / num_experts:>8.1%}")
    return "\n".join(lines)


def format_stats(st: dict) -> str:
    w = next(k for k in st["mean"] if k.startswith("reuse_within_"))
    lines = [f"{'layer':>5} {'entropy':>8} {'H/Hmax':>7} {'reuse@1':>8} {w.replace('reuse_within_', 'reuse<=')  :>8} "
             f"{'union16':>8} {'unused':>6}"]
    for x in st["layers"]:
        lines.append(f"{x['layer']:>5} {x['entropy_bits']:>8.2f} {x['entropy_norm']:>7.3f} {x['reuse_next']:>8.1%} "
                     f"{x[w]:>8.1%} {x['block_union']:>8.1f} {x['unused_experts']:>6}")
    m, u = st["mean"], st["uniform"]
    lines.append(f"{'mean':>5} {m['entropy_bits']:>8.2f} {m['entropy_norm']:>7.3f} {m['reuse_next']:>8.1%} "
                 f"{m[w]:>8.1%} {m['block_union']:>8.1f}")
    lines.append(f"{'unif':>5} {'':>8} {u['entropy_norm']:>7.3f} {u['reuse_next']:>8.1%} {u[w]:>8.1%} "
                 f"{u['block_union']:>8.1f}")
    return "\n".join(lines)


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory or a repository id in the local Hugging Face cache (default: the bundled demo model)")
    p.add_argument("--out", default="trace.json", help="where to write the trace (JSON)")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens to decode")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (fresh KV cache each)")
    p.add_argument("--slots", type=int, default=None, help="bank slots per layer for the live run (default: E/4)")
    p.add_argument("--policy", choices=("lru", "lrfu"), default="lrfu", help="eviction policy of the live run")
    p.add_argument("--prompt", default=None, help="trace a generation from this prompt instead of held-out text")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate with --prompt")
    p.add_argument("--temp", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", default=None, help="comma-separated bank sizes (slots/layer) for the replay sweep")
    p.add_argument("--report", default=None, help="also write routing stats + sweep as JSON here")
    return p


def run(a) -> int:
    from ..assets import demo_model_path
    from ..io.load import load_moe

    from ..io.arch_registry import experts_and_top_k
    from ..io.hf_cache import resolve_checkpoint

    ckpt = str(resolve_checkpoint(a.checkpoint)) if a.checkpoint else str(demo_model_path())
    E, k = experts_and_top_k(ckpt)
    slots = a.slots or max(k, E // 4)
    model, tok, store, _ = load_moe(ckpt, expert_residency="streaming", expert_slots=slots,
                                    eviction_policy=a.policy)
    try:
        live_slots = store.stats().capacity_experts // store.stats().layers
        t0 = time.perf_counter()
        meta = {"checkpoint": str(ckpt), "live_slots": live_slots, "policy": a.policy}
        if a.prompt is not None:
            ids = tok.encode(a.prompt)
            gen = record_generation(model, store, ids, a.max_tokens, a.temp, a.seed)
            starts, text = [0], tok.decode(gen)
            meta.update(source="generation", prompt=a.prompt, generated=text, temperature=a.temp, seed=a.seed)
            print(a.prompt + text)
        else:
            from ..demo_corpus import HELDOUT_BYTE

            segs = heldout_segments(tok, a.tokens, a.seq, ckpt)

            def progress(i, n, t):
                print(f"[mach] sequence {i}/{n}: {t} tokens, {t / (time.perf_counter() - t0):.1f} tok/s",
                      file=sys.stderr, flush=True)

            starts, nll, scored = record(model, store, segs, progress)
            meta.update(source=f"stdlib held-out split (sha1(relpath)[0] < {HELDOUT_BYTE})", sequences=len(segs),
                        seq=a.seq, heldout_ce=nll / scored, heldout_ppl=math.exp(nll / scored))
        secs = time.perf_counter() - t0
        s = store.stats()
        meta["live"] = {"hits": s.hits, "misses": s.misses, "evictions": s.evictions, "bytes_read": s.bytes_read,
                        "hit_rate": s.hit_rate, "expert_bytes": s.expert_bytes, "seconds": secs}
        trace = RoutingTrace.from_store(store, segments=starts, meta=meta)
    finally:
        store.close()
    trace.save(a.out)
    n = trace.tokens
    print(f"[mach] traced {n} tokens x {len(trace.layers)} MoE layers in {secs:.1f}s ({n / secs:.1f} tok/s) -> {a.out}",
          file=sys.stderr)
    if "heldout_ce" in meta:
        print(f"[mach] held-out next-token CE on the traced tokens: {meta['heldout_ce']:.4f} nats "
              f"(ppl {meta['heldout_ppl']:.2f})")
    print(f"[mach] live bank ({a.policy}, {live_slots}/{E} slots/layer): hit rate {s.hit_rate:.1%}, {s.hits} hits, "
          f"{s.misses} misses, {s.evictions} evictions, {s.bytes_read / 2**20:.1f} MiB read")
    reconcile(trace, s, live_slots)
    print(f"[mach] replay of the trace at {live_slots} slots/layer ({a.policy}) reproduces the live hits, misses and "
          "evictions exactly")
    sizes = [int(x) for x in a.sizes.split(",")] if a.sizes else default_slot_sizes(trace)
    results = sweep(trace, sizes)
    print("\nbank hit rate vs size (replay of this trace; uniform = a random router's expectation):")
    print(format_sweep(results, trace.num_experts))
    st = routing_stats(trace)
    print(f"\nrouting locality per MoE layer ({trace.num_experts} experts, top-{trace.top_k}; "
          "reuse@1 / reuse<=8: share of a token's experts the layer used at the previous token / within 8):")
    print(format_stats(st))
    if a.report:
        report = {"meta": meta, "routing": st,
                  "sweep": [{"policy": r.policy, "slots": r.slots, "hit_rate": r.hit_rate, "hits": r.hits,
                             "misses": r.misses, "evictions": r.evictions} for r in results]}
        Path(a.report).write_text(json.dumps(report, indent=1) + "\n")
    return 0
