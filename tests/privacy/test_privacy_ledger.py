"""Tests of the signed epsilon ledger: format, chain, signatures, replay, tamper detection, merge, roster trust.

Ledgers are signed with kit identities (:class:`secagg.keys.Identity`) and verified against the provisioned
roster (:class:`secagg.keys.Roster`); the "mallory" fixture is an attacker's fresh key for node 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from privacy.accounting import DpSgdEvent, epsilon_pld, epsilon_rdp
from privacy.errors import IdentityError, LedgerError, PrivacyParameterError
from privacy.ledger import (
    GENESIS_HASH,
    Ledger,
    LedgerEntry,
    Release,
    TransportProtection,
    key_id_of,
    ledger_node_id,
    merge_node_entries,
    roster_partition,
    verify_ledger,
)
from secagg.keys import Identity, Roster

RunLedger = tuple[Path, dict[str, Path]]
ReleaseFactory = Callable[..., Release]
DELTA = 1e-5  # as in conftest.py
RUN_ID = "run-7"


def read_lines(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return data.split(b"\n")[:-1]


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def resign(entry: LedgerEntry, identity: Identity, **changes: Any) -> LedgerEntry:
    """``entry`` with ``changes``, signed (validly) by ``identity``: what a buggy or hostile signer writes."""
    unsigned = dataclasses.replace(
        entry, **changes, key_id=key_id_of(identity.public), public_key=identity.public.hex(), signature=""
    )
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signed_bytes()).hex())


def rewrite_node(
    lines: list[bytes],
    node_id: str,
    identity: Identity,
    change: Callable[[LedgerEntry], dict[str, Any]],
) -> list[bytes]:
    """Re-sign every entry of ``node_id`` with ``identity`` after ``change``; keeps the hash chain intact."""
    out, prev_hash = [], GENESIS_HASH
    for line in lines:
        entry = LedgerEntry.from_line(line)
        if entry.node_id == node_id:
            entry = resign(entry, identity, prev_hash=prev_hash, **change(entry))
            prev_hash = entry.entry_hash()
        out.append(entry.canonical_bytes())
    return out


def opacus_rdp(history: list[tuple[float, float, int]]) -> float:
    accountant = RDPAccountant()
    accountant.history = history
    return float(accountant.get_epsilon(DELTA))


# -- format -----------------------------------------------------------------------------------------


def test_entries_record_the_release_and_cumulative_epsilon(run_ledger: RunLedger) -> None:
    _, node_paths = run_ledger
    lines = read_lines(node_paths["0"])
    first, second = (json.loads(line) for line in lines)
    assert (
        first["seq"],
        first["round"],
        first["steps"],
        second["seq"],
        second["round"],
        second["steps"],
    ) == (
        0,
        1,
        3,
        1,
        2,
        4,
    )
    assert first["epsilon_rdp"] == pytest.approx(opacus_rdp([(1.0, 0.1, 3)]), rel=1e-12)
    assert second["epsilon_rdp"] == pytest.approx(opacus_rdp([(1.0, 0.1, 3), (1.0, 0.1, 4)]), rel=1e-12)
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=second["pld_value_discretization"])
    pld.compose(dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.0)), 3)
    pld.compose(dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.0)), 4)
    assert second["epsilon_pld"] == pytest.approx(pld.get_epsilon(DELTA), rel=1e-4)
    assert second["epsilon_pld"] < second["epsilon_rdp"]
    assert first["prev_hash"] == "0" * 64
    assert second["prev_hash"] == hashlib.sha256(lines[0]).hexdigest()
    assert first["secure_mode"] is False and "torchcsprng" in first["secure_mode_reason"]
    assert (first["sampling"], first["transport_protection"], first["run_id"], first["delta"]) == (
        "poisson",
        "none",
        RUN_ID,
        DELTA,
    )
    assert first["versions"]["opacus"] == importlib.metadata.version("opacus")
    assert first["versions"]["dp-accounting"] == importlib.metadata.version("dp-accounting")


def test_signature_covers_canonical_json_without_signature(
    run_ledger: RunLedger, identities: dict[str, Identity]
) -> None:
    _, node_paths = run_ledger
    for line in read_lines(node_paths["1"]):
        data = json.loads(line)
        signature = bytes.fromhex(data.pop("signature"))
        message = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        identities["1"].private.public_key().verify(signature, message)  # raises InvalidSignature if wrong
        assert data["public_key"] == identities["1"].public.hex() and data["node_id"] == "1"


def test_reopened_ledger_replays_history(run_ledger: RunLedger, identities: dict[str, Identity]) -> None:
    _, node_paths = run_ledger
    ledger = Ledger(node_paths["1"], identities["1"])
    assert ledger.history() == (DpSgdEvent(1.0, 0.1, 4), DpSgdEvent(1.0, 0.1, 5))
    assert ledger.epsilon() == pytest.approx(opacus_rdp([(1.0, 0.1, 4), (1.0, 0.1, 5)]), rel=1e-12)


def test_append_only_adds_bytes_at_the_end(
    make_release: ReleaseFactory,
    run_ledger: RunLedger,
    identities: dict[str, Identity],
    copy_of: Callable[[Path], Path],
    roster: Roster,
) -> None:
    path = copy_of(run_ledger[1]["0"])
    before = path.read_bytes()
    entry = Ledger(path, identities["0"]).append(make_release("0", 2, steps=5))
    after = path.read_bytes()
    assert after[: len(before)] == before
    assert after[len(before) :] == entry.canonical_bytes() + b"\n"
    assert entry.seq == 2
    assert verify_ledger(path, roster).ok


positive_floats = st.floats(min_value=5e-324, max_value=1e300, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.tuples(positive_floats, positive_floats, positive_floats))
def test_floats_round_trip_exactly_through_the_canonical_form(
    run_ledger: RunLedger, values: tuple[float, float, float]
) -> None:
    base = LedgerEntry.from_line(read_lines(run_ledger[0])[0])
    entry = dataclasses.replace(base, epsilon_rdp=values[0], epsilon_pld=values[1], max_grad_norm=values[2])
    parsed = LedgerEntry.from_line(entry.canonical_bytes())
    for original, restored in zip(values, (parsed.epsilon_rdp, parsed.epsilon_pld, parsed.max_grad_norm), strict=True):
        assert struct.pack("<d", original) == struct.pack("<d", restored)


def test_transport_protection_is_recorded(
    make_release: ReleaseFactory, tmp_path: Path, identities: dict[str, Identity]
) -> None:
    release = dataclasses.replace(make_release("0", 1), transport_protection=TransportProtection.CKKS)
    entry = Ledger(tmp_path / "l.jsonl", identities["0"]).append(release)
    assert json.loads(entry.canonical_bytes())["transport_protection"] == "ckks"


# -- verification: intact ledgers -------------------------------------------------------------------


def test_intact_ledgers_verify(run_ledger: RunLedger, roster: Roster) -> None:
    run_path, node_paths = run_ledger
    report = verify_ledger(run_path, roster)
    assert report.ok and report.first_failure is None and report.lines == 4
    for node, path in node_paths.items():
        last = json.loads(read_lines(path)[-1])
        summary = report.nodes[node]
        assert (summary.entries, summary.last_round, summary.epsilon_rdp, summary.epsilon_pld) == (
            2,
            2,
            last["epsilon_rdp"],
            last["epsilon_pld"],
        )
        assert verify_ledger(path, roster).ok


def test_interleaving_of_different_nodes_is_allowed(
    run_ledger: RunLedger, copy_of: Callable[[Path], Path], roster: Roster
) -> None:
    path = copy_of(run_ledger[0])
    a0, b0, a1, b1 = read_lines(path)
    write_lines(path, [b0, a0, b1, a1])
    assert verify_ledger(path, roster).ok


def test_roster_lists_nodes_without_entries(run_ledger: RunLedger, identities: dict[str, Identity]) -> None:
    roster = Roster.from_identities([identities["0"], identities["1"], Identity.generate(12)])
    report = verify_ledger(run_ledger[0], roster)
    assert report.ok and report.missing_nodes == ("12",)


# -- verification: tampering ------------------------------------------------------------------------


@pytest.mark.slow  # ~2000 verifications, ~8 s
def test_every_single_byte_edit_of_a_small_ledger_is_detected(
    run_ledger: RunLedger, copy_of: Callable[[Path], Path], roster: Roster
) -> None:
    path = copy_of(run_ledger[1]["0"])
    original = path.read_bytes()
    for position in range(len(original)):
        tampered = bytearray(original)
        tampered[position] ^= 0x01  # flips the lowest bit: digits, letters, quotes, hex case stay "plausible"
        path.write_bytes(bytes(tampered))
        assert not verify_ledger(path, roster).ok, f"edit at byte {position} ({chr(original[position])!r}) not detected"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_byte_replacement_in_the_run_ledger_is_detected(
    run_ledger: RunLedger, copy_of: Callable[[Path], Path], roster: Roster, data: st.DataObject
) -> None:
    path = copy_of(run_ledger[0])
    original = path.read_bytes()
    position = data.draw(st.integers(0, len(original) - 1), label="position")
    value = data.draw(st.integers(0, 255).filter(lambda b: b != original[position]), label="new byte")
    tampered = bytearray(original)
    tampered[position] = value
    path.write_bytes(bytes(tampered))
    assert not verify_ledger(path, roster).ok


def test_removed_entry_is_detected(run_ledger: RunLedger, copy_of: Callable[[Path], Path], roster: Roster) -> None:
    path = copy_of(run_ledger[0])
    a0, b0, a1, b1 = read_lines(path)
    write_lines(path, [b0, a1, b1])  # node-a's first entry dropped
    failure = verify_ledger(path, roster).first_failure
    assert failure is not None
    assert (failure.line, failure.node_id) == (2, "0") and "seq 1, expected 0" in failure.reason


def test_reordered_entries_are_detected(run_ledger: RunLedger, copy_of: Callable[[Path], Path], roster: Roster) -> None:
    path = copy_of(run_ledger[0])
    a0, b0, a1, b1 = read_lines(path)
    write_lines(path, [a1, b0, a0, b1])
    failure = verify_ledger(path, roster).first_failure
    assert failure is not None and (failure.line, failure.node_id) == (1, "0")
    assert "seq" in failure.reason


def test_duplicated_entry_is_detected(run_ledger: RunLedger, copy_of: Callable[[Path], Path], roster: Roster) -> None:
    path = copy_of(run_ledger[0])
    a0, b0, a1, b1 = read_lines(path)
    write_lines(path, [a0, b0, a1, b1, b1])
    failure = verify_ledger(path, roster).first_failure
    assert failure is not None and (failure.line, failure.node_id) == (5, "1")


def test_entry_signed_by_another_key_is_detected(
    run_ledger: RunLedger, identities: dict[str, Identity], copy_of: Callable[[Path], Path], roster: Roster
) -> None:
    path = copy_of(run_ledger[0])
    lines = read_lines(path)
    lines[2] = resign(LedgerEntry.from_line(lines[2]), identities["mallory"]).canonical_bytes()  # node 0, seq 1
    write_lines(path, lines)
    failure = verify_ledger(path, roster).first_failure
    assert failure is not None and (failure.line, failure.node_id) == (3, "0")
    assert failure.reason == f"signed by {key_id_of(identities['mallory'].public)}, not by the node's roster key"


def forge_with_more_noise(lines: list[bytes], node_id: str, signer: Identity, factor: float) -> list[bytes]:
    """The attack of the review: node ``node_id``'s chain rewritten with ``factor`` x the noise multiplier and
    epsilons recomputed to match (so the replay agrees), hash chain kept, every entry re-signed by ``signer``."""
    history: list[DpSgdEvent] = []

    def change(entry: LedgerEntry) -> dict[str, Any]:
        history.append(DpSgdEvent(entry.noise_multiplier * factor, entry.sample_rate, entry.steps))
        return {
            "noise_multiplier": history[-1].noise_multiplier,
            "epsilon_rdp": epsilon_rdp(history, entry.delta),
            "epsilon_pld": epsilon_pld(history, entry.delta, entry.pld_value_discretization),
        }

    return rewrite_node(lines, node_id, signer, change)


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")  # sigma = 40: RDP's tightest order is the top
def test_chain_resigned_with_40x_the_noise_by_a_key_outside_the_roster_is_refused(
    run_ledger: RunLedger, identities: dict[str, Identity], copy_of: Callable[[Path], Path], roster: Roster
) -> None:
    path = copy_of(run_ledger[0])
    forged = forge_with_more_noise(read_lines(path), "0", identities["mallory"], 40.0)
    write_lines(path, forged)
    honest = LedgerEntry.from_line(read_lines(run_ledger[0])[2])
    claimed = LedgerEntry.from_line(forged[2])
    assert claimed.noise_multiplier == 40.0 * honest.noise_multiplier
    assert claimed.epsilon_rdp < honest.epsilon_rdp / 10  # the forgery claims far less privacy loss
    # what the forger could pass: a roster of its own choosing (which is why the verifier must get the kit's)
    assert verify_ledger(path, Roster.from_identities([identities["mallory"], identities["1"]])).ok
    report = verify_ledger(path, roster)
    failure = report.first_failure
    assert failure is not None and (failure.line, failure.node_id) == (1, "0")
    assert "not by the node's roster key" in failure.reason
    assert "0" not in report.nodes and report.nodes["1"].verified  # node 1's honest chain still verifies


def test_verification_without_a_roster_is_refused(run_ledger: RunLedger, tmp_path: Path) -> None:
    for missing in (None, {"0": "a key the entries carry themselves"}):
        with pytest.raises(IdentityError, match="needs the provisioned roster"):
            verify_ledger(run_ledger[0], missing)  # type: ignore[arg-type]
        with pytest.raises(IdentityError, match="needs the provisioned roster"):
            merge_node_entries(tmp_path / "run.jsonl", read_lines(run_ledger[0]), missing)  # type: ignore[arg-type]
    assert not (tmp_path / "run.jsonl").exists()


def test_node_missing_from_roster_fails(run_ledger: RunLedger, identities: dict[str, Identity]) -> None:
    failure = verify_ledger(run_ledger[0], Roster.from_identities([identities["1"]])).first_failure
    assert failure is not None and failure.node_id == "0" and failure.reason == "node is not in the key roster"


@pytest.mark.parametrize("alias", ["00", "+0", " 0", "0 ", "node-0", "0x0"])
def test_only_the_canonical_decimal_node_id_names_a_roster_node(
    run_ledger: RunLedger, identities: dict[str, Identity], roster: Roster, tmp_path: Path, alias: str
) -> None:
    # node 0's own key, signing under another spelling of its id: a second chain for node 0 is refused
    entry = LedgerEntry.from_line(read_lines(run_ledger[1]["0"])[0])
    path = tmp_path / "alias.jsonl"
    aliased = resign(entry, identities["0"], node_id=alias)
    write_lines(path, [aliased.canonical_bytes()])
    failure = verify_ledger(path, roster).first_failure
    assert failure is not None and failure.reason == "node is not in the key roster"
    with pytest.raises(LedgerError, match="not in the key roster"):
        merge_node_entries(tmp_path / "run.jsonl", [aliased], roster)


@settings(max_examples=200, deadline=None)
@given(partition_id=st.integers(min_value=0, max_value=2**64 - 2))
def test_partition_id_and_ledger_node_id_map_one_to_one(partition_id: int) -> None:
    node_id = ledger_node_id(partition_id)
    assert node_id == str(partition_id) and roster_partition(node_id) == partition_id
    assert roster_partition("0" + node_id) is None and roster_partition(f"+{node_id}") is None
    assert roster_partition(str(2**64 - 1)) is None  # the server's reserved id names no node


@pytest.mark.parametrize(
    ("field_name", "factor"),
    [("epsilon_rdp", 1.01), ("epsilon_rdp", 0.5), ("epsilon_pld", 0.999), ("epsilon_pld", 2.0)],
)
def test_wrong_epsilon_signed_by_the_node_is_caught_by_replay(
    run_ledger: RunLedger,
    identities: dict[str, Identity],
    copy_of: Callable[[Path], Path],
    roster: Roster,
    field_name: str,
    factor: float,
) -> None:
    path = copy_of(run_ledger[0])
    lines = read_lines(path)

    def change(entry: LedgerEntry) -> dict[str, Any]:
        return {field_name: getattr(entry, field_name) * factor} if entry.seq == 1 else {}

    write_lines(path, rewrite_node(lines, "1", identities["1"], change))
    failure = verify_ledger(path, roster).first_failure
    assert failure is not None and (failure.line, failure.node_id) == (4, "1")
    assert field_name in failure.reason and "replayed" in failure.reason


def test_edited_epsilon_without_resigning_breaks_the_signature(
    run_ledger: RunLedger, copy_of: Callable[[Path], Path], roster: Roster
) -> None:
    path = copy_of(run_ledger[0])
    lines = read_lines(path)
    entry = LedgerEntry.from_line(lines[1])
    lines[1] = dataclasses.replace(entry, epsilon_rdp=entry.epsilon_rdp / 2).canonical_bytes()
    write_lines(path, lines)
    failure = verify_ledger(path, roster).first_failure
    assert failure is not None and (failure.line, failure.reason) == (2, "bad signature")


def test_understated_steps_are_caught_by_replay(
    run_ledger: RunLedger, identities: dict[str, Identity], copy_of: Callable[[Path], Path], roster: Roster
) -> None:
    path = copy_of(run_ledger[0])
    change: Callable[[LedgerEntry], dict[str, Any]] = lambda e: {"steps": 1} if e.seq == 0 else {}  # noqa: E731
    write_lines(path, rewrite_node(read_lines(path), "0", identities["0"], change))
    failure = verify_ledger(path, roster).first_failure
    assert failure is not None and (failure.line, failure.node_id) == (1, "0") and "replayed" in failure.reason


def test_truncated_last_line_is_reported(
    run_ledger: RunLedger, copy_of: Callable[[Path], Path], roster: Roster
) -> None:
    path = copy_of(run_ledger[0])
    path.write_bytes(path.read_bytes()[:-40])
    failure = verify_ledger(path, roster).first_failure
    assert failure is not None and failure.line == 4 and "truncated" in failure.reason


def test_missing_ledger_raises(tmp_path: Path, roster: Roster) -> None:
    with pytest.raises(LedgerError, match="does not exist"):
        verify_ledger(tmp_path / "nope.jsonl", roster)


# -- node ledger file handling ----------------------------------------------------------------------


def test_opening_a_corrupt_or_foreign_ledger_fails(
    run_ledger: RunLedger, identities: dict[str, Identity], copy_of: Callable[[Path], Path]
) -> None:
    path = copy_of(run_ledger[1]["0"])
    with pytest.raises(LedgerError, match="not by this node's key"):
        Ledger(path, identities["1"])
    with pytest.raises(LedgerError, match="not by this node's key"):
        Ledger(path, identities["mallory"])  # the same node id, another key
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(LedgerError, match="truncated"):
        Ledger(path, identities["0"])
    path.write_bytes(data.replace(b'"round":2', b'"round":3'))
    with pytest.raises(LedgerError, match="line 2: bad signature"):
        Ledger(path, identities["0"])
    lines = [LedgerEntry.from_line(line) for line in data.split(b"\n")[:-1]]
    path.write_bytes(resign(lines[0], identities["0"], node_id="1").canonical_bytes() + b"\n")
    with pytest.raises(LedgerError, match="line 1: node_id '1' is not this ledger's node '0'"):
        Ledger(path, identities["0"])


def test_ledger_is_signed_only_by_a_kit_identity(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="secagg.keys.Identity"):
        Ledger(tmp_path / "l.jsonl", Ed25519PrivateKey.generate())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"delta": 1e-6}, "delta"),
        ({"run_id": "other-run"}, "run_id"),
        ({"node_id": "1"}, "node_id"),
        ({"round": 1}, "before the last recorded round"),
    ],
)
def test_append_refuses_inconsistent_releases(
    make_release: ReleaseFactory,
    run_ledger: RunLedger,
    identities: dict[str, Identity],
    copy_of: Callable[[Path], Path],
    change: dict[str, Any],
    needle: str,
) -> None:
    path = copy_of(run_ledger[1]["0"])
    before = path.read_bytes()
    release = dataclasses.replace(make_release("0", 3), **change)
    with pytest.raises(LedgerError, match=needle):
        Ledger(path, identities["0"]).append(release)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"node_id": "node a"}, "node_id"),
        ({"run_id": ""}, "run_id"),
        ({"round": -1}, "round"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"delta": 1.0}, "delta"),
        ({"transport_protection": "tls"}, "transport_protection"),
        ({"sampling": "shuffle"}, "sampling"),
        ({"event": DpSgdEvent(1.0, 0.1, 0)}, "event.steps"),
    ],
)
def test_release_validation(make_release: ReleaseFactory, change: dict[str, Any], needle: str) -> None:
    with pytest.raises(PrivacyParameterError, match=needle):
        dataclasses.replace(make_release("0", 1), **change)


def test_release_is_a_frozen_record(
    make_release: ReleaseFactory,
) -> None:
    release = make_release("0", 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        release.round = 5  # type: ignore[misc]
    assert isinstance(release, Release)


# -- merge ------------------------------------------------------------------------------------------


def test_merge_is_idempotent_and_accepts_line_bytes(
    run_ledger: RunLedger, copy_of: Callable[[Path], Path], roster: Roster
) -> None:
    run_path, node_paths = run_ledger
    path = copy_of(run_path)
    before = path.read_bytes()
    resent = read_lines(node_paths["0"]) + read_lines(node_paths["1"])
    assert merge_node_entries(path, resent, roster) == 0
    assert path.read_bytes() == before


def test_merge_appends_new_entries_and_keeps_chains(
    make_release: ReleaseFactory,
    run_ledger: RunLedger,
    identities: dict[str, Identity],
    copy_of: Callable[[Path], Path],
    roster: Roster,
    tmp_path: Path,
) -> None:
    run_path, node_paths = run_ledger
    path = copy_of(run_path)
    node_copy = tmp_path / "node-1-copy.jsonl"
    node_copy.write_bytes(node_paths["1"].read_bytes())
    entry = Ledger(node_copy, identities["1"]).append(make_release("1", 3, steps=2))
    assert merge_node_entries(path, [entry], roster) == 1
    report = verify_ledger(path, roster)
    assert report.ok and report.nodes["1"].entries == 3 and report.nodes["1"].last_round == 3


def test_merge_rejects_forks_gaps_and_keys_outside_the_roster(
    run_ledger: RunLedger, identities: dict[str, Identity], copy_of: Callable[[Path], Path], roster: Roster
) -> None:
    run_path, node_paths = run_ledger
    path = copy_of(run_path)
    before = path.read_bytes()
    a_entries = [LedgerEntry.from_line(line) for line in read_lines(node_paths["0"])]
    fork = resign(a_entries[1], identities["0"], timestamp="2030-01-01T00:00:00.000000Z")
    with pytest.raises(LedgerError, match="fork"):
        merge_node_entries(path, [fork], roster)
    gap = resign(a_entries[1], identities["0"], seq=3)
    with pytest.raises(LedgerError, match="expected seq 2"):
        merge_node_entries(path, [gap], roster)
    stolen = resign(a_entries[1], identities["mallory"], seq=2, prev_hash=a_entries[1].entry_hash())
    with pytest.raises(LedgerError, match="not by the roster key"):
        merge_node_entries(path, [stolen], roster)
    with pytest.raises(LedgerError, match="bad signature"):
        merge_node_entries(
            path, [dataclasses.replace(a_entries[1], seq=2, prev_hash=a_entries[1].entry_hash())], roster
        )
    assert path.read_bytes() == before
    # a roster without node 0: its new entries are refused, and so is a run ledger already holding its chain
    only_1 = Roster.from_identities([identities["1"]])
    with pytest.raises(LedgerError, match="entry seq 0 of node '0': node is not in the key roster"):
        merge_node_entries(path.with_name("fresh.jsonl"), [a_entries[0]], only_1)
    with pytest.raises(LedgerError, match="line 1: node '0' is signed by .* not its roster key"):
        merge_node_entries(path, [], only_1)
    assert path.read_bytes() == before and not path.with_name("fresh.jsonl").exists()


def test_a_whole_run_ledger_forged_by_a_key_outside_the_roster_is_refused_at_merge(
    run_ledger: RunLedger, identities: dict[str, Identity], roster: Roster, tmp_path: Path
) -> None:
    forged = forge_with_more_noise(read_lines(run_ledger[0]), "0", identities["mallory"], 40.0)
    with pytest.raises(LedgerError, match="entry seq 0 of node '0': signed by .*, not by the roster key"):
        merge_node_entries(tmp_path / "run.jsonl", forged, roster)
    assert not (tmp_path / "run.jsonl").exists()
