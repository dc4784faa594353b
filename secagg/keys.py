"""Key material of masking aggregation: Ed25519 identities, the roster, X25519 round keys, HKDF derivations.

* Identity: every client holds a long-term Ed25519 key (RFC 8032); the roster (node id -> identity public
  key) is provisioned out of band and never comes from the server. Advertised round keys are signed with it,
  so a server that substitutes keys (to man-in-the-middle the key agreement) is caught by every peer.
* Round keys: two fresh X25519 pairs per client and round (RFC 7748): ``c`` for encrypting Shamir shares to
  a peer and ``s`` for the pairwise mask seed, as in Bonawitz et al. 2017 (Fig. 4).
* Derivations: HKDF-SHA256 (RFC 5869) over the X25519 shared secret, with an info string that binds the
  purpose, run id, round and the two node ids, so no two (purpose, run, round, pair, direction) share a key.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmpt.errors import ConfigError
from secagg.errors import MessageRejected, SignatureInvalid

PUBLIC_KEY_BYTES = 32
PRIVATE_KEY_BYTES = 32
SIGNATURE_BYTES = 64
RUN_ID_BYTES = 16
_DOMAIN = b"fedmpt-secagg/v1/"
_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NO_ENC = serialization.NoEncryption()


def public_bytes(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    """Raw 32-byte encoding of an X25519 or Ed25519 public key."""
    return key.public_bytes(_RAW, _RAW_PUB)


def x25519_private_bytes(key: X25519PrivateKey) -> bytes:
    """Raw 32-byte encoding of an X25519 private key (only ever Shamir-shared, never sent whole)."""
    return key.private_bytes(_RAW, _RAW_PRIV, _NO_ENC)


def load_x25519_public(data: bytes, what: str) -> X25519PublicKey:
    """Parse a raw X25519 public key; ``what`` names it in the error."""
    if len(data) != PUBLIC_KEY_BYTES:
        raise MessageRejected(f"{what}: X25519 public key must be {PUBLIC_KEY_BYTES} bytes, got {len(data)}")
    return X25519PublicKey.from_public_bytes(bytes(data))


@dataclass(frozen=True)
class RoundKeyPair:
    """One X25519 key pair used for a single round; ``repr`` never shows the private key."""

    private: X25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls) -> RoundKeyPair:
        """Draw a fresh pair from the OS CSPRNG (via ``cryptography``)."""
        return cls(X25519PrivateKey.generate())

    @property
    def public(self) -> bytes:
        """Raw 32-byte public key."""
        return public_bytes(self.private.public_key())

    def __repr__(self) -> str:
        return f"RoundKeyPair(public={self.public.hex()[:16]}..., private=<hidden>)"


@dataclass(frozen=True)
class Identity:
    """A client's long-term Ed25519 identity key; ``repr`` hides the private key."""

    node_id: int
    private: Ed25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls, node_id: int) -> Identity:
        """Create a new identity for ``node_id`` (provisioning time)."""
        check_node_id(node_id)
        return cls(node_id, Ed25519PrivateKey.generate())

    @property
    def public(self) -> bytes:
        """Raw 32-byte Ed25519 public key, the roster entry of this node."""
        return public_bytes(self.private.public_key())

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature (64 bytes) over ``message``."""
        return self.private.sign(message)

    def private_bytes(self) -> bytes:
        """Raw 32-byte private key, for writing the client's key file at provisioning."""
        return self.private.private_bytes(_RAW, _RAW_PRIV, _NO_ENC)

    @classmethod
    def from_private_bytes(cls, node_id: int, data: bytes) -> Identity:
        """Load an identity from its raw 32-byte private key."""
        check_node_id(node_id)
        if len(data) != PRIVATE_KEY_BYTES:
            raise ConfigError(f"Ed25519 private key for node {node_id} must be 32 bytes, got {len(data)}")
        return cls(node_id, Ed25519PrivateKey.from_private_bytes(bytes(data)))

    def __repr__(self) -> str:
        return f"Identity(node_id={self.node_id}, public={self.public.hex()[:16]}..., private=<hidden>)"


class Roster(Mapping[int, Ed25519PublicKey]):
    """Provisioned map node id -> Ed25519 identity public key; serialized as count || (id u64 || key 32B)*."""

    def __init__(self, keys: Mapping[int, bytes]) -> None:
        self._raw: dict[int, bytes] = {}
        self._keys: dict[int, Ed25519PublicKey] = {}
        for node_id, raw in keys.items():
            check_node_id(node_id)
            if len(raw) != PUBLIC_KEY_BYTES:
                raise ConfigError(f"roster key of node {node_id} must be 32 bytes, got {len(raw)}")
            self._raw[node_id] = bytes(raw)
            self._keys[node_id] = Ed25519PublicKey.from_public_bytes(bytes(raw))

    @classmethod
    def from_identities(cls, identities: Mapping[int, Identity] | list[Identity]) -> Roster:
        """The roster of a set of identities (provisioning and tests)."""
        items = identities.values() if isinstance(identities, Mapping) else identities
        return cls({ident.node_id: ident.public for ident in items})

    def __getitem__(self, node_id: int) -> Ed25519PublicKey:
        return self._keys[node_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, node_id: int, message: bytes, signature: bytes) -> None:
        """Check ``signature`` over ``message`` against the roster key of ``node_id``; raise
        SignatureInvalid."""
        if node_id not in self._keys:
            raise SignatureInvalid(f"node {node_id} is not in the provisioned roster")
        try:
            self._keys[node_id].verify(bytes(signature), bytes(message))
        except InvalidSignature:
            raise SignatureInvalid(
                f"signature of node {node_id} does not verify against its roster identity key (substituted or "
                "forged keys, or signed over another run, round, model or participant list)"
            ) from None

    def to_bytes(self) -> bytes:
        """Versioned byte layout: b'FMRS' || u8 version=1 || u32 count || (u64 node id || 32B key)* sorted
        by id."""
        parts = [b"FMRS", struct.pack("<BI", 1, len(self._raw))]
        parts += [struct.pack("<Q", nid) + self._raw[nid] for nid in sorted(self._raw)]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> Roster:
        """Parse :meth:`to_bytes` output; rejects bad magic, version, duplicates, truncation and trailing
        bytes."""
        if len(data) < 9 or data[:4] != b"FMRS":
            raise ConfigError("roster bytes: bad magic or truncated header")
        version, count = struct.unpack_from("<BI", data, 4)
        if version != 1:
            raise ConfigError(f"roster bytes: unsupported version {version}")
        if len(data) != 9 + count * 40:
            raise ConfigError(f"roster bytes: {count} entries need {9 + count * 40} bytes, got {len(data)}")
        keys: dict[int, bytes] = {}
        for i in range(count):
            (nid,) = struct.unpack_from("<Q", data, 9 + 40 * i)
            if nid in keys:
                raise ConfigError(f"roster bytes: node id {nid} appears twice")
            keys[nid] = data[17 + 40 * i : 49 + 40 * i]
        return cls(keys)


#: Node id reserved for the server in wire headers; no client may use it.
SERVER_ID = 2**64 - 1


def check_node_id(node_id: int) -> None:
    """Client node ids are unsigned 64-bit integers other than :data:`SERVER_ID`."""
    if isinstance(node_id, bool) or not isinstance(node_id, int) or not 0 <= node_id < SERVER_ID:
        raise ConfigError(f"node id must be an int in [0, 2**64 - 1), got {node_id!r}")


def round_context(run_id: bytes, round_number: int) -> bytes:
    """The (run id, round) binding used in every derivation and signature: 16B run id || u64 round."""
    if len(run_id) != RUN_ID_BYTES:
        raise ConfigError(f"run id must be {RUN_ID_BYTES} bytes, got {len(run_id)}")
    return bytes(run_id) + struct.pack("<Q", round_number)


#: Length of a round-setup digest (SHA-256), bound into every advertisement and consistency signature.
SETUP_DIGEST_BYTES = 32


def advertise_transcript(
    run_id: bytes, round_number: int, node_id: int, c_public: bytes, s_public: bytes, setup: bytes
) -> bytes:
    """Bytes an advertised key bundle signs: domain || run id || round || setup digest || node id || c_pk || s_pk.

    ``setup`` is the signer's digest of the round as it saw it (global model, participants, d, t, k, modulus; see
    :func:`secagg.masking.setup_digest`). A peer verifies the bundle against *its own* digest, so two clients that
    were shown different models or participant lists cannot complete key sharing with each other (the
    model-inconsistency attack of Pasquini et al., CCS 2022, is refused at stage 2).
    """
    _check_setup(setup)
    return (
        _DOMAIN
        + b"advertise-keys|"
        + round_context(run_id, round_number)
        + setup
        + struct.pack("<Q", node_id)
        + c_public
        + s_public
    )


def consistency_transcript(run_id: bytes, round_number: int, setup: bytes, survivors: tuple[int, ...]) -> bytes:
    """Bytes a consistency-check signature covers: domain || run id || round || setup digest || u32 n || sorted
    survivor ids."""
    _check_setup(setup)
    ids = sorted(survivors)
    return (
        _DOMAIN
        + b"consistency-check|"
        + round_context(run_id, round_number)
        + setup
        + struct.pack("<I", len(ids))
        + b"".join(struct.pack("<Q", u) for u in ids)
    )


def _check_setup(setup: bytes) -> None:
    if len(setup) != SETUP_DIGEST_BYTES:
        raise ConfigError(f"round setup digest must be {SETUP_DIGEST_BYTES} bytes, got {len(setup)}")


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _agree(private: X25519PrivateKey, peer_public: bytes, what: str) -> bytes:
    shared = private.exchange(load_x25519_public(peer_public, what))
    if shared == bytes(32):
        # A low-order peer point yields the all-zero secret (RFC 7748 section 6.1); refuse it.
        raise MessageRejected(f"{what}: X25519 agreement gave the all-zero secret (low-order public key)")
    return shared


def share_encryption_key(
    private: X25519PrivateKey,
    peer_public: bytes,
    run_id: bytes,
    round_number: int,
    sender: int,
    recipient: int,
) -> bytes:
    """AEAD key for the Shamir shares ``sender`` sends to ``recipient``: HKDF(X25519(c_sk, c_pk'), info).

    The info is ordered (sender, recipient), so the two directions of a pair use different keys and each key
    encrypts exactly one message: a constant nonce is then never reused under one key.
    """
    shared = _agree(private, peer_public, f"c-key of the pair ({sender}, {recipient})")
    return _share_key(shared, run_id, round_number, sender, recipient)


def _share_key(shared: bytes, run_id: bytes, round_number: int, sender: int, recipient: int) -> bytes:
    ctx = round_context(run_id, round_number) + struct.pack("<QQ", sender, recipient)
    return _hkdf(shared, _DOMAIN + b"share-encryption|" + ctx)


def share_encryption_keys(
    private: X25519PrivateKey, peer_public: bytes, run_id: bytes, round_number: int, own: int, peer: int
) -> tuple[bytes, bytes]:
    """(key for own -> peer, key for peer -> own) from one X25519 agreement; each equals
    :func:`share_encryption_key` for its direction."""
    shared = _agree(private, peer_public, f"c-key of the pair ({own}, {peer})")
    return (
        _share_key(shared, run_id, round_number, own, peer),
        _share_key(shared, run_id, round_number, peer, own),
    )


def pairwise_seed(
    private: X25519PrivateKey, peer_public: bytes, run_id: bytes, round_number: int, node_a: int, node_b: int
) -> bytes:
    """Pairwise mask seed s_ab = HKDF(X25519(s_sk_a, s_pk_b), info with the unordered pair); symmetric in a,
    b."""
    low, high = sorted((node_a, node_b))
    shared = _agree(private, peer_public, f"s-key of the pair ({low}, {high})")
    info = _DOMAIN + b"pairwise-seed|" + round_context(run_id, round_number) + struct.pack("<QQ", low, high)
    return _hkdf(shared, info)


def x25519_from_private_bytes(data: bytes) -> X25519PrivateKey:
    """Load a raw X25519 private key (a reconstructed secret)."""
    if len(data) != PRIVATE_KEY_BYTES:
        raise MessageRejected(f"X25519 private key must be 32 bytes, got {len(data)}")
    return X25519PrivateKey.from_private_bytes(bytes(data))


ROSTER_FILE = "roster.bin"


def identity_file_name(node_id: int) -> str:
    """File name of a client's identity key in a provisioning directory."""
    return f"identity_{node_id}.key"


def provision_identities(node_ids: list[int], out_dir: Path) -> Roster:
    """Create one Ed25519 identity per node and write ``roster.bin`` plus ``identity_<id>.key`` (mode 0600).

    The roster goes to every client (and may go to the server); each identity file goes only to its node.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    identities = [Identity.generate(n) for n in node_ids]
    roster = Roster.from_identities(identities)
    if len(roster) != len(node_ids):
        raise ConfigError(f"node ids must be distinct, got {node_ids}")
    for ident in identities:
        fd = os.open(out_dir / identity_file_name(ident.node_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(ident.private_bytes())
    (out_dir / ROSTER_FILE).write_bytes(roster.to_bytes())
    return roster


def load_identity(path: Path, node_id: int) -> Identity:
    """Read a client's identity key written by :func:`provision_identities`."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read identity key {path}: {err}") from err
    return Identity.from_private_bytes(node_id, data)


def load_roster(path: Path) -> Roster:
    """Read a roster written by :func:`provision_identities`."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read roster {path}: {err}") from err
    return Roster.from_bytes(data)
