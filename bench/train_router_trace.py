#!/usr/bin/env python3
"""A realistic routing trace for the bank benchmarks: briefly train a 128-expert top-8 ``qwen3_moe`` and record
which experts its routers pick on held-out text.

Random checkpoints do not route like trained ones (a random router is either near-uniform or collapsed onto a few
experts), so hit rates measured on them are a floor or a fantasy. This script trains, for a couple of minutes on
one GPU, a small model of mlx-lm's own ``qwen3_moe`` class (``mlx_lm.models.qwen3_moe.Model``: the routers,
softmax, top-k and ``norm_topk_prob`` are mlx-lm's code) with the expert count and top-k of Qwen3-30B-A3B (128,
top-8) and 16 MoE layers (the ``a3b_l16`` checkpoint of bench/p2_streaming.py), then writes the routing of held-out
text as a ``mach trace`` file (``mach_runtime.analysis.trace_replay.RoutingTrace``, gzip JSON). Nothing of it ships:
the trace is committed under bench/traces/ and replayed by bench/p2_streaming.py ``--trace`` and
bench/trace_stats.py.

* Data: the demo model's corpus (``examples/prepare_demo_corpus.py --reuse-tokenizer``: the stdlib's ``.py``
  files, split by file name, encoded with the demo model's byte-level BPE tokenizer, vocab 8192) as one ``.npz``
  with ``train`` and ``heldout`` uint16 arrays (``--data``; ``--prepare`` builds it here).
* Model: hidden ``--hidden`` (256), 4 query / 2 KV heads of 64, ``--moe-inter`` (96) wide SwiGLU experts, tied
  embeddings; every weight matrix initialised N(0, 0.02) as transformers initialises Qwen3-MoE.
* Loss: next-token cross-entropy plus ``--aux-coef`` (0.01) x the router load-balancing loss of transformers'
  ``load_balancing_loss_func`` (E * sum_e f_e * P_e: f_e the share of top-k selections, P_e the mean router
  probability), computed per layer over the whole batch and averaged over layers (the global-batch form Qwen
  trains with; transformers' version pools all layers, which balances expert indices across the model but lets a
  single layer collapse).
* Optimiser: AdamW (0.9, 0.95, weight decay 0.1), ``--lr`` with linear warm-up and cosine decay to 10 %, gradient
  clipping 1.0; the whole step is one ``mx.compile``d function.
* Budget: training stops ``--train-seconds`` after the first (compiling) step; the schedule's length is fitted to
  that budget from the measured step time (``--steps`` caps it).
* Trace: ``--trace-seqs`` windows of ``--trace-len`` held-out tokens, evenly spread over the held-out stream, each
  run as one causal forward (each token is routed exactly as in token-by-token decoding, up to rounding); the
  router's top-k at every (token, MoE layer) is one trace step, token-major (token t: layer 0 .. L-1), one segment
  per window. The same windows give the held-out cross-entropy. The untrained model's routing of the same windows
  is recorded too (``trace_init``) as a baseline.

Writes OUT/train_log.json (configuration, steps, tokens, loss curve, timings, held-out CE) and
OUT/<name>.json.gz (the trace) plus OUT/<name>_init.json.gz.

    python bench/train_router_trace.py --prepare .data/corpus.npz            # here: tokenize the corpus
    python bench/train_router_trace.py --data .data/corpus.npz --out $OUT     # on the GPU (~3 minutes)
    python bench/train_router_trace.py --data ... --out /tmp/t --tiny         # CPU smoke test of every step
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TRACE_NAME = "qwen3moe_e128k8_l16_stdlib"


def prepare(out: Path) -> None:
    """Tokenizes the demo corpus with the demo tokenizer (examples/prepare_demo_corpus.py) into one .npz."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, str(REPO / "examples" / "prepare_demo_corpus.py"), "--reuse-tokenizer",
                        "--out", tmp], check=True)
        manifest = json.loads((Path(tmp) / "manifest.json").read_text())
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out, train=np.load(Path(tmp) / "train.npy"), heldout=np.load(Path(tmp) / "heldout.npy"),
                            manifest=np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8))
    print(f"[prepare] {out}: {out.stat().st_size / 2**20:.1f} MiB, tokens {manifest['tokens']}")


def model_config(a) -> dict:
    return {
        "model_type": "qwen3_moe", "hidden_size": a.hidden, "num_hidden_layers": a.layers,
        "intermediate_size": 3 * a.hidden, "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads,
        "head_dim": a.head_dim, "num_experts": a.experts, "num_experts_per_tok": a.top_k,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "moe_intermediate_size": a.moe_inter,
        "rms_norm_eps": 1e-6, "vocab_size": a.vocab, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "max_position_embeddings": max(a.seq, a.trace_len), "norm_topk_prob": True, "router_aux_loss_coef": a.aux_coef,
    }


def build_model(cfg: dict, seed: int):
    """mlx-lm's qwen3_moe at ``cfg``, weights N(0, 0.02) (norms 1), each router replaced by a ``RouterTap``."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import qwen3_moe

    class RouterTap(nn.Linear):
        """The router (``mlp.gate``, an ``nn.Linear`` under the same parameter path) that also hands its logits
        to ``LOGITS`` (a module-level list, not part of the module tree) for the load-balancing loss and the
        trace. The MoE block computes from its output exactly as from the original router's."""

        def __call__(self, x):
            y = super().__call__(x)
            LOGITS.append(y)
            return y

    mx.random.seed(seed)
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(cfg))
    for layer in model.model.layers:
        layer.mlp.gate = RouterTap(cfg["hidden_size"], cfg["num_experts"], bias=False)
    params = []
    for name, p in tree_flatten(model.parameters()):
        if p.ndim >= 2:
            p = 0.02 * mx.random.normal(p.shape, dtype=mx.float32)
        params.append((name, p))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


LOGITS: list = []  # router logits of the forward in progress, one [..., E] array per MoE layer in model order


def topk_experts(logits, k: int):
    """The experts mlx-lm's Qwen3MoeSparseMoeBlock routes to for these router logits (its exact ops)."""
    import mlx.core as mx

    gates = mx.softmax(logits, axis=-1, precise=True)
    return mx.argpartition(gates, kth=-k, axis=-1)[..., -k:]


def load_balancing_loss(logits, k: int):
    """transformers' load_balancing_loss_func for one layer: E * sum_e f_e * P_e, f_e = share of the top-k
    selections that went to expert e (no gradient), P_e = mean router probability of e."""
    import mlx.core as mx

    E = logits.shape[-1]
    flat = logits.reshape(-1, E)
    probs = mx.softmax(flat.astype(mx.float32), axis=-1)
    sel = mx.stop_gradient(topk_experts(flat, k))
    f = mx.zeros((E,), dtype=mx.float32).at[sel.reshape(-1)].add(1.0) / flat.shape[0]
    return E * mx.sum(f * probs.mean(axis=0))


def lr_at(step: int, total: int, a) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    p = min(1.0, (step - a.warmup) / max(1, total - a.warmup))
    return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def heldout_windows(held: np.ndarray, n: int, length: int) -> np.ndarray:
    """``n`` windows of ``length + 1`` tokens evenly spread over the held-out stream (inputs and targets)."""
    if held.size < n * (length + 1):
        raise SystemExit(f"the held-out stream has {held.size} tokens, fewer than {n} x {length + 1}")
    stride = (held.size - length - 1) // max(1, n - 1) if n > 1 else 0
    return np.stack([held[i * stride: i * stride + length + 1] for i in range(n)]).astype(np.int32)


def record_trace(model, windows: np.ndarray, k: int, layers: int, cfg: dict, meta: dict):
    """Routing of every window (one causal forward each), as a RoutingTrace; also the windows' mean CE."""
    import mlx.core as mx
    import mlx.nn as nn

    from mach_runtime.analysis.trace_replay import RoutingTrace

    steps, nll, n = [], 0.0, 0
    for w in windows:
        LOGITS.clear()
        x = mx.array(w[None, :-1])
        logits = model(x)
        ce = nn.losses.cross_entropy(logits.astype(mx.float32), mx.array(w[None, 1:]), reduction="sum")
        inds = mx.stack([topk_experts(lg[0], k) for lg in LOGITS])  # [layers, T, k]
        mx.eval(ce, inds)
        nll += float(ce.item())
        n += w.size - 1
        per = np.sort(np.array(inds), axis=-1)
        for t in range(per.shape[1]):
            steps.extend((layer, tuple(int(e) for e in per[layer, t])) for layer in range(layers))
    LOGITS.clear()
    T = windows.shape[1] - 1
    meta = dict(meta, heldout_ce=nll / n, heldout_ppl=math.exp(nll / n), model_config=cfg)
    trace = RoutingTrace(num_experts=cfg["num_experts"], top_k=k, layers=list(range(layers)), steps=steps,
                         granularity="token", segments=[i * T for i in range(len(windows))], meta=meta)
    return trace, nll / n


def train(a) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    t_start = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    d = np.load(a.data)
    train_ids, held = d["train"], d["heldout"]
    manifest = json.loads(bytes(d["manifest"]).decode()) if "manifest" in d.files else {}
    cfg = model_config(a)
    k, L = a.top_k, a.layers
    info = {"device": str(mx.default_device()), "mlx": mx.__version__}
    try:
        info["device_name"] = mx.device_info().get("device_name", "?")
    except Exception:  # noqa: BLE001 - older MLX
        pass
    print(f"[train] {info}; train tokens {train_ids.size:,}, held-out {held.size:,}", flush=True)

    model = build_model(cfg, a.seed)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    expert_params = L * 3 * a.experts * a.hidden * a.moe_inter
    active = n_params - expert_params + L * 3 * k * a.hidden * a.moe_inter
    print(f"[train] params {n_params:,} (experts {expert_params:,}; active per token ~{active:,})", flush=True)
    windows = heldout_windows(held, a.trace_seqs, a.trace_len)
    src = (f"stdlib held-out split ({manifest.get('heldout_rule', 'sha1(relpath)[0] < 8')}, Python "
           f"{manifest.get('python', '?')}), demo tokenizer; {a.trace_seqs} windows of {a.trace_len} tokens evenly "
           "spread over the split, each one causal forward")
    base_meta = {"source": src, "recorded_from": "bench/train_router_trace.py", "device": info}

    init_trace, init_ce = record_trace(model, windows, k, L, cfg, dict(base_meta, trained=False))
    init_trace.save(out / f"{a.name}_init.json.gz")
    print(f"[train] untrained routing recorded (held-out CE {init_ce:.3f})", flush=True)
    del model  # the trainer builds its own, from the same seed

    def make_trainer(compiled: bool):
        model = build_model(cfg, a.seed)
        opt = optim.AdamW(learning_rate=a.lr, betas=[0.9, 0.95], weight_decay=0.1)
        opt.init(model.trainable_parameters())  # the state exists before the compiled step captures it

        def loss_fn(model, x, y):
            LOGITS.clear()
            logits = model(x)
            ce = nn.losses.cross_entropy(logits.astype(mx.float32), y, reduction="mean")
            aux = sum(load_balancing_loss(lg, k) for lg in LOGITS) / len(LOGITS)
            LOGITS.clear()
            return ce + a.aux_coef * aux, ce, aux

        loss_and_grad = nn.value_and_grad(model, loss_fn)
        state = [model.state, opt.state]

        def step_fn(x, y):
            (loss, ce, aux), grads = loss_and_grad(model, x, y)
            grads, gnorm = optim.clip_grad_norm(grads, 1.0)
            opt.update(model, grads)
            return loss, ce, aux, gnorm

        return model, opt, state, (mx.compile(step_fn, inputs=state, outputs=state) if compiled else step_fn)

    compiled = not a.no_compile
    model, opt, state, step = make_trainer(compiled)
    rng = np.random.default_rng(a.seed)

    def batch():
        off = rng.integers(0, train_ids.size - a.seq - 1, size=a.batch)
        w = np.stack([train_ids[o: o + a.seq + 1] for o in off]).astype(np.int32)
        return mx.array(w[:, :-1]), mx.array(w[:, 1:])

    log = []
    total = a.steps
    t0 = time.perf_counter()
    t_first = t_cal = None
    i = 0
    ema = None
    while i < total:
        opt.learning_rate = lr_at(i, total, a)
        x, y = batch()
        try:
            loss, ce, aux, gnorm = step(x, y)
            mx.eval(loss, state)
        except Exception as e:  # noqa: BLE001 - a compile failure must not cost the GPU run: retry uncompiled
            if i or not compiled:
                raise
            print(f"[train] compiled step failed ({type(e).__name__}: {e}); training uncompiled", flush=True)
            compiled = False
            model, opt, state, step = make_trainer(False)
            opt.learning_rate = lr_at(i, total, a)
            loss, ce, aux, gnorm = step(x, y)
            mx.eval(loss, state)
        i += 1
        now = time.perf_counter()
        if i == 1:
            t_first = now - t0
            print(f"[train] first step (compile + kernel JIT) {t_first:.1f}s", flush=True)
        if i == a.calibrate_from:
            t_cal = now
        if i == a.calibrate_from + a.calibrate_steps:
            per_step = (now - t_cal) / a.calibrate_steps
            left = a.train_seconds - (now - t0 - t_first)
            total = max(i + 1, min(a.steps, i + int(left / per_step)))
            print(f"[train] {per_step * 1e3:.1f} ms/step ({a.batch * a.seq / per_step:,.0f} tok/s) -> {total} steps "
                  f"in a {a.train_seconds:.0f}s budget", flush=True)
        if i % a.log_every == 0 or i == total:
            c, x_aux = float(ce.item()), float(aux.item())
            ema = c if ema is None else 0.9 * ema + 0.1 * c
            rec = {"step": i, "ce": c, "ce_ema": ema, "aux": x_aux, "grad_norm": float(gnorm.item()),
                   "lr": lr_at(i - 1, total, a), "t": now - t0}
            log.append(rec)
            if i % (a.log_every * 10) == 0 or i == total:
                print(f"[train] step {i}/{total} ce {c:.3f} (ema {ema:.3f}) aux {x_aux:.3f} lr {rec['lr']:.2e} "
                      f"{now - t0:.0f}s", flush=True)
        if now - t_start > a.deadline:
            print(f"[train] deadline {a.deadline:.0f}s reached at step {i}", flush=True)
            break
    train_s = time.perf_counter() - t0
    tokens_seen = i * a.batch * a.seq

    trace, held_ce = record_trace(model, windows, k, L, cfg, dict(
        base_meta, trained=True, steps=i, tokens_seen=tokens_seen, train_seconds=train_s,
        final_train_ce_ema=ema))
    path = trace.save(out / f"{a.name}.json.gz")
    print(f"[train] trace: {trace.tokens} tokens x {L} layers -> {path} ({path.stat().st_size / 2**20:.2f} MiB); "
          f"held-out CE {held_ce:.3f} (untrained {init_ce:.3f})", flush=True)
    summary = {
        "device": info, "model_config": cfg, "params": n_params, "expert_params": expert_params,
        "active_params_per_token": active, "steps": i, "batch": a.batch, "seq": a.seq,
        "tokens_seen": tokens_seen, "train_tokens": int(train_ids.size),
        "epochs": tokens_seen / train_ids.size, "heldout_tokens": int(held.size),
        "hyper": {"lr": a.lr, "warmup": a.warmup, "min_lr_frac": 0.1, "weight_decay": 0.1, "betas": [0.9, 0.95],
                  "clip": 1.0, "aux_coef": a.aux_coef, "aux_form": "per layer over the batch, mean of layers",
                  "seed": a.seed, "train_seconds_budget": a.train_seconds, "compiled": compiled},
        "first_step_seconds": t_first, "train_seconds": train_s, "wall_seconds": time.perf_counter() - t_start,
        "trace": {"file": path.name, "windows": a.trace_seqs, "window_tokens": a.trace_len,
                  "heldout_ce": held_ce, "untrained_heldout_ce": init_ce},
        "corpus": {k2: v for k2, v in manifest.items() if k2 != "heldout_files"},
        "log": log,
    }
    (out / "train_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k2: v for k2, v in summary.items() if k2 not in ("log", "model_config", "corpus")}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepare", type=Path, help="tokenize the demo corpus into this .npz and exit")
    p.add_argument("--data", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--name", default=TRACE_NAME)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--moe-inter", type=int, default=96)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--aux-coef", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=100000, help="at most this many steps")
    p.add_argument("--train-seconds", type=float, default=110.0, help="training budget after the first step")
    p.add_argument("--deadline", type=float, default=1e9, help="stop training this long after the script started")
    p.add_argument("--calibrate-from", type=int, default=3)
    p.add_argument("--calibrate-steps", type=int, default=10)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--trace-seqs", type=int, default=8)
    p.add_argument("--trace-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: 2 layers, 16 experts top-4, a few steps")
    a = p.parse_args()
    if a.prepare:
        return prepare(a.prepare)
    if not (a.data and a.out):
        p.error("--data and --out are required (or --prepare)")
    if a.tiny:
        a.layers, a.hidden, a.heads, a.kv_heads, a.head_dim, a.experts, a.top_k, a.moe_inter = 2, 64, 2, 1, 32, 16, 4, 32
        a.seq, a.batch, a.steps, a.warmup, a.trace_seqs, a.trace_len, a.log_every = 64, 4, 20, 5, 2, 64, 5
        a.calibrate_steps = 5
    train(a)


if __name__ == "__main__":
    main()
