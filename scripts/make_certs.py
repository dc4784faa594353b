#!/usr/bin/env python3
"""Make the certificates and keys of a Flower deployment: a CA, the SuperLink's TLS certificate, SuperNode keys.

Writes into ``OUT_DIR`` (mode 0700; private keys 0600)::

    ca.crt, ca.key                  a self-signed certificate authority (EC P-384, ECDSA-SHA384)
    superlink.crt, superlink.key    the SuperLink's TLS server certificate, signed by the CA, valid for the
                                    names given with --san (default: localhost and 127.0.0.1)
    supernode-<k>.key               SuperNode k's authentication key (EC P-384, OpenSSH private-key format,
                                    what ``flower-supernode --auth-supernode-private-key`` loads)
    supernode-<k>.pub               its public key (OpenSSH format, what ``flwr supernode register`` takes)
    roster.json                     the SuperNodes' public keys with their SHA-256 fingerprints, for the
                                    operator who registers them

Everything is generated locally with ``cryptography`` from the operating system's randomness; nothing is
downloaded. For a real consortium the CA key stays with the coordinator (offline), each site generates its own
SuperNode key pair and sends only the ``.pub`` file (``--supernodes 0`` here plus ``--only-supernode``).

Usage: ``python scripts/make_certs.py OUT_DIR [--supernodes N] [--san DNS_OR_IP ...] [--days D]``
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1()
DEFAULT_SANS = ("localhost", "127.0.0.1")


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write ``data`` to ``path``; private keys are created with mode 0600 (never world-readable)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600 if private else 0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmpt deployment"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA certificate (basicConstraints CA:true, pathlen 0; keyCertSign, cRLSign)."""
    key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.UTC)
    name = _name("fedmpt deployment CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, sans: Sequence[str], days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for ``sans`` (DNS names or IP addresses), signed by the CA."""
    if not sans:
        raise ValueError("the SuperLink certificate needs at least one --san name or address")
    key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(sans[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_general_name(s) for s in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_supernode_key() -> tuple[bytes, bytes, str]:
    """(OpenSSH private key, OpenSSH public key line, SHA256 fingerprint) of a new EC P-384 key pair."""
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(public.split()[1])
    fingerprint = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return private, public + b"\n", fingerprint


def make_all(out_dir: Path, num_supernodes: int, sans: Sequence[str], days: int) -> dict[str, object]:
    """Write CA, SuperLink certificate and ``num_supernodes`` SuperNode key pairs; returns the roster."""
    if num_supernodes < 0:
        raise ValueError(f"--supernodes must be >= 0, got {num_supernodes}")
    if days < 1:
        raise ValueError(f"--days must be >= 1, got {days}")
    out_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(out_dir, 0o700)
    ca_key, ca_cert = make_ca(days)
    _write(out_dir / "ca.key", _key_pem(ca_key), private=True)
    _write(out_dir / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, sans, days)
    _write(out_dir / "superlink.key", _key_pem(server_key), private=True)
    _write(out_dir / "superlink.crt", server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    roster: dict[str, object] = {"ca": "ca.crt", "superlink_sans": list(sans), "supernodes": []}
    nodes: list[dict[str, object]] = []
    for k in range(num_supernodes):
        private, public, fingerprint = make_supernode_key()
        _write(out_dir / f"supernode-{k}.key", private, private=True)
        _write(out_dir / f"supernode-{k}.pub", public, private=False)
        nodes.append({"index": k, "public_key": f"supernode-{k}.pub", "fingerprint": fingerprint})
    roster["supernodes"] = nodes
    _write(out_dir / "roster.json", (json.dumps(roster, indent=2) + "\n").encode(), private=False)
    return roster


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="directory to write into (created, mode 0700)")
    parser.add_argument("--supernodes", type=int, default=3, help="SuperNode key pairs to make (default 3)")
    parser.add_argument(
        "--san", action="append", help="SuperLink DNS name or IP (repeatable; default localhost, 127.0.0.1)"
    )
    parser.add_argument("--days", type=int, default=30, help="certificate validity in days (default 30)")
    args = parser.parse_args(argv)
    try:
        roster = make_all(args.out_dir, args.supernodes, tuple(args.san or DEFAULT_SANS), args.days)
    except (ValueError, OSError) as err:
        print(f"make_certs: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote CA, SuperLink certificate and {len(roster['supernodes'])} SuperNode key pair(s) to {args.out_dir}")  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
