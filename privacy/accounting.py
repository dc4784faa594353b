"""Privacy accounting for DP-SGD releases: events, epsilon under RDP / PLD / PRV, and noise calibration.

Guarantee accounted for: record-level (example-level) (epsilon, delta)-DP of one client's local data under the
add/remove-one neighbouring relation. Each DP-SGD optimizer step is a Poisson-subsampled Gaussian mechanism:
every record of the client's dataset is included independently with probability ``q`` (the sample rate), the
per-record gradients are clipped to L2 norm ``C`` and Gaussian noise of standard deviation ``sigma * C`` is
added to their sum (``sigma`` is the noise multiplier). Epsilon depends only on ``(sigma, q)`` and the number
of steps, never on ``C``.

A client's privacy loss composes over *every* step of *every* round it has ever trained in, so the history of
events must persist per node across Flower rounds (Flower rebuilds the ClientApp for each message): keep it in
the node's state and in its epsilon ledger (:mod:`privacy.ledger`), never in a per-round object.

Accountants:

* ``rdp``: Renyi DP of the sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019, arXiv 1908.10530) via
  Opacus's analysis at Opacus's default orders, converted to (epsilon, delta) with Balle et al. 2020, Thm 21.
  Deterministic; an upper bound that is loose by ~5-10% in the usual regime.
* ``pld``: privacy loss distributions (Koskela et al. 2020; Doroshenko et al. 2022) via ``dp_accounting``'s
  ``PLDAccountant`` with a Poisson-subsampled Gaussian event, pessimistic discretisation (an upper bound up to
  the discretisation of the loss values, ``value_discretization_interval``). Tighter than RDP.
* ``prv``: Opacus's privacy random variable accountant (Gopi et al. 2021, arXiv 2106.02848); optional, known
  to fail for some settings (Opacus issues #591, #601, #604), so it never backs a budget here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from numbers import Integral, Real

import numpy as np
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from privacy.errors import AccountingError, PrivacyParameterError

logger = logging.getLogger(__name__)

#: RDP orders searched for the RDP -> (epsilon, delta) conversion: Opacus's defaults.
RDP_ORDERS: tuple[float, ...] = tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)

#: Default PLD discretisation of privacy-loss values. At 1e-4 the PLD epsilon of the Opacus golden setting
#: (sigma=1.5, q=0.04, 2250 steps, delta=1e-5) is 6.7688 in ~0.3 s on one CPU core; 1e-3 gives 6.7695.
PLD_VALUE_DISCRETIZATION = 1e-4


class AccountantKind(StrEnum):
    """Accountants that can turn a history of DP-SGD events into epsilon."""

    RDP = "rdp"
    PLD = "pld"
    PRV = "prv"


def validate_delta(delta: float, name: str = "delta") -> float:
    """Return ``delta`` as a float, or raise :class:`PrivacyParameterError` unless ``0 < delta < 1``."""
    if isinstance(delta, bool) or not isinstance(delta, Real) or not math.isfinite(delta):
        raise PrivacyParameterError(f"{name} must be a finite number in (0, 1), got {delta!r}")
    if not 0.0 < float(delta) < 1.0:
        raise PrivacyParameterError(f"{name} must be in (0, 1), got {delta!r}")
    return float(delta)


def validate_epsilon(epsilon: float, name: str = "epsilon") -> float:
    """Return ``epsilon`` as a float, or raise :class:`PrivacyParameterError` unless it is finite and > 0."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, Real) or not math.isfinite(epsilon):
        raise PrivacyParameterError(f"{name} must be a finite number > 0, got {epsilon!r}")
    if not float(epsilon) > 0.0:
        raise PrivacyParameterError(f"{name} must be > 0, got {epsilon!r}")
    return float(epsilon)


def validate_sample_rate(sample_rate: float, name: str = "sample_rate") -> float:
    """Return ``sample_rate`` as a float, or raise :class:`PrivacyParameterError` unless ``0 < q <= 1``."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, Real) or not math.isfinite(sample_rate):
        raise PrivacyParameterError(f"{name} must be a finite number in (0, 1], got {sample_rate!r}")
    if not 0.0 < float(sample_rate) <= 1.0:
        raise PrivacyParameterError(f"{name} must be in (0, 1], got {sample_rate!r}")
    return float(sample_rate)


def validate_noise_multiplier(noise_multiplier: float, name: str = "noise_multiplier") -> float:
    """Return ``noise_multiplier`` as a float; raise :class:`PrivacyParameterError` unless finite and > 0."""
    if (
        isinstance(noise_multiplier, bool)
        or not isinstance(noise_multiplier, Real)
        or not math.isfinite(noise_multiplier)
    ):
        raise PrivacyParameterError(f"{name} must be a finite number > 0, got {noise_multiplier!r}")
    if not float(noise_multiplier) > 0.0:
        raise PrivacyParameterError(f"{name} must be > 0, got {noise_multiplier!r}")
    return float(noise_multiplier)


def validate_steps(steps: int, name: str = "steps", minimum: int = 0) -> int:
    """Return ``steps`` as an int; raise :class:`PrivacyParameterError` unless an integer >= ``minimum``."""
    if isinstance(steps, bool) or not isinstance(steps, Integral):
        raise PrivacyParameterError(f"{name} must be an integer >= {minimum}, got {steps!r}")
    if int(steps) < minimum:
        raise PrivacyParameterError(f"{name} must be >= {minimum}, got {steps!r}")
    return int(steps)


def check_delta(delta: float, n_records: int) -> None:
    """Raise :class:`PrivacyParameterError` unless ``delta < 1 / n_records``.

    With delta >= 1/n a mechanism that publishes one uniformly chosen record in the clear is (0, delta)-DP, so
    such a delta gives no meaningful record-level guarantee for a client holding ``n_records`` records.
    """
    delta = validate_delta(delta)
    n_records = validate_steps(n_records, name="n_records", minimum=1)
    if not delta < 1.0 / n_records:
        raise PrivacyParameterError(
            f"delta={delta!r} must be < 1/n_records = 1/{n_records} = {1.0 / n_records:.3g}; "
            "choose delta well below the inverse of the client's dataset size"
        )


@dataclass(frozen=True)
class DpSgdEvent:
    """One DP-SGD release: ``steps`` Poisson-subsampled Gaussian steps with the same ``(sigma, q)``.

    Attributes:
        noise_multiplier: sigma, the noise standard deviation divided by the clip norm; > 0.
        sample_rate: q, each record's independent inclusion probability per step; in (0, 1].
        steps: number of optimizer steps (Poisson batches, empty ones included); >= 0.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", validate_noise_multiplier(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", validate_sample_rate(self.sample_rate))
        object.__setattr__(self, "steps", validate_steps(self.steps))

    def as_opacus_tuple(self) -> tuple[float, float, int]:
        """The event as an Opacus accountant ``history`` entry: ``(noise_multiplier, sample_rate, steps)``."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


_Groups = tuple[tuple[float, float, int], ...]


def _group(history: Iterable[DpSgdEvent]) -> _Groups:
    """Merge events with identical ``(sigma, q)`` and sort them, dropping zero-step events.

    Composition is commutative and ``k`` steps then ``l`` steps of the same mechanism are ``k + l`` steps, so
    grouping changes no epsilon; it makes the PLD computation cheaper and independent of event order.
    """
    totals: dict[tuple[float, float], int] = {}
    for event in history:
        if not isinstance(event, DpSgdEvent):
            raise PrivacyParameterError(f"history must hold DpSgdEvent objects, got {event!r}")
        if event.steps:
            key = (event.noise_multiplier, event.sample_rate)
            totals[key] = totals.get(key, 0) + event.steps
    return tuple(sorted((sigma, q, steps) for (sigma, q), steps in totals.items()))


@lru_cache(maxsize=4096)
def _rdp_one_step(sigma: float, q: float) -> tuple[float, ...]:
    """RDP of one sampled-Gaussian step at every order of :data:`RDP_ORDERS` (the expensive part; cached)."""
    rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(RDP_ORDERS))
    return tuple(float(x) for x in np.asarray(rdp))


@lru_cache(maxsize=4096)
def _epsilon_rdp_grouped(groups: _Groups, delta: float) -> float:
    if not groups:
        return 0.0
    rdp = np.zeros(len(RDP_ORDERS))
    for sigma, q, steps in groups:
        rdp = rdp + np.asarray(_rdp_one_step(sigma, q)) * steps  # RDP composes additively over steps
    epsilon, _ = opacus_rdp.get_privacy_spent(orders=list(RDP_ORDERS), rdp=list(rdp), delta=delta)
    return float(epsilon)


def _pld_event(sigma: float, q: float) -> dp_event.DpEvent:
    gaussian = dp_event.GaussianDpEvent(noise_multiplier=sigma)
    if q == 1.0:
        return gaussian
    return dp_event.PoissonSampledDpEvent(sampling_probability=q, event=gaussian)


@lru_cache(maxsize=4096)
def _epsilon_pld_grouped(groups: _Groups, delta: float, value_discretization_interval: float) -> float:
    if not groups:
        return 0.0
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=value_discretization_interval)
    for sigma, q, steps in groups:
        accountant.compose(_pld_event(sigma, q), steps)
    return float(accountant.get_epsilon(delta))


def epsilon_rdp(history: Iterable[DpSgdEvent], delta: float) -> float:
    """Cumulative epsilon of ``history`` at ``delta`` under RDP (Opacus analysis, :data:`RDP_ORDERS`).

    RDP of the sampled Gaussian mechanism at order alpha adds up over steps and events; the (epsilon, delta)
    conversion minimises over orders ``rdp(a) + log((a-1)/a) - (log(delta) + log(a)) / (a-1)`` (Balle et al.
    2020, Thm 21). Deterministic for a given history. Returns 0.0 for an empty history.
    """
    return _epsilon_rdp_grouped(_group(history), validate_delta(delta))


def epsilon_pld(
    history: Iterable[DpSgdEvent],
    delta: float,
    value_discretization_interval: float = PLD_VALUE_DISCRETIZATION,
) -> float:
    """Cumulative epsilon of ``history`` at ``delta`` from ``dp_accounting``'s PLD accountant.

    Each event is a ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` (plain Gaussian when q = 1) composed
    ``steps`` times under the add/remove-one relation; pessimistic discretisation makes the result an upper
    bound up to ``value_discretization_interval``. Returns 0.0 for an empty history.
    """
    interval = validate_epsilon(value_discretization_interval, name="value_discretization_interval")
    return _epsilon_pld_grouped(_group(history), validate_delta(delta), interval)


def epsilon_prv(history: Iterable[DpSgdEvent], delta: float, eps_error: float = 0.01) -> float:
    """Cumulative epsilon (upper estimate) of ``history`` at ``delta`` from Opacus's PRV accountant.

    Optional cross-check only: PRV fails for some (sigma, q, steps) and above epsilon ~ 10; such failures
    raise :class:`AccountingError`.
    """
    delta = validate_delta(delta)
    groups = _group(history)
    if not groups:
        return 0.0
    accountant = PRVAccountant()
    accountant.history = [(sigma, q, steps) for sigma, q, steps in groups]
    try:
        return float(accountant.get_epsilon(delta=delta, eps_error=eps_error))
    except (ValueError, RuntimeError, MemoryError, OverflowError) as err:
        raise AccountingError(f"PRV accountant failed for history {groups!r} at delta={delta!r}: {err}") from err


def compute_epsilon(
    history: Iterable[DpSgdEvent], delta: float, accountant: AccountantKind | str = AccountantKind.RDP
) -> float:
    """Cumulative epsilon of ``history`` at ``delta`` with ``accountant`` (``rdp``, ``pld`` or ``prv``)."""
    kind = parse_accountant(accountant)
    if kind is AccountantKind.RDP:
        return epsilon_rdp(history, delta)
    if kind is AccountantKind.PLD:
        return epsilon_pld(history, delta)
    return epsilon_prv(history, delta)


def parse_accountant(accountant: AccountantKind | str) -> AccountantKind:
    """Return the :class:`AccountantKind` named by ``accountant`` or raise :class:`PrivacyParameterError`."""
    try:
        return AccountantKind(accountant)
    except ValueError:
        names = ", ".join(k.value for k in AccountantKind)
        raise PrivacyParameterError(f"accountant must be one of {names}, got {accountant!r}") from None


class PrivacyAccountant:
    """A node's DP-SGD history and the epsilon it has spent.

    Holds the full history (never reset per round). ``state_dict`` / ``from_state_dict`` give a JSON-safe form
    for Flower's per-node ``context.state``; the node's ledger (:mod:`privacy.ledger`) is the durable copy.
    """

    def __init__(self, history: Iterable[DpSgdEvent] = ()) -> None:
        self._history: list[DpSgdEvent] = []
        for event in history:
            self.compose(event)

    @property
    def history(self) -> tuple[DpSgdEvent, ...]:
        """All composed events, oldest first."""
        return tuple(self._history)

    def compose(self, event: DpSgdEvent) -> None:
        """Append ``event`` to the history."""
        if not isinstance(event, DpSgdEvent):
            raise PrivacyParameterError(f"can only compose DpSgdEvent objects, got {event!r}")
        self._history.append(event)

    def get_epsilon(self, delta: float, accountant: AccountantKind | str = AccountantKind.RDP) -> float:
        """Cumulative epsilon at ``delta`` with ``accountant`` (see :func:`compute_epsilon`)."""
        return compute_epsilon(self._history, delta, accountant)

    def state_dict(self) -> list[list[float | int]]:
        """JSON-safe history ``[[noise_multiplier, sample_rate, steps], ...]`` (Opacus's history layout)."""
        return [[e.noise_multiplier, e.sample_rate, e.steps] for e in self._history]

    @classmethod
    def from_state_dict(cls, state: Sequence[Sequence[float | int]]) -> PrivacyAccountant:
        """Rebuild an accountant from :meth:`state_dict` output, validating every event."""
        events = []
        for index, item in enumerate(state):
            if len(item) != 3:
                raise PrivacyParameterError(
                    f"accountant state entry {index} must be [noise_multiplier, sample_rate, steps], got {item!r}"
                )
            sigma, q, steps = item
            events.append(DpSgdEvent(noise_multiplier=sigma, sample_rate=q, steps=int(steps)))
        return cls(events)

    def __len__(self) -> int:
        return len(self._history)


@lru_cache(maxsize=256)  # deterministic; every DP message of a run asks for the same calibration
def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: AccountantKind | str = AccountantKind.RDP,
    epsilon_tolerance: float = 0.01,
    max_noise_multiplier: float = 1e4,
    pld_value_discretization: float = PLD_VALUE_DISCRETIZATION,
) -> float:
    """Smallest-found noise multiplier whose whole-run epsilon is within ``[target - tol, target]``.

    ``total_steps`` must count the whole run for one client, i.e. ``rounds x local_steps`` assuming (worst
    case) the client trains in every round. Epsilon decreases monotonically in sigma, so bisection on sigma
    keeps an upper end ``hi`` with ``epsilon(hi) <= target`` at all times and returns it: the result never
    overshoots the target. Raises :class:`PrivacyParameterError` if even ``max_noise_multiplier`` overshoots.
    Only ``rdp`` and ``pld`` can be calibrated against (PRV is not reliable enough to back a guarantee);
    ``pld_value_discretization`` is passed to :func:`epsilon_pld`.
    """
    target_epsilon = validate_epsilon(target_epsilon, name="target_epsilon")
    delta = validate_delta(delta)
    sample_rate = validate_sample_rate(sample_rate)
    total_steps = validate_steps(total_steps, name="total_steps", minimum=1)
    tolerance = validate_epsilon(epsilon_tolerance, name="epsilon_tolerance")
    kind = parse_accountant(accountant)
    if kind is AccountantKind.PRV:
        raise PrivacyParameterError("calibrate_noise_multiplier accountant must be 'rdp' or 'pld', got 'prv'")

    def epsilon_at(sigma: float) -> float:
        event = DpSgdEvent(sigma, sample_rate, total_steps)
        if kind is AccountantKind.PLD:
            return epsilon_pld([event], delta, pld_value_discretization)
        return epsilon_rdp([event], delta)

    hi = 10.0
    while epsilon_at(hi) > target_epsilon:
        hi *= 2.0
        if hi > max_noise_multiplier:
            raise PrivacyParameterError(
                f"target_epsilon={target_epsilon!r} at delta={delta!r} needs noise_multiplier > "
                f"max_noise_multiplier={max_noise_multiplier!r} for sample_rate={sample_rate!r}, "
                f"total_steps={total_steps}"
            )
    lo = 0.0
    for _ in range(200):
        if epsilon_at(hi) >= target_epsilon - tolerance:
            break
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if epsilon_at(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    else:  # pragma: no cover - 200 halvings exhaust double precision first
        logger.warning("noise calibration did not reach tolerance %s; returning sigma=%s", tolerance, hi)
    return hi
