#!/usr/bin/env python3
"""Write a random, Qwen3-30B-A3B-shaped MLX 4-bit checkpoint for benchmarks.

The output directory looks exactly like what ``mlx_lm.convert -q`` produces
for Qwen3-30B-A3B (``model_type: qwen3_moe``, stacked ``switch_mlp`` experts,
4-bit affine quantization with the router ``mlp.gate`` at 8 bits), but the
weights are random, so it can be made in minutes without any download:

    python bench/make_large_checkpoint.py /work/large_ckpt/qwen3-30b-a3b-shaped-4bit

Key names, dtypes and shapes are not written down by hand: the mlx-lm model
is instantiated at the requested size and quantized with mlx-lm's own
``quantize_model`` (which also yields the ``quantization`` config block).
MLX is lazy, so this builds only a graph of shapes and never materialises
the random initial weights (< 1 s, < 100 MB at full size).

The safetensors shards are then written by hand, streaming: each tensor is
generated and written in chunks of at most ``CHUNK_ELEMS`` elements on a
background writer thread, so memory stays at a few hundred MB regardless of
model size. Tensor data:

* packed quantized weights (uint32): uniformly random bits;
* ``scales`` (bf16): uniform in [SCALE_LO, SCALE_HI];
* ``biases`` (bf16): exactly ``-2**(bits-1) * scale``, so every dequantized
  weight ``q*scale + bias = (q - 2**(bits-1)) * scale`` is centred on zero;
* norm weights (bf16): ones.

Every tensor's contents depend only on ``--seed`` and the tensor's name.

``--verify`` re-opens the result with ``mlx_lm.load`` (strict) and, for small
checkpoints, runs a forward pass and checks the logits are finite.
"""

import argparse
import importlib
import io
import json
import os
import shutil
import sys
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's mach_runtime
from mach_runtime.io.safetensors_write import INDEX, header, index_json, plan_shards, shard_names  # noqa: E402

# Elements generated and written per step (64 MiB of uint32, 32 MiB of bf16).
CHUNK_ELEMS = 1 << 24
# Range of the random quantization scales (bf16 after truncation).
SCALE_LO, SCALE_HI = 0.002, 0.02
# bf16 bit pattern of 1.0 (upper half of float32 0x3F800000).
BF16_ONE = 0x3F80
# Checkpoints up to this size get a forward pass in --verify.
VERIFY_FORWARD_MAX_BYTES = 2 << 30

# Safetensors dtype names for the numpy dtypes the checkpoint holds on disk.
# bf16 is handled as its raw uint16 bit pattern.
ST_DTYPE = {"U32": np.uint32, "BF16": np.uint16}



def model_config(a):
    """Qwen3-30B-A3B's config.json fields, with the sizes taken from the CLI."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": a.hidden,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.head_dim,
        "num_experts": a.experts,
        "num_experts_per_tok": a.top_k,
        "moe_intermediate_size": a.moe_inter,
        # Width of a dense MLP layer; unused here since every layer is MoE
        # (decoder_sparse_step 1, no mlp_only_layers). 3x hidden as in Qwen3.
        "intermediate_size": 3 * a.hidden,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "vocab_size": a.vocab,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }


def derive_tensor_specs(config, group_size, bits):
    """Ask mlx-lm which tensors a quantized checkpoint of `config` holds.

    Returns (specs, quantized_config) where specs is an ordered list of
    dicts {name, dtype ("U32"|"BF16"), shape, kind, bits} with kind one of
    "packed", "scales", "biases", "ones", and quantized_config is `config`
    plus the "quantization"/"quantization_config" blocks mlx_lm.convert
    would write.
    """
    from mlx.utils import tree_flatten
    from mlx_lm.utils import quantize_model

    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    # quantize_model applies the model's own quant_predicate (mlp.gate at
    # 8 bits for qwen3_moe). It prints a bits-per-weight line computed with
    # float32 scales, which would be misleading here, so silence it.
    with redirect_stdout(io.StringIO()):
        model, quantized_config = quantize_model(
            model, config, group_size, bits, mode="affine"
        )
    module_bits = {p: m.bits for p, m in model.named_modules() if hasattr(m, "bits")}

    specs = []
    for name, param in tree_flatten(model.parameters()):
        module, leaf = name.rsplit(".", 1)
        shape = tuple(param.shape)
        if module in module_bits:
            kind = {"weight": "packed", "scales": "scales", "biases": "biases"}[leaf]
            dtype = "U32" if kind == "packed" else "BF16"
        elif param.ndim == 1:
            kind, dtype = "ones", "BF16"
        else:
            # quantize_model skips matrices whose input width is not a
            # multiple of the group size; this generator does not emit
            # unquantized matrices.
            raise SystemExit(
                f"{name} {shape} was left unquantized: its last dim must be a "
                f"multiple of --group-size {group_size}"
            )
        specs.append(
            {
                "name": name,
                "dtype": dtype,
                "shape": shape,
                "kind": kind,
                "bits": module_bits.get(module),
            }
        )
    return specs, quantized_config


def spec_nbytes(spec):
    return int(np.prod(spec["shape"], dtype=np.int64)) * np.dtype(ST_DTYPE[spec["dtype"]]).itemsize


def tensor_rng(seed, name):
    """Independent, reproducible random stream for one tensor."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def f32_to_bf16_bits(x):
    """bf16 bit patterns (uint16) of float32 values, by truncation."""
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def bf16_bits_to_f32(b):
    return (b.astype(np.uint32) << 16).view(np.float32)


def generate_chunks(spec, seed):
    """Yield the tensor's data as C-ordered numpy chunks of <= CHUNK_ELEMS."""
    n = int(np.prod(spec["shape"], dtype=np.int64))
    kind = spec["kind"]
    # Biases are derived from their module's scales, so they replay the
    # scales' random stream (same seed, same chunking).
    stream = spec["name"].rsplit(".", 1)[0] + ".scales" if kind == "biases" else spec["name"]
    rng = tensor_rng(seed, stream)
    for start in range(0, n, CHUNK_ELEMS):
        m = min(CHUNK_ELEMS, n - start)
        if kind == "packed":
            # Raw 64-bit generator output is the fastest source of random bits.
            yield rng.bit_generator.random_raw((m + 1) // 2).view(np.uint32)[:m]
        elif kind == "ones":
            yield np.full(m, BF16_ONE, dtype=np.uint16)
        else:
            scales = f32_to_bf16_bits(
                rng.random(m, dtype=np.float32) * np.float32(SCALE_HI - SCALE_LO)
                + np.float32(SCALE_LO)
            )
            if kind == "scales":
                yield scales
            else:
                # Multiplying by a power of two is exact in bf16.
                offset = np.float32(-(2 ** (spec["bits"] - 1)))
                yield f32_to_bf16_bits(bf16_bits_to_f32(scales) * offset)


class AsyncWriter:
    """Write buffers to a file on one background thread.

    Lets random-number generation (CPU) overlap with disk I/O; at most
    `depth` buffers are pending at once, which bounds memory. Errors from
    the writer thread are re-raised in the caller.
    """

    def __init__(self, f, depth=2):
        self._f = f
        self._depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending = deque()

    def write(self, buf):
        self._pending.append(self._pool.submit(self._f.write, buf))
        while len(self._pending) > self._depth:
            self._pending.popleft().result()

    def close(self):
        while self._pending:
            self._pending.popleft().result()
        self._pool.shutdown()


class Progress:
    """Prints a line each time another `every` bytes have been written."""

    def __init__(self, total, every=1 << 30):
        self.total, self.every = total, every
        self.done, self.next_report = 0, every
        self.t0 = time.perf_counter()

    def add(self, n):
        self.done += n
        if self.done >= self.next_report or self.done == self.total:
            dt = time.perf_counter() - self.t0
            print(
                f"  {self.done / 1e9:7.2f} / {self.total / 1e9:.2f} GB"
                f"  {dt:6.1f} s  {self.done / dt / 1e9:5.2f} GB/s",
                flush=True,
            )
            self.next_report = (self.done // self.every + 1) * self.every


def write_shard(path, specs, seed, progress):
    with open(path, "wb") as f:
        f.write(header([(s["name"], s["dtype"], s["shape"], spec_nbytes(s)) for s in specs], {"format": "mlx"}))
        writer = AsyncWriter(f)
        for spec in specs:
            for chunk in generate_chunks(spec, seed):
                writer.write(chunk)
                progress.add(chunk.nbytes)
        writer.close()
        f.flush()
        # Count the time to reach the disk, not just the page cache.
        os.fsync(f.fileno())


def write_tokenizer(out, vocab_size):
    """The project's tiny byte-level BPE (trained on a few stdlib sources), in the Hugging Face layout."""
    from mach_runtime.testing.tiny import make_tokenizer

    vocab, eos = make_tokenizer(Path(out), vocab_size)
    return eos, vocab


def verify(out, specs):
    """Load `out` strictly with mlx-lm, check on-disk dtypes, and for small
    checkpoints run a forward pass and check the logits are finite."""
    import mlx.core as mx
    from mlx_lm import load

    total = sum(spec_nbytes(s) for s in specs)
    model, tokenizer = load(str(out), lazy=True)  # strict key/shape check
    weights = {}
    for shard in sorted(out.glob("model-*.safetensors")):
        weights.update(mx.load(str(shard)))
    want = {"U32": mx.uint32, "BF16": mx.bfloat16}
    bad = [s["name"] for s in specs if weights[s["name"]].dtype != want[s["dtype"]]]
    assert not bad, f"dtype mismatch: {bad[:5]}"
    print(f"verify: mlx_lm.load OK, {len(weights)} tensors with expected dtypes")
    if total <= VERIFY_FORWARD_MAX_BYTES:
        ids = tokenizer.encode("def hello(world):\n    return 42")
        logits = model(mx.array([ids]))
        mx.eval(logits)
        assert mx.isfinite(logits).all().item(), "non-finite logits"
        print(f"verify: forward on {len(ids)} tokens -> logits {logits.shape}, all finite")
    else:
        print("verify: checkpoint too large for a CPU forward pass; skipped it")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--moe-inter", type=int, default=768)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--shard-gb", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify", action="store_true", help="load the result with mlx_lm afterwards")
    a = p.parse_args()

    t0 = time.perf_counter()
    specs, config = derive_tensor_specs(model_config(a), a.group_size, a.bits)
    shards = plan_shards(specs, spec_nbytes, int(a.shard_gb * 1e9))
    total = sum(spec_nbytes(s) for s in specs)
    print(
        f"{len(specs)} tensors, {total / 1e9:.2f} GB in {len(shards)} shard(s) "
        f"(shapes derived in {time.perf_counter() - t0:.1f} s)"
    )

    a.out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(a.out).free
    if free < total * 1.02:
        sys.exit(f"not enough free space in {a.out}: {free / 1e9:.1f} GB < {total / 1e9:.1f} GB")
    # mlx_lm.load globs model*.safetensors: shards of an earlier run with a
    # different shard count would be loaded too.
    for stale in a.out.glob("model*.safetensors"):
        print(f"removing stale {stale.name}")
        stale.unlink()

    eos_id, tok_vocab = write_tokenizer(a.out, min(1000, a.vocab))
    config["eos_token_id"] = eos_id
    (a.out / "config.json").write_text(json.dumps(config, indent=2))

    names = shard_names(len(shards), single=None)
    progress = Progress(total)
    for name, shard in zip(names, shards):
        print(f"{name}: {len(shard)} tensors, {sum(map(spec_nbytes, shard)) / 1e9:.2f} GB", flush=True)
        write_shard(a.out / name, shard, a.seed, progress)
    wmap = {s["name"]: n for n, shard in zip(names, shards) for s in shard}
    (a.out / INDEX).write_bytes(index_json(total, wmap, indent=2))

    dt = time.perf_counter() - t0
    print(
        f"wrote {total} bytes ({total / 1e9:.2f} GB) of weights, {len(shards)} shard(s), "
        f"tokenizer vocab {tok_vocab}, to {a.out} in {dt:.1f} s ({total / dt / 1e9:.2f} GB/s)"
    )
    if a.verify:
        verify(a.out, specs)


if __name__ == "__main__":
    main()
