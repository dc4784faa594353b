"""Tests of ``fedmpt ledger verify`` / ``fedmpt ledger keygen`` through :func:`fedmpt.cli.main`."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from fedmpt.cli import main
from privacy.ledger import LedgerEntry, NodeIdentity

RunLedger = tuple[Path, dict[str, Path]]


def write_roster(path: Path, keys: dict[str, str]) -> Path:
    path.write_text(json.dumps(keys))
    return path


def test_verify_prints_a_summary_per_node_and_exits_0(
    run_ledger: RunLedger, identities: dict[str, NodeIdentity], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_path, node_paths = run_ledger
    roster = write_roster(tmp_path / "roster.json", {n: identities[n].public_key_hex for n in ("node-a", "node-b")})
    assert main(["ledger", "verify", str(run_path), "--keys", str(roster)]) == 0
    out = capsys.readouterr().out
    for node, path in node_paths.items():
        last = json.loads(path.read_bytes().splitlines()[-1])
        expected = (
            f"node {node}: 2 entries verified, last round 2, epsilon_rdp={last['epsilon_rdp']:.6g} "
            f"epsilon_pld={last['epsilon_pld']:.6g}"
        )
        assert expected in out
    assert "verified:" in out and "no --keys roster" not in out


def test_verify_reports_the_first_bad_entry_and_exits_1(
    run_ledger: RunLedger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = run_ledger[0].read_bytes().split(b"\n")[:-1]
    entry = LedgerEntry.from_line(lines[3])
    lines[3] = entry.canonical_bytes().replace(b'"round":2', b'"round":9')
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_bytes(b"".join(line + b"\n" for line in lines))
    assert main(["ledger", "verify", str(tampered)]) == 1
    captured = capsys.readouterr()
    assert "VERIFICATION FAILED at line 4 (node 'node-b'): bad signature" in captured.err
    assert "no --keys roster" in captured.out


def test_verify_with_a_wrong_roster_exits_1(
    run_ledger: RunLedger, identities: dict[str, NodeIdentity], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    roster = write_roster(
        tmp_path / "roster.json",
        {"node-a": identities["mallory"].public_key_hex, "node-b": identities["node-b"].public_key_hex},
    )
    assert main(["ledger", "verify", str(run_ledger[0]), "--keys", str(roster)]) == 1
    assert "line 1 (node 'node-a')" in capsys.readouterr().err


def test_unusable_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ledger", "verify", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    ledger = tmp_path / "empty.jsonl"
    ledger.write_bytes(b"")
    bad_roster = write_roster(tmp_path / "roster.json", {"node-a": "not-a-key"})
    assert main(["ledger", "verify", str(ledger), "--keys", str(bad_roster)]) == 2
    assert "node-a" in capsys.readouterr().err


def test_keygen_writes_a_0600_key_and_prints_its_public_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_path = tmp_path / "node.pem"
    assert main(["ledger", "keygen", str(key_path)]) == 0
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert NodeIdentity.load(key_path).public_key_hex in capsys.readouterr().out
    assert main(["ledger", "keygen", str(key_path)]) == 2  # never overwrites
