"""Speculative decoding in the control plane: the n-gram (prompt lookup) proposer, who may speculate, and
what the data plane's samples say was accepted (docs/speculative.md).

The proposer looks for the sequence's last n tokens (n from max_n down to min_n) earlier in its own
tokens (prompt and output) and proposes the up to k tokens that followed the most recent earlier match
(vLLM's prompt lookup). The data plane samples every one of the k + 1 positions the drafts open, each
from the target distribution after the request's logit processors, with its own noise; a draft is
accepted while it equals the token sampled at its position, and the first sample that differs (or the
one after the last draft) is the next token. For a draft q that is one-hot this is rejection sampling:
draft x is accepted with probability p(x), and on rejection the token is distributed as p without x,
renormalised; so the output's distribution is the target's exactly, and greedy and seeded rows give the
very tokens they would without speculation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from controlplane.core.sequence import Sequence

METHODS = ("ngram",)
MAX_SPECULATIVE_TOKENS = 16
# a sequence whose acceptance (moving average of accepted / proposed) falls below the threshold
# decodes plainly for this many steps, then tries again
BACKOFF_STEPS = 16
ACCEPTANCE_SMOOTHING = 0.3  # weight of the newest step in the moving average


@dataclass
class SpeculativeConfig:
    """The defaults here are the flags' (ControlPlaneConfig reads them: one definition)."""

    method: str = ""  # "" = off
    num_speculative_tokens: int = 0  # k: drafts per step at most
    ngram_min: int = 1
    ngram_max: int = 4
    disable_batch_size: int = 32  # no speculation while more sequences than this run (0 = no limit)
    min_acceptance: float = 0.1  # a sequence whose acceptance falls below this backs off for BACKOFF_STEPS

    @property
    def enabled(self) -> bool:
        return bool(self.method) and self.num_speculative_tokens > 0

    def problems(self) -> list[str]:
        """What is wrong with these options, as flag names (an empty list when nothing is)."""
        problems = []
        if self.method and self.method not in METHODS:
            problems.append(f"--speculative-method must be one of {', '.join(METHODS)} (or empty: off), "
                            f"got {self.method!r}")
        if self.method and not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            problems.append(f"--num-speculative-tokens must be in [1, {MAX_SPECULATIVE_TOKENS}] with "
                            f"--speculative-method {self.method}, got {self.num_speculative_tokens}")
        if not self.method and self.num_speculative_tokens:
            problems.append("--num-speculative-tokens needs --speculative-method ngram")
        if not 1 <= self.ngram_min <= self.ngram_max:
            problems.append(f"--speculative-ngram-min and --speculative-ngram-max must satisfy 1 <= min <= max, "
                            f"got {self.ngram_min} and {self.ngram_max}")
        if self.disable_batch_size < 0:
            problems.append(f"--speculative-disable-batch-size must be >= 0 (0 = no limit), "
                            f"got {self.disable_batch_size}")
        if not 0.0 <= self.min_acceptance <= 1.0:
            problems.append(f"--speculative-min-acceptance must be in [0, 1], got {self.min_acceptance}")
        return problems


def propose_ngram(token_ids: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The k tokens that followed the most recent earlier occurrence of the last n tokens, for the largest
    n in [min_n, max_n] that occurs earlier; [] when none does."""
    length = len(token_ids)
    if k < 1 or length < min_n + 1:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # windows that start at i and end before the last token, so at least one token follows each
        windows = sliding_window_view(tokens[:-1], n)
        hits = np.flatnonzero((windows == tokens[length - n:]).all(axis=1))
        if len(hits):
            # copy what followed the match; a copy that reaches the end goes on through its own drafts
            # (as the lookup repeated after each draft would), so a repeating pattern repeats
            start = int(hits[-1]) + n
            period = length - start
            return [token_ids[start + i % period] for i in range(k)]
    return []


@dataclass(slots=True)
class SpecCounters:
    """vLLM's spec_decode counters, over the scheduler's life (Prometheus reads them)."""

    num_drafts: int = 0  # speculative steps of a sequence
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: drafts accepted at position i

    def add(self, num_drafts: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        if num_accepted > len(self.accepted_per_position):
            self.accepted_per_position += [0] * (num_accepted - len(self.accepted_per_position))
        for i in range(num_accepted):
            self.accepted_per_position[i] += 1


class Speculator:
    """Decides, per sequence and step, whether it speculates and with which drafts; scores results."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.counters = SpecCounters()

    def wants(self, seq: Sequence, num_running: int) -> bool:
        """Whether seq takes part in speculation this step: then it is planned only with no token in flight."""
        cfg = self.config
        if not cfg.enabled or not seq.sampling.speculative or seq.grammar is not None:
            return False
        if cfg.disable_batch_size and num_running > cfg.disable_batch_size:
            return False
        sampling = seq.sampling
        # per-position penalties and logprobs of rejected rows are not supported: docs/speculative.md
        if sampling.uses_penalties or sampling.logprobs is not None:
            return False
        if seq.spec_backoff_steps:
            seq.spec_backoff_steps -= 1
            return False
        return True

    def drafts(self, seq: Sequence, max_drafts: int) -> list[int]:
        """Drafts for seq (its last token is known and not yet computed); [] when there are none."""
        cfg = self.config
        k = min(cfg.num_speculative_tokens, max_drafts)
        drafts = propose_ngram(seq.token_ids, k, cfg.ngram_min, cfg.ngram_max) if k > 0 else []
        if not drafts:
            self._observe(seq, 0.0)  # nothing to propose counts as nothing accepted
        return drafts

    def accept(self, seq: Sequence, drafts: list[int], sampled: list[int]) -> list[int]:
        """The tokens a speculative step gives seq: the drafts while each equals the token sampled at its
        position, then the first sample that differs, or the bonus token after the last draft."""
        num_accepted = 0
        for draft, token in zip(drafts, sampled):
            if draft != token:
                break
            num_accepted += 1
        self.counters.add(len(drafts), num_accepted)
        self._observe(seq, num_accepted / len(drafts))
        return sampled[:num_accepted + 1]

    def _observe(self, seq: Sequence, acceptance: float) -> None:
        seq.spec_acceptance += ACCEPTANCE_SMOOTHING * (acceptance - seq.spec_acceptance)
        if seq.spec_acceptance < self.config.min_acceptance:
            seq.spec_backoff_steps = BACKOFF_STEPS
            seq.spec_acceptance = 1.0  # a fresh start after the back-off
