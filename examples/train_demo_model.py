#!/usr/bin/env python3
"""Step 2 of the demo model's recipe: train the bundled qwen3_moe demo model (PyTorch + transformers, one GPU).

    python examples/prepare_demo_corpus.py                  # step 1, on any machine: tokenizer + .train/*.npy
    python examples/train_demo_model.py --data .train --tokenizer-dir mach_runtime/assets/demo-qwen3-moe \
        --out OUT_DIR            # 1300 steps; about 3.5 minutes of an H100

Trains ``Qwen3MoeForCausalLM`` from scratch (seed 0) on the packed stdlib token stream: random 1024-token
windows, AdamW, bf16 autocast over fp32 master weights, linear warm-up then cosine decay, the router's
load-balancing loss on (coefficient ``AUX_COEF``) so every expert is used. At the end it evaluates the shipped
(fp16-rounded) weights in fp32 on the held-out split and on an equal-sized sample of the training split, and
writes OUT_DIR/{config.json, model.safetensors (HF per-expert layout, fp16), tokenizer files, train_log.json}.

``--time-budget S`` makes the run fit a wall-clock budget: after ``CALIBRATE_STEPS`` steps the total step
count becomes min(--steps, S / measured step time) and is printed and logged; replay a run exactly (up to GPU
non-determinism) with ``--steps N --time-budget 0``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEED = 0
# the architecture (see docs/model_card.md for why these numbers)
ARCH = dict(
    vocab_size=8192,
    hidden_size=320,
    num_hidden_layers=8,
    num_attention_heads=5,
    num_key_value_heads=1,
    head_dim=64,
    intermediate_size=1280,  # dense-MLP width (unused: every layer is MoE)
    moe_intermediate_size=32,
    num_experts=32,
    num_experts_per_tok=4,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=True,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=1024,
    attention_bias=False,
    attention_dropout=0.0,
    use_sliding_window=False,
    sliding_window=None,
    tie_word_embeddings=True,
    initializer_range=0.02,
    bos_token_id=None,
    eos_token_id=0,
    pad_token_id=0,
)
AUX_COEF = 0.01  # router load-balancing loss (Switch-style), added to the LM loss
SEQ = 1024
BATCH = 64  # sequences per step: 65,536 tokens
LR = 2e-3
MIN_LR_FRAC = 0.1
WARMUP = 100
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
CLIP = 1.0
CALIBRATE_STEPS = 40
EVAL_EVERY = 250
STEPS = 1300  # ~10 epochs; a 2112-step run overfit past ~1500 steps (held-out CE 1.906 → 1.960)
SHARD_BYTES = 14 * 2**20


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def make_config(experts_impl: str | None):
    import transformers
    from transformers import Qwen3MoeConfig

    kw = dict(ARCH, router_aux_loss_coef=AUX_COEF, architectures=["Qwen3MoeForCausalLM"])
    major = int(transformers.__version__.split(".")[0])
    if major >= 5:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": ARCH["rope_theta"]}
        if experts_impl:
            kw["experts_implementation"] = experts_impl
    return Qwen3MoeConfig(**kw)


def lr_at(step: int, total: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    p = min(1.0, (step - WARMUP) / max(1, total - WARMUP))
    return LR * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * p)))


class Batches:
    """Random SEQ+1 windows of the packed training stream (seeded numpy generator)."""

    def __init__(self, data: torch.Tensor, batch: int, seq: int, seed: int):
        self.data, self.batch, self.seq = data, batch, seq
        self.rng = np.random.default_rng(seed)
        self.ar = torch.arange(seq + 1, device=data.device)

    def next(self) -> torch.Tensor:
        off = torch.from_numpy(self.rng.integers(0, self.data.numel() - self.seq - 1, size=self.batch))
        return self.data[off.to(self.data.device)[:, None] + self.ar]


def lm_losses(model, x: torch.Tensor, dev_type: str, autocast: bool):
    """(total loss, CE, aux) for a batch of windows x[B, SEQ+1]."""
    with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=x[:, :-1], output_router_logits=True, use_cache=False)
    logits = out.logits.float()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    aux = out.aux_loss.float() if out.aux_loss is not None else torch.zeros((), device=x.device)
    return ce + AUX_COEF * aux, ce, aux


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq: int, batch: int, dev_type: str, autocast: bool) -> float:
    """Mean next-token CE over non-overlapping windows of ``stream`` (every token predicted once)."""
    model.eval()
    n = (stream.numel() - 1) // seq
    tot, cnt = 0.0, 0
    for i in range(0, n, batch):
        idx = torch.arange(i, min(n, i + batch), device=stream.device)[:, None] * seq
        x = stream[idx + torch.arange(seq + 1, device=stream.device)]
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        tot += float(ce)
        cnt += x[:, 1:].numel()
    model.train()
    return tot / cnt


def pick_experts_impl(data, dev, dev_type, autocast, batch, seq) -> str | None:
    """The fastest experts implementation that runs forward+backward here (transformers 5), else None."""
    import transformers
    from transformers import Qwen3MoeForCausalLM

    if int(transformers.__version__.split(".")[0]) < 5:
        return None
    best, best_t = None, math.inf
    for impl in ("grouped_mm", "eager"):
        try:
            seed_all(SEED)
            m = Qwen3MoeForCausalLM(make_config(impl)).to(dev)
            b = Batches(data, batch, seq, 1234)
            times = []
            for _ in range(4):
                t0 = time.perf_counter()
                loss, _, _ = lm_losses(m, b.next(), dev_type, autocast)
                loss.backward()
                if dev_type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            t = min(times[1:])
            print(f"[train] experts_implementation={impl}: {t * 1000:.1f} ms/step (batch {batch}x{seq})", flush=True)
            if t < best_t:
                best, best_t = impl, t
            del m
        except Exception as e:  # an implementation this torch/GPU cannot run
            print(f"[train] experts_implementation={impl} unavailable: {type(e).__name__}: {e}", flush=True)
    return best


def per_expert_state(model, moe_inter: int) -> dict[str, torch.Tensor]:
    """fp16 state dict in the HF hub's per-expert layout (fused transformers-5 expert tensors split)."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu", torch.float16)
        if name == "lm_head.weight" and ARCH["tie_word_embeddings"]:
            continue
        if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H]: rows [0:I] gate, [I:2I] up
            pre = name[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                out[f"{pre}{e}.gate_proj.weight"] = t[e, :moe_inter].contiguous()
                out[f"{pre}{e}.up_proj.weight"] = t[e, moe_inter:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):  # [E, H, I]
            pre = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{pre}{e}.down_proj.weight"] = t[e].contiguous()
        else:
            out[name] = t.contiguous()
    return out


def save_sharded(state: dict, out: Path, save_file) -> None:
    """HF sharded safetensors (model-0000i-of-0000n.safetensors + model.safetensors.index.json), keys sorted,
    each shard at most SHARD_BYTES (so every file stays small enough to move around)."""
    shards, cur, size = [], {}, 0
    for k in sorted(state):
        nb = state[k].numel() * state[k].element_size()
        if cur and size + nb > SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = state[k]
        size += nb
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def hf_config_json(steps: int) -> dict:
    import transformers

    cfg = dict(ARCH)
    cfg.update(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        rope_parameters={"rope_type": "default", "rope_theta": ARCH["rope_theta"]},
        router_aux_loss_coef=AUX_COEF,
        output_router_logits=False,
        use_cache=True,
        dtype="float16",
        torch_dtype="float16",
        transformers_version=transformers.__version__,
    )
    return dict(sorted(cfg.items()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=".train")
    ap.add_argument("--tokenizer-dir", default="mach_runtime/assets/demo-qwen3-moe")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--time-budget", type=float, default=0.0, help="seconds of training; 0 = run --steps")
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--seq", type=int, default=SEQ)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--eval-tokens", type=int, default=0, help="cap the eval streams (0 = whole held-out split)")
    a = ap.parse_args()

    import transformers
    from transformers import Qwen3MoeForCausalLM

    t_start = time.time()
    dev = torch.device(a.device)
    dev_type = dev.type
    autocast = dev_type == "cuda"
    if dev_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f"[train] {torch.cuda.get_device_name(0)} torch {torch.__version__} transformers "
              f"{transformers.__version__}", flush=True)
    data_dir = Path(a.data)
    train = torch.from_numpy(np.load(data_dir / "train.npy").astype(np.int64)).to(dev)
    held = torch.from_numpy(np.load(data_dir / "heldout.npy").astype(np.int64)).to(dev)
    if a.eval_tokens:
        held = held[: a.eval_tokens]
    # an equal-sized sample of the training stream for a like-for-like train loss
    g = np.random.default_rng(SEED + 1)
    n_win = (held.numel() - 1) // a.seq
    offs = np.sort(g.integers(0, train.numel() - a.seq - 1, size=n_win))
    train_sample = torch.cat([train[o : o + a.seq] for o in offs] + [train[offs[-1] + a.seq : offs[-1] + a.seq + 1]])
    print(f"[train] train tokens {train.numel():,}, held-out tokens {held.numel():,}", flush=True)

    impl = pick_experts_impl(train, dev, dev_type, autocast, a.batch, a.seq)
    seed_all(SEED)
    model = Qwen3MoeForCausalLM(make_config(impl)).to(dev)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[train] params {n_params:,} (experts_implementation={impl})", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, betas=BETAS, fused=dev_type == "cuda",
    )
    batches = Batches(train, a.batch, a.seq, SEED)
    total = a.steps
    log, curve = [], []
    run_ce = run_aux = 0.0
    t0 = time.perf_counter()
    t_cal = None
    step = 0
    while step < total:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total)
        loss, ce, aux = lm_losses(model, batches.next(), dev_type, autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        step += 1
        if step % 10 == 0 or step == total:
            c, x = float(ce.detach()), float(aux.detach())
            run_ce = c if not log else 0.9 * run_ce + 0.1 * c
            run_aux = x if not log else 0.9 * run_aux + 0.1 * x
            log.append({"step": step, "ce": c, "aux": x, "lr": lr_at(step - 1, total), "t": time.perf_counter() - t0})
        if step == 10 and dev_type == "cuda":
            torch.cuda.synchronize()
            t_cal = time.perf_counter()
        if a.time_budget and step == CALIBRATE_STEPS:
            if dev_type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.perf_counter() - (t_cal or t0)) / (CALIBRATE_STEPS - (10 if t_cal else 0))
            total = max(CALIBRATE_STEPS + 1, min(a.steps, int(a.time_budget / per_step)))
            print(f"[train] {per_step * 1000:.1f} ms/step → total steps {total} for a {a.time_budget:.0f}s budget",
                  flush=True)
        if step % EVAL_EVERY == 0 or step == total:
            h = evaluate(model, held, a.seq, 32, dev_type, autocast)
            curve.append({"step": step, "heldout_ce": h, "train_ce_ema": run_ce})
            print(f"[train] step {step}/{total} ce {run_ce:.4f} aux {run_aux:.4f} held-out {h:.4f} "
                  f"lr {lr_at(step - 1, total):.2e} {time.perf_counter() - t0:.0f}s", flush=True)
    train_s = time.perf_counter() - t0

    # evaluate exactly the weights that ship: fp16-rounded, computed in fp32
    model = model.to(torch.float16).to(torch.float32)
    held_ce = evaluate(model, held, a.seq, 32, dev_type, False)
    train_ce = evaluate(model, train_sample, a.seq, 32, dev_type, False)
    print(f"[train] final (fp16 weights, fp32 math): train CE {train_ce:.4f} (ppl {math.exp(train_ce):.2f}), "
          f"held-out CE {held_ce:.4f} (ppl {math.exp(held_ce):.2f}); {step} steps in {train_s:.0f}s", flush=True)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    state = per_expert_state(model, ARCH["moe_intermediate_size"])
    save_sharded(state, out, save_file)
    (out / "config.json").write_text(json.dumps(hf_config_json(step), indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(a.tokenizer_dir) / f, out / f)
    summary = {
        "device": torch.cuda.get_device_name(0) if dev_type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "experts_implementation": impl,
        "params": n_params,
        "steps": step,
        "batch": a.batch,
        "seq": a.seq,
        "tokens_seen": step * a.batch * a.seq,
        "train_tokens": int(train.numel()),
        "epochs": step * a.batch * a.seq / train.numel(),
        "heldout_tokens": int(held.numel()),
        "hyper": {"lr": LR, "min_lr_frac": MIN_LR_FRAC, "warmup": WARMUP, "weight_decay": WEIGHT_DECAY,
                  "betas": BETAS, "clip": CLIP, "aux_coef": AUX_COEF, "seed": SEED, "time_budget": a.time_budget},
        "train_seconds": train_s,
        "wall_seconds": time.time() - t_start,
        "final": {"train_ce": train_ce, "heldout_ce": held_ce, "train_ppl": math.exp(train_ce),
                  "heldout_ppl": math.exp(held_ce)},
        "curve": curve,
        "log": log,
    }
    (out / "train_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("log", "curve")}, indent=1), flush=True)


if __name__ == "__main__":
    main()
