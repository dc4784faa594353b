"""Tests of the signed epsilon ledger: format, chain, signatures, replay, tamper detection, merge, keys."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from privacy.accounting import DpSgdEvent
from privacy.errors import IdentityError, LedgerError, PrivacyParameterError
from privacy.ledger import (
    GENESIS_HASH,
    Ledger,
    LedgerEntry,
    NodeIdentity,
    Release,
    TransportProtection,
    load_roster,
    merge_node_entries,
    roster_json,
    verify_ledger,
)

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


def resign(entry: LedgerEntry, identity: NodeIdentity, **changes: Any) -> LedgerEntry:
    """``entry`` with ``changes``, signed (validly) by ``identity``: what a buggy or hostile signer writes."""
    unsigned = dataclasses.replace(
        entry, **changes, key_id=identity.key_id, public_key=identity.public_key_hex, signature=""
    )
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signed_bytes()).hex())


def rewrite_node(
    lines: list[bytes],
    node_id: str,
    identity: NodeIdentity,
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
    lines = read_lines(node_paths["node-a"])
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
    run_ledger: RunLedger, identities: dict[str, NodeIdentity]
) -> None:
    _, node_paths = run_ledger
    for line in read_lines(node_paths["node-b"]):
        data = json.loads(line)
        signature = bytes.fromhex(data.pop("signature"))
        message = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        identities["node-b"].public_key.verify(signature, message)  # raises InvalidSignature if wrong
        assert (
            data["public_key"]
            == identities["node-b"]
            .public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            .hex()
        )


def test_reopened_ledger_replays_history(run_ledger: RunLedger, identities: dict[str, NodeIdentity]) -> None:
    _, node_paths = run_ledger
    ledger = Ledger(node_paths["node-b"], identities["node-b"])
    assert ledger.history() == (DpSgdEvent(1.0, 0.1, 4), DpSgdEvent(1.0, 0.1, 5))
    assert ledger.epsilon() == pytest.approx(opacus_rdp([(1.0, 0.1, 4), (1.0, 0.1, 5)]), rel=1e-12)


def test_append_only_adds_bytes_at_the_end(
    make_release: ReleaseFactory,
    run_ledger: RunLedger,
    identities: dict[str, NodeIdentity],
    copy_of: Callable[[Path], Path],
) -> None:
    path = copy_of(run_ledger[1]["node-a"])
    before = path.read_bytes()
    entry = Ledger(path, identities["node-a"]).append(make_release("node-a", 2, steps=5))
    after = path.read_bytes()
    assert after[: len(before)] == before
    assert after[len(before) :] == entry.canonical_bytes() + b"\n"
    assert entry.seq == 2
    assert verify_ledger(path).ok


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
    make_release: ReleaseFactory, tmp_path: Path, identities: dict[str, NodeIdentity]
) -> None:
    release = dataclasses.replace(make_release("node-a", 1), transport_protection=TransportProtection.CKKS)
    entry = Ledger(tmp_path / "l.jsonl", identities["node-a"]).append(release)
    assert json.loads(entry.canonical_bytes())["transport_protection"] == "ckks"


# -- verification: intact ledgers -------------------------------------------------------------------


def test_intact_ledgers_verify(run_ledger: RunLedger, identities: dict[str, NodeIdentity]) -> None:
    run_path, node_paths = run_ledger
    roster = {node: identities[node].public_key for node in ("node-a", "node-b")}
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


def test_interleaving_of_different_nodes_is_allowed(run_ledger: RunLedger, copy_of: Callable[[Path], Path]) -> None:
    path = copy_of(run_ledger[0])
    a0, b0, a1, b1 = read_lines(path)
    write_lines(path, [b0, a0, b1, a1])
    assert verify_ledger(path).ok


def test_roster_lists_nodes_without_entries(run_ledger: RunLedger, identities: dict[str, NodeIdentity]) -> None:
    roster = {node: identity.public_key for node, identity in identities.items()}
    report = verify_ledger(run_ledger[0], roster)
    assert report.ok and report.missing_nodes == ("mallory",)


# -- verification: tampering ------------------------------------------------------------------------


@pytest.mark.slow  # ~2000 verifications, ~8 s
def test_every_single_byte_edit_of_a_small_ledger_is_detected(
    run_ledger: RunLedger, copy_of: Callable[[Path], Path]
) -> None:
    path = copy_of(run_ledger[1]["node-a"])
    original = path.read_bytes()
    for position in range(len(original)):
        tampered = bytearray(original)
        tampered[position] ^= 0x01  # flips the lowest bit: digits, letters, quotes, hex case stay "plausible"
        path.write_bytes(bytes(tampered))
        assert not verify_ledger(path).ok, f"edit at byte {position} ({chr(original[position])!r}) not detected"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_byte_replacement_in_the_run_ledger_is_detected(
    run_ledger: RunLedger, copy_of: Callable[[Path], Path], data: st.DataObject
) -> None:
    path = copy_of(run_ledger[0])
    original = path.read_bytes()
    position = data.draw(st.integers(0, len(original) - 1), label="position")
    value = data.draw(st.integers(0, 255).filter(lambda b: b != original[position]), label="new byte")
    tampered = bytearray(original)
    tampered[position] = value
    path.write_bytes(bytes(tampered))
    assert not verify_ledger(path).ok


def test_removed_entry_is_detected(run_ledger: RunLedger, copy_of: Callable[[Path], Path]) -> None:
    path = copy_of(run_ledger[0])
    a0, b0, a1, b1 = read_lines(path)
    write_lines(path, [b0, a1, b1])  # node-a's first entry dropped
    failure = verify_ledger(path).first_failure
    assert failure is not None
    assert (failure.line, failure.node_id) == (2, "node-a") and "seq 1, expected 0" in failure.reason


def test_reordered_entries_are_detected(run_ledger: RunLedger, copy_of: Callable[[Path], Path]) -> None:
    path = copy_of(run_ledger[0])
    a0, b0, a1, b1 = read_lines(path)
    write_lines(path, [a1, b0, a0, b1])
    failure = verify_ledger(path).first_failure
    assert failure is not None and (failure.line, failure.node_id) == (1, "node-a")
    assert "seq" in failure.reason


def test_duplicated_entry_is_detected(run_ledger: RunLedger, copy_of: Callable[[Path], Path]) -> None:
    path = copy_of(run_ledger[0])
    a0, b0, a1, b1 = read_lines(path)
    write_lines(path, [a0, b0, a1, b1, b1])
    failure = verify_ledger(path).first_failure
    assert failure is not None and (failure.line, failure.node_id) == (5, "node-b")


def test_entry_signed_by_another_key_is_detected(
    run_ledger: RunLedger, identities: dict[str, NodeIdentity], copy_of: Callable[[Path], Path]
) -> None:
    path = copy_of(run_ledger[0])
    lines = read_lines(path)
    lines[2] = resign(LedgerEntry.from_line(lines[2]), identities["mallory"]).canonical_bytes()  # node-a, seq 1
    write_lines(path, lines)
    failure = verify_ledger(path).first_failure
    assert failure is not None and (failure.line, failure.node_id) == (3, "node-a")
    assert "pinned key" in failure.reason


def test_whole_chain_resigned_by_another_key_needs_the_roster(
    run_ledger: RunLedger, identities: dict[str, NodeIdentity], copy_of: Callable[[Path], Path]
) -> None:
    path = copy_of(run_ledger[0])
    write_lines(path, rewrite_node(read_lines(path), "node-a", identities["mallory"], lambda e: {}))
    # self-consistent, so only a roster (trust anchor) can tell: documented limitation without one
    assert verify_ledger(path).ok
    roster = {node: identities[node].public_key for node in ("node-a", "node-b")}
    failure = verify_ledger(path, roster).first_failure
    assert failure is not None and (failure.line, failure.node_id) == (1, "node-a")


def test_node_missing_from_roster_fails(run_ledger: RunLedger, identities: dict[str, NodeIdentity]) -> None:
    failure = verify_ledger(run_ledger[0], {"node-b": identities["node-b"].public_key}).first_failure
    assert failure is not None and failure.node_id == "node-a" and "roster" in failure.reason


@pytest.mark.parametrize(
    ("field_name", "factor"),
    [("epsilon_rdp", 1.01), ("epsilon_rdp", 0.5), ("epsilon_pld", 0.999), ("epsilon_pld", 2.0)],
)
def test_wrong_epsilon_signed_by_the_node_is_caught_by_replay(
    run_ledger: RunLedger,
    identities: dict[str, NodeIdentity],
    copy_of: Callable[[Path], Path],
    field_name: str,
    factor: float,
) -> None:
    path = copy_of(run_ledger[0])
    lines = read_lines(path)

    def change(entry: LedgerEntry) -> dict[str, Any]:
        return {field_name: getattr(entry, field_name) * factor} if entry.seq == 1 else {}

    write_lines(path, rewrite_node(lines, "node-b", identities["node-b"], change))
    failure = verify_ledger(path).first_failure
    assert failure is not None and (failure.line, failure.node_id) == (4, "node-b")
    assert field_name in failure.reason and "replayed" in failure.reason


def test_edited_epsilon_without_resigning_breaks_the_signature(
    run_ledger: RunLedger, copy_of: Callable[[Path], Path]
) -> None:
    path = copy_of(run_ledger[0])
    lines = read_lines(path)
    entry = LedgerEntry.from_line(lines[1])
    lines[1] = dataclasses.replace(entry, epsilon_rdp=entry.epsilon_rdp / 2).canonical_bytes()
    write_lines(path, lines)
    failure = verify_ledger(path).first_failure
    assert failure is not None and (failure.line, failure.reason) == (2, "bad signature")


def test_understated_steps_are_caught_by_replay(
    run_ledger: RunLedger, identities: dict[str, NodeIdentity], copy_of: Callable[[Path], Path]
) -> None:
    path = copy_of(run_ledger[0])
    change: Callable[[LedgerEntry], dict[str, Any]] = lambda e: {"steps": 1} if e.seq == 0 else {}  # noqa: E731
    write_lines(path, rewrite_node(read_lines(path), "node-a", identities["node-a"], change))
    failure = verify_ledger(path).first_failure
    assert failure is not None and (failure.line, failure.node_id) == (1, "node-a") and "replayed" in failure.reason


def test_truncated_last_line_is_reported(run_ledger: RunLedger, copy_of: Callable[[Path], Path]) -> None:
    path = copy_of(run_ledger[0])
    path.write_bytes(path.read_bytes()[:-40])
    failure = verify_ledger(path).first_failure
    assert failure is not None and failure.line == 4 and "truncated" in failure.reason


def test_missing_ledger_raises(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="does not exist"):
        verify_ledger(tmp_path / "nope.jsonl")


# -- node ledger file handling ----------------------------------------------------------------------


def test_opening_a_corrupt_or_foreign_ledger_fails(
    run_ledger: RunLedger, identities: dict[str, NodeIdentity], copy_of: Callable[[Path], Path]
) -> None:
    path = copy_of(run_ledger[1]["node-a"])
    with pytest.raises(LedgerError, match="not by this node's key"):
        Ledger(path, identities["node-b"])
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(LedgerError, match="truncated"):
        Ledger(path, identities["node-a"])
    path.write_bytes(data.replace(b'"round":2', b'"round":3'))
    with pytest.raises(LedgerError, match="line 2: bad signature"):
        Ledger(path, identities["node-a"])


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"delta": 1e-6}, "delta"),
        ({"run_id": "other-run"}, "run_id"),
        ({"node_id": "node-b"}, "node_id"),
        ({"round": 1}, "before the last recorded round"),
    ],
)
def test_append_refuses_inconsistent_releases(
    make_release: ReleaseFactory,
    run_ledger: RunLedger,
    identities: dict[str, NodeIdentity],
    copy_of: Callable[[Path], Path],
    change: dict[str, Any],
    needle: str,
) -> None:
    path = copy_of(run_ledger[1]["node-a"])
    before = path.read_bytes()
    release = dataclasses.replace(make_release("node-a", 3), **change)
    with pytest.raises(LedgerError, match=needle):
        Ledger(path, identities["node-a"]).append(release)
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
        dataclasses.replace(make_release("node-a", 1), **change)


def test_release_is_a_frozen_record(
    make_release: ReleaseFactory,
) -> None:
    release = make_release("node-a", 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        release.round = 5  # type: ignore[misc]
    assert isinstance(release, Release)


# -- merge ------------------------------------------------------------------------------------------


def test_merge_is_idempotent_and_accepts_line_bytes(run_ledger: RunLedger, copy_of: Callable[[Path], Path]) -> None:
    run_path, node_paths = run_ledger
    path = copy_of(run_path)
    before = path.read_bytes()
    resent = read_lines(node_paths["node-a"]) + read_lines(node_paths["node-b"])
    assert merge_node_entries(path, resent) == 0
    assert path.read_bytes() == before


def test_merge_appends_new_entries_and_keeps_chains(
    make_release: ReleaseFactory,
    run_ledger: RunLedger,
    identities: dict[str, NodeIdentity],
    copy_of: Callable[[Path], Path],
    tmp_path: Path,
) -> None:
    run_path, node_paths = run_ledger
    path = copy_of(run_path)
    node_copy = tmp_path / "node-b-copy.jsonl"
    node_copy.write_bytes(node_paths["node-b"].read_bytes())
    entry = Ledger(node_copy, identities["node-b"]).append(make_release("node-b", 3, steps=2))
    assert merge_node_entries(path, [entry]) == 1
    report = verify_ledger(path, {n: identities[n].public_key for n in ("node-a", "node-b")})
    assert report.ok and report.nodes["node-b"].entries == 3 and report.nodes["node-b"].last_round == 3


def test_merge_rejects_forks_gaps_and_foreign_keys(
    run_ledger: RunLedger, identities: dict[str, NodeIdentity], copy_of: Callable[[Path], Path]
) -> None:
    run_path, node_paths = run_ledger
    path = copy_of(run_path)
    before = path.read_bytes()
    a_entries = [LedgerEntry.from_line(line) for line in read_lines(node_paths["node-a"])]
    fork = resign(a_entries[1], identities["node-a"], timestamp="2030-01-01T00:00:00.000000Z")
    with pytest.raises(LedgerError, match="fork"):
        merge_node_entries(path, [fork])
    gap = resign(a_entries[1], identities["node-a"], seq=3)
    with pytest.raises(LedgerError, match="expected seq 2"):
        merge_node_entries(path, [gap])
    stolen = resign(a_entries[1], identities["mallory"], seq=2, prev_hash=a_entries[1].entry_hash())
    with pytest.raises(LedgerError, match="earlier entries"):
        merge_node_entries(path, [stolen])
    with pytest.raises(LedgerError, match="not in the key roster"):
        merge_node_entries(path, [a_entries[0]], {"node-b": identities["node-b"].public_key})
    with pytest.raises(LedgerError, match="bad signature"):
        merge_node_entries(path, [dataclasses.replace(a_entries[1], seq=2, prev_hash=a_entries[1].entry_hash())])
    assert path.read_bytes() == before


# -- identities and rosters -------------------------------------------------------------------------


def test_identity_save_load_round_trip_with_0600(tmp_path: Path) -> None:
    identity = NodeIdentity.generate()
    key_path = tmp_path / "node.pem"
    identity.save(key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    loaded = NodeIdentity.load(key_path)
    assert loaded.public_key_hex == identity.public_key_hex
    message = b"ledger entry"
    identity.public_key.verify(loaded.sign(message), message)
    with pytest.raises(IdentityError, match="refusing to overwrite"):
        NodeIdentity.generate().save(key_path)


def test_identity_with_password(tmp_path: Path) -> None:
    identity = NodeIdentity.generate()
    key_path = tmp_path / "node.pem"
    identity.save(key_path, password=b"correct horse")
    assert NodeIdentity.load(key_path, password=b"correct horse").key_id == identity.key_id
    with pytest.raises(IdentityError, match="not a readable PEM"):
        NodeIdentity.load(key_path, password=b"wrong")


def test_identity_load_refuses_group_readable_file(tmp_path: Path) -> None:
    key_path = tmp_path / "node.pem"
    NodeIdentity.generate().save(key_path)
    os.chmod(key_path, 0o644)
    with pytest.raises(IdentityError, match="644"):
        NodeIdentity.load(key_path)


def test_identity_repr_hides_the_private_key(tmp_path: Path) -> None:
    identity = NodeIdentity.generate()
    key_path = tmp_path / "node.pem"
    identity.save(key_path)
    pem_body = "".join(key_path.read_text().splitlines()[1:-1])
    raw_private = serialization.load_pem_private_key(key_path.read_bytes(), None).private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    text = repr(identity) + str(identity)
    assert pem_body not in text and raw_private.hex() not in text
    assert identity.key_id in repr(identity)


def test_roster_accepts_hex_and_pem(tmp_path: Path, identities: dict[str, NodeIdentity]) -> None:
    pem = (
        identities["node-b"]
        .public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    path = tmp_path / "roster.json"
    path.write_text(json.dumps({"node-a": identities["node-a"].public_key_hex, "node-b": pem}))
    roster = load_roster(path)
    assert {node: key.public_bytes_raw().hex() for node, key in roster.items()} == {
        "node-a": identities["node-a"].public_key_hex,
        "node-b": identities["node-b"].public_key_hex,
    }
    generated = tmp_path / "generated.json"
    generated.write_text(roster_json({"node-a": identities["node-a"]}))
    assert load_roster(generated)["node-a"].public_bytes_raw() == identities["node-a"].public_key.public_bytes_raw()


@pytest.mark.parametrize(
    ("content", "needle"),
    [('{"node-a": "zz"}', "neither 64 hex"), ("[1, 2]", "JSON object"), ("{not json", "readable JSON")],
)
def test_bad_roster_is_rejected(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "roster.json"
    path.write_text(content)
    with pytest.raises(IdentityError, match=needle):
        load_roster(path)
