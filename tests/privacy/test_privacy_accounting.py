"""Tests of privacy.accounting against golden values and independent accountants (Opacus, dp_accounting)."""

from __future__ import annotations

import json
import math

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from scipy import optimize
from scipy.stats import norm

from fedmpt.errors import ConfigError
from privacy.accounting import (
    DpSgdEvent,
    PrivacyAccountant,
    calibrate_noise_multiplier,
    check_delta,
    compute_epsilon,
    epsilon_pld,
    epsilon_prv,
    epsilon_rdp,
)
from privacy.errors import PrivacyParameterError

GOLDEN = DpSgdEvent(noise_multiplier=1.5, sample_rate=0.04, steps=2250)  # Opacus accountants_test.py
DELTA = 1e-5
COARSE = 1e-3  # PLD value discretisation for fast tests: moves epsilon by ~1e-4 relative vs 1e-4


def opacus_rdp(history: list[tuple[float, float, int]], delta: float) -> float:
    """Independent RDP epsilon: Opacus's own accountant over an ungrouped history."""
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


def dp_accounting_pld(history: list[tuple[float, float, int]], delta: float, interval: float) -> float:
    """Independent PLD epsilon: dp_accounting composing each event separately, in the given order."""
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
    for sigma, q, steps in history:
        accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return float(accountant.get_epsilon(delta))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with sensitivity/sd = mu (Balle & Wang 2018, Thm 8)."""

    def excess(eps: float) -> float:
        return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta)

    return float(optimize.brentq(excess, 0.0, 100.0, xtol=1e-12))


# -- golden values ------------------------------------------------------------------------------------------


def test_rdp_matches_opacus_golden_value() -> None:
    assert epsilon_rdp([GOLDEN], DELTA) == pytest.approx(7.32911117143, rel=1e-9)


def test_rdp_agrees_with_dp_accounting_rdp() -> None:
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.PoissonSampledDpEvent(0.04, dp_event.GaussianDpEvent(1.5)), 2250)
    reference = accountant.get_epsilon(DELTA)  # 7.3293 with dp_accounting's own orders
    assert reference == pytest.approx(7.3293, abs=1e-3)
    assert epsilon_rdp([GOLDEN], DELTA) == pytest.approx(reference, rel=1e-3)


def test_pld_matches_dp_accounting_golden_value() -> None:
    assert epsilon_pld([GOLDEN], DELTA) == pytest.approx(6.7688, abs=1e-3)


def test_prv_matches_opacus_golden_value() -> None:
    event = DpSgdEvent(1.5, 0.04, 2249)  # Opacus's PRV golden uses 2249 steps
    assert epsilon_prv([event], DELTA) == pytest.approx(6.777395712150674, rel=1e-6)


def test_pld_full_batch_matches_exact_gaussian_mechanism() -> None:
    sigma = 2.0
    exact = gaussian_epsilon(1.0 / sigma, 1e-6)
    # pessimistic discretisation: an upper bound within ~one discretisation step
    assert exact <= epsilon_pld([DpSgdEvent(sigma, 1.0, 1)], 1e-6) <= exact + 2e-4


def test_empty_history_has_zero_epsilon() -> None:
    assert epsilon_rdp([], DELTA) == 0.0
    assert epsilon_pld([], DELTA) == 0.0
    assert epsilon_rdp([DpSgdEvent(1.0, 0.5, 0)], DELTA) == 0.0


# -- cross-accountant agreement and composition -------------------------------------------------------------

events = st.builds(
    DpSgdEvent,
    noise_multiplier=st.floats(0.6, 5.0),
    sample_rate=st.floats(0.005, 1.0),
    steps=st.integers(1, 400),
)


@settings(max_examples=12, deadline=None)
@given(event=events)
def test_pld_never_above_rdp(event: DpSgdEvent) -> None:
    rdp = epsilon_rdp([event], DELTA)
    pld = epsilon_pld([event], DELTA, COARSE)
    assert 0.0 < pld <= rdp  # RDP is 3x looser for one lightly-subsampled step, so no closeness claim here


@pytest.mark.parametrize(
    "event",
    [GOLDEN, DpSgdEvent(1.0, 0.01, 5000), DpSgdEvent(0.8, 0.02, 2000), DpSgdEvent(3.0, 0.5, 100)],
)
def test_pld_within_ten_percent_of_rdp_in_the_many_step_regime(event: DpSgdEvent) -> None:
    rdp, pld = epsilon_rdp([event], DELTA), epsilon_pld([event], DELTA, COARSE)
    assert pld <= rdp <= 1.11 * pld  # measured ratios 1.08-1.10 for these settings


@settings(max_examples=6, deadline=None)
@given(history=st.lists(events, min_size=1, max_size=4))
def test_rdp_equals_opacus_on_mixed_history_and_is_monotone(history: list[DpSgdEvent]) -> None:
    tuples = [e.as_opacus_tuple() for e in history]
    assert epsilon_rdp(history, DELTA) == pytest.approx(opacus_rdp(tuples, DELTA), rel=1e-9)
    prefix_eps = [epsilon_rdp(history[:k], DELTA) for k in range(len(history) + 1)]
    assert all(a <= b for a, b in zip(prefix_eps, prefix_eps[1:], strict=False))


def test_pld_monotone_as_events_are_added() -> None:
    history = [
        DpSgdEvent(1.0, 0.1, 5),
        DpSgdEvent(1.3, 0.05, 20),
        DpSgdEvent(0.9, 0.2, 3),
        DpSgdEvent(2.0, 1.0, 1),
    ]
    prefix_eps = [epsilon_pld(history[:k], DELTA, COARSE) for k in range(len(history) + 1)]
    assert prefix_eps[0] == 0.0
    assert all(a < b for a, b in zip(prefix_eps, prefix_eps[1:], strict=False))


@settings(max_examples=5, deadline=None)
@given(
    sigma=st.floats(0.7, 3.0),
    q=st.floats(0.01, 0.5),
    step_counts=st.lists(st.integers(1, 50), min_size=2, max_size=4),
)
def test_rdp_one_by_one_equals_single_event(sigma: float, q: float, step_counts: list[int]) -> None:
    one_by_one = [DpSgdEvent(sigma, q, s) for s in step_counts]
    single = DpSgdEvent(sigma, q, sum(step_counts))
    assert epsilon_rdp(one_by_one, DELTA) == pytest.approx(epsilon_rdp([single], DELTA), rel=1e-12)
    # the independent accountant composes the events one by one
    assert epsilon_rdp([single], DELTA) == pytest.approx(
        opacus_rdp([e.as_opacus_tuple() for e in one_by_one], DELTA), rel=1e-9
    )


def test_pld_one_by_one_equals_single_event_and_dp_accounting() -> None:
    step_counts = [3, 5, 2, 7]
    one_by_one = [DpSgdEvent(1.1, 0.08, s) for s in step_counts]
    single = epsilon_pld([DpSgdEvent(1.1, 0.08, sum(step_counts))], DELTA, COARSE)
    assert epsilon_pld(one_by_one, DELTA, COARSE) == pytest.approx(single, rel=1e-12)
    separately = dp_accounting_pld([e.as_opacus_tuple() for e in one_by_one], DELTA, COARSE)
    assert single == pytest.approx(separately, rel=1e-4)


def test_pld_mixed_history_is_order_independent_and_matches_dp_accounting() -> None:
    history = [DpSgdEvent(1.0, 0.1, 5), DpSgdEvent(1.5, 0.02, 40), DpSgdEvent(1.0, 0.1, 7)]
    reversed_eps = epsilon_pld(history[::-1], DELTA, COARSE)
    assert epsilon_pld(history, DELTA, COARSE) == reversed_eps
    reference = dp_accounting_pld([e.as_opacus_tuple() for e in history], DELTA, COARSE)
    assert reversed_eps == pytest.approx(reference, rel=1e-4)


def test_accountant_state_round_trips_through_json() -> None:
    accountant = PrivacyAccountant()
    for round_steps in (10, 10, 12):
        accountant.compose(DpSgdEvent(1.2, 0.05, round_steps))
    restored = PrivacyAccountant.from_state_dict(json.loads(json.dumps(accountant.state_dict())))
    assert restored.history == accountant.history
    assert restored.get_epsilon(DELTA) == opacus_rdp([(1.2, 0.05, 10), (1.2, 0.05, 10), (1.2, 0.05, 12)], DELTA)
    assert compute_epsilon(restored.history, DELTA, "pld") == epsilon_pld(accountant.history, DELTA)


# -- calibration -------------------------------------------------------------------------------------------


def test_calibration_matches_opacus_golden() -> None:
    sigma = calibrate_noise_multiplier(8.0, DELTA, 0.04, 2000)
    assert sigma == pytest.approx(1.3562, abs=2e-3)  # Opacus get_noise_multiplier golden value
    assert opacus_rdp([(sigma, 0.04, 2000)], DELTA) <= 8.0


@settings(max_examples=8, deadline=None)
@given(
    target=st.floats(0.3, 20.0),
    q=st.floats(1e-3, 1.0),
    steps=st.integers(1, 5000),
)
def test_calibrated_rdp_never_overshoots(target: float, q: float, steps: int) -> None:
    sigma = calibrate_noise_multiplier(target, DELTA, q, steps, epsilon_tolerance=0.01)
    achieved = opacus_rdp([(sigma, q, steps)], DELTA)
    assert target - 0.01 - 1e-9 <= achieved <= target


def test_calibration_agrees_with_opacus_get_noise_multiplier() -> None:
    for target, q, steps in ((1.0, 0.01, 3000), (8.0, 1.0, 20)):
        sigma = calibrate_noise_multiplier(target, DELTA, q, steps, epsilon_tolerance=0.01)
        reference = get_noise_multiplier(
            target_epsilon=target, target_delta=DELTA, sample_rate=q, steps=steps, accountant="rdp"
        )
        # both land in the same [target - 0.01, target] band
        assert opacus_rdp([(reference, q, steps)], DELTA) == pytest.approx(
            opacus_rdp([(sigma, q, steps)], DELTA), abs=0.011
        )


def test_calibrated_pld_never_overshoots() -> None:
    for target, q, steps in ((2.0, 0.1, 100), (6.0, 0.02, 500)):
        sigma = calibrate_noise_multiplier(
            target, DELTA, q, steps, accountant="pld", epsilon_tolerance=0.02, pld_value_discretization=COARSE
        )
        achieved = dp_accounting_pld([(sigma, q, steps)], DELTA, COARSE)
        assert target - 0.02 - 1e-6 <= achieved <= target


def test_calibration_rejects_unreachable_and_prv() -> None:
    with pytest.raises(PrivacyParameterError, match="max_noise_multiplier"):
        calibrate_noise_multiplier(1e-3, DELTA, 1.0, 10_000, max_noise_multiplier=50.0)
    with pytest.raises(PrivacyParameterError, match="prv"):
        calibrate_noise_multiplier(1.0, DELTA, 0.1, 10, accountant="prv")


# -- validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"noise_multiplier": 0.0, "sample_rate": 0.1, "steps": 1}, "noise_multiplier"),
        ({"noise_multiplier": -1.0, "sample_rate": 0.1, "steps": 1}, "-1.0"),
        ({"noise_multiplier": math.inf, "sample_rate": 0.1, "steps": 1}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.0, "steps": 1}, "sample_rate"),
        ({"noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 1}, "1.5"),
        ({"noise_multiplier": 1.0, "sample_rate": math.nan, "steps": 1}, "sample_rate"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": -3}, "-3"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 2.5}, "steps"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": True}, "steps"),
    ],
)
def test_event_validation_names_the_bad_value(kwargs: dict[str, float], needle: str) -> None:
    with pytest.raises(PrivacyParameterError, match=needle) as info:
        DpSgdEvent(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0, math.nan])
def test_delta_validation(delta: float) -> None:
    with pytest.raises(PrivacyParameterError, match="delta"):
        epsilon_rdp([GOLDEN], delta)


@pytest.mark.parametrize("epsilon", [0.0, -1.0, math.inf])
def test_target_epsilon_validation(epsilon: float) -> None:
    with pytest.raises(PrivacyParameterError, match="target_epsilon"):
        calibrate_noise_multiplier(epsilon, DELTA, 0.1, 10)


def test_unknown_accountant_is_rejected() -> None:
    with pytest.raises(PrivacyParameterError, match="gdp"):
        compute_epsilon([GOLDEN], DELTA, "gdp")


def test_check_delta_enforces_below_inverse_dataset_size() -> None:
    check_delta(1e-5, 99_999)
    with pytest.raises(PrivacyParameterError, match="1/100000"):
        check_delta(1e-5, 100_000)
    with pytest.raises(PrivacyParameterError, match="n_records"):
        check_delta(1e-5, 0)
