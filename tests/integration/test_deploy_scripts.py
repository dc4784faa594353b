"""Fast checks of the deployment scripts: certificates and keys as Flower loads them, process-tree shutdown."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import signal
import stat
import sys
import time
from pathlib import Path
from types import ModuleType

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key

REPO = Path(__file__).resolve().parents[2]


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_certificates_chain_and_keys_load_as_flower_loads_them(tmp_path: Path) -> None:
    make_certs = _load_script("make_certs")
    out = tmp_path / "certs"
    assert make_certs.main([str(out), "--supernodes", "2", "--san", "localhost", "--san", "10.0.0.5"]) == 0
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "superlink.crt").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    server_key = load_pem_private_key((out / "superlink.key").read_bytes(), None)
    assert server_key.public_key().public_numbers() == server.public_key().public_numbers()  # type: ignore[union-attr]
    for k in range(2):
        private = load_ssh_private_key((out / f"supernode-{k}.key").read_bytes(), None)
        public = load_ssh_public_key((out / f"supernode-{k}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
    for name in ("ca.key", "superlink.key", "supernode-0.key", "supernode-1.key"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    keys = {(out / f"supernode-{k}.pub").read_bytes() for k in range(2)}
    assert len(keys) == 2  # fresh key per SuperNode


def test_make_certs_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_certs = _load_script("make_certs")
    assert make_certs.main([str(tmp_path / "c"), "--supernodes", "-1"]) == 2
    assert "--supernodes must be >= 0, got -1" in capsys.readouterr().err


def test_stop_kills_detached_descendants(tmp_path: Path) -> None:
    """A child that detaches a grandchild into its own session, as Flower does with SuperExec: both die."""
    deploy_local = _load_script("deploy_local")
    deployment = deploy_local.LocalDeployment(tmp_path, num_supernodes=1, app_dir=tmp_path)
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(300)\n"
    )
    proc = deployment._spawn("tree", [sys.executable, "-c", script])
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    assert os.getpgid(grandchild) != os.getpgid(proc.popen.pid)  # out of reach of killpg alone
    deployment.stop()
    assert proc.popen.poll() is not None
    deadline = time.monotonic() + 10
    while psutil.pid_exists(grandchild) and psutil.Process(grandchild).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "detached grandchild survived stop()"
        time.sleep(0.05)
    assert deployment.leftover_pids() == set()


def test_free_port_is_bindable() -> None:
    import socket

    deploy_local = _load_script("deploy_local")
    port = deploy_local.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert 0 < port < 65536


def test_a_second_sigterm_does_not_interrupt_the_cleanup() -> None:
    deploy_local = _load_script("deploy_local")
    before = signal.getsignal(signal.SIGTERM)
    cleaned = False
    with pytest.raises(SystemExit) as exit_info, deploy_local._terminate_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during the cleanup: ignored
            time.sleep(0.05)
            cleaned = True
    assert cleaned and exit_info.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before  # the previous handler is back


def test_a_failed_serverapp_is_reported_from_the_stream() -> None:
    """``flwr run --stream`` exits 0 when the ServerApp raises; the stream's exit-code line is what deploy_local
    reports instead (the line as flwr 1.41 prints it, colour codes included)."""
    deploy_local = _load_script("deploy_local")
    assert deploy_local.serverapp_exit_code("\x1b[91mERROR \x1b[0m:     Exit Code: 201\n") == 201
    assert deploy_local.serverapp_exit_code("ERROR :     Exit Code: 7") == 7
    assert deploy_local.serverapp_exit_code("INFO :      [round 1/2] replied 3/3 | failed: none") == 0
    assert deploy_local.serverapp_exit_code("For more information, visit: .../ref-exit-codes/201.html") == 0
