"""Tests of ``fedmpt ledger verify`` through :func:`fedmpt.cli.main`: the roster comes from a kit, never the entries."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fedmpt.apps.kit import Kit, ensure_run_kit
from fedmpt.cli import main
from fedmpt.rundir import RunDirectory
from privacy.accounting import DpSgdEvent
from privacy.ledger import Ledger, LedgerEntry, Release, merge_node_entries
from secagg.keys import Identity, Roster

RunLedger = tuple[Path, dict[str, Path]]


def write_kit_roster(kit: Path, roster: Roster) -> Path:
    """``<kit>/masking/roster.bin``: what ``fedmpt secagg provision`` / ``roster`` hands the verifier."""
    (kit / "masking").mkdir(parents=True)
    path = kit / "masking" / "roster.bin"
    path.write_bytes(roster.to_bytes())
    return path


def test_verify_prints_a_summary_per_node_and_exits_0(
    run_ledger: RunLedger, roster: Roster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_path, node_paths = run_ledger
    roster_path = write_kit_roster(tmp_path / "kit", roster)
    for option in (["--roster", str(roster_path)], ["--kit", str(tmp_path / "kit")]):
        assert main(["ledger", "verify", str(run_path), *option]) == 0
        out = capsys.readouterr().out
        for node, path in node_paths.items():
            last = json.loads(path.read_bytes().splitlines()[-1])
            expected = (
                f"node {node}: 2 entries verified, last round 2, epsilon_rdp={last['epsilon_rdp']:.6g} "
                f"epsilon_pld={last['epsilon_pld']:.6g}"
            )
            assert expected in out
        assert f"roster: {roster_path}" in out and hashlib.sha256(roster_path.read_bytes()).hexdigest() in out
        assert "verified:" in out and "one process" not in out


def test_verify_without_a_roster_fails_naming_the_option(
    run_ledger: RunLedger, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ledger", "verify", str(run_ledger[0])]) == 2  # not in a run directory: no default kit
    err = capsys.readouterr().err
    assert "no roster to verify" in err and "--roster PATH" in err and "--kit DIR" in err
    assert "verified" not in err


def test_verify_reports_the_first_bad_entry_and_exits_1(
    run_ledger: RunLedger, roster: Roster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = run_ledger[0].read_bytes().split(b"\n")[:-1]
    entry = LedgerEntry.from_line(lines[3])
    lines[3] = entry.canonical_bytes().replace(b'"round":2', b'"round":9')
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_bytes(b"".join(line + b"\n" for line in lines))
    roster_path = write_kit_roster(tmp_path / "kit", roster)
    assert main(["ledger", "verify", str(tampered), "--roster", str(roster_path)]) == 1
    assert "VERIFICATION FAILED at line 4 (node '1'): bad signature" in capsys.readouterr().err


def test_verify_against_a_roster_without_the_signer_exits_1(
    run_ledger: RunLedger, identities: dict[str, Identity], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a roster in which node 0 has the attacker's key: the honest chain of node 0 is refused
    roster_path = write_kit_roster(tmp_path / "kit", Roster.from_identities([identities["mallory"], identities["1"]]))
    assert main(["ledger", "verify", str(run_ledger[0]), "--roster", str(roster_path)]) == 1
    assert "line 1 (node '0'): signed by" in capsys.readouterr().err


def test_unusable_input_exits_2(
    run_ledger: RunLedger, roster: Roster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    roster_path = write_kit_roster(tmp_path / "kit", roster)
    assert main(["ledger", "verify", str(tmp_path / "missing.jsonl"), "--roster", str(roster_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad_roster = tmp_path / "junk.bin"
    bad_roster.write_bytes(b"not a roster")
    assert main(["ledger", "verify", str(run_ledger[0]), "--roster", str(bad_roster)]) == 2
    assert "roster bytes: bad magic" in capsys.readouterr().err
    assert main(["ledger", "verify", str(run_ledger[0]), "--kit", str(tmp_path / "no-kit")]) == 2
    assert f"{tmp_path / 'no-kit' / 'masking' / 'roster.bin'} does not exist" in capsys.readouterr().err


def _kit_run(root: Path, config: dict[str, object], kit_dir: Path | None) -> tuple[Path, Kit]:
    """A run directory whose ledger is signed by a kit: the per-run kit (``kit_dir`` None) or ``kit_dir``."""
    run = RunDirectory.create(config, seed=0, root=root, name="run")
    kit = ensure_run_kit(kit_dir if kit_dir is not None else run.path / "secagg", 2)
    for node in (0, 1):
        release = Release("run", str(node), 1, DpSgdEvent(1.0, 0.1, 3), 1.0, 1e-5)
        entry = Ledger(root / f"node-{node}.jsonl", kit.identity(node)).append(release)
        merge_node_entries(run.path / "epsilon_ledger.jsonl", [entry], kit.roster)
    return run.path, kit


def test_default_roster_is_the_runs_per_run_kit_and_one_process_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, _ = _kit_run(tmp_path, {"dp": True, "secagg-dir": ""}, None)
    assert main(["ledger", "verify", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"roster: {run_dir / 'secagg' / 'masking' / 'roster.bin'} (the run's per-run kit)" in out
    assert "identity keys of nodes 0, 1 are in" in out and "one process held them" in out


def test_default_roster_follows_the_run_configs_secagg_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kit_dir = tmp_path / "provisioned"
    run_dir, _ = _kit_run(tmp_path, {"dp": True, "secagg-dir": str(kit_dir)}, kit_dir)
    assert main(["ledger", "verify", str(run_dir / "epsilon_ledger.jsonl")]) == 0
    out = capsys.readouterr().out
    assert f"roster: {kit_dir / 'masking' / 'roster.bin'} (the kit of the run config's 'secagg-dir')" in out
    assert "one process" not in out  # the run directory holds no private key
    # the run's own kit is the default, so a chain re-signed by a fresh key for node 0 is refused
    forged = Ledger(tmp_path / "forged.jsonl", Identity.generate(0))
    entry = forged.append(Release("run", "0", 1, DpSgdEvent(4.0, 0.1, 3), 1.0, 1e-5))  # 4x the noise
    lines = (run_dir / "epsilon_ledger.jsonl").read_bytes().split(b"\n")[:-1]
    lines[0] = entry.canonical_bytes()
    (run_dir / "epsilon_ledger.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    assert main(["ledger", "verify", str(run_dir)]) == 1
    assert "line 1 (node '0'): signed by" in capsys.readouterr().err
