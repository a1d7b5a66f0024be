"""Builds small random qwen3_moe checkpoints in every real layout, offline.

Used by the tests (each layout: HF per-expert, MLX stacked, MLX quantized, single file or sharded), the
benchmarks and ``mach make-tiny``. Weights come from mlx-lm's own qwen3_moe model (random init, router scaled up
so routing is decisive); the tokenizer is a byte-level BPE trained on a fixed list of the Python standard
library's sources, so nothing is downloaded and the result is reproducible.
"""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "heapq.py", "bisect.py", "queue.py", "glob.py")


def make_tokenizer(out: Path, vocab_size: int = 512) -> tuple[int, int]:
    """Trains and saves a byte-level BPE tokenizer; returns (vocab size, id of <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [str(stdlib / f) for f in _CORPUS if (stdlib / f).exists()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "model_max_length": 32768,
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return tok.get_vocab_size(), tok.token_to_id("<|im_end|>")


def tiny_config(vocab: int, eos: int, *, hidden=64, layers=2, heads=4, head_dim=16, experts=8, top_k=2,
                moe_inter=32, mlp_only_layers=(), dtype="float32") -> dict:
    return dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=hidden,
        num_hidden_layers=layers, intermediate_size=2 * hidden, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), head_dim=head_dim, num_experts=experts,
        num_experts_per_tok=top_k, decoder_sparse_step=1, mlp_only_layers=list(mlp_only_layers),
        moe_intermediate_size=moe_inter, rms_norm_eps=1e-6, vocab_size=vocab, rope_theta=1e6,
        tie_word_embeddings=False, max_position_embeddings=32768, norm_topk_prob=True, torch_dtype=dtype,
        eos_token_id=eos, bos_token_id=None,
    )


def save_weights(out: Path, weights: dict, shard_bytes: int | None) -> None:
    """Writes ``weights`` as model.safetensors, or as shards + model.safetensors.index.json."""
    import mlx.core as mx

    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    if not shard_bytes:
        mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
        return
    from ..io.safetensors_write import INDEX, index_json, plan_shards, shard_names

    shards = plan_shards(sorted(weights), lambda k: weights[k].nbytes, shard_bytes)
    weight_map = {}
    for name, shard in zip(shard_names(len(shards), single=None), shards):
        mx.save_safetensors(str(out / name), {k: weights[k] for k in shard}, metadata={"format": "mlx"})
        weight_map.update({k: name for k in shard})
    (out / INDEX).write_bytes(index_json(sum(v.nbytes for v in weights.values()), weight_map))


def make_tiny_checkpoint(
    out,
    *,
    layout: str = "per_expert",
    dtype: str = "float32",
    quant_bits: int | None = None,
    quant_group: int = 32,
    shard_bytes: int | None = None,
    seed: int = 0,
    router_scale: float = 8.0,
    tokenizer_from=None,
    **dims,
) -> Path:
    """Writes a random qwen3_moe checkpoint to ``out`` and returns the path.

    layout: "per_expert" (HF hub keys ``mlp.experts.{e}.{proj}.weight``) or "stacked" (MLX ``switch_mlp``);
    quant_bits: quantize (stacked layout, mlx-lm's quantize_model, router kept at 8 bits) — config.json then
    carries ``quantization``; shard_bytes: split into shards with ``model.safetensors.index.json``;
    tokenizer_from: copy tokenizer files from this directory instead of training one.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, quantize_model

    if layout not in ("per_expert", "stacked"):
        raise ValueError(f"layout must be per_expert or stacked, got {layout!r}")
    if quant_bits and layout != "stacked":
        raise ValueError("quantized checkpoints use the MLX stacked layout")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(tokenizer_from) / f, out / f)
        vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
        added = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
        ids = {t["content"]: t["id"] for t in added}
        n_vocab, eos = max(len(vocab), max(ids.values()) + 1), ids["<|im_end|>"]
    else:
        n_vocab, eos = make_tokenizer(out)
    cfg = tiny_config(n_vocab, eos, dtype=dtype, **dims)
    Model, Args = _get_classes(cfg)
    mx.random.seed(seed)
    model = Model(Args.from_dict(cfg))
    # decisive routing: scaled-up router weights keep top-k far from ties, so fp rounding cannot flip experts
    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.weight = layer.mlp.gate.weight * router_scale
    if quant_bits:
        model, cfg = quantize_model(model, cfg, group_size=quant_group, bits=quant_bits)
    weights = dict(tree_flatten(model.parameters()))
    if not quant_bits:
        weights = {k: v.astype(getattr(mx, dtype)) for k, v in weights.items()}
    if layout == "per_expert":
        for k in [k for k in weights if ".switch_mlp." in k]:
            v = weights.pop(k)
            pre, rest = k.split(".switch_mlp.")
            for e in range(v.shape[0]):
                weights[f"{pre}.experts.{e}.{rest}"] = mx.contiguous(v[e])
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    save_weights(out, weights, shard_bytes)
    return out
