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

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from numpy.typing import NDArray


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
