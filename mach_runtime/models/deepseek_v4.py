"""DeepSeek-V4 (Flash / Pro) for MLX, following transformers 5.24's ``modeling_deepseek_v4.py``.

* **mHC** (manifold-constrained hyper-connections): the residual is ``hc_mult`` streams ``[B, S, hc, D]``; each
  block collapses them (``pre``), expands its output (``post``) and mixes the residual streams with a
  Sinkhorn-projected doubly-stochastic ``comb``; ``hc_head`` collapses them before the final norm.
* **Attention** (``deepseek_v4_attention.py``): sliding / compressed-sparse (lightning indexer) / heavily
  compressed, with attention sinks and a grouped output projection; caches are ``CompressedKVCache``.
* **Hybrid routing**: ``mlp_layer_types == "hash_moe"`` layers pick experts with a frozen ``tid2eid[input_ids]``
  table (the token ids travel with the hidden states to every layer), the rest with a learned ``sqrtsoftplus``
  router whose top-k uses ``scores + e_score_correction_bias``; the weights are the selected scores,
  renormalised, times ``routed_scaling_factor``. A shared expert runs beside the routed ones; both use the
  clamped SwiGLU ``silu(min(gate, limit)) * clip(up, +-limit)``. The routed experts (``mlp.experts``) are
  swapped by the loader for ``GatherSwitchGLU`` / ``DiskSwitchGLU``; indices reach them as for any family.
* **MTP draft hook**: transformers builds no MTP module (it drops ``mtp.*``), so the block follows DeepSeek-V4's
  reference ``MTPBlock``: ``x = e_proj(enorm(embed(t_{i+1}))) + h_proj(hnorm(h_i))`` on the main model's final
  hc streams ``h_i``, one decoder block (sliding attention unless the config's ``compress_ratios`` says
  otherwise, learned routing), ``logits = lm_head(norm(hc_head(x)))``. MTP block ``i`` is
  ``model.layers[num_hidden_layers + i]`` (DeepSeek's layer numbering), so its routed experts are swapped and
  streamed like any layer's. Use ``logits, h = model(ids, cache, return_hidden=True)`` then
  ``model.mtp_draft(h[:, -1:], next_token, mtp_cache)`` -> logits of the token after ``next_token``.

Tensor names: the loader accepts the hub's upstream names (``layers.L.attn.wq_a``, ``embed.weight``,
``mtp.0.*``, ...), transformers' save_pretrained names and transformers' module names (``sanitize``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .deepseek_v4_attention import Attention, CompressedKVCache, RMSNorm, Rope, rms

LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
_RATIO_TO_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}


@dataclass
class ModelArgs:
    """transformers' ``DeepseekV4Config`` fields, with its ``__post_init__`` normalisation of legacy keys."""

    model_type: str = "deepseek_v4"
    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    q_lora_rank: int = 1024
    num_experts_per_tok: int = 6
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    layer_types: list | None = None
    mlp_layer_types: list | None = None
    compress_rates: dict | None = None
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    num_nextn_predict_layers: int = 0
    mtp_layer_types: list | None = None
    rms_norm_eps: float = 1e-6
    partial_rotary_factor: float | None = None
    rope_parameters: dict | None = None
    tie_word_embeddings: bool = False
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        names = set(cls.__dataclass_fields__) - {"extra"}
        args = cls(**{k: v for k, v in params.items() if k in names})
        args.extra = {k: v for k, v in params.items() if k not in names}
        args._normalise()
        return args

    def _normalise(self):
        n, ex = self.num_hidden_layers, self.extra
        rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
        rates.update(self.compress_rates or {})
        for key, t in (("compress_rate_csa", LAYER_TYPES[1]), ("compress_rate_hca", LAYER_TYPES[2])):
            if ex.get(key) is not None:
                rates[t] = ex[key]
        self.compress_rates = rates
        ratio_types = None
        if ex.get("compress_ratios") is not None:
            by_rate = {0: LAYER_TYPES[0], rates[LAYER_TYPES[1]]: LAYER_TYPES[1], rates[LAYER_TYPES[2]]: LAYER_TYPES[2]}
            ratio_types = [by_rate.get(r, _RATIO_TO_TYPE.get(r)) for r in ex["compress_ratios"]]
        if self.layer_types is None:
            self.layer_types = ratio_types[:n] if ratio_types else (
                [LAYER_TYPES[2]] * min(n, 2) + [LAYER_TYPES[1] if i % 2 else LAYER_TYPES[2] for i in range(max(n - 2, 0))])
        self.layer_types = list(self.layer_types[:n])
        if self.mtp_layer_types is None:  # upstream compress_ratios lists the MTP layers after the main ones
            tail = ratio_types[n:] if ratio_types else []
            self.mtp_layer_types = [tail[i] if i < len(tail) else LAYER_TYPES[0]
                                    for i in range(self.num_nextn_predict_layers)]
        if self.mlp_layer_types is None:
            n_hash = ex.get("num_hash_layers", 3)
            self.mlp_layer_types = ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash)
        self.mlp_layer_types = list(self.mlp_layer_types[:n])
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        if len(self.layer_types) != n or bad or any(t not in ("hash_moe", "moe") for t in self.mlp_layer_types):
            raise TypeError(f"invalid layer_types / mlp_layer_types for {n} layers")
        if self.partial_rotary_factor is None:
            qk = ex.get("qk_rope_head_dim")
            self.partial_rotary_factor = qk / self.head_dim if qk is not None else 64 / 512
        self.rope_dim = int(self.head_dim * self.partial_rotary_factor)
        rp = self.rope_parameters or ex.get("rope_scaling") or {}
        if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
            self.ropes = {"main": dict(rp["main"]), "compress": dict(rp["compress"])}
        else:
            yarn = {k: v for k, v in rp.items() if k not in ("main", "compress", "rope_theta")}
            compress = {**yarn, "rope_theta": self.compress_rope_theta}
            compress.setdefault("rope_type", compress.pop("type", "default"))
            if compress["rope_type"] == "yarn":
                compress.setdefault("attention_factor", 1.0)
            self.ropes = {"main": {"rope_type": "default", "rope_theta": self.rope_theta}, "compress": compress}
        if self.scoring_func != "sqrtsoftplus":
            raise TypeError(f"scoring_func {self.scoring_func!r} is not supported (sqrtsoftplus)")


def clamped_swiglu(gate, up, limit: float):
    return nn.silu(mx.minimum(gate, limit)) * mx.clip(up, -limit, limit)


class MLP(nn.Module):
    """The shared expert."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        D, inter = args.hidden_size, args.moe_intermediate_size * args.n_shared_experts
        self.gate_proj = nn.Linear(D, inter, bias=False)
        self.up_proj = nn.Linear(D, inter, bias=False)
        self.down_proj = nn.Linear(inter, D, bias=False)
        self.limit = args.swiglu_limit

    def __call__(self, x):
        return self.down_proj(clamped_swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


class Router(nn.Module):
    def __init__(self, args: ModelArgs, hashed: bool):
        super().__init__()
        self.top_k, self.scale, self.hashed = args.num_experts_per_tok, args.routed_scaling_factor, hashed
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))
        if hashed:
            self.tid2eid = mx.zeros((args.vocab_size, args.num_experts_per_tok), dtype=mx.int32)
        else:
            self.e_score_correction_bias = mx.zeros((args.n_routed_experts,))

    def __call__(self, x: mx.array, input_ids: mx.array) -> tuple[mx.array, mx.array]:
        """(indices [..., k], weights [..., k]) for x [..., D] and the token ids input_ids [...]."""
        scores = mx.sqrt(nn.softplus((x @ self.weight.T).astype(mx.float32)))
        if self.hashed:
            inds = self.tid2eid[input_ids]
        else:
            biased = scores + self.e_score_correction_bias
            inds = mx.argpartition(-biased, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        w = mx.take_along_axis(scores, inds, axis=-1)
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-20) * self.scale
        return inds, w.astype(x.dtype)


class _Unswapped(nn.Module):
    """Placeholder for the routed experts; the loader replaces it with a (Gather|Disk)SwitchGLU."""

    def __call__(self, x, indices):
        raise RuntimeError("deepseek_v4: routed experts were not loaded (build the model through load_moe)")


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, hashed: bool):
        super().__init__()
        self.gate = Router(args, hashed)
        self.experts = _Unswapped()
        self.shared_experts = MLP(args)

    def __call__(self, x, input_ids):
        inds, w = self.gate(x, input_ids)
        y = self.experts(x, inds)  # [..., k, D]
        return (y * w[..., None]).sum(axis=-2) + self.shared_experts(x)


class HyperConnection(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hc = args.hc_mult
        self.hc, self.iters, self.eps, self.norm_eps = hc, args.hc_sinkhorn_iters, args.hc_eps, args.rms_norm_eps
        self.fn = mx.zeros(((2 + hc) * hc, hc * args.hidden_size))
        self.base = mx.zeros(((2 + hc) * hc,))
        self.scale = mx.ones((3,))

    def __call__(self, x: mx.array):
        """x [B, S, hc, D] -> (post [B, S, hc], comb [B, S, hc, hc], collapsed [B, S, D])."""
        hc = self.hc
        mixes = rms(x.reshape(*x.shape[:2], -1).astype(mx.float32), self.norm_eps) @ self.fn.T
        pre = mx.sigmoid(mixes[..., :hc] * self.scale[0] + self.base[:hc]) + self.eps
        post = 2 * mx.sigmoid(mixes[..., hc: 2 * hc] * self.scale[1] + self.base[hc: 2 * hc])
        comb = mixes[..., 2 * hc:].reshape(*mixes.shape[:-1], hc, hc) * self.scale[2] + self.base[2 * hc:].reshape(hc, hc)
        comb = mx.softmax(comb, axis=-1, precise=True) + self.eps
        comb = comb / (comb.sum(axis=-2, keepdims=True) + self.eps)
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(axis=-1, keepdims=True) + self.eps)
            comb = comb / (comb.sum(axis=-2, keepdims=True) + self.eps)
        collapsed = (pre[..., None] * x).sum(axis=2).astype(x.dtype)
        return post, comb, collapsed


class HyperHead(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hc = args.hc_mult
        self.eps, self.norm_eps = args.hc_eps, args.rms_norm_eps
        self.hc_fn = mx.zeros((hc, hc * args.hidden_size))
        self.hc_base = mx.zeros((hc,))
        self.hc_scale = mx.ones((1,))

    def __call__(self, x):
        mixes = rms(x.reshape(*x.shape[:2], -1).astype(mx.float32), self.norm_eps) @ self.hc_fn.T
        pre = mx.sigmoid(mixes * self.hc_scale + self.hc_base) + self.eps
        return (pre[..., None] * x).sum(axis=2).astype(x.dtype)


def _mix(post, comb, out, x):
    """post * block output + comb^T @ residual streams."""
    dt = x.dtype
    return post.astype(dt)[..., None] * out[..., None, :] + comb.astype(dt).swapaxes(-1, -2) @ x


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str, mlp_type: str, ropes: dict):
        super().__init__()
        self.self_attn = Attention(args, layer_type, ropes)
        self.mlp = MoE(args, hashed=mlp_type == "hash_moe")
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attn_hc = HyperConnection(args)
        self.ffn_hc = HyperConnection(args)

    def __call__(self, x, input_ids, positions, cache):
        post, comb, collapsed = self.attn_hc(x)
        x = _mix(post, comb, self.self_attn(self.input_layernorm(collapsed), positions, cache), x)
        post, comb, collapsed = self.ffn_hc(x)
        return _mix(post, comb, self.mlp(self.post_attention_layernorm(collapsed), input_ids), x)


class MTPBlock(DecoderLayer):
    """DeepSeek-V4's multi-token-prediction block (see the module docstring); shares embed and lm_head."""

    def __init__(self, args: ModelArgs, layer_type: str, ropes: dict):
        super().__init__(args, layer_type, "moe", ropes)
        D = args.hidden_size
        self.e_proj = nn.Linear(D, D, bias=False)
        self.h_proj = nn.Linear(D, D, bias=False)
        self.enorm = RMSNorm(D, args.rms_norm_eps)
        self.hnorm = RMSNorm(D, args.rms_norm_eps)
        self.norm = RMSNorm(D, args.rms_norm_eps)
        self.hc_head = HyperHead(args)

    def draft(self, embed, hidden, tokens, positions, cache):
        x = self.e_proj(self.enorm(embed(tokens)))[:, :, None] + self.h_proj(self.hnorm(hidden))
        return self.norm(self.hc_head(super().__call__(x, tokens, positions, cache)))


class DeepseekV4Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        ropes = {k: Rope(v, args.rope_dim) for k, v in args.ropes.items()}
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        n = args.num_hidden_layers
        self.layers = [DecoderLayer(args, args.layer_types[i], args.mlp_layer_types[i], ropes) for i in range(n)]
        self.layers += [MTPBlock(args, t, ropes) for t in args.mtp_layer_types]  # layers[n + i]: MTP block i
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.hc_head = HyperHead(args)

    def __call__(self, inputs: mx.array, cache) -> mx.array:
        """Final hc streams [B, S, hc, D]."""
        h = self.embed_tokens(inputs)
        x = mx.broadcast_to(h[:, :, None], (*h.shape[:2], self.args.hc_mult, h.shape[-1]))
        positions = mx.arange(inputs.shape[1]) + cache[0].offset
        for layer, c in zip(self.layers[: self.args.num_hidden_layers], cache):
            x = layer(x, inputs, positions, c)
        return x


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DeepseekV4Model(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def layers(self):
        """The main decoder layers (the MTP blocks follow them in ``model.layers``)."""
        return self.model.layers[: self.args.num_hidden_layers]

    @property
    def mtp_layers(self):
        return self.model.layers[self.args.num_hidden_layers:]

    def make_cache(self) -> list[CompressedKVCache]:
        return [layer.self_attn.make_cache() for layer in self.layers]

    def make_mtp_cache(self) -> list[CompressedKVCache]:
        return [layer.self_attn.make_cache() for layer in self.mtp_layers]

    def __call__(self, inputs: mx.array, cache=None, return_hidden: bool = False):
        if cache is None:
            cache = self.make_cache()
        streams = self.model(inputs, cache)
        m = self.model
        logits = self.lm_head(m.norm(m.hc_head(streams)))
        return (logits, streams) if return_hidden else logits

    def mtp_draft(self, hidden: mx.array, tokens: mx.array, cache=None, depth: int = 0) -> mx.array:
        """The MTP draft hook: logits ``[B, S, V]`` for the tokens that follow ``tokens``.

        ``hidden`` [B, S, hc, D]: the main model's final hc streams at positions p..p+S-1 (``return_hidden``);
        ``tokens`` [B, S]: the tokens at positions p+1..p+S (the ones sampled from those positions); ``cache``:
        this MTP block's caches (``make_mtp_cache()``), advanced like the main model's (positions come from it).
        """
        if not self.mtp_layers:
            raise RuntimeError("deepseek_v4: this checkpoint has no MTP block (num_nextn_predict_layers == 0 "
                               "or no mtp.* tensors)")
        block = self.mtp_layers[depth]
        c = (cache or self.make_mtp_cache())[depth]
        positions = mx.arange(tokens.shape[1]) + c.offset
        return self.lm_head(block.draft(self.model.embed_tokens, hidden, tokens, positions, c))

    def sanitize(self, weights: dict[str, Any]) -> dict[str, Any]:
        n = self.args.num_hidden_layers
        out = {}
        for k, v in weights.items():
            k = rename(k, n)
            if k.endswith(".tid2eid"):
                v = v.astype(mx.int32)
            out[k] = v
        return out


_TOP = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight", "norm.weight": "model.norm.weight",
        "hc_head_fn": "model.hc_head.hc_fn", "hc_head_base": "model.hc_head.hc_base",
        "hc_head_scale": "model.hc_head.hc_scale"}
_LAYER = [  # transformers' conversion_mapping["deepseek_v4"], on a layer-local name
    (r"^attn_norm\.", "input_layernorm."), (r"^ffn_norm\.", "post_attention_layernorm."),
    (r"^hc_(attn|ffn)_(fn|base|scale)$", r"\1_hc.\2"), (r"^hc_head_(fn|base|scale)$", r"hc_head.hc_\1"),
    (r"^attn\.indexer\.compressor\.", "self_attn.compressor.indexer."),
    (r"^attn\.indexer\.wq_b\.", "self_attn.compressor.indexer.q_b_proj."),
    (r"^attn\.indexer\.weights_proj\.", "self_attn.compressor.indexer.scorer.weights_proj."),
    (r"^attn\.", "self_attn."), (r"^ffn\.", "mlp."),
    (r"^mlp\.gate\.bias$", "mlp.gate.e_score_correction_bias"),
    (r"^mlp\.shared_experts\.w1\.", "mlp.shared_experts.gate_proj."),
    (r"^mlp\.shared_experts\.w2\.", "mlp.shared_experts.down_proj."),
    (r"^mlp\.shared_experts\.w3\.", "mlp.shared_experts.up_proj."),
]
_ATTN = [(r"\.attn_sink$", ".sinks"), (r"\.wq_a\.", ".q_a_proj."), (r"\.q_norm\.", ".q_a_norm."), (r"\.wq_b\.", ".q_b_proj."),
         (r"\.wkv\.", ".kv_proj."), (r"\.wgate\.", ".gate_proj."), (r"\.norm\.", ".kv_norm."), (r"\.ape$", ".position_bias"),
         (r"\.wo_a\.", ".o_a_proj."), (r"\.wo_b\.", ".o_b_proj.")]


def rename(k: str, num_layers: int) -> str:
    """A checkpoint tensor name (upstream hub, transformers-saved or transformers module names) -> ours."""
    if k in _TOP:
        return _TOP[k]
    if k.startswith("model.") and k[6:] in _TOP:
        return _TOP[k[6:]]
    m = re.match(r"^(?:model\.)?(layers|mtp)\.(\d+)\.(.*)$", k)
    if not m:
        return k
    idx = int(m.group(2)) + (num_layers if m.group(1) == "mtp" else 0)
    rest = m.group(3)
    for pat, rep in _LAYER:
        rest = re.sub(pat, rep, rest)
    if rest.startswith("self_attn."):
        rest = "self_attn" + "".join(_sub_all("." + p, _ATTN) for p in [rest[len("self_attn."):]])
    return f"model.layers.{idx}.{rest}"


def _sub_all(s: str, rules) -> str:
    for pat, rep in rules:
        s = re.sub(pat, rep, s)
    return s
