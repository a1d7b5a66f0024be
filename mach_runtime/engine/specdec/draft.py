"""Drafters: who proposes the block a cycle verifies.

* ``DFlashDrafter``: a DFlash block-diffusion draft (dflash-mlx's ``DFlashDraftModel``). It has no embedding or
  head of its own: the block ``[staged, MASK × (b−1)]`` is embedded with the target's ``embed_tokens``, attends
  (bidirectionally) to K/V projected from the target's captured hidden states of every committed token, and its
  outputs at positions 1..b−1 go through the target's LM head; argmax gives the b−1 drafts, in one draft pass.
  Committed context reaches the draft lazily: hidden rows are queued by ``observe`` and appended to the draft's
  context cache (sink + window rows in a fixed ring, ``draft_cache.py``) on the next ``propose``, which runs as
  one compiled graph where ``compiled_draft.py`` applies. ``snapshot`` / ``resume`` carry that context (a
  ``DraftState``) from one request to a later one that reuses the same KV prefix (sessions).
  ``batched_dflash_logits``: the draft pass of several such drafters (one per request of a batch) at once.
* ``PromptLookupDrafter``: draft-free (CopySpec-style prompt lookup). If the last n tokens (n from
  ``max_ngram`` down to ``min_ngram``) occurred earlier in prompt + completion, propose what followed them.

Drafts are deterministic, so the acceptance rule uses a one-hot q (see ``sampling.accept``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ...errors import CheckpointError, CheckpointNotFoundError, ConfigError
from .draft_cache import RingDraftCache


def read_draft_config(path) -> dict:
    p = Path(path)
    if not (p / "config.json").exists():
        raise CheckpointNotFoundError(f"{p}: no config.json; pass a DFlash draft checkpoint directory")
    try:
        cfg = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p / 'config.json'}: not valid JSON ({e})") from None
    dc = cfg.get("dflash_config")
    if not isinstance(cfg.get("block_size"), int) or not isinstance(dc, dict) or "mask_token_id" not in dc:
        raise CheckpointError(
            f"{p / 'config.json'}: not a DFlash draft config: it needs an integer 'block_size' and "
            "'dflash_config': {'mask_token_id': ..., 'target_layer_ids': [...]}"
        )
    return cfg


def load_dflash_draft(path):
    """Loads a DFlash draft checkpoint (config with ``block_size`` and ``dflash_config``) → DFlashDraftModel."""
    from mlx_lm.utils import load_model

    try:
        from dflash_mlx.model import DFlashDraftModel, DFlashDraftModelArgs
    except ImportError as e:  # pragma: no cover - the [dflash] extra
        raise ConfigError(f"NATIVE_V7 needs dflash-mlx (pip install 'mach_runtime[dflash]'): {e}") from None
    from ...io.hf_cache import resolve_checkpoint

    p = resolve_checkpoint(path)  # a local directory or a repository id in the Hugging Face cache
    read_draft_config(p)
    try:
        model, _ = load_model(p, get_model_classes=lambda config: (DFlashDraftModel, DFlashDraftModelArgs))
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{p}: cannot load the DFlash draft ({e})") from None
    model.eval()
    return model


def save_dflash_draft(model, path) -> Path:
    """Writes a DFlashDraftModel as a DFlash checkpoint (config.json + model.safetensors)."""
    from dataclasses import asdict

    from mlx.utils import tree_flatten

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    cfg = asdict(model.args)
    cfg["layer_types"] = list(cfg["layer_types"])
    cfg["dflash_config"] = dict(cfg.get("dflash_config") or {})
    cfg["dflash_config"].setdefault("target_layer_ids", list(model.target_layer_ids))
    cfg["dflash_config"].setdefault("mask_token_id", model.mask_token_id)
    (p / "config.json").write_text(json.dumps(cfg, indent=1))
    mx.save_safetensors(str(p / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return p


class Drafter:
    """Protocol: ``start`` per request, ``observe`` committed hidden rows, ``propose`` up to n drafts."""

    needs_hidden = False
    capture_layer_ids: tuple = ()

    def start(self, prompt_ids: list[int]) -> None:
        pass

    def resume(self, state, n_tokens: int) -> bool:
        """Called after ``start`` when the target's KV already covers the first ``n_tokens`` tokens (a reused
        prefix; only the rest is prefilled and observed). ``state``: a ``snapshot`` of an earlier request that
        covers at least those tokens, or None. Returns True if the drafter continues from ``state``."""
        return False

    def snapshot(self, n_tokens: int):
        """The drafter's context for the first ``n_tokens`` committed tokens of the request just run (for a later
        request's ``resume``), or None; the drafter lets go of it (call once, after the request)."""
        return None

    def observe(self, hidden) -> None:
        pass

    def propose(self, history: list[int], staged: int, n: int) -> "list[int] | mx.array":
        """Up to ``n`` draft tokens following ``staged``; ``history`` = prompt + completion (ends with staged).
        A list, or an unevaluated ``mx.array`` of exactly ``n`` tokens (the engine then needs no sync for it)."""
        raise NotImplementedError


@dataclass
class DraftState:
    """A ``DFlashDrafter``'s context after a request: its draft context caches (one ``RingDraftCache``
    per draft layer, positions = token positions) and the captured hidden rows not yet appended to them; together
    they cover the first ``n_tokens`` tokens. Owned by whoever holds it: a ``resume`` extends it in place."""

    draft: object  # the draft model it belongs to
    cache: list
    pending: list
    n_tokens: int

    def trim(self, n_tokens: int) -> None:
        """Drops the context of every token at position >= ``n_tokens`` (pending rows first, then cached rows)."""
        drop = self.n_tokens - n_tokens
        if drop <= 0:
            return
        while drop and self.pending:
            rows = self.pending[-1].shape[0]
            if rows <= drop:
                self.pending.pop()
                drop -= rows
            else:
                self.pending[-1] = self.pending[-1][: rows - drop]
                drop = 0
        if drop:
            for c in self.cache:
                c.trim(n_tokens)
        self.n_tokens = n_tokens


class DFlashDrafter(Drafter):
    needs_hidden = True

    def __init__(self, draft_model, target_ops, sink: int = 64, window: int = 1024):
        self.draft = draft_model
        self.target = target_ops
        self.capture_layer_ids = tuple(int(i) for i in draft_model.target_layer_ids)
        self.mask_token_id = int(draft_model.mask_token_id)
        self.block_size = int(draft_model.block_size)
        self.sink, self.window = sink, window
        self.dtype = draft_model.fc.weight.dtype
        self.cache = None
        self.pending: list = []
        self.compiled = None  # a ``compiled_draft.CompiledDraft`` (set by the engine; config ``compile_draft``)

    def start(self, prompt_ids):
        self.cache = [RingDraftCache(self.sink, self.window) for _ in self.draft.layers]
        self.pending = []

    def resume(self, state, n_tokens):
        """Continues from ``state`` (trimmed to ``n_tokens``) when it belongs to this draft and covers them.
        Otherwise the context starts at position ``n_tokens`` with no rows before it: the draft then sees only
        the tokens prefilled from here on (drafts stay verified, so output is unchanged; acceptance may be lower
        until the window fills)."""
        ok = (isinstance(state, DraftState) and state.draft is self.draft and state.n_tokens >= n_tokens
              and len(state.cache) == len(self.draft.layers))
        if ok:
            state.trim(n_tokens)
            self.cache, self.pending = state.cache, list(state.pending)
            return True
        for c in self.cache:
            c.offset = n_tokens
        return False

    def snapshot(self, n_tokens):
        if self.cache is None:
            return None
        covered = self.cache[0].offset + sum(h.shape[0] for h in self.pending)
        if covered < n_tokens:
            return None
        state = DraftState(self.draft, self.cache, self.pending, covered)
        state.trim(n_tokens)
        self.cache, self.pending = None, []
        return state

    def observe(self, hidden) -> None:
        """Queues committed rows; they are projected into the context on the next ``propose``, or here once
        they reach the context's size (sink + window rows: long prompts, long target-only stretches), so rows a
        request never drafts after are not projected at all."""
        if hidden is not None and hidden.shape[0]:
            self.pending.append(hidden)
            self.pending_rows += hidden.shape[0]
            if self.pending_rows >= self.sink + self.window:  # all but the last row: a draft pass always has
                ctx = self._take_context(keep=1)  # context rows to append (dflash-mlx's layers need >= 1)
                self.draft.advance_projected_context_cache(draft_context=ctx, cache=self.cache)
                mx.eval([c.keys for c in self.cache])

    @property
    def pending(self) -> list:
        """Captured hidden rows [n, k*H] not yet in the context cache, oldest first."""
        return self._pending

    @pending.setter
    def pending(self, rows: list) -> None:
        self._pending = rows
        self.pending_rows = sum(h.shape[0] for h in rows)

    def _take_context(self, keep: int = 0) -> mx.array:
        """The pending rows, projected ([1, n, H]), but the last ``keep``, which stay pending."""
        ctx = self.pending[0] if len(self.pending) == 1 else mx.concatenate(self.pending, axis=0)
        n = ctx.shape[0] - keep
        self.pending = [ctx[n:]] if keep else []
        return self.draft.project_target_hidden(ctx[None, :n].astype(self.dtype))

    def masks(self, n: int) -> int:
        """Masked positions of a draft pass that proposes ``n`` tokens: at least the draft's own block (its
        ``block_size`` − 1), whose first ``n`` predictions are kept. A DFlash draft is trained on blocks of exactly
        that shape (the queries attend bidirectionally within the block), and the demo draft fed a shorter block
        proposes far worse: on the model card's 8 held-out prompts (CPU) it accepted 0.03-0.56 drafts per cycle
        at 8-token blocks (6.5 on the one easy prompt) against 1.7-4.5 at 16, where the first 7 of a full
        block's drafts are what a verify of 8 would take. A shorter verify therefore costs acceptance only by
        truncation; the draft pass costs about the same on a GPU (launch-bound) and more on a CPU, where drafting
        does not pay at any length."""
        return max(int(n), self.block_size - 1)

    def draft_logits(self, staged: int, n: int) -> mx.array:
        """Logits [n, V] of the draft at the first n masked positions of one draft pass over ``masks(n)``
        (advances the context cache)."""
        ctx = self._take_context() if self.pending else mx.zeros((1, 0, self.draft.args.hidden_size), self.dtype)
        block = mx.array([staged] + [self.mask_token_id] * self.masks(n), dtype=mx.uint32)
        noise = self.target.embed(block[None]).astype(self.dtype)
        h = self.draft.forward_projected_context(noise_embedding=noise, draft_context=ctx, cache=self.cache)
        return self.target.head(h[0, 1 : 1 + n])

    def propose(self, history, staged, n):
        """Lazy: the engine appends these to the verify block without waiting for the draft pass."""
        if self.compiled is not None and self.compiled.applies():
            if self.pending_rows > self.compiled.pad:  # a prompt's rows: appended op by op
                self.draft.advance_projected_context_cache(draft_context=self._take_context(), cache=self.cache)
            m = self.masks(n)
            drafts = self.compiled.propose(staged, m)
            return drafts if m == n else drafts[:n]
        return mx.argmax(self.draft_logits(staged, n), axis=-1)


def check_draft(target, draft) -> None:
    """Raises ``ConfigError`` unless the DFlash ``draft`` fits the target (``TargetOps``): hidden size, tapped
    layers, and the input width of its ``fc``."""
    H = target.hidden_size
    if int(draft.args.hidden_size) != H:
        raise ConfigError(f"draft hidden_size {draft.args.hidden_size} does not match the target's {H}")
    ids = list(draft.target_layer_ids)
    if any(not 0 <= i < target.num_layers for i in ids):
        raise ConfigError(f"draft target_layer_ids {ids} outside the target's {target.num_layers} layers")
    if int(draft.fc.weight.shape[-1]) != len(ids) * H:
        raise ConfigError(f"draft fc expects {draft.fc.weight.shape[-1]} inputs, {len(ids)} layers × {H} given")


def batchable_dflash(d) -> bool:
    """A plain ``DFlashDrafter`` (not a subclass with its own ``propose``) over a full-attention draft whose
    context caches are sink + window ``RingDraftCache``s: one batched draft pass can stand in for its
    ``propose``."""
    if type(d) is not DFlashDrafter or d.cache is None:
        return False
    if any(type(c) is not RingDraftCache for c in d.cache):
        return False
    return all(layer.self_attn.sliding_window is None and type(layer.self_attn.rope) is nn.RoPE
               for layer in d.draft.layers)


def batched_dflash_logits(drafters: list, staged: list[int], n: int) -> mx.array:
    """Draft logits [B, n, V] of several ``DFlashDrafter`` rows (same draft model) in one draft pass: what each
    row's ``draft_logits(staged[i], n)`` gives, with the rows' contexts (different lengths) left-padded and
    masked. Each row's pending context rows are first appended to its own context cache (the draft's
    ``advance_projected_context_cache``: projections only), then every draft layer runs once over [B, 1 + n]:
    queries and block keys at each row's own position (its cache offset), keys = [row context ; block], no
    causal mask inside the block (DFlash attends bidirectionally), padding masked out."""
    d0 = drafters[0]
    draft, target = d0.draft, d0.target
    for d in drafters:
        if d.pending:
            draft.advance_projected_context_cache(draft_context=d._take_context(), cache=d.cache)
    B, T = len(drafters), d0.masks(n) + 1
    block = mx.array([[int(s)] + [d0.mask_token_id] * (T - 1) for s in staged], dtype=mx.uint32)
    h = target.embed(block).astype(d0.dtype) * getattr(draft, "embed_scale", 1.0)
    offsets = mx.array([int(d.cache[0].offset) for d in drafters], dtype=mx.int32)
    lengths = [d.cache[0].cache_length() for d in drafters]
    width = max(lengths)
    mask = None
    if min(lengths) < width:
        key_pos = mx.arange(width + T)[None]
        mask = (key_pos >= mx.array([width - L for L in lengths])[:, None])[:, None, None, :]  # [B, 1, 1, W + T]
    for li, layer in enumerate(draft.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = attn.q_norm(attn.q_proj(x).reshape(B, T, attn.n_heads, -1)).transpose(0, 2, 1, 3)
        k = attn.k_norm(attn.k_proj(x).reshape(B, T, attn.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = attn.v_proj(x).reshape(B, T, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q = attn.rope(q, offset=offsets)
        k = attn.rope(k, offset=offsets)
        ctx_k, ctx_v = [], []
        for d, L in zip(drafters, lengths):
            ck, cv = d.cache[li].fetch()
            if L == 0:
                ck = mx.zeros((1, k.shape[1], 0, k.shape[3]), k.dtype)
                cv = mx.zeros((1, v.shape[1], 0, v.shape[3]), v.dtype)
            if L < width:
                pad = [(0, 0), (0, 0), (width - L, 0), (0, 0)]
                ck, cv = mx.pad(ck, pad), mx.pad(cv, pad)
            ctx_k.append(ck)
            ctx_v.append(cv)
        keys = mx.concatenate([mx.concatenate(ctx_k, axis=0), k], axis=2) if width else k
        values = mx.concatenate([mx.concatenate(ctx_v, axis=0), v], axis=2) if width else v
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=attn.scale, mask=mask)
        h = h + attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return target.head(draft.norm(h)[:, 1 : 1 + n])


class PromptLookupDrafter(Drafter):
    def __init__(self, max_ngram: int = 4, min_ngram: int = 2):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, history, staged, n):
        L = len(history)
        for size in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            key = history[L - size :]
            # latest earlier occurrence whose continuation is known
            for start in range(L - size - 1, -1, -1):
                if history[start : start + size] == key:
                    cont = history[start + size : start + size + n]
                    if cont:
                        return list(cont)
        return []
