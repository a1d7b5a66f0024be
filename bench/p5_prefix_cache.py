#!/usr/bin/env python3
"""P5: the prefix cache. TTFT of a shared prefix + short suffix (cold / L1 / L2), and an agent-like trace.

**TTFT** (through the real ``Runtime``: Cache actor lookup, Decoder restore, first decode step): a prompt of a
long shared prefix + a short suffix, time from submitting it to its first token.

* cold: ``Runtime.open(prefix_cache=False)``: the whole prompt is prefilled;
* L1: one earlier request with the same prefix and another suffix populated the cache (RAM), then a new suffix
  (6 samples, each after a "fresh" sample: the suffix alone as a new request, the floor any short request pays);
* L2: a fresh Runtime over the same ``prefix_cache_dir`` (L1 empty), page cache dropped (``echo 3 >
  /proc/sys/vm/drop_caches`` as root, + fadvise) right before the request: the snapshot is read from disk cold.

On the demo model it also times the floor: mlx-lm's own model, bare (no runtime), forwarding the same suffix alone,
over the prefix's KV, and the whole prompt; "vs cold" of those rows divides the Runtime's cold TTFT by them (the
L1 ratio a runtime adding nothing to mlx-lm's forward would reach).

Before every timed request of every case the page cache is dropped the same way (streaming residency then
reads its experts cold too; expert bytes read per request are reported). Models: the bundled demo model
(context 1024: a ~900-token prefix) stacked, and a larger random qwen3_moe (hidden 512, 8 layers, 64 experts
top-8, fp32, HF per-expert layout) with a 4k-token prefix, stacked and streaming (bank = 25 % of the experts).

**Agent trace** (engine level, one process, greedy): a fixed 3k-token tool/system prefix, 4 agents x 20 turns,
each turn = the agent's whole history + a new ~40-token user message, 16 generated tokens; turns interleave
round-robin across the agents (as 4 concurrent agents hit a server). Total prefilled tokens and wall time:

* off: every prompt is prefilled;
* mlx-lm: mlx-lm's own ``LRUPromptCache`` (max 10 entries, as mlx_lm.server uses it: fetch_nearest_cache before,
  insert_cache of prompt + reply after, deep copies);
* ours: ``PrefixCache`` (L1 + L2 ``DiskKVCache``, block 256): lookup -> restore, snapshot after the request,
  L2 writes in a background thread.

and the same trace with a server restart after turn 10 (RAM caches lost; L2 survives). The trace also runs
through the real Runtime (4 concurrent agent tasks, continuous batching) with the cache off and on.

    python bench/p5_prefix_cache.py [--quick] [--demo-only] [--skip-trace] [--out bench/results/p5_prefix_cache.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

SUFFIX_LEN = 12


# -- TTFT through the Runtime -------------------------------------------------------------------------------------
def _evict(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


async def _ttft(rt, ids, drop_paths):
    """TTFT of ``ids`` with cold data and warm code: every clean page is dropped (echo 3 > drop_caches), a short
    unrelated request faults the runtime's own code back in, then the data files (checkpoint, L2 snapshots) are
    evicted again (fadvise DONTNEED), so only they are read cold."""
    _common.drop_caches(drop_paths)
    async for _ in rt._stream_ids([7, 8, 9, 10] * 4, max_tokens=1):
        pass
    _evict(drop_paths)
    sup = rt._sup
    before = sup.store.stats().bytes_read
    t0 = time.perf_counter()
    first, usage = None, None
    async for c in rt._stream_ids(list(ids), max_tokens=2):
        if first is None and c.token_ids:
            first = time.perf_counter() - t0
        usage = c.usage or usage
    return first, usage, sup.store.stats().bytes_read - before


async def ttft_case(ckpt, prefix, suffixes, residency, cache_gb, l2_dir):
    from mach_runtime import Runtime

    files = _common.safetensors_files(ckpt)
    kw = dict(expert_residency=residency, max_batch=4)
    if residency == "streaming":
        kw.update(expert_cache_gb=cache_gb, direct_io=True)
    prompts = [prefix + s for s in suffixes]
    out = {}
    async with Runtime.open(ckpt, prefix_cache_dir=l2_dir, **kw) as rt:
        await _ttft(rt, prompts[0][-64:], files)  # warm the runtime's code paths (not the prefix)
        # cold: the first request of the prefix (a miss: the whole prompt is prefilled; its snapshot is taken after
        # its first token, so the miss path's TTFT is the cache-off TTFT); it populates L1 (and L2 via the writer)
        out["cold"] = [await _ttft(rt, prompts[0], files)]
        # L1 hits alternate with the same suffix alone (a fresh request of SUFFIX_LEN tokens, never cached): the
        # difference is what a hit costs beyond any short request's forward, robust to the machine's load
        out["l1"], out["fresh"] = [], []
        for p, s in zip(prompts[1:-2], suffixes[1:-2]):
            out["fresh"].append(await _ttft(rt, s, files))
            out["l1"].append(await _ttft(rt, p, files))
    l2_files = [str(p) for p in Path(l2_dir).rglob("*.safetensors")]
    out["l2"] = []
    for p in prompts[-2:]:
        async with Runtime.open(ckpt, prefix_cache_dir=l2_dir, **kw) as rt:
            out["l2"].append(await _ttft(rt, p, files + l2_files))
    return out


def mlx_lm_floor(ckpt, prefix, suffix, reps: int = 12) -> dict:
    """The independent floor of a hit: mlx-lm's own model (``mlx_lm.load``, float32 on the CPU as ``load_moe`` runs
    it; this process's BLAS) timed bare, no runtime around it: ``fresh`` = one forward of the suffix alone +
    argmax; ``hit`` = the prefix's KV copied into fresh ``KVCache``s (as a restore does) + one forward of the
    suffix + argmax; ``cold`` = the whole prompt in 512-token chunks + argmax. Medians (ms) of ``reps``,
    alternating."""
    import mlx.core as mx
    import mlx_lm
    import numpy as np
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    model, _ = mlx_lm.load(str(ckpt))
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)  # as load_moe does on the CPU (MLX's CPU gather_mm takes float32 only)
    kv = make_prompt_cache(model)
    model(mx.array([prefix]), cache=kv)
    host = [(np.array(c.keys[..., : c.offset, :]), np.array(c.values[..., : c.offset, :])) for c in kv]

    def fresh():
        return model(mx.array([suffix]), cache=make_prompt_cache(model))

    def hit():
        cache = []
        for k, v in host:
            c = KVCache()
            c.keys, c.values, c.offset = mx.array(k), mx.array(v), k.shape[2]
            cache.append(c)
        return model(mx.array([suffix]), cache=cache)

    def cold():
        cache, ids = make_prompt_cache(model), prefix + suffix
        for s in range(0, len(ids) - 512, 512):
            model(mx.array([ids[s : s + 512]]), cache=cache)
            mx.eval([c.state for c in cache])
        return model(mx.array([ids[len(ids) - 1 - (len(ids) - 1) % 512 :]]), cache=cache)

    times = {"fresh": [], "hit": [], "cold": []}
    for r in range(reps + 1):
        order = (("fresh", fresh), ("hit", hit)) if r % 2 else (("hit", hit), ("fresh", fresh))
        for name, fn in order + ((("cold", cold),) if r % 4 == 0 else ()):
            t0 = time.perf_counter()
            mx.argmax(fn()[0, -1]).item()
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    return {k: _common.median(v) * 1000 for k, v in times.items()}


def summarize(name, res, n_prefix):
    rows, js = [], {}
    cold = _common.median([r[0] for r in res["cold"]])
    for case in ("cold", "l1", "l2", "fresh"):
        t = _common.median([r[0] for r in res[case]])
        cached = [r[1]["cached_tokens"] for r in res[case]]
        bytes_read = _common.median([r[2] for r in res[case]])
        js[case] = {"ttft_s": [r[0] for r in res[case]], "cached_tokens": cached,
                    "expert_bytes_read": [r[2] for r in res[case]]}
        rows.append([name, n_prefix if case != "fresh" else 0, case, f"{t * 1000:.1f}", f"{cold / t:.1f}x", min(cached),
                     f"{bytes_read / 1e6:.1f}"])
    return rows, js


# -- the agent trace --------------------------------------------------------------------------------------------
def agent_requests(n_agents, turns, user_len, vocab, seed=0):
    import random

    rng = random.Random(seed)
    users = {(a, t): [rng.randrange(10, vocab - 10) for _ in range(user_len)]
             for a in range(n_agents) for t in range(turns)}
    return users


class _Off:
    name = "off"

    def fetch(self, tokens):
        return None, 0

    def insert(self, tokens, cache):
        pass

    def restart(self):
        pass


class _MlxLm:
    name = "mlx-lm LRUPromptCache"

    def __init__(self):
        from mlx_lm.models.cache import LRUPromptCache

        self.cls = LRUPromptCache
        self.c = LRUPromptCache(max_size=10)

    def fetch(self, tokens):
        cache, rest = self.c.fetch_nearest_cache("m", list(tokens))
        return cache, (len(tokens) - len(rest)) if cache is not None else 0

    def insert(self, tokens, cache):
        self.c.insert_cache("m", list(tokens), cache)

    def restart(self):
        self.c = self.cls(max_size=10)


class _Ours:
    name = "ours (L1 + L2)"

    def __init__(self, salt, directory, block=256):
        from mach_runtime.engine.disk_kv_cache import DiskKVCache
        from mach_runtime.engine.prefix_cache import PrefixCache

        self.make = lambda: PrefixCache(salt, block, 2 << 30, 64, DiskKVCache(directory, salt, block, 4 << 30))
        self.c = self.make()
        self.pool = ThreadPoolExecutor(1)
        self.lock = threading.Lock()

    def fetch(self, tokens):
        with self.lock:
            e, n = self.c.lookup(tokens, len(tokens) - 1)
            if e is None:
                return None, 0
            snap = self.c.take_l1(e.key, n) if e.tier == "l1" else self.c.load_l2(e.key)
            if snap is None:
                return None, 0
            if e.tier != "l1":
                self.c.promote(e.key, snap, n)
        caches, n, _ = snap.restore(n)
        return caches, n

    def insert(self, tokens, cache):
        from mach_runtime.engine.kv_snapshot import capture

        snap = capture(cache, tokens).to_host()
        with self.lock:
            _, writes = self.c.insert(snap)
        for key, s in writes:
            self.pool.submit(self._write, key, s)

    def _write(self, key, s):
        with self.lock:
            hashes = self.c.hashes_of(s)
        self.c.disk.save(key, s, hashes)
        with self.lock:
            self.c.mark_on_disk(key)

    def restart(self):
        self.pool.shutdown(wait=True)
        self.pool = ThreadPoolExecutor(1)
        self.c = self.make()


def run_trace(model, policy, prefix, users, n_agents, turns, gen, restart_at=None):
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    history = {a: list(prefix) for a in range(n_agents)}
    prefilled = total = 0
    t0 = time.perf_counter()
    for t in range(turns):
        if restart_at is not None and t == restart_at:
            policy.restart()
        for a in range(n_agents):
            prompt = history[a] + users[(a, t)]
            cache, n = policy.fetch(prompt)
            if cache is None:
                cache, n = make_prompt_cache(model), 0
            rest = prompt[n:]
            for s in range(0, len(rest), 512):
                logits = model(mx.array([rest[s : s + 512]]), cache=cache)
                mx.eval(logits)
            prefilled += len(rest)
            total += len(prompt)
            out = []
            for _ in range(gen):
                y = int(mx.argmax(logits[0, -1]).item())
                out.append(y)
                logits = model(mx.array([[y]]), cache=cache)
            mx.eval(logits)
            covered = prompt + out  # every reply token has been fed
            policy.insert(covered, cache)
            history[a] = covered
    return {"prefilled_tokens": prefilled, "prompt_tokens": total, "wall_s": time.perf_counter() - t0}


async def runtime_trace(ckpt, prefix, users, n_agents, turns, gen, open_kw: dict):
    import anyio

    from mach_runtime import Runtime

    stats = {"prefilled_tokens": 0, "prompt_tokens": 0}
    async with Runtime.open(ckpt, expert_residency="stacked", max_batch=n_agents, **open_kw) as rt:
        t0 = time.perf_counter()

        async def agent(a):
            hist = list(prefix)
            for t in range(turns):
                prompt = hist + users[(a, t)]
                out, usage = [], None
                async for c in rt._stream_ids(prompt, max_tokens=gen, stop_token_ids=()):
                    out += c.token_ids
                    usage = c.usage or usage
                stats["prefilled_tokens"] += usage["prefilled_tokens"]
                stats["prompt_tokens"] += usage["prompt_tokens"]
                hist = prompt + out

        async with anyio.create_task_group() as tg:
            for a in range(n_agents):
                tg.start_soon(agent, a)
        stats["wall_s"] = time.perf_counter() - t0
    return stats


def main():
    import anyio

    from mach_runtime import load_moe
    from mach_runtime.assets import default_checkpoint
    from mach_runtime.engine.prefix_keys import model_fingerprint, prefix_salt

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller trace (2 agents x 6 turns, 1k prefix)")
    ap.add_argument("--skip-ttft", action="store_true")
    ap.add_argument("--skip-trace", action="store_true")
    ap.add_argument("--demo-only", action="store_true", help="TTFT of the demo model only (no 4k-prefix cases)")
    ap.add_argument("--out", default=_common.default_out("p5_prefix_cache"))
    args = ap.parse_args()
    _common.freeze_gc()
    root = _common.default_ckpt_root()
    large = _common.ensure_tiny_checkpoint(root, "p5_h384", hidden=384, layers=8, heads=6, head_dim=64,
                                           experts=32, top_k=4, moe_inter=128)
    small = _common.ensure_tiny_checkpoint(root, "p5_trace_tiny", hidden=64, layers=2, experts=16, top_k=4,
                                           moe_inter=32, tokenizer_from=_common.REPO / "tests/fixtures/hf_qwen3_moe")
    demo = default_checkpoint()
    result = {"machine": _common.machine_info(), "source": _common.mach_runtime_source(), "ttft": {}, "trace": {}}
    work = Path(tempfile.mkdtemp(prefix="p5_"))
    try:
        if not args.skip_ttft:
            rows = []
            _, dtok, _, _ = load_moe(demo, expert_residency="stacked")
            cases = [("demo (stacked)", demo, dtok, 900, "stacked", None)]
            if not args.demo_only:
                _, ltok, _, _ = load_moe(large, expert_residency="stacked")
                experts_gb = _common.checkpoint_bytes(large) / 1e9
                cases += [("qwen3_moe h384 (stacked)", large, ltok, 4096, "stacked", None),
                          ("qwen3_moe h384 (streaming 25%)", large, ltok, 4096, "streaming", experts_gb * 0.25)]
            for name, ckpt, tok, n, residency, gb in cases:
                prefix = _common.make_prompt(tok, n)
                suffixes = [_common.make_prompt(tok, SUFFIX_LEN + 7 * k)[-SUFFIX_LEN:] for k in range(1, 10)]
                suffixes = [[(t + 13 * k) % 400 + 5 for t in s] for k, s in enumerate(suffixes)]
                print(f"[p5] TTFT {name}: prefix {n} + suffix {SUFFIX_LEN}", flush=True)
                res = anyio.run(ttft_case, ckpt, prefix, suffixes, residency, gb, work / f"l2_{len(rows)}")
                r, js = summarize(name, res, n)
                if ckpt == demo:  # the floor: mlx-lm's own forwards of the same prompts, bare
                    floor = mlx_lm_floor(ckpt, prefix, suffixes[1])
                    cold = js["cold"]["ttft_s"][0] * 1000
                    js["mlx_lm_floor_ms"] = floor
                    r += [[f"{name}: mlx-lm bare", n if k != "fresh" else 0, k, f"{v:.1f}", f"{cold / v:.1f}x", "-",
                           "-"] for k, v in floor.items()]
                rows += r
                result["ttft"][name] = js
                _common.write_json(args.out, result)
                print(_common.fmt_table(["model", "prefix", "case", "TTFT ms", "vs cold", "cached", "expert MB"], r))
            print(_common.fmt_table(["model", "prefix", "case", "TTFT ms", "vs cold", "cached", "expert MB read"],
                                    rows), flush=True)
        if not args.skip_trace:
            n_agents, turns, plen = (2, 6, 1024) if args.quick else (4, 20, 3072)
            model, tok, _, _ = load_moe(small, expert_residency="stacked")
            prefix = _common.make_prompt(tok, plen)
            users = agent_requests(n_agents, turns, 40, 500)
            salt = prefix_salt(model_fingerprint(small), {"format": 1})
            rows = []
            for restart in (None, turns // 2):
                for make in ((_Off, _MlxLm, lambda: _Ours(salt, work / f"trace_{restart}")) if restart is None
                             else (_MlxLm, lambda: _Ours(salt, work / f"trace_{restart}"))):
                    pol = make()
                    print(f"[p5] trace {pol.name} restart={restart}", flush=True)
                    r = run_trace(model, pol, prefix, users, n_agents, turns, 16, restart)
                    key = f"{pol.name}{' +restart' if restart else ''}"
                    result["trace"][key] = r
                    rows.append([key, r["prompt_tokens"], r["prefilled_tokens"], f"{r['wall_s']:.1f}"])
                    _common.write_json(args.out, result)
            del model
            _common.free_mlx()
            # the real path: 4 concurrent agent tasks, continuous batching (cache off = the "off" row's prefill)
            print("[p5] trace through the Runtime, prefix cache on", flush=True)
            kw = {"prefix_cache_dir": work / "trace_rt"}
            r = anyio.run(runtime_trace, small, prefix, users, n_agents, turns, 16, kw)
            key = f"Runtime, {n_agents} concurrent agents, cache on"
            result["trace"][key] = r
            rows.append([key, r["prompt_tokens"], r["prefilled_tokens"], f"{r['wall_s']:.1f}"])
            print(_common.fmt_table(["policy", "prompt tokens", "prefilled tokens", "wall s"], rows), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("wrote", _common.write_json(args.out, result))


if __name__ == "__main__":
    main()
