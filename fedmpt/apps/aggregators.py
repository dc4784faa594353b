"""One interface for how a round's updates reach the server: plain FedAvg, pairwise masking, CKKS.

The ServerApp's round loop calls an :class:`Aggregator` the same way whatever the protection mode, as a Flower
strategy wraps a round: ``train_round`` runs the round's training exchange(s) and returns the new global state (or
None: unchanged) in a :class:`RoundOutcome`; ``outgoing`` is what evaluators and checkpoints get (the state, or
for CKKS the verifiable encrypted state); ``restore`` takes a checkpoint back on resume. :func:`build_aggregator`
picks the implementation from the run config:

* :class:`PlainAggregator` (``secure-aggregation = "none"``): one ``train`` exchange, example-weighted FedAvg of
  the replies (:func:`fedmpt.apps.task.aggregate`); the server sees every update.
* :class:`fedmpt.apps.masking_app.MaskingAggregator`: the five masking stages of :mod:`secagg.masking`.
* :class:`fedmpt.apps.ckks_app.CkksAggregator`: one exchange of signed CKKS uploads (:mod:`secagg.ckks`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray

from fedmpt.apps.messages import Key, RecordName, collect_replies, from_array_record, to_array_record
from fedmpt.apps.secagg_config import Mode
from fedmpt.errors import ConfigError
from fedmpt.rundir import ClientFailure

if TYPE_CHECKING:
    from flwr.app import Message
    from flwr.serverapp import Grid

    from fedmpt.apps.config import AppConfig, FederationConfig
    from fedmpt.apps.kit import Kit

logger = logging.getLogger("flwr.fedmpt.server")

Arrays = dict[str, NDArray[Any]]


class Status:
    """Values of a round's ``status`` in ``metrics.jsonl``."""

    OK = "ok"
    INSUFFICIENT = "insufficient-replies"
    SECAGG_FAILED = "secure-aggregation-failed"


@dataclass
class RoundOutcome:
    """What one training round produced, for the round line.

    ``arrays`` is the new global state the server can read, or None when it is unchanged (a failed round) or not
    readable by the server (CKKS keeps its encrypted state itself).
    """

    arrays: Arrays | None
    replied: tuple[int, ...]
    train_metrics: dict[str, dict[str, float]]
    failures: list[ClientFailure]
    bytes_down: int
    bytes_up: int
    status: str = Status.OK
    extra: dict[str, Any] = field(default_factory=dict)


class Aggregator(Protocol):
    """How one round's updates are collected and combined; the round loop never branches on the mode."""

    mode: Mode

    @property
    def kit(self) -> Kit | None:
        """The provisioned identities and protocol parameters (None: plain FedAvg, which needs no kit)."""
        ...

    @property
    def encrypted_model(self) -> bool:
        """True when the server cannot read the global state (clients evaluate it: federated evaluation)."""
        ...

    def restore(self, arrays: Mapping[str, NDArray[Any]]) -> Arrays:
        """Resume: take back the state a checkpoint holds (written from :meth:`outgoing`)."""
        ...

    def outgoing(self, arrays: Mapping[str, NDArray[Any]]) -> Mapping[str, NDArray[Any]]:
        """What evaluators and checkpoints get for the global state ``arrays``."""
        ...

    def train_round(
        self,
        grid: Grid,
        targets: Mapping[int, int],
        arrays: Mapping[str, NDArray[Any]],
        server_round: int,
        federation: FederationConfig,
    ) -> RoundOutcome:
        """Run round ``server_round``'s training over ``targets`` (client id -> node id) from ``arrays``."""
        ...


# ------------------------------------------------------------------------------------------ plain exchanges


@dataclass(frozen=True)
class Reply:
    """One client's parsed reply to a plain exchange."""

    client_id: int
    node_id: int
    arrays: Arrays | None
    metrics: dict[str, float]
    bytes_up: int


def exchange(
    grid: Grid,
    message_type: str,
    targets: Mapping[int, int],
    arrays: Mapping[str, NDArray[Any]],
    server_round: int,
    timeout_s: float,
    expect_arrays: Mapping[str, tuple[int, ...]] | None,
) -> tuple[list[Reply], list[ClientFailure], int]:
    """Send ``arrays`` to every client in ``targets`` (client id -> node id); collect replies and failures.

    ``expect_arrays`` (names -> shapes) makes a reply without exactly those finite arrays and a positive example
    count a failure; None expects metrics only (evaluation).
    """
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedmpt.apps import privacy_hooks

    record = to_array_record(arrays)
    messages = [
        Message(
            RecordDict({RecordName.ARRAYS: record, RecordName.CONFIG: ConfigRecord({Key.SERVER_ROUND: server_round})}),
            dst_node_id=node_id,
            message_type=message_type,
            group_id=str(server_round),
        )
        for node_id in targets.values()
    ]
    bytes_down = record.count_bytes() * len(messages)
    client_of = {node_id: client_id for client_id, node_id in targets.items()}
    replies: list[Reply] = []
    failures: list[ClientFailure] = []
    for client_id, node_id, reply in collect_replies(
        grid, messages, client_of, timeout_s, failures, label=message_type
    ):
        refusal = privacy_hooks.refusal_reason(reply)  # a DP node over its budget: not an error, no update
        if refusal is not None:
            failures.append(ClientFailure(node_id, refusal, client_id=client_id))
            continue
        problem, parsed = _parse_reply(reply, expect_arrays)
        if problem:
            failures.append(ClientFailure(node_id, f"malformed reply: {problem}", client_id=client_id))
            continue
        reply_arrays, metrics, bytes_up = parsed
        replies.append(Reply(client_id, node_id, reply_arrays, metrics, bytes_up))
    replies.sort(key=lambda r: r.client_id)
    sort_failures(failures)
    return replies, failures, bytes_down


def sort_failures(failures: list[ClientFailure]) -> None:
    """In place: by client id (unknown first), then node id."""
    failures.sort(key=lambda f: (f.client_id if f.client_id is not None else -1, f.node_id))


def _parse_reply(
    reply: Message, expect_arrays: Mapping[str, tuple[int, ...]] | None
) -> tuple[str, tuple[Arrays | None, dict[str, float], int]]:
    metric_records = reply.content.metric_records
    if RecordName.METRICS not in metric_records:
        return "no metrics record", (None, {}, 0)
    metrics = {k: float(v) for k, v in metric_records[RecordName.METRICS].items() if isinstance(v, int | float)}
    if expect_arrays is None:
        return "", (None, metrics, 0)
    record = reply.content.array_records.get(RecordName.ARRAYS)
    if record is None:
        return "no arrays record", (None, metrics, 0)
    arrays = from_array_record(record)
    shapes = {name: tuple(a.shape) for name, a in arrays.items()}
    if shapes != dict(expect_arrays):
        return f"arrays {shapes} differ from the global state {dict(expect_arrays)}", (None, metrics, 0)
    if not all(np.all(np.isfinite(a)) for a in arrays.values()):
        return "non-finite values in the arrays", (None, metrics, 0)
    if metrics.get(Key.NUM_EXAMPLES, 0.0) <= 0:
        return f"{Key.NUM_EXAMPLES} must be > 0, got {metrics.get(Key.NUM_EXAMPLES)}", (None, metrics, 0)
    return "", (arrays, metrics, record.count_bytes())


class PlainAggregator:
    """``secure-aggregation = "none"``: one ``train`` exchange and example-weighted FedAvg of the local states.

    The server sees every client's update in the clear: an explicit choice, logged when the run starts.
    """

    mode = Mode.NONE
    encrypted_model = False
    kit: Kit | None = None

    def restore(self, arrays: Mapping[str, NDArray[Any]]) -> Arrays:
        return dict(arrays)

    def outgoing(self, arrays: Mapping[str, NDArray[Any]]) -> Mapping[str, NDArray[Any]]:
        return arrays

    def train_round(
        self,
        grid: Grid,
        targets: Mapping[int, int],
        arrays: Mapping[str, NDArray[Any]],
        server_round: int,
        federation: FederationConfig,
    ) -> RoundOutcome:
        from flwr.app import MessageType

        from fedmpt.apps import task

        shapes = {name: tuple(a.shape) for name, a in arrays.items()}
        replies, failures, bytes_down = exchange(
            grid, MessageType.TRAIN, targets, arrays, server_round, federation.round_timeout_s, shapes
        )
        outcome = RoundOutcome(
            None,
            tuple(r.client_id for r in replies),
            {str(r.client_id): r.metrics for r in replies},
            failures,
            bytes_down,
            sum(r.bytes_up for r in replies),
            extra={"secure_aggregation": Mode.NONE.value},
        )
        if len(replies) < federation.min_clients:
            outcome.status = Status.INSUFFICIENT
            logger.warning(
                "round %d: %d of %d sampled clients replied, min-clients is %d; global state unchanged",
                server_round,
                len(replies),
                len(targets),
                federation.min_clients,
            )
            return outcome
        outcome.arrays = task.aggregate(
            [(r.arrays, int(r.metrics[Key.NUM_EXAMPLES])) for r in replies if r.arrays is not None]
        )
        return outcome


def check_kit_for_run(app_config: AppConfig, kit: Kit) -> None:
    """Before round 1: the run config agrees with the kit (t and k are the kit's), the roster provisions every
    partition, and the rounds the sampler draws reach t. Each error names the key that fixes it."""
    from fedmpt.partition import participants_per_round

    cfg, fed, p = app_config.secure_aggregation, app_config.federation, kit.params
    if cfg.threshold and cfg.threshold != p.threshold:
        raise ConfigError(
            f"run config 'secagg-threshold'={cfg.threshold} differs from the kit's t={p.threshold} "
            f"({kit.path}); t is fixed at provisioning: remove 'secagg-threshold' or provision a new kit"
        )
    if cfg.neighbours and cfg.neighbours != p.neighbours:
        raise ConfigError(
            f"run config 'secagg-neighbours'={cfg.neighbours} differs from the kit's k={p.neighbours} "
            f"({kit.path}); remove 'secagg-neighbours' or provision a new kit"
        )
    num_clients = app_config.task.num_clients
    missing = sorted(set(range(num_clients)) - set(kit.roster))
    if missing:
        raise ConfigError(f"secure aggregation: the kit's roster {kit.path} has no identity for partitions {missing}")
    per_round = participants_per_round(num_clients, fed.fraction_train, fed.min_clients)
    if per_round < p.threshold:
        raise ConfigError(
            f"secure aggregation: rounds sample {per_round} of {num_clients} clients ('fraction-train' = "
            f"{fed.fraction_train}, 'min-clients' = {fed.min_clients}) but the kit's threshold is t = {p.threshold}: "
            "raise 'fraction-train' or 'min-clients', or provision a kit with a lower --threshold"
        )


def build_aggregator(config: AppConfig, run_path: Path) -> Aggregator:
    """The aggregator of the run config's ``secure-aggregation`` mode (loads or, in a simulation, provisions the
    kit under ``run_path``)."""
    mode = config.secure_aggregation.mode
    if mode is Mode.MASKING:
        from fedmpt.apps.masking_app import MaskingAggregator

        return MaskingAggregator.create(config, run_path)
    if mode is Mode.CKKS:
        from fedmpt.apps.ckks_app import CkksAggregator

        return CkksAggregator.create(config, run_path)
    logger.warning(
        'secure-aggregation = "none": the server sees every client\'s update in the clear (set '
        '\'secure-aggregation\' to "masking" or "ckks" to protect them)'
    )
    return PlainAggregator()


def federated_metrics(client_metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Global metrics of a model the server cannot read: the example-weighted mean of the clients' metrics on their
    own test splits (``num_examples`` is their sum)."""
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
