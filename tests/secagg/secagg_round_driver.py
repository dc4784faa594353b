"""Test driver: runs one masking round in-process, with drop-outs per stage and a recording server."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from secagg import masking
from secagg.config import MaskingConfig
from secagg.keys import Identity, Roster

STAGES = ("advertise", "share", "masked", "unmask")


@dataclass
class Federation:
    """Provisioned identities and roster of ``n`` clients with node ids 10, 11, ..."""

    identities: dict[int, Identity]
    roster: Roster

    @classmethod
    def provision(cls, n: int, first_id: int = 10) -> Federation:
        ids = {first_id + i: Identity.generate(first_id + i) for i in range(n)}
        return cls(ids, Roster.from_identities(ids))


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
    clients = {u: masking.ClientState.create(config, fed.identities[u], fed.roster) for u in nodes}
    record.clients = clients
    dropped: set[int] = set()

    def alive(stage: str, requests: dict[int, bytes]) -> list[int]:
        dropped.update(drop_before.get(stage, set()))
        return [u for u in sorted(requests) if u not in dropped]

    server, requests = masking.server_start_round(config, nodes, d, round_number, roster=fed.roster)
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
        u: masking.masked_input(clients[u], requests[u], updates[u], weights[u])
        for u in alive("masked", requests)
    }
    record.received["masked"] = replies
    requests = masking.server_collect_masked_inputs(server, replies)
    record.sent["unmask"] = requests
    replies = {u: masking.unmask(clients[u], requests[u]) for u in alive("unmask", requests)}
    record.received["unmask"] = replies
    return masking.server_unmask(server, replies)
