"""The signed, hash-chained, append-only epsilon ledger (JSON Lines), one chain per node.

Every privacy-relevant release of a node (one round of local DP-SGD whose update leaves the node) becomes one
ledger entry: one line of canonical JSON, terminated by ``\\n``. Entries of one node form a chain:

* ``seq`` counts the node's entries from 0 without gaps;
* ``prev_hash`` is the SHA-256 (hex) of the previous entry's full canonical bytes (signature included,
  newline excluded); the first entry of a chain carries :data:`GENESIS_HASH`;
* ``signature`` is an Ed25519 signature (hex) by the node's key over the canonical bytes of the entry
  *without* the ``signature`` field; ``public_key`` (raw 32 bytes, hex) and ``key_id`` name the signer.

Canonical bytes: ``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
allow_nan=False)`` encoded as UTF-8. Floats are written by Python's ``repr`` (the shortest decimal string
that parses back to the same IEEE-754 double), so every recorded float round-trips exactly; NaN and infinities
are refused. A line is only accepted if it *is* the canonical encoding of what it parses to, and hex fields
must be lower-case, so no byte of a line can change without changing the signed content, the signature, or
failing to parse: any single-byte edit is detected.

Epsilon fields are cumulative for the node (over all its entries, including this one) at the entry's
``delta``; :func:`verify_ledger` recomputes them by replaying the recorded ``(noise_multiplier, sample_rate,
steps)`` history. The server collects the nodes' entries into one run ledger with :func:`merge_node_entries`;
chains of different nodes interleave there and each stays verifiable on its own.

Threat model: signatures stop anyone without a node's private key (the server included) from forging, editing,
dropping (except at the tail), reordering or re-signing that node's entries, *provided the verifier pins the
node's public key* (``trusted_keys``, e.g. a roster distributed out of band). Without a roster only
self-consistency is checked (the first entry's key is pinned for the rest of the chain). A node holding its
own key can truncate or rewrite its own history; the server's copy of the chain detects that after the fact.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.accounting import (
    AccountantKind,
    DpSgdEvent,
    epsilon_pld,
    epsilon_rdp,
    parse_accountant,
    validate_delta,
    validate_epsilon,
    validate_steps,
)
from privacy.errors import IdentityError, LedgerError, PrivacyParameterError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: ``prev_hash`` of the first entry of every chain.
GENESIS_HASH = "0" * 64
#: PLD discretisation used for the ledger's ``epsilon_pld`` unless told otherwise; recorded in each entry.
#: 1e-3 keeps one replay at ~0.05 s per entry (vs ~0.4 s at 1e-4) and moves epsilon by ~1e-4 relative.
LEDGER_PLD_DISCRETIZATION = 1e-3
#: Relative tolerance of :func:`verify_ledger` for RDP epsilons (deterministic: only float summation order).
RDP_REPLAY_RTOL = 1e-9
#: Relative tolerance for PLD epsilons: same library version and discretisation reproduce them to ~1e-15;
#: 1e-6 absorbs FFT rounding differences between machines while still catching any change to the history.
PLD_REPLAY_RTOL = 1e-6
SECURE_MODE_REASON = (
    "Opacus secure_mode needs torchcsprng, which has no installable build for Python 3.11; DP noise comes "
    "from torch's default generator, so the floating-point and PRNG mitigations of secure_mode are absent"
)

_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
_KEY_ID = re.compile(r"ed25519:[0-9a-f]{32}")


class TransportProtection(StrEnum):
    """How the released update is protected on its way to the aggregate (does not change epsilon)."""

    NONE = "none"
    MASKING = "masking"
    CKKS = "ckks"


class Sampling(StrEnum):
    """Batch sampling scheme the accounting assumes; only Poisson sampling is accounted for."""

    POISSON = "poisson"


def _check_identifier(value: object, name: str) -> str:
    if not isinstance(value, str) or _ID_PATTERN.fullmatch(value) is None:
        raise PrivacyParameterError(f"{name} must be 1-128 characters from [A-Za-z0-9._:-], got {value!r}")
    return value


def _check_positive_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise PrivacyParameterError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Release:
    """One privacy-relevant release of a node: the DP-SGD run behind one update that leaves the node.

    Attributes:
        run_id: the federated run the release belongs to (constant over a node's chain).
        node_id: the releasing node.
        round: server round of the release (non-decreasing along the chain).
        event: the DP-SGD steps taken for this release (``steps >= 1``).
        max_grad_norm: clip norm C (recorded for the audit trail; epsilon does not depend on it).
        delta: the delta epsilon is reported at (constant over a node's chain).
        transport_protection: how the update travels (``none``, ``masking``, ``ckks``).
        sampling: batch sampling assumed by the accountant (only ``poisson``).
    """

    run_id: str
    node_id: str
    round: int
    event: DpSgdEvent
    max_grad_norm: float
    delta: float
    transport_protection: TransportProtection = TransportProtection.NONE
    sampling: Sampling = Sampling.POISSON

    def __post_init__(self) -> None:
        _check_identifier(self.run_id, "run_id")
        _check_identifier(self.node_id, "node_id")
        object.__setattr__(self, "round", validate_steps(self.round, name="round"))
        if not isinstance(self.event, DpSgdEvent):
            raise PrivacyParameterError(f"event must be a DpSgdEvent, got {self.event!r}")
        validate_steps(self.event.steps, name="event.steps", minimum=1)
        object.__setattr__(self, "max_grad_norm", _check_positive_float(self.max_grad_norm, "max_grad_norm"))
        object.__setattr__(self, "delta", validate_delta(self.delta))
        try:
            object.__setattr__(self, "transport_protection", TransportProtection(self.transport_protection))
        except ValueError:
            raise PrivacyParameterError(
                f"transport_protection must be one of none, masking, ckks, got {self.transport_protection!r}"
            ) from None
        try:
            object.__setattr__(self, "sampling", Sampling(self.sampling))
        except ValueError:
            raise PrivacyParameterError(f"sampling must be 'poisson', got {self.sampling!r}") from None


# ----------------------------------------------------------------------------------------------------------
# Canonical encoding


def canonical_json_bytes(obj: Mapping[str, Any]) -> bytes:
    """Canonical UTF-8 JSON of ``obj``: sorted keys, no whitespace, floats by ``repr``, no NaN/inf."""
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as err:
        raise LedgerError(f"ledger entry cannot be encoded canonically: {err}") from err
    return text.encode("utf-8")


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in ("opacus", "dp-accounting", "fedmpt"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


@dataclass(frozen=True)
class LedgerEntry:
    """One signed ledger entry; field names follow Opacus's vocabulary. See the module docstring."""

    schema_version: int
    run_id: str
    node_id: str
    seq: int
    round: int
    sample_rate: float
    noise_multiplier: float
    steps: int
    max_grad_norm: float
    delta: float
    epsilon_rdp: float
    epsilon_pld: float
    accountant: str
    pld_value_discretization: float
    sampling: str
    transport_protection: str
    secure_mode: bool
    secure_mode_reason: str
    versions: dict[str, str]
    timestamp: str
    prev_hash: str
    key_id: str
    public_key: str
    signature: str = field(default="")

    def payload(self) -> dict[str, Any]:
        """The entry as a dict without ``signature``: what the signature covers."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "signature"}
        data["versions"] = dict(self.versions)
        return data

    def signed_bytes(self) -> bytes:
        """Canonical bytes of :meth:`payload` (the Ed25519 message)."""
        return canonical_json_bytes(self.payload())

    def canonical_bytes(self) -> bytes:
        """Canonical bytes of the whole entry, signature included (the ledger line without its newline)."""
        data = self.payload()
        data["signature"] = self.signature
        return canonical_json_bytes(data)

    def entry_hash(self) -> str:
        """SHA-256 hex of :meth:`canonical_bytes`: the next entry's ``prev_hash``."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def event(self) -> DpSgdEvent:
        """The DP-SGD event this entry records."""
        return DpSgdEvent(self.noise_multiplier, self.sample_rate, self.steps)

    def verify_signature(self, public_key: Ed25519PublicKey | None = None) -> bool:
        """True if ``signature`` is a valid Ed25519 signature of :meth:`signed_bytes`.

        Uses ``public_key`` if given (a pinned/trusted key), else the key embedded in the entry.
        """
        key = public_key if public_key is not None else public_key_from_hex(self.public_key)
        try:
            key.verify(bytes.fromhex(self.signature), self.signed_bytes())
        except (InvalidSignature, ValueError):
            return False
        return True

    @classmethod
    def from_line(cls, line: bytes) -> LedgerEntry:
        """Parse one ledger line (without its newline), accepting only the exact canonical encoding.

        Raises :class:`LedgerError` naming the problem for invalid UTF-8/JSON, duplicate keys, unknown or
        missing fields, wrong types, non-lower-case hex, or any byte that differs from the canonical form.
        """
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise LedgerError(f"entry is not valid UTF-8: {err}") from err
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_refuse_constant)
        except ValueError as err:
            raise LedgerError(f"entry is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise LedgerError(f"entry must be a JSON object, got {type(data).__name__}")
        entry = cls._from_dict(data)
        if entry.canonical_bytes() != line:
            raise LedgerError("entry is not in canonical form (bytes differ from the canonical re-encoding)")
        return entry

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> LedgerEntry:
        expected = {f.name for f in fields(cls)}
        missing = expected - data.keys()
        unknown = data.keys() - expected
        if missing or unknown:
            raise LedgerError(f"entry fields wrong: missing {sorted(missing)}, unknown {sorted(unknown)}")
        for f in fields(cls):
            _check_type(f.name, data[f.name])
        if data["schema_version"] != SCHEMA_VERSION:
            raise LedgerError(f"unsupported schema_version {data['schema_version']!r} (expected {SCHEMA_VERSION})")
        return cls(**data)


_INT_FIELDS = {"schema_version", "seq", "round", "steps"}
_FLOAT_FIELDS = {
    "sample_rate",
    "noise_multiplier",
    "max_grad_norm",
    "delta",
    "epsilon_rdp",
    "epsilon_pld",
    "pld_value_discretization",
}
_STR_FIELDS = {
    "run_id",
    "node_id",
    "accountant",
    "sampling",
    "transport_protection",
    "secure_mode_reason",
    "timestamp",
    "prev_hash",
    "key_id",
    "public_key",
    "signature",
}


def _check_type(name: str, value: object) -> None:
    if name in _INT_FIELDS:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif name in _FLOAT_FIELDS:
        ok = isinstance(value, float)
    elif name in _STR_FIELDS:
        ok = isinstance(value, str)
    elif name == "secure_mode":
        ok = isinstance(value, bool)
    else:  # versions
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    if not ok:
        raise LedgerError(f"entry field {name!r} has the wrong type: {value!r}")
    patterns = {"prev_hash": _HEX64, "public_key": _HEX64, "signature": _HEX128, "key_id": _KEY_ID}
    if name in patterns and patterns[name].fullmatch(str(value)) is None:
        raise LedgerError(f"entry field {name!r} is not in canonical form: {value!r}")
    if name == "public_key":
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(value)))
        except ValueError:
            raise LedgerError(f"entry field 'public_key' is not a valid Ed25519 public key: {value!r}") from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _refuse_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} is not allowed")


# ----------------------------------------------------------------------------------------------------------
# Keys


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """``"ed25519:"`` + the first 16 bytes (hex) of SHA-256 over the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]


def public_key_to_hex(public_key: Ed25519PublicKey) -> str:
    """Raw 32-byte Ed25519 public key as lower-case hex (the ledger's ``public_key`` field)."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    """Parse a raw Ed25519 public key from 64 hex characters; raises :class:`IdentityError`."""
    try:
        raw = bytes.fromhex(text)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as err:
        raise IdentityError(f"not a raw Ed25519 public key in hex: {text!r}") from err


def load_roster(path: str | os.PathLike[str]) -> dict[str, Ed25519PublicKey]:
    """Load a key roster: a JSON object mapping node id to its public key (64 hex chars, or a PEM string).

    The roster is the verifier's trust anchor; it must come from a channel the server does not control.
    """
    roster_path = Path(path)
    try:
        data = json.loads(roster_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IdentityError(f"key roster {roster_path} does not exist") from None
    except (OSError, ValueError) as err:
        raise IdentityError(f"key roster {roster_path} is not readable JSON: {err}") from err
    if not isinstance(data, dict):
        raise IdentityError(f"key roster {roster_path} must be a JSON object {{node_id: public_key}}")
    roster = {}
    for node_id, text in data.items():
        if not isinstance(text, str):
            raise IdentityError(f"key roster {roster_path}: key of node {node_id!r} must be a string")
        if text.lstrip().startswith("-----BEGIN"):
            try:
                key = serialization.load_pem_public_key(text.encode("ascii"))
            except ValueError as err:
                raise IdentityError(f"key roster {roster_path}: bad PEM key for node {node_id!r}") from err
            if not isinstance(key, Ed25519PublicKey):
                raise IdentityError(f"key roster {roster_path}: key of node {node_id!r} is not Ed25519")
            roster[node_id] = key
        else:
            try:
                roster[node_id] = public_key_from_hex(text)
            except IdentityError:
                raise IdentityError(
                    f"key roster {roster_path}: key of node {node_id!r} is neither 64 hex chars nor PEM"
                ) from None
    return roster


class NodeIdentity:
    """A node's Ed25519 signing key (private key stays in memory and in a 0600 PEM file only).

    Keys come from ``cryptography`` (OS CSPRNG). ``repr`` shows the key id, never key material.
    """

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise IdentityError(f"private_key must be an Ed25519PrivateKey, got {type(private_key).__name__}")
        self._private_key = private_key
        self._public_key = private_key.public_key()

    @classmethod
    def generate(cls) -> NodeIdentity:
        """A fresh key pair from the operating system's CSPRNG."""
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The public key (safe to publish)."""
        return self._public_key

    @property
    def public_key_hex(self) -> str:
        """Raw public key as hex: what goes into a key roster and into each entry's ``public_key``."""
        return public_key_to_hex(self._public_key)

    @property
    def key_id(self) -> str:
        """Short, stable key id (see :func:`key_id_of`)."""
        return key_id_of(self._public_key)

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature of ``message``."""
        return self._private_key.sign(message)

    def save(self, path: str | os.PathLike[str], password: bytes | None = None) -> None:
        """Write the private key as PKCS#8 PEM to a new file with mode 0600; never overwrites.

        ``password`` encrypts the PEM (best available encryption) when given.
        """
        key_path = Path(path)
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        )
        pem = self._private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        try:
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise IdentityError(f"refusing to overwrite existing key file {key_path}") from None
        except OSError as err:
            raise IdentityError(f"cannot create key file {key_path}: {err}") from err
        try:
            os.fchmod(fd, 0o600)
            _write_all(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)

    @classmethod
    def load(cls, path: str | os.PathLike[str], password: bytes | None = None) -> NodeIdentity:
        """Read a PEM private key written by :meth:`save`.

        Refuses (:class:`IdentityError`) a file readable or writable by group/others, as ssh does.
        """
        key_path = Path(path)
        try:
            mode = key_path.stat().st_mode
            pem = key_path.read_bytes()
        except FileNotFoundError:
            raise IdentityError(f"key file {key_path} does not exist") from None
        except OSError as err:
            raise IdentityError(f"cannot read key file {key_path}: {err}") from err
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(
                f"key file {key_path} has mode {stat.S_IMODE(mode):o}; it must not be accessible by group or "
                "others (chmod 600)"
            )
        try:
            key = serialization.load_pem_private_key(pem, password=password)
        except (ValueError, TypeError) as err:
            raise IdentityError(f"key file {key_path} is not a readable PEM private key: {err}") from err
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"key file {key_path} does not hold an Ed25519 key")
        return cls(key)

    def __repr__(self) -> str:
        return f"NodeIdentity(key_id={self.key_id!r})"


# ----------------------------------------------------------------------------------------------------------
# File helpers


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems do not allow fsync on directories
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _read_lines(path: Path) -> tuple[list[bytes], bool]:
    """Lines of ``path`` without newlines, and whether the file ends in a newline (False: torn last line)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LedgerError(f"ledger {path} does not exist") from None
    except OSError as err:
        raise LedgerError(f"cannot read ledger {path}: {err}") from err
    if not data:
        return [], True
    complete = data.endswith(b"\n")
    lines = data.split(b"\n")
    if complete:
        lines.pop()
    return lines, complete


def _append_lines(path: Path, lines: list[bytes], expected_size: int) -> int:
    """Append ``lines`` (each + newline) under an exclusive lock, fsync, and return the new file size.

    Raises :class:`LedgerError` if the file is no longer ``expected_size`` bytes long (another writer).
    """
    created = not path.exists()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as err:
        raise LedgerError(f"cannot open ledger {path} for appending: {err}") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size != expected_size:
            raise LedgerError(
                f"ledger {path} changed on disk ({size} bytes, expected {expected_size}); another writer? "
                "reopen the ledger"
            )
        _write_all(fd, b"".join(line + b"\n" for line in lines))
        os.fsync(fd)
        new_size = os.fstat(fd).st_size
    finally:
        os.close(fd)  # also releases the lock
    if created:
        _fsync_directory(path.parent)
    return new_size


# ----------------------------------------------------------------------------------------------------------
# Node ledger


def _utc_timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Ledger:
    """A node's append-only epsilon ledger file, written and signed with the node's :class:`NodeIdentity`.

    Opening reads the file and checks its chain (signatures with this identity, ``seq``, ``prev_hash``);
    a corrupt or foreign file, or a torn last line, raises :class:`LedgerError` and is never repaired
    automatically. :meth:`append` only ever adds bytes at the end and fsyncs before returning.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        identity: NodeIdentity,
        *,
        pld_value_discretization: float = LEDGER_PLD_DISCRETIZATION,
    ) -> None:
        if not isinstance(identity, NodeIdentity):
            raise IdentityError(f"identity must be a NodeIdentity, got {type(identity).__name__}")
        self._path = Path(path)
        self._identity = identity
        self._pld_interval = validate_epsilon(pld_value_discretization, name="pld_value_discretization")
        self._entries: list[LedgerEntry] = []
        self._size = 0
        if self._path.exists():
            self._load()

    def _load(self) -> None:
        lines, complete = _read_lines(self._path)
        if not complete:
            raise LedgerError(
                f"ledger {self._path}: line {len(lines)} is truncated (no final newline; interrupted write?)"
            )
        prev_hash = GENESIS_HASH
        for number, line in enumerate(lines, start=1):
            try:
                entry = LedgerEntry.from_line(line)
            except LedgerError as err:
                raise LedgerError(f"ledger {self._path}, line {number}: {err}") from None
            problem = None
            if entry.public_key != self._identity.public_key_hex:
                problem = f"signed by {entry.key_id}, not by this node's key {self._identity.key_id}"
            elif not entry.verify_signature(self._identity.public_key):
                problem = "bad signature"
            elif entry.seq != number - 1:
                problem = f"seq {entry.seq}, expected {number - 1}"
            elif entry.prev_hash != prev_hash:
                problem = "prev_hash does not match the previous entry"
            elif self._entries and entry.node_id != self._entries[0].node_id:
                problem = f"node_id {entry.node_id!r} differs from {self._entries[0].node_id!r}"
            if problem:
                raise LedgerError(f"ledger {self._path}, line {number}: {problem}")
            self._entries.append(entry)
            prev_hash = entry.entry_hash()
        self._size = self._path.stat().st_size

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self._path

    def entries(self) -> tuple[LedgerEntry, ...]:
        """All entries, oldest first."""
        return tuple(self._entries)

    def history(self) -> tuple[DpSgdEvent, ...]:
        """The recorded DP-SGD events, oldest first: the input of any accountant replaying this node."""
        return tuple(entry.event() for entry in self._entries)

    def epsilon(self, accountant: AccountantKind | str = AccountantKind.RDP) -> float:
        """Cumulative epsilon recorded by the last entry (0.0 for an empty ledger)."""
        if not self._entries:
            return 0.0
        last = self._entries[-1]
        return last.epsilon_pld if parse_accountant(accountant) is AccountantKind.PLD else last.epsilon_rdp

    def _check_compatible(self, release: Release) -> None:
        if not self._entries:
            return
        last = self._entries[-1]
        for name, recorded, given in (
            ("node_id", last.node_id, release.node_id),
            ("run_id", last.run_id, release.run_id),
            ("delta", last.delta, release.delta),
        ):
            if recorded != given:
                raise LedgerError(f"ledger {self._path} records {name}={recorded!r}; release has {given!r}")
        if release.round < last.round:
            raise LedgerError(
                f"ledger {self._path}: release round {release.round} is before the last recorded round {last.round}"
            )

    def preview_epsilons(self, release: Release) -> tuple[float, float]:
        """(epsilon_rdp, epsilon_pld) the node would reach if ``release`` were appended now."""
        history = [*self.history(), release.event]
        return (
            epsilon_rdp(history, release.delta),
            epsilon_pld(history, release.delta, self._pld_interval),
        )

    def append(self, release: Release) -> LedgerEntry:
        """Record ``release``: compute cumulative epsilons, sign, append one line, fsync; return the entry.

        Call after the update is computed and before it is sent (see :mod:`privacy.budget`).
        """
        if not isinstance(release, Release):
            raise PrivacyParameterError(f"release must be a Release, got {release!r}")
        self._check_compatible(release)
        eps_rdp, eps_pld = self.preview_epsilons(release)
        if not (math.isfinite(eps_rdp) and math.isfinite(eps_pld)):
            raise LedgerError(
                f"release {release!r} gives a non-finite epsilon (rdp={eps_rdp}, pld={eps_pld}); refusing it"
            )
        previous = self._entries[-1] if self._entries else None
        unsigned = LedgerEntry(
            schema_version=SCHEMA_VERSION,
            run_id=release.run_id,
            node_id=release.node_id,
            seq=len(self._entries),
            round=release.round,
            sample_rate=release.event.sample_rate,
            noise_multiplier=release.event.noise_multiplier,
            steps=release.event.steps,
            max_grad_norm=release.max_grad_norm,
            delta=release.delta,
            epsilon_rdp=eps_rdp,
            epsilon_pld=eps_pld,
            accountant=AccountantKind.RDP.value,
            pld_value_discretization=self._pld_interval,
            sampling=release.sampling.value,
            transport_protection=release.transport_protection.value,
            secure_mode=False,
            secure_mode_reason=SECURE_MODE_REASON,
            versions=_library_versions(),
            timestamp=_utc_timestamp(),
            prev_hash=previous.entry_hash() if previous else GENESIS_HASH,
            key_id=self._identity.key_id,
            public_key=self._identity.public_key_hex,
        )
        signature = self._identity.sign(unsigned.signed_bytes()).hex()
        entry = LedgerEntry(**{**unsigned.payload(), "signature": signature})
        self._size = _append_lines(self._path, [entry.canonical_bytes()], self._size)
        self._entries.append(entry)
        logger.info(
            "ledger %s: node %s round %d seq %d epsilon_rdp=%.4f epsilon_pld=%.4f (delta=%g)",
            self._path,
            entry.node_id,
            entry.round,
            entry.seq,
            eps_rdp,
            eps_pld,
            entry.delta,
        )
        return entry


# ----------------------------------------------------------------------------------------------------------
# Run ledger (server side)


@dataclass
class _ChainTip:
    public_key: str
    hashes: list[str]  # entry hash by seq


def _parse_entry(entry: LedgerEntry | bytes | str) -> LedgerEntry:
    if isinstance(entry, LedgerEntry):
        return LedgerEntry.from_line(entry.canonical_bytes())
    if isinstance(entry, str):
        entry = entry.encode("utf-8")
    if isinstance(entry, bytes):
        return LedgerEntry.from_line(entry.rstrip(b"\n"))
    raise LedgerError(f"ledger entries must be LedgerEntry, bytes or str, got {type(entry).__name__}")


def merge_node_entries(
    run_ledger_path: str | os.PathLike[str],
    entries: Iterable[LedgerEntry | bytes | str],
    trusted_keys: Mapping[str, Ed25519PublicKey] | None = None,
) -> int:
    """Append nodes' signed entries to the run ledger (e.g. ``<run_dir>/epsilon_ledger.jsonl``).

    Entries arrive as :class:`LedgerEntry` objects or as their canonical line bytes (never pickled). Each one
    must carry a valid signature (by the roster key when ``trusted_keys`` is given, else by the key pinned at
    the node's first entry) and extend its node's chain: ``seq`` = last + 1 with a matching ``prev_hash``.
    Entries already present byte-for-byte are skipped, so a node may resend its whole ledger each round. A
    conflicting entry for an existing ``seq`` (a fork) or a gap raises :class:`LedgerError` and nothing is
    written. Epsilon values are not replayed here (that is :func:`verify_ledger`'s job). Returns the number
    of entries appended.
    """
    path = Path(run_ledger_path)
    tips: dict[str, _ChainTip] = {}
    size = 0
    if path.exists():
        lines, complete = _read_lines(path)
        if not complete:
            raise LedgerError(f"run ledger {path}: line {len(lines)} is truncated (no final newline)")
        for number, line in enumerate(lines, start=1):
            try:
                existing = LedgerEntry.from_line(line)
            except LedgerError as err:
                raise LedgerError(f"run ledger {path}, line {number}: {err}") from None
            existing_tip = tips.setdefault(existing.node_id, _ChainTip(existing.public_key, []))
            existing_tip.hashes.append(existing.entry_hash())
        size = path.stat().st_size

    new_lines: list[bytes] = []
    for raw in entries:
        entry = _parse_entry(raw)
        where = f"entry seq {entry.seq} of node {entry.node_id!r}"
        pinned = trusted_keys.get(entry.node_id) if trusted_keys is not None else None
        if trusted_keys is not None and pinned is None:
            raise LedgerError(f"{where}: node is not in the key roster")
        tip = tips.get(entry.node_id)
        if pinned is not None and entry.public_key != public_key_to_hex(pinned):
            raise LedgerError(f"{where}: signed by {entry.key_id}, not by the roster key")
        if tip is not None and entry.public_key != tip.public_key:
            raise LedgerError(f"{where}: signed by {entry.key_id}, not by the key of the node's earlier entries")
        if entry.key_id != key_id_of(public_key_from_hex(entry.public_key)):
            raise LedgerError(f"{where}: key_id does not match public_key")
        if not entry.verify_signature():
            raise LedgerError(f"{where}: bad signature")
        known = len(tip.hashes) if tip else 0
        if tip is not None and entry.seq < known:
            if tip.hashes[entry.seq] != entry.entry_hash():
                raise LedgerError(f"{where}: conflicts with the entry already recorded at that seq (fork)")
            continue
        if entry.seq != known:
            raise LedgerError(f"{where}: expected seq {known} next (entries missing in between)")
        expected_prev = tip.hashes[-1] if tip and tip.hashes else GENESIS_HASH
        if entry.prev_hash != expected_prev:
            raise LedgerError(f"{where}: prev_hash does not match the node's previous entry")
        if tip is None:
            tip = _ChainTip(entry.public_key, [])
            tips[entry.node_id] = tip
        tip.hashes.append(entry.entry_hash())
        new_lines.append(entry.canonical_bytes())
    if new_lines:
        _append_lines(path, new_lines, size)
    return len(new_lines)


# ----------------------------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True)
class VerificationFailure:
    """The first problem found in one node's chain (``node_id`` None when the line could not be parsed)."""

    line: int
    node_id: str | None
    reason: str

    def __str__(self) -> str:
        node = f"node {self.node_id!r}" if self.node_id is not None else "unknown node"
        return f"line {self.line} ({node}): {self.reason}"


@dataclass(frozen=True)
class NodeSummary:
    """What a verified (or partly verified) chain of one node says."""

    node_id: str
    entries: int
    last_round: int
    epsilon_rdp: float
    epsilon_pld: float
    delta: float
    key_id: str
    verified: bool


@dataclass(frozen=True)
class VerificationReport:
    """Result of :func:`verify_ledger`: per-node summaries and failures ordered by line."""

    path: Path
    lines: int
    nodes: dict[str, NodeSummary]
    failures: tuple[VerificationFailure, ...]
    missing_nodes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every line parsed and every chain verified."""
        return not self.failures

    @property
    def first_failure(self) -> VerificationFailure | None:
        """The failure with the smallest line number, if any."""
        return self.failures[0] if self.failures else None


@dataclass
class _NodeState:
    public_key: str
    entries: list[LedgerEntry] = field(default_factory=list)
    prev_hash: str = GENESIS_HASH
    broken: bool = False


def _relative_error(recorded: float, recomputed: float) -> float:
    scale = max(abs(recorded), abs(recomputed), 1e-300)
    return abs(recorded - recomputed) / scale


def _check_entry(entry: LedgerEntry, state: _NodeState, rdp_rtol: float, pld_rtol: float) -> str | None:
    """Reason why ``entry`` does not extend ``state``'s chain, or None if it does."""
    if entry.public_key != state.public_key:
        return f"signed by {entry.key_id}, not by the node's pinned key"
    if entry.key_id != key_id_of(public_key_from_hex(entry.public_key)):
        return "key_id does not match public_key"
    if not entry.verify_signature():
        return "bad signature"
    expected_seq = len(state.entries)
    if entry.seq != expected_seq:
        return f"seq {entry.seq}, expected {expected_seq} (entry missing, duplicated or reordered)"
    if entry.prev_hash != state.prev_hash:
        return "prev_hash does not match the previous entry of this node"
    if state.entries:
        first, last = state.entries[0], state.entries[-1]
        if entry.round < last.round:
            return f"round {entry.round} is before the previous entry's round {last.round}"
        for name in ("run_id", "delta", "pld_value_discretization"):
            if getattr(entry, name) != getattr(first, name):
                return f"{name} changed from {getattr(first, name)!r} to {getattr(entry, name)!r}"
    if entry.sampling != Sampling.POISSON.value:
        return f"sampling {entry.sampling!r} is not accounted for (only 'poisson')"
    if entry.transport_protection not in {t.value for t in TransportProtection}:
        return f"unknown transport_protection {entry.transport_protection!r}"
    try:
        history = [*(e.event() for e in state.entries), entry.event()]
        validate_delta(entry.delta)
        validate_steps(entry.steps, minimum=1)
        recomputed_rdp = epsilon_rdp(history, entry.delta)
        recomputed_pld = epsilon_pld(history, entry.delta, entry.pld_value_discretization)
    except PrivacyParameterError as err:
        return f"invalid privacy parameters: {err}"
    if _relative_error(entry.epsilon_rdp, recomputed_rdp) > rdp_rtol:
        return f"epsilon_rdp {entry.epsilon_rdp!r} != replayed {recomputed_rdp!r}"
    if _relative_error(entry.epsilon_pld, recomputed_pld) > pld_rtol:
        return f"epsilon_pld {entry.epsilon_pld!r} != replayed {recomputed_pld!r}"
    return None


def verify_ledger(
    path: str | os.PathLike[str],
    trusted_keys: Mapping[str, Ed25519PublicKey] | None = None,
    *,
    rdp_rtol: float = RDP_REPLAY_RTOL,
    pld_rtol: float = PLD_REPLAY_RTOL,
) -> VerificationReport:
    """Verify a node ledger or a merged run ledger, node by node, and replay every epsilon.

    Per node, in file order: each line is canonical JSON of a known schema; the signer is the roster key
    (``trusted_keys``; a node missing from a given roster fails) or, without a roster, the key of the node's
    first entry; ``key_id`` matches the key; the Ed25519 signature is valid; ``seq`` runs 0, 1, 2, ...;
    ``prev_hash`` chains; rounds never decrease; ``run_id``, ``delta`` and the PLD discretisation are
    constant; and ``epsilon_rdp`` / ``epsilon_pld`` equal a fresh replay of the node's recorded history up to
    and including the entry within ``rdp_rtol`` / ``pld_rtol`` (relative). A node's checks stop at its first
    failure. A missing file raises :class:`LedgerError`; everything else is reported, not raised.
    """
    ledger_path = Path(path)
    lines, complete = _read_lines(ledger_path)
    failures: list[VerificationFailure] = []
    states: dict[str, _NodeState] = {}
    trusted_hex = (
        {node: public_key_to_hex(key) for node, key in trusted_keys.items()} if trusted_keys is not None else None
    )
    for number, line in enumerate(lines, start=1):
        if number == len(lines) and not complete:
            failures.append(VerificationFailure(number, None, "truncated last line (no final newline)"))
            break
        try:
            entry = LedgerEntry.from_line(line)
        except LedgerError as err:
            failures.append(VerificationFailure(number, None, str(err)))
            continue
        state = states.get(entry.node_id)
        if state is None:
            if trusted_hex is not None and entry.node_id not in trusted_hex:
                failures.append(VerificationFailure(number, entry.node_id, "node is not in the key roster"))
                states[entry.node_id] = _NodeState(public_key="", broken=True)
                continue
            pinned = trusted_hex[entry.node_id] if trusted_hex is not None else entry.public_key
            state = states[entry.node_id] = _NodeState(public_key=pinned)
        if state.broken:
            continue
        reason = _check_entry(entry, state, rdp_rtol, pld_rtol)
        if reason is not None:
            failures.append(VerificationFailure(number, entry.node_id, reason))
            state.broken = True
            continue
        state.entries.append(entry)
        state.prev_hash = entry.entry_hash()

    nodes = {}
    for node_id, state in states.items():
        if not state.entries:
            continue
        last = state.entries[-1]
        nodes[node_id] = NodeSummary(
            node_id=node_id,
            entries=len(state.entries),
            last_round=last.round,
            epsilon_rdp=last.epsilon_rdp,
            epsilon_pld=last.epsilon_pld,
            delta=last.delta,
            key_id=last.key_id,
            verified=not state.broken,
        )
    missing = tuple(sorted(set(trusted_hex) - set(states))) if trusted_hex is not None else ()
    failures.sort(key=lambda f: f.line)
    return VerificationReport(
        path=ledger_path, lines=len(lines), nodes=nodes, failures=tuple(failures), missing_nodes=missing
    )


def roster_json(identities: Mapping[str, NodeIdentity]) -> str:
    """A key roster (JSON text) for ``{node_id: identity}``: what :func:`load_roster` reads."""
    return json.dumps({node: ident.public_key_hex for node, ident in identities.items()}, indent=2, sort_keys=True)


__all__ = [
    "GENESIS_HASH",
    "LEDGER_PLD_DISCRETIZATION",
    "PLD_REPLAY_RTOL",
    "RDP_REPLAY_RTOL",
    "SCHEMA_VERSION",
    "SECURE_MODE_REASON",
    "Ledger",
    "LedgerEntry",
    "NodeIdentity",
    "NodeSummary",
    "Release",
    "Sampling",
    "TransportProtection",
    "VerificationFailure",
    "VerificationReport",
    "canonical_json_bytes",
    "key_id_of",
    "load_roster",
    "merge_node_entries",
    "public_key_from_hex",
    "public_key_to_hex",
    "roster_json",
    "verify_ledger",
]
