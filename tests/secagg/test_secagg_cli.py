"""Tests of ``fedmpt secagg provision`` / ``enroll`` / ``roster`` / ``inspect`` through :func:`fedmpt.cli.main`."""

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

from fedmpt.apps.kit import Kit
from fedmpt.cli import main
from secagg import ckks
from secagg.keys import Roster, identity_file_name, load_identity
from secagg.security import default_threshold


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
    # protocol.json: the kit loads, with the kit's default threshold on the complete graph
    kit = Kit.load(out)
    assert kit.roster.to_bytes() == roster.to_bytes()
    assert (kit.params.roster_size, kit.params.threshold, kit.params.neighbours) == (4, default_threshold(4), 0)
    assert str(out / "masking" / "protocol.json") in printed
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
    ckks.aggregate(server, config, uploads, run_id=run, round_number=1, key_id=key_id)  # the key-less server adds
    from fedmpt.apps.kit import Kit

    kit = Kit.load(out)
    signed = {u: ckks.sign_upload(kit.identity(u), m) for u, m in uploads.items()}
    result = ckks.decrypt_verified(
        secret, config, signed, kit.roster, run_id=run, round_number=1, key_id=key_id, threshold=kit.params.threshold
    )
    expected = (updates[0] + updates[1] + updates[2]) / 3
    np.testing.assert_allclose(result.mean, expected, rtol=0, atol=result.error_bound)


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


def test_threshold_and_neighbours_reach_protocol_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kit"
    assert _provision(out, "--nodes", "6", "--threshold", "4", "--neighbours", "2") == 0
    params = Kit.load(out).params
    assert (params.roster_size, params.threshold, params.neighbours, params.neighbourhood_size) == (6, 4, 2, 2)
    assert "threshold t = 4, SecAgg+ degree 2" in capsys.readouterr().out


def test_refuses_when_only_one_planned_file_exists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kit"
    (out / "ckks" / "client").mkdir(parents=True)
    stale = out / "ckks" / "client" / ckks.CLIENT_CONTEXT_FILE
    stale.write_bytes(b"old key")
    assert _provision(out, "--nodes", "2", "--ckks") == 2
    assert str(stale) in capsys.readouterr().err
    assert stale.read_bytes() == b"old key"
    assert not (out / "masking").exists()  # refused before writing anything
    stale.unlink()
    (out / "masking").mkdir()
    (out / "masking" / "protocol.json").write_text("{}")  # a protocol of an earlier kit: also never replaced
    assert _provision(out, "--nodes", "2") == 2
    assert str(out / "masking" / "protocol.json") in capsys.readouterr().err
    assert sorted(p.name for p in (out / "masking").iterdir()) == ["protocol.json"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--nodes", "1"], "--nodes must be an int in [2,"),
        (["--nodes", "3", "--ckks-pack", "2"], "--ckks-pack given without --ckks"),
        (["--nodes", "3", "--ckks", "--ckks-coeff-bits", "60", "60", "60", "60"], "128-bit security bound"),
        (["--nodes", "3", "--ckks", "--ckks-pack", "0"], "CkksConfig.pack must be an int >= 1, got 0"),
        (["--nodes", "3", "--threshold", "1"], "--threshold must be 0 (the default) or an int in [2, 3]"),
        (["--nodes", "3", "--threshold", "4"], "--threshold must be 0 (the default) or an int in [2, 3]"),
        (["--nodes", "5", "--neighbours", "3"], "--neighbours must be 0 (the complete graph) or an even int"),
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


# ----------------------------------------------------------------------------------------------------------
# Enrollment: each site makes its own key, the coordinator assembles the roster from public keys only


def _enroll(out: Path, node: int) -> int:
    return main(["secagg", "enroll", "--out", str(out), "--node", str(node)])


def _roster(out: Path, nodes: dict[int, str], *extra: str) -> int:
    argv = [arg for node, key in nodes.items() for arg in ("--node", f"{node}={key}")]
    return main(["secagg", "roster", "--out", str(out), *argv, *extra])


def _printed_key(printed: str) -> str:
    (line,) = [x for x in printed.splitlines() if x.startswith("public key: ")]
    return line.removeprefix("public key: ")


def test_enroll_writes_a_0600_key_and_prints_its_public_key_never_the_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site-3"
    assert _enroll(site, 3) == 0
    printed = capsys.readouterr().out
    key_file = site / "masking" / identity_file_name(3)
    identity = load_identity(key_file, 3)
    assert _mode(key_file) == 0o600 and _mode(site) == 0o700 and _mode(site / "masking") == 0o700
    assert _printed_key(printed) == identity.public.hex()
    assert f"sha256 fingerprint: {hashlib.sha256(identity.public).hexdigest()}" in printed
    assert identity.private_bytes().hex() not in printed
    before = key_file.read_bytes()
    assert _enroll(site, 3) == 2  # never overwrites
    assert "refusing to overwrite the existing identity key" in capsys.readouterr().err
    assert key_file.read_bytes() == before
    assert _enroll(tmp_path / "other", -1) == 2
    assert "--node must be a partition id" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_enrolled_sites_and_the_assembled_roster_form_a_kit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    public = {}
    for node in range(3):
        assert _enroll(tmp_path / f"site-{node}", node) == 0
        public[node] = _printed_key(capsys.readouterr().out)
    coordinator = tmp_path / "coordinator"
    assert _roster(coordinator, public, "--threshold", "3") == 0
    printed = capsys.readouterr().out
    roster_file = coordinator / "masking" / "roster.bin"
    roster = Roster.from_bytes(roster_file.read_bytes())
    assert {node: roster.to_bytes().count(bytes.fromhex(key)) for node, key in public.items()} == {0: 1, 1: 1, 2: 1}
    assert hashlib.sha256(roster_file.read_bytes()).hexdigest() in printed
    for key in public.values():
        assert hashlib.sha256(bytes.fromhex(key)).hexdigest() in printed
    assert not list(coordinator.rglob("identity_*.key"))  # the coordinator never held a private key
    # each site copies the two public files next to its own key: its kit loads and its identity matches
    for node in range(3):
        site = tmp_path / f"site-{node}"
        for name in ("roster.bin", "protocol.json"):
            (site / "masking" / name).write_bytes((coordinator / "masking" / name).read_bytes())
        kit = Kit.load(site)
        assert kit.identity(node).public.hex() == public[node]
        assert (kit.params.roster_size, kit.params.threshold) == (3, 3)
    assert _roster(coordinator, public) == 2  # an existing roster is never replaced
    assert "refusing to overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("nodes", "extra", "needle"),
    [
        ({0: "KEY0", 2: "KEY1"}, [], "--node ids must be exactly 0..1 (node id = partition-id); missing [1]"),
        ({0: "KEY0", 1: "zz" * 32}, [], "--node 1: the public key must be 64 hex digits"),
        ({0: "KEY0", 1: "ab" * 31}, [], "--node 1: the public key must be 64 hex digits"),
        ({0: "KEY0", 1: "KEY0"}, [], "--node 0 and --node 1 have the same public key"),
        ({0: "KEY0"}, [], "--node must be given for 2 to"),
        ({0: "KEY0", 1: "KEY1"}, ["--threshold", "3"], "--threshold must be 0 (the default) or an int in [2, 2]"),
        ({0: "KEY0", 1: "KEY1"}, ["--neighbours", "1"], "--neighbours must be 0 (the complete graph)"),
    ],
)
def test_roster_rejects_bad_nodes_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nodes: dict[int, str], extra: list[str], needle: str
) -> None:
    keys = {"KEY0": os.urandom(32).hex(), "KEY1": os.urandom(32).hex()}
    out = tmp_path / "coordinator"
    assert _roster(out, {node: keys.get(key, key) for node, key in nodes.items()}, *extra) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_roster_rejects_a_duplicate_or_malformed_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "coordinator"
    key = os.urandom(32).hex()
    other = os.urandom(32).hex()
    argv = ["secagg", "roster", "--out", str(out), "--node", f"0={key}", "--node", f"1={other}", "--node", f"1={key}"]
    assert main(argv) == 2
    assert "--node 1 is given twice" in capsys.readouterr().err
    assert main(["secagg", "roster", "--out", str(out), "--node", key, "--node", f"1={key}"]) == 2
    assert "--node must be K=HEX" in capsys.readouterr().err
    assert not out.exists()
