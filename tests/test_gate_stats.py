"""The gate's statistics: textbook values, error rates by simulation, and curtailment that never changes a verdict.

Simulations are pure binomial draws (no simulator), vectorized with numpy; a rejection rate "within Monte Carlo
error" of alpha means at most alpha + 3 standard errors of the simulated rate.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, stats

from tools.gate_characteristics import (format_operating_characteristics, simulate_operating_characteristics,
                                        simulate_pairs)
from vla_bench.errors import VlaBenchError
from vla_bench.metrics.curtailment import (gate_curtailment, meets_threshold, suite_gate_curtailment,
                                           threshold_curtailment)
from vla_bench.metrics.exact_tests import (_exact_unconditional_pvalues, _paired_sample_space, _trinomial_pmf,
                                           boschloo_pvalue, cochran_mantel_haenszel, farrington_manning_statistic,
                                           holm_adjust, mcnemar_exact_pvalue, paired_margin_pvalue_table,
                                           paired_pvalues, tango_constrained_rate, tango_statistic,
                                           unpaired_pvalue_table)
from vla_bench.metrics.intervals import paired_bootstrap_interval
from vla_bench.metrics.power import _power_function, smallest_detectable_drop
from vla_bench.metrics.sequential import (SequentialDesign, _walk_survivors, obrien_fleming_spending,
                                          sequential_boundaries, sequential_decision)
from vla_bench.metrics.verdicts import (FAIL, INCONCLUSIVE, PASS, PairedCounts, TaskOutcomes, compare_suite,
                                        compare_task, paired_suite_pvalue, parse_fail_spec, unpaired_suite_pvalue)

ALPHA = 0.05
REPLICATES = 20_000


def outcomes(flags, task="task1"):
    return TaskOutcomes(task, dict(enumerate(bool(f) for f in flags)))


def at_most_alpha(rejections, alpha=ALPHA):
    rate = float(np.mean(rejections))
    return rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / np.size(rejections)), rate


# ------------------------------------------------------------------------------------------------ textbook values


def test_exact_mcnemar_matches_scipy_binomtest():
    for b, c in [(0, 0), (6, 16), (16, 6), (10, 2), (1, 7), (25, 25)]:
        expected = stats.binomtest(b, b + c, 0.5, alternative="greater").pvalue if b + c else 1.0
        assert mcnemar_exact_pvalue(b, c) == pytest.approx(expected, rel=1e-12)


def test_exact_mcnemar_published_values():
    """Fagerland, Lydersen & Laake (2013), BMC Med Res Methodol 13:91: exact conditional McNemar, two-sided p = 0.052
    for Cavo et al. (6 vs 16 discordant pairs) and 0.070 for Bentur et al. (1 vs 7); one-sided p is half."""
    assert 2 * mcnemar_exact_pvalue(16, 6) == pytest.approx(0.052, abs=5e-4)
    assert 2 * mcnemar_exact_pvalue(7, 1) == pytest.approx(0.0703, abs=5e-5)


def test_cmh_matches_r_mantelhaen_rabbits():
    """R's documented example `mantelhaen.test(Rabbits)` (penicillin, 5 strata): X-squared = 3.9286 with continuity
    correction, p-value = 0.04747. The Mantel-Haenszel odds ratio by hand: sum(ad/n) / sum(bc/n) = 3.5 / 0.5."""
    rabbits = [[[0, 6], [0, 5]], [[3, 3], [0, 6]], [[6, 0], [2, 4]], [[5, 1], [6, 0]], [[2, 0], [5, 0]]]
    result = cochran_mantel_haenszel(rabbits, continuity=True)
    assert result["chi2"] == pytest.approx(3.9286, abs=1e-4)
    assert result["pvalue"] == pytest.approx(0.04747, abs=1e-5)
    assert result["odds_ratio"] == pytest.approx(7.0)
    assert result["z"] > 0


def test_cmh_with_one_stratum_per_pair_is_mcnemar():
    """The suite-level paired test rests on this identity: CMH over matched pairs (each init state a stratum of two
    episodes) equals McNemar's statistic (b - c) / sqrt(b + c)."""
    rng = np.random.default_rng(3)
    base, cand = rng.random(60) < 0.7, rng.random(60) < 0.5
    tables = [[[int(x), 1 - int(x)], [int(y), 1 - int(y)]] for x, y in zip(base, cand)]
    b, c = int(np.sum(base & ~cand)), int(np.sum(~base & cand))
    assert cochran_mantel_haenszel(tables)["z"] == pytest.approx((b - c) / math.sqrt(b + c))


def test_boschloo_matches_scipy_documented_example():
    """scipy's boschloo_exact docs: 74/117 professors vs 31/63 scientists very satisfied, one-sided p = 0.0355."""
    assert boschloo_pvalue(74, 117, 31, 63) == pytest.approx(0.0355, abs=1e-4)


def test_boschloo_table_agrees_with_scipy():
    """The all-tables Boschloo used for power and simulations is the same test as scipy's, table by table."""
    table = unpaired_pvalue_table(12, 15, 0.0)
    rng = np.random.default_rng(0)
    for kb, kc in zip(rng.integers(0, 13, 12), rng.integers(0, 16, 12)):
        expected = stats.boschloo_exact([[kb, kc], [12 - kb, 15 - kc]], alternative="greater").pvalue
        assert table[kb, kc] == pytest.approx(min(expected, 1.0), abs=2e-5)


def test_exact_unconditional_machinery_reproduces_barnard():
    """Ordered by the pooled score statistic, the exact unconditional p-values are Barnard's test (scipy)."""
    kb, kc = (x.ravel() for x in np.meshgrid(np.arange(11), np.arange(9), indexing="ij"))
    statistic = farrington_manning_statistic(kb, 10, kc, 8, 0.0)
    rate = np.linspace(0, 1, 1001)[:, None]
    probabilities = stats.binom.pmf(kb, 10, rate) * stats.binom.pmf(kc, 8, rate)
    pvalues = _exact_unconditional_pvalues(statistic, probabilities).reshape(11, 9)
    for x, y in [(8, 2), (5, 5), (10, 0), (7, 3), (3, 6)]:
        expected = stats.barnard_exact([[x, y], [10 - x, 8 - y]], alternative="greater").pvalue
        assert pvalues[x, y] == pytest.approx(expected, abs=2e-5)


def test_tango_restricted_mle_maximizes_the_likelihood():
    for b, c, n, m in [(7, 3, 50, 0.05), (0, 0, 50, 0.1), (12, 1, 40, 0.2), (2, 9, 30, 0.05)]:
        def negative_log_likelihood(q):
            return -(b * np.log(q + m) + c * np.log(q) + (n - b - c) * np.log(1 - 2 * q - m))

        best = optimize.minimize_scalar(negative_log_likelihood, bounds=(1e-12, (1 - m) / 2 - 1e-12),
                                        method="bounded", options={"xatol": 1e-12})
        assert tango_constrained_rate(b, c, n, m) == pytest.approx(best.x, abs=1e-6)
    assert tango_statistic(9, 4, 50, 0.0) == pytest.approx(5 / math.sqrt(13))


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5]) == [0.5]
    assert holm_adjust([]) == []


def test_parse_fail_spec():
    assert parse_fail_spec("drop:5pp") == pytest.approx(0.05)
    assert parse_fail_spec("drop:2.5%") == pytest.approx(0.025)
    assert parse_fail_spec("DROP: 10pp") == pytest.approx(0.10)
    assert parse_fail_spec("drop:0") == 0.0
    assert parse_fail_spec(None) == 0.0
    for bad in ["5pp", "drop:-5pp", "drop:abc", "drop:100pp", "rise:5pp"]:
        with pytest.raises(VlaBenchError, match="drop:"):
            parse_fail_spec(bad)


# ------------------------------------------------------------------------------------------- verdicts and errors


def test_clear_regression_fails_and_self_comparison_does_not():
    base = outcomes([1] * 40 + [0] * 10)
    worse = outcomes([1] * 15 + [0] * 35)
    verdict = compare_task(base, worse)
    assert verdict.verdict == FAIL and verdict.paired and verdict.discordant == (25, 0)
    assert verdict.difference == pytest.approx(-0.5) and verdict.difference_high < 0
    same = compare_task(base, base)
    assert same.verdict == INCONCLUSIVE and same.pvalue == 1.0  # margin 0: "no drop at all" cannot be shown
    assert compare_task(base, base, margin=0.1).verdict == PASS
    assert compare_task(base, base, strict=True).verdict == FAIL  # strict without a margin can never pass
    assert compare_task(base, worse, paired=False).verdict == FAIL


def test_margin_tolerates_small_drops_but_not_large_ones():
    base = outcomes([1] * 45 + [0] * 5)
    slightly = outcomes([1] * 43 + [0] * 7)
    assert compare_task(base, slightly, margin=0.1).verdict != FAIL
    much = outcomes([1] * 20 + [0] * 30)
    assert compare_task(base, much, margin=0.1).verdict == FAIL
    assert "Tango" in compare_task(base, much, margin=0.1).test


def test_unpaired_when_init_states_do_not_pair():
    base = outcomes([1] * 30)
    cand = TaskOutcomes("task1", {i: True for i in range(30, 60)})
    verdict = compare_task(base, cand)
    assert not verdict.paired and "Boschloo" in verdict.test and verdict.discordant is None


def test_compare_suite_holm_and_stratified_test():
    rng = np.random.default_rng(5)
    pairs = []
    for t in range(10):
        base = rng.random(50) < 0.85
        pairs.append((outcomes(base, f"task{t + 1}"), outcomes(base, f"task{t + 1}")))
    task4_baseline = np.array(list(pairs[3][0].outcomes.values()))
    pairs[3] = (pairs[3][0], outcomes(task4_baseline & (rng.random(50) < 0.3), "task4"))  # loses ~70% of successes
    suite = compare_suite(pairs)
    assert suite.failed_tasks == ["task4"]
    assert suite.verdict == FAIL and suite.paired and "McNemar" in suite.test
    task4 = suite.tasks[3]
    assert task4.adjusted_pvalue == pytest.approx(min(1.0, 10 * task4.pvalue))  # the smallest p is scaled by 10
    assert suite.baseline_episodes == 500 and suite.detectable_drop < suite.tasks[0].detectable_drop


def test_empty_inputs_are_user_errors():
    base = outcomes([1, 0, 1])
    with pytest.raises(VlaBenchError, match="candidate has no episodes"):
        compare_task(base, TaskOutcomes("task1", {}))
    with pytest.raises(VlaBenchError, match="no tasks"):
        compare_suite([])
    with pytest.raises(VlaBenchError, match="margin"):
        compare_task(base, base, margin=1.5)


# ------------------------------------------------------------------------------------ type-I error by simulation


@pytest.mark.parametrize("rate,correlation", [(0.5, 0.0), (0.8, 0.0), (0.8, 0.5), (0.95, 0.3)])
def test_mcnemar_type_one_error(rate, correlation):
    """At no drop, the paired gate fails no more than alpha of the time, whatever the rate and correlation."""
    rng = np.random.default_rng(11)
    base, cand = simulate_pairs(rng, REPLICATES, 50, rate, rate, correlation)
    p = mcnemar_exact_pvalue(np.sum(base & ~cand, axis=1), np.sum(~base & cand, axis=1))
    ok, observed = at_most_alpha(np.asarray(p) < ALPHA)
    assert ok, observed


@pytest.mark.parametrize("rate,margin,correlation", [(0.8, 0.05, 0.0), (0.6, 0.1, 0.4), (0.95, 0.05, 0.2)])
def test_paired_margin_test_type_one_error(rate, margin, correlation):
    """At a drop of exactly the margin (the null boundary), the margin test fails at most alpha of the time; its
    exact size over the whole boundary (every discordance rate) is at most alpha too."""
    rng = np.random.default_rng(12)
    base, cand = simulate_pairs(rng, REPLICATES, 50, rate, rate - margin, correlation)
    p = paired_pvalues(np.sum(base & ~cand, axis=1), np.sum(~base & cand, axis=1), 50, margin)
    ok, observed = at_most_alpha(np.asarray(p) < ALPHA)
    assert ok, observed
    b, c = _paired_sample_space(50)
    rejects = paired_margin_pvalue_table(50, margin)[b, c] < ALPHA
    for q in np.linspace(0.0, (1 - margin) / 2, 37):
        assert _trinomial_pmf(b[rejects], c[rejects], 50, q + margin, q).sum() <= ALPHA + 1e-6


@pytest.mark.parametrize("margin", [0.0, 0.1])
def test_unpaired_tests_type_one_error(margin):
    rng = np.random.default_rng(13)
    table = unpaired_pvalue_table(50, 50, margin)
    for rate in (0.5, 0.85):
        kb = rng.binomial(50, rate, REPLICATES)
        kc = rng.binomial(50, rate - margin, REPLICATES)
        ok, observed = at_most_alpha(table[kb, kc] < ALPHA)
        assert ok, (rate, observed)


def _heterogeneous_suite(rng, replicates, margin, correlation=0.3):
    rates = np.linspace(0.55, 0.98, 10)
    per_task = []
    for rate in rates:
        base, cand = simulate_pairs(rng, replicates, 50, rate, rate - margin, correlation)
        per_task.append((np.sum(base & ~cand, axis=1), np.sum(~base & cand, axis=1)))
    return per_task


@pytest.mark.parametrize("margin", [0.0, 0.05])
def test_suite_paired_test_type_one_error(margin):
    """Ten tasks with different rates, each exactly at the null boundary: the stratified suite test keeps alpha."""
    rng = np.random.default_rng(14)
    replicates = 4000
    per_task = _heterogeneous_suite(rng, replicates, margin)
    rejections = []
    for r in range(replicates):
        counts = [PairedCounts(0, int(b[r]), int(c[r]), 50 - int(b[r]) - int(c[r])) for b, c in per_task]
        rejections.append(paired_suite_pvalue(counts, margin)[0] < ALPHA)
    ok, observed = at_most_alpha(rejections)
    assert ok, observed


@pytest.mark.parametrize("margin", [0.0, 0.05])
def test_suite_unpaired_test_type_one_error(margin):
    rng = np.random.default_rng(15)
    replicates = 4000
    rates = np.linspace(0.55, 0.98, 10)
    kb = rng.binomial(50, rates, (replicates, 10))
    kc = rng.binomial(50, rates - margin, (replicates, 10))
    rejections = [unpaired_suite_pvalue([(kb[r, t], 50, kc[r, t], 50) for t in range(10)], margin)[0] < ALPHA
                  for r in range(replicates)]
    ok, observed = at_most_alpha(rejections)
    assert ok, observed


@pytest.mark.parametrize("rate,correlation,futility", [(0.8, 0.0, None), (0.6, 0.4, 0.5), (0.5, 0.0, 0.5)])
def test_sequential_gate_type_one_error(rate, correlation, futility):
    """The group-sequential gate with five looks fails at most alpha of the time at no drop."""
    rng = np.random.default_rng(16)
    replicates = 6000
    design = SequentialDesign.evenly(50, 5, futility_from=futility)
    base, cand = simulate_pairs(rng, replicates, 50, rate, rate, correlation)
    only_base, only_cand = np.cumsum(base & ~cand, axis=1), np.cumsum(~base & cand, axis=1)
    rejections = [sequential_decision(only_base[r], only_cand[r], design)[2] == "efficacy"
                  for r in range(replicates)]
    ok, observed = at_most_alpha(rejections)
    assert ok, observed


def test_sequential_boundaries_spend_alpha_exactly():
    """Boundaries spend at most alpha(t) cumulatively, and the spending is nearly used up (not a trivial test)."""
    discordant, information = [4, 9, 13, 18, 22], [0.2, 0.4, 0.6, 0.8, 1.0]
    boundaries = sequential_boundaries(discordant, information, ALPHA)
    _, spent = _walk_survivors(tuple(discordant), boundaries)
    assert spent <= ALPHA + 1e-12
    assert spent > 0.6 * ALPHA
    assert boundaries[0] > discordant[0]  # O'Brien-Fleming: nothing can be rejected at 4 discordant pairs
    assert obrien_fleming_spending(1.0, ALPHA) == pytest.approx(ALPHA)
    assert obrien_fleming_spending(0.2, ALPHA) < 0.001


# ------------------------------------------------------------------------------------------ power and detection


def test_power_matches_simulation_and_detectable_drop():
    """The exact power behind `smallest_detectable_drop` agrees with simulated rejection rates, and the reported
    drop is the smallest one reaching 80% power."""
    rng = np.random.default_rng(17)
    power_at = _power_function(50, 50, 0.8, ALPHA, 0.0, True, False)
    for drop in (0.1, 0.2, 0.3):
        base, cand = simulate_pairs(rng, REPLICATES, 50, 0.8, 0.8 - drop)
        p = mcnemar_exact_pvalue(np.sum(base & ~cand, axis=1), np.sum(~base & cand, axis=1))
        simulated = float(np.mean(np.asarray(p) < ALPHA))
        assert simulated == pytest.approx(power_at(drop), abs=4 * math.sqrt(0.25 / REPLICATES))
    assert power_at(0.3) > 0.85  # a 30-point drop at 50 episodes is caught
    drop = smallest_detectable_drop(0.8, 50)
    assert power_at(drop) >= 0.8 > power_at(drop - 0.002)
    assert smallest_detectable_drop(0.8, 500, suite_level=True) < drop / 2
    assert smallest_detectable_drop(0.02, 50) is None  # nothing to lose at 2%


@pytest.mark.parametrize("margin,paired", [(0.05, True), (0.0, False), (0.1, False)])
def test_margin_and_unpaired_power(margin, paired):
    rng = np.random.default_rng(18)
    power_at = _power_function(50, 50, 0.8, ALPHA, margin, paired, False)
    drop = 0.35
    if paired:
        base, cand = simulate_pairs(rng, 10_000, 50, 0.8, 0.8 - drop)
        p = paired_pvalues(np.sum(base & ~cand, axis=1), np.sum(~base & cand, axis=1), 50, margin)
    else:
        kb, kc = rng.binomial(50, 0.8, 10_000), rng.binomial(50, 0.8 - drop, 10_000)
        p = unpaired_pvalue_table(50, 50, margin)[kb, kc]
    simulated = float(np.mean(np.asarray(p) < ALPHA))
    assert simulated == pytest.approx(power_at(drop), abs=0.02)
    assert simulated > 0.6


def test_sequential_gate_catches_large_drops_early():
    rng = np.random.default_rng(19)
    design = SequentialDesign.evenly(50, 5)
    base, cand = simulate_pairs(rng, 2000, 50, 0.85, 0.45)
    only_base, only_cand = np.cumsum(base & ~cand, axis=1), np.cumsum(~base & cand, axis=1)
    decisions = [sequential_decision(only_base[r], only_cand[r], design) for r in range(2000)]
    assert np.mean([d[2] == "efficacy" for d in decisions]) > 0.95
    assert np.mean([d[0] for d in decisions]) < 40


# ------------------------------------------------------------------------------------------------ curtailment


def _curtailed_verdict(base, cand, **kwargs):
    """Run the candidate's episodes one by one and stop at the first moment the verdict is determined."""
    planned = sorted(cand.outcomes)
    for done in range(len(planned) + 1):
        so_far = TaskOutcomes(cand.task, {i: cand.outcomes[i] for i in planned[:done]})
        state = gate_curtailment(base, so_far, planned, **kwargs)
        if state.determined:
            return state.verdict, done
    raise AssertionError("a complete run must be determined")


outcome_pairs = st.integers(min_value=1, max_value=40).flatmap(
    lambda n: st.tuples(st.lists(st.booleans(), min_size=n, max_size=n),
                        st.lists(st.booleans(), min_size=n, max_size=n)))


@settings(max_examples=300, deadline=None)
@given(outcome_pairs, st.sampled_from([0.0, 0.05, 0.15]), st.booleans(), st.sampled_from([0.05, 0.2]))
def test_curtailed_and_full_paired_runs_give_identical_verdicts(pair, margin, strict, alpha):
    """For any outcome sequences, stopping as soon as curtailment says the verdict is determined yields exactly the
    verdict of running every episode."""
    base, cand = outcomes(pair[0]), outcomes(pair[1])
    kwargs = dict(alpha=alpha, margin=margin, strict=strict)
    verdict, _ = _curtailed_verdict(base, cand, **kwargs)
    assert verdict == compare_task(base, cand, **kwargs).verdict


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=1, max_value=12).flatmap(
    lambda n: st.tuples(st.lists(st.booleans(), min_size=n, max_size=n),
                        st.lists(st.booleans(), min_size=n, max_size=n))), st.sampled_from([0.0, 0.1]))
def test_curtailed_and_full_unpaired_runs_give_identical_verdicts(pair, margin):
    """The same holds for the unpaired test (Boschloo / Farrington-Manning)."""
    base, cand = outcomes(pair[0]), outcomes(pair[1])
    verdict, _ = _curtailed_verdict(base, cand, margin=margin, paired=False)
    assert verdict == compare_task(base, cand, margin=margin, paired=False).verdict


@settings(max_examples=300, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=60), st.floats(min_value=0.0, max_value=1.0))
def test_curtailed_and_full_threshold_tests_agree(flags, threshold):
    """A threshold verdict declared early is the verdict the full run reaches, for any sequence and threshold."""
    n = len(flags)
    successes = np.r_[0, np.cumsum(flags)]
    full = meets_threshold(int(successes[-1]), n, threshold)
    for done in range(n + 1):
        state = threshold_curtailment(int(successes[done]), done, n, threshold)
        if state.determined:
            assert state.verdict == (PASS if full else FAIL)
            break
    else:
        raise AssertionError("a complete run must be determined")


def test_curtailment_saves_episodes_on_clear_cases():
    base = outcomes([1] * 50)
    verdict, used = _curtailed_verdict(base, outcomes([0] * 50))
    assert verdict == FAIL and used < 15
    assert threshold_curtailment(45, 45, 50, 0.9).determined  # 45/50 reached already
    assert threshold_curtailment(0, 6, 50, 0.9).verdict == FAIL  # at most 44/50 left possible
    assert not threshold_curtailment(40, 45, 50, 0.9).determined


def test_curtailment_rejects_unplanned_episodes():
    with pytest.raises(ValueError, match="not planned"):
        gate_curtailment(outcomes([1] * 5), outcomes([1] * 5), range(3))


# ----------------------------------------------------------------------------------------- continuous metrics


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(20)
    base = rng.normal(1.0, 0.3, 80)
    assert paired_bootstrap_interval(base, base + 0.1) == pytest.approx((0.1, 0.1, 0.1))
    cand = base + rng.normal(0.05, 0.02, 80)  # small shift, tiny per-episode noise: only pairing resolves it
    estimate, low, high = paired_bootstrap_interval(base, cand, resamples=2000)
    assert low < estimate < high and low > 0.0 and high < 0.1
    assert paired_bootstrap_interval(base, cand, resamples=2000) == (estimate, low, high)  # seeded
    with pytest.raises(VlaBenchError, match="equal length"):
        paired_bootstrap_interval(base, cand[:-1])


def test_operating_characteristics_table():
    rows = simulate_operating_characteristics(drops=(0.0, 0.3), replicates=1500, curtailment_replicates=40,
                                                   threshold=0.6)
    null, alternative = rows
    assert null["fixed_reject"] <= ALPHA + 3 * null["fixed_reject_se"]
    assert null["sequential_reject"] <= ALPHA + 3 * null["sequential_reject_se"]
    assert alternative["fixed_reject"] > 0.8 and alternative["sequential_reject"] > 0.8
    assert alternative["episodes_sequential"] < 50 and alternative["episodes_curtailed"] < 50
    assert "fixed reject" in format_operating_characteristics(rows)


suite_outcomes = st.integers(min_value=2, max_value=3).flatmap(
    lambda tasks: st.integers(min_value=1, max_value=15).flatmap(
        lambda n: st.lists(st.tuples(st.lists(st.booleans(), min_size=n, max_size=n),
                                     st.lists(st.booleans(), min_size=n, max_size=n)),
                           min_size=tasks, max_size=tasks)))


@settings(max_examples=60, deadline=None)
@given(suite_outcomes, st.sampled_from([0.0, 0.1]), st.booleans(), st.sampled_from([0.05, 0.3]))
def test_suite_curtailment_never_contradicts_the_holm_verdicts(tasks, margin, strict, alpha):
    """Running a suite task after task, a task whose Holm-adjusted verdict is declared determined at any point ends
    with exactly that verdict in compare_suite on the full run."""
    full = [(outcomes(b, f"task{t}"), outcomes(c, f"task{t}")) for t, (b, c) in enumerate(tasks)]
    kwargs = dict(alpha=alpha, margin=margin, strict=strict)
    final = [t.verdict for t in compare_suite(full, **kwargs).tasks]
    n = len(tasks[0][0])
    declared = [None] * len(full)
    for task in range(len(full)):
        for done in range(n + 1):
            state = [(base, TaskOutcomes(cand.task, {i: cand.outcomes[i] for i in range(done)} if t == task else
                                         (cand.outcomes if t < task else {})), range(n))
                     for t, (base, cand) in enumerate(full)]
            for t, result in enumerate(suite_gate_curtailment(state, **kwargs)):
                if result.determined:
                    assert result.verdict == final[t]
                    declared[t] = result.verdict
    assert declared == final  # once everything has run, everything is determined


def test_suite_curtailment_stops_a_clear_regression_early():
    base = outcomes([1] * 50, "task1")
    state = [(base, outcomes([0] * 20, "task1"), range(50)), (outcomes([1] * 50, "task2"), outcomes([], "task2"),
                                                              range(50))]
    first, second = suite_gate_curtailment(state)
    assert first.determined and first.verdict == FAIL
    assert not second.determined
