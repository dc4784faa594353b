"""CKKS aggregation with TenSEAL: clients encrypt, the server adds ciphertexts it cannot open, clients
decrypt.

Trust model (NVIDIA FLARE's HE-FedAvg pattern): one CKKS secret key is created at provisioning and shared by
every client; the server holds a context with **no secret key** (:func:`load_server_context` refuses one). So
the server alone learns nothing, but the server colluding with any single client decrypts every upload; and a
decrypted aggregate must never go back to a key-less party, because CKKS decryptions leak the key (IND-CPA-D,
Li & Micciancio, EUROCRYPT 2021). Parameters default to N = 8192 with the chain (60, 60): one 60-bit
ciphertext prime plus SEAL's special prime, 120 bits in total, within the 128-bit bound of 218 bits that
SEAL enforces.

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
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import math
import os
import struct
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts

from fedmpt.errors import ConfigError
from secagg.config import CkksConfig
from secagg.errors import CkksError, MessageRejected
from secagg.keys import RUN_ID_BYTES, SERVER_ID
from secagg.prg import fresh_seed, uniform_floats

logger = logging.getLogger(__name__)

MAGIC = b"FMCK"
VERSION = 1
_HEADER = struct.Struct("<4sBBH16sQQQ8sI")
HEADER_BYTES = _HEADER.size
CLIENT_CONTEXT_FILE = "client_context.tenseal"
SERVER_CONTEXT_FILE = "server_context.tenseal"
CONFIG_FILE = "ckks_config.json"


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


def _unpack_message(
    data: bytes, kind: CkksKind, run_id: bytes, round_number: int, fingerprint: bytes, config: CkksConfig
) -> _Parsed:
    data = bytes(data)
    if len(data) < HEADER_BYTES:
        raise MessageRejected(f"CKKS {kind.name}: truncated header ({len(data)} bytes)")
    magic, version, got_kind, reserved, got_run, got_round, sender, d, got_fp, count = _HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION or reserved != 0:
        raise MessageRejected(f"CKKS {kind.name}: bad magic/version/reserved ({magic!r}, {version}, {reserved})")
    if got_kind != int(kind):
        raise MessageRejected(f"CKKS: expected a {kind.name} message, got kind {got_kind}")
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


def aggregate(
    server_context: ts.Context,
    config: CkksConfig,
    uploads: Mapping[int, bytes],
    *,
    run_id: bytes,
    round_number: int,
    key_id: bytes,
) -> bytes:
    """Server: add the uploads' ciphertexts slot-wise; returns the AGGREGATE message for the clients.

    Every upload must be bound to this run and round, come from the node it is keyed by, be encrypted under
    this key set and have the same d; otherwise MessageRejected. The server context must hold no secret key.
    """
    if server_context.is_private():
        raise CkksError("aggregate() was given a context with a secret key; the server must not hold one")
    if not uploads:
        raise CkksError("no uploads to aggregate")
    if len(uploads) > config.max_clients:
        raise CkksError(f"{len(uploads)} uploads exceed max_clients={config.max_clients} (overflow headroom)")
    fingerprint = context_fingerprint(server_context, key_id)
    parsed: dict[int, _Parsed] = {}
    for node in sorted(uploads):
        p = _unpack_message(uploads[node], CkksKind.UPLOAD, run_id, round_number, fingerprint, config)
        if p.sender != node:
            raise MessageRejected(f"CKKS UPLOAD keyed by node {node} claims sender {p.sender}")
        parsed[node] = p
    dims = {p.d for p in parsed.values()}
    if len(dims) != 1:
        raise MessageRejected(f"CKKS UPLOADs disagree on the vector length: {sorted(dims)}")
    d = dims.pop()
    n_cts = len(next(iter(parsed.values())).ciphertexts)

    def add_chunk(i: int) -> bytes:
        # Ciphertext i of every upload, added; chunks are independent, so they run on parallel threads.
        acc: ts.CKKSVector | None = None
        for node, p in parsed.items():
            v = _vector_from(server_context, p.ciphertexts[i], f"UPLOAD from {node}")
            if acc is None:
                acc = v
            else:
                acc += v
        assert acc is not None
        return bytes(acc.serialize())

    with ThreadPoolExecutor(max_workers=config.n_threads) as pool:
        cts = list(pool.map(add_chunk, range(n_cts)))
    return _pack_message(CkksKind.AGGREGATE, run_id, round_number, SERVER_ID, d, fingerprint, cts)


@dataclass(frozen=True)
class CkksAggregate:
    """Decrypted aggregate: weighted mean (shape (d,)), total weight, client count and error bound.

    ``error_bound`` is rigorous for packed mode (quantization only) and a heuristic for float mode
    (n * 2**(16 - scale_bits) / W: twice the measured CKKS noise per fresh ciphertext).
    """

    mean: np.ndarray
    total_weight: int
    n_clients: int
    error_bound: float


def decrypt_aggregate(
    context: ts.Context, config: CkksConfig, data: bytes, *, run_id: bytes, round_number: int, key_id: bytes
) -> CkksAggregate:
    """Client: decrypt the AGGREGATE message and decode the weighted mean of the summed updates."""
    if not context.is_private():
        raise CkksError("decrypt_aggregate needs the client context with the secret key")
    parsed = _unpack_message(
        data, CkksKind.AGGREGATE, run_id, round_number, context_fingerprint(context, key_id), config
    )
    if parsed.sender != SERVER_ID:
        raise MessageRejected(f"CKKS AGGREGATE from {parsed.sender}, not from the server")

    def open_chunk(raw: bytes) -> np.ndarray:
        return np.asarray(_vector_from(context, raw, "AGGREGATE").decrypt(), dtype=np.float64)

    with ThreadPoolExecutor(max_workers=config.n_threads) as pool:
        slots = np.concatenate(list(pool.map(open_chunk, parsed.ciphertexts)))
    n_data = _n_data_slots(parsed.d, config)
    if slots.size != n_data + 2:
        raise MessageRejected(f"CKKS AGGREGATE decrypts to {slots.size} slots, expected {n_data + 2}")
    total_weight, n_clients = round(slots[n_data]), round(slots[n_data + 1])
    if not 1 <= n_clients <= config.max_clients or not n_clients <= total_weight <= n_clients * config.max_weight:
        raise CkksError(f"decrypted count {slots[n_data + 1]:.3f} / weight {slots[n_data]:.3f} are inconsistent")
    if config.pack == 1:
        mean = slots[: parsed.d] / total_weight
        bound = n_clients * 2.0 ** (16 - config.scale_bits) / total_weight
        return CkksAggregate(mean, total_weight, n_clients, bound)
    rounded = np.rint(slots[:n_data])
    residual = float(np.max(np.abs(slots[:n_data] - rounded))) if n_data else 0.0
    if residual >= 0.25:
        raise CkksError(f"CKKS noise {residual:.3g} is too large to unpack integers exactly; raise packed_scale_bits")
    ints = rounded.astype(np.int64)  # (S-2,)
    mask = (1 << config.lane_bits) - 1
    shifts = np.arange(config.pack, dtype=np.int64) * config.lane_bits
    lanes = ((ints[:, None] >> shifts) & mask).reshape(-1)[: parsed.d]  # (d,)
    sums = lanes - n_clients * config.lane_half_range()
    s = config.quantization_scale()
    mean = sums.astype(np.float64) / (s * total_weight)
    return CkksAggregate(mean, total_weight, n_clients, n_clients / (s * total_weight))


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
