"""Block policies: how many tokens the next cycle verifies (1 = a target-only step, no drafts). A DFlash draft
pass always covers the draft's whole block; a shorter cycle verifies its first tokens (``DFlashDrafter.masks``).

``block_len(ctx_len)`` is asked before each cycle; ``observe(block_len, accepted, bytes_read)`` is told what it
gave. Selectable by name (``make_policy``):

``fixed``
    Always the full block.

``opencode-sampled-v1`` (default; thresholds from dflash-mlx's adaptive policy, made deterministic)
    Per cycle: commits = accepted + 1; over a window, *acceptance* = accepted drafts / commits (= 1 − 1/tpc)
    and *tpc* = commits / cycles.
    * full → reduced (block ``min_block`` = 4) when, over the last 4 full cycles, acceptance < 0.75 or
      tpc < 3.5;
    * reduced → probe after 64 reduced cycles (8 full-block probe cycles), or early (4 probe cycles) once
      ≥ 16 reduced cycles have run and ≥ 75 % of the last 8 were fully accepted;
    * probe → full when probe acceptance ≥ 0.80, probe tpc ≥ 3.5 and probe tpc ≥ the reduced tpc;
      otherwise back to reduced (a failed early probe locks early probes out until the next regular one).
    dflash-mlx also compares wall-clock tok/s of probe vs reduced; we compare tokens per cycle so the policy
    is deterministic (and testable); prompts ≥ 32K tokens start reduced, as there.

``residency-aware`` (streaming residency)
    A verify over b tokens routes all b through every MoE layer, so it touches the *union* of their experts;
    every miss is read from disk. Cost model, per cycle with block b:
    * tokens committed  T(b) (``Acceptance``: the product-limit curve of recent cycles weighted by their age
      in tokens, around the engine's recent cycles; α = the per-draft acceptance of the same cycles);
    * bytes read        R(1) = R1, the EMA of measured target-only steps; for b > 1 the bank model
      R(b) = s · L · D(b) · (1 − h) · expert_bytes, D(b) = E(1 − (1 − k/E)^b) the distinct experts b tokens
      route to per layer (uniform routing: the union saturates at E), h the bank's hit rate, and s the EMA of
      measured / modelled bytes of past verifies of that block length (else of any length; before any,
      s = R1 / model(1)). Routing is not uniform (consecutive tokens share experts), so while the ledgers are
      positive it measures the next larger block once every 16 drafting cycles;
    * seconds           t(b): the median of the engine's recent cycles of length b (shared by its requests,
      as ``throughput`` keeps them); t(1) is a target-only step.
    It verifies b* = argmin R(b)/T(b) over {1, 2, 4, 8, …, b_acc} (b_acc: what ``opencode-sampled-v1`` allows;
    ties → the larger b) among the b expected to take no longer per token than target-only
    (t(b)/T(b) ≤ t(1), where measured), and falls back to target-only (b = 1) when no b beats R1/1, for ``hold``
    (16) steps before it asks the model again (its inputs move slowly; the decision costs host time per step).
    Before any drafting cycle was measured it explores with the cheapest one (b = 2), unless the engine's timings
    show a 2-token cycle costs ≥ 2 target-only steps (then nothing can pay: a CPU).
    *Never loses to target-only, in bytes or in time per committed token*: two ledgers are kept over the
    drafting cycles (target-only steps are the baseline itself): bytes, credit += R1 · committed − bytes_read,
    and seconds, time_credit += t(1) · committed − t(b) (a length's first cycle, where a GPU compiles its
    kernels, left out). A drafting cycle starts only while both are ≥ 0, so the drafting cycles cost at most
    target-only's bytes and time for the tokens they commit plus what one cycle can overshoot. While a ledger
    is negative it decodes target-only (pipelined, as TARGET_ONLY) and allows one block-2 probe every
    ``probe_interval`` (64) target-only steps, so a warming bank can re-enable drafting, spaced further where
    a probe's measured loss in time would exceed ``probe_budget`` (2 %) of the target-only time between probes;
    ``probe_interval=0`` is the strict bound. With stacked residency (nothing read) it is
    ``opencode-sampled-v1``.

``throughput``
    The block length that commits the most tokens per second as measured on this machine
    (``ThroughputPolicy``): full blocks where a verify costs about the same at any length (launch-bound GPUs),
    short blocks or target-only steps where it costs ~b single steps (CPUs).
"""

from __future__ import annotations

from collections import deque

from ...errors import ConfigError
from .policy_memory import Acceptance, PolicyMemory


class FixedPolicy:
    name = "fixed"

    def __init__(self, block_size: int):
        self.block_size = block_size

    def block_len(self, ctx_len: int = 0) -> int:
        return self.block_size

    def observe(self, block_len: int, accepted: int, bytes_read: int = 0, seconds: float = 0.0) -> None:
        pass


def _window_stats(commits) -> tuple[float, float]:
    cycles, total = len(commits), sum(commits)
    if cycles == 0 or total == 0:
        return 0.0, 0.0
    return (total - cycles) / total, total / cycles


class OpenCodeSampledV1Policy:
    name = "opencode-sampled-v1"

    def __init__(self, block_size: int, *, min_block: int = 4, window: int = 4, drop_acceptance: float = 0.75,
                 tpc_threshold: float = 3.5, resume_acceptance: float = 0.80, reduced_burst: int = 64,
                 probe_cycles: int = 8, early_probe_cycles: int = 4, early_probe_min: int = 16,
                 early_probe_window: int = 8, early_probe_full: float = 0.75, long_context: int = 32768,
                 prompt_len: int = 0):
        self.full = block_size
        self.min_block = min(min_block, block_size)
        self.window, self.drop_acceptance, self.tpc_threshold = window, drop_acceptance, tpc_threshold
        self.resume_acceptance, self.reduced_burst = resume_acceptance, reduced_burst
        self.probe_cycles, self.early_probe_cycles = probe_cycles, early_probe_cycles
        self.early_probe_min, self.early_probe_full = early_probe_min, early_probe_full
        self.mode = "full"
        self.full_commits: deque = deque(maxlen=window)
        self.reduced_commits: deque = deque(maxlen=32)
        self.reduced_full: deque = deque(maxlen=early_probe_window)
        self.probe_commits: list = []
        self.reduced_since_probe = 0
        self.probe_left = 0
        self.early_lockout = False
        self.probe_early = False
        self.transitions: list[str] = []
        if block_size <= self.min_block:
            self.mode = "fixed"  # nothing to adapt
        elif prompt_len >= long_context:
            self._enter_reduced()

    def block_len(self, ctx_len: int = 0) -> int:
        return self.min_block if self.mode == "reduced" else self.full

    def _enter_reduced(self) -> None:
        self.mode = "reduced"
        self.reduced_since_probe = 0
        self.reduced_commits.clear()
        self.reduced_full.clear()
        self.full_commits.clear()
        self.transitions.append("reduced")

    def _enter_probe(self, early: bool) -> None:
        self.mode = "probe"
        self.probe_early = early
        self.probe_left = self.early_probe_cycles if early else self.probe_cycles
        self.probe_commits = []
        self.transitions.append("probe")

    def observe(self, block_len: int, accepted: int, bytes_read: int = 0, seconds: float = 0.0) -> None:
        if block_len <= 1 or self.mode == "fixed":
            return
        commits = accepted + 1
        if self.mode == "full":
            self.full_commits.append(commits)
            if len(self.full_commits) >= self.window:
                acc, tpc = _window_stats(self.full_commits)
                if acc < self.drop_acceptance or tpc < self.tpc_threshold:
                    self._enter_reduced()
        elif self.mode == "reduced":
            self.reduced_since_probe += 1
            self.reduced_commits.append(commits)
            self.reduced_full.append(accepted >= block_len - 1)
            if self.reduced_since_probe >= self.reduced_burst:
                self._enter_probe(early=False)
                self.early_lockout = False
            elif (not self.early_lockout and self.reduced_since_probe >= self.early_probe_min
                  and len(self.reduced_full) == self.reduced_full.maxlen
                  and sum(self.reduced_full) >= self.early_probe_full * len(self.reduced_full)):
                self._enter_probe(early=True)
        else:  # probe
            self.probe_commits.append(commits)
            self.probe_left -= 1
            if self.probe_left <= 0:
                acc, tpc = _window_stats(self.probe_commits)
                _, reduced_tpc = _window_stats(self.reduced_commits)
                if acc >= self.resume_acceptance and tpc >= self.tpc_threshold and tpc >= reduced_tpc:
                    self.mode = "full"
                    self.full_commits.clear()
                    self.transitions.append("full")
                else:
                    lock = self.probe_early
                    self._enter_reduced()
                    self.early_lockout = lock


class ResidencyAwarePolicy:
    name = "residency-aware"

    def __init__(self, block_size: int, store=None, *, prompt_len: int = 0, alpha_window: int = 32,
                 ema: float = 0.2, probe_interval: int = 64, warmup_steps: int = 2, explore_every: int = 16,
                 memory: PolicyMemory | None = None, probe_budget: float = 0.02, hold: int = 16):
        """``memory``: cycle timings and recent acceptance shared by an engine's requests (as ``throughput``);
        ``hold``: target-only steps taken on a target-only choice before the model is asked again."""
        self.hold, self.hold_left = max(1, hold), 0
        self.base = OpenCodeSampledV1Policy(block_size, prompt_len=prompt_len)
        self.memory = memory if memory is not None else PolicyMemory()
        self.probe_budget = probe_budget
        self.time_credit = 0.0  # seconds: target-only's time for the tokens drafting committed, minus its time
        self.block_size = block_size
        self.store = store
        self.ema = ema
        self.probe_interval = probe_interval
        self.warmup_left = warmup_steps
        self.acceptance = Acceptance(alpha_window, self.memory)
        self.r1: float | None = None  # bytes of a one-token forward
        self.verify_scale: float | None = None  # measured / modelled bytes of drafting verifies (all b)
        self.scale_by_block: dict[int, float] = {}  # the same, per block length
        self.explore_every = explore_every
        self.drafting_cycles = 0
        self.credit = 0.0
        self.since_probe = 0
        self.last_choice = block_size
        self.decisions: list[int] = []

    # -- model --------------------------------------------------------------------------------------------
    @property
    def streaming(self) -> bool:
        return self.store is not None and getattr(self.store, "residency", "stacked") == "streaming"

    @property
    def alpha(self) -> float:
        return self.acceptance.alpha

    def expected_tokens(self, b: int, alpha: float | None = None) -> float:
        return self.acceptance.expected_tokens(b, alpha)

    def _prior_bytes(self, b: int, s=None) -> float:
        s = s if s is not None else self.store.stats()
        layout = self.store.layout
        E, k = s.num_experts, layout.top_k
        distinct = E * (1 - (1 - k / E) ** b)
        return s.layers * distinct * (1 - s.hit_rate) * s.expert_bytes

    def expected_bytes(self, b: int, s=None) -> float:
        """``s``: the store's stats, when the caller has them already."""
        s = s if s is not None else self.store.stats()
        r1 = self.r1 if self.r1 is not None else self._prior_bytes(1, s)
        if b == 1:
            return r1
        scale = self.scale_by_block.get(b, self.verify_scale)
        if scale is not None:
            return self._prior_bytes(b, s) * scale
        prior1 = self._prior_bytes(1, s)
        return self._prior_bytes(b, s) * (r1 / prior1 if prior1 > 0 else 1.0)

    def seconds(self, b: int) -> float | None:
        return self.memory.seconds(b)

    def time_ok(self, b: int) -> bool:
        """A cycle of b is expected to take at most target-only's time for the tokens it commits (or the costs
        are not measured yet)."""
        t1, tb = self.seconds(1), self.seconds(b)
        return t1 is None or tb is None or tb <= t1 * self.expected_tokens(b) * (1 + 1e-9)

    def _probe_due(self) -> bool:
        """While a ledger is negative: one block-2 probe every ``probe_interval`` target-only steps, and, where
        its measured loss in time is known, no more often than keeps that loss under ``probe_budget`` of the
        target-only time in between."""
        if not self.probe_interval:
            return False
        every = self.probe_interval
        t1, t2 = self.seconds(1), self.seconds(2)
        if t1 and t2:
            loss = t2 - t1 * self.expected_tokens(2)
            if loss > 0:
                every = max(every, int(loss / (self.probe_budget * t1)) + 1)
        return self.since_probe >= every

    def candidates(self, b_acc: int) -> list[int]:
        out, b = [1], 2
        while b < b_acc:
            out.append(b)
            b *= 2
        if b_acc > 1:
            out.append(b_acc)
        return out

    # -- policy -------------------------------------------------------------------------------------------
    def block_len(self, ctx_len: int = 0) -> int:
        self.acceptance.at(ctx_len)
        b_acc = self.base.block_len(ctx_len)
        if not self.streaming:
            choice = b_acc
        elif self.warmup_left > 0:
            choice = 1  # measure what a target-only token reads first
        elif self.credit < 0 or self.time_credit < 0:
            self.since_probe += 1
            choice = 2 if self._probe_due() else 1
            if choice == 2:
                self.since_probe = 0
        elif b_acc > 1 and (not self.acceptance.own or self.verify_scale is None):
            # explore: the cheapest drafting cycle measures acceptance and a verify's extra bytes, unless this
            # engine's timings say even full acceptance could not pay for it
            t1, t2 = self.seconds(1), self.seconds(2)
            choice = 2 if t1 is None or t2 is None or t2 < 2 * t1 else 1
        elif self.hold_left > 0:  # target-only was chosen: decide again after ``hold`` steps
            self.hold_left -= 1
            choice = 1
        else:
            stats = self.store.stats()
            best, best_cost = 1, self.expected_bytes(1, stats)
            for b in self.candidates(b_acc):
                cost = self.expected_bytes(b, stats) / self.expected_tokens(b)
                if cost <= best_cost * (1 + 1e-9) + 1e-9 and (b == 1 or self.time_ok(b)):
                    best, best_cost = b, cost
            if (self.explore_every and self.drafting_cycles and self.drafting_cycles % self.explore_every == 0
                    and best > 1 and self.credit > 0 and self.time_credit > 0):
                bigger = [b for b in self.candidates(b_acc) if b > best and b not in self.scale_by_block]
                best = bigger[0] if bigger else best  # measure the next larger block once, paid by the ledgers
            choice = best
            if best == 1:
                self.hold_left = self.hold - 1
        self.last_choice = choice
        self.decisions.append(choice)
        return choice

    def observe(self, block_len: int, accepted: int, bytes_read: int = 0, seconds: float = 0.0) -> None:
        if block_len > 1:
            self.acceptance.add(block_len - 1, accepted)
            self.base.observe(block_len, accepted, bytes_read)
        if not self.streaming:
            return
        if seconds > 0:
            seen = self.memory.series(block_len)
            seen.append(seconds)
            t1, tb = self.seconds(1), self.seconds(block_len)
            # the time ledger, on robust per-length costs; a length's first cycle (where a GPU builds its kernels)
            # is left out
            if block_len > 1 and t1 is not None and len(seen) > 1:
                self.time_credit += t1 * (accepted + 1) - tb
        if block_len == 1:
            self.warmup_left = max(0, self.warmup_left - 1)
            self.r1 = bytes_read if self.r1 is None else (1 - self.ema) * self.r1 + self.ema * bytes_read
        else:
            prior = self._prior_bytes(block_len)
            if prior > 0:
                r = bytes_read / prior
                self.verify_scale = r if self.verify_scale is None else (1 - self.ema) * self.verify_scale + self.ema * r
                old = self.scale_by_block.get(block_len)
                self.scale_by_block[block_len] = r if old is None else (1 - self.ema) * old + self.ema * r
            self.drafting_cycles += 1
        if block_len > 1:  # target-only steps are the baseline itself: they do not move the ledger
            r1 = self.r1 if self.r1 is not None else self._prior_bytes(1)
            self.credit += r1 * (accepted + 1) - bytes_read


class ThroughputPolicy:
    """``throughput``: the block length that commits the most tokens per second, measured on this machine.

    A cycle of block b commits T(b) tokens (``Acceptance``: α from the request's recent cycles, aged by
    tokens, around the engine's) and takes t(b) seconds: the median of the last ``samples`` cycles of that
    length, as the engine timed them (draft + verify + sync; b = 1 is a target-only step). It verifies
    b* = argmax T(b) / t(b) over {1, 2, 4, 8, …, block_size}. Each candidate is measured ``min_samples`` (3)
    times first (full block first, then a target-only step, then the others; the timings are shared by the
    engine's requests, so this happens once per engine; three samples make the median robust to a kernel
    build). Then, every ``remeasure_every`` cycles, another length is measured once: while drafting, a
    neighbour of the best length (half or double; every fourth time the full block, since costs move with the
    context length); while decoding target-only, the full block, every ``probe_every`` steps (its cycle tells
    the most about whether the text got predictable again). Either is spaced further apart where it is
    expected to lose more than ``remeasure_budget`` (2 %) of the time decoding at the best length takes in
    between (on a CPU a 2-token cycle costs ~7 target-only steps). Where a verify costs about the same at any
    length (a launch-bound GPU) it keeps full blocks; where it costs ~ b single steps (a compute-bound CPU) it
    shrinks the block or decodes target-only, so drafting never runs much slower than plain decoding.
    Nondeterministic in its block lengths (wall clock), never in its output.
    """

    name = "throughput"

    def __init__(self, block_size: int, *, memory: PolicyMemory | None = None, alpha_window: int = 32,
                 remeasure_every: int = 32, probe_every: int = 8, min_samples: int = 3,
                 remeasure_budget: float = 0.02):
        """``memory``: cycle timings and recent acceptance shared by an engine's requests, so a request does not
        explore what earlier ones measured nor start from an uninformed acceptance."""
        self.block_size = block_size
        self.candidates = sorted({1, block_size} | {b for b in (2, 4, 8, 16, 32, 64) if b < block_size})
        self.memory = memory if memory is not None else PolicyMemory()
        self.acceptance = Acceptance(alpha_window, self.memory)
        for b in self.candidates:
            self.memory.series(b)
        self.remeasure_every, self.probe_every = remeasure_every, probe_every
        self.min_samples = min(min_samples, self.memory.samples)
        self.remeasure_budget = remeasure_budget
        self.steps = 0
        self._next_remeasure = remeasure_every  # a request does not open with a re-measurement
        self._turn = 0
        self._explore = [block_size, 1] + [b for b in self.candidates if b not in (1, block_size)]

    @property
    def times(self) -> dict:
        return self.memory.times

    @property
    def alpha(self) -> float:
        return self.acceptance.alpha

    def expected_tokens(self, b: int) -> float:
        return self.acceptance.expected_tokens(b)

    def seconds(self, b: int) -> float | None:
        """The median of the recent timings (``typical``)."""
        return self.memory.seconds(b)

    def best(self) -> int:
        rates = {b: self.expected_tokens(b) / self.seconds(b) for b in self.candidates if self.seconds(b)}
        return max(rates, key=lambda b: (rates[b], b)) if rates else self.block_size

    def block_len(self, ctx_len: int = 0) -> int:
        self.steps += 1
        self.acceptance.at(ctx_len)
        unmeasured = [b for b in self._explore if len(self.times[b]) < self.min_samples]
        if unmeasured:
            self._next_remeasure = self.steps + self.remeasure_every
            return unmeasured[0]
        best = self.best()
        if self.steps >= self._next_remeasure:
            self._turn += 1
            if best == 1:  # decoding target-only: would drafting pay again? The full block tells the most
                pick, floor = self.block_size, self.probe_every  # (up to block − 1 accepted drafts)
            else:  # a neighbour of the best length, in turn; every 4th time the full block (no local optimum sticks)
                i = self.candidates.index(best)
                others = self.candidates[max(0, i - 1) : i] + self.candidates[i + 1 : i + 2]
                full = self._turn % 4 == 0 and best != self.block_size
                pick = self.block_size if full else others[self._turn % len(others)]
                floor = self.remeasure_every
            self._next_remeasure = self.steps + self._remeasure_gap(pick, best, floor)
            return pick
        return best

    def _remeasure_gap(self, pick: int, best: int, floor: int) -> int:
        """Calls until the next re-measurement: ``floor``, or more where this one is expected to lose more than
        ``remeasure_budget`` of the time decoding at the best length takes in between."""
        tp, tb = self.seconds(pick), self.seconds(best)
        gap = floor
        if tp and tb:
            loss = tp - self.expected_tokens(pick) * tb / self.expected_tokens(best)
            if loss > 0:
                gap = max(gap, int(loss / (self.remeasure_budget * tb)) + 1)
        return gap

    def observe(self, block_len: int, accepted: int, bytes_read: int = 0, seconds: float = 0.0) -> None:
        if block_len > 1:
            self.acceptance.add(block_len - 1, accepted)
        if seconds > 0 and block_len in self.times:
            self.times[block_len].append(seconds)


def make_policy(name: str, block_size: int, *, store=None, prompt_len: int = 0, memory: PolicyMemory | None = None):
    """A policy by name; ``memory``: what the engine's requests share (``throughput``, ``residency-aware``)."""
    if name == "fixed":
        return FixedPolicy(block_size)
    if name == "opencode-sampled-v1":
        return OpenCodeSampledV1Policy(block_size, prompt_len=prompt_len)
    if name == "residency-aware":
        return ResidencyAwarePolicy(block_size, store, prompt_len=prompt_len, memory=memory)
    if name == "throughput":
        return ThroughputPolicy(block_size, memory=memory)
    raise ConfigError(f"policy: unknown block policy {name!r}; use fixed, opencode-sampled-v1, residency-aware or "
                      "throughput")
