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

Identity and trust: a node's entries are signed by its provisioned Ed25519 identity
(:class:`secagg.keys.Identity`, the same key that signs its secure-aggregation messages), and every verifier
pins each chain to the provisioned roster (:class:`secagg.keys.Roster`, a kit's ``masking/roster.bin``). The
roster keys nodes by partition id k; a ledger names node k ``str(k)`` (:func:`ledger_node_id`,
:func:`roster_partition`). There is no trust on first use: :func:`verify_ledger` and
:func:`merge_node_entries` take the roster as a required argument, and a node id outside it, or an entry signed
by any key other than its roster key, fails.

Threat model: signatures stop anyone without a node's private key (the server included) from forging, editing,
dropping (except at the tail), reordering or re-signing that node's entries, *provided the roster reached the
verifier over a channel the server does not control* and the private keys stayed on their nodes. In a
simulation with a per-run kit one process generates and holds every key, so the signatures prove nothing about
who ran each step (the audit report says so). A node holding its own key can truncate or rewrite its own
history; the server's copy of the chain detects that after the fact.
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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

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
from privacy.noise import NoiseSource
from secagg.keys import Identity, Roster, check_node_id, public_bytes

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
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
    "Opacus secure_mode needs torchcsprng, which has no installable build for Python 3.11; noise_source says "
    "where the noise came from (os-urandom: the OS CSPRNG with a two-sample Gaussian, privacy.noise); no "
    "discrete-Gaussian defence against floating-point attacks"
)
#: The unit of privacy and the neighbouring relation every entry is accounted under.
PRIVACY_UNIT = "record"
NEIGHBOURING_RELATION = "add-remove-one"
#: ``update_commitment`` of an entry that commits to no update (library use outside a federation).
NO_COMMITMENT = ""

_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
_KEY_ID = re.compile(r"ed25519:[0-9a-f]{32}")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}")


class TransportProtection(StrEnum):
    """How the released update is protected on its way to the aggregate (does not change epsilon)."""

    NONE = "none"
    MASKING = "masking"
    CKKS = "ckks"


class Sampling(StrEnum):
    """Batch sampling scheme the accounting assumes; only Poisson sampling is accounted for."""

    POISSON = "poisson"


class SamplingBasis(StrEnum):
    """What ``sample_rate`` was computed from (:func:`privacy.dpsgd.plan_release`).

    ``declared-size``: a public dataset-size bound, so ``sample_rate``, ``steps`` and ``noise_multiplier`` say
    nothing about the site's record count. ``local-count``: the site's own ``n``; the add/remove-one guarantee
    then holds only if ``n`` is public (:func:`verify_ledger` flags every such entry).
    """

    DECLARED_SIZE = "declared-size"
    LOCAL_COUNT = "local-count"


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
        sampling_basis: ``declared-size`` (``q`` from a public size bound) or ``local-count`` (from ``n``).
        declared_dataset_size: the public bound ``N`` behind ``q`` (0 with ``local-count``).
        dp_mode: where per-sample gradients were clipped (``feature`` or ``exact``).
        noise_source: ``os-urandom`` or ``torch-seeded``.
        update_commitment: SHA-256 (hex) of a secret 32-byte nonce followed by the released update's bytes
            (:func:`update_commitment`): binds the entry to the update without revealing it; the site keeps the
            nonce and can open the commitment to an auditor. :data:`NO_COMMITMENT` for none.
        dataset_label: a random 64-hex-digit label the site gave its dataset (:mod:`privacy.site`; never a hash
            of the records, which would depend on them), or "".
        timestamp: UTC time to record (ISO 8601, ``Z``); None records the time of the append. A site records
            the time it received the round, so the timestamp carries no training time.
    """

    run_id: str
    node_id: str
    round: int
    event: DpSgdEvent
    max_grad_norm: float
    delta: float
    transport_protection: TransportProtection = TransportProtection.NONE
    sampling: Sampling = Sampling.POISSON
    sampling_basis: SamplingBasis = SamplingBasis.LOCAL_COUNT
    declared_dataset_size: int = 0
    dp_mode: str = "feature"
    noise_source: NoiseSource = NoiseSource.OS_URANDOM
    update_commitment: str = NO_COMMITMENT
    dataset_label: str = ""
    timestamp: str | None = None

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
        try:
            object.__setattr__(self, "sampling_basis", SamplingBasis(self.sampling_basis))
            object.__setattr__(self, "noise_source", NoiseSource(self.noise_source))
        except ValueError as err:
            raise PrivacyParameterError(f"release: {err}") from None
        size = validate_steps(self.declared_dataset_size, name="declared_dataset_size")
        if (size > 0) != (self.sampling_basis is SamplingBasis.DECLARED_SIZE):
            raise PrivacyParameterError(
                f"declared_dataset_size={size} contradicts sampling_basis={self.sampling_basis.value!r}"
            )
        if self.dp_mode not in ("feature", "exact"):
            raise PrivacyParameterError(f"dp_mode must be 'feature' or 'exact', got {self.dp_mode!r}")
        for name in ("update_commitment", "dataset_label"):
            value = getattr(self, name)
            if value and not is_hex64(value):
                raise PrivacyParameterError(f"{name} must be 64 lower-case hex digits or empty, got {value!r}")


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
    sampling_basis: str
    declared_dataset_size: int
    privacy_unit: str
    neighbouring_relation: str
    dp_mode: str
    noise_source: str
    update_commitment: str
    dataset_label: str
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

    def verify_signature(self, public_key: Ed25519PublicKey) -> bool:
        """True if ``signature`` is a valid Ed25519 signature of :meth:`signed_bytes` by ``public_key``.

        The key is the verifier's (the roster key of the node, or the signer's own key): the ``public_key``
        field of an entry is only a label and never trusted on its own.
        """
        try:
            public_key.verify(bytes.fromhex(self.signature), self.signed_bytes())
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


_INT_FIELDS = {"schema_version", "seq", "round", "steps", "declared_dataset_size"}
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
    "sampling_basis",
    "privacy_unit",
    "neighbouring_relation",
    "dp_mode",
    "noise_source",
    "update_commitment",
    "dataset_label",
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
    if name in ("update_commitment", "dataset_label") and value:
        patterns[name] = _HEX64
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


def key_id_of(public_key: Ed25519PublicKey | bytes) -> str:
    """``"ed25519:"`` + the first 16 bytes (hex) of SHA-256 over the raw 32-byte public key."""
    raw = public_key if isinstance(public_key, bytes) else public_bytes(public_key)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]


def public_key_to_hex(public_key: Ed25519PublicKey) -> str:
    """Raw 32-byte Ed25519 public key as lower-case hex (the ledger's ``public_key`` field)."""
    return public_bytes(public_key).hex()


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    """Parse a raw Ed25519 public key from 64 hex characters; raises :class:`IdentityError`."""
    try:
        raw = bytes.fromhex(text)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as err:
        raise IdentityError(f"not a raw Ed25519 public key in hex: {text!r}") from err


def ledger_node_id(partition_id: int) -> str:
    """The ledger ``node_id`` of roster node ``partition_id``: its decimal string, ``str(k)``.

    The roster (:class:`secagg.keys.Roster`) keys nodes by partition id k, an unsigned 64-bit integer; ledger
    entries name node k ``"k"`` (no sign, no leading zeros). :func:`roster_partition` is the inverse.
    """
    check_node_id(partition_id)
    return str(partition_id)


def roster_partition(node_id: str) -> int | None:
    """The roster node id (partition id) a ledger ``node_id`` names, or None if it names none.

    Only the canonical decimal form maps (``"7"``, not ``"07"``, ``"+7"`` or ``"node-7"``), so every roster node
    has exactly one ledger chain.
    """
    if _DECIMAL.fullmatch(node_id) is None:
        return None
    partition_id = int(node_id)
    try:
        check_node_id(partition_id)
    except ValueError:
        return None
    return partition_id


NO_ROSTER = (
    "verifying ledger signatures needs the provisioned roster (secagg.keys.Roster: partition id -> Ed25519 "
    "identity key, a kit's masking/roster.bin); the keys embedded in the entries are never trusted on their own"
)


def roster_keys(roster: Roster) -> dict[str, Ed25519PublicKey]:
    """``{ledger node id: roster public key}`` for every node of ``roster``; raises :class:`IdentityError` when
    ``roster`` is not a :class:`secagg.keys.Roster` (e.g. None: there is no verification without one)."""
    if not isinstance(roster, Roster):
        raise IdentityError(f"{NO_ROSTER}; got {type(roster).__name__}")
    return {ledger_node_id(k): roster[k] for k in roster}


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


def update_commitment(nonce: bytes, arrays: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``nonce`` and the arrays ``{name: numpy array}`` in a canonical byte form.

    Names in sorted order, each as its UTF-8 length and bytes, then the array's dtype string, shape and
    little-endian C-order bytes. With a secret 32-byte ``nonce`` this is a hiding, binding commitment: the
    entry can name the released update without revealing it, and whoever gets the nonce can check it.
    """
    import numpy as np

    if not isinstance(nonce, bytes) or len(nonce) != 32:
        raise PrivacyParameterError("update commitment nonce must be 32 bytes")
    digest = hashlib.sha256(nonce)
    for name in sorted(arrays):
        value = np.ascontiguousarray(np.asarray(arrays[name]))
        value = value.astype(value.dtype.newbyteorder("<"), copy=False)
        encoded = name.encode("utf-8")
        digest.update(len(encoded).to_bytes(4, "big") + encoded)
        header = f"{value.dtype.str}|{','.join(str(d) for d in value.shape)}".encode()
        digest.update(len(header).to_bytes(4, "big") + header)
        digest.update(value.tobytes())
    return digest.hexdigest()


def utc_timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def read_chain(
    path: str | os.PathLike[str], public_key: Ed25519PublicKey | None = None, node_id: str | None = None
) -> list[LedgerEntry]:
    """The entries of one node's chain file, checked: canonical lines, one signer, valid signatures, ``seq`` from
    0 and ``prev_hash`` links, and a constant ``node_id`` and ``dataset_label``.

    ``public_key`` / ``node_id`` pin the signer and node (a node opening its own ledger); None takes them from
    the first entry (a site reading the chain of an earlier run, signed by that run's kit). Raises
    :class:`LedgerError` naming the file, the line and the problem; a torn last line is an error.
    """
    chain = Path(path)
    lines, complete = _read_lines(chain)
    if not complete:
        raise LedgerError(f"ledger {chain}: line {len(lines)} is truncated (no final newline; interrupted write?)")
    entries: list[LedgerEntry] = []
    prev_hash = GENESIS_HASH
    for number, line in enumerate(lines, start=1):
        try:
            entry = LedgerEntry.from_line(line)
        except LedgerError as err:
            raise LedgerError(f"ledger {chain}, line {number}: {err}") from None
        if public_key is None:
            public_key = public_key_from_hex(entry.public_key)
        first = entries[0] if entries else entry
        expected_node = node_id if node_id is not None else first.node_id
        problem = None
        if entry.public_key != public_key_to_hex(public_key):
            problem = f"signed by {entry.key_id}, not by this node's key {key_id_of(public_key)}"
        elif not entry.verify_signature(public_key):
            problem = "bad signature"
        elif entry.node_id != expected_node:
            problem = f"node_id {entry.node_id!r} is not this ledger's node {expected_node!r}"
        elif entry.seq != number - 1:
            problem = f"seq {entry.seq}, expected {number - 1}"
        elif entry.prev_hash != prev_hash:
            problem = "prev_hash does not match the previous entry"
        elif entry.dataset_label != first.dataset_label:
            problem = "dataset_label changed inside the chain"
        if problem:
            raise LedgerError(f"ledger {chain}, line {number}: {problem}")
        entries.append(entry)
        prev_hash = entry.entry_hash()
    return entries


def is_hex64(value: object) -> bool:
    """Whether ``value`` is 64 lower-case hex digits (a SHA-256 digest, a label, a commitment)."""
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


class Ledger:
    """A node's append-only epsilon ledger file, signed with the node's provisioned identity.

    ``identity`` is node k's :class:`secagg.keys.Identity` (``Kit.identity(k)``, the key that also signs its
    secure-aggregation messages); every entry records ``node_id = ledger_node_id(k)`` and a release for any other
    node id is refused. Opening reads the file and checks its chain (signatures with this identity, node id,
    ``seq``, ``prev_hash``); a corrupt or foreign file, or a torn last line, raises :class:`LedgerError` and is
    never repaired automatically. :meth:`append` only ever adds bytes at the end and fsyncs before returning.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        identity: Identity,
        *,
        pld_value_discretization: float = LEDGER_PLD_DISCRETIZATION,
    ) -> None:
        if not isinstance(identity, Identity):
            raise IdentityError(f"identity must be a secagg.keys.Identity, got {type(identity).__name__}")
        self._path = Path(path)
        self._identity = identity
        self._node_id = ledger_node_id(identity.node_id)
        self._public_hex = identity.public.hex()
        self._key_id = key_id_of(identity.public)
        self._pld_interval = validate_epsilon(pld_value_discretization, name="pld_value_discretization")
        self._entries: list[LedgerEntry] = []
        self._size = 0
        if self._path.exists():
            self._load()

    def _load(self) -> None:
        self._entries = read_chain(self._path, self._identity.private.public_key(), self._node_id)
        self._size = self._path.stat().st_size

    @property
    def node_id(self) -> str:
        """The ledger node id of the signing identity, ``str(partition id)``."""
        return self._node_id

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
        if release.node_id != self._node_id:
            raise LedgerError(
                f"ledger {self._path} is signed by the identity of node {self._identity.node_id}, so its releases "
                f"have node_id={self._node_id!r}; release has node_id={release.node_id!r}"
            )
        if not self._entries:
            return
        last = self._entries[-1]
        for name, recorded, given in (
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
            sampling_basis=release.sampling_basis.value,
            declared_dataset_size=release.declared_dataset_size,
            privacy_unit=PRIVACY_UNIT,
            neighbouring_relation=NEIGHBOURING_RELATION,
            dp_mode=release.dp_mode,
            noise_source=release.noise_source.value,
            update_commitment=release.update_commitment,
            dataset_label=release.dataset_label,
            transport_protection=release.transport_protection.value,
            secure_mode=False,
            secure_mode_reason=SECURE_MODE_REASON,
            versions=_library_versions(),
            timestamp=release.timestamp or utc_timestamp(),
            prev_hash=previous.entry_hash() if previous else GENESIS_HASH,
            key_id=self._key_id,
            public_key=self._public_hex,
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
    roster: Roster,
) -> int:
    """Append nodes' signed entries to the run ledger (e.g. ``<run_dir>/epsilon_ledger.jsonl``).

    Entries arrive as :class:`LedgerEntry` objects or as their canonical line bytes (never pickled). Each one
    must name a node of ``roster`` (:func:`roster_partition`), carry that node's roster key and a valid
    signature by it, and extend its node's chain: ``seq`` = last + 1 with a matching ``prev_hash``. Entries
    already present byte-for-byte are skipped, so a node may resend its whole ledger each round. A conflicting
    entry for an existing ``seq`` (a fork), a gap, a key outside the roster, or a run ledger already holding
    entries by keys outside it (one merged under another kit) raises :class:`LedgerError` and nothing is
    written. Epsilon values are not replayed here (that is :func:`verify_ledger`'s job). Returns the number of
    entries appended.
    """
    keys = roster_keys(roster)
    trusted_hex = {node: public_key_to_hex(key) for node, key in keys.items()}
    path = Path(run_ledger_path)
    chains: dict[str, list[str]] = {}  # node id -> entry hash by seq
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
            if existing.public_key != trusted_hex.get(existing.node_id):
                raise LedgerError(
                    f"run ledger {path}, line {number}: node {existing.node_id!r} is signed by {existing.key_id}, "
                    "which is not its roster key (a run ledger merged under another kit?)"
                )
            chains.setdefault(existing.node_id, []).append(existing.entry_hash())
        size = path.stat().st_size

    new_lines: list[bytes] = []
    for raw in entries:
        entry = _parse_entry(raw)
        where = f"entry seq {entry.seq} of node {entry.node_id!r}"
        pinned = keys.get(entry.node_id)
        if pinned is None:
            raise LedgerError(f"{where}: node is not in the key roster")
        if entry.public_key != trusted_hex[entry.node_id]:
            raise LedgerError(f"{where}: signed by {entry.key_id}, not by the roster key")
        if entry.key_id != key_id_of(pinned):
            raise LedgerError(f"{where}: key_id does not match public_key")
        if not entry.verify_signature(pinned):
            raise LedgerError(f"{where}: bad signature")
        hashes = chains.setdefault(entry.node_id, [])
        if entry.seq < len(hashes):
            if hashes[entry.seq] != entry.entry_hash():
                raise LedgerError(f"{where}: conflicts with the entry already recorded at that seq (fork)")
            continue
        if entry.seq != len(hashes):
            raise LedgerError(f"{where}: expected seq {len(hashes)} next (entries missing in between)")
        if entry.prev_hash != (hashes[-1] if hashes else GENESIS_HASH):
            raise LedgerError(f"{where}: prev_hash does not match the node's previous entry")
        hashes.append(entry.entry_hash())
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
    """Result of :func:`verify_ledger`: per-node summaries, failures ordered by line, and the roster nodes
    (ledger node ids) without any entry."""

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
    public_key: Ed25519PublicKey | None  # the roster key; None for a node outside the roster
    entries: list[LedgerEntry] = field(default_factory=list)
    prev_hash: str = GENESIS_HASH
    broken: bool = False


def _relative_error(recorded: float, recomputed: float) -> float:
    scale = max(abs(recorded), abs(recomputed), 1e-300)
    return abs(recorded - recomputed) / scale


def _check_entry(entry: LedgerEntry, state: _NodeState, rdp_rtol: float, pld_rtol: float) -> str | None:
    """Reason why ``entry`` does not extend ``state``'s chain, or None if it does."""
    if state.public_key is None or entry.public_key != public_key_to_hex(state.public_key):
        return f"signed by {entry.key_id}, not by the node's roster key"
    if entry.key_id != key_id_of(state.public_key):
        return "key_id does not match public_key"
    if not entry.verify_signature(state.public_key):
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
        for name in ("run_id", "delta", "pld_value_discretization", "dataset_label"):
            if getattr(entry, name) != getattr(first, name):
                return f"{name} changed from {getattr(first, name)!r} to {getattr(entry, name)!r}"
    if entry.sampling != Sampling.POISSON.value:
        return f"sampling {entry.sampling!r} is not accounted for (only 'poisson')"
    if entry.privacy_unit != PRIVACY_UNIT or entry.neighbouring_relation != NEIGHBOURING_RELATION:
        return (
            f"accounted as {entry.privacy_unit!r}/{entry.neighbouring_relation!r}; this verifier replays only "
            f"{PRIVACY_UNIT!r}/{NEIGHBOURING_RELATION!r}"
        )
    for name, allowed in (
        ("sampling_basis", SamplingBasis),
        ("noise_source", NoiseSource),
    ):
        if getattr(entry, name) not in {v.value for v in allowed}:
            return f"unknown {name} {getattr(entry, name)!r}"
    if (entry.declared_dataset_size > 0) != (entry.sampling_basis == SamplingBasis.DECLARED_SIZE.value):
        return f"declared_dataset_size={entry.declared_dataset_size} contradicts sampling_basis"
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
    roster: Roster,
    *,
    rdp_rtol: float = RDP_REPLAY_RTOL,
    pld_rtol: float = PLD_REPLAY_RTOL,
) -> VerificationReport:
    """Verify a node ledger or a merged run ledger against the provisioned ``roster``; replay every epsilon.

    Per node, in file order: each line is canonical JSON of a known schema; the node id names a roster node
    (:func:`roster_partition`; any other node fails) and the signer is its roster key; ``key_id`` matches the
    key; the Ed25519 signature is valid; ``seq`` runs 0, 1, 2, ...; ``prev_hash`` chains; rounds never
    decrease; ``run_id``, ``delta`` and the PLD discretisation are constant; and ``epsilon_rdp`` /
    ``epsilon_pld`` equal a fresh replay of the node's recorded history up to and including the entry within
    ``rdp_rtol`` / ``pld_rtol`` (relative). A node's checks stop at its first failure. There is no
    verification without a roster: anything else than a :class:`secagg.keys.Roster` raises
    :class:`IdentityError`, as does a missing file (:class:`LedgerError`); everything else is reported, not
    raised.
    """
    keys = roster_keys(roster)
    ledger_path = Path(path)
    lines, complete = _read_lines(ledger_path)
    failures: list[VerificationFailure] = []
    states: dict[str, _NodeState] = {}
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
            state = states[entry.node_id] = _NodeState(public_key=keys.get(entry.node_id))
            if state.public_key is None:
                failures.append(VerificationFailure(number, entry.node_id, "node is not in the key roster"))
                state.broken = True
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
    missing = tuple(str(k) for k in sorted(roster) if ledger_node_id(k) not in states)
    failures.sort(key=lambda f: f.line)
    return VerificationReport(
        path=ledger_path, lines=len(lines), nodes=nodes, failures=tuple(failures), missing_nodes=missing
    )


__all__ = [
    "GENESIS_HASH",
    "LEDGER_PLD_DISCRETIZATION",
    "NO_ROSTER",
    "PLD_REPLAY_RTOL",
    "RDP_REPLAY_RTOL",
    "SCHEMA_VERSION",
    "SECURE_MODE_REASON",
    "Ledger",
    "LedgerEntry",
    "NodeSummary",
    "Release",
    "Sampling",
    "TransportProtection",
    "VerificationFailure",
    "VerificationReport",
    "NEIGHBOURING_RELATION",
    "NO_COMMITMENT",
    "PRIVACY_UNIT",
    "SamplingBasis",
    "canonical_json_bytes",
    "is_hex64",
    "read_chain",
    "update_commitment",
    "utc_timestamp",
    "key_id_of",
    "ledger_node_id",
    "merge_node_entries",
    "public_key_from_hex",
    "public_key_to_hex",
    "roster_keys",
    "roster_partition",
    "verify_ledger",
]
