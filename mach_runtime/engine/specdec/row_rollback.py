"""Per-row rollback of a batched verify (``BatchedSpecDecoder``, see its module doc, step 5): attention rows trimmed
by the common excess and the rest rolled into masked left padding; GatedDeltaNet state replayed per row from the
tape, or restored from a snapshot and the kept tokens re-run."""

from __future__ import annotations

import mlx.core as mx

from .target import rollback
from . import verify_cache as _vc
from .verify_cache import drop_front


class RowRollback:
    """Mixin of ``BatchedSpecDecoder``: needs ``cache``, ``rows``, ``_attn``, ``_recurrent``, ``tape``,
    ``target`` and ``counters``."""

    def _rollback(self, tokens: mx.array, b: int, keeps: list[int], ckpt) -> bool:
        """Undoes each row's rejected tail (b − keeps[i] positions). Returns True if the kept tokens were
        re-run (recurrent state restored from ``ckpt``)."""
        if min(keeps) >= b:
            if self.tape is not None:
                self.tape.clear()
            return False
        rerun = False
        if self._recurrent:
            tape = self.tape
            if tape is not None and all(tape.can_replay(self.cache[i], b, rows=True) for i in self._recurrent):
                keep_arr = mx.array(keeps, dtype=mx.int32)
                for i in self._recurrent:
                    self.tape.replay_rows(self.cache[i], keep_arr, max(keeps))
            else:
                rerun = True
            if self.tape is not None:
                self.tape.clear()
        if rerun:
            self._rerun(tokens, b, keeps, ckpt)
        else:
            self._trim_rows([b - k for k in keeps])
        return rerun

    def _trim_rows(self, excess: list[int]) -> None:
        """Drops the last ``excess[i]`` positions of row i from every attention cache (see the module doc)."""
        m = min(excess)
        extra = [e - m for e in excess]
        roll = any(extra)
        for j in self._attn:
            c = self.cache[j]
            if m:
                c.trim(m)
            if roll:
                c.prepare(right_padding=extra)
                c.finalize()

    def _compact(self) -> None:
        """Slices off the left padding every row has (as ``BatchKVCache.filter`` does; ``verify_cache.drop_front``), in
        whole ``KV_BUCKET``s (rarely: a bucketed buffer is copied to keep its capacity). Row i's padding is ``_idx``
        minus its cached tokens, known on the host."""
        if not self._attn or not self.rows:
            return
        first = self.cache[self._attn[0]]
        lp = min(first.size() - (len(r.history) - 1) for r in self.rows)
        lp -= lp % _vc.KV_BUCKET  # read at call time (tests set a small bucket)
        if lp <= 0:
            return
        self.counters["compactions"] += 1
        for j in self._attn:
            drop_front(self.cache[j], lp)

    def _rerun(self, tokens: mx.array, b: int, keeps: list[int], ckpt) -> None:
        """Recurrent state back to the cycle start (snapshot), attention trimmed to it, then each row's kept
        tokens run again in one right-padded forward (``lengths`` for the recurrent layers, the padding rolled to
        the left of the attention rows by ``finalize``)."""
        rollback(self.cache, ckpt, b, 0)  # restores the snapshots, trims the others by b
        kmax = max(keeps)
        for j in self._attn:
            self.cache[j].prepare(right_padding=[kmax - k for k in keeps])
        for j in self._recurrent:
            self.cache[j].prepare(lengths=keeps)
        self.target.forward_batch(tokens[:, :kmax], self.cache, (), logits="none")
        for c in self.cache:
            c.finalize()
        mx.eval([c.state for c in self.cache])

