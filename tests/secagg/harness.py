"""In-process masking round driver for the secagg tests: a provisioned federation (identities, roster, pinned run id
and graph seed), drop-outs per stage, and a recording server."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from secagg import masking
from secagg.config import MaskingConfig
from secagg.keys import Identity, Roster

# ---- in-process round driver: drop-outs per stage and a recording (instrumented) server


RUN_ID = bytes(range(16))
GRAPH_SEED = b"g" * 32
MODEL = hashlib.sha256(b"global model of the round").digest()


@dataclass
class Federation:
    """Provisioned identities and roster of ``n`` clients with node ids 10, 11, ..., one pinned run and graph seed."""

    identities: dict[int, Identity]
    roster: Roster
    run_id: bytes = RUN_ID
    graph_seed: bytes = GRAPH_SEED

    @classmethod
    def provision(cls, n: int, first_id: int = 10) -> Federation:
        ids = {first_id + i: Identity.generate(first_id + i) for i in range(n)}
        return cls(ids, Roster.from_identities(ids))

    def client(self, config: MaskingConfig, u: int, **kw: object) -> masking.ClientState:
        """Client u's state for a new round, pinned to this federation's run and graph seed."""
        args: dict[str, object] = {"run_id": self.run_id, "graph_seed": self.graph_seed, "model_digest": MODEL}
        args.update(kw)
        return masking.ClientState.create(config, self.identities[u], self.roster, **args)  # type: ignore[arg-type]

    def start(
        self, config: MaskingConfig, nodes: list[int], d: int, round_number: int, **kw: object
    ) -> tuple[masking.ServerState, dict[int, bytes]]:
        """The honest server's stage 0 for ``nodes``."""
        args: dict[str, object] = {
            "run_id": self.run_id,
            "graph_seed": self.graph_seed,
            "model_digest": MODEL,
            "roster": self.roster,
        }
        args.update(kw)
        return masking.server_start_round(config, nodes, d, round_number, **args)  # type: ignore[arg-type]


_FEDERATIONS: dict[int, Federation] = {}


def federation_of(n: int) -> Federation:
    """A federation whose roster is exactly n nodes (cached)."""
    if n not in _FEDERATIONS:
        _FEDERATIONS[n] = Federation.provision(n)
    return _FEDERATIONS[n]


@dataclass
class RoundRecord:
    """Everything the (instrumented) server received, by stage, and the final states."""

    received: dict[str, dict[int, bytes]] = field(default_factory=dict)
    sent: dict[str, dict[int, bytes]] = field(default_factory=dict)
    clients: dict[int, masking.ClientState] = field(default_factory=dict)
    server: masking.ServerState | None = None


def run_round(
    config: MaskingConfig,
    fed: Federation,
    updates: dict[int, np.ndarray],
    weights: dict[int, int] | None = None,
    drop_before: dict[str, set[int]] | None = None,
    round_number: int = 3,
    record: RoundRecord | None = None,
) -> masking.AggregateResult:
    """Run a full round; a node in ``drop_before[stage]`` sends nothing from that stage on."""
    drop_before = drop_before or {}
    weights = weights or dict.fromkeys(updates, 1)
    record = record if record is not None else RoundRecord()
    nodes = sorted(updates)
    d = next(iter(updates.values())).size
    clients = {u: fed.client(config, u) for u in nodes}
    record.clients = clients
    dropped: set[int] = set()

    def alive(stage: str, requests: dict[int, bytes]) -> list[int]:
        dropped.update(drop_before.get(stage, set()))
        return [u for u in sorted(requests) if u not in dropped]

    server, requests = fed.start(config, nodes, d, round_number)
    record.server = server
    record.sent["advertise"] = requests
    replies = {u: masking.advertise_keys(clients[u], requests[u]) for u in alive("advertise", requests)}
    record.received["advertise"] = replies
    requests = masking.server_collect_advertisements(server, replies)
    record.sent["share"] = requests
    replies = {u: masking.share_keys(clients[u], requests[u]) for u in alive("share", requests)}
    record.received["share"] = replies
    requests = masking.server_collect_shares(server, replies)
    record.sent["masked"] = requests
    replies = {
        u: masking.masked_input(clients[u], requests[u], updates[u], weights[u]) for u in alive("masked", requests)
    }
    record.received["masked"] = replies
    requests = masking.server_collect_masked_inputs(server, replies)
    record.sent["consistency"] = requests
    replies = {u: masking.consistency_check(clients[u], requests[u]) for u in alive("consistency", requests)}
    record.received["consistency"] = replies
    requests = masking.server_collect_consistency(server, replies)
    record.sent["unmask"] = requests
    replies = {u: masking.unmask(clients[u], requests[u]) for u in alive("unmask", requests)}
    record.received["unmask"] = replies
    return masking.server_unmask(server, replies)
