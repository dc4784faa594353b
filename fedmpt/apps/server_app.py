"""The Flower ServerApp of fedmpt: the round loop over Flower's ``Grid`` (Message API), a thin adapter.

One round (``r``):

1. wait until at least ``min-clients`` nodes are connected (``wait-for-clients-s``), and ask every node not
   seen before for its partition (``query``), so clients are identified by partition id, not node id;
2. sample ``max(min-clients, floor(fraction-train * n))`` of the n available clients with
   :func:`fedmpt.partition.sample_participants` (a pure function of (seed, r): a resumed run samples the
   same clients);
3. send the global state to each (``train``), wait up to ``round-timeout-s``; a client that errors, times
   out or replies malformed is recorded in ``clients_failed`` with its node id and the reason;
4. if at least ``min-clients`` replied, aggregate their states (:func:`fedmpt.apps.task.aggregate`, clients in
   partition order so the floating-point sum is reproducible); otherwise keep the previous state and record
   the round with ``status = "insufficient-replies"``;
5. evaluate the new state on the global test split (server) and on the clients' own test splits
   (``evaluate`` to a ``fraction-evaluate`` sample); write the round to the run directory
   (:class:`fedmpt.rundir.RunDirectory`: checkpoint, ``metrics.jsonl`` line, state).

A restarted server with ``resume = true`` and the same ``run-name`` continues after the last completed round
and produces the same result as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedmpt.apps import privacy_hooks, task
from fedmpt.apps.aggregators import Status, build_aggregator, exchange, federated_metrics
from fedmpt.apps.config import AppConfig, read_app_config
from fedmpt.apps.grid import ResponsiveGrid
from fedmpt.apps.kit import load_run_kit
from fedmpt.apps.messages import Key, RecordName
from fedmpt.errors import FederationError
from fedmpt.partition import sample_participants
from fedmpt.rundir import ClientFailure, RoundRecord, RunDirectory

# A child of Flower's logger, so that progress reaches `flwr run --stream` and the simulation's console.
logger = logging.getLogger("flwr.fedmpt.server")


_POLL_S = 0.5
_EVALUATION_STREAM = 1
_PROGRESS_KEYS = ("mAP", "CF1", "OF1", "iid-mAP")


@dataclass
class _Roster:
    """What the server knows about nodes: node id -> partition (client) id."""

    partition_of: dict[int, int]

    def available(self, node_ids: Iterable[int]) -> dict[int, int]:
        """client id -> node id of the connected nodes whose partition is known."""
        out: dict[int, int] = {}
        for node_id in sorted(node_ids):
            client_id = self.partition_of.get(node_id)
            if client_id is None:
                continue
            if client_id in out:
                raise FederationError(
                    f"nodes {out[client_id]} and {node_id} both serve partition-id {client_id}; "
                    "give every SuperNode its own partition-id"
                )
            out[client_id] = node_id
        return out


def _wait_for_nodes(grid: Grid, minimum: int, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= minimum:
            return node_ids
        if time.monotonic() >= deadline:
            raise FederationError(
                f"only {len(node_ids)} node(s) connected after {wait_s:.0f} s, min-clients is {minimum}"
            )
        time.sleep(_POLL_S)


def _discover(
    grid: Grid, roster: _Roster, node_ids: list[int], server_round: int, timeout_s: float
) -> list[ClientFailure]:
    """Ask every node of unknown partition for it (``query``); returns the nodes that did not say."""
    unknown = [n for n in node_ids if n not in roster.partition_of]
    if not unknown:
        return []
    messages = [
        Message(
            RecordDict({RecordName.CONFIG: ConfigRecord()}),
            dst_node_id=n,
            message_type=MessageType.QUERY,
            group_id=f"query-{server_round}",
        )
        for n in unknown
    ]
    reasons: dict[int, str] = dict.fromkeys(unknown, f"no reply to the partition query within {timeout_s:g} s")
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        node_id = reply.metadata.src_node_id
        if node_id not in reasons:
            continue
        if reply.has_error():
            reasons[node_id] = f"partition query failed: error {reply.error.code}: {reply.error.reason}"
            continue
        config = reply.content.config_records.get(RecordName.CONFIG, ConfigRecord())
        partition_id = config.get(Key.PARTITION_ID)
        if isinstance(partition_id, int) and not isinstance(partition_id, bool) and partition_id >= 0:
            roster.partition_of[node_id] = partition_id
            del reasons[node_id]
        else:
            reasons[node_id] = f"partition query reply without a valid partition-id: {partition_id!r}"
    for node_id, reason in reasons.items():
        logger.warning("node %s: %s", node_id, reason)
    return [ClientFailure(node_id, reason) for node_id, reason in sorted(reasons.items())]


def _evaluation_sample(num_clients: int, fraction: float, server_round: int, seed: int) -> list[int]:
    """Indices of the clients that evaluate in ``server_round``: all of them, or ceil(fraction * n) of them.

    Drawn from its own stream ``default_rng((seed, round, 1))``, independent of the training sample and, like
    it, a pure function of (seed, round), so a resumed run evaluates on the same clients.
    """
    if fraction >= 1.0:
        return list(range(num_clients))
    count = max(1, math.ceil(fraction * num_clients))
    rng = np.random.default_rng((seed, server_round, _EVALUATION_STREAM))
    return sorted(int(i) for i in rng.choice(num_clients, size=count, replace=False))


def _format_progress(record: RoundRecord, total_rounds: int) -> str:
    scores = " ".join(f"{k} {100 * record.global_metrics[k]:.1f}" for k in _PROGRESS_KEYS if k in record.global_metrics)
    failed = ", ".join(f"{f.client_id}({f.reason})" for f in record.clients_failed) or "none"
    privacy = ""
    if isinstance(record.epsilon, Mapping):  # the largest site's cumulative epsilon this run, next to the metrics
        eps, delta = record.epsilon.get("max_epsilon_rdp"), record.epsilon.get("delta")
        if isinstance(eps, int | float) and isinstance(delta, int | float):
            privacy = f" | max epsilon {eps:.3g} (delta {delta:g}, rdp)"
    return (
        f"[round {record.round}/{total_rounds}] replied {len(record.clients_replied)}/"
        f"{len(record.clients_sampled)} | global {scores}{privacy} | failed: {failed} | {record.wall_time_s:.1f} s"
    )


def _evaluation_source(config: AppConfig, server_data: bool, encrypted: bool) -> str:
    """What the round's global metrics are computed on (``evaluation`` in every round line): ``server-test-set``
    (data the server holds itself), ``federated`` (example-weighted mean of the sites' own test splits) or
    ``none`` (under DP sites release no metrics, and the server holds no decryptable model or no data)."""
    if server_data and not encrypted:
        return "server-test-set"
    return "none" if config.privacy.dp else "federated"


def run_federation(grid: Grid, config: AppConfig) -> RunDirectory:
    """Run (or resume) the federation described by ``config`` over ``grid``; returns its run directory."""
    fed = config.federation
    run = RunDirectory.create_or_resume(
        config.identity(), fed.seed, root=fed.runs_path, name=fed.run_name or None, resume=fed.resume
    )
    logger.info("fedmpt run directory: %s", run.path.resolve())
    point = run.resume()
    if point.finished:
        logger.info("run %s is already finished (%d rounds); nothing to do", run.path, point.round)
        return run
    arrays = point.arrays if point.arrays is not None else task.initial_arrays(config.task, fed.seed)
    if point.round:
        logger.info("resuming after round %d of %d", point.round, fed.num_server_rounds)
    global_test = task.load_global_test(config.task, fed.seed)
    roster = _Roster(partition_of={})
    aggregator = build_aggregator(config, run.path)  # plain, masking or CKKS: fedmpt.apps.aggregators
    run_ledger = None
    if config.privacy.dp:  # collects and verifies the nodes' signed epsilon ledger entries against the kit's roster
        sa = config.secure_aggregation
        kit = aggregator.kit or load_run_kit(
            sa.key_dir, run.path, config.task.num_clients, threshold=sa.threshold, neighbours=sa.neighbours
        )
        run_ledger = privacy_hooks.RunLedger(
            run.path,
            config.privacy,
            kit.roster,
            planned=privacy_hooks.planned_event(config.privacy, config.task, fed.num_server_rounds),
            transport=privacy_hooks.transport_protection({"secure-aggregation": config.secure_aggregation.mode}),
        )
        grid = run_ledger.wrap(grid, roster.partition_of.get)  # a node must send the ledger of its own partition
    arrays = aggregator.restore(arrays)  # CKKS: a checkpoint holds the encrypted state
    for server_round in range(point.round + 1, fed.num_server_rounds + 1):
        started = time.monotonic()
        node_ids = _wait_for_nodes(grid, fed.min_clients, fed.wait_for_clients_s)
        unidentified = _discover(grid, roster, node_ids, server_round, fed.round_timeout_s)
        available = roster.available(node_ids)
        if len(available) < fed.min_clients:
            raise FederationError(
                f"round {server_round}: {len(available)} client(s) with a known partition, "
                f"min-clients is {fed.min_clients}"
            )
        client_ids = sorted(available)
        chosen = sample_participants(len(client_ids), fed.fraction_train, server_round, fed.seed, fed.min_clients)
        targets = {client_ids[i]: available[client_ids[i]] for i in chosen}
        outcome = aggregator.train_round(grid, targets, arrays, server_round, fed)
        arrays = outcome.arrays if outcome.arrays is not None else arrays
        extra: dict[str, Any] = {"status": outcome.status, **outcome.extra}
        if outcome.status == Status.OK:
            extra["train"] = outcome.train_metrics
        federated = aggregator.encrypted_model or global_test is None  # no key or no data on the server
        global_metrics: dict[str, float] = {}
        if global_test is not None and not aggregator.encrypted_model:
            global_metrics = task.evaluate(arrays, global_test, config.task, run_seed=fed.seed)
        # under DP sites release no metrics of their private test records: the server reports only what it can
        # evaluate on data it holds itself (public by definition), or nothing
        eval_chosen = _evaluation_sample(len(client_ids), fed.fraction_evaluate, server_round, fed.seed)
        if config.privacy.dp:
            eval_chosen = []
        extra["evaluation"] = _evaluation_source(config, global_test is not None, bool(aggregator.encrypted_model))
        eval_targets = {client_ids[i]: available[client_ids[i]] for i in eval_chosen}
        eval_replies, eval_failures, eval_bytes = exchange(
            grid,
            MessageType.EVALUATE,
            eval_targets,
            aggregator.outgoing(arrays),
            server_round,
            fed.round_timeout_s,
            None,
        )
        if eval_failures:
            extra["evaluate_failed"] = [f.to_json() for f in eval_failures]
        if federated:  # global metrics = example-weighted mean of the clients' metrics on their own test splits
            global_metrics = federated_metrics({str(r.client_id): r.metrics for r in eval_replies})
        record = RoundRecord(
            round=server_round,
            wall_time_s=time.monotonic() - started,
            clients_sampled=tuple(sorted(targets)),
            clients_replied=outcome.replied,
            clients_failed=tuple(unidentified) + tuple(outcome.failures),
            bytes_down=outcome.bytes_down + eval_bytes,
            bytes_up=outcome.bytes_up,
            global_metrics=global_metrics,
            clients={str(r.client_id): r.metrics for r in eval_replies},
            epsilon=run_ledger.epsilon_record(targets) if run_ledger is not None else None,
            extra=extra,
        )
        run.complete_round(
            record,
            aggregator.outgoing(arrays),  # CKKS: the encrypted state
            rng_state={
                "sampler": "sample_participants(seed, round)",
                "seed": fed.seed,
                "next_round": server_round + 1,
            },
        )
        logger.info("%s", _format_progress(record, fed.num_server_rounds))
    run.finish(aggregator.outgoing(arrays))
    logger.info("fedmpt run finished: %s", run.path.resolve())
    return run


def build_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp that reads ``context.run_config`` updated with ``overrides`` once, then runs the federation."""
    fixed = dict(overrides or {})
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(ResponsiveGrid(grid), read_app_config({**context.run_config, **fixed}))

    return server_app


app = build_server_app()
