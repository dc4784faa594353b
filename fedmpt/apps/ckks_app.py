"""CKKS on Flower: the :class:`CkksAggregator` (server) and the nodes' handlers, over :mod:`secagg.ckks`.

One ``train`` exchange per round (``secagg-stage`` = ``ckks``). The server sends the global state as the **set of
signed uploads** of the last aggregated round (before the first aggregation: the public initial state in the
clear). Each client verifies every upload's Ed25519 signature against the kit's roster, checks there are at least
t distinct senders bound to this run and that round, recomputes their homomorphic sum itself and decrypts only
that (:func:`secagg.ckks.decrypt_verified`, which also rounds the decrypted values); it trains (plain ``train``
handler) and replies with Enc(w_u * local_u), slots [w_u, 1], signed by its identity. The key-less server checks
the signatures, validates the uploads by adding them (:func:`secagg.ckks.aggregate`) and keeps them as the new
encrypted global state: decrypted, their sum is ``sum_u w_u local_u / sum_u w_u``, FedAvg itself. The server
never decrypts anything; evaluate messages carry the same signed set and every evaluating client verifies and
decrypts it before evaluating on its own test split (federated evaluation).

Trust: every client holds the one CKKS secret key, and clients receive every upload of the round (to re-sum it),
so CKKS hides updates from the server only: any client can decrypt another's upload, and the server colluding
with any one client reads every upload (docs/secure_aggregation.md section 5). A threshold CKKS, in which no
client holds the whole key, is not available on Python 3.11 here (section 5.3).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fedmpt.apps.aggregators import Arrays, RoundOutcome, Status, check_kit_for_run, sort_failures
from fedmpt.apps.kit import CKKS_STATE_RANGE, Kit, RoundCounter, load_run_kit
from fedmpt.apps.secagg_config import Mode, SecAggKey, Stage
from fedmpt.apps.secure_aggregation import (
    client_setup,
    collect_stage,
    forward_records,
    local_update,
    payload_of,
    server_round_of,
    stage_reply,
    weight_from,
)
from fedmpt.apps.update_vector import flatten, unflatten
from fedmpt.errors import ConfigError, SecureAggregationError
from fedmpt.rundir import ClientFailure
from secagg import wire
from secagg.errors import MessageRejected, SecAggError

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.serverapp import Grid

    from fedmpt.apps.config import AppConfig, FederationConfig

logger = logging.getLogger("flwr.fedmpt.secagg")

#: Names under which the encrypted global state travels in an ``ArrayRecord`` (evaluate messages, checkpoints).
CKKS_STATE_ARRAY = "secagg.ckks-signed-uploads"
CKKS_BINDING_ARRAY = "secagg.ckks-binding"
_SET_MAGIC = b"FMCU"
_SET_VERSION = 1


def encode_upload_set(uploads: Mapping[int, bytes]) -> bytes:
    """The signed uploads of one round as one blob: ``FMCU`` u8 version, u32 n, (u64 sender, u32 length, bytes)*."""
    parts = [_SET_MAGIC, struct.pack("<BI", _SET_VERSION, len(uploads))]
    parts += [struct.pack("<QI", u, len(uploads[u])) + uploads[u] for u in sorted(uploads)]
    return b"".join(parts)


def decode_upload_set(blob: bytes) -> dict[int, bytes]:
    """Inverse of :func:`encode_upload_set`; MessageRejected on bad magic, duplicates, truncation, trailing bytes."""
    r = wire.Reader(bytes(blob), "CKKS upload set")
    if r.take(4) != _SET_MAGIC or r.u8() != _SET_VERSION:
        raise MessageRejected("CKKS upload set: bad magic or version")
    out: dict[int, bytes] = {}
    for _ in range(r.u32()):
        sender = r.u64()
        if sender in out:
            raise MessageRejected(f"CKKS upload set: two uploads from node {sender}")
        out[sender] = r.take(r.u32())
    r.done()
    return out


def _bind(run_id: bytes, round_number: int) -> NDArray[np.uint8]:
    return np.frombuffer(run_id + struct.pack("<Q", round_number), dtype=np.uint8).copy()


def _unbind(binding: NDArray[Any]) -> tuple[bytes, int]:
    raw = np.asarray(binding, dtype=np.uint8).tobytes()
    if len(raw) != 24:
        raise SecureAggregationError(f"CKKS state binding must be 24 bytes, got {len(raw)}")
    return raw[:16], int(struct.unpack("<Q", raw[16:])[0])


# ------------------------------------------------------------------------------------------ client


def _client_kit(setup: Any) -> tuple[Kit, Any]:
    from secagg import ckks

    if setup.config.mode is not Mode.CKKS:
        raise SecureAggregationError(f"got a CKKS message but this run's secure-aggregation is {setup.config.mode}")
    kit = Kit.load(setup.kit)
    return kit, ckks.load_kit(kit.ckks_dir / "client")


def _verified_state(setup: Any, kit: Kit, ckks_kit: Any, blob: bytes, run_id: bytes, state_round: int) -> Arrays:
    """The global state from the signed uploads of round ``state_round`` (names and shapes from the task)."""
    from fedmpt.apps import task
    from secagg import ckks

    if run_id != kit.params.run_id:
        raise MessageRejected(f"CKKS state of run {run_id.hex()}, this node is pinned to {kit.params.run_id.hex()}")
    context, cfg, key_id = ckks_kit
    result = ckks.decrypt_verified(
        context,
        cfg,
        decode_upload_set(blob),
        kit.roster,
        run_id=run_id,
        round_number=state_round,
        key_id=key_id,
        threshold=kit.params.threshold,
    )
    return unflatten(result.mean, task.initial_arrays(setup.task, setup.seed))


def client_train(
    msg: Message, context: Context, overrides: Mapping[str, Any], plain_train: Callable[[Message], Message]
) -> Message:
    """CKKS: verify and decrypt the global state (if encrypted), train, reply with a signed Enc(w * local)."""
    from fedmpt.apps.messages import RecordName, to_array_record
    from secagg import ckks

    setup = client_setup(context, overrides)
    kit, ckks_kit = _client_kit(setup)
    config = msg.content.config_records[RecordName.CONFIG]
    server_round = server_round_of(msg)
    run_id = config.get(SecAggKey.CKKS_RUN)
    if run_id != kit.params.run_id:
        raise MessageRejected(f"CKKS train message for run {run_id!r}, this node is pinned to the kit's run")
    payload = payload_of(msg)
    if payload:  # the signed uploads of the previous aggregation (round secagg-ckks-round)
        state_round = config.get(SecAggKey.CKKS_ROUND)
        if isinstance(state_round, bool) or not isinstance(state_round, int) or not 0 < state_round < server_round:
            raise MessageRejected(f"CKKS state of round {state_round!r} cannot seed round {server_round}")
        state = _verified_state(setup, kit, ckks_kit, payload, kit.params.run_id, state_round)
        msg.content[RecordName.ARRAYS] = to_array_record(state)
    elif RecordName.ARRAYS not in msg.content.array_records:
        raise SecureAggregationError("CKKS train message carries neither an encrypted nor a plain global state")
    RoundCounter.for_node(setup.state_dir, setup.partition_id).claim(kit.params.run_id, server_round)
    reply = plain_train(msg)
    if reply.has_error():
        return reply
    local = local_update(reply)
    metrics = dict(reply.content.metric_records[RecordName.METRICS])
    weight = weight_from(metrics)
    context_, cfg, key_id = ckks_kit
    vector = flatten(local)  # (d,)
    metrics[SecAggKey.CLIPPED] = int(np.sum(np.abs(vector) > cfg.clip_range))
    upload = ckks.encrypt_update(
        context_,
        cfg,
        vector,
        weight,
        run_id=kit.params.run_id,
        round_number=server_round,
        sender=setup.partition_id,
        key_id=key_id,
    )
    signed = ckks.sign_upload(kit.identity(setup.partition_id), upload)
    return forward_records(reply, stage_reply(msg, Stage.CKKS, signed, metrics))


def carries_encrypted_state(msg: Message) -> bool:
    """Whether an evaluate message carries the CKKS state instead of plain arrays."""
    from fedmpt.apps.messages import RecordName

    record = msg.content.array_records.get(RecordName.ARRAYS)
    return record is not None and CKKS_STATE_ARRAY in record


def client_evaluate(
    msg: Message, context: Context, overrides: Mapping[str, Any], plain_evaluate: Callable[[Message], Message]
) -> Message:
    """Verify and decrypt the CKKS state of an evaluate message, then evaluate it on this client's test split."""
    from fedmpt.apps.messages import RecordName, from_array_record, to_array_record

    setup = client_setup(context, overrides)
    kit, ckks_kit = _client_kit(setup)
    arrays = from_array_record(msg.content.array_records[RecordName.ARRAYS])
    run_id, state_round = _unbind(arrays[CKKS_BINDING_ARRAY])
    blob = np.asarray(arrays[CKKS_STATE_ARRAY], dtype=np.uint8).tobytes()
    msg.content[RecordName.ARRAYS] = to_array_record(_verified_state(setup, kit, ckks_kit, blob, run_id, state_round))
    return plain_evaluate(msg)


# ------------------------------------------------------------------------------------------ server


class CkksAggregator:
    """The server's side of CKKS for one run: the key-less context and the encrypted global state (the signed
    uploads of the last aggregated round)."""

    mode = Mode.CKKS
    encrypted_model = True

    def __init__(self, kit: Kit, ckks_kit: tuple[Any, Any, bytes], max_weight: int) -> None:
        self.kit = kit
        self._ckks = ckks_kit
        self.max_weight = max_weight
        self.uploads: dict[int, bytes] = {}
        self.state_round = 0

    def __repr__(self) -> str:
        return f"CkksAggregator(nodes={len(self.kit.roster)}, t={self.kit.params.threshold})"

    @classmethod
    def create(cls, app_config: AppConfig, run_path: Path) -> CkksAggregator:
        """Load (or, in a simulation, provision) the kit; the server gets the key-less context only."""
        from fedmpt.apps import task
        from secagg import ckks

        cfg = app_config.secure_aggregation
        fed = app_config.federation
        num_clients = app_config.task.num_clients
        max_weight = task.max_client_examples(app_config.task, fed.seed)
        kit = load_run_kit(
            cfg.key_dir,
            run_path,
            num_clients,
            threshold=cfg.threshold,
            ckks_max_weight=max_weight,
            ckks_state_range=CKKS_STATE_RANGE,
        )
        check_kit_for_run(app_config, kit)
        server_kit = kit.ckks_dir / "server"
        context, ckks_cfg, key_id = ckks.load_kit(server_kit)
        if context.is_private():
            raise ConfigError(f"{server_kit} holds the CKKS secret key; the server must get the server kit only")
        if ckks_cfg.max_clients < num_clients or ckks_cfg.max_weight < max_weight:
            raise ConfigError(
                f"CKKS kit {server_kit} is sized for {ckks_cfg.max_clients} clients of weight <= "
                f"{ckks_cfg.max_weight}; the run needs {num_clients} clients of weight <= {max_weight} "
                "(train-per-client): provision with --ckks-max-clients/--ckks-max-weight"
            )
        return cls(kit, (context, ckks_cfg, key_id), max_weight)

    def outgoing(self, arrays: Mapping[str, NDArray[Any]]) -> Mapping[str, NDArray[Any]]:
        """``arrays`` before the first aggregation, then the signed uploads of the last aggregated round."""
        if not self.uploads:
            return arrays
        return {
            CKKS_STATE_ARRAY: np.frombuffer(encode_upload_set(self.uploads), dtype=np.uint8).copy(),
            CKKS_BINDING_ARRAY: _bind(self.kit.params.run_id, self.state_round),
        }

    def restore(self, arrays: Mapping[str, NDArray[Any]]) -> Arrays:
        """Resume: take back the encrypted state of a checkpoint written via :meth:`outgoing`."""
        if CKKS_STATE_ARRAY in arrays:
            run_id, self.state_round = _unbind(arrays[CKKS_BINDING_ARRAY])
            if run_id != self.kit.params.run_id:
                raise ConfigError("the checkpoint's CKKS state belongs to another kit's run")
            self.uploads = decode_upload_set(np.asarray(arrays[CKKS_STATE_ARRAY], dtype=np.uint8).tobytes())
        return dict(arrays)

    def describe(self) -> dict[str, Any]:
        _, cfg, key_id = self._ckks
        return {
            "scheme": "CKKS (TenSEAL)",
            "poly_modulus_degree": cfg.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(cfg.coeff_mod_bit_sizes),
            "scale_bits": cfg.scale_bits,
            "clip_range": cfg.clip_range,
            "max_weight": cfg.max_weight,
            "threshold": self.kit.params.threshold,
            "key_id": key_id.hex(),
        }

    def _verify(
        self, uploads: Mapping[int, bytes], server_round: int
    ) -> tuple[dict[int, bytes], dict[int, bytes], dict[int, str]]:
        """(signed uploads whose signature verifies, their inner UPLOADs, {node: why not}): an honest server drops
        what clients would refuse (:func:`secagg.ckks.verify_signed_upload`, the clients' own check)."""
        from secagg import ckks

        good: dict[int, bytes] = {}
        inner: dict[int, bytes] = {}
        bad: dict[int, str] = {}
        run_id = self.kit.params.run_id
        for node, data in sorted(uploads.items()):
            try:
                upload = ckks.verify_signed_upload(
                    self.kit.roster, data, run_id=run_id, round_number=server_round, node=node
                )
            except (SecAggError, ConfigError) as err:
                bad[node] = str(err)
                continue
            good[node], inner[node] = data, upload
        return good, inner, bad

    def train_round(
        self,
        grid: Grid,
        targets: Mapping[int, int],
        arrays: Mapping[str, NDArray[Any]],
        server_round: int,
        federation: FederationConfig,
    ) -> RoundOutcome:
        """One CKKS round: the verifiable encrypted state (or the public initial state) down, signed uploads up."""
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict

        from fedmpt.apps.messages import Key, RecordName, to_array_record
        from secagg import ckks

        self.kit.check_participants(targets, server_round)
        context, cfg, key_id = self._ckks
        timeout_s = float(federation.round_timeout_s)
        started = time.monotonic()
        extra: dict[str, Any] = {
            "secure_aggregation": self.mode.value,
            "secagg": self.describe(),
        }
        blob = encode_upload_set(self.uploads) if self.uploads else b""
        plain = None
        if not self.uploads:  # the public initial state goes down in the clear; it must fit the kit's range
            largest = max((float(np.max(np.abs(a))) for a in arrays.values()), default=0.0)
            if largest > cfg.clip_range / 2:
                raise ConfigError(
                    f"CKKS kit {self.kit.ckks_dir} clips every state value to +-{cfg.clip_range:g}, but the initial "
                    f"state already reaches {largest:.3g}: provision with a larger --ckks-clip-range (default "
                    f"{CKKS_STATE_RANGE:g})"
                )
            plain = to_array_record(arrays)
        messages, bytes_down = [], 0
        for node_id in (targets[c] for c in sorted(targets)):
            config = ConfigRecord(
                {
                    Key.SERVER_ROUND: server_round,
                    SecAggKey.STAGE: str(Stage.CKKS),
                    SecAggKey.PAYLOAD: blob,
                    SecAggKey.CKKS_RUN: self.kit.params.run_id,
                    SecAggKey.CKKS_ROUND: self.state_round,
                }
            )
            content = RecordDict({RecordName.CONFIG: config})
            bytes_down += len(blob)
            if plain is not None:
                content[RecordName.ARRAYS] = plain
                bytes_down += plain.count_bytes()
            messages.append(
                Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN, group_id=f"{server_round}-ckks")
            )
        replies = collect_stage(grid, messages, Stage.CKKS, dict(targets), timeout_s)
        failures = list(replies.failures)
        good, inner, bad = self._verify(replies.payloads, server_round)
        for node, reason in bad.items():
            failures.append(ClientFailure(targets[node], f"CKKS upload refused: {reason}", node))
        sort_failures(failures)
        outcome = RoundOutcome(None, (), {}, failures, bytes_down, replies.bytes_up, extra=extra)
        needed = max(federation.min_clients, self.kit.params.threshold)
        if len(good) < needed:
            outcome.status = Status.INSUFFICIENT
            logger.warning(
                "round %d: %d valid CKKS uploads, need %d (min-clients, threshold); global state unchanged",
                server_round,
                len(good),
                needed,
            )
            return outcome
        try:  # validates binding, key set and sizes by adding them (the server cannot decrypt the sum)
            ckks.aggregate(
                context,
                cfg,
                inner,
                run_id=self.kit.params.run_id,
                round_number=server_round,
                key_id=key_id,
            )
        except SecAggError as err:
            outcome.status = Status.SECAGG_FAILED
            extra["secagg"]["failure"] = f"{type(err).__name__}: {err}"
            logger.error("round %d: CKKS aggregation failed, global state unchanged: %s", server_round, err)
            return outcome
        self.uploads, self.state_round = good, server_round
        replied = tuple(sorted(good))
        extra["secagg"]["protocol_s"] = round(time.monotonic() - started, 3)
        extra["secagg"]["clipped_coordinates"] = int(
            sum(replies.metrics.get(c, {}).get(SecAggKey.CLIPPED, 0) for c in replied)
        )
        outcome.replied = replied
        outcome.train_metrics = {str(c): m for c, m in sorted(replies.metrics.items()) if c in good}
        return outcome
