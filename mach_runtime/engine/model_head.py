"""A loaded model as its text body + LM head, so logits can be computed for chosen positions only.

A prefill needs the logits of each row's last prompt token, not of every position: the head of a 512-token chunk
is a [512, H] x [H, V] matmul (for a 150k vocabulary larger than the rest of the forward). The caller runs the
model's own text model ``inner`` (its own masks, caches, MoE blocks, hooks; the whole model where ``splits`` is
False) once, and ``logits_of`` applies the head to the picked hidden states only: exactly what the model's
``__call__`` applies after its text model (an ``hc_head`` collapse and final norm where the family has them
(deepseek_v4), the tied embedding or ``lm_head``, a final logit softcap (gemma4)). The speculative target
(``specdec.target.TargetOps``) uses the same pieces.
"""

from __future__ import annotations

import mlx.core as mx


class ModelHead:
    def __init__(self, model):
        self.model = model
        self.owner = getattr(model, "language_model", model)  # holds lm_head and the text args
        self.inner = getattr(self.owner, "model", None)
        args = getattr(self.owner, "args", None)
        self.tied = bool(getattr(args, "tie_word_embeddings", False)) or not hasattr(self.owner, "lm_head")
        self.softcap = getattr(self.owner, "final_logit_softcapping", None)
        self.final = None  # applied to the text model's output before the head
        if self.inner is not None and hasattr(self.inner, "hc_head"):  # deepseek_v4's residual streams
            self.final = lambda h: self.inner.norm(self.inner.hc_head(h))
        # the split needs the text model and the head it is read off; otherwise the whole forward, then a pick
        self.splits = self.inner is not None and (hasattr(self.owner, "lm_head") or (
            self.tied and hasattr(getattr(self.inner, "embed_tokens", None), "as_linear")))

    def head(self, hidden: mx.array) -> mx.array:
        """Logits from the text model's output (final-normed hidden states, after ``final``)."""
        out = self.inner.embed_tokens.as_linear(hidden) if self.tied else self.owner.lm_head(hidden)
        if self.softcap:
            out = mx.tanh(out / self.softcap) * self.softcap
        return out

    def logits_of(self, out: mx.array, rows: list[int], cols: list[int]) -> mx.array:
        """The logits [k, V] of row ``rows[j]``'s column ``cols[j]`` of a forward's output [B, T, ...]: of ``inner``
        (or the model's own logits where it does not split)."""
        picked = out[mx.array(rows), mx.array(cols)]
        if not self.splits:
            return picked
        h = picked[:, None]
        if self.final is not None:
            h = self.final(h)
        return self.head(h)[:, 0]
