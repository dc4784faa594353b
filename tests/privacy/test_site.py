"""The site ledger across runs (privacy.site): composition, and the faults it must not paper over."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from privacy.accounting import DpSgdEvent, epsilon_rdp
from privacy.errors import LedgerError
from privacy.ledger import Release
from privacy.site import SiteLedger, dataset_fingerprint
from secagg.keys import Identity

FINGERPRINT = dataset_fingerprint(dataset_id="hospital-a/chest-xray-2026")


def _release(site: SiteLedger, run_id: str, round_: int) -> Release:
    return Release(run_id=run_id, node_id=site.node_id, round=round_, event=DpSgdEvent(1.0, 0.1, 3),
                   max_grad_norm=1.0, delta=1e-5, dataset_label=site.label)  # fmt: skip


def test_a_later_run_composes_the_earlier_runs_signed_by_other_keys(tmp_path: Path) -> None:
    first = SiteLedger(tmp_path, FINGERPRINT, "run-a", Identity.generate(0))
    first.append(_release(first, "run-a", 1))
    first.append(_release(first, "run-a", 2))
    second = SiteLedger(tmp_path, FINGERPRINT, "run-b", Identity.generate(0))  # a new kit: a new key
    assert second.label == first.label and second.prior_runs == ["run-a"]
    assert second.run_history() == () and len(second.history()) == 2
    second.append(_release(second, "run-b", 1))
    assert second.epsilon(1e-5) == pytest.approx(epsilon_rdp([DpSgdEvent(1.0, 0.1, 3)] * 3, 1e-5), rel=1e-12)
    other = SiteLedger(tmp_path, dataset_fingerprint(dataset_id="another dataset"), "run-b", Identity.generate(0))
    assert other.history() == () and other.label != first.label  # another dataset starts at zero


@pytest.mark.parametrize("fault", ["flipped-byte", "torn-line", "dropped-first-entry"])
def test_an_earlier_run_that_cannot_be_read_stops_the_site(tmp_path: Path, fault: str) -> None:
    """An unreadable history cannot be undercounted: the site refuses to open its ledger at all."""
    first = SiteLedger(tmp_path, FINGERPRINT, "run-a", Identity.generate(0))
    first.append(_release(first, "run-a", 1))
    first.append(_release(first, "run-a", 2))
    data = first.path.read_bytes()
    if fault == "flipped-byte":
        data = data.replace(b'"steps":3', b'"steps":2', 1)
    elif fault == "torn-line":
        data = data[:-5]
    else:
        data = data[data.index(b"\n") + 1 :]
    first.path.write_bytes(data)
    with pytest.raises(LedgerError, match=r"run-a\.node-0\.jsonl"):
        SiteLedger(tmp_path, FINGERPRINT, "run-b", Identity.generate(0))


def test_a_release_naming_another_dataset_is_refused(tmp_path: Path) -> None:
    site = SiteLedger(tmp_path, FINGERPRINT, "run-a", Identity.generate(0))
    foreign = dataclasses.replace(_release(site, "run-a", 1), dataset_label="ab" * 32)
    with pytest.raises(LedgerError, match="names dataset"):
        site.append(foreign)
    assert not site.path.exists() or site.path.read_bytes() == b""
