"""Tests of ``fedmpt secagg provision`` / ``fedmpt secagg inspect`` through :func:`fedmpt.cli.main`."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmpt.cli import main
from secagg import ckks
from secagg.keys import Roster, identity_file_name, load_identity


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _provision(out: Path, *extra: str) -> int:
    return main(["secagg", "provision", "--out", str(out), *extra])


def test_masking_kit_roster_matches_identities(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kit"
    assert _provision(out, "--nodes", "4") == 0
    printed = capsys.readouterr().out
    roster_path = out / "masking" / "roster.bin"
    roster = Roster.from_bytes(roster_path.read_bytes())
    assert sorted(roster) == [0, 1, 2, 3]
    for node in range(4):
        key_file = out / "masking" / identity_file_name(node)
        assert _mode(key_file) == 0o600
        identity = load_identity(key_file, node)
        assert roster.to_bytes().count(identity.public) == 1
        # The roster key of this node verifies what the identity file signs, and no other node's key does.
        message = b"provisioning test %d" % node
        roster.verify(node, message, identity.sign(message))
        # Never print a secret.
        assert identity.private_bytes().hex() not in printed
        assert identity.private_bytes().hex() not in (out / "DISTRIBUTION.txt").read_text()
    assert hashlib.sha256(roster_path.read_bytes()).hexdigest() in printed
    assert not (out / "ckks").exists()
    # The kit directories hold secrets: nobody else may list them.
    assert _mode(out) == 0o700
    assert _mode(out / "masking") == 0o700


@settings(max_examples=8, deadline=None)
@given(nodes=st.integers(min_value=2, max_value=12))
def test_roster_lists_exactly_the_provisioned_nodes(nodes: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "kit"
        assert _provision(out, "--nodes", str(nodes)) == 0
        roster = Roster.from_bytes((out / "masking" / "roster.bin").read_bytes())
        key_files = sorted(p.name for p in (out / "masking").glob("identity_*.key"))
        assert sorted(roster) == list(range(nodes))
        assert key_files == sorted(identity_file_name(n) for n in range(nodes))
        publics = {n: load_identity(out / "masking" / identity_file_name(n), n).public for n in range(nodes)}
        assert Roster(publics).to_bytes() == roster.to_bytes()


def test_ckks_kits_secret_only_on_the_client_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kit"
    assert _provision(out, "--nodes", "3", "--ckks") == 0
    printed = capsys.readouterr().out
    client_file = out / "ckks" / "client" / ckks.CLIENT_CONTEXT_FILE
    server_file = out / "ckks" / "server" / ckks.SERVER_CONTEXT_FILE
    assert _mode(client_file) == 0o600
    assert ts.context_from(client_file.read_bytes()).is_private()
    server_raw = ts.context_from(server_file.read_bytes())
    assert not server_raw.is_private()
    assert hashlib.sha256(server_file.read_bytes()).hexdigest() in printed
    client_meta = json.loads((out / "ckks" / "client" / ckks.CONFIG_FILE).read_text())
    server_meta = json.loads((out / "ckks" / "server" / ckks.CONFIG_FILE).read_text())
    assert client_meta == server_meta
    assert client_meta["config"]["max_clients"] == 3  # defaults to --nodes

    # The two kits work together: clients encrypt, the key-less server adds, a client decrypts the mean.
    secret, config, key_id = ckks.load_kit(out / "ckks" / "client")
    server, server_config, server_key_id = ckks.load_kit(out / "ckks" / "server")
    assert (config, key_id) == (server_config, server_key_id)
    rng = np.random.default_rng(7)
    updates = {u: rng.normal(0.0, 0.1, 20) for u in range(3)}
    run = os.urandom(16)
    uploads = {
        u: ckks.encrypt_update(secret, config, x, 1, run_id=run, round_number=1, sender=u, key_id=key_id)
        for u, x in updates.items()
    }
    aggregate = ckks.aggregate(server, config, uploads, run_id=run, round_number=1, key_id=key_id)
    result = ckks.decrypt_aggregate(secret, config, aggregate, run_id=run, round_number=1, key_id=key_id)
    expected = (updates[0] + updates[1] + updates[2]) / 3
    np.testing.assert_allclose(result.mean, expected, atol=1e-6)


def test_ckks_options_reach_the_config(tmp_path: Path) -> None:
    out = tmp_path / "kit"
    argv = ["--nodes", "5", "--ckks", "--ckks-pack", "2", "--ckks-lane-bits", "18", "--ckks-max-clients", "8"]
    assert _provision(out, *argv) == 0
    meta = json.loads((out / "ckks" / "server" / ckks.CONFIG_FILE).read_text())
    assert (meta["config"]["pack"], meta["config"]["lane_bits"], meta["config"]["max_clients"]) == (2, 18, 8)
    assert meta["config"]["coeff_mod_bit_sizes"] == [60, 60]  # the library default, untouched


def test_refuses_to_overwrite_existing_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kit"
    assert _provision(out, "--nodes", "3", "--ckks") == 0
    before = _tree(out)
    capsys.readouterr()
    assert _provision(out, "--nodes", "3", "--ckks") == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err
    assert str(out / "masking" / "roster.bin") in err
    assert _tree(out) == before


def test_refuses_when_only_one_planned_file_exists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kit"
    (out / "ckks" / "client").mkdir(parents=True)
    stale = out / "ckks" / "client" / ckks.CLIENT_CONTEXT_FILE
    stale.write_bytes(b"old key")
    assert _provision(out, "--nodes", "2", "--ckks") == 2
    assert str(stale) in capsys.readouterr().err
    assert stale.read_bytes() == b"old key"
    assert not (out / "masking").exists()  # refused before writing anything


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--nodes", "1"], "--nodes must be an int in [2,"),
        (["--nodes", "3", "--ckks-pack", "2"], "--ckks-pack given without --ckks"),
        (["--nodes", "3", "--ckks", "--ckks-coeff-bits", "60", "60", "60", "60"], "128-bit security bound"),
        (["--nodes", "3", "--ckks", "--ckks-pack", "0"], "CkksConfig.pack must be an int >= 1, got 0"),
    ],
)
def test_bad_arguments_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    out = tmp_path / "kit"
    assert _provision(out, *argv) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_out_must_be_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a_file"
    out.write_text("x")
    assert _provision(out, "--nodes", "2") == 2
    assert f"--out {out} exists and is not a directory" in capsys.readouterr().err


def test_inspect_reports_secret_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kit"
    assert _provision(out, "--nodes", "2", "--ckks") == 0
    capsys.readouterr()
    server_file = out / "ckks" / "server" / ckks.SERVER_CONTEXT_FILE
    client_file = out / "ckks" / "client" / ckks.CLIENT_CONTEXT_FILE

    assert main(["secagg", "inspect", str(server_file)]) == 0
    assert "holds CKKS secret key: no" in capsys.readouterr().out
    assert main(["secagg", "inspect", str(client_file)]) == 0
    assert "holds CKKS secret key: YES" in capsys.readouterr().out

    client_file.chmod(0o644)
    assert main(["secagg", "inspect", str(client_file)]) == 1
    assert "has mode 0644; it must be 0600" in capsys.readouterr().out

    identity_file = out / "masking" / identity_file_name(1)
    assert main(["secagg", "inspect", str(identity_file)]) == 0
    text = capsys.readouterr().out
    assert load_identity(identity_file, 1).public.hex() in text
    assert identity_file.read_bytes().hex() not in text

    roster_file = out / "masking" / "roster.bin"
    assert main(["secagg", "inspect", str(roster_file)]) == 0
    assert "2 identity public keys, node ids 0, 1" in capsys.readouterr().out


def test_inspect_rejects_foreign_and_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a key" * 10)
    assert main(["secagg", "inspect", str(junk)]) == 2
    assert f"{junk} is neither a roster, an identity key nor a TenSEAL context (90 bytes)" in capsys.readouterr().err
    missing = tmp_path / "missing.tenseal"
    assert main(["secagg", "inspect", str(missing)]) == 2
    assert f"cannot read {missing}" in capsys.readouterr().err
