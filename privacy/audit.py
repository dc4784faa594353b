"""Audit statistics: empirical lower bounds on epsilon from attack outcomes (functions of arrays only).

A lower bound that exceeds the claimed epsilon is evidence of a bug (in the accounting, the clipping, the
noise, the sampling or the per-sample gradients); a lower bound below it shows nothing about privacy beyond
"no bug large enough for this attack to see". The canary harnesses that produce the scores need the model and
live with the training code; everything here takes plain arrays.

* :func:`clopper_pearson` - exact binomial confidence intervals.
* :func:`epsilon_lower_bound` - many-trial white-box audit of one mechanism (e.g. one DP-SGD step with and
  without a canary; Jagielski et al. NeurIPS 2020, Nasr et al. USENIX Security 2023): for a rejection rule
  S = {score >= t} or {score < t}, (epsilon, delta)-DP implies P_with(S) <= e^eps P_without(S) + delta and the
  same with the two arms swapped, hence eps >= log((P_A(S) - delta) / P_B(S)).
* :func:`one_run_p_value`, :func:`one_run_epsilon_lower_bound`, :func:`one_run_audit` - the one-run audit of
  Steinke, Nasr, Jagielski (NeurIPS 2023, "Privacy Auditing with One (1) Training Run").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from numbers import Integral

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import special, stats

from privacy.errors import PrivacyParameterError


def _check_alpha(alpha: float, name: str = "alpha") -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 < float(alpha) < 1.0:
        raise PrivacyParameterError(f"{name} must be in (0, 1), got {alpha!r}")
    return float(alpha)


def _check_audit_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0.0 <= float(delta) < 1.0:
        raise PrivacyParameterError(f"delta must be in [0, 1), got {delta!r}")
    return float(delta)


def _check_count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or int(value) < 0:
        raise PrivacyParameterError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _clopper_pearson_arrays(
    successes: NDArray[np.int64], trials: int, alpha: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Vectorised exact interval: lower = Beta(a/2; k, n-k+1) quantile, upper = Beta(1-a/2; k+1, n-k)."""
    k = successes.astype(np.float64)
    n = float(trials)
    with np.errstate(invalid="ignore", divide="ignore"):
        lower = np.where(k > 0, stats.beta.ppf(alpha / 2.0, np.maximum(k, 1.0), n - k + 1.0), 0.0)
        upper = np.where(k < n, stats.beta.ppf(1.0 - alpha / 2.0, k + 1.0, np.maximum(n - k, 1.0)), 1.0)
    return lower, upper


def clopper_pearson(successes: int, trials: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact (Clopper-Pearson 1934) two-sided ``1 - alpha`` confidence interval for a binomial proportion.

    Lower end: the ``alpha/2`` quantile of Beta(k, n - k + 1) (0 when k = 0); upper end: the ``1 - alpha/2``
    quantile of Beta(k + 1, n - k) (1 when k = n). Each end alone is a one-sided ``1 - alpha/2`` bound, and
    the interval covers the true proportion with probability >= ``1 - alpha`` for every p (conservative).
    """
    trials = _check_count(trials, "trials")
    successes = _check_count(successes, "successes")
    if trials == 0 or successes > trials:
        raise PrivacyParameterError(f"need 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    alpha = _check_alpha(alpha)
    lower, upper = _clopper_pearson_arrays(np.array([successes], dtype=np.int64), trials, alpha)
    return float(lower[0]), float(upper[0])


class ThresholdRule(StrEnum):
    """Which arm is the "positive" one and which side of the threshold the rejection set is."""

    WITH_ABOVE = "with: score >= t"
    WITHOUT_ABOVE = "without: score >= t"
    WITH_BELOW = "with: score < t"
    WITHOUT_BELOW = "without: score < t"


@dataclass(frozen=True)
class EpsilonLowerBound:
    """Result of :func:`epsilon_lower_bound`.

    ``epsilon`` = log((positive_rate_lower - delta) / negative_rate_upper) at the best ``threshold`` and
    ``rule`` (0.0 when no rule gives positive evidence; then ``threshold`` is NaN).
    """

    epsilon: float
    threshold: float
    rule: ThresholdRule | None
    positive_rate_lower: float
    negative_rate_upper: float
    delta: float
    alpha: float
    n_with: int
    n_without: int


def _scores(values: ArrayLike, name: str) -> NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise PrivacyParameterError(f"{name} must be a non-empty 1-D array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise PrivacyParameterError(f"{name} contains NaN or infinite values")
    return array


def epsilon_lower_bound(
    scores_with: ArrayLike,
    scores_without: ArrayLike,
    delta: float,
    alpha: float = 0.05,
    thresholds: ArrayLike | None = None,
) -> EpsilonLowerBound:
    """Empirical epsilon lower bound from attack scores on neighbouring inputs (many independent trials).

    ``scores_with[j]`` / ``scores_without[j]``: the attack statistic from trial j of the mechanism run on the
    input with / without the canary. For each threshold t and each of the four rules (either arm positive,
    rejection set ``score >= t`` or ``score < t``), the positive arm's rate gets its Clopper-Pearson lower
    bound and the other arm's rate its upper bound (each one-sided at ``1 - alpha/2``, so at a *fixed*
    threshold the bound holds with probability >= ``1 - alpha``); then
    ``epsilon_lb = max(0, max_t log((rate_lower - delta) / rate_upper))``.

    With ``thresholds=None`` every observed score is tried and the best kept. Choosing the threshold on the
    same data is optimistic: the guarantee above is per threshold, not for the maximum. For a strictly valid
    ``1 - alpha`` statement pass a threshold (and implicitly the rule) chosen on independent trials.
    """
    with_scores = _scores(scores_with, "scores_with")
    without_scores = _scores(scores_without, "scores_without")
    delta = _check_audit_delta(delta)
    alpha = _check_alpha(alpha)
    n1, n0 = with_scores.size, without_scores.size
    if thresholds is None:
        candidates = np.unique(np.concatenate([with_scores, without_scores]))
    else:
        candidates = _scores(thresholds, "thresholds")
    sorted_with = np.sort(with_scores)
    sorted_without = np.sort(without_scores)
    above_with = n1 - np.searchsorted(sorted_with, candidates, side="left")  # count(score >= t)
    above_without = n0 - np.searchsorted(sorted_without, candidates, side="left")

    best = EpsilonLowerBound(0.0, math.nan, None, math.nan, math.nan, delta, alpha, n1, n0)
    best_value = 0.0
    arms = {
        ThresholdRule.WITH_ABOVE: (above_with, n1, above_without, n0),
        ThresholdRule.WITHOUT_ABOVE: (above_without, n0, above_with, n1),
        ThresholdRule.WITH_BELOW: (n1 - above_with, n1, n0 - above_without, n0),
        ThresholdRule.WITHOUT_BELOW: (n0 - above_without, n0, n1 - above_with, n1),
    }
    for rule, (k_pos, n_pos, k_neg, n_neg) in arms.items():
        lower, _ = _clopper_pearson_arrays(np.asarray(k_pos, dtype=np.int64), n_pos, alpha)
        _, upper = _clopper_pearson_arrays(np.asarray(k_neg, dtype=np.int64), n_neg, alpha)
        margin = lower - delta
        valid = margin > 0
        if not np.any(valid):
            continue
        values = np.full(candidates.shape, -np.inf)
        values[valid] = np.log(margin[valid] / upper[valid])
        index = int(np.argmax(values))
        if values[index] > best_value:
            best_value = float(values[index])
            best = EpsilonLowerBound(
                epsilon=best_value,
                threshold=float(candidates[index]),
                rule=rule,
                positive_rate_lower=float(lower[index]),
                negative_rate_upper=float(upper[index]),
                delta=delta,
                alpha=alpha,
                n_with=n1,
                n_without=n0,
            )
    return best


# ----------------------------------------------------------------------------------------------------------
# One-run audit (Steinke, Nasr, Jagielski 2023)


def _check_one_run_counts(m: int, r: int, v: int) -> tuple[int, int, int]:
    m, r, v = _check_count(m, "m"), _check_count(r, "r"), _check_count(v, "v")
    if not v <= r <= m:
        raise PrivacyParameterError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    return m, r, v


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[at least v of r guesses correct] under (epsilon, delta)-DP (Steinke et al. 2023).

    Setting: m canaries, each included independently with probability 1/2; the auditor guesses inclusion
    for r of them (abstaining on the rest) and gets v right. With ``f(x) = P[Binomial(r, p) >= x]`` and
    ``p = e^eps / (1 + e^eps)``, (epsilon, delta)-DP implies
    ``P[W >= v] <= f(v) + 2 m delta max_{1 <= i <= v} (f(v - i) - f(v)) / i``
    (the paper's main theorem; for delta = 0 it is the binomial tail alone). Returns the bound capped at 1.
    """
    m, r, v = _check_one_run_counts(m, r, v)
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not math.isfinite(epsilon):
        raise PrivacyParameterError(f"epsilon must be a finite number, got {epsilon!r}")
    if epsilon < 0:
        raise PrivacyParameterError(f"epsilon must be >= 0, got {epsilon!r}")
    delta = _check_audit_delta(delta)
    if v == 0:
        return 1.0
    p = float(special.expit(epsilon))
    tail = float(stats.binom.sf(v - 1, r, p))  # f(v) = P[X >= v]
    # f(v - i) - f(v) = P[v - i <= X <= v - 1] = sum of the pmf over the i values just below v.
    pmf_below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # pmf(v-1), pmf(v-2), ..., pmf(0)
    window_sums = np.cumsum(pmf_below)  # i-th entry (1-based) = P[v - i <= X <= v - 1]
    slope = float(np.max(window_sums / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * slope)


def one_run_epsilon_lower_bound(
    m: int, r: int, v: int, delta: float, confidence: float = 0.95, iterations: int = 60
) -> float:
    """Largest epsilon that the one-run audit rejects at level ``1 - confidence`` (0.0 if none).

    The p-value bound of :func:`one_run_p_value` grows with epsilon; bisection keeps ``lo`` with
    p(lo) < 1 - confidence and ``hi`` with p(hi) >= 1 - confidence and returns ``lo`` (the conservative end).
    Steinke et al. 2023; e.g. m=1000, r=v=100, delta=1e-5 gives ~3.47 at 95%.
    """
    m, r, v = _check_one_run_counts(m, r, v)
    delta = _check_audit_delta(delta)
    level = 1.0 - _check_alpha(confidence, name="confidence")
    if one_run_p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < level:
        lo, hi = hi, 2.0 * hi
        if hi > 1e4:  # pragma: no cover - p(eps) -> 1 as eps grows whenever v >= 1
            raise PrivacyParameterError(f"one-run bound does not converge for m={m}, r={r}, v={v}")
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if one_run_p_value(m, r, v, mid, delta) < level:
            lo = mid
        else:
            hi = mid
    return lo


def one_run_guesses(scores: ArrayLike, k_pos: int, k_neg: int) -> NDArray[np.int8]:
    """Guesses +1 (included) for the ``k_pos`` highest scores, -1 for the ``k_neg`` lowest, 0 (abstain) else.

    Ties are broken by index (stable sort), which the auditor fixes before seeing the inclusion coins.
    """
    values = _scores(scores, "scores")
    k_pos, k_neg = _check_count(k_pos, "k_pos"), _check_count(k_neg, "k_neg")
    if k_pos + k_neg > values.size:
        raise PrivacyParameterError(f"k_pos + k_neg = {k_pos + k_neg} exceeds the number of canaries {values.size}")
    order = np.argsort(values, kind="stable")  # ascending
    guesses = np.zeros(values.size, dtype=np.int8)
    if k_neg:
        guesses[order[:k_neg]] = -1
    if k_pos:
        guesses[order[values.size - k_pos :]] = 1
    return guesses


@dataclass(frozen=True)
class OneRunAudit:
    """Result of :func:`one_run_audit`: canaries m, guesses r, correct guesses v, and epsilon_lb."""

    m: int
    r: int
    v: int
    delta: float
    confidence: float
    epsilon_lower_bound: float


def one_run_audit(
    included: ArrayLike,
    scores: ArrayLike,
    k_pos: int,
    k_neg: int,
    delta: float,
    confidence: float = 0.95,
) -> OneRunAudit:
    """One-run audit from the canaries' inclusion coins and scores (Steinke, Nasr, Jagielski 2023).

    ``included[i]`` is canary i's coin (True/1: trained on; drawn independently with probability 1/2 by the
    auditor with a secure RNG before training); ``scores[i]`` is the attack score (higher = more likely
    included). Guesses come from :func:`one_run_guesses`; ``r = k_pos + k_neg``, ``v`` = number of correct
    guesses, ``m`` = number of canaries.
    """
    coins = np.asarray(included)
    if coins.ndim != 1 or not np.all((coins == 0) | (coins == 1)):
        raise PrivacyParameterError("included must be a 1-D array of booleans or 0/1 values")
    values = _scores(scores, "scores")
    if coins.size != values.size:
        raise PrivacyParameterError(f"included has {coins.size} entries but scores has {values.size}")
    guesses = one_run_guesses(values, k_pos, k_neg)
    truth = np.where(coins.astype(bool), 1, -1)
    r = int(np.count_nonzero(guesses))
    v = int(np.count_nonzero(guesses == truth))
    m = int(values.size)
    return OneRunAudit(
        m=m,
        r=r,
        v=v,
        delta=_check_audit_delta(delta),
        confidence=confidence,
        epsilon_lower_bound=one_run_epsilon_lower_bound(m, r, v, delta, confidence),
    )
