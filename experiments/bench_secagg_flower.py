"""Flower 1.41's built-in SecAgg+ as a benchmark peer, run in-process, plus Flower message (de)serialization costs.

Used by ``experiments/bench_secagg.py`` (which runs every mode on the same vectors in one invocation); not a
script of its own.

What is measured for Flower's SecAgg+ (:func:`bench_flower_secaggplus`)
------------------------------------------------------------------------
Flower's own, unmodified code on both sides, exactly as a legacy-stack deployment runs it, minus the network:

* server: ``flwr.server.workflow.SecAggPlusWorkflow.__call__`` (its four stages ``setup``, ``share keys``,
  ``collect masked vectors``, ``unmask``) with a ``LegacyContext`` holding a ``FedAvg`` strategy and a
  ``SimpleClientManager`` of ``GridClientProxy`` objects, as ``DefaultWorkflow`` sets it up;
* client: ``flwr.client.mod.secaggplus_mod`` of every node, each with its own ``Context``; the "training"
  behind the mod (``call_next``) returns the benchmark vector as a legacy ``FitRes`` (what a ``NumPyClient``
  produces), and its own time is excluded;
* between them a :class:`InProcessGrid` (a ``flwr.serverapp.Grid``) that delivers each message to the node's
  mod. It copies every message through Flower's protobuf serialization (``message_to_proto`` ->
  ``SerializeToString`` -> ``ParseFromString`` -> ``message_from_proto``) in both directions, as a transport
  must (the mod mutates the records it receives, so sharing objects would not even run), and times that copy
  separately.

Reported: ``client_s`` = mean over nodes of the time inside ``secaggplus_mod`` (key generation, ECDH P-384,
Shamir via pycryptodome, Fernet, quantization, numpy ``RandomState`` masks, ``ndarray_to_bytes``) minus the
``call_next`` stand-in; ``server_s`` = wall time of the workflow minus everything inside the grid (so: the
stages' own work, Shamir reconstruction, mask removal, dequantization, and ``FedAvg.configure_fit`` /
``aggregate_fit``, the latter also reported as ``strategy_s``: the workflow hands every client's ``FitRes`` the
same aggregate and FedAvg averages those n copies again); ``up_bytes`` / ``down_bytes`` = protobuf size of the
records each node sends / receives per round (array records excluded: the model broadcast is a 1-element
placeholder here, so it is out of every mode's numbers); ``*_serde_s`` = the protobuf copy, split into the
sender's serialization and the receiver's parsing. Not measured: gRPC/HTTP framing, the SuperLink's object
store (object ids are SHA-256 hashes of the serialized objects), TLS, network.

Flower's configuration here: ``clipping_range`` equal to our clip range, ``max_weight=1`` with every node
reporting ``num_examples=1`` (unit weights, as in the other modes), default ``quantization_range=2**22`` and
``modulus_range=2**32``; ``num_shares = n`` (complete graph, Flower's ``SecAggWorkflow``) or ``k + 1`` (SecAgg+
with k neighbours; Flower counts the node itself), ``reconstruction_threshold`` = our t.

:func:`transport_costs` times the same protobuf copy for any mode's byte messages (wrapped in a ``ConfigRecord``),
and :func:`bench_none_flower` the plaintext round as Flower moves it (the update in an ``ArrayRecord``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.serde import array_record_to_proto, message_from_proto, message_to_proto, recorddict_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.server import ServerConfig, SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

_RUN_ID = 1
_SERVER_NODE_ID = 0
_TASK_ID = 1


def setup_flower_process() -> None:
    """Prepare this process the way a ServerApp process is: Flower 1.41 stamps every new Message with the
    process's ``TaskIdentity`` (run, node and task ids), which its runtime sets; and Flower logs every stage at INFO on
    the ``flwr`` logger, of which we keep warnings and errors only."""
    TaskIdentity.run_id = _RUN_ID
    TaskIdentity.node_id = _SERVER_NODE_ID
    TaskIdentity.task_id = _TASK_ID
    logging.getLogger("flwr").setLevel(logging.WARNING)


@dataclass
class Transfer:
    """One message copied through Flower's protobuf serialization."""

    message: Message
    serialize_s: float
    parse_s: float
    wire_bytes: int


def transfer(message: Message) -> Transfer:
    """Serialize ``message`` to protobuf bytes and parse it back, timing each half (what a transport does)."""
    t0 = time.perf_counter()
    raw = message_to_proto(message).SerializeToString()
    t1 = time.perf_counter()
    proto = ProtoMessage()
    proto.ParseFromString(raw)
    copy = message_from_proto(proto)
    t2 = time.perf_counter()
    return Transfer(copy, t1 - t0, t2 - t1, len(raw))


def record_bytes(content: RecordDict) -> int:
    """Protobuf size of a message's records, array records excluded (the model broadcast is not counted)."""
    arrays = sum(array_record_to_proto(r).ByteSize() for r in content.array_records.values())
    return int(recorddict_to_proto(content).ByteSize() - arrays)


@dataclass
class _Node:
    """One simulated SuperNode: its context (the mod keeps its state there), its update and its meters."""

    node_id: int
    update: np.ndarray
    context: Context
    client_s: float = 0.0
    fit_s: float = 0.0
    serde_s: float = 0.0
    up_bytes: int = 0
    down_bytes: int = 0
    errors: list[str] = field(default_factory=list)

    def fit(self, msg: Message, ctxt: Context) -> Message:
        """Stand-in for local training behind the mod: reply with the benchmark vector as a legacy FitRes."""
        t0 = time.perf_counter()
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([self.update]), 1, {})
        reply = Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)
        self.fit_s += time.perf_counter() - t0
        return reply


class InProcessGrid(Grid):
    """A Grid that hands each message to the destination node's ``secaggplus_mod`` in this process.

    Every message is copied through protobuf (see :func:`transfer`) in both directions; the time spent inside
    :meth:`send_and_receive` (mods, copies) is accumulated in ``grid_s`` so the caller can subtract it from the
    workflow's wall time.
    """

    def __init__(self, nodes: Mapping[int, _Node]) -> None:
        self.nodes = dict(nodes)
        self.grid_s = 0.0
        self.server_serde_s = 0.0

    def set_run(self, run: Any) -> None:
        raise NotImplementedError("InProcessGrid serves one benchmark round; there is no run to set")

    @property
    def run(self) -> Any:
        raise NotImplementedError("InProcessGrid has no run")

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError("SecAggPlusWorkflow builds its own messages")

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        entered = time.perf_counter()
        replies: list[Message] = []
        for msg in messages:
            node = self.nodes[msg.metadata.dst_node_id]
            down = transfer(msg)
            self.server_serde_s += down.serialize_s
            node.serde_s += down.parse_s
            node.down_bytes += record_bytes(down.message.content)
            fit_before = node.fit_s
            t0 = time.perf_counter()
            reply = secaggplus_mod(down.message, node.context, node.fit)
            node.client_s += time.perf_counter() - t0 - (node.fit_s - fit_before)
            if reply.has_error():
                node.errors.append(str(reply.error))
            up = transfer(reply)
            node.serde_s += up.serialize_s
            self.server_serde_s += up.parse_s
            node.up_bytes += record_bytes(up.message.content)
            replies.append(up.message)
        self.grid_s += time.perf_counter() - entered
        return replies


class _TimedFedAvg(FedAvg):
    """FedAvg that records the time spent in configure_fit and aggregate_fit (part of the workflow's work)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.strategy_s = 0.0

    def configure_fit(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = super().configure_fit(*args, **kwargs)
        self.strategy_s += time.perf_counter() - t0
        return out

    def aggregate_fit(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = super().aggregate_fit(*args, **kwargs)
        self.strategy_s += time.perf_counter() - t0
        return out


def bench_flower_secaggplus(
    updates: Mapping[int, np.ndarray],
    num_shares: int,
    threshold: int,
    clip_range: float,
    exact: np.ndarray,
) -> dict[str, float]:
    """One round of Flower's SecAgg+ on ``updates`` (node id -> flat vector), every node with weight 1.

    ``num_shares = len(updates)`` is the complete graph (Flower's SecAgg); an odd ``num_shares < n`` the
    SecAgg+ ring. Raises RuntimeError if the round halts or the result is further from ``exact`` than
    Flower's quantization allows (n clients, step 2c/2**22 each, stochastic rounding: |err| < n * step).
    """
    setup_flower_process()
    n = len(updates)
    quantization_range = 2**22
    nodes = {u: _Node(u, np.asarray(x), Context(_RUN_ID, u, {}, RecordDict(), {})) for u, x in sorted(updates.items())}
    grid = InProcessGrid(nodes)
    strategy = _TimedFedAvg(
        fraction_fit=1.0,
        min_fit_clients=n,
        min_available_clients=n,
        fraction_evaluate=0.0,
        fit_metrics_aggregation_fn=lambda metrics: {},
    )
    client_manager = SimpleClientManager()
    for u in nodes:
        client_manager.register(GridClientProxy(u, grid, _RUN_ID))
    context = LegacyContext(
        Context(_RUN_ID, _SERVER_NODE_ID, {}, RecordDict(), {}),
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
        client_manager=client_manager,
    )
    # A 1-element placeholder model: the broadcast is common to every mode and excluded from all of them.
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord([np.zeros(1, dtype=np.float32)])
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    workflow = SecAggPlusWorkflow(
        num_shares=num_shares,
        reconstruction_threshold=threshold,
        max_weight=1.0,
        clipping_range=float(clip_range),
        quantization_range=quantization_range,
        modulus_range=2**32,
        timeout=None,
    )
    t0 = time.perf_counter()
    workflow(grid, context)
    server_s = time.perf_counter() - t0 - grid.grid_s
    failures = [e for node in nodes.values() for e in node.errors]
    if failures:
        raise RuntimeError(f"Flower SecAgg+ client errors: {failures[:3]}")
    result = context.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
    if result[0].shape != exact.shape:
        raise RuntimeError(f"Flower SecAgg+ round halted: the model is still the placeholder {result[0].shape}")
    err = float(np.max(np.abs(result[0] - exact)))
    bound = n * 2 * clip_range / quantization_range
    if err >= bound:
        raise RuntimeError(f"Flower SecAgg+ error {err} above its quantization bound {bound}")
    return {
        "client_s": float(np.mean([node.client_s for node in nodes.values()])),
        "server_s": server_s,
        "strategy_s": strategy.strategy_s,
        "client_serde_s": float(np.mean([node.serde_s for node in nodes.values()])),
        "server_serde_s": grid.server_serde_s,
        "up_bytes": float(np.mean([node.up_bytes for node in nodes.values()])),
        "down_bytes": float(np.mean([node.down_bytes for node in nodes.values()])),
        "max_abs_error": err,
        "error_bound": bound,
        "num_shares": float(num_shares),
        "threshold": float(threshold),
    }


def _bytes_message(payload: bytes, dst: int) -> Message:
    content = RecordDict({"secagg": ConfigRecord({"payload": payload})})
    return Message(content, dst_node_id=dst, message_type=MessageType.TRAIN, group_id="1")


def transport_costs(down: Mapping[int, list[bytes]], up: Mapping[int, list[bytes]]) -> dict[str, float]:
    """Flower serialization cost of a byte protocol's messages: each one wrapped in a ConfigRecord and copied
    through protobuf. ``down[u]`` / ``up[u]`` are the messages node u received / sent in one round.

    Returns the mean per-node share (serializing what it sends, parsing what it receives) and the server's.
    """
    setup_flower_process()
    client: dict[int, float] = {}
    server = 0.0
    for u in sorted(set(down) | set(up)):
        client[u] = 0.0
        for payload in down.get(u, []):
            tr = transfer(_bytes_message(payload, u))
            server += tr.serialize_s
            client[u] += tr.parse_s
        for payload in up.get(u, []):
            tr = transfer(_bytes_message(payload, _SERVER_NODE_ID))
            client[u] += tr.serialize_s
            server += tr.parse_s
    return {"client_serde_s": float(np.mean(list(client.values()))), "server_serde_s": server}


def bench_none_flower(updates: Mapping[int, np.ndarray]) -> dict[str, float]:
    """Plaintext FedAvg round as Flower's Message API moves it, minus the network.

    Client: the float32 update in an ``ArrayRecord`` (+ ``num-examples`` in a ``MetricRecord``), serialized to
    protobuf. Server: parse each reply, convert to numpy, weighted mean. ``client_s``/``server_s`` hold the
    compute only (building the record, the mean); the protobuf copy is in ``*_serde_s``, as for the other modes.
    """
    setup_flower_process()
    client_build: list[float] = []
    client_serde: list[float] = []
    received: list[Message] = []
    server_serde = 0.0
    up: list[int] = []
    for _, x in sorted(updates.items()):
        t0 = time.perf_counter()
        content = RecordDict(
            {"arrays": ArrayRecord([x.astype(np.float32)]), "metrics": MetricRecord({"num-examples": 1})}
        )
        msg = Message(content, dst_node_id=_SERVER_NODE_ID, message_type=MessageType.TRAIN, group_id="1")
        client_build.append(time.perf_counter() - t0)
        tr = transfer(msg)
        client_serde.append(tr.serialize_s)
        server_serde += tr.parse_s
        up.append(tr.wire_bytes)
        received.append(tr.message)

    t0 = time.perf_counter()
    total: np.ndarray | None = None
    weight = 0
    for msg in received:
        w = int(cast(int, msg.content.metric_records["metrics"]["num-examples"]))
        v = msg.content.array_records["arrays"].to_numpy_ndarrays()[0].astype(np.float64) * w
        total = v if total is None else total + v
        weight += w
    if total is None:
        raise RuntimeError("no updates")
    _ = total / weight
    server_s = time.perf_counter() - t0
    return {
        "client_s": float(np.mean(client_build)),
        "server_s": server_s,
        "client_serde_s": float(np.mean(client_serde)),
        "server_serde_s": server_serde,
        "up_bytes": float(np.mean(up)),
        "down_bytes": 0.0,
    }


__all__ = [
    "InProcessGrid",
    "bench_flower_secaggplus",
    "bench_none_flower",
    "setup_flower_process",
    "transfer",
    "transport_costs",
]
