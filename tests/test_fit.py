"""Log–log slope fits: exact power laws recovered, intervals that cover the truth, and the complexity claim
on the scaling suite's exact S ∝ N^{1/3} family."""

import math

import numpy as np
import pytest

import attentions
from attnbench.report.fit import fit_loglog_slope, reference_line
from attnbench.suite import expand, load_suite


@pytest.mark.parametrize("exponent", [1.0, 4 / 3, 2.0, 0.5])
def test_exact_power_laws_are_recovered(exponent):
    x = [64, 729, 4096, 15625]
    fit = fit_loglog_slope(x, [3.5 * value**exponent for value in x])
    assert fit.slope == pytest.approx(exponent, abs=1e-12)
    assert fit.prefactor == pytest.approx(3.5, rel=1e-9)
    assert fit.r_squared == pytest.approx(1.0)
    low, high = fit.ci
    assert high - low == pytest.approx(0.0, abs=1e-9)  # no residual, no uncertainty
    assert fit.predict(100.0) == pytest.approx(3.5 * 100.0**exponent)


def test_two_points_give_the_exact_slope_and_no_interval():
    fit = fit_loglog_slope([10, 1000], [5, 500])
    assert fit.slope == pytest.approx(1.0) and fit.n == 2
    assert fit.ci is None and fit.ci_contains(1.0) is None
    assert fit.describe() == "1.000 (n=2, no CI)"


def test_interval_covers_the_true_slope_on_noisy_data_at_about_the_nominal_rate():
    """Multiplicative log-normal noise: the t-interval holds the true slope in ~95% of 400 draws."""
    rng = np.random.default_rng(0)
    x = np.array([1e2, 3e2, 1e3, 3e3, 1e4, 3e4])
    covered, widths = 0, []
    for _ in range(400):
        y = 2.0 * x**1.5 * np.exp(rng.normal(0.0, 0.1, size=x.size))
        fit = fit_loglog_slope(x, y)
        covered += fit.ci_contains(1.5)
        widths.append(fit.ci[1] - fit.ci[0])
    assert 0.91 <= covered / 400 <= 0.99
    assert 0 < np.median(widths) < 0.2


def test_a_wider_confidence_gives_a_wider_interval():
    x = [1, 2, 4, 8, 16]
    y = [1.0, 2.2, 3.9, 8.5, 15.0]
    narrow, wide = fit_loglog_slope(x, y, confidence=0.5), fit_loglog_slope(x, y, confidence=0.99)
    assert narrow.slope == wide.slope
    assert wide.ci[0] < narrow.ci[0] < narrow.slope < narrow.ci[1] < wide.ci[1]
    assert wide.describe().startswith(f"{wide.slope:.3f} [") and "99% CI" in wide.describe()


@pytest.mark.parametrize("x,y", [([1, 2], [1, 0]), ([1, 1, 1], [1, 2, 3]), ([1, 2], [1, math.inf]), ([1], [1]),
                                 ([1, 2, 3], [1, 2])])
def test_unfittable_input_is_refused(x, y):
    with pytest.raises(ValueError):
        fit_loglog_slope(x, y)


def test_reference_line_passes_through_its_anchor():
    line = reference_line([10, 20, 40], 2.0, through=(20, 100.0))
    assert list(line) == pytest.approx([25.0, 100.0, 400.0])


def _family_sizes() -> list[tuple[int, int]]:
    """(H, S) of the scaling suite's exact S ∝ N^{1/3} family, read from the suite."""
    cases = [case for case in expand(load_suite("suites/scaling.yaml"))
             if case.mechanism == "bra" and case.shape.startswith("h")]
    return sorted({(case.height, case.options["n_win"]) for case in cases})


def test_scaling_suite_family_keeps_s_proportional_to_n_to_the_third():
    sizes = _family_sizes()
    assert len(sizes) >= 3
    for height, n_win in sizes:
        m = round(height ** (1 / 3))
        assert (height, n_win) == (m**3, m**2)  # N = m⁶ tokens, S = m² = N^{1/3}


def test_bra_routing_and_attention_macs_scale_as_n_to_the_four_thirds_on_the_family():
    """The paper's claim, on the analytic counts: routing + token attention ∝ N^{4/3} when S ∝ N^{1/3};
    full attention's scores and weighted sum ∝ N²."""
    tokens, bra_macs, full_macs = [], [], []
    for height, n_win in _family_sizes():
        bra = attentions.create("bra", dim=64, num_heads=2, n_win=n_win, topk=4, side_dwconv=5).macs(height, height)
        full = attentions.create("full", dim=64, num_heads=2).macs(height, height)
        tokens.append(height * height)
        bra_macs.append(bra.parts["routing"] + bra.parts["attn_scores"] + bra.parts["attn_values"])
        full_macs.append(full.parts["attn_scores"] + full.parts["attn_values"])
    bra_slope, full_slope = fit_loglog_slope(tokens, bra_macs).slope, fit_loglog_slope(tokens, full_macs).slope
    assert 1.30 <= bra_slope <= 1.37 and bra_slope == pytest.approx(4 / 3, abs=1e-9)
    assert 1.95 <= full_slope <= 2.05
