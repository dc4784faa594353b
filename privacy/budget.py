"""Per-node privacy budgets: refuse a release before it happens, record it before it leaves the node.

Order of operations a client must follow for every round (each step only if the previous one succeeded):

1. **check** - ``budget.check(ledger, release)`` with the release it is about to make (its planned sigma, q
   and number of steps). Raises :class:`~privacy.errors.BudgetExhausted` if the node's cumulative epsilon
   would exceed ``max_epsilon``; the client then does not train and replies without an update.
2. **train** - run exactly the planned DP-SGD steps.
3. **record** - ``budget.charge(ledger, release)``: re-checks and appends the signed entry (fsynced). Epsilon
   is spent when the noisy update is *computed*, so it is charged even if the update is later lost in transit.
4. **send** - only now may the update (and the new ledger entry, for the server's run ledger) leave the node.

If the client crashes between 2 and 3 nothing has left the node, so nothing was released. Never send
before step 3 returns: a crash after sending but before recording would release privacy the ledger misses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from privacy.accounting import (
    AccountantKind,
    DpSgdEvent,
    compute_epsilon,
    parse_accountant,
    validate_delta,
    validate_epsilon,
)
from privacy.errors import BudgetExhausted, PrivacyParameterError
from privacy.ledger import LedgerEntry, Release


class ReleaseRecord(Protocol):
    """What a budget guards: a history to compose onto and an append-only record (a ``Ledger`` or a
    :class:`privacy.site.SiteLedger`, whose history spans every run on the site's dataset)."""

    def history(self) -> tuple[DpSgdEvent, ...]: ...

    def append(self, release: Release) -> LedgerEntry: ...


@dataclass(frozen=True)
class PrivacyBudget:
    """A cap ``max_epsilon`` on a node's cumulative epsilon at ``delta``, enforced with ``accountant``.

    ``accountant`` is ``rdp`` (default; the looser, deterministic bound) or ``pld`` (tighter). Both are upper
    bounds on the true epsilon, so either is a valid guard; the ledger records both.
    """

    max_epsilon: float
    delta: float
    accountant: AccountantKind = AccountantKind.RDP

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_epsilon", validate_epsilon(self.max_epsilon, name="max_epsilon"))
        object.__setattr__(self, "delta", validate_delta(self.delta))
        kind = parse_accountant(self.accountant)
        if kind is AccountantKind.PRV:
            raise PrivacyParameterError("PrivacyBudget accountant must be 'rdp' or 'pld', got 'prv'")
        object.__setattr__(self, "accountant", kind)

    def epsilon_after(self, history: Iterable[DpSgdEvent], next_event: DpSgdEvent) -> float:
        """Cumulative epsilon at ``delta`` of ``history`` followed by ``next_event``."""
        return compute_epsilon([*history, next_event], self.delta, self.accountant)

    def would_exceed(self, history: Iterable[DpSgdEvent], next_event: DpSgdEvent) -> bool:
        """True if composing ``next_event`` onto ``history`` takes epsilon strictly above ``max_epsilon``."""
        return self.epsilon_after(history, next_event) > self.max_epsilon

    def _guard(self, ledger: ReleaseRecord, release: Release) -> None:
        if release.delta != self.delta:
            raise PrivacyParameterError(
                f"release delta={release.delta!r} differs from the budget's delta={self.delta!r}"
            )
        history = ledger.history()
        requested = self.epsilon_after(history, release.event)
        if requested > self.max_epsilon:
            raise BudgetExhausted(
                node_id=release.node_id,
                current_epsilon=compute_epsilon(history, self.delta, self.accountant),
                requested_epsilon=requested,
                max_epsilon=self.max_epsilon,
                accountant=self.accountant.value,
            )

    def check(self, ledger: ReleaseRecord, release: Release) -> None:
        """Step 1: before training, raise :class:`BudgetExhausted` if ``release`` would exceed the budget."""
        self._guard(ledger, release)

    def charge(self, ledger: ReleaseRecord, release: Release) -> LedgerEntry:
        """Step 3: re-check, then append ``release`` to ``ledger`` (signed, fsynced); call before sending.

        Raises :class:`BudgetExhausted` without writing anything if the budget would be exceeded (e.g. the
        ledger grew since :meth:`check`).
        """
        self._guard(ledger, release)
        return ledger.append(release)
