#!/usr/bin/env python3
"""Trains the DFlash block draft bundled with the demo model (MLX; one GPU, or a tiny CPU smoke run).

    python examples/prepare_demo_corpus.py        # once, here: tokenizer-matched .train/{train,heldout}.npy
    mkdir -p .train_draft && python -c "import numpy as np; np.savez_compressed('.train_draft/tokens.npz', \
        train=np.load('.train/train.npy'), heldout=np.load('.train/heldout.npy'))"   # 5.7 MB to carry
    # 1. train, on the GPU machine (carry .gpu and .train_draft; ~8.5 minutes of an H100):
    bash .gpu/setup.sh && export PYTHONPATH=/tmp/site:$PWD && python3 examples/train_demo_draft.py \
        --data .train_draft --out $OUT/demo-qwen3-moe-dflash --time-budget 300 --gen-budget 70 --deadline 540 \
        --steps 20000                     # the shipped run calibrated to 7111 steps: replay with --steps 7111
    # 2. export for the 30 MB asset budget (attention 8-bit, MLP 4-bit, the rest float32), here:
    python examples/train_demo_draft.py --export FP16_DIR --bits 8 --mlp-bits 4 \
        --out mach_runtime/assets/demo-qwen3-moe-dflash
    # 3. acceptance with the real engine on held-out prompts, here (CPU):
    python examples/train_demo_draft.py --measure mach_runtime/assets/demo-qwen3-moe-dflash --out m.json
    python examples/train_demo_draft.py --smoke --out /tmp/draft_smoke   # CPU, 3 min: shapes, parity, loss falls

The draft is dflash-mlx's ``DFlashDraftModel`` (2 layers, hidden 320 = the target's, no embedding / LM head of its
own), conditioned on the frozen target's hidden states after layers ``TARGET_LAYER_IDS``.

What it is trained on is exactly what ``mach_runtime.engine.specdec`` shows it at inference (``DFlashDrafter``):
at a cycle whose staged (committed, not yet fed) token is x_p at position p, the draft's context is the target's
tapped hidden states of tokens 0..p-1 (everything fed so far), projected by ``fc`` + ``hidden_norm`` and turned
into K/V (RoPE at absolute positions 0..p-1) in every draft layer; the block ``[x_p, MASK x 15]`` sits at positions
p..p+15, its queries attend to that context and bidirectionally within the block; the outputs at block positions
1..15 go through the target's (tied) LM head. Training packs ``--anchors`` such blocks per sequence into one
forward with an attention mask that gives each block exactly its own context (keys j < p) and its own block; the
loss is the cross-entropy at block position k against x_{p+k}, weighted exp(-(k-1)/GAMMA) (DFlash's decay: the
early positions decide the acceptance length). At start-up ``check_parity`` verifies on one block (with two
overlapping neighbour blocks packed beside it) that this packed training forward equals
``DFlashDrafter.draft_logits`` (the engine's path); the run aborts otherwise.

Data (``--gen-frac`` of each batch): greedy continuations of the TARGET itself (the draft must predict what the
target will emit under greedy verification, not the corpus): random ``PROMPT``-token windows of the training
stream, continued greedily by the target for ``GEN`` tokens at the start of the run (time-bounded); the rest of
each batch is raw training-stream windows. Anchors of generated rows lie in the generated part.

Evaluation: the "proxy acceptance" tau = 1 + mean leading-correct draft tokens per block, over anchors every 8
tokens of greedy continuations of HELD-OUT prompts. It weights every position equally, whereas the engine's
cycles start where the previous one failed (easy stretches are consumed in a few long cycles), so it reads high
(8.5 against the engine's 3.9 for the shipped draft): the number to quote is ``--measure``'s, the real
``BlockSpecDecEngine`` (greedy, NATIVE_V7, block 16, fixed policy), which also checks losslessness against
TARGET_ONLY.

Writes ``--out``/{config.json, model.safetensors (fp16), train_log.json}. Reproducible: seeds fixed; with
``--time-budget`` the step count is calibrated from the measured step time and logged (replay with
``--steps N --time-budget 0``; GPU kernels are not bit-deterministic).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

SEED = 0
BLOCK = 16
# early / middle / last of the 8 target layers (the last carries the most next-token signal)
TARGET_LAYER_IDS = [1, 4, 7]
MASK_TOKEN = "<|im_end|>"  # a special token that never occurs in the stdlib corpus
DRAFT_ARCH = dict(
    model_type="qwen3",
    hidden_size=320,  # = the target's (the draft borrows its embedding and LM head)
    num_hidden_layers=2,
    intermediate_size=1280,
    num_attention_heads=5,
    num_key_value_heads=5,
    head_dim=64,
    rms_norm_eps=1e-6,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    tie_word_embeddings=False,  # no head of its own: the engine uses the target's
    attention_bias=False,
    block_size=BLOCK,
)
GAMMA = 7.0  # loss weight of block position k: exp(-(k-1)/GAMMA)
PROMPT = 128  # generated rows: prompt tokens (training-stream window) ...
GEN = 384  # ... + greedy target continuation → sequences of PROMPT + GEN = 512 tokens
SEQ = PROMPT + GEN
BATCH = 32  # sequences per step
ANCHORS = 32  # blocks per sequence per step
GEN_FRAC = 0.75  # share of each batch from the target's greedy continuations
GEN_BATCH = 256  # prompts decoded together
EVAL_PROMPTS = 32  # held-out prompts (continued greedily in the first generation batch)
LR = 1.5e-3
MIN_LR_FRAC = 0.1
WARMUP = 60
WEIGHT_DECAY = 0.01
BETAS = (0.9, 0.95)
CLIP = 1.0
CALIBRATE_STEPS = 30
LOG_EVERY = 25
STEPS = 3000


# -- models ------------------------------------------------------------------------------------------------
def make_draft(vocab: int, num_target_layers: int, mask_token_id: int, arch: dict):
    from dflash_mlx.model import DFlashDraftModel, DFlashDraftModelArgs

    args = DFlashDraftModelArgs.from_dict(dict(
        arch, vocab_size=vocab, num_target_layers=num_target_layers,
        dflash_config={"mask_token_id": mask_token_id, "target_layer_ids": list(TARGET_LAYER_IDS)},
    ))
    model = DFlashDraftModel(args)
    model.set_dtype(mx.float32)
    return model


def target_features(inner, x: mx.array, layer_ids) -> mx.array:
    """The frozen target's hidden states after ``layer_ids`` (concatenated) for token rows x [B, T] (causal)."""
    from mlx_lm.models.base import create_attention_mask

    h = inner.embed_tokens(x)
    mask = create_attention_mask(h, None)
    outs = {}
    for i, layer in enumerate(inner.layers[: max(layer_ids) + 1]):
        h = layer(h, mask, None)
        if i in layer_ids:
            outs[i] = h
    return mx.stop_gradient(mx.concatenate([outs[i] for i in layer_ids], axis=-1))


def _rope_blocks(rope, t: mx.array, B: int, M: int, anchors_flat: mx.array) -> mx.array:
    """t [B, M*BLOCK, heads, d] → RoPE'd [B, heads, M*BLOCK, d], block m at positions anchor_m .. anchor_m+15."""
    heads, d = t.shape[2], t.shape[3]
    t = t.reshape(B * M, BLOCK, heads, d).transpose(0, 2, 1, 3)
    t = rope(t, offset=anchors_flat)
    return t.reshape(B, M, heads, BLOCK, d).transpose(0, 2, 1, 3, 4).reshape(B, heads, M * BLOCK, d)


def draft_hidden(draft, embed, hid: mx.array, tokens: mx.array, anchors: mx.array) -> mx.array:
    """Packed training forward: the draft's final hidden states [B, M, BLOCK, H] for M blocks per row.

    hid [B, T, n*H] target features; tokens [B, T]; anchors [B, M] (block m = [x_p, MASK x 15] at p = anchor,
    attending to context keys j < p and to its own block), as DFlashAttention computes one block at inference.
    """
    B, T = tokens.shape
    M = anchors.shape[1]
    Q = M * BLOCK
    ctx = draft.project_target_hidden(hid)  # [B, T, H]
    first = mx.take_along_axis(tokens, anchors, axis=1)  # [B, M]
    blk = mx.concatenate([first[..., None], mx.full((B, M, BLOCK - 1), draft.mask_token_id, dtype=tokens.dtype)], -1)
    x = embed(blk.reshape(B, Q)) * draft.embed_scale
    anchors_flat = anchors.reshape(-1)
    q_block = mx.repeat(anchors, BLOCK, axis=1)  # [B, Q] the anchor of each query
    ctx_mask = mx.arange(T)[None, None, :] < q_block[:, :, None]  # [B, Q, T]
    bid = mx.arange(Q) // BLOCK
    blk_mask = mx.broadcast_to((bid[:, None] == bid[None, :])[None], (B, Q, Q))
    mask = mx.concatenate([ctx_mask, blk_mask], axis=-1)[:, None]  # [B, 1, Q, T + Q]
    for layer in draft.layers:
        a = layer.self_attn
        xn = layer.input_layernorm(x)
        q = _rope_blocks(a.rope, a.q_norm(a.q_proj(xn).reshape(B, Q, a.n_heads, -1)), B, M, anchors_flat)
        kb = _rope_blocks(a.rope, a.k_norm(a.k_proj(xn).reshape(B, Q, a.n_kv_heads, -1)), B, M, anchors_flat)
        vb = a.v_proj(xn).reshape(B, Q, a.n_kv_heads, -1).transpose(0, 2, 1, 3)
        kc = a.rope(a.k_norm(a.k_proj(ctx).reshape(B, T, a.n_kv_heads, -1)).transpose(0, 2, 1, 3), offset=0)
        vc = a.v_proj(ctx).reshape(B, T, a.n_kv_heads, -1).transpose(0, 2, 1, 3)
        keys = mx.concatenate([kc, kb], axis=2)
        values = mx.concatenate([vc, vb], axis=2)
        o = mx.fast.scaled_dot_product_attention(q, keys, values, scale=a.scale, mask=mask)
        x = x + a.o_proj(o.transpose(0, 2, 1, 3).reshape(B, Q, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return draft.norm(x).reshape(B, M, BLOCK, -1)


def block_labels(tokens: mx.array, anchors: mx.array) -> mx.array:
    """x_{p+1} .. x_{p+15} for each anchor p: [B, M, BLOCK-1]."""
    B, M = anchors.shape
    idx = anchors[..., None] + mx.arange(1, BLOCK)[None, None, :]
    return mx.take_along_axis(tokens, idx.reshape(B, -1), axis=1).reshape(B, M, BLOCK - 1)


POS_W = mx.exp(-mx.arange(BLOCK - 1, dtype=mx.float32) / GAMMA)


def loss_fn(draft, embed, hid, tokens, anchors):
    h = draft_hidden(draft, embed, hid, tokens, anchors)[:, :, 1:]
    logits = embed.as_linear(h)
    labels = block_labels(tokens, anchors)
    ce = nn.losses.cross_entropy(logits, labels).mean(axis=(0, 1))  # [15] (one node: see the note below)
    acc = (mx.argmax(mx.stop_gradient(logits), axis=-1) == labels).astype(mx.float32).mean(axis=(0, 1))
    # note: computing ce.mean(...) twice (for the loss and for the aux output) breaks mx.compile of the step
    # (IndexError _Map_base::at in MLX 0.32.4)
    return (ce * POS_W / POS_W.sum()).sum(), (ce, acc)


def proxy_acceptance(draft, embed, inner, rows: np.ndarray, starts: np.ndarray, chunk: int = 8) -> dict:
    """Greedy fixed-block acceptance proxy on rows [N, T]: anchors every 8 tokens from ``starts[i]``; accepted =
    leading draft tokens equal to the row's next tokens (the rows are target-greedy continuations)."""
    T = rows.shape[1]
    acc_len, pos_acc, n = [], np.zeros(BLOCK - 1), 0
    for i in range(0, len(rows), chunk):
        r = rows[i : i + chunk]
        s = int(starts[i])
        anchors = np.arange(s, T - BLOCK + 1, 8)
        tok = mx.array(r.astype(np.int32))
        an = mx.array(np.broadcast_to(anchors, (len(r), len(anchors))).astype(np.int32))
        hid = target_features(inner, tok, TARGET_LAYER_IDS)
        h = draft_hidden(draft, embed, hid.astype(draft.fc.weight.dtype), tok, an)[:, :, 1:]
        pred = mx.argmax(embed.as_linear(h.astype(mx.float32)), axis=-1)
        ok = np.array(pred == block_labels(tok, an))  # [b, M, 15]
        lead = np.cumprod(ok, axis=-1).sum(-1)
        acc_len.append(lead.reshape(-1))
        pos_acc += ok.reshape(-1, BLOCK - 1).sum(0)
        n += ok.shape[0] * ok.shape[1]
    acc_len = np.concatenate(acc_len)
    return {"tau": float(1 + acc_len.mean()), "blocks": int(n), "pos_acc": [round(float(a), 4) for a in pos_acc / n]}


# -- data ----------------------------------------------------------------------------------------------------
def greedy_continue(model, prompts: np.ndarray, gen: int, deadline: float) -> np.ndarray:
    """Greedy continuations of equal-length prompts [N, P] by the target (batched, KV cache); stops early at
    ``deadline`` (time.perf_counter()) and returns prompt + what was generated [N, P + g]."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array(prompts.astype(np.int32)), cache=cache)
    tok = mx.argmax(logits[:, -1], axis=-1)
    out = [tok]
    mx.eval(tok)
    for _ in range(gen - 1):
        if time.perf_counter() > deadline:
            break
        logits = model(tok[:, None], cache=cache)
        tok = mx.argmax(logits[:, -1], axis=-1)
        out.append(tok)
        mx.async_eval(tok)
    gen_tok = np.array(mx.stack(out, axis=1)).astype(np.int64)
    return np.concatenate([prompts.astype(np.int64), gen_tok], axis=1)


def load_tokens(d: Path):
    """(train, held-out) token streams from ``prepare_demo_corpus.py``'s folder (train.npy, heldout.npy) or from
    one compressed ``tokens.npz`` with the same two arrays (what travels to the GPU machine: 5.7 MB, not 17)."""
    if (d / "tokens.npz").exists():
        z = np.load(d / "tokens.npz")
        return z["train"].astype(np.int64), z["heldout"].astype(np.int64)
    return np.load(d / "train.npy").astype(np.int64), np.load(d / "heldout.npy").astype(np.int64)


def lr_at(step: int, total: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    p = min(1.0, (step - WARMUP) / max(1, total - WARMUP))
    return LR * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * p)))


def check_parity(model, draft, tokens: np.ndarray, p: int) -> float:
    """Max |packed training logits − DFlashDrafter.draft_logits| for one block at anchor p (the engine's path)."""
    from mach_runtime.engine.specdec.draft import DFlashDrafter
    from mach_runtime.engine.specdec.target import TargetOps
    from mlx_lm.models.cache import make_prompt_cache

    ops = TargetOps(model)
    ops.tap(TARGET_LAYER_IDS)
    drafter = DFlashDrafter(draft, ops)
    drafter.start(list(tokens[:p]))
    cache = make_prompt_cache(model)
    ops.prefill([int(t) for t in tokens[:p]], cache, 512, tuple(TARGET_LAYER_IDS), drafter.observe)
    ref = drafter.draft_logits(int(tokens[p]), BLOCK - 1)
    tok = mx.array(tokens[None].astype(np.int32))
    hid = target_features(ops.inner, tok, TARGET_LAYER_IDS)
    an = mx.array([[max(1, p - 7), p, min(len(tokens) - BLOCK, p + 5)]], dtype=mx.int32)  # neighbours must not leak
    got = ops.inner.embed_tokens.as_linear(draft_hidden(draft, ops.inner.embed_tokens, hid, tok, an)[0, 1, 1:])
    return float(mx.abs(got - ref).max() / (mx.abs(ref).max() + 1e-9))


# -- measurement with the real engine (CPU here) -----------------------------------------------------------------
def measure(target: str, draft_dir: str, n: int, prompt_tokens: int, max_tokens: int) -> dict:
    """Greedy BlockSpecDecEngine NATIVE_V7 (block 16, policy fixed) vs TARGET_ONLY on held-out prompts."""
    from mach_runtime import BlockSpecDecEngine, BlockSpecDecEngineConfig, BlockSpecDecEngineMode
    from mach_runtime.demo_corpus import heldout_prompts

    cfg = BlockSpecDecEngineConfig(mode=BlockSpecDecEngineMode.NATIVE_V7, block_size=BLOCK, policy="fixed")
    eng = BlockSpecDecEngine.from_checkpoint(target_checkpoint=target, draft_checkpoint=draft_dir, config=cfg,
                                             expert_residency="stacked")
    rows, agg = [], {"cycles": 0, "accepted": 0, "committed": 0, "forwards": 0, "hist": np.zeros(BLOCK, dtype=int)}
    t_spec = t_base = 0.0
    for rel, ids in heldout_prompts(eng.tokenizer, n, prompt_tokens):
        eng.reset_stats()
        t = time.perf_counter()
        spec = [x for c in eng.generate(ids, max_tokens=max_tokens, ignore_eos=True) for x in c.token_ids]
        t_spec += time.perf_counter() - t
        st = eng.stats()
        t = time.perf_counter()
        base = [x for c in eng.generate(ids, max_tokens=max_tokens, ignore_eos=True,
                                        mode=BlockSpecDecEngineMode.TARGET_ONLY) for x in c.token_ids]
        t_base += time.perf_counter() - t
        cyc = st["specdec_cycles"]
        row = {"file": rel, "lossless": spec == base, "cycles": cyc, "accepted": st["specdec_accepted"],
               "mean_accepted": st["specdec_accepted"] / cyc, "tokens_per_cycle": 1 + st["specdec_accepted"] / cyc,
               "tokens_per_target_forward": (st["specdec_committed"] - 1) / (cyc + st["specdec_target_only_steps"])}
        rows.append(row)
        agg["cycles"] += cyc
        agg["accepted"] += st["specdec_accepted"]
        agg["committed"] += st["specdec_committed"] - 1  # the first token comes from prefill, not a cycle
        agg["forwards"] += cyc + st["specdec_target_only_steps"]  # (a 1-token step when max_tokens leaves no room)
        agg["hist"] += np.array(st["acceptance_length_histogram"])
        print(f"[measure] {rel}: lossless {row['lossless']} accepted/cycle {row['mean_accepted']:.2f} "
              f"tokens/cycle {row['tokens_per_cycle']:.2f}", flush=True)
    res = {
        "prompts": n, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "mode": "native_v7", "policy": "fixed",
        "block_size": BLOCK, "greedy": True, "all_lossless": all(r["lossless"] for r in rows),
        "mean_accepted_per_cycle": agg["accepted"] / agg["cycles"],
        "tokens_per_cycle": 1 + agg["accepted"] / agg["cycles"],  # acceptance length tau (accepted + bonus)
        "tokens_per_target_forward": agg["committed"] / agg["forwards"],
        "acceptance_histogram": agg["hist"].tolist(),
        "cpu_seconds_native_v7": t_spec, "cpu_seconds_target_only": t_base, "per_prompt": rows,
    }
    print(json.dumps({k: v for k, v in res.items() if k != "per_prompt"}, indent=1), flush=True)
    return res


# -- export: quantize for the asset budget ------------------------------------------------------------------------
def export_quantized(src: str, dst: str, bits: int, group_size: int, mlp_bits: int | None = None,
                     dtype: str = "float32") -> int:
    """Re-saves the draft at ``src`` for the asset budget: every other parameter cast to ``dtype``, then the
    decoder layers' attention Linears quantized to ``bits`` and their MLP Linears to ``mlp_bits`` (MLX affine,
    ``group_size``; scales in ``dtype``), with a ``quantization`` entry in config.json, which
    ``mlx_lm.utils.load_model`` (hence ``load_dflash_draft``) applies to exactly the layers that carry
    ``.scales`` (bits inferred per layer). ``fc`` is not quantized: the engine's ``DFlashDrafter`` takes the
    draft's compute dtype from ``fc.weight``; keep it float32, since MLX's CPU quantized matmul is ~35x slower in
    float16 than in float32 (0.32.4). Returns the bytes written."""
    from mach_runtime.engine.specdec.draft import load_dflash_draft

    mlp_bits = bits if mlp_bits is None else mlp_bits
    draft = load_dflash_draft(src)
    draft.set_dtype(getattr(mx, dtype))

    def pick(p, m):
        if not (isinstance(m, nn.Linear) and p.startswith("layers.")):
            return False
        return {"group_size": group_size, "bits": mlp_bits if ".mlp." in p else bits, "mode": "affine"}

    nn.quantize(draft, group_size=group_size, bits=bits, class_predicate=pick)
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((Path(src) / "config.json").read_text())
    cfg["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(draft.parameters())))
    log = Path(src) / "train_log.json"
    if log.exists() and log.resolve() != (out / "train_log.json").resolve():
        d = json.loads(log.read_text())
        d["export"] = {"attention_bits": bits, "mlp_bits": mlp_bits, "group_size": group_size, "dtype": dtype,
                       "command": f"--export SRC --bits {bits} --mlp-bits {mlp_bits} --group-size {group_size} "
                                  f"--dtype {dtype}"}
        (out / "train_log.json").write_text(json.dumps(d, separators=(",", ":")) + "\n")
    return sum(f.stat().st_size for f in out.iterdir())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT / ".train"))
    ap.add_argument("--target", default=str(ROOT / "mach_runtime/assets/demo-qwen3-moe"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--time-budget", type=float, default=0.0, help="seconds of training; 0 = run --steps")
    ap.add_argument("--gen-budget", type=float, default=60.0, help="seconds of greedy target generation")
    ap.add_argument("--gen-batches", type=int, default=64, help="at most this many generation batches")
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--anchors", type=int, default=ANCHORS)
    ap.add_argument("--prompt", type=int, default=PROMPT)
    ap.add_argument("--gen", type=int, default=GEN)
    ap.add_argument("--gen-batch", type=int, default=GEN_BATCH)
    ap.add_argument("--gen-frac", type=float, default=GEN_FRAC)
    ap.add_argument("--eval-prompts", type=int, default=EVAL_PROMPTS)
    ap.add_argument("--target-dtype", default="float32")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="wall seconds from start by which training stops whatever the step count (0 = none), "
                         "leaving time to evaluate and save")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for a CPU check")
    ap.add_argument("--measure", metavar="DRAFT_DIR", help="instead of training: acceptance of DRAFT_DIR with the "
                    "real engine on held-out prompts (greedy, NATIVE_V7, block 16, fixed) vs TARGET_ONLY")
    ap.add_argument("--measure-prompts", type=int, default=8)
    ap.add_argument("--measure-tokens", type=int, default=256)
    ap.add_argument("--export", metavar="SRC_DIR", help="instead of training: write SRC_DIR's draft to --out with its "
                    "layers quantized (--bits, --group-size)")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--mlp-bits", type=int, default=None, help="bits of the MLP Linears (default: --bits)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--dtype", default="float32", help="dtype of the unquantized parameters and scales")
    a = ap.parse_args()
    if a.export:
        n = export_quantized(a.export, a.out, a.bits, a.group_size, a.mlp_bits, a.dtype)
        print(f"[export] {a.out}: {n:,} bytes", flush=True)
        return
    if a.measure:
        res = measure(a.target, a.measure, a.measure_prompts, a.prompt, a.measure_tokens)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
        return
    if a.smoke:
        a.batch, a.anchors, a.prompt, a.gen, a.gen_batch, a.eval_prompts = 4, 6, 48, 48, 12, 4
        a.gen_batches, a.steps, a.time_budget = 1, min(a.steps, 40), 0.0

    t_start = time.perf_counter()
    np.random.seed(SEED)
    mx.random.seed(SEED)
    rng = np.random.default_rng(SEED)
    from mach_runtime.engine.specdec.draft import save_dflash_draft
    from mach_runtime.io.load import load_moe

    print(f"[draft] mlx {mx.__version__} device {mx.default_device()}", flush=True)
    model, tok, store, _ = load_moe(a.target, expert_residency="stacked", dtype=a.target_dtype)
    model.freeze()
    inner = model.model
    embed = inner.embed_tokens
    cfg = json.loads((Path(a.target) / "config.json").read_text())
    mask_id = tok.convert_tokens_to_ids(MASK_TOKEN)
    train, held = load_tokens(Path(a.data))
    assert not (train == mask_id).any(), "the mask token occurs in the corpus"
    print(f"[draft] target {cfg['model_type']} L={cfg['num_hidden_layers']} H={cfg['hidden_size']} "
          f"dtype={embed.weight.dtype}; train tokens {train.size:,} held-out {held.size:,}; mask id {mask_id}",
          flush=True)

    draft = make_draft(cfg["vocab_size"], cfg["num_hidden_layers"], int(mask_id), DRAFT_ARCH)
    n_params = sum(v.size for _, v in tree_flatten(draft.parameters()))
    print(f"[draft] draft params {n_params:,} ({n_params * 2 / 1e6:.2f} MB fp16), taps {TARGET_LAYER_IDS}", flush=True)
    parity = check_parity(model, draft, held[: a.prompt + 64], a.prompt)
    print(f"[draft] parity packed-training vs engine draft_logits: rel max err {parity:.2e}", flush=True)
    assert parity < 1e-3, parity

    # -- greedy continuations of the target (time-bounded) ---------------------------------------------------
    P, G = a.prompt, a.gen
    t0 = time.perf_counter()
    deadline = t0 + a.gen_budget
    eval_starts = rng.integers(0, held.size - P, size=a.eval_prompts)
    eval_prompts = np.stack([held[s : s + P] for s in eval_starts])
    gen_rows, eval_rows, n_tok = [], None, 0
    for gb in range(a.gen_batches):
        if gb and time.perf_counter() > deadline:
            break
        n_train = a.gen_batch - (a.eval_prompts if gb == 0 else 0)
        offs = rng.integers(0, train.size - P, size=n_train)
        prompts = np.stack([train[o : o + P] for o in offs])
        if gb == 0:
            prompts = np.concatenate([eval_prompts, prompts])
        tb = time.perf_counter()
        rows = greedy_continue(model, prompts, G, deadline if gb else deadline + a.gen_budget)
        if gb == 0:
            G = rows.shape[1] - P  # a truncated first batch fixes the generated length for the run
            eval_rows, rows = rows[: a.eval_prompts], rows[a.eval_prompts :]
        elif rows.shape[1] < P + G:
            break
        gen_rows.append(rows)
        n_tok += rows.shape[0] * G
        print(f"[draft] gen batch {gb}: {rows.shape} in {time.perf_counter() - tb:.1f}s", flush=True)
    gen_rows = np.concatenate(gen_rows)
    gen_s = time.perf_counter() - t0
    T = P + G
    print(f"[draft] generated {len(gen_rows)} continuations x {G} tokens ({n_tok:,} tokens) in {gen_s:.0f}s; seq {T}",
          flush=True)
    assert G >= BLOCK + 1

    # -- training ---------------------------------------------------------------------------------------------
    opt = optim.AdamW(learning_rate=lr_at(0, a.steps), betas=list(BETAS), weight_decay=WEIGHT_DECAY)
    opt.init(draft.trainable_parameters())
    n_gen = int(round(a.batch * a.gen_frac))

    def sample():
        gi = rng.integers(0, len(gen_rows), size=n_gen)
        ro = rng.integers(0, train.size - T, size=a.batch - n_gen)
        rows = gen_rows[gi]
        if a.batch - n_gen:
            rows = np.concatenate([rows, np.stack([train[o : o + T] for o in ro])])
        lo = np.concatenate([np.full(n_gen, P), np.full(a.batch - n_gen, 1)])[:, None]
        anchors = rng.integers(lo, T - BLOCK + 1, size=(a.batch, a.anchors))
        return mx.array(rows.astype(np.int32)), mx.array(anchors.astype(np.int32))

    lvg = nn.value_and_grad(draft, lambda d, h, t, an: loss_fn(d, embed, h, t, an))

    def step_fn(hid, tokens, anchors):
        (loss, (ce, acc)), grads = lvg(draft, hid, tokens, anchors)
        grads, gnorm = optim.clip_grad_norm(grads, CLIP)
        opt.update(draft, grads)
        return loss, ce, acc, gnorm

    state = [draft.state, opt.state]
    step_c = step_fn if a.no_compile else partial(mx.compile, inputs=state, outputs=state)(step_fn)
    feats = lambda t: target_features(inner, t, TARGET_LAYER_IDS)  # noqa: E731  (frozen, not compiled)

    def one_step(s, total):
        nonlocal step_c
        opt.learning_rate = lr_at(s, total)
        tokens, anchors = sample()
        try:
            hid = feats(tokens)
            out = step_c(hid, tokens, anchors)
            mx.eval(out, draft.parameters(), opt.state)
        except Exception as e:  # pragma: no cover - a compile problem on some backend: run uncompiled
            if step_c is step_fn:
                raise
            print(f"[draft] compiled step failed ({type(e).__name__}: {e}); running uncompiled", flush=True)
            step_c = step_fn
            hid = feats(tokens)
            out = step_c(hid, tokens, anchors)
            mx.eval(out, draft.parameters(), opt.state)
        return out

    ev0 = proxy_acceptance(draft, embed, inner, eval_rows, np.full(len(eval_rows), P))
    print(f"[draft] before training: held-out greedy proxy tau {ev0['tau']:.3f}", flush=True)
    total, log, t0, t_cal, s = a.steps, [], time.perf_counter(), None, 0
    ema = None
    while s < total:
        if a.deadline and time.perf_counter() - t_start > a.deadline:
            print(f"[draft] deadline: stopping at step {s}", flush=True)
            break
        loss, ce, acc, gnorm = one_step(s, total)
        s += 1
        lv = float(loss)
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        if s == 5:
            t_cal = time.perf_counter()
        if a.time_budget and s == CALIBRATE_STEPS:
            per = (time.perf_counter() - t_cal) / (CALIBRATE_STEPS - 5)
            total = max(CALIBRATE_STEPS + 1, min(a.steps, int(a.time_budget / per)))
            print(f"[draft] {per * 1000:.1f} ms/step → total steps {total} for a {a.time_budget:.0f}s budget",
                  flush=True)
        if s % LOG_EVERY == 0 or s == total or s <= 3:
            accl = np.array(acc)
            rec = {"step": s, "loss": lv, "loss_ema": ema, "acc1": float(accl[0]), "acc8": float(accl[7]),
                   "acc15": float(accl[-1]), "gnorm": float(gnorm), "lr": lr_at(s - 1, total),
                   "t": time.perf_counter() - t0}
            log.append(rec)
            print(f"[draft] step {s}/{total} loss {lv:.4f} (ema {ema:.4f}) acc@1 {rec['acc1']:.3f} acc@8 "
                  f"{rec['acc8']:.3f} acc@15 {rec['acc15']:.3f} gnorm {rec['gnorm']:.2f} lr {rec['lr']:.2e} "
                  f"{rec['t']:.0f}s", flush=True)
    train_s = time.perf_counter() - t0

    # -- evaluate exactly what ships (fp16) and save ------------------------------------------------------------
    ev32 = proxy_acceptance(draft, embed, inner, eval_rows, np.full(len(eval_rows), P))
    draft.set_dtype(mx.float16)
    ev16 = proxy_acceptance(draft, embed, inner, eval_rows, np.full(len(eval_rows), P))
    raw = np.stack([held[o : o + T] for o in rng.integers(0, held.size - T, size=a.eval_prompts)])
    ev_raw = proxy_acceptance(draft, embed, inner, raw, np.full(len(raw), 1))
    print(f"[draft] held-out greedy proxy tau: fp32 {ev32['tau']:.3f}, fp16 {ev16['tau']:.3f} "
          f"(per-position acc {ev16['pos_acc']}); raw held-out text tau {ev_raw['tau']:.3f}", flush=True)
    out = Path(a.out)
    save_dflash_draft(draft, out)
    size = sum(f.stat().st_size for f in out.iterdir())
    device = str(mx.default_device())
    try:
        import subprocess

        device = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or device
    except Exception:
        pass
    summary = {
        "device": device, "mlx": mx.__version__, "target": Path(a.target).name, "target_dtype": a.target_dtype,
        "draft_arch": DRAFT_ARCH, "target_layer_ids": TARGET_LAYER_IDS, "mask_token": MASK_TOKEN,
        "mask_token_id": int(mask_id),
        "params": int(n_params), "bytes_on_disk": size, "parity_rel_err": parity,
        "data": {"prompt": P, "gen": G, "seq": T, "generated_rows": int(len(gen_rows)), "generated_tokens": int(n_tok),
                 "gen_seconds": gen_s, "gen_frac": a.gen_frac},
        "hyper": {"seed": SEED, "batch": a.batch, "anchors": a.anchors, "block": BLOCK, "gamma": GAMMA, "lr": LR,
                  "min_lr_frac": MIN_LR_FRAC, "warmup": WARMUP, "weight_decay": WEIGHT_DECAY, "betas": BETAS,
                  "clip": CLIP, "time_budget": a.time_budget, "compiled": not a.no_compile},
        "steps": s, "train_seconds": train_s, "wall_seconds": time.perf_counter() - t_start,
        "eval": {"heldout_greedy_proxy_before": ev0, "heldout_greedy_proxy_fp32": ev32,
                 "heldout_greedy_proxy_fp16": ev16, "heldout_raw_proxy_fp16": ev_raw},
        "log": log,
    }
    (out / "train_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "log"}, indent=1), flush=True)
    store.close() if store is not None else None


if __name__ == "__main__":
    main()
