"""Tests of privacy.budget: refusal before training, recording before sending, exact budget arithmetic."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from privacy.accounting import AccountantKind, DpSgdEvent, epsilon_pld
from privacy.budget import PrivacyBudget
from privacy.errors import BudgetExhausted, PrivacyParameterError
from privacy.ledger import Ledger, Release, verify_ledger
from secagg.keys import Identity, Roster

ReleaseFactory = Callable[..., Release]
DELTA = 1e-5  # as in conftest.py


def opacus_rdp(history: list[tuple[float, float, int]]) -> float:
    accountant = RDPAccountant()
    accountant.history = history
    return float(accountant.get_epsilon(DELTA))


def test_would_exceed_matches_an_independent_accountant() -> None:
    history = [DpSgdEvent(1.0, 0.1, 10)] * 3
    nxt = DpSgdEvent(1.0, 0.1, 10)
    reached = opacus_rdp([(1.0, 0.1, 10)] * 4)
    assert PrivacyBudget(reached * 1.001, DELTA).would_exceed(history, nxt) is False
    assert PrivacyBudget(reached * 0.999, DELTA).would_exceed(history, nxt) is True
    assert PrivacyBudget(reached * 1.001, DELTA).epsilon_after(history, nxt) == pytest.approx(reached, rel=1e-12)


def test_client_loop_stops_exactly_when_the_budget_would_be_exceeded(
    tmp_path: Path, make_release: ReleaseFactory
) -> None:
    """Simulate check -> train -> charge -> send rounds until the node refuses."""
    max_epsilon = 4.5  # 4 rounds of 5 steps reach 4.22, a 5th would reach 4.55
    budget = PrivacyBudget(max_epsilon, DELTA)
    ledger_identity = Identity.generate(0)
    ledger = Ledger(tmp_path / "node.jsonl", ledger_identity)
    sent_rounds = []
    refusal = None
    for round_ in range(1, 30):
        release = make_release("0", round_, steps=5)
        try:
            budget.check(ledger, release)
        except BudgetExhausted as err:
            refusal = err
            break
        budget.charge(ledger, release)  # after "training", before "sending"
        sent_rounds.append(round_)
    # independent count with Opacus: the largest k with epsilon(k rounds of 5 steps) <= max
    affordable = 0
    while opacus_rdp([(1.0, 0.1, 5 * (affordable + 1))]) <= max_epsilon:
        affordable += 1
    assert affordable >= 2 and len(sent_rounds) == affordable
    assert refusal is not None and refusal.node_id == "0" and refusal.accountant == "rdp"
    assert refusal.current_epsilon == pytest.approx(opacus_rdp([(1.0, 0.1, 5 * affordable)]), rel=1e-9)
    assert refusal.requested_epsilon == pytest.approx(opacus_rdp([(1.0, 0.1, 5 * (affordable + 1))]), rel=1e-9)
    assert refusal.max_epsilon == max_epsilon
    assert ledger.epsilon() <= max_epsilon < refusal.requested_epsilon
    assert verify_ledger(ledger.path, Roster.from_identities([ledger_identity])).ok


def test_charge_refuses_without_writing(tmp_path: Path, make_release: ReleaseFactory) -> None:
    identity = Identity.generate(0)
    ledger = Ledger(tmp_path / "node.jsonl", identity)
    ledger.append(make_release("0", 1, steps=20))
    before = ledger.path.read_bytes()
    budget = PrivacyBudget(ledger.epsilon() * 1.0001, DELTA)
    with pytest.raises(BudgetExhausted, match="for node '0'") as info:
        budget.charge(ledger, make_release("0", 2, steps=1))
    assert ledger.path.read_bytes() == before
    assert len(Ledger(ledger.path, identity).entries()) == 1
    assert info.value.current_epsilon == ledger.epsilon()


def test_pld_budget_uses_the_pld_epsilon(tmp_path: Path, make_release: ReleaseFactory) -> None:
    ledger = Ledger(tmp_path / "node.jsonl", Identity.generate(0))
    release = make_release("0", 1, steps=20)
    pld = epsilon_pld([release.event], DELTA)
    rdp = opacus_rdp([(1.0, 0.1, 20)])
    assert pld < rdp
    between = 0.5 * (pld + rdp)
    with pytest.raises(BudgetExhausted):
        PrivacyBudget(between, DELTA).check(ledger, release)
    PrivacyBudget(between, DELTA, AccountantKind.PLD).check(ledger, release)  # within the tighter bound


def test_budget_rejects_mismatched_delta_and_bad_parameters(tmp_path: Path, make_release: ReleaseFactory) -> None:
    ledger = Ledger(tmp_path / "node.jsonl", Identity.generate(0))
    release = dataclasses.replace(make_release("0", 1), delta=1e-6)
    with pytest.raises(PrivacyParameterError, match="differs from the budget's delta"):
        PrivacyBudget(8.0, DELTA).check(ledger, release)
    with pytest.raises(PrivacyParameterError, match="max_epsilon"):
        PrivacyBudget(0.0, DELTA)
    with pytest.raises(PrivacyParameterError, match="delta"):
        PrivacyBudget(1.0, 1.0)
    with pytest.raises(PrivacyParameterError, match="prv"):
        PrivacyBudget(1.0, DELTA, "prv")  # type: ignore[arg-type]
