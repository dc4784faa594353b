"""Versioned byte layouts of every masking-protocol message (no pickle), and their strict parsers.

Every message is an envelope (all integers little-endian)::

    offset  size  field
    0       4     magic b"FMSA"
    4       1     version (1)
    5       1     kind (:class:`Kind`: the stage and direction)
    6       2     reserved, must be 0
    8       16    run id
    24      8     round (u64)
    32      8     sender node id (u64; the server is 2**64-1)
    40      8     recipient node id (u64)
    48      4     payload length (u32)
    52      ...   payload (layout per kind, below)

:func:`unpack` rejects a wrong magic, version, kind, run id, round, sender or recipient, a truncated message
and trailing bytes; :class:`ReplayGuard` rejects a second message of the same kind from the same sender
within one round (an earlier round's message fails the round check). Payload parsers check every count
against the bytes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

import numpy as np

from secagg.errors import MessageRejected
from secagg.keys import PUBLIC_KEY_BYTES, RUN_ID_BYTES, SERVER_ID, SIGNATURE_BYTES
from secagg.shamir import share_size

MAGIC = b"FMSA"
VERSION = 1
_HEADER = struct.Struct("<4sBBH16sQQQI")
HEADER_BYTES = _HEADER.size  # 52

FLAG_CONSISTENCY_CHECK = 0x01
SECRET_BYTES = 32
SHARE_BYTES = share_size(SECRET_BYTES)  # 8 + 66
#: Plaintext of one encrypted share bundle: u64 sender || u64 recipient || share(b_u) || share(s_sk_u).
SHARE_PLAINTEXT_BYTES = 16 + 2 * SHARE_BYTES
AEAD_TAG_BYTES = 16
SHARE_CIPHERTEXT_BYTES = SHARE_PLAINTEXT_BYTES + AEAD_TAG_BYTES
KEY_BUNDLE_BYTES = 2 * PUBLIC_KEY_BYTES + SIGNATURE_BYTES


class Kind(enum.IntEnum):
    """Message kind: the stage it belongs to and its direction (odd: server->client, even: client->server)."""

    ADVERTISE_REQUEST = 1
    ADVERTISE_KEYS = 2
    SHARE_KEYS_REQUEST = 3
    SHARE_KEYS = 4
    MASKED_INPUT_REQUEST = 5
    MASKED_INPUT = 6
    UNMASK_REQUEST = 7
    UNMASK = 8
    CONSISTENCY_REQUEST = 9
    CONSISTENCY_SIGNATURE = 10


class RevealKind(enum.IntEnum):
    """What an unmask share reveals: the self-mask seed b_v of a survivor or the mask secret s_sk_v of a
    dropout."""

    SELF_MASK_SEED = 1
    MASK_SECRET_KEY = 2


@dataclass(frozen=True)
class Envelope:
    """A parsed message header and its raw payload."""

    kind: Kind
    run_id: bytes
    round_number: int
    sender: int
    recipient: int
    payload: bytes = field(repr=False)


def pack(kind: Kind, run_id: bytes, round_number: int, sender: int, recipient: int, payload: bytes) -> bytes:
    """Serialize one message (header + payload)."""
    if len(run_id) != RUN_ID_BYTES:
        raise MessageRejected(f"run id must be {RUN_ID_BYTES} bytes, got {len(run_id)}")
    header = _HEADER.pack(MAGIC, VERSION, int(kind), 0, run_id, round_number, sender, recipient, len(payload))
    return header + payload


def unpack(
    data: bytes,
    *,
    kind: Kind,
    run_id: bytes | None,
    round_number: int | None,
    recipient: int,
    sender: int | None = None,
) -> Envelope:
    """Parse and check one message against the expected kind, run id, round, recipient and (if given) sender.

    ``run_id``/``round_number`` may be None only for the first message of a round (ADVERTISE_REQUEST), which
    establishes the binding every later message is checked against.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MessageRejected(f"{kind.name}: message must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < HEADER_BYTES:
        raise MessageRejected(f"{kind.name}: truncated header ({len(data)} < {HEADER_BYTES} bytes)")
    magic, version, got_kind, reserved, got_run, got_round, got_sender, got_recipient, length = _HEADER.unpack_from(
        data
    )
    if magic != MAGIC:
        raise MessageRejected(f"{kind.name}: bad magic {magic!r}")
    if version != VERSION:
        raise MessageRejected(f"{kind.name}: unsupported wire version {version} (this code speaks {VERSION})")
    if got_kind != int(kind):
        name = Kind(got_kind).name if got_kind in Kind._value2member_map_ else str(got_kind)
        raise MessageRejected(f"expected a {kind.name} message, got kind {name}")
    if reserved != 0:
        raise MessageRejected(f"{kind.name}: reserved header field is {reserved}, must be 0")
    if run_id is not None and got_run != run_id:
        raise MessageRejected(f"{kind.name}: message is bound to run {got_run.hex()}, this is run {run_id.hex()}")
    if round_number is not None and got_round != round_number:
        raise MessageRejected(f"{kind.name}: message is bound to round {got_round}, this is round {round_number}")
    if got_recipient != recipient:
        raise MessageRejected(f"{kind.name}: message is addressed to {got_recipient}, not {recipient}")
    if sender is not None and got_sender != sender:
        raise MessageRejected(f"{kind.name}: message claims sender {got_sender} but arrived from {sender}")
    if len(data) != HEADER_BYTES + length:
        what = "truncated" if len(data) < HEADER_BYTES + length else "has trailing bytes"
        raise MessageRejected(
            f"{kind.name} from {got_sender}: {what} (header says {length} payload bytes, got "
            f"{len(data) - HEADER_BYTES})"
        )
    return Envelope(kind, got_run, got_round, got_sender, got_recipient, data[HEADER_BYTES:])


@dataclass
class ReplayGuard:
    """Remembers (kind, sender) pairs accepted in this round; a second message of the pair is a replay."""

    seen: set[tuple[int, int]] = field(default_factory=set)

    def accept(self, envelope: Envelope) -> None:
        """Record ``envelope`` or raise MessageRejected if its (kind, sender) was already accepted."""
        key = (int(envelope.kind), envelope.sender)
        if key in self.seen:
            raise MessageRejected(f"replayed {envelope.kind.name} message from {envelope.sender}")
        self.seen.add(key)


class Reader:
    """Cursor over a payload that raises MessageRejected on any overrun and on leftover bytes."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise MessageRejected(f"{self.what}: payload truncated at byte {self.pos} (needs {n} more)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return int(self.take(1)[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0])

    def count(self, entry_bytes: int) -> int:
        n = self.u32()
        if n * entry_bytes != len(self.data) - self.pos:
            raise MessageRejected(
                f"{self.what}: count {n} x {entry_bytes} bytes does not match the "
                f"{len(self.data) - self.pos} remaining payload bytes"
            )
        return n

    def done(self) -> None:
        if self.pos != len(self.data):
            raise MessageRejected(f"{self.what}: {len(self.data) - self.pos} trailing payload bytes")


def _unique(ids: list[int], what: str) -> None:
    if len(set(ids)) != len(ids):
        raise MessageRejected(f"{what}: a node id appears twice")


# ---- ADVERTISE_REQUEST: u32 n || 32B graph seed || u64 d || u32 t || u32 k (0 = complete) || u8 bits ||
# u64 ids*n


@dataclass(frozen=True)
class AdvertiseRequest:
    """Round setup the server sends: participants, SecAgg+ graph seed, vector length and the protocol
    parameters."""

    participants: tuple[int, ...]
    graph_seed: bytes
    vector_length: int
    threshold: int
    neighbourhood_size: int
    modulus_bits: int
    consistency_check: bool = False


def encode_advertise_request(req: AdvertiseRequest) -> bytes:
    head = struct.pack("<I", len(req.participants)) + req.graph_seed
    head += struct.pack("<QIIB", req.vector_length, req.threshold, req.neighbourhood_size, req.modulus_bits)
    head += struct.pack("<B", FLAG_CONSISTENCY_CHECK if req.consistency_check else 0)
    return head + b"".join(struct.pack("<Q", p) for p in req.participants)


def decode_advertise_request(payload: bytes) -> AdvertiseRequest:
    r = Reader(payload, "ADVERTISE_REQUEST")
    n = r.u32()
    seed = r.take(32)
    d, t, k = r.u64(), r.u32(), r.u32()
    bits, flags = r.u8(), r.u8()
    if flags & ~FLAG_CONSISTENCY_CHECK:
        raise MessageRejected(f"ADVERTISE_REQUEST: unknown flags {flags:#04x}")
    ids = [r.u64() for _ in range(n)]
    r.done()
    _unique(ids, "ADVERTISE_REQUEST participants")
    if SERVER_ID in ids:
        raise MessageRejected("ADVERTISE_REQUEST: the server id is listed as a participant")
    return AdvertiseRequest(tuple(ids), seed, d, t, k, bits, bool(flags & FLAG_CONSISTENCY_CHECK))


# ---- ADVERTISE_KEYS: c_pk 32B || s_pk 32B || Ed25519 signature 64B


@dataclass(frozen=True)
class KeyBundle:
    """A client's signed round keys."""

    c_public: bytes
    s_public: bytes
    signature: bytes


def encode_key_bundle(b: KeyBundle) -> bytes:
    return b.c_public + b.s_public + b.signature


def decode_key_bundle(payload: bytes) -> KeyBundle:
    if len(payload) != KEY_BUNDLE_BYTES:
        raise MessageRejected(f"ADVERTISE_KEYS: payload must be {KEY_BUNDLE_BYTES} bytes, got {len(payload)}")
    return KeyBundle(payload[:32], payload[32:64], payload[64:])


# ---- SHARE_KEYS_REQUEST: u32 n || (u64 node id || key bundle 128B)*n


def encode_share_keys_request(bundles: dict[int, KeyBundle]) -> bytes:
    parts = [struct.pack("<I", len(bundles))]
    parts += [struct.pack("<Q", nid) + encode_key_bundle(bundles[nid]) for nid in sorted(bundles)]
    return b"".join(parts)


def decode_share_keys_request(payload: bytes) -> dict[int, KeyBundle]:
    r = Reader(payload, "SHARE_KEYS_REQUEST")
    n = r.count(8 + KEY_BUNDLE_BYTES)
    out: dict[int, KeyBundle] = {}
    for _ in range(n):
        nid = r.u64()
        if nid in out:
            raise MessageRejected(f"SHARE_KEYS_REQUEST: node {nid} appears twice")
        out[nid] = decode_key_bundle(r.take(KEY_BUNDLE_BYTES))
    r.done()
    return out


# ---- SHARE_KEYS (client->server): u32 n || (u64 recipient || AEAD ciphertext)*n
# ---- MASKED_INPUT_REQUEST (server->client): u32 n || (u64 original sender || AEAD ciphertext)*n


def encode_ciphertexts(items: dict[int, bytes]) -> bytes:
    parts = [struct.pack("<I", len(items))]
    for nid in sorted(items):
        if len(items[nid]) != SHARE_CIPHERTEXT_BYTES:
            raise MessageRejected(f"share ciphertext for {nid} must be {SHARE_CIPHERTEXT_BYTES} bytes")
        parts.append(struct.pack("<Q", nid) + items[nid])
    return b"".join(parts)


def decode_ciphertexts(payload: bytes, what: str) -> dict[int, bytes]:
    r = Reader(payload, what)
    n = r.count(8 + SHARE_CIPHERTEXT_BYTES)
    out: dict[int, bytes] = {}
    for _ in range(n):
        nid = r.u64()
        if nid in out:
            raise MessageRejected(f"{what}: node {nid} appears twice")
        out[nid] = r.take(SHARE_CIPHERTEXT_BYTES)
    r.done()
    return out


# ---- MASKED_INPUT: u64 length || u8 modulus bits || words little-endian (4 or 8 bytes each)


def encode_masked_input(words: np.ndarray, modulus_bits: int) -> bytes:
    dtype = "<u4" if modulus_bits == 32 else "<u8"
    return struct.pack("<QB", words.size, modulus_bits) + np.ascontiguousarray(words, dtype=dtype).tobytes()


def decode_masked_input(payload: bytes, length: int, modulus_bits: int) -> np.ndarray:
    if len(payload) < 9:
        raise MessageRejected("MASKED_INPUT: payload truncated")
    got_length, got_bits = struct.unpack_from("<QB", payload)
    if got_bits != modulus_bits:
        raise MessageRejected(f"MASKED_INPUT: modulus bits {got_bits}, expected {modulus_bits}")
    if got_length != length:
        raise MessageRejected(f"MASKED_INPUT: vector length {got_length}, expected {length}")
    width = modulus_bits // 8
    if len(payload) != 9 + length * width:
        raise MessageRejected(
            f"MASKED_INPUT: {len(payload) - 9} vector bytes, expected {length * width} for {length} words"
        )
    dtype = np.dtype("<u4" if modulus_bits == 32 else "<u8")
    words = np.frombuffer(payload, dtype=dtype, offset=9)  # read-only view of the payload, shape (length,)
    return words if dtype.isnative else words.astype(dtype.newbyteorder("="))


# ---- CONSISTENCY_REQUEST: u32 n || survivor ids u64*n
# ---- CONSISTENCY_SIGNATURE: Ed25519 signature 64B over keys.consistency_transcript(survivors)
# ---- UNMASK_REQUEST: u32 n || survivor ids u64*n || u32 m || (u64 signer || signature 64B)*m  (m = 0 without
#      the consistency check)


def encode_survivors(survivors: tuple[int, ...]) -> bytes:
    return struct.pack("<I", len(survivors)) + b"".join(struct.pack("<Q", s) for s in survivors)


def decode_survivors(payload: bytes, what: str) -> tuple[int, ...]:
    r = Reader(payload, what)
    n = r.count(8)
    ids = [r.u64() for _ in range(n)]
    r.done()
    _unique(ids, f"{what} survivors")
    return tuple(ids)


def decode_signature(payload: bytes, what: str) -> bytes:
    if len(payload) != SIGNATURE_BYTES:
        raise MessageRejected(f"{what}: payload must be a {SIGNATURE_BYTES}-byte signature, got {len(payload)}")
    return payload


def encode_unmask_request(survivors: tuple[int, ...], signatures: dict[int, bytes] | None = None) -> bytes:
    sigs = signatures or {}
    head = encode_survivors(survivors) + struct.pack("<I", len(sigs))
    return head + b"".join(struct.pack("<Q", s) + sigs[s] for s in sorted(sigs))


def decode_unmask_request(payload: bytes) -> tuple[tuple[int, ...], dict[int, bytes]]:
    """(survivors, {signer: signature over the survivor list})."""
    r = Reader(payload, "UNMASK_REQUEST")
    n = r.u32()
    ids = [r.u64() for _ in range(n)]
    _unique(ids, "UNMASK_REQUEST survivors")
    m = r.count(8 + SIGNATURE_BYTES)
    sigs: dict[int, bytes] = {}
    for _ in range(m):
        signer = r.u64()
        if signer in sigs:
            raise MessageRejected(f"UNMASK_REQUEST: two signatures from node {signer}")
        sigs[signer] = r.take(SIGNATURE_BYTES)
    r.done()
    return tuple(ids), sigs


# ---- UNMASK: u32 n || (u64 owner node id || u8 RevealKind || Shamir share 74B)*n


def encode_unmask(entries: list[tuple[int, RevealKind, bytes]]) -> bytes:
    parts = [struct.pack("<I", len(entries))]
    parts += [struct.pack("<QB", owner, int(kind)) + share for owner, kind, share in entries]
    return b"".join(parts)


def decode_unmask(payload: bytes) -> list[tuple[int, RevealKind, bytes]]:
    r = Reader(payload, "UNMASK")
    n = r.count(9 + SHARE_BYTES)
    out: list[tuple[int, RevealKind, bytes]] = []
    owners: set[int] = set()
    for _ in range(n):
        owner, kind = r.u64(), r.u8()
        if kind not in RevealKind._value2member_map_:
            raise MessageRejected(f"UNMASK: unknown reveal kind {kind} for node {owner}")
        if owner in owners:
            raise MessageRejected(f"UNMASK: two shares for node {owner} in one message")
        owners.add(owner)
        out.append((owner, RevealKind(kind), r.take(SHARE_BYTES)))
    r.done()
    return out
