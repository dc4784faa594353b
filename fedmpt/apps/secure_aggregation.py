"""Protected exchanges on Flower's Message API: the client-side dispatch and the message plumbing both modes share.

A protected ``train`` message carries ``secagg-stage`` and ``secagg-payload`` (the protocol bytes) in its config
record. :func:`client_train` sends it to the stage handler of its mode (:mod:`fedmpt.apps.masking_app`,
:mod:`fedmpt.apps.ckks_app`) and answers a protocol failure with an error reply naming the rule that refused it.
A node refuses to train in the clear when it is provisioned for secure aggregation (node config ``secagg-dir``) or
the run asks for protection: a server cannot simply ask for a plain ``train`` and read the update.
:func:`send_stage` and :func:`collect_stage` are the server's side of one stage exchange.

Imports neither torch nor flwr at module level: under the deployment engine every message starts a fresh
ClientApp process, and the stages after training need only numpy and cryptography.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from numpy.typing import NDArray

from fedmpt.apps.secagg_config import Mode, SecAggKey, SecureAggregationConfig, Stage, secure_aggregation_config_from
from fedmpt.errors import ConfigError, SecureAggregationError
from fedmpt.rundir import ClientFailure
from secagg.errors import SecAggError

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.serverapp import Grid

logger = logging.getLogger("flwr.fedmpt.secagg")

#: Record in the node's ``context.state`` that holds the per-round masking state.
STATE_RECORD = "secagg-state"
_ERROR_CODE = 7001  # fedmpt secure-aggregation failure on a client (Flower reserves small codes)


# ------------------------------------------------------------------------------------------ client side


@dataclass(frozen=True)
class ClientSetup:
    """What a node's stage handlers need: the run's secure-aggregation keys, its partition, its kit and counter
    directory, the weight bound and the stage timeout (and, at the training stages, the task)."""

    config: SecureAggregationConfig
    partition_id: int
    kit: Path
    state_dir: Path
    max_weight: int
    timeout_s: float
    task: Any = None  # fedmpt.apps.task.TaskConfig where the state's names and shapes are needed
    seed: int = 0


def client_setup(context: Context, overrides: Mapping[str, Any]) -> ClientSetup:
    """The setup from the run config and node config (imports the task: only at the stages that train)."""
    from fedmpt.apps import task
    from fedmpt.apps.config import read_app_config
    from fedmpt.apps.kit import node_kit_dir, node_state_dir
    from fedmpt.apps.node_config import read_node_config

    app = read_app_config({**context.run_config, **overrides})
    node = read_node_config(context.node_config)
    fed = app.federation
    cfg = app.secure_aggregation
    kit = node_kit_dir(context.node_config, cfg.key_dir, fed.runs_dir, fed.run_name)
    return ClientSetup(
        cfg,
        node.partition_id,
        kit,
        node_state_dir(context.node_config, kit),
        task.max_client_examples(app.task, fed.seed),
        fed.round_timeout_s,
        app.task,
        fed.seed,
    )


def _protection_required(context: Context, overrides: Mapping[str, Any]) -> str | None:
    """Why this node must not send its update in the clear, or None."""
    own = context.node_config.get("secagg-dir", "")
    if isinstance(own, str) and own:
        return f"this node is provisioned for secure aggregation (node config 'secagg-dir' = {own!r})"
    mode = secure_aggregation_config_from({**context.run_config, **overrides}).mode
    if mode is not Mode.NONE:
        return f"this run's secure-aggregation is {mode.value!r}"
    return None


def client_train(
    msg: Message, context: Context, overrides: Mapping[str, Any], plain_train: Callable[[Message], Message]
) -> Message:
    """The ClientApp's ``train`` handler: protected stages go to their mode's handler, plain messages to
    ``plain_train`` unless this node must protect its update (then the plain message is refused)."""
    stage = stage_of(msg)
    try:
        if stage is None:
            reason = _protection_required(context, overrides)
            if reason is not None:
                raise SecureAggregationError(f"refusing a plain train message: {reason}")
            return plain_train(msg)
        if stage == Stage.CKKS:
            from fedmpt.apps import ckks_app

            return ckks_app.client_train(msg, context, overrides, plain_train)
        from fedmpt.apps import masking_app

        return masking_app.client_stage(msg, context, overrides, stage, plain_train)
    except (SecAggError, ConfigError, SecureAggregationError) as err:
        logger.warning("secure aggregation stage %s failed on this node: %s", stage, err)
        if STATE_RECORD in context.state:
            del context.state[STATE_RECORD]
        return error_reply(msg, f"secure aggregation stage {stage or 'plain-train'}: {type(err).__name__}: {err}")


def client_evaluate(
    msg: Message, context: Context, overrides: Mapping[str, Any], plain_evaluate: Callable[[Message], Message]
) -> Message:
    """The ClientApp's ``evaluate`` handler: an encrypted global state (CKKS) is verified and decrypted first."""
    from fedmpt.apps import ckks_app

    if not ckks_app.carries_encrypted_state(msg):
        return plain_evaluate(msg)
    try:
        return ckks_app.client_evaluate(msg, context, overrides, plain_evaluate)
    except (SecAggError, ConfigError, SecureAggregationError) as err:
        return error_reply(msg, f"secure aggregation (evaluate): {type(err).__name__}: {err}")


def stage_of(msg: Message) -> str | None:
    """The ``secagg-stage`` of a message, or None for a plain one."""
    from fedmpt.apps.messages import RecordName

    record = msg.content.config_records.get(RecordName.CONFIG)
    if record is None:
        return None
    stage = record.get(SecAggKey.STAGE)
    return stage if isinstance(stage, str) else None


def payload_of(msg: Message) -> bytes:
    """The protocol bytes of a protected message."""
    from fedmpt.apps.messages import RecordName

    payload = msg.content.config_records[RecordName.CONFIG].get(SecAggKey.PAYLOAD)
    if not isinstance(payload, bytes):
        raise SecureAggregationError(f"secure-aggregation message without a bytes '{SecAggKey.PAYLOAD}'")
    return payload


def server_round_of(msg: Message) -> int:
    """The federated round number a message carries."""
    from fedmpt.apps.messages import Key, RecordName

    value = msg.content.config_records[RecordName.CONFIG].get(Key.SERVER_ROUND)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SecureAggregationError(f"message without an integer '{Key.SERVER_ROUND}'")
    return value


def local_update(reply: Message) -> dict[str, NDArray[Any]]:
    """The local state in a successful plain-train reply; a reply without one (e.g. a DP node over its budget)
    cannot take part in secure aggregation."""
    from fedmpt.apps.messages import RecordName, from_array_record

    if RecordName.ARRAYS not in reply.content.array_records:
        raise SecureAggregationError(
            f"local training returned no update (metrics {dict(reply.content.metric_records)})"
        )
    return from_array_record(reply.content.array_records[RecordName.ARRAYS])


def weight_from(metrics: dict[str, Any]) -> int:
    """Pop the example count from ``metrics``: under protection the weight travels only inside the protected
    vector."""
    from fedmpt.apps.messages import Key

    count = metrics.pop(Key.NUM_EXAMPLES, None)
    if not isinstance(count, int | float) or isinstance(count, bool) or count != int(count) or count < 1:
        raise SecureAggregationError(f"local training reported {Key.NUM_EXAMPLES} = {count!r}, need an integer >= 1")
    return int(count)


def stage_reply(msg: Message, stage: str, payload: bytes, metrics: Mapping[str, Any] | None = None) -> Message:
    """A protected reply: the stage, its protocol bytes and (optionally) metrics."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from fedmpt.apps.messages import RecordName

    content = RecordDict({RecordName.CONFIG: ConfigRecord({SecAggKey.STAGE: stage, SecAggKey.PAYLOAD: payload})})
    content[RecordName.METRICS] = MetricRecord(dict(metrics or {}))
    return Message(content, reply_to=msg)


def forward_records(plain: Message, answer: Message) -> Message:
    """Copy the plain reply's other records (e.g. a DP ledger entry) into the protected reply."""
    from fedmpt.apps.messages import RecordName

    for name, record in plain.content.items():
        if name not in (RecordName.ARRAYS, RecordName.METRICS, RecordName.CONFIG):
            answer.content[name] = record
    return answer


def error_reply(msg: Message, reason: str) -> Message:
    """An error reply naming why this node refused."""
    from flwr.app import Error, Message

    return Message(Error(code=_ERROR_CODE, reason=reason), reply_to=msg)


# ------------------------------------------------------------------------------------------ server side


@dataclass(frozen=True)
class StageReplies:
    """The protocol bytes, metrics and failures of one stage exchange."""

    payloads: dict[int, bytes]
    metrics: dict[int, dict[str, float]]
    failures: list[ClientFailure]
    bytes_down: int
    bytes_up: int


def send_stage(
    grid: Grid,
    stage: Stage,
    requests: Mapping[int, bytes],
    node_of: Mapping[int, int],
    server_round: int,
    timeout_s: float,
    arrays: Mapping[str, NDArray[Any]] | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> StageReplies:
    """Send one stage's request bytes to each client (client id -> bytes), optionally with the global ``arrays``;
    collect the reply bytes."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from fedmpt.apps.messages import Key, RecordName, to_array_record

    record = to_array_record(arrays) if arrays is not None else None
    messages = []
    bytes_down = 0
    for client_id, payload in sorted(requests.items()):
        config: dict[str, Any] = {
            Key.SERVER_ROUND: server_round,
            SecAggKey.STAGE: str(stage),
            SecAggKey.PAYLOAD: payload,
        }
        config.update(extra_config or {})
        content = RecordDict({RecordName.CONFIG: ConfigRecord(config)})
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
    replies = collect_stage(grid, messages, stage, {c: node_of[c] for c in requests}, timeout_s)
    return StageReplies(replies.payloads, replies.metrics, replies.failures, bytes_down, replies.bytes_up)


def collect_stage(
    grid: Grid, messages: list[Message], stage: Stage, node_of: Mapping[int, int], timeout_s: float
) -> StageReplies:
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
    return StageReplies(payloads, metrics, failures, 0, bytes_up)
