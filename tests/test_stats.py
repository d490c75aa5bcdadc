"""The report's intervals: Student-t interval of a seed mean, Wilson interval, Welch differences, Holm verdicts."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from attnbench.report.stats import (
    NOT_SEPARATED,
    SEPARATED,
    Comparison,
    Interval,
    compare_means,
    holm,
    mean_interval,
    wilson,
)


def test_mean_interval_is_the_textbook_student_t_interval():
    interval = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)  # t_0.975(4) · s / √n, s² = 2.5
    assert interval.estimate == 3.0 and interval.n == 5
    assert interval.low == pytest.approx(3.0 - half, abs=1e-5) and interval.high == pytest.approx(3.0 + half, abs=1e-5)


def test_with_five_seeds_the_t_interval_covers_95_percent_and_a_percentile_bootstrap_does_not():
    """Why the report left the percentile bootstrap: on normal data with n = 5 it covers the true mean about 83% of
    the time for a nominal 95%; the t interval covers 95%."""
    rng = np.random.default_rng(0)
    samples = rng.normal(50.0, 10.0, size=(2000, 5))
    t_covered = np.mean([mean_interval(row).contains(50.0) for row in samples])
    resampled = samples[:, None, :][np.arange(2000)[:, None, None], 0, rng.integers(0, 5, size=(2000, 1000, 5))]
    low, high = np.quantile(resampled.mean(axis=2), [0.025, 0.975], axis=1)
    bootstrap_covered = np.mean((low <= 50.0) & (50.0 <= high))
    assert 0.93 <= t_covered <= 0.97
    assert bootstrap_covered < 0.88


def test_mean_interval_of_equal_values_has_zero_width_and_of_one_value_none():
    assert mean_interval([25.0, 25.0, 25.0]).low == mean_interval([25.0, 25.0, 25.0]).high == 25.0
    single = mean_interval([70.0])
    assert single.estimate == 70.0 and math.isnan(single.low) and math.isnan(single.high)


Z2 = 1.959964 ** 2


@pytest.mark.parametrize("successes,trials,low,high", [
    (81, 263, 0.2553, 0.3662),  # Newcombe (1998), Stat. Med. 17:857, Table I, method 3 (score interval)
    (0, 10, 0.0, Z2 / (10 + Z2)),  # closed forms at the edges: 0/n -> [0, z²/(n+z²)], n/n -> [n/(n+z²), 1]
    (10, 10, 10 / (10 + Z2), 1.0),
])
def test_wilson_interval_matches_reference_values(successes, trials, low, high):
    interval = wilson(successes, trials)
    assert interval.estimate == pytest.approx(successes / trials)
    assert interval.low == pytest.approx(low, abs=5e-4) and interval.high == pytest.approx(high, abs=5e-4)


def test_wilson_is_symmetric_and_narrows_with_more_trials():
    assert wilson(3, 10).low == pytest.approx(1 - wilson(7, 10).high)
    small, large = wilson(30, 100), wilson(300, 1000)
    assert large.high - large.low < small.high - small.low and large.contains(0.3)


def test_wilson_rejects_impossible_counts():
    with pytest.raises(ValueError):
        wilson(3, 2)
    with pytest.raises(ValueError):
        wilson(0, 0)


def test_compare_means_is_welchs_test_with_its_interval():
    a, b = [61.0, 64.5, 59.0, 66.0, 62.5], [55.0, 58.5, 49.0, 60.0, 57.5, 52.0]
    result = compare_means(a, b)
    reference = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    low, high = reference.confidence_interval(0.95)
    assert (result.difference.low, result.difference.high) == pytest.approx((low, high), rel=1e-9)
    assert result.difference.estimate == pytest.approx(np.mean(a) - np.mean(b)) and result.verdict == SEPARATED


def test_compare_means_separates_distinct_groups_and_not_overlapping_ones():
    full = [93.0, 95.5, 94.0, 96.0, 92.5]
    swin = [24.0, 26.5, 25.0, 23.5, 27.0]
    result = compare_means(full, swin)
    assert result.verdict == SEPARATED and result.p_value < 1e-6
    assert 0 < result.difference.low < result.difference.estimate < result.difference.high
    reverse = compare_means(swin, full)
    assert reverse.verdict == SEPARATED and reverse.difference.high < 0
    overlapping = compare_means([50.0, 60.0, 55.0, 45.0, 65.0], [52.0, 58.0, 49.0, 61.0, 54.0])
    assert overlapping.verdict == NOT_SEPARATED and overlapping.difference.contains(0.0)


def test_compare_means_of_constant_sides_is_exact_and_of_one_seed_never_separated():
    assert compare_means([100.0] * 5, [25.0] * 5).verdict == SEPARATED
    same = compare_means([100.0] * 5, [100.0] * 5)
    assert same.verdict == NOT_SEPARATED and same.p_value == 1.0
    one = compare_means([95.0], [25.0, 26.0])
    assert one.verdict == NOT_SEPARATED and math.isnan(one.difference.low)


def test_holm_adjusts_the_family_step_down():
    def comparison(p):
        return Comparison(Interval(1.0, 0.5, 1.5, 5), p, SEPARATED)

    judged = holm([comparison(p) for p in (0.01, 0.04, 0.03, 0.005)])
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, max(0.04·1, 0.06) = 0.06
    assert [c.adjusted_p for c in judged] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [c.verdict for c in judged] == [SEPARATED, NOT_SEPARATED, NOT_SEPARATED, SEPARATED]
    assert holm([]) == []
