"""Secure aggregation as Flower message stages: the server never sees an individual update in the clear.

Selected by the run config key ``secure-aggregation``:

* ``"none"`` (default): plain FedAvg (:func:`fedmpt.apps.task.aggregate`).
* ``"masking"``: double masking of Bonawitz et al. (CCS 2017), optionally on the SecAgg+ graph of Bell et al.
  (CCS 2020), implemented by :mod:`secagg.masking`. One federated round becomes four ``train`` message
  exchanges, told apart by ``secagg-stage`` in the message's config record (see :mod:`fedmpt.apps.messages`):

  ==============  ==========================================================  ==================================
  stage           client                                                      server
  ==============  ==========================================================  ==================================
  ``advertise``   trains once from the global state it received (plain        :func:`secagg.masking.
                  ``train`` handler), keeps delta = local - global and its    server_collect_advertisements`
                  example count in ``context.state``; signed X25519 keys
  ``share-keys``  Shamir shares of b_u and s_sk_u, encrypted per peer         ``server_collect_shares``
  ``masked-input``  y_u = encode(w_u * delta_u) + masks mod 2**b              ``server_collect_masked_inputs``
  ``unmask``      shares of b_v (survivors) or s_sk_v (drop-outs)             ``server_unmask`` -> weighted mean
  ==============  ==========================================================  ==================================

  The new global state is ``global + sum_u w_u delta_u / sum_u w_u``, which equals FedAvg of the local states
  (``sum_u w_u local_u / sum_u w_u``) up to the quantization error bound below. Protocol node ids are the
  clients' partition ids (the provisioned identities ``identity_<partition>.key``), not Flower node ids.

* ``"ckks"``: CKKS (TenSEAL, :mod:`secagg.ckks`). One ``train`` exchange per round (``secagg-stage`` =
  ``ckks``): the server sends the *encrypted* global state (before the first aggregation: the public initial
  state in the clear); each client decrypts it with the shared client kit, trains (plain ``train`` handler) and
  uploads Enc(w_u * local_u) with the slots [w_u, 1]; the server adds the ciphertexts with its key-less context
  (:func:`secagg.ckks.aggregate`) and keeps the sum as the new encrypted global state: decrypted it is
  ``sum_u w_u local_u / sum_u w_u``, FedAvg itself. Clients encrypt the weighted *state* rather than the delta, so
  that the encrypted aggregate is self-contained (a client that missed rounds can still decrypt the current
  model); CKKS float encoding has an absolute error ~``n * 2**(16 - scale_bits) / W`` whatever the magnitude, so
  only the overflow headroom limits the range (the per-run kit clips states to +-64: ``CKKS_STATE_RANGE``;
  ``secagg-clip-range`` is not used). The server cannot read the model: it checkpoints the ciphertext
  (:meth:`ServerSecureAggregation.outgoing`), evaluate messages carry the ciphertext, every evaluating client
  decrypts and evaluates on its own test split, and the round's ``global`` metrics are the example-weighted mean
  of those (``extra["evaluation"] = "federated"``). Trust: every client holds the one secret key; the server
  colluding with any client reads every upload (``docs/secure_aggregation.md`` section 5.1). Decrypted models
  never go back to the server; only coarse evaluation metrics derived from them do.

**Range and scale (masking).** The update vector is the delta (local - global), flattened in the sorted order
of the array names, so a modest clip range ``secagg-clip-range`` = c (default 1.0) covers it: one local epoch
moves prompt parameters by far less. Coordinates outside [-c, c] are clipped (a bias, not an error; every
client reports how many it clipped as ``secagg-clipped``). The weight w_u (example count, at most
W = ``train-per-client``, which the synthetic benchmark gives every client) is carried inside the masked
vector. The fixed-point scale is the largest power of two s with ``num-clients * ceil(W * c * s) < 2**31``
(32-bit words, no wrap-around), and the decoded weighted mean errs per coordinate by less than
``n / (s * sum_u w_u)`` (:func:`secagg.encoding.quantization_error_bound`; e.g. 5 clients x 400 examples,
c = 1: s = 2**20, bound 2.4e-9). The bound of each round is written to its metrics line
(``extra["secagg"]["error_bound"]``).

**Threshold.** ``secagg-threshold`` = t, or 0 for the default: a strict majority of the round's participants,
``max(2, n // 2 + 1)`` (capped at ``k // 2 + 1`` on a SecAgg+ graph of ``secagg-neighbours`` = k). Clients
compute the same rule from the participant list themselves and refuse a setup with another t, so a server
cannot lower it. Drop-outs after key sharing are recovered exactly; with fewer than t survivors the round fails
loudly: nothing is applied and the metrics line says ``status = "secure-aggregation-failed"`` with the reason.
The default is honest-but-curious security; against an active server set t > 2n/3 (see
``docs/secure_aggregation.md`` section 3).

**Keys.** ``secagg-dir`` is a directory written by ``fedmpt secagg provision`` (``masking/roster.bin``,
``masking/identity_<partition>.key``; with ``--ckks`` also ``ckks/client`` for the nodes and ``ckks/server``
for the server, sized with ``--ckks-max-weight`` >= ``train-per-client``). Empty (the default) provisions a
fresh kit per run into ``<run_dir>/secagg/`` **on the server's machine, client secrets included**: acceptable
only for the simulation, where server and clients share a disk; a warning says so.

**Client state between stages.** Flower may run each message in a new ClientApp process, so the per-round
protocol state (round X25519 keys, the self-mask seed, held shares, the delta) is kept in the node's
``context.state`` (held in the SuperNode's memory, never written to disk by fedmpt) as a versioned binary
record (:func:`pack_client_state`; no pickle), and deleted after the unmask stage.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fedmpt.errors import ConfigError, SecureAggregationError
from fedmpt.rundir import ClientFailure
from secagg import masking, wire
from secagg.config import MaskingConfig
from secagg.errors import SecAggError, ThresholdNotMet
from secagg.keys import (
    ROSTER_FILE,
    SERVER_ID,
    Identity,
    Roster,
    RoundKeyPair,
    identity_file_name,
    load_identity,
    load_roster,
    provision_identities,
    x25519_from_private_bytes,
    x25519_private_bytes,
)
from secagg.shamir import decode_share, encode_share

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.serverapp import Grid

logger = logging.getLogger("flwr.fedmpt.secagg")

Arrays = dict[str, NDArray[Any]]

#: Sub-directory of a provisioned kit (``fedmpt secagg provision``) holding the masking keys.
MASKING_DIR = "masking"
#: Sub-directory of the run directory used when ``secagg-dir`` is empty (simulation only).
RUN_KIT_DIR = "secagg"
#: Sub-directory of a provisioned kit holding the CKKS kits (``client/`` for nodes, ``server/`` for the server).
CKKS_DIR = "ckks"
#: CKKS clip range of a per-run kit: CKKS encrypts weighted *states*, whose parameters must lie within it.
CKKS_STATE_RANGE = 64.0
#: Names under which an encrypted global state travels in an ``ArrayRecord`` (evaluate messages, checkpoints).
CKKS_AGGREGATE_ARRAY = "secagg.ckks-aggregate"
CKKS_BINDING_ARRAY = "secagg.ckks-binding"
#: Record in the node's ``context.state`` that holds the per-round protocol state.
STATE_RECORD = "secagg-state"
_STATE_MAGIC = b"FMCS"
_STATE_VERSION = 1


class Mode(enum.StrEnum):
    """Values of the run-config key ``secure-aggregation``."""

    NONE = "none"
    MASKING = "masking"
    CKKS = "ckks"


class Stage(enum.StrEnum):
    """Values of ``secagg-stage`` in a masking ``train`` message: the protocol stage it carries."""

    ADVERTISE = "advertise"
    SHARE_KEYS = "share-keys"
    MASKED_INPUT = "masked-input"
    UNMASK = "unmask"
    CKKS = "ckks"  # the single CKKS train exchange: encrypted global state down, encrypted weighted state up


class SecAggKey(enum.StrEnum):
    """Keys the secure-aggregation stages add to the config and metric records."""

    STAGE = "secagg-stage"
    PAYLOAD = "secagg-payload"
    CKKS_RUN = "secagg-ckks-run"
    CKKS_ROUND = "secagg-ckks-round"
    CLIPPED = "secagg-clipped"


#: Run-config keys of secure aggregation and their defaults (also in ``[tool.flwr.app.config]``).
SECAGG_DEFAULTS: dict[str, Any] = {
    "secure-aggregation": "none",
    "secagg-dir": "",
    "secagg-threshold": 0,
    "secagg-neighbours": 0,
    "secagg-clip-range": 1.0,
}


@dataclass(frozen=True)
class SecureAggregationConfig:
    """The run config of secure aggregation (keys in :data:`SECAGG_DEFAULTS`).

    Attributes:
        mode: ``none``, ``masking`` or ``ckks``.
        key_dir: the provisioned kit (``fedmpt secagg provision --out``); "" = a fresh kit per run in the run
            directory (simulation only: the server writes the clients' secrets).
        threshold: Shamir threshold t >= 2, or 0 for the default strict majority (see module doc).
        neighbours: even SecAgg+ degree k >= 2, or 0 for the complete graph.
        clip_range: c > 0: every coordinate of a client's delta is clipped to [-c, c] before encoding.
    """

    mode: Mode = Mode.NONE
    key_dir: str = ""
    threshold: int = 0
    neighbours: int = 0
    clip_range: float = 1.0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", Mode(self.mode))
        except ValueError:
            raise ConfigError(
                f"run config 'secure-aggregation' must be one of {[m.value for m in Mode]}, got {self.mode!r}"
            ) from None
        if not isinstance(self.key_dir, str):
            raise ConfigError(f"run config 'secagg-dir' must be a string, got {self.key_dir!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, int) or t < 0 or t == 1:
            raise ConfigError(f"run config 'secagg-threshold' must be 0 (default) or an integer >= 2, got {t!r}")
        k = self.neighbours
        if isinstance(k, bool) or not isinstance(k, int) or k < 0 or k == 1 or k % 2:
            raise ConfigError(
                f"run config 'secagg-neighbours' must be 0 (complete graph) or an even int >= 2, got {k!r}"
            )
        if t and k and k < t:
            raise ConfigError(f"run config 'secagg-neighbours'={k} is below 'secagg-threshold'={t}")
        c = self.clip_range
        if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c) or c <= 0:
            raise ConfigError(f"run config 'secagg-clip-range' must be a finite number > 0, got {c!r}")
        object.__setattr__(self, "clip_range", float(c))

    @property
    def enabled(self) -> bool:
        """Whether updates are protected (any mode but ``none``)."""
        return self.mode is not Mode.NONE


def secure_aggregation_config_from(values: Mapping[str, Any]) -> SecureAggregationConfig:
    """Build the config from the run-config keys of :data:`SECAGG_DEFAULTS` (missing keys take the defaults)."""
    v = {**SECAGG_DEFAULTS, **{k: values[k] for k in SECAGG_DEFAULTS if k in values}}
    return SecureAggregationConfig(
        mode=v["secure-aggregation"],
        key_dir=v["secagg-dir"],
        threshold=v["secagg-threshold"],
        neighbours=v["secagg-neighbours"],
        clip_range=v["secagg-clip-range"],
    )


# ------------------------------------------------------------------------------------------ parameters


def default_threshold(n_participants: int, neighbours: int = 0) -> int:
    """Default Shamir threshold: a strict majority ``max(2, n // 2 + 1)``; on a SecAgg+ graph of degree k < n - 1
    at most ``k // 2 + 1`` (a node's secrets are shared among itself and its k neighbours)."""
    t = max(2, n_participants // 2 + 1)
    if neighbours and neighbours < n_participants - 1:
        t = min(t, max(2, neighbours // 2 + 1))
    return t


def fixed_point_scale(max_clients: int, max_weight: int, clip_range: float, modulus_bits: int = 32) -> float:
    """Largest power of two s with ``max_clients * ceil(max_weight * clip_range * s) < 2**(modulus_bits - 1)``.

    That is the no-wrap-around condition of :func:`secagg.encoding.check_capacity` for ``max_clients``
    clients; a larger s only shrinks the quantization error ``n / (s * sum w)``.
    """
    if max_clients < 1 or max_weight < 1 or not clip_range > 0:
        raise ConfigError(
            f"need max_clients, max_weight >= 1 and clip_range > 0, got {max_clients}, {max_weight}, {clip_range}"
        )
    limit = (2 ** (modulus_bits - 1) - 1) // max_clients  # largest allowed ceil(W c s)
    exponent = math.floor(math.log2(limit / (max_weight * clip_range)))
    while exponent > -60 and math.ceil(max_weight * clip_range * 2.0**exponent) > limit:
        exponent -= 1
    if exponent < 0:
        raise ConfigError(
            f"{max_clients} clients x weight {max_weight} x clip range {clip_range} leave no fixed-point precision "
            f"in a {modulus_bits}-bit modulus; lower 'secagg-clip-range'"
        )
    return float(2.0**exponent)


def masking_config(
    config: SecureAggregationConfig, n_participants: int, max_clients: int, max_weight: int, timeout_s: float = 60.0
) -> MaskingConfig:
    """The :class:`~secagg.config.MaskingConfig` of one round with ``n_participants`` clients.

    Server and clients call it with the same run config, so both sides agree on everything; t follows the
    participant count (:func:`default_threshold`) unless ``secagg-threshold`` fixes it.
    """
    t = config.threshold or default_threshold(n_participants, config.neighbours)
    k = config.neighbours if config.neighbours and config.neighbours < n_participants - 1 else None
    return MaskingConfig(
        threshold=t,
        neighbourhood_size=k,
        modulus_bits=32,
        clip_range=config.clip_range,
        scale=fixed_point_scale(max_clients, max_weight, config.clip_range),
        max_weight=max_weight,
        stage_timeout_s=timeout_s,
    )


def flatten(arrays: Mapping[str, NDArray[Any]]) -> NDArray[np.float64]:
    """The update vector: every array raveled in the sorted order of the names, as float64, shape (d,)."""
    return np.concatenate([np.asarray(arrays[name], dtype=np.float64).ravel() for name in sorted(arrays)])


def unflatten(vector: NDArray[Any], like: Mapping[str, NDArray[Any]]) -> Arrays:
    """Inverse of :func:`flatten` for the names and shapes of ``like`` (fp32 arrays)."""
    out: Arrays = {}
    pos = 0
    for name in sorted(like):
        shape = np.shape(like[name])
        size = int(np.prod(shape))
        out[name] = np.asarray(vector[pos : pos + size], dtype=np.float32).reshape(shape)
        pos += size
    if pos != len(vector):
        raise ConfigError(f"vector of length {len(vector)} does not match the state's {pos} values")
    return out


# ------------------------------------------------------------------------------------------ keys


def run_kit_dir(runs_dir: str, run_name: str) -> Path:
    """Where a per-run kit lives when ``secagg-dir`` is empty: ``<runs-dir>/<run-name>/secagg``."""
    if not run_name:
        raise ConfigError("run config 'secagg-dir' = \"\" (a per-run kit) needs 'run-name' so clients can find the kit")
    return Path(runs_dir).expanduser() / run_name / RUN_KIT_DIR


def kit_dir(config: SecureAggregationConfig, runs_dir: str, run_name: str) -> Path:
    """The kit directory both sides read: ``secagg-dir``, or the per-run kit."""
    return Path(config.key_dir).expanduser() if config.key_dir else run_kit_dir(runs_dir, run_name)


def ensure_run_kit(directory: Path, num_clients: int, max_weight: int = 1, *, with_ckks: bool = False) -> Roster:
    """Server, ``secagg-dir`` = "": provision identities for partitions 0..num_clients-1 (and, ``with_ckks``, the
    CKKS kits for ``num_clients`` clients of weight <= ``max_weight`` and states within +-``CKKS_STATE_RANGE``)
    once per run (reused on resume); returns the roster. Writes the clients' secrets next to the run: simulation
    only."""
    masking_dir = directory / MASKING_DIR
    roster_path = masking_dir / ROSTER_FILE
    ckks_dir = directory / CKKS_DIR
    if with_ckks and not (ckks_dir / "server").exists():
        from secagg import ckks
        from secagg.config import CkksConfig

        logger.warning(
            "secure aggregation: provisioning per-run CKKS kits in %s, INCLUDING the clients' shared secret key; "
            "this is only acceptable for the simulation",
            ckks_dir,
        )
        ckks_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ckks.provision(
            CkksConfig(max_clients=num_clients, max_weight=max_weight, clip_range=CKKS_STATE_RANGE), ckks_dir
        )
    if roster_path.exists():
        return load_roster(roster_path)
    logger.warning(
        "secure aggregation: provisioning a per-run key kit in %s, INCLUDING every client's private identity key; "
        "this is only acceptable for the simulation (use 'fedmpt secagg provision' and 'secagg-dir' in a deployment)",
        directory,
    )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    masking_dir.mkdir(mode=0o700, exist_ok=True)
    return provision_identities(list(range(num_clients)), masking_dir)


def load_client_keys(directory: Path, partition_id: int) -> tuple[Identity, Roster]:
    """A node's identity key and the roster from a kit directory (its ``masking/`` sub-directory)."""
    masking_dir = directory / MASKING_DIR
    identity_path = masking_dir / identity_file_name(partition_id)
    if not identity_path.exists():
        raise SecureAggregationError(
            f"secure aggregation: no identity key for partition {partition_id} at {identity_path} "
            "(provision with 'fedmpt secagg provision' and set 'secagg-dir')"
        )
    return load_identity(identity_path, partition_id), load_roster(masking_dir / ROSTER_FILE)


# ------------------------------------------------------------------------------------------ client state


def pack_client_state(state: masking.ClientState, delta: NDArray[np.float64], weight: int) -> bytes:
    """Versioned binary form of a client's round state and its pending update (no pickle).

    Layout (little-endian): ``FMCS`` u8 version, u8 stage index, run id 16, u64 round, u64 d, u64 weight,
    c_sk 32, s_sk 32, u8 has-seed + b_u 32, then counted lists (u32 n) of participants (u64), neighbours (u64),
    key bundles (u64 id + 128), held shares (u64 id + 2 shares), receive keys (u64 id + 32), replay-guard
    entries (u32 kind + u64 sender), and the delta as d float64.
    """
    if state.c_keys is None or state.s_keys is None:
        raise SecureAggregationError(f"node {state.node_id}: no round keys to store before advertise_keys")
    stages = list(masking.ClientStage)
    parts = [
        _STATE_MAGIC,
        struct.pack("<BB", _STATE_VERSION, stages.index(state.stage)),
        state.run_id,
        struct.pack("<QQQ", state.round_number, state.vector_length, weight),
        x25519_private_bytes(state.c_keys.private),
        x25519_private_bytes(state.s_keys.private),
        struct.pack("<B", 1 if state.self_mask_seed else 0),
        state.self_mask_seed or bytes(wire.SECRET_BYTES),
    ]

    def ids(values: Sequence[int]) -> bytes:
        return struct.pack("<I", len(values)) + b"".join(struct.pack("<Q", v) for v in sorted(values))

    parts += [ids(state.participants), ids(list(state.neighbours))]
    parts.append(struct.pack("<I", len(state.peer_bundles)))
    parts += [struct.pack("<Q", v) + wire.encode_key_bundle(b) for v, b in sorted(state.peer_bundles.items())]
    parts.append(struct.pack("<I", len(state.held_shares)))
    parts += [
        struct.pack("<Q", v) + encode_share(a) + encode_share(b) for v, (a, b) in sorted(state.held_shares.items())
    ]
    parts.append(struct.pack("<I", len(state.receive_keys)))
    parts += [struct.pack("<Q", v) + k for v, k in sorted(state.receive_keys.items())]
    parts.append(struct.pack("<I", len(state.guard.seen)))
    parts += [struct.pack("<IQ", kind, sender) for kind, sender in sorted(state.guard.seen)]
    vector = np.ascontiguousarray(delta, dtype="<f8")
    parts.append(struct.pack("<Q", vector.size) + vector.tobytes())
    return b"".join(parts)


def unpack_client_state(
    data: bytes, config: MaskingConfig, identity: Identity, roster: Roster
) -> tuple[masking.ClientState, NDArray[np.float64], int]:
    """Inverse of :func:`pack_client_state`: (state, delta, weight). Raises SecureAggregationError on bad bytes."""
    view = memoryview(bytes(data))
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(view):
            raise SecureAggregationError(f"stored secure-aggregation state truncated at byte {pos}")
        out = bytes(view[pos : pos + n])
        pos += n
        return out

    def u32() -> int:
        return int(struct.unpack("<I", take(4))[0])

    def u64() -> int:
        return int(struct.unpack("<Q", take(8))[0])

    if take(4) != _STATE_MAGIC:
        raise SecureAggregationError("stored secure-aggregation state has a bad magic")
    version, stage_index = struct.unpack("<BB", take(2))
    stages = list(masking.ClientStage)
    if version != _STATE_VERSION or stage_index >= len(stages):
        raise SecureAggregationError(f"stored secure-aggregation state: version {version}, stage {stage_index}")
    state = masking.ClientState.create(config, identity, roster)
    state.stage = stages[stage_index]
    state.run_id = take(16)
    state.round_number, state.vector_length, weight = u64(), u64(), u64()
    state.c_keys = RoundKeyPair(x25519_from_private_bytes(take(32)))
    state.s_keys = RoundKeyPair(x25519_from_private_bytes(take(32)))
    has_seed = take(1)[0]
    seed = take(wire.SECRET_BYTES)
    state.self_mask_seed = seed if has_seed else b""
    state.participants = tuple(u64() for _ in range(u32()))
    state.neighbours = frozenset(u64() for _ in range(u32()))
    for _ in range(u32()):
        v = u64()
        state.peer_bundles[v] = wire.decode_key_bundle(take(wire.KEY_BUNDLE_BYTES))
    for _ in range(u32()):
        v = u64()
        a = decode_share(take(wire.SHARE_BYTES), wire.SECRET_BYTES)
        b = decode_share(take(wire.SHARE_BYTES), wire.SECRET_BYTES)
        state.held_shares[v] = (a, b)
    for _ in range(u32()):
        v = u64()
        state.receive_keys[v] = take(32)
    for _ in range(u32()):
        kind, sender = struct.unpack("<IQ", take(12))
        state.guard.seen.add((int(kind), int(sender)))
    d = u64()
    delta = np.frombuffer(take(8 * d), dtype="<f8").astype(np.float64)
    if pos != len(view):
        raise SecureAggregationError(f"stored secure-aggregation state has {len(view) - pos} trailing bytes")
    return state, delta, int(weight)


# ------------------------------------------------------------------------------------------ client side


def _stage_of(msg: Message) -> str | None:
    from fedmpt.apps.messages import RecordName

    record = msg.content.config_records.get(RecordName.CONFIG)
    if record is None:
        return None
    stage = record.get(SecAggKey.STAGE)
    return stage if isinstance(stage, str) else None


def _local_update(reply: Message) -> dict[str, Any]:
    """The local state in a successful plain-train reply; a reply without one (e.g. a DP node over its budget)
    cannot take part in secure aggregation."""
    from fedmpt.apps.messages import RecordName, from_array_record

    if RecordName.ARRAYS not in reply.content.array_records:
        raise SecureAggregationError(
            f"local training returned no update (metrics {dict(reply.content.metric_records)})"
        )
    return from_array_record(reply.content.array_records[RecordName.ARRAYS])


def _payload_of(msg: Message) -> bytes:
    from fedmpt.apps.messages import RecordName

    payload = msg.content.config_records[RecordName.CONFIG].get(SecAggKey.PAYLOAD)
    if not isinstance(payload, bytes):
        raise SecureAggregationError(f"secure-aggregation message without a bytes '{SecAggKey.PAYLOAD}'")
    return payload


def _reply(msg: Message, stage: str, payload: bytes, metrics: Mapping[str, Any] | None = None) -> Message:
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from fedmpt.apps.messages import RecordName

    content = RecordDict({RecordName.CONFIG: ConfigRecord({SecAggKey.STAGE: stage, SecAggKey.PAYLOAD: payload})})
    content[RecordName.METRICS] = MetricRecord(dict(metrics or {}))
    return Message(content, reply_to=msg)


def _error_reply(msg: Message, reason: str) -> Message:
    from flwr.app import Error, Message

    return Message(Error(code=_ERROR_CODE, reason=reason), reply_to=msg)


_ERROR_CODE = 7001  # fedmpt secure-aggregation failure on a client (Flower reserves small codes)


@dataclass(frozen=True)
class _ClientSetup:
    config: SecureAggregationConfig
    partition_id: int
    max_clients: int
    max_weight: int
    timeout_s: float
    kit: Path
    task: Any  # fedmpt.apps.task.TaskConfig: the state's names and shapes come from its initial state
    seed: int


def _client_setup(context: Context, overrides: Mapping[str, Any]) -> _ClientSetup:
    from fedmpt.apps import task
    from fedmpt.apps.config import read_app_config
    from fedmpt.apps.node_config import read_node_config

    app = read_app_config({**context.run_config, **overrides})
    node = read_node_config(context.node_config)
    fed = app.federation
    cfg = app.secure_aggregation
    return _ClientSetup(
        cfg,
        node.partition_id,
        app.task.num_clients,
        task.max_client_examples(app.task, fed.seed),
        fed.round_timeout_s,
        kit_dir(cfg, fed.runs_dir, fed.run_name),
        app.task,
        fed.seed,
    )


#: Keys of the round-state record besides the packed state: what the stages after ``advertise`` need of the setup.
_SETUP_KEYS = ("max-clients", "max-weight", "timeout-s", "kit")


def _keep_round_state(
    context: Context, setup: _ClientSetup, state: masking.ClientState, delta: NDArray[np.float64], weight: int
) -> None:
    """Store the round state (packed, no pickle) and the setup the later stages need in ``context.state``."""
    from flwr.app import ConfigRecord

    context.state[STATE_RECORD] = ConfigRecord(
        {
            "blob": pack_client_state(state, delta, weight),
            "max-clients": setup.max_clients,
            "max-weight": setup.max_weight,
            "timeout-s": setup.timeout_s,
            "kit": str(setup.kit),
        }
    )


def _stored_setup(context: Context, overrides: Mapping[str, Any]) -> _ClientSetup | None:
    """The setup that the ``advertise`` stage kept with the round state, or None if there is none.

    Reading it needs neither the task nor its data (no torch): the stages after training then start in well under
    a second in a fresh ClientApp process. The secure-aggregation keys are read again from the run config.
    """
    from fedmpt.apps.node_config import read_node_config

    record = context.state.get(STATE_RECORD)
    if record is None or any(key not in record for key in _SETUP_KEYS):
        return None
    values = {**context.run_config, **overrides}
    node = read_node_config(context.node_config)
    max_clients, max_weight, timeout_s, kit = (record[key] for key in _SETUP_KEYS)
    if not (
        isinstance(max_clients, int)
        and isinstance(max_weight, int)
        and isinstance(timeout_s, int | float)
        and isinstance(kit, str)
    ):
        raise SecureAggregationError("stored secure-aggregation setup is malformed")
    config = secure_aggregation_config_from(values)
    return _ClientSetup(config, node.partition_id, max_clients, max_weight, float(timeout_s), Path(kit), None, 0)


def client_train(
    msg: Message, context: Context, overrides: Mapping[str, Any], plain_train: Callable[[Message], Message]
) -> Message:
    """The ClientApp's ``train`` handler with secure aggregation: plain messages go to ``plain_train``.

    A message with ``secagg-stage`` runs that masking stage; the ``advertise`` stage first runs ``plain_train``
    (local training, with whatever it does, e.g. DP-SGD) and keeps its result for the ``masked-input`` stage.
    Protocol failures are answered with an error reply naming the reason (the server records the node as
    dropped).
    """
    stage = _stage_of(msg)
    if stage is None:
        return plain_train(msg)
    try:
        stored = _stored_setup(context, overrides) if stage != Stage.ADVERTISE else None
        setup = stored or _client_setup(context, overrides)
        if stage == Stage.CKKS:
            return _client_ckks_train(msg, setup, plain_train)
        return _client_masking_stage(msg, context, setup, stage, plain_train)
    except (SecAggError, ConfigError, SecureAggregationError) as err:
        logger.warning("secure aggregation stage %s failed on this node: %s", stage, err)
        if STATE_RECORD in context.state:
            del context.state[STATE_RECORD]
        return _error_reply(msg, f"secure aggregation stage {stage}: {type(err).__name__}: {err}")


def _load_client_kit(setup: _ClientSetup) -> tuple[Any, Any, bytes]:
    from secagg import ckks

    if setup.config.mode is not Mode.CKKS:
        raise SecureAggregationError(f"got a CKKS message but this run's secure-aggregation is {setup.config.mode}")
    return ckks.load_kit(setup.kit / CKKS_DIR / "client")


def _decrypt_state(
    setup: _ClientSetup, kit: tuple[Any, Any, bytes], data: bytes, run_id: bytes, round_number: int
) -> Arrays:
    """The global state from an encrypted aggregate (names and shapes from the task's initial state)."""
    from fedmpt.apps import task
    from secagg import ckks

    context, cfg, key_id = kit
    result = ckks.decrypt_aggregate(context, cfg, data, run_id=run_id, round_number=round_number, key_id=key_id)
    return unflatten(result.mean, task.initial_arrays(setup.task, setup.seed))


def _client_ckks_train(msg: Message, setup: _ClientSetup, plain_train: Callable[[Message], Message]) -> Message:
    """CKKS: decrypt the global state (if encrypted), train, reply with Enc(w * local state) and no plain weight."""
    from fedmpt.apps.messages import Key, RecordName, to_array_record
    from secagg import ckks

    kit = _load_client_kit(setup)
    config = msg.content.config_records[RecordName.CONFIG]
    server_round = int(config[Key.SERVER_ROUND])  # type: ignore[arg-type]
    run_id = config.get(SecAggKey.CKKS_RUN)
    if not isinstance(run_id, bytes):
        raise SecureAggregationError(f"CKKS train message without '{SecAggKey.CKKS_RUN}'")
    payload = _payload_of(msg)
    if payload:  # the encrypted global state of the previous aggregation (round secagg-ckks-round)
        state_round = int(config[SecAggKey.CKKS_ROUND])  # type: ignore[arg-type]
        msg.content[RecordName.ARRAYS] = to_array_record(_decrypt_state(setup, kit, payload, run_id, state_round))
    elif RecordName.ARRAYS not in msg.content.array_records:
        raise SecureAggregationError("CKKS train message carries neither an encrypted nor a plain global state")
    reply = plain_train(msg)
    if reply.has_error():
        return reply
    local = _local_update(reply)
    metrics = dict(reply.content.metric_records[RecordName.METRICS])
    weight = _weight_from(metrics)
    context_, cfg, key_id = kit
    vector = flatten(local)  # (d,)
    metrics[SecAggKey.CLIPPED] = int(np.sum(np.abs(vector) > cfg.clip_range))
    upload = ckks.encrypt_update(
        context_,
        cfg,
        vector,
        weight,
        run_id=run_id,
        round_number=server_round,
        sender=setup.partition_id,
        key_id=key_id,
    )
    return _forward_records(reply, _reply(msg, Stage.CKKS, upload, metrics))


def _weight_from(metrics: dict[str, Any]) -> int:
    from fedmpt.apps.messages import Key

    count = metrics.pop(Key.NUM_EXAMPLES, None)  # the weight travels only inside the protected vector
    if not isinstance(count, int | float) or isinstance(count, bool) or count != int(count) or count < 1:
        raise SecureAggregationError(f"local training reported {Key.NUM_EXAMPLES} = {count!r}, need an integer >= 1")
    return int(count)


def _forward_records(plain: Message, answer: Message) -> Message:
    """Copy the plain reply's other records (e.g. a DP ledger entry) into the protected reply."""
    from fedmpt.apps.messages import RecordName

    for name, record in plain.content.items():
        if name not in (RecordName.ARRAYS, RecordName.METRICS, RecordName.CONFIG):
            answer.content[name] = record
    return answer


def client_evaluate(
    msg: Message, context: Context, overrides: Mapping[str, Any], plain_evaluate: Callable[[Message], Message]
) -> Message:
    """The ClientApp's ``evaluate`` handler: an encrypted global state (CKKS) is decrypted first, then evaluated by
    ``plain_evaluate`` on this client's own test split; a plain state goes straight to ``plain_evaluate``."""
    from fedmpt.apps.messages import RecordName, from_array_record, to_array_record

    record = msg.content.array_records.get(RecordName.ARRAYS)
    if record is None or CKKS_AGGREGATE_ARRAY not in record:
        return plain_evaluate(msg)
    try:
        setup = _client_setup(context, overrides)
        arrays = from_array_record(record)
        run_id, round_number = _unbind(arrays[CKKS_BINDING_ARRAY])
        state = _decrypt_state(
            setup, _load_client_kit(setup), arrays[CKKS_AGGREGATE_ARRAY].tobytes(), run_id, round_number
        )
    except (SecAggError, ConfigError, SecureAggregationError) as err:
        return _error_reply(msg, f"secure aggregation (evaluate): {type(err).__name__}: {err}")
    msg.content[RecordName.ARRAYS] = to_array_record(state)
    return plain_evaluate(msg)


def _bind(run_id: bytes, round_number: int) -> NDArray[np.uint8]:
    return np.frombuffer(run_id + struct.pack("<Q", round_number), dtype=np.uint8).copy()


def _unbind(binding: NDArray[Any]) -> tuple[bytes, int]:
    raw = np.asarray(binding, dtype=np.uint8).tobytes()
    if len(raw) != 24:
        raise SecureAggregationError(f"CKKS state binding must be 24 bytes, got {len(raw)}")
    return raw[:16], int(struct.unpack("<Q", raw[16:])[0])


def _peek_participants(request: bytes, node_id: int) -> tuple[int, ...]:
    env = wire.unpack(
        request, kind=wire.Kind.ADVERTISE_REQUEST, run_id=None, round_number=None, recipient=node_id, sender=SERVER_ID
    )
    return wire.decode_advertise_request(env.payload).participants


def _client_masking_stage(
    msg: Message,
    context: Context,
    setup: _ClientSetup,
    stage: str,
    plain_train: Callable[[Message], Message],
) -> Message:

    from fedmpt.apps.messages import RecordName, from_array_record

    if setup.config.mode is not Mode.MASKING:
        raise SecureAggregationError(
            f"got a masking stage '{stage}' but this run's secure-aggregation is {setup.config.mode}"
        )
    identity, roster = load_client_keys(setup.kit, setup.partition_id)
    request = _payload_of(msg)
    if stage == Stage.ADVERTISE:
        participants = _peek_participants(request, setup.partition_id)
        strangers = sorted(set(participants) - set(roster))
        if strangers:
            raise SecureAggregationError(f"ADVERTISE_REQUEST lists nodes {strangers} that are not in the roster")
        mcfg = masking_config(setup.config, len(participants), setup.max_clients, setup.max_weight, setup.timeout_s)
        state = masking.ClientState.create(mcfg, identity, roster)
        out = masking.advertise_keys(state, request)  # checks the setup before any training is done
        reply = plain_train(msg)
        if reply.has_error():
            return reply
        local = _local_update(reply)
        global_arrays = from_array_record(msg.content.array_records[RecordName.ARRAYS])
        if sorted(local) != sorted(global_arrays):
            raise SecureAggregationError(
                f"local state arrays {sorted(local)} differ from the global {sorted(global_arrays)}"
            )
        metrics = dict(reply.content.metric_records[RecordName.METRICS])
        weight = _weight_from(metrics)  # travels only inside the masked vector
        delta = flatten(local) - flatten(global_arrays)  # (d,)
        metrics[SecAggKey.CLIPPED] = int(np.sum(np.abs(delta) > mcfg.clip_range))
        _keep_round_state(context, setup, state, delta, weight)
        return _forward_records(reply, _reply(msg, stage, out, metrics))
    if STATE_RECORD not in context.state:
        raise SecureAggregationError(f"stage '{stage}' arrived but this node holds no round state (no advertise stage)")
    blob = context.state[STATE_RECORD]["blob"]
    if not isinstance(blob, bytes):
        raise SecureAggregationError("stored secure-aggregation state is not bytes")
    # t is fixed by the participant list of the advertise stage, kept in the state
    n = struct.unpack_from("<I", blob, 4 + 2 + 16 + 24 + 64 + 1 + wire.SECRET_BYTES)[0]
    mcfg = masking_config(setup.config, n, setup.max_clients, setup.max_weight, setup.timeout_s)
    state, delta, weight = unpack_client_state(blob, mcfg, identity, roster)
    if stage == Stage.SHARE_KEYS:
        out = masking.share_keys(state, request)
    elif stage == Stage.MASKED_INPUT:
        out = masking.masked_input(state, request, delta, weight)
    elif stage == Stage.UNMASK:
        out = masking.unmask(state, request)
        del context.state[STATE_RECORD]
        return _reply(msg, stage, out)
    else:
        raise SecureAggregationError(f"unknown secure-aggregation stage {stage!r}")
    _keep_round_state(context, setup, state, delta, weight)
    return _reply(msg, stage, out)


# ------------------------------------------------------------------------------------------ server side


@dataclass
class SecureRound:
    """Outcome of one protected training round, for the server's round line.

    ``arrays`` is the new global state, or None when the round failed (nothing is applied).
    """

    arrays: Arrays | None
    replied: tuple[int, ...]
    train_metrics: dict[str, dict[str, float]]
    failures: list[ClientFailure]
    bytes_down: int
    bytes_up: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _StageReplies:
    payloads: dict[int, bytes]
    metrics: dict[int, dict[str, float]]
    failures: list[ClientFailure]
    bytes_down: int
    bytes_up: int


def _send_stage(
    grid: Grid,
    stage: Stage,
    requests: Mapping[int, bytes],
    node_of: Mapping[int, int],
    server_round: int,
    timeout_s: float,
    arrays: Mapping[str, NDArray[Any]] | None = None,
) -> _StageReplies:
    """Send one stage's request bytes to each client (client id -> bytes); collect the reply bytes."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from fedmpt.apps.messages import Key, RecordName, to_array_record

    record = to_array_record(arrays) if arrays is not None else None
    messages = []
    bytes_down = 0
    for client_id, payload in sorted(requests.items()):
        content = RecordDict(
            {
                RecordName.CONFIG: ConfigRecord(
                    {Key.SERVER_ROUND: server_round, SecAggKey.STAGE: str(stage), SecAggKey.PAYLOAD: payload}
                )
            }
        )
        bytes_down += len(payload)
        if record is not None:
            content[RecordName.ARRAYS] = record
            bytes_down += record.count_bytes()
        messages.append(
            Message(
                content,
                dst_node_id=node_of[client_id],
                message_type=MessageType.TRAIN,
                group_id=f"{server_round}-{stage}",
            )
        )
    replies = _collect(grid, messages, stage, {c: node_of[c] for c in requests}, timeout_s)
    return _StageReplies(replies.payloads, replies.metrics, replies.failures, bytes_down, replies.bytes_up)


def _collect(
    grid: Grid, messages: list[Message], stage: Stage, node_of: Mapping[int, int], timeout_s: float
) -> _StageReplies:
    """Send ``messages`` and collect each client's reply payload of ``stage`` (``bytes_down`` is left 0)."""
    from fedmpt.apps.messages import RecordName, collect_replies

    client_of = {node: c for c, node in node_of.items()}
    payloads: dict[int, bytes] = {}
    metrics: dict[int, dict[str, float]] = {}
    failures: list[ClientFailure] = []
    bytes_up = 0
    for client_id, node_id, reply in collect_replies(
        grid, messages, client_of, timeout_s, failures, label=stage, failure_prefix=f"{stage}: "
    ):
        config = reply.content.config_records.get(RecordName.CONFIG)
        answer = None if config is None else config.get(SecAggKey.PAYLOAD)
        if not isinstance(answer, bytes) or config is None or config.get(SecAggKey.STAGE) != stage:
            failures.append(ClientFailure(node_id, f"{stage}: malformed reply (no {stage} payload)", client_id))
            continue
        payloads[client_id] = answer
        bytes_up += len(answer)
        metric_record = reply.content.metric_records.get(RecordName.METRICS)
        if metric_record is not None:
            metrics[client_id] = {k: float(v) for k, v in metric_record.items() if isinstance(v, int | float)}
    return _StageReplies(payloads, metrics, failures, 0, bytes_up)


class ServerSecureAggregation:
    """The server's side of secure aggregation for one run: keys, and the stages of each training round.

    Build it once per run with :meth:`create` (None when the mode is ``none``), then call
    :meth:`train_round` instead of the plain ``train`` exchange + :func:`fedmpt.apps.task.aggregate`.
    """

    def __init__(self, config: SecureAggregationConfig, roster: Roster, max_clients: int, max_weight: int) -> None:
        self.config = config
        self.roster = roster
        self.max_clients = max_clients
        self.max_weight = max_weight
        # CKKS only: the server context (no secret key), its parameters and key id, and the encrypted global state
        self._ckks: tuple[Any, Any, bytes] | None = None
        self.run_id = os.urandom(16)
        self.encrypted: bytes | None = None
        self.encrypted_round = 0

    def __repr__(self) -> str:
        return f"ServerSecureAggregation(mode={self.config.mode.value}, nodes={len(self.roster)})"

    @classmethod
    def create(cls, app_config: Any, run_path: Path) -> ServerSecureAggregation | None:
        """From the :class:`~fedmpt.apps.config.AppConfig` and the run directory; None for mode ``none``.

        Loads the roster from ``secagg-dir`` (the server needs no private key), or provisions a per-run kit
        under ``run_path/secagg`` (simulation only, warned).
        """
        cfg: SecureAggregationConfig = app_config.secure_aggregation
        if not cfg.enabled:
            return None
        from fedmpt.apps import task

        num_clients = app_config.task.num_clients
        max_weight = task.max_client_examples(app_config.task, app_config.federation.seed)
        kit = Path(cfg.key_dir).expanduser() if cfg.key_dir else Path(run_path) / RUN_KIT_DIR
        if not cfg.key_dir:
            ensure_run_kit(kit, num_clients, max_weight, with_ckks=cfg.mode is Mode.CKKS)
        if cfg.mode is Mode.CKKS:
            server = cls(cfg, Roster({}), num_clients, max_weight)
            server._load_ckks(kit / CKKS_DIR / "server")
            return server
        roster = load_roster(kit / MASKING_DIR / ROSTER_FILE)
        missing = sorted(set(range(num_clients)) - set(roster))
        if missing:
            raise ConfigError(f"secure aggregation: the roster has no identity for partitions {missing}")
        # fails here, before round 1, if the range and weights cannot fit the modulus
        masking_config(cfg, num_clients, num_clients, max_weight)
        return cls(cfg, roster, num_clients, max_weight)

    def _load_ckks(self, server_kit: Path) -> None:
        from secagg import ckks

        context, cfg, key_id = ckks.load_kit(server_kit)
        if context.is_private():
            raise ConfigError(f"{server_kit} holds the CKKS secret key; the server must get the server kit only")
        if cfg.max_clients < self.max_clients or cfg.max_weight < self.max_weight:
            raise ConfigError(
                f"CKKS kit {server_kit} is sized for {cfg.max_clients} clients of weight <= {cfg.max_weight}; the run "
                f"needs {self.max_clients} clients of weight <= {self.max_weight} (train-per-client): provision with "
                "--ckks-max-clients/--ckks-max-weight"
            )
        self._ckks = (context, cfg, key_id)

    @property
    def encrypted_model(self) -> bool:
        """CKKS: the server holds only the encrypted global state, so clients evaluate it (federated evaluation)."""
        return self.config.mode is Mode.CKKS

    def outgoing(self, arrays: Mapping[str, NDArray[Any]]) -> Mapping[str, NDArray[Any]]:
        """What the server sends to evaluators and checkpoints: ``arrays``, or (CKKS, once aggregated) the
        encrypted global state as uint8 arrays (ciphertext and its run/round binding)."""
        if self.encrypted is None:
            return arrays
        return {
            CKKS_AGGREGATE_ARRAY: np.frombuffer(self.encrypted, dtype=np.uint8).copy(),
            CKKS_BINDING_ARRAY: _bind(self.run_id, self.encrypted_round),
        }

    def restore(self, arrays: Mapping[str, NDArray[Any]]) -> Arrays:
        """Resume: take back an encrypted global state from a checkpoint written via :meth:`outgoing`."""
        if CKKS_AGGREGATE_ARRAY in arrays:
            if not self.encrypted_model:
                raise ConfigError("the checkpoint holds a CKKS-encrypted state but this run is not in mode 'ckks'")
            self.run_id, self.encrypted_round = _unbind(arrays[CKKS_BINDING_ARRAY])
            self.encrypted = np.asarray(arrays[CKKS_AGGREGATE_ARRAY], dtype=np.uint8).tobytes()
        return dict(arrays)

    @staticmethod
    def federated_metrics(client_metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """Global metrics of an encrypted model: the example-weighted mean of the clients' metrics on their own
        test splits (``num_examples`` is their sum)."""
        weights = {c: float(m.get("num_examples", 0.0)) for c, m in client_metrics.items()}
        total = sum(weights.values())
        if total <= 0:
            return {}
        keys = sorted({k for m in client_metrics.values() for k in m} - {"num_examples", "partition-id"})
        out = {
            k: sum(weights[c] * float(m[k]) for c, m in client_metrics.items() if k in m) / total
            for k in keys
            if all(k in m for m in client_metrics.values())
        }
        out["num_examples"] = total
        return out

    def describe(self, n_participants: int) -> dict[str, Any]:
        """The settings of a round with ``n_participants`` clients, for the round line and the resolved config."""
        if self._ckks is not None:
            _, cfg, key_id = self._ckks
            return {
                "scheme": "CKKS (TenSEAL)",
                "poly_modulus_degree": cfg.poly_modulus_degree,
                "coeff_mod_bit_sizes": list(cfg.coeff_mod_bit_sizes),
                "scale_bits": cfg.scale_bits,
                "clip_range": cfg.clip_range,
                "max_weight": cfg.max_weight,
                "key_id": key_id.hex(),
            }
        m = masking_config(self.config, n_participants, self.max_clients, self.max_weight)
        return {
            "threshold": m.threshold,
            "neighbours": m.neighbourhood_size if m.neighbourhood_size is not None else "complete",
            "modulus_bits": m.modulus_bits,
            "clip_range": m.clip_range,
            "scale": m.scale,
            "max_weight": m.max_weight,
        }

    def train_round(
        self,
        grid: Grid,
        targets: Mapping[int, int],
        arrays: Mapping[str, NDArray[Any]],
        server_round: int,
        federation: Any,
    ) -> SecureRound:
        """One masked training round over ``targets`` (client id -> node id) from the global ``arrays``.

        ``federation`` is the run's :class:`~fedmpt.apps.config.FederationConfig` (stage timeout
        ``round-timeout-s``, ``min-clients``). Returns the new global state ``global + weighted mean delta`` of
        the survivors, or ``arrays=None`` when fewer than t clients remain at some stage (``extra["status"] =
        "secure-aggregation-failed"`` with the reason) or fewer than ``min-clients`` survive
        (``"insufficient-replies"``): nothing is applied.
        """
        timeout_s = float(federation.round_timeout_s)
        if self._ckks is not None:
            return self._ckks_round(grid, targets, arrays, server_round, federation)
        participants = sorted(targets)
        mcfg = masking_config(self.config, len(participants), self.max_clients, self.max_weight, timeout_s)
        d = int(sum(np.size(a) for a in arrays.values()))
        started = time.monotonic()
        extra: dict[str, Any] = {
            "secure_aggregation": self.config.mode.value,
            "secagg": self.describe(len(participants)),
        }
        failures: list[ClientFailure] = []
        bytes_down = bytes_up = 0
        metrics: dict[int, dict[str, float]] = {}
        state, requests = masking.server_start_round(mcfg, participants, d, server_round, roster=self.roster)
        stages: list[tuple[Stage, Callable[[masking.ServerState, Mapping[int, bytes]], Any]]] = [
            (Stage.ADVERTISE, masking.server_collect_advertisements),
            (Stage.SHARE_KEYS, masking.server_collect_shares),
            (Stage.MASKED_INPUT, masking.server_collect_masked_inputs),
            (Stage.UNMASK, masking.server_unmask),
        ]
        result: masking.AggregateResult | None = None
        stage_s: dict[str, float] = {}  # wall time of each exchange, send to last reply plus the server's step
        extra["secagg"]["stage_s"] = stage_s
        try:
            for stage, collect in stages:
                stage_started = time.monotonic()
                replies = _send_stage(
                    grid,
                    stage,
                    requests,
                    dict(targets),
                    server_round,
                    timeout_s,
                    arrays if stage is Stage.ADVERTISE else None,
                )
                failures += replies.failures
                bytes_down += replies.bytes_down
                bytes_up += replies.bytes_up
                if stage is Stage.ADVERTISE:  # training metrics come with the first stage
                    metrics.update(replies.metrics)
                outcome = collect(state, replies.payloads)
                stage_s[str(stage)] = round(time.monotonic() - stage_started, 4)
                if stage is Stage.UNMASK:
                    result = outcome
                else:
                    requests = outcome
        except (ThresholdNotMet, SecAggError) as err:
            extra["status"] = "secure-aggregation-failed"
            extra["secagg"]["failure"] = f"{type(err).__name__}: {err}"
            logger.error("round %d: secure aggregation failed, global state unchanged: %s", server_round, err)
        for node, reason in sorted(state.rejected.items()):
            failures.append(ClientFailure(targets[node], f"secure aggregation rejected a message: {reason}", node))
        failures.sort(key=lambda f: (f.client_id if f.client_id is not None else -1, f.node_id))
        extra["secagg"]["protocol_s"] = round(time.monotonic() - started, 3)
        if result is None:
            return SecureRound(None, (), {}, failures, bytes_down, bytes_up, extra)
        new = flatten(arrays) + result.mean  # (d,) global + weighted mean delta
        extra["secagg"].update(
            error_bound=result.error_bound,
            survivors=list(result.survivors),
            dropped=list(result.dropped),
            clipped_coordinates=int(sum(metrics.get(c, {}).get(SecAggKey.CLIPPED, 0) for c in result.survivors)),
        )
        survivors = set(result.survivors)
        if len(survivors) < federation.min_clients:
            extra["status"] = "insufficient-replies"
            logger.warning(
                "round %d: %d clients survived secure aggregation, min-clients is %d; global state unchanged",
                server_round,
                len(survivors),
                federation.min_clients,
            )
            return SecureRound(None, (), {}, failures, bytes_down, bytes_up, extra)
        train_metrics = {str(c): m for c, m in sorted(metrics.items()) if c in survivors}
        return SecureRound(
            unflatten(new, arrays), result.survivors, train_metrics, failures, bytes_down, bytes_up, extra
        )

    def _ckks_round(
        self,
        grid: Grid,
        targets: Mapping[int, int],
        arrays: Mapping[str, NDArray[Any]],
        server_round: int,
        federation: Any,
    ) -> SecureRound:
        """One CKKS round: the encrypted global state (or, before the first aggregation, the public initial state)
        down; Enc(w * local state) up; the server adds the ciphertexts with its key-less context and keeps the sum
        as the new encrypted global state (``arrays`` of the result stays None: the server cannot read it)."""
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict

        from fedmpt.apps.messages import Key, RecordName, to_array_record
        from secagg import ckks

        assert self._ckks is not None  # internal: only called in mode ckks
        context, cfg, key_id = self._ckks
        timeout_s = float(federation.round_timeout_s)
        started = time.monotonic()
        extra: dict[str, Any] = {
            "secure_aggregation": self.config.mode.value,
            "secagg": self.describe(len(targets)),
            "evaluation": "federated",
        }
        plain = to_array_record(arrays) if self.encrypted is None else None
        messages, bytes_down = [], 0
        for node_id in (targets[c] for c in sorted(targets)):
            config = ConfigRecord(
                {
                    Key.SERVER_ROUND: server_round,
                    SecAggKey.STAGE: str(Stage.CKKS),
                    SecAggKey.PAYLOAD: self.encrypted or b"",
                    SecAggKey.CKKS_RUN: self.run_id,
                    SecAggKey.CKKS_ROUND: self.encrypted_round,
                }
            )
            content = RecordDict({RecordName.CONFIG: config})
            bytes_down += len(self.encrypted or b"")
            if plain is not None:
                content[RecordName.ARRAYS] = plain
                bytes_down += plain.count_bytes()
            messages.append(
                Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN, group_id=f"{server_round}-ckks")
            )
        replies = _collect(grid, messages, Stage.CKKS, dict(targets), timeout_s)
        failures = list(replies.failures)
        if len(replies.payloads) < federation.min_clients:
            extra["status"] = "insufficient-replies"
            logger.warning(
                "round %d: %d CKKS uploads, min-clients is %d; global state unchanged",
                server_round,
                len(replies.payloads),
                federation.min_clients,
            )
            return SecureRound(None, (), {}, failures, bytes_down, replies.bytes_up, extra)
        try:
            aggregate = ckks.aggregate(
                context, cfg, replies.payloads, run_id=self.run_id, round_number=server_round, key_id=key_id
            )
        except SecAggError as err:
            extra["status"] = "secure-aggregation-failed"
            extra["secagg"]["failure"] = f"{type(err).__name__}: {err}"
            logger.error("round %d: CKKS aggregation failed, global state unchanged: %s", server_round, err)
            return SecureRound(None, (), {}, failures, bytes_down, replies.bytes_up, extra)
        self.encrypted, self.encrypted_round = aggregate, server_round
        replied = tuple(sorted(replies.payloads))
        extra["secagg"]["protocol_s"] = round(time.monotonic() - started, 3)
        extra["secagg"]["clipped_coordinates"] = int(
            sum(replies.metrics.get(c, {}).get(SecAggKey.CLIPPED, 0) for c in replied)
        )
        train_metrics = {str(c): m for c, m in sorted(replies.metrics.items()) if c in replies.payloads}
        return SecureRound(None, replied, train_metrics, failures, bytes_down, replies.bytes_up, extra)
