"""Intervals on rates and differences: against scipy, against Newcombe's published values, and by exact coverage."""
import numpy as np
import pytest
from scipy import special, stats

from vla_bench.metrics.intervals import (
    clopper_pearson_interval,
    newcombe_difference_interval,
    paired_difference_interval,
    wilson_interval,
)

CASES = [(0, 1), (1, 1), (0, 50), (1, 50), (25, 50), (49, 50), (50, 50), (81, 263), (3, 7)]


@pytest.mark.parametrize("k,n", CASES)
def test_wilson_matches_scipy(k, n):
    expected = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((expected.low, expected.high), abs=1e-12)


@pytest.mark.parametrize("k,n", CASES)
def test_clopper_pearson_matches_scipy(k, n):
    expected = stats.binomtest(k, n).proportion_ci(confidence_level=0.9, method="exact")
    assert clopper_pearson_interval(k, n, 0.9) == pytest.approx((expected.low, expected.high), abs=1e-9)


def test_no_episodes_is_the_whole_range():
    """A rate measured on no episodes can be anything: the interval is (0, 1), never an error or NaN."""
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert clopper_pearson_interval(0, 0) == (0.0, 1.0)
    low, high = newcombe_difference_interval(0, 0, 0, 0)
    assert (low, high) == (-1.0, 1.0)
    assert paired_difference_interval(0, 0, 0, 0) == (-1.0, 1.0)


def test_intervals_touch_the_ends_they_must_contain():
    assert wilson_interval(0, 50)[0] == 0.0 and wilson_interval(50, 50)[1] == 1.0
    assert clopper_pearson_interval(0, 50)[0] == 0.0 and clopper_pearson_interval(50, 50)[1] == 1.0


def test_invalid_counts_are_rejected():
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        wilson_interval(-1, 2)
    with pytest.raises(ValueError):
        wilson_interval(1, 2, confidence=1.0)


def test_vectorized_equals_scalar():
    k = np.array([0, 3, 10, 50])
    n = np.array([0, 10, 50, 50])
    lows, highs = wilson_interval(k, n)
    for i in range(k.size):
        assert (lows[i], highs[i]) == pytest.approx(wilson_interval(int(k[i]), int(n[i])))


@pytest.mark.parametrize("k1,n1,k2,n2,low,high", [
    # Newcombe (1998), Statistics in Medicine 17:873, Table II, method 10 (hybrid score)
    (56, 70, 48, 80, 0.0524, 0.3339),
    (9, 10, 3, 10, 0.1705, 0.8090),
    (6, 7, 2, 7, 0.0582, 0.8062),
    (5, 56, 0, 29, -0.0381, 0.1926),
])
def test_newcombe_unpaired_published_values(k1, n1, k2, n2, low, high):
    assert newcombe_difference_interval(k1, n1, k2, n2) == pytest.approx((low, high), abs=6e-5)


def test_paired_interval_reduces_to_unpaired_without_correlation():
    """With ad - bc between 0 and n/2 Newcombe's adjusted phi is 0, and the paired interval is the unpaired one on the
    same marginal rates."""
    both, first, second, neither = 5, 5, 5, 5  # ad - bc = 0
    n = both + first + second + neither
    assert paired_difference_interval(both, first, second, neither) == pytest.approx(
        newcombe_difference_interval(both + first, n, both + second, n))


def test_paired_interval_is_narrower_for_correlated_checkpoints():
    """Checkpoints that agree on most init states measure their difference more precisely than independent ones."""
    paired = paired_difference_interval(30, 8, 2, 10)
    unpaired = newcombe_difference_interval(38, 50, 32, 50)
    assert paired[1] - paired[0] < unpaired[1] - unpaired[0]
    assert paired[0] < 38 / 50 - 32 / 50 < paired[1]


def _paired_coverage(n, cells, confidence=0.95):
    """Exact coverage: sum over every paired table of its multinomial probability times [interval covers]."""
    grid = np.array([(a, b, c, n - a - b - c) for a in range(n + 1) for b in range(n + 1 - a)
                     for c in range(n + 1 - a - b)])
    a, b, c, d = grid.T
    log_pmf = (special.gammaln(n + 1) - special.gammaln(grid + 1).sum(axis=1)
               + special.xlogy(grid, np.asarray(cells)).sum(axis=1))
    truth = (cells[0] + cells[1]) - (cells[0] + cells[2])
    low, high = paired_difference_interval(a, b, c, d, confidence)
    return float(np.exp(log_pmf)[(low <= truth + 1e-12) & (truth - 1e-12 <= high)].sum())


@pytest.mark.parametrize("cells", [(0.6, 0.2, 0.05, 0.15), (0.4, 0.1, 0.1, 0.4), (0.85, 0.1, 0.0, 0.05)])
def test_paired_interval_covers_close_to_nominal(cells):
    """Newcombe's paired interval keeps its exact coverage near 95% at LIBERO's 50 episodes (Newcombe reports a
    minimum coverage around 0.93 for method 10; a badly wrong formula lands far from it)."""
    assert 0.925 <= _paired_coverage(40, cells) <= 0.995


def test_wilson_covers_close_to_nominal_on_average():
    n = 50
    k = np.arange(n + 1)
    low, high = wilson_interval(k, np.full_like(k, n))
    coverages = [stats.binom.pmf(k, n, p)[(low <= p) & (p <= high)].sum() for p in np.linspace(0.02, 0.98, 49)]
    assert 0.94 <= np.mean(coverages) <= 0.96
    assert min(coverages) > 0.85
