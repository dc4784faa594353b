"""A masking client's round state between stages, as a versioned binary record on :class:`secagg.wire.Reader`.

Flower may run each message in a new ClientApp process, so the per-round protocol state (round X25519 keys, the
self-mask seed, held shares, the pending delta) is kept in the node's ``context.state`` (the SuperNode's memory,
never written to disk by fedmpt) between stages. No pickle: every field has a fixed layout, counts are checked
against the bytes and trailing bytes are refused.

Layout (little-endian): ``FMCS`` u8 version, u8 stage, run id 16, u64 round, u64 d, u64 weight, graph seed 32,
model digest 32, setup digest 32, c_sk 32, s_sk 32, u8 has-seed + b_u 32, counted lists (u32 n) of participants
(u64), neighbours (u64), key bundles (u64 id + 128), held shares (u64 id + 2 shares), receive keys (u64 id + 32),
replay-guard entries (u32 kind + u64 sender), u8 has-signed + counted signed survivors (u64), the delta (u64 d +
d float64).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import numpy as np
from numpy.typing import NDArray

from fedmpt.errors import SecureAggregationError
from secagg import masking, wire
from secagg.config import MaskingConfig
from secagg.errors import MessageRejected
from secagg.keys import Identity, Roster, RoundKeyPair, x25519_from_private_bytes, x25519_private_bytes
from secagg.shamir import decode_share, encode_share

_MAGIC = b"FMCS"
_VERSION = 2
_STAGES = list(masking.ClientStage)


def _ids(values: Iterable[int]) -> bytes:
    ordered = sorted(values)
    return struct.pack("<I", len(ordered)) + b"".join(struct.pack("<Q", v) for v in ordered)


def pack_client_state(state: masking.ClientState, delta: NDArray[np.float64], weight: int) -> bytes:
    """Versioned binary form of a client's round state and its pending update (layout in the module doc)."""
    if state.c_keys is None or state.s_keys is None:
        raise SecureAggregationError(f"node {state.node_id}: no round keys to store before advertise_keys")
    parts = [
        _MAGIC,
        struct.pack("<BB", _VERSION, _STAGES.index(state.stage)),
        state.run_id,
        struct.pack("<QQQ", state.round_number, state.vector_length, weight),
        state.graph_seed,
        state.model_digest,
        state.setup,
        x25519_private_bytes(state.c_keys.private),
        x25519_private_bytes(state.s_keys.private),
        struct.pack("<B", 1 if state.self_mask_seed else 0),
        state.self_mask_seed or bytes(wire.SECRET_BYTES),
        _ids(state.participants),
        _ids(state.neighbours),
        struct.pack("<I", len(state.peer_bundles)),
        *(struct.pack("<Q", v) + wire.encode_key_bundle(b) for v, b in sorted(state.peer_bundles.items())),
        struct.pack("<I", len(state.held_shares)),
        *(struct.pack("<Q", v) + encode_share(a) + encode_share(b) for v, (a, b) in sorted(state.held_shares.items())),
        struct.pack("<I", len(state.receive_keys)),
        *(struct.pack("<Q", v) + k for v, k in sorted(state.receive_keys.items())),
        struct.pack("<I", len(state.guard.seen)),
        *(struct.pack("<IQ", kind, sender) for kind, sender in sorted(state.guard.seen)),
        struct.pack("<B", 0 if state.signed_survivors is None else 1),
        _ids(state.signed_survivors or ()),
    ]
    vector = np.ascontiguousarray(delta, dtype="<f8")
    parts.append(struct.pack("<Q", vector.size) + vector.tobytes())
    return b"".join(parts)


def unpack_client_state(
    data: bytes, config: MaskingConfig, identity: Identity, roster: Roster
) -> tuple[masking.ClientState, NDArray[np.float64], int]:
    """Inverse of :func:`pack_client_state`: (state, delta, weight). Raises SecureAggregationError on bad bytes."""
    try:
        return _unpack(wire.Reader(bytes(data), "stored secure-aggregation state"), config, identity, roster)
    except MessageRejected as err:
        raise SecureAggregationError(str(err)) from None


def _unpack(
    r: wire.Reader, config: MaskingConfig, identity: Identity, roster: Roster
) -> tuple[masking.ClientState, NDArray[np.float64], int]:
    if r.take(4) != _MAGIC:
        raise SecureAggregationError("stored secure-aggregation state has a bad magic")
    version, stage_index = r.u8(), r.u8()
    if version != _VERSION or stage_index >= len(_STAGES):
        raise SecureAggregationError(f"stored secure-aggregation state: version {version}, stage {stage_index}")
    run_id = r.take(16)
    round_number, vector_length, weight = r.u64(), r.u64(), r.u64()
    graph_seed, model, setup = r.take(32), r.take(32), r.take(32)
    state = masking.ClientState.create(
        config, identity, roster, run_id=run_id, graph_seed=graph_seed, model_digest=model, last_round=round_number
    )
    state.stage = _STAGES[stage_index]
    state.run_id, state.round_number, state.vector_length, state.setup = run_id, round_number, vector_length, setup
    state.c_keys = RoundKeyPair(x25519_from_private_bytes(r.take(32)))
    state.s_keys = RoundKeyPair(x25519_from_private_bytes(r.take(32)))
    has_seed = r.u8()
    seed = r.take(wire.SECRET_BYTES)
    state.self_mask_seed = seed if has_seed else b""
    state.participants = tuple(r.u64() for _ in range(r.u32()))
    state.neighbours = frozenset(r.u64() for _ in range(r.u32()))
    for _ in range(r.u32()):
        v = r.u64()
        state.peer_bundles[v] = wire.decode_key_bundle(r.take(wire.KEY_BUNDLE_BYTES))
    for _ in range(r.u32()):
        v = r.u64()
        state.held_shares[v] = (
            decode_share(r.take(wire.SHARE_BYTES), wire.SECRET_BYTES),
            decode_share(r.take(wire.SHARE_BYTES), wire.SECRET_BYTES),
        )
    for _ in range(r.u32()):
        v = r.u64()
        state.receive_keys[v] = r.take(32)
    for _ in range(r.u32()):
        kind, sender = r.u32(), r.u64()
        state.guard.seen.add((kind, sender))
    has_signed = r.u8()
    signed = tuple(r.u64() for _ in range(r.u32()))
    state.signed_survivors = signed if has_signed else None
    d = r.u64()
    delta = np.frombuffer(r.take(8 * d), dtype="<f8").astype(np.float64)
    r.done()
    return state, delta, weight
