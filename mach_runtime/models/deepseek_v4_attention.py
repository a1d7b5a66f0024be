"""DeepSeek-V4 attention for MLX (transformers 5.24 ``modeling_deepseek_v4.py``): shared-KV MQA with partial
interleaved RoPE, per-head attention sinks and a grouped low-rank output projection, in three variants:

* ``sliding_attention``: the sliding window only;
* ``compressed_sparse_attention`` (CSA): + entries compressed from every ``m`` source tokens with overlapping
  windows (two series Ca/Cb, width ``2m``, stride ``m``), of which a *lightning indexer* keeps the top-k per query;
* ``heavily_compressed_attention`` (HCA): + entries compressed from non-overlapping windows of ``m'`` tokens.

``CompressedKVCache`` holds one layer's state exactly like transformers' ``DeepseekV4HCACache`` /
``DeepseekV4CSACache``: the last ``window - 1`` K(=V) rows, and per compressor (``compressor``, ``indexer``) the
source tokens of the unfinished window, the compressed entries so far and the previous window's Ca slice. Its
windows and running buffers cannot be rewound token by token (``is_trimmable() is False``); speculative
decoding restores a ``snapshot()`` instead (mlx arrays are immutable, so a snapshot is a cheap shallow copy).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .yarn import yarn_inv_freq

NEG_INF = float("-inf")


def rms(x: mx.array, eps: float) -> mx.array:
    """Unweighted RMSNorm over the last axis (fp32)."""
    return x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, self.weight, self.eps)


# --- rope -----------------------------------------------------------------------------------------------------


def rope_inv_freq(params: dict, rope_dim: int) -> tuple[mx.array, float]:
    """(inv_freq [rope_dim/2], attention scaling) of transformers' default / YaRN rope for one rope type."""
    base = float(params["rope_theta"])
    kind = params.get("rope_type", params.get("type", "default"))
    pos = base ** (mx.arange(0, rope_dim, 2, dtype=mx.float32) / rope_dim)
    if kind == "default":
        return 1.0 / pos, 1.0
    if kind != "yarn":
        raise ValueError(f"deepseek_v4: rope_type {kind!r} is not supported (default, yarn)")
    factor = float(params["factor"])
    orig = int(params["original_max_position_embeddings"])
    beta_fast, beta_slow = float(params.get("beta_fast") or 32), float(params.get("beta_slow") or 1)
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if mscale and mscale_all:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
        else:
            attention_factor = get_mscale(factor)

    inv = yarn_inv_freq(rope_dim, base, factor, orig, beta_fast, beta_slow, params.get("truncate", True))
    return inv, float(attention_factor)


class Rope:
    """V4's interleaved partial rope: rotates consecutive channel pairs of the *trailing* ``rope_dim`` channels."""

    def __init__(self, params: dict, rope_dim: int):
        self.inv_freq, self.scaling = rope_inv_freq(params, rope_dim)
        self.rope_dim = rope_dim

    def cos_sin(self, positions: mx.array) -> tuple[mx.array, mx.array]:
        freqs = positions.astype(mx.float32)[..., None] * self.inv_freq  # [..., S, rd/2]
        return mx.cos(freqs) * self.scaling, mx.sin(freqs) * self.scaling


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """``x[..., S, D]``; cos/sin ``[S, rd/2]`` broadcast over the leading axes."""
    rd = 2 * cos.shape[-1]
    nope, rope = x[..., :-rd], x[..., -rd:]
    r = rope.reshape(*rope.shape[:-1], rd // 2, 2)
    a, b = r[..., 0], r[..., 1]
    rotated = mx.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(rope.shape)
    return mx.concatenate([nope, rotated], axis=-1)


# --- cache ----------------------------------------------------------------------------------------------------


class CompressedKVCache:
    """One DeepSeek-V4 layer's attention state (see the module docstring)."""

    NAMES = ("compressor", "indexer")

    def __init__(self, window: int, compress_rate: int = 0):
        self.window = window
        self.compress_rate = compress_rate
        self.keys = None  # [B, 1, <= window - 1, D]
        self.offset = 0
        self.buffer_kv, self.buffer_gate, self.compressed, self.overlap_kv, self.overlap_gate = {}, {}, {}, {}, {}
        self.entry_count = {n: 0 for n in self.NAMES}

    # sliding window (K == V)
    def update(self, kv: mx.array) -> mx.array:
        full = kv if self.keys is None else mx.concatenate([self.keys, kv], axis=2)
        self.offset += kv.shape[2]
        keep = self.window - 1
        self.keys = full[:, :, full.shape[2] - keep:] if keep > 0 and full.shape[2] > keep else (full if keep else None)
        return full

    def store(self, name: str, kv: mx.array, gate: mx.array):
        """Prepends the unfinished window; returns (whole-window chunk kv, gate, absolute position of its start)."""
        first = self.entry_count[name] * self.compress_rate
        if name in self.buffer_kv:
            kv = mx.concatenate([self.buffer_kv[name], kv], axis=1)
            gate = mx.concatenate([self.buffer_gate[name], gate], axis=1)
        usable = (kv.shape[1] // self.compress_rate) * self.compress_rate
        self.buffer_kv[name], self.buffer_gate[name] = kv[:, usable:], gate[:, usable:]
        return kv[:, :usable], gate[:, :usable], first

    def append(self, name: str, entries: mx.array) -> mx.array:
        if name in self.compressed and entries.shape[1]:
            self.compressed[name] = mx.concatenate([self.compressed[name], entries], axis=1)
        elif name not in self.compressed:
            self.compressed[name] = entries
        self.entry_count[name] += entries.shape[1]
        return self.compressed[name]

    def swap_overlap(self, name: str, kv_ca: mx.array, gate_ca: mx.array):
        prior = self.overlap_kv.get(name), self.overlap_gate.get(name)
        self.overlap_kv[name], self.overlap_gate[name] = kv_ca, gate_ca
        return prior

    # mlx-lm cache protocol
    @property
    def state(self) -> list[mx.array]:
        arrays = [self.keys] if self.keys is not None else []
        for d in (self.buffer_kv, self.buffer_gate, self.compressed, self.overlap_kv, self.overlap_gate):
            arrays += [v for v in d.values() if v is not None]
        return arrays

    @property
    def meta_state(self):
        return ()

    def is_trimmable(self) -> bool:
        return False

    def trim(self, n: int) -> int:
        return 0

    def empty(self) -> bool:
        return self.offset == 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)

    def snapshot(self) -> "CompressedKVCache":
        """A copy whose later updates leave this one untouched (``restore`` it to roll back)."""
        c = CompressedKVCache(self.window, self.compress_rate)
        c.keys, c.offset = self.keys, self.offset
        for attr in ("buffer_kv", "buffer_gate", "compressed", "overlap_kv", "overlap_gate", "entry_count"):
            setattr(c, attr, dict(getattr(self, attr)))
        return c

    def restore(self, snap: "CompressedKVCache") -> None:
        self.__dict__.update(snap.snapshot().__dict__)


# --- compressors ----------------------------------------------------------------------------------------------


def _pool(kv, gate, position_bias, rate: int, overlap: bool, head_dim: int, cache: CompressedKVCache, name: str):
    """Softmax-gated pooling of whole windows ``kv/gate [B, nw*rate, F]`` -> ``[B, nw, head_dim]``."""
    B, n = kv.shape[0], kv.shape[1] // rate
    kv = kv.reshape(B, n, rate, -1)
    gate = gate.reshape(B, n, rate, -1) + position_bias
    if overlap:  # entry w: window w-1's Ca slice + window w's Cb slice (width 2*rate, stride rate)
        prior_kv, prior_gate = cache.swap_overlap(name, kv[:, -1, :, :head_dim], gate[:, -1, :, :head_dim])
        if prior_kv is None:
            prior_kv = mx.zeros((B, 1, rate, head_dim), dtype=kv.dtype)
            prior_gate = mx.full((B, 1, rate, head_dim), NEG_INF, dtype=gate.dtype)
        else:
            prior_kv, prior_gate = prior_kv[:, None], prior_gate[:, None]
        prev_kv = mx.concatenate([prior_kv, kv[:, :-1, :, :head_dim]], axis=1)
        prev_gate = mx.concatenate([prior_gate, gate[:, :-1, :, :head_dim]], axis=1)
        kv = mx.concatenate([prev_kv, kv[..., head_dim:]], axis=2)
        gate = mx.concatenate([prev_gate, gate[..., head_dim:]], axis=2)
    w = mx.softmax(gate.astype(mx.float32), axis=2).astype(kv.dtype)
    return (kv * w).sum(axis=2)


class Compressor(nn.Module):
    """HCA (``overlap=False``) / CSA (``overlap=True``) compressor, also the indexer's key compressor."""

    def __init__(self, hidden: int, head_dim: int, rate: int, overlap: bool, eps: float, rope: Rope, name: str):
        super().__init__()
        width = 2 * head_dim if overlap else head_dim
        self.kv_proj = nn.Linear(hidden, width, bias=False)
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.position_bias = mx.zeros((rate, width))
        self.kv_norm = RMSNorm(head_dim, eps)
        self._rate, self._overlap, self._head_dim, self._rope, self._name = rate, overlap, head_dim, rope, name

    def entries(self, x: mx.array, cache: CompressedKVCache) -> mx.array:
        """All compressed entries so far ``[B, T, head_dim]`` (rope applied at their window-start positions)."""
        kv, gate, first = cache.store(self._name, self.kv_proj(x), self.gate_proj(x))
        if kv.shape[1]:
            pooled = self.kv_norm(_pool(kv, gate, self.position_bias, self._rate, self._overlap, self._head_dim,
                                        cache, self._name))
            pos = mx.arange(pooled.shape[1]) * self._rate + first
            cos, sin = self._rope.cos_sin(pos)
            new = apply_rope(pooled, cos, sin)
        else:
            new = mx.zeros((x.shape[0], 0, self._head_dim), dtype=x.dtype)
        return cache.append(self._name, new)


class Scorer(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.weights_proj = nn.Linear(hidden, heads, bias=False)


class Indexer(Compressor):
    """Lightning indexer: its own CSA-style key compressor at ``index_head_dim``, then per query the
    top-``index_topk`` causal entries by ``sum_h w_h relu(q_h . k_s)``."""

    def __init__(self, args, rate: int, rope: Rope):
        super().__init__(args.hidden_size, args.index_head_dim, rate, True, args.rms_norm_eps, rope, "indexer")
        self.num_heads, self.head_dim, self.topk = args.index_n_heads, args.index_head_dim, args.index_topk
        self.q_b_proj = nn.Linear(args.q_lora_rank, self.num_heads * self.head_dim, bias=False)
        self.scorer = Scorer(args.hidden_size, self.num_heads)

    def __call__(self, x, q_residual, positions, cache) -> mx.array:
        """Additive bias ``[B, 1, S, T]`` over the CSA entries: 0 where selected, -inf elsewhere."""
        keys = self.entries(x, cache)  # [B, T, d]
        B, S, _ = x.shape
        T = keys.shape[1]
        if T == 0:
            return mx.zeros((B, 1, S, 0), dtype=x.dtype)
        q = self.q_b_proj(q_residual).reshape(B, S, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        cos, sin = self._rope.cos_sin(positions)
        q = apply_rope(q, cos, sin)  # [B, H, S, d]
        scores = mx.maximum(q @ keys[:, None].swapaxes(-1, -2), 0) * self.head_dim**-0.5  # [B, H, S, T]
        w = self.scorer.weights_proj(x) * self.num_heads**-0.5  # [B, S, H]
        scores = (scores * w.transpose(0, 2, 1)[..., None]).sum(axis=1)  # [B, S, T]
        causal = mx.arange(T)[None, :] < ((positions + 1) // self._rate)[:, None]  # [S, T]
        scores = mx.where(causal, scores, NEG_INF)
        k = min(self.topk, T)
        if k < T:
            idx = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]
            picked = mx.put_along_axis(mx.zeros(scores.shape, dtype=mx.bool_), idx, mx.array(True), axis=-1)
            causal = causal & picked
        bias = mx.where(causal, 0.0, NEG_INF).astype(x.dtype)
        return mx.broadcast_to(bias, (B, S, T))[:, None]


class Attention(nn.Module):
    def __init__(self, args, layer_type: str, ropes: dict):
        super().__init__()
        H, hd, D = args.num_attention_heads, args.head_dim, args.hidden_size
        self.num_heads, self.head_dim, self.window, self.eps = H, hd, args.sliding_window, args.rms_norm_eps
        self.o_groups, self.o_lora_rank = args.o_groups, args.o_lora_rank
        self.layer_type = layer_type
        self.q_a_proj = nn.Linear(D, args.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(args.q_lora_rank, args.rms_norm_eps)
        self.q_b_proj = nn.Linear(args.q_lora_rank, H * hd, bias=False)
        self.kv_proj = nn.Linear(D, hd, bias=False)
        self.kv_norm = RMSNorm(hd, args.rms_norm_eps)
        self.o_a_proj = nn.Linear(H * hd // args.o_groups, args.o_groups * args.o_lora_rank, bias=False)
        self.o_b_proj = nn.Linear(args.o_groups * args.o_lora_rank, D, bias=False)
        self.sinks = mx.zeros((H,))
        self._rope = ropes["main" if layer_type == "sliding_attention" else "compress"]
        self.compress_rate = 0
        if layer_type == "compressed_sparse_attention":
            self.compress_rate = args.compress_rates[layer_type]
            self.compressor = Compressor(D, hd, self.compress_rate, True, args.rms_norm_eps, ropes["compress"],
                                         "compressor")
            self.compressor.indexer = Indexer(args, self.compress_rate, ropes["compress"])
        elif layer_type == "heavily_compressed_attention":
            self.compress_rate = args.compress_rates[layer_type]
            self.compressor = Compressor(D, hd, self.compress_rate, False, args.rms_norm_eps, ropes["compress"],
                                         "compressor")

    def make_cache(self) -> CompressedKVCache:
        return CompressedKVCache(self.window, self.compress_rate)

    def __call__(self, x: mx.array, positions: mx.array, cache: CompressedKVCache) -> mx.array:
        B, S, _ = x.shape
        cos, sin = self._rope.cos_sin(positions)
        q_res = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(q_res).reshape(B, S, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        q = apply_rope(rms(q, self.eps), cos, sin)  # [B, H, S, hd]
        kv = apply_rope(self.kv_norm(self.kv_proj(x))[:, None], cos, sin)  # [B, 1, S, hd]
        kv = cache.update(kv)
        L = kv.shape[2]
        kpos = mx.arange(L) + (positions[-1] + 1 - L)
        dist = positions[:, None] - kpos[None, :]
        mask = mx.where((dist >= 0) & (dist < self.window), 0.0, NEG_INF).astype(x.dtype)[None, None]
        mask = mx.broadcast_to(mask, (B, 1, S, L))
        if self.compress_rate:
            entries = self.compressor.entries(x, cache)  # [B, T, hd]
            T = entries.shape[1]
            if self.layer_type == "compressed_sparse_attention":
                bias = self.compressor.indexer(x, q_res, positions, cache)
            else:
                visible = mx.arange(T)[None, :] < ((positions + 1) // self.compress_rate)[:, None]
                bias = mx.broadcast_to(mx.where(visible, 0.0, NEG_INF).astype(x.dtype)[None, None], (B, 1, S, T))
            kv = mx.concatenate([kv, entries[:, None]], axis=2)
            mask = mx.concatenate([mask, bias], axis=-1)
        logits = (q @ kv.swapaxes(-1, -2)) * self.head_dim**-0.5 + mask  # [B, H, S, L+T]
        sinks = mx.broadcast_to(self.sinks.astype(logits.dtype)[None, :, None, None], (B, self.num_heads, S, 1))
        probs = mx.softmax(mx.concatenate([logits, sinks], axis=-1), axis=-1, precise=True)[..., :-1]
        out = probs.astype(kv.dtype) @ kv  # [B, H, S, hd]
        out = apply_rope(out, cos, -sin).transpose(0, 2, 1, 3)  # undo the value rope at the query position
        g = self.o_groups
        grouped = out.reshape(B, S, g, -1)
        wa = self.o_a_proj.weight.reshape(g, self.o_lora_rank, -1)
        grouped = mx.einsum("bsgi,goi->bsgo", grouped, wa).reshape(B, S, -1)
        return self.o_b_proj(grouped)
