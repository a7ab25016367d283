"""The group-sequential gate: McNemar at equally spaced looks with O'Brien-Fleming-type alpha spending."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np
from scipy import stats

from ..errors import VlaBenchError
from ..options import DEFAULT_ALPHA
from .intervals import paired_difference_interval
from .verdicts import _CODES, FAIL, TaskOutcomes, paired_counts, verdict_codes

# ------------------------------------------------------------------------------------------ sequential gate


def obrien_fleming_spending(information: float, alpha: float) -> float:
    """Lan-DeMets O'Brien-Fleming-type spending function for a one-sided level-alpha test:
    alpha(t) = 2 - 2 Phi(z_{1-alpha/2} / sqrt(t)); it spends almost nothing early and alpha(1) = alpha."""
    if information <= 0:
        return 0.0
    t = min(information, 1.0)
    return float(2.0 * stats.norm.sf(stats.norm.isf(alpha / 2.0) / math.sqrt(t)))


@dataclasses.dataclass(frozen=True)
class SequentialDesign:
    """A group-sequential paired gate (margin 0): look after each count in `looks` (the last is the planned total).

    At look k the statistic is the number of "only baseline succeeded" pairs among the D_k discordant pairs so far.
    Under H0 (no drop on any init state) it is a fair-coin walk given the discordant counts, so the boundary u_k is
    the smallest count whose exact probability of a first crossing, added to what earlier looks spent, stays within
    alpha(t_k), t_k = episodes so far / planned episodes. That makes the type-I error <= alpha exactly (discreteness
    only makes it smaller). `futility_from`: from that information fraction on, an interim look where the candidate
    is not behind (only_baseline <= only_candidate) stops the task without failing; futility stops are non-binding
    (they can only remove rejections), so they cost power, never type-I error.
    """

    looks: tuple[int, ...]
    alpha: float = DEFAULT_ALPHA
    futility_from: float | None = None

    def __post_init__(self):
        looks = tuple(int(x) for x in self.looks)
        if not looks or any(b <= a for a, b in zip(looks, looks[1:])) or looks[0] < 1:
            raise VlaBenchError(f"sequential looks must be increasing positive episode counts, got {self.looks}")
        object.__setattr__(self, "looks", looks)

    @property
    def episodes(self) -> int:
        return self.looks[-1]

    @classmethod
    def evenly(cls, episodes: int, looks: int, **kwargs) -> "SequentialDesign":
        counts = sorted({max(1, round(episodes * (k + 1) / looks)) for k in range(looks)})
        return cls(tuple(counts), **kwargs)


@dataclasses.dataclass(frozen=True)
class SequentialResult:
    verdict: str  # FAIL when a boundary was crossed; otherwise PASS / INCONCLUSIVE from the interval so far
    stopped_at: int  # episodes used
    look: int  # 1-based index of the look that stopped
    reason: str  # "efficacy" (regression found), "futility" or "final"
    boundaries: tuple[int, ...]  # boundary on only_baseline at each look taken


def sequential_boundaries(discordant_at_looks: Sequence[int], information: Sequence[float],
                          alpha: float) -> tuple[int, ...]:
    """Exact boundaries u_1..u_k for the fair-coin walk observed with the given discordant counts (see
    SequentialDesign); u > D means no crossing is possible at that look."""
    return _boundaries_cached(tuple(int(d) for d in discordant_at_looks), tuple(float(t) for t in information),
                              float(alpha))


@functools.lru_cache(maxsize=200_000)
def _boundaries_cached(discordant: tuple[int, ...], information: tuple[float, ...], alpha: float) -> tuple[int, ...]:
    if len(discordant) > 1:
        earlier = _boundaries_cached(discordant[:-1], information[:-1], alpha)
    else:
        earlier = ()
    survivors, spent = _walk_survivors(discordant[:-1], earlier)
    step = discordant[-1] - (discordant[-2] if len(discordant) > 1 else 0)
    distribution = np.convolve(survivors, stats.binom.pmf(np.arange(step + 1), step, 0.5))
    allowed = obrien_fleming_spending(information[-1], alpha) - spent
    tails = np.cumsum(distribution[::-1])[::-1]  # tails[u] = P(count >= u, no earlier crossing)
    feasible = np.flatnonzero(tails <= allowed + 1e-12)
    boundary = int(feasible[0]) if feasible.size else distribution.size
    return earlier + (boundary,)


def _walk_survivors(discordant: tuple[int, ...], boundaries: tuple[int, ...]):
    """Distribution of the count over paths that have not crossed, and the probability already spent."""
    distribution = np.array([1.0])
    previous, spent = 0, 0.0
    for d, u in zip(discordant, boundaries):
        step = d - previous
        distribution = np.convolve(distribution, stats.binom.pmf(np.arange(step + 1), step, 0.5))
        spent += distribution[u:].sum()
        distribution[u:] = 0.0
        previous = d
    return distribution, spent


def sequential_gate(baseline: TaskOutcomes, candidate: TaskOutcomes, design: SequentialDesign, *,
                    confidence: float = 0.95, strict: bool = False) -> SequentialResult:
    """Run the sequential gate over the candidate's episodes in init-state order (episode i = init state i, as the
    runner produces them), stopping at the first look that decides."""
    order = sorted(candidate.outcomes)[: design.episodes]
    if len(order) < design.looks[0]:
        raise VlaBenchError(f"task {candidate.task}: {len(order)} episodes, fewer than the first look "
                            f"({design.looks[0]})")
    missing = [i for i in order if i not in baseline.outcomes]
    if missing:
        raise VlaBenchError(f"task {candidate.task}: the baseline has no episodes for init states {missing[:10]}")
    baseline_flags = np.array([baseline.outcomes[i] for i in order])
    candidate_flags = np.array([candidate.outcomes[i] for i in order])
    only_baseline = np.cumsum(baseline_flags & ~candidate_flags)
    only_candidate = np.cumsum(~baseline_flags & candidate_flags)
    stop, look, reason, boundaries = sequential_decision(only_baseline, only_candidate, design)
    if reason == "efficacy":
        verdict = FAIL
    else:
        counts = paired_counts(baseline, TaskOutcomes(candidate.task, {i: candidate.outcomes[i] for i in order[:stop]}))
        low, _ = paired_difference_interval(counts.both, counts.only_candidate, counts.only_baseline, counts.neither,
                                            confidence)
        verdict = _CODES[int(verdict_codes(1.0, low, design.alpha, 0.0, strict))]
    return SequentialResult(verdict, stop, look, reason, boundaries)


def sequential_decision(only_baseline_cumulative, only_candidate_cumulative, design: SequentialDesign):
    """(episodes used, look, reason, boundaries) for one sequence of cumulative discordant counts (entry i: after
    episode i + 1), the core of sequential_gate without the outcome bookkeeping, for simulations."""
    looks = [k for k in design.looks if k <= len(only_baseline_cumulative)]
    discordant, information = [], []
    boundaries: tuple[int, ...] = ()
    for index, episodes in enumerate(looks):
        b = int(only_baseline_cumulative[episodes - 1])
        c = int(only_candidate_cumulative[episodes - 1])
        discordant.append(b + c)
        information.append(episodes / design.episodes)
        boundaries = sequential_boundaries(discordant, information, design.alpha)
        if b >= boundaries[-1]:
            return episodes, index + 1, "efficacy", boundaries
        final = index == len(design.looks) - 1
        if (not final and design.futility_from is not None and information[-1] >= design.futility_from
                and b <= c):
            return episodes, index + 1, "futility", boundaries
    return looks[-1], len(looks), "final", boundaries
