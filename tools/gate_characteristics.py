"""Operating characteristics of the regression gate, by Monte Carlo: type-I error, power and episodes used by the
fixed, curtailed and sequential gates at a range of true drops. A study tool (the library does not use it); the
statistical tests in tests/test_gate_stats.py draw their paired outcomes with `simulate_pairs`.

    python tools/gate_characteristics.py --episodes 50 --baseline-rate 0.8 --correlation 0.3
"""
from __future__ import annotations

import argparse
import math
from typing import Sequence

import numpy as np

from vla_bench.metrics.curtailment import gate_curtailment, threshold_curtailment
from vla_bench.metrics.exact_tests import mcnemar_exact_pvalue
from vla_bench.metrics.sequential import SequentialDesign, sequential_decision
from vla_bench.metrics.verdicts import TaskOutcomes
from vla_bench.options import DEFAULT_ALPHA


def simulate_pairs(rng: np.random.Generator, replicates: int, episodes: int, baseline_rate: float,
                   candidate_rate: float, correlation: float = 0.0):
    """Paired outcomes (baseline, candidate) as two bool arrays (replicates, episodes), with the given phi
    correlation between the checkpoints on an init state (clipped to what the rates allow)."""
    spread = math.sqrt(baseline_rate * (1 - baseline_rate) * candidate_rate * (1 - candidate_rate))
    p_both = baseline_rate * candidate_rate + correlation * spread
    p_both = min(max(p_both, max(0.0, baseline_rate + candidate_rate - 1.0)), min(baseline_rate, candidate_rate))
    cells = np.array([p_both, baseline_rate - p_both, candidate_rate - p_both,
                      1.0 - baseline_rate - candidate_rate + p_both])
    draws = rng.random((replicates, episodes))
    kind = np.searchsorted(np.cumsum(cells)[:-1], draws, side="right")
    baseline = (kind == 0) | (kind == 1)
    candidate = (kind == 0) | (kind == 2)
    return baseline, candidate


def _stopping_episode(baseline_row, candidate_row, settings) -> int:
    """Episodes curtailment needs before the gate verdict is fixed: determinedness only grows with more episodes
    (the completions shrink), so a bisection over the prefix length finds the first determined prefix."""
    n = baseline_row.size
    baseline = TaskOutcomes("t", dict(enumerate(baseline_row.tolist())))
    planned = range(n)

    def determined(k: int) -> bool:
        so_far = TaskOutcomes("t", dict(enumerate(candidate_row[:k].tolist())))
        return gate_curtailment(baseline, so_far, planned, **settings).determined

    low, high = 0, n
    while low < high:
        mid = (low + high) // 2
        if determined(mid):
            high = mid
        else:
            low = mid + 1
    return low


def _threshold_stopping_episode(row, threshold) -> int:
    n = row.size
    successes = np.r_[0, np.cumsum(row)]
    for done in range(n + 1):
        if threshold_curtailment(int(successes[done]), done, n, threshold).determined:
            return done
    return n


def simulate_operating_characteristics(*, episodes: int = 50, baseline_rate: float = 0.8,
                                       drops: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3),
                                       correlation: float = 0.0, alpha: float = DEFAULT_ALPHA,
                                       looks: int = 5, futility_from: float | None = 0.5,
                                       threshold: float | None = None, replicates: int = 2000,
                                       curtailment_replicates: int | None = None, seed: int = 0) -> list[dict]:
    """Monte Carlo operating characteristics of the per-task paired gate (margin 0) at each true drop.

    Rows: drop, candidate_rate, fixed_reject (the exact McNemar gate: type-I error at drop 0, power otherwise),
    sequential_reject (the group-sequential gate), mean episodes of the fixed run, of a run curtailed at the moment
    the fixed gate's verdict is determined (same verdicts by construction), and of the sequential gate; and, when a
    `threshold` is given, the mean episodes of a threshold test on the candidate under curtailment.
    Each rate comes with its Monte Carlo standard error.
    """
    rng = np.random.default_rng(seed)
    design = SequentialDesign.evenly(episodes, looks, alpha=alpha, futility_from=futility_from)
    curtailment_replicates = min(replicates, 300) if curtailment_replicates is None else curtailment_replicates
    settings = dict(alpha=alpha, margin=0.0, strict=False)
    rows = []
    for drop in drops:
        candidate_rate = baseline_rate - drop
        baseline, candidate = simulate_pairs(rng, replicates, episodes, baseline_rate, candidate_rate, correlation)
        only_baseline = np.cumsum(baseline & ~candidate, axis=1)
        only_candidate = np.cumsum(~baseline & candidate, axis=1)
        fixed_reject = np.asarray(mcnemar_exact_pvalue(only_baseline[:, -1], only_candidate[:, -1])) < alpha
        decisions = [sequential_decision(only_baseline[r], only_candidate[r], design) for r in range(replicates)]
        sequential_reject = np.array([d[2] == "efficacy" for d in decisions])
        sequential_episodes = np.array([d[0] for d in decisions])
        curtailed = np.array([_stopping_episode(baseline[r], candidate[r], settings)
                              for r in range(curtailment_replicates)])
        row = {
            "drop": drop,
            "candidate_rate": candidate_rate,
            "fixed_reject": float(fixed_reject.mean()),
            "fixed_reject_se": _standard_error(fixed_reject),
            "sequential_reject": float(sequential_reject.mean()),
            "sequential_reject_se": _standard_error(sequential_reject),
            "episodes_fixed": episodes,
            "episodes_curtailed": float(curtailed.mean()),
            "episodes_sequential": float(sequential_episodes.mean()),
        }
        if threshold is not None:
            row["threshold"] = threshold
            row["episodes_threshold_curtailed"] = float(np.mean(
                [_threshold_stopping_episode(candidate[r], threshold) for r in range(curtailment_replicates)]))
        rows.append(row)
    return rows


def format_operating_characteristics(rows: list[dict]) -> str:
    """A plain-text table of simulate_operating_characteristics' rows, for reports."""
    header = ["drop", "cand", "fixed reject", "seq reject", "eps fixed", "eps curtailed", "eps seq"]
    with_threshold = rows and "threshold" in rows[0]
    if with_threshold:
        header.append(f"eps thr>={rows[0]['threshold']:.2f}")
    lines = [" | ".join(header)]
    for r in rows:
        cells = [f"{r['drop']:.2f}", f"{r['candidate_rate']:.2f}",
                 f"{r['fixed_reject']:.3f}±{r['fixed_reject_se']:.3f}",
                 f"{r['sequential_reject']:.3f}±{r['sequential_reject_se']:.3f}", f"{r['episodes_fixed']}",
                 f"{r['episodes_curtailed']:.1f}", f"{r['episodes_sequential']:.1f}"]
        if with_threshold:
            cells.append(f"{r['episodes_threshold_curtailed']:.1f}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def _standard_error(flags) -> float:
    flags = np.asarray(flags, dtype=float)
    return float(math.sqrt(flags.mean() * (1 - flags.mean()) / flags.size)) if flags.size else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--baseline-rate", type=float, default=0.8)
    parser.add_argument("--correlation", type=float, default=0.0)
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    parser.add_argument("--looks", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--replicates", type=int, default=2000)
    args = parser.parse_args(argv)
    print(format_operating_characteristics(simulate_operating_characteristics(
        episodes=args.episodes, baseline_rate=args.baseline_rate, correlation=args.correlation, alpha=args.alpha,
        looks=args.looks, threshold=args.threshold, replicates=args.replicates)))


if __name__ == "__main__":
    main()
