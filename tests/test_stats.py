"""The report's intervals: percentile bootstrap of a seed mean, Wilson interval, pairwise differences."""

import math

import numpy as np
import pytest

from attnbench.report.stats import NOT_SEPARATED, SEPARATED, bootstrap_mean, compare_means, wilson


def test_bootstrap_mean_is_reproducible_and_brackets_the_mean():
    values = [61.0, 64.5, 59.0, 66.0, 62.5]
    first, again = bootstrap_mean(values), bootstrap_mean(values)
    assert first == again  # fixed generator seed
    assert first.estimate == pytest.approx(np.mean(values)) and first.n == 5
    assert min(values) <= first.low < first.estimate < first.high <= max(values)


def test_bootstrap_mean_matches_the_normal_interval_on_a_large_sample():
    values = np.random.default_rng(3).normal(50.0, 4.0, size=400)
    interval = bootstrap_mean(values)
    half = 1.96 * values.std(ddof=1) / math.sqrt(values.size)  # about 0.39
    assert interval.low == pytest.approx(values.mean() - half, abs=0.06)
    assert interval.high == pytest.approx(values.mean() + half, abs=0.06)


def test_bootstrap_mean_of_equal_values_has_zero_width_and_of_one_value_none():
    assert bootstrap_mean([25.0, 25.0, 25.0]).low == bootstrap_mean([25.0, 25.0, 25.0]).high == 25.0
    single = bootstrap_mean([70.0])
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


def test_compare_means_separates_distinct_groups_and_not_overlapping_ones():
    full = [93.0, 95.5, 94.0, 96.0, 92.5]
    swin = [24.0, 26.5, 25.0, 23.5, 27.0]
    result = compare_means(full, swin)
    assert result.verdict == SEPARATED
    assert result.difference.estimate == pytest.approx(np.mean(full) - np.mean(swin))
    assert 0 < result.difference.low < result.difference.estimate < result.difference.high
    reverse = compare_means(swin, full)
    assert reverse.verdict == SEPARATED and reverse.difference.high < 0
    overlapping = compare_means([50.0, 60.0, 55.0, 45.0, 65.0], [52.0, 58.0, 49.0, 61.0, 54.0])
    assert overlapping.verdict == NOT_SEPARATED and overlapping.difference.contains(0.0)


def test_compare_means_with_one_seed_is_never_separated():
    result = compare_means([95.0], [25.0, 26.0])
    assert result.verdict == NOT_SEPARATED and math.isnan(result.difference.low)
