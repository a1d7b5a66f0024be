"""Quantized checkpoints as users get them: a small random HF-format source, exported by mlx-lm's own ``convert``
(or ``quantize_model`` + ``save`` where convert has no flag), and the checks that compare our forward against
mlx-lm's forward of the same export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

from tests.helpers import HF_QWEN3_MOE, TOKENIZER_FILES, mlx_lm_reference, rel_err
from tests.tolerances import independent

PROMPT = [5, 17, 42, 99, 7, 300, 12, 64, 128, 33, 250, 1, 77, 400, 3, 9]


def qwen3_moe_source(dst: Path, *, hidden=128, inter=128, layers=4, experts=8, top_k=2, seed=0) -> Path:
    """A random qwen3_moe in the HF hub layout (per-expert ``mlp.experts.{e}.*_proj.weight``, fp32), built with
    mlx-lm's model class; dims are multiples of 128 so every group size (32/64/128) quantizes every projection."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    from mach_runtime.testing.tiny import save_weights

    cfg = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=hidden,
               num_hidden_layers=layers, intermediate_size=2 * hidden, num_attention_heads=4, num_key_value_heads=2,
               head_dim=32, num_experts=experts, num_experts_per_tok=top_k, decoder_sparse_step=1, mlp_only_layers=[],
               moe_intermediate_size=inter, rms_norm_eps=1e-6, vocab_size=512, rope_theta=1e6,
               tie_word_embeddings=False, max_position_embeddings=4096, norm_topk_prob=True, torch_dtype="float32",
               eos_token_id=2)
    Model, Args = _get_classes(cfg)
    mx.random.seed(seed)
    model = Model(Args.from_dict(cfg))
    w = dict(tree_flatten(model.parameters()))
    for k in [k for k in w if k.endswith("mlp.gate.weight")]:
        w[k] = w[k] * 8.0  # random routers are nearly uniform; spread them so routing depends on the token
    for k in [k for k in w if ".switch_mlp." in k]:
        v = w.pop(k)
        pre, rest = k.split(".switch_mlp.")
        for e in range(v.shape[0]):
            w[f"{pre}.experts.{e}.{rest}"] = mx.contiguous(v[e])
    dst.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        shutil.copy(HF_QWEN3_MOE / f, dst / f)
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    save_weights(dst, w, None)
    return dst


def mlx_lm_convert(src: Path, dst: Path, **kw) -> Path:
    """``mlx_lm.convert`` exactly as its CLI runs it (``python -m mlx_lm convert -q ...``)."""
    from mlx_lm.convert import convert

    convert(str(src), str(dst), **kw)
    return dst


def mlx_lm_quantize_save(src: Path, dst: Path, **kw) -> Path:
    """mlx-lm's ``quantize_model`` + ``save`` (what convert does) for options its ``convert`` has no flag for
    (``global_scale=True``: nvfp4 with one tensor scale per expert)."""
    from mlx_lm.utils import load, quantize_model, save

    model, tok, config = load(str(src), return_config=True, lazy=True)
    model, config = quantize_model(model, config, kw.pop("q_group_size", None), kw.pop("q_bits", None), **kw)
    save(dst, str(src), model, tok, config)
    return dst


def mlx_lm_model(path: Path):
    from mlx_lm import load

    model, _ = load(str(path))
    return mlx_lm_reference(model)


def logits_of(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def greedy_with_margins(model, ids, n: int):
    """Greedy tokens and, per step, the gap between the best and second-best logit (a tie makes any order right)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)
    toks, margins = [], []
    for _ in range(n):
        row = np.array(logits[0, -1].astype(mx.float32))
        top2 = np.sort(row)[-2:]
        t = int(np.argmax(row))
        toks.append(t)
        margins.append(float(top2[1] - top2[0]) / max(1e-30, float(np.max(np.abs(row)))))
        logits = model(mx.array([[t]]), cache=cache)
    return toks, margins


def assert_matches(ours, ref, ids=PROMPT, n=8, tol=None):
    """Our logits equal the reference's within ``tol`` (relative to the largest logit; default: another
    implementation in float32, tests/tolerances.py), and greedy tokens agree up to the first step whose top-2 margin is
    inside that tolerance (there either token is a correct greedy choice)."""
    tol = independent() if tol is None else tol
    a, b = logits_of(ours, ids), logits_of(ref, ids)
    assert np.all(np.isfinite(a)), "our logits have NaN/inf"
    err = rel_err(a, b)
    assert err <= tol, f"relative error {err:.3g} > {tol:g}"
    got, _ = greedy_with_margins(ours, ids, n)
    want, margins = greedy_with_margins(ref, ids, n)
    for i, (g, w, m) in enumerate(zip(got, want, margins)):
        if m <= 4 * tol:
            break
        assert g == w, f"greedy token {i}: ours {g}, mlx-lm {w} (margin {m:.3g}); ours {got}, mlx-lm {want}"
    return err
