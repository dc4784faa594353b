"""Tests of privacy.audit against closed forms, scipy's exact intervals and mechanisms of known epsilon."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, stats
from scipy.stats import norm

from privacy.audit import (
    ThresholdRule,
    clopper_pearson,
    epsilon_lower_bound,
    one_run_audit,
    one_run_epsilon_lower_bound,
    one_run_guesses,
    one_run_p_value,
)
from privacy.errors import PrivacyParameterError


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon(delta) of the Gaussian mechanism N(mu, 1) vs N(0, 1) (Balle & Wang 2018, Thm 8)."""

    def excess(eps: float) -> float:
        return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta)

    return float(optimize.brentq(excess, 0.0, 200.0, xtol=1e-12))


def test_gaussian_oracle_agrees_with_dp_accounting() -> None:
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(dp_event.GaussianDpEvent(noise_multiplier=1.0))  # sensitivity 1, sd 1: mu = 1
    assert gaussian_epsilon(1.0, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), abs=2e-4)


# -- Clopper-Pearson -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 100, 5000])
def test_clopper_pearson_closed_forms_at_the_extremes(n: int) -> None:
    alpha = 0.05
    lo, hi = clopper_pearson(0, n, alpha)
    assert lo == 0.0 and hi == pytest.approx(1 - (alpha / 2) ** (1 / n), rel=1e-10)
    lo, hi = clopper_pearson(n, n, alpha)
    assert hi == 1.0 and lo == pytest.approx((alpha / 2) ** (1 / n), rel=1e-10)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 3000), alpha=st.sampled_from([0.01, 0.05, 0.1]))
def test_clopper_pearson_matches_scipy_binomtest(data: st.DataObject, n: int, alpha: float) -> None:
    k = data.draw(st.integers(0, n))
    expected = stats.binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method="exact")
    lo, hi = clopper_pearson(k, n, alpha)
    assert lo == pytest.approx(expected.low, abs=1e-9)
    assert hi == pytest.approx(expected.high, abs=1e-9)


def test_clopper_pearson_coverage_is_at_least_nominal() -> None:
    """Exact coverage by summing the binomial pmf over the outcomes whose interval contains p."""
    n, alpha = 40, 0.05
    intervals = [clopper_pearson(k, n, alpha) for k in range(n + 1)]
    for p in np.linspace(0.001, 0.999, 97):
        coverage = sum(stats.binom.pmf(k, n, p) for k, (lo, hi) in enumerate(intervals) if lo <= p <= hi)
        assert coverage >= 1 - alpha - 1e-12


@pytest.mark.parametrize(("k", "n", "alpha"), [(-1, 10, 0.05), (11, 10, 0.05), (1, 0, 0.05), (1, 10, 1.0)])
def test_clopper_pearson_validation(k: int, n: int, alpha: float) -> None:
    with pytest.raises(PrivacyParameterError):
        clopper_pearson(k, n, alpha)


# -- many-trial lower bound --------------------------------------------------------------------------------------


def test_fixed_threshold_bound_equals_hand_computation() -> None:
    rng = np.random.default_rng(11)
    with_scores, without_scores = rng.normal(2.0, 1.0, 800), rng.normal(0.0, 1.0, 800)
    threshold, delta = 2.5, 1e-3
    k_with = int(np.sum(with_scores >= threshold))
    k_without = int(np.sum(without_scores >= threshold))
    tpr_lo = stats.binomtest(k_with, 800).proportion_ci(0.95, method="exact").low
    fpr_hi = stats.binomtest(k_without, 800).proportion_ci(0.95, method="exact").high
    result = epsilon_lower_bound(with_scores, without_scores, delta, thresholds=[threshold])
    assert result.rule is ThresholdRule.WITH_ABOVE
    assert result.epsilon == pytest.approx(math.log((tpr_lo - delta) / fpr_hi), rel=1e-9)


def test_large_shift_gives_a_clearly_positive_bound_below_the_truth() -> None:
    rng = np.random.default_rng(5)
    mu, delta = 6.0, 1e-5
    result = epsilon_lower_bound(rng.normal(mu, 1.0, 2000), rng.normal(0.0, 1.0, 2000), delta)
    # best achievable with 2000 trials: FPR upper bound >= 1 - 0.025**(1/2000) ~ 1.8e-3, so eps_lb <= ~6.3
    assert 5.0 < result.epsilon <= math.log(1 / (1 - 0.025 ** (1 / 2000)))
    assert result.epsilon < gaussian_epsilon(mu, delta)


def test_bound_is_symmetric_in_direction() -> None:
    rng = np.random.default_rng(8)
    with_scores, without_scores = rng.normal(1.5, 1.0, 600), rng.normal(0.0, 1.0, 600)
    up = epsilon_lower_bound(with_scores, without_scores, 1e-4)
    down = epsilon_lower_bound(-with_scores, -without_scores, 1e-4)  # the canary now lowers the score
    swapped = epsilon_lower_bound(without_scores, with_scores, 1e-4)
    assert up.epsilon > 0.5
    assert down.epsilon == pytest.approx(up.epsilon, rel=1e-12)
    assert swapped.epsilon == pytest.approx(up.epsilon, rel=1e-12)
    # the winning rule says "the canary arm scores higher" (or, negated, "lower")
    assert up.rule in {ThresholdRule.WITH_ABOVE, ThresholdRule.WITHOUT_BELOW}
    assert down.rule in {ThresholdRule.WITH_BELOW, ThresholdRule.WITHOUT_ABOVE}
    assert swapped.rule in {ThresholdRule.WITHOUT_ABOVE, ThresholdRule.WITH_BELOW}


def test_identical_mechanisms_give_no_evidence() -> None:
    rng = np.random.default_rng(3)
    result = epsilon_lower_bound(rng.normal(0.0, 1.0, 1000), rng.normal(0.0, 1.0, 1000), 1e-5)
    assert result.epsilon < 0.5  # the truth is 0; small positive values are the optimistic max over thresholds


@pytest.mark.statistical
def test_gaussian_lower_bound_rarely_exceeds_true_epsilon() -> None:
    """False-positive check where the bound is nearly tight (mu=1, delta=0.05: true eps 1.569, mean lb 1.31).

    Each repetition exceeds the truth with probability p (measured 3-3.5% over 200 repetitions for this
    setting and n; nominal alpha=0.05 per threshold). With p <= 0.05 the chance of >= 11 exceedances in 60
    repetitions is binom.sf(10, 60, 0.05) ~ 1e-3: that is this test's false-positive rate. Fixed seed.
    """
    rng = np.random.default_rng(20261121)
    mu, delta, n, reps = 1.0, 0.05, 1000, 60
    truth = gaussian_epsilon(mu, delta)
    exceed = sum(
        epsilon_lower_bound(rng.normal(mu, 1.0, n), rng.normal(0.0, 1.0, n), delta).epsilon > truth for _ in range(reps)
    )
    assert stats.binom.sf(10, reps, 0.05) < 2e-3
    assert exceed <= 10


@pytest.mark.parametrize(
    ("with_scores", "without_scores", "needle"),
    [([], [1.0], "scores_with"), ([1.0], [[1.0]], "scores_without"), ([math.nan], [1.0], "NaN")],
)
def test_lower_bound_validation(with_scores: list[float], without_scores: list[float], needle: str) -> None:
    with pytest.raises(PrivacyParameterError, match=needle):
        epsilon_lower_bound(with_scores, without_scores, 1e-5)


def test_lower_bound_rejects_bad_delta() -> None:
    with pytest.raises(PrivacyParameterError, match="delta"):
        epsilon_lower_bound([1.0], [0.0], 1.0)


# -- one-run audit -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "r", "v", "expected"),
    [(1000, 100, 100, 3.47), (1000, 100, 90, 1.63), (1000, 1000, 1000, 5.78), (10_000, 1000, 900, 2.02)],
)
def test_one_run_reference_values(m: int, r: int, v: int, expected: float) -> None:
    # measured reference values (research/privacy_anchors.md section 5.3 D), 95% confidence, delta=1e-5
    assert one_run_epsilon_lower_bound(m, r, v, 1e-5, 0.95) == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("r", [1, 10, 100, 1000])
def test_one_run_pure_dp_all_correct_closed_form(r: int) -> None:
    """delta=0, v=r: p(eps) = p_eps**r, so eps_lb = max(0, logit(0.05**(1/r)))."""
    q = 0.05 ** (1 / r)
    assert one_run_p_value(5000, r, r, 2.0, 0.0) == pytest.approx((1 / (1 + math.exp(-2.0))) ** r, rel=1e-10)
    assert one_run_epsilon_lower_bound(5000, r, r, 0.0, 0.95) == pytest.approx(
        max(0.0, math.log(q / (1 - q))), abs=1e-9
    )


def test_one_run_p_value_pure_dp_equals_binomial_tail() -> None:
    p = 1 / (1 + math.exp(-1.3))
    assert one_run_p_value(300, 50, 41, 1.3, 0.0) == pytest.approx(stats.binom.sf(40, 50, p), rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    r=st.integers(1, 300),
    delta=st.sampled_from([0.0, 1e-6, 1e-5, 1e-3]),
    eps_pair=st.tuples(st.floats(0.0, 8.0), st.floats(0.0, 8.0)),
)
def test_one_run_p_value_grows_with_epsilon_and_delta(
    data: st.DataObject, r: int, delta: float, eps_pair: tuple[float, float]
) -> None:
    v = data.draw(st.integers(0, r))
    lo, hi = sorted(eps_pair)
    p_lo = one_run_p_value(1000, r, v, lo, delta)
    assert p_lo <= one_run_p_value(1000, r, v, hi, delta) + 1e-12
    assert one_run_p_value(1000, r, v, lo, 0.0) <= p_lo + 1e-15
    assert 0.0 <= p_lo <= 1.0


def test_one_run_guesses_and_audit_counts() -> None:
    rng = np.random.default_rng(99)
    m = 400
    included = rng.integers(0, 2, size=m).astype(bool)
    scores = included * 1.5 + rng.normal(0.0, 1.0, m)
    guesses = one_run_guesses(scores, 30, 20)
    order = np.argsort(scores)
    assert set(np.flatnonzero(guesses == 1)) == set(order[-30:])
    assert set(np.flatnonzero(guesses == -1)) == set(order[:20])
    correct = int(np.sum(included[order[-30:]])) + int(np.sum(~included[order[:20]]))
    audit = one_run_audit(included, scores, 30, 20, 1e-5)
    assert (audit.m, audit.r, audit.v) == (m, 50, correct)
    assert audit.epsilon_lower_bound == one_run_epsilon_lower_bound(m, 50, correct, 1e-5)


@pytest.mark.statistical
def test_one_run_bound_holds_for_randomized_response() -> None:
    """Guesses from an exactly eps-DP randomized response (each correct w.p. e^eps/(1+e^eps), eps=1).

    The p-value is exact for this mechanism, so each repetition has eps_lb > 1 with probability <= 0.05;
    >= 25 of 200 repetitions has probability binom.sf(24, 200, 0.05) < 1e-4 (this test's false-positive
    rate). Fixed seed.
    """
    rng = np.random.default_rng(7)
    eps, m, r, reps = 1.0, 1000, 200, 200
    correct_counts = rng.binomial(r, 1 / (1 + math.exp(-eps)), size=reps)
    exceed = sum(one_run_epsilon_lower_bound(m, r, int(v), 1e-5) > eps for v in correct_counts)
    assert stats.binom.sf(24, reps, 0.05) < 1e-4
    assert exceed <= 24


@pytest.mark.parametrize(
    ("m", "r", "v"),
    [(10, 11, 5), (10, 5, 6), (-1, 0, 0), (10, 5, 2.5)],
)
def test_one_run_validation(m: int, r: int, v: int) -> None:
    with pytest.raises(PrivacyParameterError):
        one_run_epsilon_lower_bound(m, r, v, 1e-5)


def test_one_run_audit_validation() -> None:
    with pytest.raises(PrivacyParameterError, match="k_pos"):
        one_run_guesses([0.1, 0.2], 2, 1)
    with pytest.raises(PrivacyParameterError, match="included"):
        one_run_audit([0, 2], [0.1, 0.2], 1, 0, 1e-5)
    with pytest.raises(PrivacyParameterError, match="entries"):
        one_run_audit([0, 1, 1], [0.1, 0.2], 1, 0, 1e-5)
