"""Pairwise masking on Flower: the :class:`MaskingAggregator` (server) and the nodes' stage handler.

One federated round is five ``train`` exchanges over :mod:`secagg.masking`, told apart by ``secagg-stage``:

==================  ======================================================  ==================================
stage               client (partition k = protocol node id k)               server
==================  ======================================================  ==================================
``advertise``       checks the setup against its kit, claims the round on   ``server_collect_advertisements``
                    its disk counter, trains once (plain ``train``, e.g.
                    DP-SGD), keeps delta = local - global; signed keys
                    bound to the digest of the model it received
``share-keys``      Shamir shares of b_u and s_sk_u, encrypted per peer     ``server_collect_shares``
``masked-input``    y_u = encode(w_u * delta_u) + masks mod 2**b            ``server_collect_masked_inputs``
``consistency-      checks U3 against the peers it masked with, signs U3    ``server_collect_consistency``
check``
``unmask``          b_v shares (U3) or s_sk_v shares (U2 minus U3)          ``server_unmask`` -> weighted mean
==================  ======================================================  ==================================

The new global state is ``global + sum_u w_u delta_u / sum_u w_u``: FedAvg of the local states up to the
quantization error bound :func:`secagg.encoding.quantization_error_bound` (written to each round's line,
``extra["secagg"]["error_bound"]``). The fixed-point ring is sized for the roster (:meth:`MaskingConfig.sized`:
32 bits while that leaves a scale of at least 2**16, else 64 bits). t, k, the run id and the graph seed come from
the kit's ``protocol.json`` (:mod:`fedmpt.apps.kit`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fedmpt.apps.aggregators import Arrays, RoundOutcome, Status, check_kit_for_run, sort_failures
from fedmpt.apps.client_state import pack_client_state, unpack_client_state
from fedmpt.apps.kit import Kit, RoundCounter, load_run_kit
from fedmpt.apps.secagg_config import Mode, SecAggKey, SecureAggregationConfig, Stage, secure_aggregation_config_from
from fedmpt.apps.secure_aggregation import (
    STATE_RECORD,
    ClientSetup,
    client_setup,
    forward_records,
    local_update,
    payload_of,
    send_stage,
    server_round_of,
    stage_reply,
    weight_from,
)
from fedmpt.apps.update_vector import flatten, model_digest, unflatten
from fedmpt.errors import SecureAggregationError
from fedmpt.rundir import ClientFailure
from secagg import masking
from secagg.config import MaskingConfig
from secagg.errors import SecAggError, ThresholdNotMet

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.serverapp import Grid

    from fedmpt.apps.config import AppConfig, FederationConfig

logger = logging.getLogger("flwr.fedmpt.secagg")

_STAGES: tuple[tuple[Stage, Callable[[masking.ServerState, Mapping[int, bytes]], Any]], ...] = (
    (Stage.ADVERTISE, masking.server_collect_advertisements),
    (Stage.SHARE_KEYS, masking.server_collect_shares),
    (Stage.MASKED_INPUT, masking.server_collect_masked_inputs),
    (Stage.CONSISTENCY, masking.server_collect_consistency),
    (Stage.UNMASK, masking.server_unmask),
)


def masking_config(kit: Kit, max_weight: int, clip_range: float, timeout_s: float = 60.0) -> MaskingConfig:
    """The protocol config both sides derive from the kit (t, k, roster size) and the weight bound and clip range."""
    p = kit.params
    return MaskingConfig.sized(
        p.threshold,
        p.roster_size,
        max_weight,
        clip_range,
        neighbourhood_size=p.neighbourhood_size,
        stage_timeout_s=timeout_s,
    )


# ------------------------------------------------------------------------------------------ client


def _keep_round_state(
    context: Context, setup: ClientSetup, state: masking.ClientState, delta: NDArray[np.float64], weight: int
) -> None:
    """Store the round state (packed, no pickle) and the setup the later stages need in ``context.state``."""
    from flwr.app import ConfigRecord

    context.state[STATE_RECORD] = ConfigRecord(
        {
            "blob": pack_client_state(state, delta, weight),
            "max-weight": setup.max_weight,
            "timeout-s": setup.timeout_s,
            "kit": str(setup.kit),
            "state-dir": str(setup.state_dir),
        }
    )


def _stored_setup(context: Context, overrides: Mapping[str, Any]) -> ClientSetup:
    """The setup that the ``advertise`` stage kept with the round state (no task, no torch)."""
    from fedmpt.apps.node_config import read_node_config

    record = context.state.get(STATE_RECORD)
    if record is None:
        raise SecureAggregationError("a masking stage arrived but this node holds no round state (no advertise)")
    max_weight, timeout_s, kit, state_dir = (record.get(k) for k in ("max-weight", "timeout-s", "kit", "state-dir"))
    if not (
        isinstance(max_weight, int)
        and isinstance(timeout_s, int | float)
        and isinstance(kit, str)
        and isinstance(state_dir, str)
    ):
        raise SecureAggregationError("stored secure-aggregation setup is malformed")
    config = secure_aggregation_config_from({**context.run_config, **overrides})
    node = read_node_config(context.node_config)
    return ClientSetup(config, node.partition_id, Path(kit), Path(state_dir), max_weight, float(timeout_s))


def client_stage(
    msg: Message,
    context: Context,
    overrides: Mapping[str, Any],
    stage: str,
    plain_train: Callable[[Message], Message],
) -> Message:
    """Run masking stage ``stage`` on this node; the ``advertise`` stage also trains (``plain_train``)."""
    from fedmpt.apps.messages import RecordName, from_array_record

    setup = client_setup(context, overrides) if stage == Stage.ADVERTISE else _stored_setup(context, overrides)
    if setup.config.mode is not Mode.MASKING:
        raise SecureAggregationError(
            f"got masking stage '{stage}' but this run's secure-aggregation is {setup.config.mode}"
        )
    kit = Kit.load(setup.kit)
    identity = kit.identity(setup.partition_id)
    mcfg = masking_config(kit, setup.max_weight, setup.config.clip_range, setup.timeout_s)
    request = payload_of(msg)
    if stage == Stage.ADVERTISE:
        if RecordName.ARRAYS not in msg.content.array_records:
            raise SecureAggregationError("advertise message without the global state")
        global_arrays = from_array_record(msg.content.array_records[RecordName.ARRAYS])
        counter = RoundCounter.for_node(setup.state_dir, setup.partition_id)
        state = masking.ClientState.create(
            mcfg,
            identity,
            kit.roster,
            run_id=kit.params.run_id,
            graph_seed=kit.params.graph_seed,
            model_digest=model_digest(global_arrays),
            last_round=counter.last_round(kit.params.run_id),
        )
        out = masking.advertise_keys(state, request)  # checks the setup before any training is done
        if server_round_of(msg) != state.round_number:
            raise SecureAggregationError(
                f"train message for round {server_round_of(msg)} carries a protocol setup for round "
                f"{state.round_number}"
            )
        counter.claim(kit.params.run_id, state.round_number)  # on disk before anything leaves this node
        reply = plain_train(msg)
        if reply.has_error():
            return reply
        local = local_update(reply)
        if sorted(local) != sorted(global_arrays):
            raise SecureAggregationError(
                f"local state arrays {sorted(local)} differ from the global {sorted(global_arrays)}"
            )
        metrics = dict(reply.content.metric_records[RecordName.METRICS])
        weight = weight_from(metrics)  # travels only inside the masked vector
        delta = flatten(local) - flatten(global_arrays)  # (d,)
        metrics[SecAggKey.CLIPPED] = int(np.sum(np.abs(delta) > mcfg.clip_range))
        _keep_round_state(context, setup, state, delta, weight)
        return forward_records(reply, stage_reply(msg, stage, out, metrics))
    blob = context.state[STATE_RECORD].get("blob")
    if not isinstance(blob, bytes):
        raise SecureAggregationError("stored secure-aggregation state is not bytes")
    state, delta, weight = unpack_client_state(blob, mcfg, identity, kit.roster)
    if stage == Stage.SHARE_KEYS:
        out = masking.share_keys(state, request)
    elif stage == Stage.MASKED_INPUT:
        out = masking.masked_input(state, request, delta, weight)
    elif stage == Stage.CONSISTENCY:
        out = masking.consistency_check(state, request)
    elif stage == Stage.UNMASK:
        out = masking.unmask(state, request)
        del context.state[STATE_RECORD]
        return stage_reply(msg, stage, out)
    else:
        raise SecureAggregationError(f"unknown secure-aggregation stage {stage!r}")
    _keep_round_state(context, setup, state, delta, weight)
    return stage_reply(msg, stage, out)


# ------------------------------------------------------------------------------------------ server


class MaskingAggregator:
    """The server's side of masking for one run: the kit's public material and the stages of each round."""

    mode = Mode.MASKING
    encrypted_model = False

    def __init__(self, config: SecureAggregationConfig, kit: Kit, protocol: MaskingConfig) -> None:
        self.config = config
        self.kit = kit
        self.protocol = protocol

    def __repr__(self) -> str:
        return f"MaskingAggregator(nodes={len(self.kit.roster)}, t={self.protocol.threshold})"

    @classmethod
    def create(cls, app_config: AppConfig, run_path: Path) -> MaskingAggregator:
        """Load the kit from ``secagg-dir`` (the server needs no private key), or provision a per-run kit under
        ``run_path/secagg`` (simulation only, warned). Fails before round 1 if the rounds cannot reach t or the
        ring cannot hold the roster's weights."""
        from fedmpt.apps import task

        cfg = app_config.secure_aggregation
        num_clients = app_config.task.num_clients
        kit = load_run_kit(cfg.key_dir, run_path, num_clients, threshold=cfg.threshold, neighbours=cfg.neighbours)
        check_kit_for_run(app_config, kit)
        fed = app_config.federation
        max_weight = task.max_client_examples(app_config.task, fed.seed)
        protocol = masking_config(kit, max_weight, cfg.clip_range, fed.round_timeout_s)
        logger.info(
            "secure aggregation: masking, t = %d of %d provisioned nodes, tolerates %d corrupt share holders against "
            "an active server, %d-bit ring",
            protocol.threshold,
            kit.params.roster_size,
            kit.params.tolerated_corruptions,
            protocol.modulus_bits,
        )
        return cls(cfg, kit, protocol)

    def restore(self, arrays: Mapping[str, NDArray[Any]]) -> Arrays:
        return dict(arrays)

    def outgoing(self, arrays: Mapping[str, NDArray[Any]]) -> Mapping[str, NDArray[Any]]:
        return arrays

    def describe(self) -> dict[str, Any]:
        """The round's protocol settings, for the round line."""
        m, p = self.protocol, self.kit.params
        return {
            "threshold": m.threshold,
            "neighbours": m.neighbourhood_size if m.neighbourhood_size is not None else "complete",
            "roster_size": p.roster_size,
            "tolerated_corruptions": p.tolerated_corruptions,
            "modulus_bits": m.modulus_bits,
            "clip_range": m.clip_range,
            "scale": m.scale,
            "max_weight": m.max_weight,
            "run_id": p.run_id.hex(),
        }

    def train_round(
        self,
        grid: Grid,
        targets: Mapping[int, int],
        arrays: Mapping[str, NDArray[Any]],
        server_round: int,
        federation: FederationConfig,
    ) -> RoundOutcome:
        """One masked training round over ``targets`` (client id -> node id) from the global ``arrays``.

        Returns ``global + weighted mean delta`` of the survivors, or ``arrays=None`` when fewer than t clients
        remain at some stage (``status = "secure-aggregation-failed"``) or fewer than ``min-clients`` survive
        (``"insufficient-replies"``): nothing is applied.
        """
        self.kit.check_participants(targets, server_round)
        timeout_s = float(federation.round_timeout_s)
        participants = sorted(targets)
        d = int(sum(np.size(a) for a in arrays.values()))
        started = time.monotonic()
        secagg: dict[str, Any] = self.describe()
        stage_s: dict[str, float] = {}  # wall time of each exchange, send to last reply plus the server's step
        secagg["stage_s"] = stage_s
        outcome = RoundOutcome(None, (), {}, [], 0, 0, extra={"secure_aggregation": self.mode.value, "secagg": secagg})
        metrics: dict[int, dict[str, float]] = {}
        p = self.kit.params
        result: masking.AggregateResult | None = None
        state: masking.ServerState | None = None
        try:
            state, requests = masking.server_start_round(
                self.protocol,
                participants,
                d,
                server_round,
                run_id=p.run_id,
                graph_seed=p.graph_seed,
                model_digest=model_digest(arrays),
                roster=self.kit.roster,
            )
            for stage, collect in _STAGES:
                stage_started = time.monotonic()
                replies = send_stage(
                    grid,
                    stage,
                    requests,
                    dict(targets),
                    server_round,
                    timeout_s,
                    arrays if stage is Stage.ADVERTISE else None,
                )
                outcome.failures += replies.failures
                outcome.bytes_down += replies.bytes_down
                outcome.bytes_up += replies.bytes_up
                if stage is Stage.ADVERTISE:  # training metrics come with the first stage
                    metrics.update(replies.metrics)
                result_or_requests = collect(state, replies.payloads)
                stage_s[str(stage)] = round(time.monotonic() - stage_started, 4)
                if stage is Stage.UNMASK:
                    result = result_or_requests
                else:
                    requests = result_or_requests
        except (ThresholdNotMet, SecAggError) as err:
            outcome.status = Status.SECAGG_FAILED
            secagg["failure"] = f"{type(err).__name__}: {err}"
            logger.error("round %d: secure aggregation failed, global state unchanged: %s", server_round, err)
        for node, reason in sorted(state.rejected.items()) if state is not None else ():
            outcome.failures.append(
                ClientFailure(targets[node], f"secure aggregation rejected a message: {reason}", node)
            )
        sort_failures(outcome.failures)
        secagg["protocol_s"] = round(time.monotonic() - started, 3)
        if result is None:
            return outcome
        secagg.update(
            error_bound=result.error_bound,
            survivors=list(result.survivors),
            dropped=list(result.dropped),
            clipped_coordinates=int(sum(metrics.get(c, {}).get(SecAggKey.CLIPPED, 0) for c in result.survivors)),
        )
        survivors = set(result.survivors)
        if len(survivors) < federation.min_clients:
            outcome.status = Status.INSUFFICIENT
            logger.warning(
                "round %d: %d clients survived secure aggregation, min-clients is %d; global state unchanged",
                server_round,
                len(survivors),
                federation.min_clients,
            )
            return outcome
        outcome.arrays = unflatten(flatten(arrays) + result.mean, arrays)  # global + weighted mean delta
        outcome.replied = result.survivors
        outcome.train_metrics = {str(c): m for c, m in sorted(metrics.items()) if c in survivors}
        return outcome
