"""CKKS aggregation with TenSEAL: clients encrypt, the server adds ciphertexts it cannot open, clients
decrypt only a sum they recomputed from signed uploads.

Trust model (NVIDIA FLARE's HE-FedAvg pattern): one CKKS secret key is created at provisioning and shared by
every client; the server holds a context with **no secret key** (:func:`load_server_context` refuses one). So
the server alone learns nothing from ciphertexts, but the server colluding with any single client decrypts
every upload. Parameters default to N = 8192 with the chain (60, 60): one 60-bit ciphertext prime plus SEAL's
special prime, 120 bits in total, within the 128-bit bound of 218 bits that SEAL enforces.

**Decryption oracle and how it is closed.** A client that decrypts whatever the server calls "the aggregate"
is a decryption oracle for a key-less server: the server can present one client's upload (or 2x an upload,
or any affine combination of uploads) and read back what the client derives from it. Clients therefore never
decrypt a server-computed ciphertext. Each client signs its UPLOAD with its Ed25519 identity
(:func:`sign_upload`, over :func:`upload_transcript`); the server forwards the signed uploads, and a decrypting
client calls :func:`decrypt_verified`, which verifies every signature against the provisioned roster,
requires at least ``threshold`` distinct senders, recomputes the homomorphic sum itself and decrypts only
that sum. The encrypted client-count slot must then decrypt to exactly the number of uploads summed.

**Decrypted values and IND-CPA-D.** CKKS decryptions carry noise that is a function of the secret key; if
they reach a key-less party the key can be recovered (Li & Micciancio, EUROCRYPT 2021). In float mode
:func:`decrypt_verified` rounds the mean to a power-of-two grid 2**10 times coarser than the error bound, which
removes the noise from every coordinate not within the error bound of a grid midpoint (a fraction of at most
~2**-9 of the coordinates for values spread uniformly over a cell). This is a mitigation, not IND-CPA-D
security; noise flooding with a statistically sized std is the proven fix and is available, off by
default, as ``flooding_std``. Packed mode decodes exact integers and needs neither.

Two encodings of a client's update x (shape (d,)) and integer weight w, followed by the slots [w, 1] (the
weight and a client count, both summed under encryption, so the server cannot misstate them):

* ``pack == 1`` (float): slot i holds w * clip(x_i, +-c) at scale 2**scale_bits. CKKS noise gives an absolute
  error of about n * 2**(15 - scale_bits) (measured, not proven: ~1e-9 at 2**40).
* ``pack = k >= 2`` (packed fixed point): each value is quantized to q = SR(w * clip(x, +-c) * s) in [-Q, Q],
  offset to [0, 2Q] and k of them are packed into one integer slot sum_l q_l 2**(l * lane_bits). With
  n <= max_clients the lanes cannot carry into each other (2 Q max_clients < 2**lane_bits); decryption
  rounds the slot (its residual must be < 1/4, else :class:`~secagg.errors.CkksError`) and unpacks exactly,
  so the only error is the stochastic rounding: |mean error| < n / (s * W), as for masking.

Wire layout of an upload or an aggregate (little-endian)::

    b"FMCK" | u8 version=1 | u8 kind (1 upload, 2 aggregate) | u16 0 | 16B run id | u64 round | u64 sender
    | u64 d | 8B context fingerprint | u32 ciphertext count | (u32 length | SEAL ciphertext bytes)*

Signed upload envelope (little-endian)::

    b"FMCS" | u8 version=1 | u8 0 | u16 signature length (64) | u32 upload length | upload | Ed25519 signature
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import math
import os
import struct
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts

from fedmpt.errors import ConfigError
from secagg.config import CkksConfig
from secagg.errors import CkksError, MessageRejected, ProtocolError, SignatureInvalid, ThresholdNotMet
from secagg.keys import RUN_ID_BYTES, SERVER_ID, Identity, Roster, round_context
from secagg.prg import fresh_seed, uniform_floats

logger = logging.getLogger(__name__)

MAGIC = b"FMCK"
VERSION = 1
_HEADER = struct.Struct("<4sBBH16sQQQ8sI")
HEADER_BYTES = _HEADER.size
CLIENT_CONTEXT_FILE = "client_context.tenseal"
SERVER_CONTEXT_FILE = "server_context.tenseal"
CONFIG_FILE = "ckks_config.json"
SIGNED_MAGIC = b"FMCS"
SIGNED_VERSION = 1
_SIGNED_HEADER = struct.Struct("<4sBBHI")
SIGNATURE_BYTES = 64
#: Domain separator of the transcript an upload signature covers (see :func:`upload_transcript`).
UPLOAD_DOMAIN = b"fedmpt-secagg/v1/ckks-upload|"
#: Float-mode rounding grid: the smallest power of two >= 2**ROUNDING_MARGIN_BITS * the CKKS error bound.
ROUNDING_MARGIN_BITS = 10


class CkksKind(enum.IntEnum):
    """Message kind of a CKKS wire message."""

    UPLOAD = 1
    AGGREGATE = 2


# ------------------------------------------------------------------------------------------------- contexts


def create_secret_context(config: CkksConfig) -> ts.Context:
    """A fresh CKKS context holding the secret key (provisioning only; it goes to clients, never the server).

    SEAL refuses parameter sets above the 128-bit security table (checked again in :class:`CkksConfig`).
    No Galois or relinearization keys are generated: aggregation needs only additions.
    """
    enc = ts.ENCRYPTION_TYPE.SYMMETRIC if config.symmetric else ts.ENCRYPTION_TYPE.ASYMMETRIC
    try:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=config.poly_modulus_degree,
            coeff_mod_bit_sizes=list(config.coeff_mod_bit_sizes),
            encryption_type=enc,
            n_threads=config.n_threads,
        )
    except ValueError as err:
        raise CkksError(f"SEAL rejected the CKKS parameters {config}: {err}") from err
    ctx.global_scale = 2.0**config.scale_bits
    return ctx


def server_context_bytes(secret_context: ts.Context) -> bytes:
    """Serialize what the server may hold: the parameters (and public key if any), never the secret key."""
    return bytes(
        secret_context.serialize(
            save_public_key=_has_public_key(secret_context),
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
    )


def _has_public_key(ctx: ts.Context) -> bool:
    try:
        return bool(ctx.has_public_key())
    except (AttributeError, ValueError):
        return False


def client_context_bytes(secret_context: ts.Context) -> bytes:
    """Serialize the client context, secret key included (write it only to client kits, mode 0600)."""
    if not secret_context.is_private():
        raise CkksError("client context must hold the secret key")
    return bytes(secret_context.serialize(save_secret_key=True, save_galois_keys=False, save_relin_keys=False))


def load_server_context(data: bytes, config: CkksConfig) -> ts.Context:
    """Load the server's context and refuse it if it holds a secret key."""
    ctx = _load_context(data, config, "server")
    if ctx.is_private():
        raise CkksError("the server context holds a CKKS secret key; the server must only get a public context")
    return ctx


def load_client_context(data: bytes, config: CkksConfig) -> ts.Context:
    """Load a client's context; it must hold the secret key."""
    ctx = _load_context(data, config, "client")
    if not ctx.is_private():
        raise CkksError("the client context holds no secret key; it cannot decrypt")
    return ctx


def _load_context(data: bytes, config: CkksConfig, who: str) -> ts.Context:
    try:
        ctx = ts.context_from(bytes(data), n_threads=config.n_threads)
    except Exception as err:  # TenSEAL raises bare ValueError/RuntimeError on bad bytes.
        raise CkksError(f"cannot parse the {who} CKKS context: {err}") from err
    ctx.global_scale = 2.0**config.scale_bits
    return ctx


KEY_ID_BYTES = 8


def new_key_id() -> bytes:
    """A random public 8-byte label of one provisioned key set (a symmetric context shows the server no
    key)."""
    return os.urandom(KEY_ID_BYTES)


def context_fingerprint(context: ts.Context, key_id: bytes) -> bytes:
    """8-byte binding of a message to one key set: SHA-256(server-visible context bytes || key id)[:8]."""
    if len(key_id) != KEY_ID_BYTES:
        raise ConfigError(f"CKKS key id must be {KEY_ID_BYTES} bytes, got {len(key_id)}")
    return hashlib.sha256(server_context_bytes(context) + key_id).digest()[:8]


@dataclass(frozen=True)
class ProvisionedKit:
    """Paths written by :func:`provision`."""

    client_context: Path
    server_context: Path
    config: Path
    key_id: bytes


def provision(config: CkksConfig, out_dir: Path) -> ProvisionedKit:
    """Create the CKKS keys once and write ``client/``, ``server/`` kits under ``out_dir``.

    ``client/client_context.tenseal`` (secret key, file mode 0600) goes to every client;
    ``server/server_context.tenseal`` (no secret key, verified by reloading) goes to the server. Both kits get
    ``ckks_config.json`` with the parameters and the key fingerprint for the ledger.
    """
    out_dir = Path(out_dir)
    client_dir, server_dir = out_dir / "client", out_dir / "server"
    for d in (client_dir, server_dir):
        d.mkdir(parents=True, exist_ok=True)
    secret = create_secret_context(config)
    server_raw = server_context_bytes(secret)
    load_server_context(server_raw, config)  # refuses a secret key
    key_id = new_key_id()
    client_path = client_dir / CLIENT_CONTEXT_FILE
    fd = os.open(client_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(client_context_bytes(secret))
    server_path = server_dir / SERVER_CONTEXT_FILE
    server_path.write_bytes(server_raw)
    meta: dict[str, Any] = {"schema_version": 1, "config": asdict(config), "key_id": key_id.hex()}
    for d in (client_dir, server_dir):
        (d / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    logger.info("provisioned CKKS kits under %s (key id %s)", out_dir, key_id.hex())
    return ProvisionedKit(client_path, server_path, server_dir / CONFIG_FILE, key_id)


def load_kit(kit_dir: Path) -> tuple[ts.Context, CkksConfig, bytes]:
    """Load a kit written by :func:`provision`: (context, config, key id).

    A directory holding ``client_context.tenseal`` yields the secret context; one holding
    ``server_context.tenseal`` yields the server context, refused if it carries a secret key.
    """
    kit_dir = Path(kit_dir)
    meta_path = kit_dir / CONFIG_FILE
    try:
        meta = json.loads(meta_path.read_text())
        raw_cfg = dict(meta["config"])
        raw_cfg["coeff_mod_bit_sizes"] = tuple(raw_cfg["coeff_mod_bit_sizes"])
        config = CkksConfig(**raw_cfg)
        key_id = bytes.fromhex(meta["key_id"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CkksError(f"cannot read CKKS kit config {meta_path}: {err}") from err
    if (kit_dir / CLIENT_CONTEXT_FILE).exists():
        return load_client_context((kit_dir / CLIENT_CONTEXT_FILE).read_bytes(), config), config, key_id
    if (kit_dir / SERVER_CONTEXT_FILE).exists():
        return load_server_context((kit_dir / SERVER_CONTEXT_FILE).read_bytes(), config), config, key_id
    raise CkksError(f"{kit_dir} holds neither {CLIENT_CONTEXT_FILE} nor {SERVER_CONTEXT_FILE}")


# ------------------------------------------------------------------------------------------------- encoding


def _slots(update: np.ndarray, weight: int, config: CkksConfig, rounding_seed: bytes | None) -> np.ndarray:
    """Plaintext slot vector: encoded values then [w, 1], shape (S,)."""
    x = np.asarray(update, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ConfigError(f"update must be a non-empty flat vector, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ConfigError(f"update has {int(np.sum(~np.isfinite(x)))} non-finite values")
    if isinstance(weight, bool) or not isinstance(weight, int | np.integer) or not 1 <= weight <= config.max_weight:
        raise ConfigError(f"weight must be an int in [1, max_weight={config.max_weight}], got {weight!r}")
    v = np.clip(x, -config.clip_range, config.clip_range) * float(weight)  # (d,)
    tail = np.array([float(weight), 1.0])
    if config.pack == 1:
        return np.concatenate([v, tail])
    q_half = config.lane_half_range()
    seed = fresh_seed() if rounding_seed is None else rounding_seed
    q = np.floor(v * config.quantization_scale() + uniform_floats(seed, b"ckks-encode", x.size)).astype(np.int64)
    lanes = np.clip(q, -q_half, q_half) + q_half  # (d,) in [0, 2Q]
    n_slots = -(-x.size // config.pack)
    padded = np.zeros(n_slots * config.pack, dtype=np.int64)
    padded[: x.size] = lanes
    shifts = np.arange(config.pack, dtype=np.int64) * config.lane_bits  # (k,)
    packed = (padded.reshape(n_slots, config.pack) << shifts).sum(axis=1)  # (S-2,) < 2**(k*lane_bits)
    return np.concatenate([packed.astype(np.float64), tail])


def _n_data_slots(d: int, config: CkksConfig) -> int:
    return d if config.pack == 1 else -(-d // config.pack)


def _scale(config: CkksConfig) -> float:
    return 2.0 ** (config.scale_bits if config.pack == 1 else config.packed_scale_bits)


def _max_ciphertext_bytes(config: CkksConfig) -> int:
    # Two polynomials of N coefficients per prime, 8 bytes each, plus SEAL's header; 2x slack.
    return 2 * (2 * config.poly_modulus_degree * len(config.coeff_mod_bit_sizes) * 8) + 4096


# ------------------------------------------------------------------------------------------------- wire


def _pack_message(
    kind: CkksKind,
    run_id: bytes,
    round_number: int,
    sender: int,
    d: int,
    fingerprint: bytes,
    cts: Sequence[bytes],
) -> bytes:
    if len(run_id) != RUN_ID_BYTES:
        raise ConfigError(f"run id must be {RUN_ID_BYTES} bytes, got {len(run_id)}")
    header = _HEADER.pack(MAGIC, VERSION, int(kind), 0, run_id, round_number, sender, d, fingerprint, len(cts))
    return header + b"".join(struct.pack("<I", len(c)) + c for c in cts)


@dataclass(frozen=True)
class _Parsed:
    sender: int
    d: int
    ciphertexts: tuple[bytes, ...]


def _read_header(data: bytes, kind: CkksKind) -> tuple[bytes, int, int, int, bytes, int]:
    """(run id, round, sender, d, fingerprint, ciphertext count) of a message of ``kind``; MessageRejected on a
    short header, bad magic/version/reserved or another kind."""
    if len(data) < HEADER_BYTES:
        raise MessageRejected(f"CKKS {kind.name}: truncated header ({len(data)} bytes)")
    magic, version, got_kind, reserved, got_run, got_round, sender, d, got_fp, count = _HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION or reserved != 0:
        raise MessageRejected(f"CKKS {kind.name}: bad magic/version/reserved ({magic!r}, {version}, {reserved})")
    if got_kind != int(kind):
        raise MessageRejected(f"CKKS: expected a {kind.name} message, got kind {got_kind}")
    return got_run, got_round, sender, d, got_fp, count


def _unpack_message(
    data: bytes, kind: CkksKind, run_id: bytes, round_number: int, fingerprint: bytes, config: CkksConfig
) -> _Parsed:
    data = bytes(data)
    got_run, got_round, sender, d, got_fp, count = _read_header(data, kind)
    if got_run != run_id:
        raise MessageRejected(f"CKKS {kind.name}: bound to run {got_run.hex()}, this is run {run_id.hex()}")
    if got_round != round_number:
        raise MessageRejected(f"CKKS {kind.name}: bound to round {got_round}, this is round {round_number}")
    if got_fp != fingerprint:
        raise MessageRejected(f"CKKS {kind.name}: encrypted under key set {got_fp.hex()}, expected {fingerprint.hex()}")
    expected = -(-(_n_data_slots(d, config) + 2) // config.slots)
    if count != expected:
        raise MessageRejected(f"CKKS {kind.name}: {count} ciphertexts for d={d}, expected {expected}")
    pos, cts, limit = HEADER_BYTES, [], _max_ciphertext_bytes(config)
    for i in range(count):
        if pos + 4 > len(data):
            raise MessageRejected(f"CKKS {kind.name}: truncated before ciphertext {i}")
        (length,) = struct.unpack_from("<I", data, pos)
        if length == 0 or length > limit or pos + 4 + length > len(data):
            raise MessageRejected(f"CKKS {kind.name}: ciphertext {i} has bad length {length} (or is truncated)")
        cts.append(data[pos + 4 : pos + 4 + length])
        pos += 4 + length
    if pos != len(data):
        raise MessageRejected(f"CKKS {kind.name}: {len(data) - pos} trailing bytes")
    return _Parsed(sender, d, tuple(cts))


def _vector_from(context: ts.Context, raw: bytes, what: str) -> ts.CKKSVector:
    try:
        return ts.ckks_vector_from(context, raw)
    except Exception as err:  # SEAL validates and raises ValueError on malformed ciphertexts.
        raise MessageRejected(f"{what}: not a valid ciphertext for this context: {err}") from err


# ------------------------------------------------------------------------------------------------- protocol


def encrypt_update(
    context: ts.Context,
    config: CkksConfig,
    update: np.ndarray,
    weight: int,
    *,
    run_id: bytes,
    round_number: int,
    sender: int,
    key_id: bytes,
    rounding_seed: bytes | None = None,
) -> bytes:
    """Client: encode (see module doc) and encrypt a weighted update; returns the UPLOAD message bytes.

    Slots are cut into ciphertexts of N/2 values, encrypted and serialized on ``config.n_threads`` threads
    (TenSEAL releases the GIL).
    """
    slots = _slots(update, weight, config, rounding_seed)  # (S,)
    chunks = [slots[i : i + config.slots] for i in range(0, slots.size, config.slots)]
    scale = _scale(config)

    def enc(chunk: np.ndarray) -> bytes:
        return bytes(ts.ckks_vector(context, chunk.tolist(), scale=scale).serialize())

    with ThreadPoolExecutor(max_workers=config.n_threads) as pool:
        cts = list(pool.map(enc, chunks))
    return _pack_message(
        CkksKind.UPLOAD,
        run_id,
        round_number,
        sender,
        int(np.asarray(update).size),
        context_fingerprint(context, key_id),
        cts,
    )


def _parse_uploads(
    context: ts.Context,
    config: CkksConfig,
    uploads: Mapping[int, bytes],
    *,
    run_id: bytes,
    round_number: int,
    key_id: bytes,
) -> tuple[dict[int, _Parsed], int]:
    """Parse every UPLOAD (bound to this run, round and key set, from the node it is keyed by, one common d);
    returns (parsed uploads by node, d)."""
    fingerprint = context_fingerprint(context, key_id)
    parsed: dict[int, _Parsed] = {}
    for node in sorted(uploads):
        p = _unpack_message(uploads[node], CkksKind.UPLOAD, run_id, round_number, fingerprint, config)
        if p.sender != node:
            raise MessageRejected(f"CKKS UPLOAD keyed by node {node} claims sender {p.sender}")
        parsed[node] = p
    dims = {p.d for p in parsed.values()}
    if len(dims) != 1:
        raise MessageRejected(f"CKKS UPLOADs disagree on the vector length: {sorted(dims)}")
    return parsed, dims.pop()


def _sum_ciphertexts(context: ts.Context, config: CkksConfig, parsed: Mapping[int, _Parsed]) -> list[ts.CKKSVector]:
    """Slot-wise homomorphic sum of the parsed uploads: one summed vector per ciphertext position."""
    n_cts = len(next(iter(parsed.values())).ciphertexts)

    def add_chunk(i: int) -> ts.CKKSVector:
        # Ciphertext i of every upload, added; chunks are independent, so they run on parallel threads.
        acc: ts.CKKSVector | None = None
        for node, p in parsed.items():
            v = _vector_from(context, p.ciphertexts[i], f"UPLOAD from {node}")
            if acc is None:
                acc = v
            else:
                acc += v
        assert acc is not None  # parsed is non-empty (checked by every caller)
        return acc

    with ThreadPoolExecutor(max_workers=config.n_threads) as pool:
        return list(pool.map(add_chunk, range(n_cts)))


def aggregate(
    server_context: ts.Context,
    config: CkksConfig,
    uploads: Mapping[int, bytes],
    *,
    run_id: bytes,
    round_number: int,
    key_id: bytes,
) -> bytes:
    """Server: add the uploads' ciphertexts slot-wise; returns the AGGREGATE message (kept for checkpoints).

    Every upload must be bound to this run and round, come from the node it is keyed by, be encrypted under
    this key set and have the same d; otherwise MessageRejected. The server context must hold no secret key.
    Clients do not decrypt this message (see :func:`decrypt_verified`): the server could have put anything in
    it. Signature envelopes are not checked here; pass the inner upload bytes (:meth:`SignedUpload.from_bytes`).
    """
    if server_context.is_private():
        raise CkksError("aggregate() was given a context with a secret key; the server must not hold one")
    if not uploads:
        raise CkksError("no uploads to aggregate")
    if len(uploads) > config.max_clients:
        raise CkksError(f"{len(uploads)} uploads exceed max_clients={config.max_clients} (overflow headroom)")
    parsed, d = _parse_uploads(server_context, config, uploads, run_id=run_id, round_number=round_number, key_id=key_id)
    sums = _sum_ciphertexts(server_context, config, parsed)
    with ThreadPoolExecutor(max_workers=config.n_threads) as pool:  # SEAL serializes without the GIL
        cts = list(pool.map(lambda v: bytes(v.serialize()), sums))
    fingerprint = context_fingerprint(server_context, key_id)
    return _pack_message(CkksKind.AGGREGATE, run_id, round_number, SERVER_ID, d, fingerprint, cts)


# ------------------------------------------------------------------------------------------------- signatures


def upload_transcript(run_id: bytes, round_number: int, sender: int, upload: bytes) -> bytes:
    """Bytes an upload signature covers: domain || 16B run id || u64 round || u64 sender || SHA-256(upload).

    The domain ``fedmpt-secagg/v1/ckks-upload|`` keeps these signatures apart from every other signature made
    with the same identity key (masking's key advertisements and consistency checks use other labels). The
    hash covers the whole UPLOAD message, header (kind, run, round, sender, d, key-set fingerprint) and
    ciphertexts, so changing a single ciphertext bit, or re-using the signature for another run, round or
    sender, fails verification (Ed25519 is strongly unforgeable, RFC 8032).
    """
    if isinstance(sender, bool) or not isinstance(sender, int) or not 0 <= sender < SERVER_ID:
        raise ConfigError(f"upload sender must be a client node id in [0, 2**64 - 1), got {sender!r}")
    if isinstance(round_number, bool) or not isinstance(round_number, int) or not 0 <= round_number < 2**64:
        raise ConfigError(f"round number must be an int in [0, 2**64), got {round_number!r}")
    return (
        UPLOAD_DOMAIN
        + round_context(run_id, round_number)
        + struct.pack("<Q", sender)
        + hashlib.sha256(bytes(upload)).digest()
    )


@dataclass(frozen=True)
class SignedUpload:
    """An UPLOAD message with its sender's Ed25519 signature over :func:`upload_transcript`.

    Byte layout (little-endian; :meth:`to_bytes` / :meth:`from_bytes`)::

        b"FMCS" | u8 version=1 | u8 0 | u16 signature length (64) | u32 upload length | upload | signature
    """

    upload: bytes = field(repr=False)
    signature: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.signature) != SIGNATURE_BYTES:
            raise MessageRejected(
                f"signed CKKS upload: signature must be {SIGNATURE_BYTES} bytes, got {len(self.signature)}"
            )
        if not self.upload or len(self.upload) >= 2**32:
            raise MessageRejected(f"signed CKKS upload: upload length {len(self.upload)} is not in [1, 2**32)")

    def to_bytes(self) -> bytes:
        """The envelope bytes (see the class docstring)."""
        head = _SIGNED_HEADER.pack(SIGNED_MAGIC, SIGNED_VERSION, 0, len(self.signature), len(self.upload))
        return head + self.upload + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedUpload:
        """Parse an envelope; MessageRejected on truncation, trailing bytes, bad magic, version, reserved byte or
        signature length. Parses only: the signature is checked by :func:`decrypt_verified`."""
        data = bytes(data)
        if len(data) < _SIGNED_HEADER.size:
            raise MessageRejected(f"signed CKKS upload: truncated header ({len(data)} bytes)")
        magic, version, reserved, sig_len, up_len = _SIGNED_HEADER.unpack_from(data)
        if magic != SIGNED_MAGIC or version != SIGNED_VERSION or reserved != 0:
            raise MessageRejected(f"signed CKKS upload: bad magic/version/reserved ({magic!r}, {version}, {reserved})")
        if sig_len != SIGNATURE_BYTES:
            raise MessageRejected(f"signed CKKS upload: signature length {sig_len}, expected {SIGNATURE_BYTES}")
        want = _SIGNED_HEADER.size + up_len + sig_len
        if len(data) < want:
            raise MessageRejected(f"signed CKKS upload: truncated ({len(data)} bytes, the header announces {want})")
        if len(data) > want:
            raise MessageRejected(f"signed CKKS upload: {len(data) - want} trailing bytes")
        start = _SIGNED_HEADER.size
        return cls(data[start : start + up_len], data[start + up_len :])

    def __repr__(self) -> str:
        digest = hashlib.sha256(self.upload).hexdigest()[:16]
        return f"SignedUpload(upload={len(self.upload)} bytes sha256={digest}..., signature=64 bytes)"


def sign_upload(identity: Identity, upload: bytes) -> bytes:
    """Client: sign its UPLOAD message (from :func:`encrypt_update`); returns the :class:`SignedUpload` bytes.

    The signature covers :func:`upload_transcript` with the run id and round read from the upload's own header
    and the identity's node id as sender. An upload whose header names another sender is refused
    (ProtocolError): a client signs only its own uploads.
    """
    upload = bytes(upload)
    run_id, round_number, sender, _, _, _ = _read_header(upload, CkksKind.UPLOAD)
    if sender != identity.node_id:
        raise ProtocolError(f"node {identity.node_id} was asked to sign a CKKS UPLOAD from sender {sender}")
    signature = identity.sign(upload_transcript(run_id, round_number, identity.node_id, upload))
    return SignedUpload(upload, signature).to_bytes()


# ------------------------------------------------------------------------------------------------- decryption


@dataclass(frozen=True)
class CkksAggregate:
    """Decrypted aggregate: weighted mean (shape (d,)), total weight, client count and error bound.

    ``error_bound`` bounds |mean - exact weighted mean| per coordinate: rigorous for packed mode (quantization
    only); for float mode the CKKS part is a heuristic (n * 2**(16 - scale_bits) / W: twice the measured noise
    per fresh ciphertext) plus ``rounding_step / 2``. ``rounding_step`` is the grid every coordinate of
    ``mean`` lies on (float mode from :func:`decrypt_verified`: a power of two; packed mode: 1 / (s * W), the
    quantization grid). ``flooding_std`` is the std
    of the Gaussian noise added before rounding (0.0: none), which ``error_bound`` does not include.
    ``senders`` are the nodes whose verified uploads were summed.
    """

    mean: np.ndarray
    total_weight: int
    n_clients: int
    error_bound: float
    rounding_step: float = 0.0
    flooding_std: float = 0.0
    senders: tuple[int, ...] = ()


def _float_rounding_step(noise_bound: float) -> float:
    """The smallest power of two >= 2**ROUNDING_MARGIN_BITS * noise_bound."""
    target = 2.0**ROUNDING_MARGIN_BITS * noise_bound
    exponent = math.ceil(math.log2(target))
    while 2.0**exponent < target:  # guard against log2 rounding down at an exact power of two
        exponent += 1
    return 2.0**exponent


def _gaussian(size: int) -> np.ndarray:
    """``size`` standard normal draws (Box-Muller) from an AES-CTR stream under a fresh OS-random seed."""
    u = uniform_floats(fresh_seed(), b"ckks-noise-flooding", 2 * size)  # (2 size,) in [0, 1)
    radius = np.sqrt(-2.0 * np.log1p(-u[:size]))  # 1 - u in (0, 1], so the log is finite
    return radius * np.cos(2.0 * math.pi * u[size:])  # (size,)


def _decrypt_sum(
    context: ts.Context,
    config: CkksConfig,
    vectors: Sequence[ts.CKKSVector],
    d: int,
    *,
    expected_clients: int,
    flooding_std: float = 0.0,
) -> CkksAggregate:
    """Decrypt summed ciphertexts and decode the weighted mean (module doc); private on purpose.

    The count slot must decrypt to ``expected_clients`` = n (|slot - n| < 1/4) and the weight slot to an integer in
    [n, n * max_weight]; float-mode means are rounded to the grid of :func:`_float_rounding_step`.
    """
    if not context.is_private():
        raise CkksError("decryption needs the client context with the secret key")

    def open_chunk(vector: ts.CKKSVector) -> np.ndarray:
        return np.asarray(vector.decrypt(), dtype=np.float64)

    with ThreadPoolExecutor(max_workers=config.n_threads) as pool:
        slots = np.concatenate(list(pool.map(open_chunk, vectors)))  # (S,)
    n_data = _n_data_slots(d, config)
    if slots.size != n_data + 2:
        raise MessageRejected(f"CKKS sum decrypts to {slots.size} slots, expected {n_data + 2}")
    weight_slot, count_slot = float(slots[n_data]), float(slots[n_data + 1])
    total_weight, n_clients = round(weight_slot), round(count_slot)
    if abs(count_slot - expected_clients) >= 0.25:
        raise CkksError(
            f"decrypted client count {count_slot:.3f} differs from the {expected_clients} uploads summed "
            "(an upload is scaled or a combination of uploads)"
        )
    if abs(weight_slot - total_weight) >= 0.25 or not (
        expected_clients <= total_weight <= expected_clients * config.max_weight
    ):
        raise CkksError(
            f"decrypted total weight {weight_slot:.3f} is not an integer in [{expected_clients}, "
            f"{expected_clients * config.max_weight}] (n = {expected_clients}, max_weight = {config.max_weight})"
        )
    if config.pack == 1:
        raw_mean = slots[:d] / total_weight  # (d,)
        noise_bound = n_clients * 2.0 ** (16 - config.scale_bits) / total_weight
        step = _float_rounding_step(noise_bound)
        peak = float(np.max(np.abs(raw_mean), initial=0.0))
        if peak > config.clip_range + step:
            raise CkksError(
                f"decrypted mean reaches {peak:.4g}, beyond clip_range={config.clip_range}: an upload was not "
                "encoded by encrypt_update"
            )
        if flooding_std > 0:
            if flooding_std < step:
                warnings.warn(
                    f"flooding_std={flooding_std:.3g} is below the rounding step {step:.3g}: rounding removes most "
                    "of the flooding noise, so it adds little protection",
                    RuntimeWarning,
                    stacklevel=3,
                )
            raw_mean = raw_mean + flooding_std * _gaussian(d)
        mean = np.rint(raw_mean / step) * step  # (d,) exact multiples of a power of two
        return CkksAggregate(mean, total_weight, n_clients, noise_bound + step / 2, step, flooding_std)
    rounded = np.rint(slots[:n_data])
    residual = float(np.max(np.abs(slots[:n_data] - rounded))) if n_data else 0.0
    if residual >= 0.25:
        raise CkksError(f"CKKS noise {residual:.3g} is too large to unpack integers exactly; raise packed_scale_bits")
    ints = rounded.astype(np.int64)  # (S-2,)
    mask = (1 << config.lane_bits) - 1
    shifts = np.arange(config.pack, dtype=np.int64) * config.lane_bits
    lanes = ((ints[:, None] >> shifts) & mask).reshape(-1)[:d]  # (d,)
    sums = lanes - n_clients * config.lane_half_range()
    s = config.quantization_scale()
    mean = sums.astype(np.float64) / (s * total_weight)
    bound = n_clients / (s * total_weight)
    return CkksAggregate(mean, total_weight, n_clients, bound, 1.0 / (s * total_weight))


def verify_signed_upload(roster: Roster, data: bytes, *, run_id: bytes, round_number: int, node: int) -> bytes:
    """The UPLOAD inside a signed envelope filed under ``node``, once its signature verifies under the **roster**
    key of ``node`` over :func:`upload_transcript` for this run and round (SignatureInvalid otherwise; a malformed
    envelope is MessageRejected). Clients call it from :func:`decrypt_verified`; an honest server calls it to drop
    what clients would refuse."""
    if node not in roster:
        raise SignatureInvalid(f"CKKS upload keyed by node {node!r}, which is not in the provisioned roster")
    try:
        signed = SignedUpload.from_bytes(data)
    except MessageRejected as err:
        raise MessageRejected(f"signed upload keyed by node {node}: {err}") from err
    roster.verify(node, upload_transcript(run_id, round_number, node, signed.upload), signed.signature)
    return signed.upload


def decrypt_verified(
    context: ts.Context,
    config: CkksConfig,
    signed_uploads: Mapping[int, bytes],
    roster: Roster,
    *,
    run_id: bytes,
    round_number: int,
    key_id: bytes,
    threshold: int,
    flooding_std: float = 0.0,
) -> CkksAggregate:
    """Client: verify the signed uploads of a round, recompute their homomorphic sum and decrypt only that.

    Protocol step (the module's only decryption), for
    ``signed_uploads`` = {node u: envelope} as forwarded by the server:

    1. |U| >= ``threshold`` (>= 2) distinct senders, else ThresholdNotMet; |U| <= max_clients.
    2. For each u: the envelope parses (:meth:`SignedUpload.from_bytes`); the signature verifies under the
       **roster** key of u over ``upload_transcript(run_id, round_number, u, upload)``, else SignatureInvalid;
       the upload is bound to this run, round and key set and names u as sender, else MessageRejected.
    3. c = sum_u Enc(slots_u) computed here, with this client's context; nothing the server computed is
       decrypted.
    4. Dec(c) is decoded; the count slot must be |U| and the weight slot an integer W in [|U|, |U| max_weight]
       (a scaled or combined upload signed by a client fails here), else CkksError. Float mode: the mean must
       lie within clip_range (+ one grid step), optional N(0, flooding_std**2) noise is added per coordinate,
       and the mean is rounded to the grid ``rounding_step`` = the smallest power of two >= 2**10 * B, with
       B = n 2**(16 - scale_bits) / W the CKKS noise bound (``CkksAggregate.error_bound`` = B + step / 2).

    Threat model: the server is key-less and may be actively malicious; the roster is provisioned out of band
    and never comes from the server; clients are honest (a client holds the shared key and can decrypt any
    upload itself). What this buys: the server cannot have a single upload, a scaled upload or a combination
    it made decrypted by a client. What it does not: the server may still pick *which* >= threshold uploads to
    forward, so two overlapping subsets shown to different clients (or rounds) differ by one client's update;
    anything derived from the decryption that reaches the server (e.g. evaluation metrics) can leak that
    difference. Rounding is a mitigation of IND-CPA-D key recovery (Li & Micciancio, EUROCRYPT 2021): it
    removes the noise from every coordinate whose value is not within the error bound of a grid midpoint, it is
    not noise flooding and gives no proof. Noise flooding with a std well above the worst-case decryption noise,
    sized for statistical security (Li & Micciancio 2021; Li, Micciancio, Schultz & Sorrell, CRYPTO 2022), is
    the proven fix: ``flooding_std`` > 0 adds Gaussian noise of that std (Box-Muller over an AES-CTR stream with
    a fresh OS seed; a floating-point sampler) before rounding. It is off by default and this function does not
    choose a secure std; a std below ``rounding_step`` is mostly rounded away (RuntimeWarning).
    """
    if not context.is_private():
        raise CkksError("decrypt_verified needs the client context with the secret key")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 2 <= threshold <= config.max_clients:
        raise ConfigError(
            f"threshold must be an int in [2, max_clients={config.max_clients}] (1 would decrypt a single upload), "
            f"got {threshold!r}"
        )
    if not (math.isfinite(flooding_std) and flooding_std >= 0):
        raise ConfigError(f"flooding_std must be finite and >= 0, got {flooding_std!r}")
    if flooding_std > 0 and config.pack != 1:
        raise ConfigError(
            f"flooding_std={flooding_std!r} with pack={config.pack}: packed mode decodes exact integers, which "
            "carry no CKKS noise to flood"
        )
    if len(signed_uploads) < threshold:
        raise ThresholdNotMet(
            f"CKKS round {round_number}: {len(signed_uploads)} signed uploads, the threshold is {threshold}"
        )
    if len(signed_uploads) > config.max_clients:
        raise CkksError(f"{len(signed_uploads)} uploads exceed max_clients={config.max_clients} (overflow headroom)")
    uploads = {
        node: verify_signed_upload(roster, signed_uploads[node], run_id=run_id, round_number=round_number, node=node)
        for node in sorted(signed_uploads)
    }
    parsed, d = _parse_uploads(context, config, uploads, run_id=run_id, round_number=round_number, key_id=key_id)
    vectors = _sum_ciphertexts(context, config, parsed)
    result = _decrypt_sum(context, config, vectors, d, expected_clients=len(parsed), flooding_std=flooding_std)
    return CkksAggregate(
        result.mean,
        result.total_weight,
        result.n_clients,
        result.error_bound,
        result.rounding_step,
        result.flooding_std,
        tuple(sorted(parsed)),
    )


def bytes_per_parameter(message: bytes, d: int) -> float:
    """Size of an UPLOAD/AGGREGATE message per model parameter."""
    if d <= 0:
        raise ConfigError(f"d must be > 0, got {d}")
    return len(message) / d


def expected_error_fraction_of_noise(error_bound: float, noise_std: float) -> float:
    """Ratio of an aggregate's error bound to the DP noise std per coordinate (target: < 0.01)."""
    if not (math.isfinite(noise_std) and noise_std > 0):
        raise ConfigError(f"noise_std must be finite and > 0, got {noise_std!r}")
    return error_bound / noise_std
