"""Test helpers: rewrite a checkpoint into another real layout (stacked, sharded, bf16, quantized)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mach_runtime.testing.tiny import save_weights

FIXTURES = Path(__file__).parent / "fixtures"
HF_QWEN3_MOE = FIXTURES / "hf_qwen3_moe"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _all_weights(src: Path) -> dict:
    w = {}
    for f in sorted(src.glob("*.safetensors")):
        if f.name.startswith("model"):
            w.update(mx.load(str(f)))
    return w


def _copy_meta(src: Path, dst: Path, config: dict | None = None) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        shutil.copy(src / f, dst / f)
    cfg = config if config is not None else json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))


def stack_experts(weights: dict) -> dict:
    """HF per-expert keys → MLX switch_mlp stacked keys."""
    out, groups = {}, {}
    for k, v in weights.items():
        if ".mlp.experts." in k:
            pre, rest = k.split(".mlp.experts.")
            e, tail = rest.split(".", 1)
            groups.setdefault((pre, tail), {})[int(e)] = v
        else:
            out[k] = v
    for (pre, tail), experts in groups.items():
        out[f"{pre}.mlp.switch_mlp.{tail}"] = mx.stack([experts[e] for e in sorted(experts)])
    return out


def convert(src: Path, dst: Path, *, layout: str = "per_expert", dtype: str | None = None, shard_bytes=None) -> Path:
    """Writes src's weights to dst in ``layout`` ("per_expert" / "stacked"), optional dtype cast and shards."""
    w = _all_weights(src)
    if layout == "stacked":
        w = stack_experts(w)
    if dtype is not None:
        w = {k: v.astype(getattr(mx, dtype)) for k, v in w.items()}
    cfg = json.loads((src / "config.json").read_text())
    if dtype is not None:
        cfg["torch_dtype"] = cfg["dtype"] = dtype
    _copy_meta(src, dst, cfg)
    save_weights(dst, w, shard_bytes)
    return dst


def quantize(src: Path, dst: Path, bits: int = 4, group_size: int = 32, shard_bytes=None) -> Path:
    """mlx-lm's own quantization of src into an MLX stacked quantized checkpoint at dst."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import quantize_model

    from mach_runtime.io.load import _mlx_lm_overrides, load

    model, _ = load(str(src))  # mlx-lm's loader, given the config spelled the way mlx-lm reads it
    cfg = json.loads((src / "config.json").read_text())
    cfg = {**cfg, **_mlx_lm_overrides(cfg, str(src / "config.json"))}  # the export mlx-lm itself reads back
    model, cfg = quantize_model(model, cfg, group_size=group_size, bits=bits)
    _copy_meta(src, dst, cfg)
    save_weights(dst, dict(tree_flatten(model.parameters())), shard_bytes)
    return dst


def child_env(root, **extra) -> dict:
    """The environment of a subprocess of the suite: the parent's, ``root`` first on PYTHONPATH, then the
    parent's own PYTHONPATH entries (packages a kit installs outside site-packages, e.g. /tmp/site on the GPU
    machine, stay importable in the child)."""
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join([str(root), *inherited])}


def mlx_lm_reference(model):
    """mlx-lm's quantized model as a reference on this backend: on CUDA the layers whose MLX kernel computes wrong
    values (``mach_runtime/io/backend_faults.py``, pinned by tests/test_backend_faults.py) are held dequantized,
    the same function; elsewhere the model is untouched."""
    from mach_runtime.io.backend_faults import dequantize_one_group_rows

    dequantize_one_group_rows(model)
    return model


def reference_logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to max |b|."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def greedy(model, ids, n: int) -> list[int]:
    """Plain greedy decoding with mlx-lm's KV cache (the independent reference loop)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)
    out = []
    for _ in range(n):
        t = int(mx.argmax(logits[0, -1]).item())
        out.append(t)
        logits = model(mx.array([[t]]), cache=cache)
    return out


def detokenize(tok, ids) -> str:
    """The text of ``ids`` through the tokenizer's streaming detokenizer (what the engines emit)."""
    d = tok.detokenizer
    d.reset()
    for t in ids:
        d.add_token(t)
    d.finalize()
    return d.text


def small_forwards(model, prompt) -> list:
    """Logits of a prefill over ``prompt``, two 1-token steps and a 6-token block (the shapes a decode and a
    speculative verify run), through one prompt cache."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    out = [model(mx.array([list(prompt)]), cache=cache)]
    for t in (7, 11):
        out.append(model(mx.array([[t]]), cache=cache))
    out.append(model(mx.array([[3, 1, 4, 1, 5, 9]]), cache=cache))
    mx.eval(out)
    return out


def slow_steps(hook=None, delay: float = 0.01):
    """Fault hook: every decoder step takes ``delay`` longer (requests overlap as planned), then ``hook``."""

    def slow(actor, point, info):
        if actor == "decoder" and point == "step":
            time.sleep(delay)
        if hook is not None:
            hook(actor, point, info)

    return slow


async def stream_tokens(rt, ids, max_tokens: int, **kw) -> tuple[list[int], dict | None]:
    """(every token id, the usage of the last chunk) of one request streamed through ``rt`` by its prompt ids."""
    toks, usage = [], None
    async for c in rt._stream_ids(list(ids), max_tokens=max_tokens, **kw):
        toks += c.token_ids
        usage = c.usage or usage
    return toks, usage
