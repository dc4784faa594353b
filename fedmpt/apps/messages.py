"""What the ServerApp and ClientApp put in Flower messages: record names, keys, and numpy <-> ArrayRecord.

One place for the wire vocabulary of the apps, so both sides agree and the secure-aggregation stages can add
their own keys beside these. Arrays travel in an ``ArrayRecord`` (Flower's own serialization of numpy
arrays; never pickle), scalars in ``ConfigRecord`` (server to client) and ``MetricRecord`` (client to server).

Protocol of one round (message types are Flower's ``query``/``train``/``evaluate``):

* ``query`` (once per node): empty config; the reply's config names the node's ``partition-id`` and
  ``num-partitions``, so the server keys clients by partition, which is stable across restarts (node ids
  are not; the simulation draws new ones every run).
* ``train``: ``arrays`` = global state, ``config`` = {``server-round``}; reply ``arrays`` = the local state,
  ``metrics`` = {``num-examples``, ``partition-id``, training metrics}.
* ``evaluate``: ``arrays`` = global state, ``config`` = {``server-round``}; reply ``metrics`` = {``mAP``,
  ``CF1``, ``OF1``, ``num-examples``, ``partition-id``}.
* ``train`` with ``secure-aggregation = "masking"`` (:mod:`fedmpt.apps.secure_aggregation`): four ``train``
  exchanges per round, the stage named by ``secagg-stage`` (``advertise``, ``share-keys``, ``masked-input``,
  ``unmask``) and the :mod:`secagg.wire` bytes in ``secagg-payload``, both in ``config``; only ``advertise``
  carries ``arrays`` (the global state). Replies carry no arrays and no ``num-examples`` (the weight is inside
  the masked vector): ``config`` = {``secagg-stage``, ``secagg-payload``}, and for ``advertise`` ``metrics`` =
  the training metrics, ``partition-id`` and ``secagg-clipped``.
* ``train`` with ``secure-aggregation = "ckks"``: one exchange, ``secagg-stage`` = ``ckks``; ``config`` also holds
  ``secagg-payload`` (the encrypted global state, empty before the first aggregation, when ``arrays`` carries the
  public initial state), ``secagg-ckks-run`` and ``secagg-ckks-round`` (what that ciphertext is bound to); the
  reply's ``secagg-payload`` is the client's CKKS upload. ``evaluate`` then carries the ciphertext as uint8
  arrays ``secagg.ckks-aggregate`` and ``secagg.ckks-binding`` instead of the state.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from enum import StrEnum
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp import Grid
from numpy.typing import NDArray

from fedmpt.rundir import ClientFailure

logger = logging.getLogger("flwr.fedmpt.server")  # the exchanges are the server's: its log shows them


class RecordName(StrEnum):
    """Names of the records inside a message's ``RecordDict``."""

    ARRAYS = "arrays"
    CONFIG = "config"
    METRICS = "metrics"


class Key(StrEnum):
    """Keys inside the config and metric records."""

    SERVER_ROUND = "server-round"
    PARTITION_ID = "partition-id"
    NUM_PARTITIONS = "num-partitions"
    NUM_EXAMPLES = "num-examples"


def to_array_record(arrays: Mapping[str, NDArray[Any]]) -> ArrayRecord:
    """An ``ArrayRecord`` holding ``arrays`` under their names, in sorted order."""
    return ArrayRecord({name: Array(np.ascontiguousarray(arrays[name])) for name in sorted(arrays)})


def from_array_record(record: ArrayRecord) -> dict[str, NDArray[Any]]:
    """The numpy arrays of an ``ArrayRecord`` by name."""
    return {name: array.numpy() for name, array in record.items()}


def collect_replies(
    grid: Grid,
    messages: Iterable[Message],
    client_of: Mapping[int, int],
    timeout_s: float,
    failures: list[ClientFailure],
    *,
    label: str,
    failure_prefix: str = "",
) -> Iterator[tuple[int, int, Message]]:
    """Send ``messages`` and yield ``(client id, node id, reply)`` for each error-free first reply of a node in
    ``client_of`` (node id -> client id).

    Replies from other nodes, and second replies, are logged and ignored. An error reply, and (once the replies
    are exhausted) every node that did not answer within ``timeout_s``, is appended to ``failures`` with a reason
    starting with ``failure_prefix``; the caller appends its own failures (malformed replies) in between, so the
    list keeps the order in which things happened. ``label`` names the exchange in the log.
    """
    answered: set[int] = set()
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        node_id = reply.metadata.src_node_id
        if node_id not in client_of or node_id in answered:
            logger.warning("ignoring an unexpected %s reply from node %s", label, node_id)
            continue
        answered.add(node_id)
        client_id = client_of[node_id]
        if reply.has_error():
            reason = f"{failure_prefix}error {reply.error.code}: {reply.error.reason}"
            failures.append(ClientFailure(node_id, reason, client_id=client_id))
            continue
        yield client_id, node_id, reply
    for node_id, client_id in client_of.items():
        if node_id not in answered:
            reason = f"{failure_prefix}no reply within {timeout_s:g} s"
            failures.append(ClientFailure(node_id, reason, client_id=client_id))
