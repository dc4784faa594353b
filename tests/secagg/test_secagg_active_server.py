"""Masking against an actively malicious server: each attack of the review, played with the library's own
functions by a deviating server, is refused; where a check is what stops it, a positive control shows the attack
recovers the victim's exact input once that check is switched off (so the refusal is what protects it).

Attacks: forwarding only t - 1 peers' shares to a victim and declaring them dropped (complete graph and SecAgg+
graph); per-client survivor lists (equivocation), refused at the bound 2t > m + c and succeeding below it; a model
or participant list shown differently to different clients; a graph seed or threshold of the server's choosing.
Also: for random drop-out patterns at every stage the honest sum decodes exactly or the round fails loudly.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secagg import masking, security, wire
from secagg.config import MaskingConfig
from secagg.encoding import decode_sum
from secagg.errors import MessageRejected, SecAggError, SignatureInvalid, ThresholdNotMet
from secagg.keys import SERVER_ID, consistency_transcript, pairwise_seed, round_context, x25519_from_private_bytes
from secagg.shamir import decode_share, reconstruct
from secagg.wire import Kind, RevealKind
from tests.secagg.harness import Federation, federation_of, run_round

SCALE = 2.0**10


def _grid(rng: np.random.Generator, d: int) -> np.ndarray:
    return rng.integers(-int(SCALE), int(SCALE) + 1, size=d) / SCALE


def _pack(state: masking.ServerState, kind: Kind, to: int, payload: bytes) -> bytes:
    return wire.pack(kind, state.run_id, state.round_number, SERVER_ID, to, payload)


def _payload(message: bytes) -> bytes:
    return message[wire.HEADER_BYTES :]


class ForwardingAttack:
    """The server forwards to ``victim`` only ``forwarded`` peers' share ciphertexts, then sends every client one
    consistent survivor list that declares those peers dropped, and reconstructs the victim's input from the
    self-mask seed and the forwarded peers' mask keys revealed in the unmask replies."""

    def __init__(self, fed: Federation, config: MaskingConfig, nodes: list[int], victim: int, d: int = 6) -> None:
        self.fed, self.config, self.nodes, self.victim = fed, config, nodes, victim
        rng = np.random.default_rng(7)
        self.updates = {u: _grid(rng, d) for u in nodes}
        self.clients = {u: fed.client(config, u) for u in nodes}
        self.server, req = fed.start(config, nodes, d, 4)
        adv = {u: masking.advertise_keys(self.clients[u], req[u]) for u in nodes}
        req = masking.server_collect_advertisements(self.server, adv)
        shares = {u: masking.share_keys(self.clients[u], req[u]) for u in nodes}
        req = masking.server_collect_shares(self.server, shares)
        partners = sorted(self.server.partners[victim])
        self.forwarded = partners[: config.threshold - 1]  # t - 1 peers: with itself exactly t share holders
        incoming = {v: self.server.ciphertexts[v][victim] for v in self.forwarded}
        req[victim] = _pack(self.server, Kind.MASKED_INPUT_REQUEST, victim, wire.encode_ciphertexts(incoming))
        self.masked = {u: masking.masked_input(self.clients[u], req[u], self.updates[u]) for u in nodes}
        self.survivors = tuple(u for u in nodes if u not in self.forwarded)

    def consistency(self) -> Iterator[tuple[int, bytes]]:
        """Every survivor is asked to sign the list; yields (node, reply) and lets refusals propagate."""
        payload = wire.encode_survivors(self.survivors)
        for u in self.survivors:
            yield (
                u,
                masking.consistency_check(self.clients[u], _pack(self.server, Kind.CONSISTENCY_REQUEST, u, payload)),
            )

    def recover_victim(self) -> np.ndarray:
        """Run the rest of the attack (every survivor signs and unmasks) and return the victim's decoded input."""
        sigs = {u: _payload(reply) for u, reply in self.consistency()}
        payload = wire.encode_unmask_request(self.survivors, sigs)
        revealed: dict[tuple[int, RevealKind], list] = {}
        for u in self.survivors:
            reply = masking.unmask(self.clients[u], _pack(self.server, Kind.UNMASK_REQUEST, u, payload))
            for owner, kind, raw in wire.decode_unmask(_payload(reply)):
                revealed.setdefault((owner, kind), []).append(decode_share(raw, wire.SECRET_BYTES))
        t, v = self.config.threshold, self.victim
        ctx = round_context(self.server.run_id, self.server.round_number)
        y = wire.decode_masked_input(_payload(self.masked[v]), self.server.vector_length + 1, self.config.modulus_bits)
        y = y.copy()
        masking._add_self_mask(
            y, reconstruct(revealed[(v, RevealKind.SELF_MASK_SEED)], t, wire.SECRET_BYTES), ctx, v, undo=True
        )
        for p in self.forwarded:
            key = x25519_from_private_bytes(
                reconstruct(revealed[(p, RevealKind.MASK_SECRET_KEY)], t, wire.SECRET_BYTES)
            )
            seed = pairwise_seed(key, self.server.bundles[v].s_public, self.server.run_id, 4, p, v)
            masking._add_pair_mask(y, v, p, seed, ctx, undo=True)
        mean, _ = decode_sum(y, self.config, 1)
        return mean


@pytest.mark.parametrize(
    ("n", "k"),
    [(5, None), (12, 4)],
    ids=["complete-n5", "secagg+-n12-k4"],
)
def test_forwarding_attack_is_refused_by_the_victim_and_works_without_the_nested_set_check(
    n: int, k: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = federation_of(n)
    nodes = sorted(fed.identities)
    config = MaskingConfig(threshold=3, neighbourhood_size=k, scale=SCALE)
    victim = nodes[0]
    attack = ForwardingAttack(fed, config, nodes, victim)
    with pytest.raises((ThresholdNotMet, MessageRejected), match="masked with|outside U2"):
        dict(attack.consistency())
    # Positive control: with the U3-within-U2 rule switched off, the same messages give the victim's exact input.
    control = ForwardingAttack(fed, config, nodes, victim)
    monkeypatch.setattr(masking, "_check_survivors", lambda *a, **kw: None)
    np.testing.assert_array_equal(control.recover_victim(), control.updates[victim])


def test_a_survivor_list_naming_a_neighbour_the_client_did_not_mask_with_is_refused() -> None:
    fed = federation_of(5)
    nodes = sorted(fed.identities)
    attack = ForwardingAttack(fed, MaskingConfig(threshold=3, scale=SCALE), nodes, nodes[0])
    attack.survivors = tuple(nodes)  # the unforwarded peers declared alive: outside the victim's U2
    with pytest.raises(MessageRejected, match="survivor list outside U2"):
        dict(attack.consistency())


def _equivocation(fed: Federation, config: MaskingConfig, target: int) -> tuple[dict[int, masking.ClientState], dict]:
    """Run to the consistency stage; group A is told ``target`` survived, group B that it dropped."""
    nodes = sorted(fed.identities)
    clients = {u: fed.client(config, u) for u in nodes}
    server, req = fed.start(config, nodes, 4, 2)
    for stage in (masking.advertise_keys, masking.share_keys):
        rep = {u: stage(clients[u], req[u]) for u in nodes}
        collect = (
            masking.server_collect_advertisements if stage is masking.advertise_keys else masking.server_collect_shares
        )
        req = collect(server, rep)
    rep = {u: masking.masked_input(clients[u], req[u], np.full(4, 0.25)) for u in nodes}
    masking.server_collect_masked_inputs(server, rep)
    others = [u for u in nodes if u != target]
    half = len(others) // 2
    group_a, group_b = [target, *others[:half]], others[half:]
    with_t, without_t = tuple(nodes), tuple(others)
    return clients, {"server": server, "A": (group_a, with_t), "B": (group_b, without_t)}


def _unmask_both_lists(fed: Federation, config: MaskingConfig, target: int) -> dict[RevealKind, int]:
    """Collect each group's signatures on its list and ask it to unmask; returns how many shares of each kind of
    ``target``'s secrets the server obtained."""
    clients, plan = _equivocation(fed, config, target)
    server = plan["server"]
    got = {RevealKind.SELF_MASK_SEED: 0, RevealKind.MASK_SECRET_KEY: 0}
    for group in ("A", "B"):
        members, survivors = plan[group]
        request = wire.encode_survivors(survivors)
        sigs = {}
        for u in members:
            reply = masking.consistency_check(clients[u], _pack(server, Kind.CONSISTENCY_REQUEST, u, request))
            sigs[u] = _payload(reply)
        for u in members:
            payload = wire.encode_unmask_request(survivors, sigs)
            try:
                reply = masking.unmask(clients[u], _pack(server, Kind.UNMASK_REQUEST, u, payload))
            except ThresholdNotMet:
                continue
            for owner, kind, _ in wire.decode_unmask(_payload(reply)):
                if owner == target:
                    got[kind] += 1
    return got


def test_per_client_survivor_lists_give_no_node_both_secrets_at_the_default_threshold() -> None:
    fed = federation_of(5)
    t = security.default_threshold(5)
    assert t == 4 and security.tolerated_corruptions(t, 5) == 2
    got = _unmask_both_lists(fed, MaskingConfig(threshold=t, scale=SCALE), sorted(fed.identities)[0])
    assert got[RevealKind.SELF_MASK_SEED] < t and got[RevealKind.MASK_SECRET_KEY] < t


def test_per_client_survivor_lists_expose_a_node_below_the_bound() -> None:
    """Positive control for the bound: with t = 2 on 5 nodes (2t <= m), each list collects t signatures and the
    server gets t shares of both secrets of the target."""
    fed = federation_of(5)
    assert security.tolerated_corruptions(2, 5) < 0
    got = _unmask_both_lists(fed, MaskingConfig(threshold=2, scale=SCALE), sorted(fed.identities)[0])
    assert got[RevealKind.SELF_MASK_SEED] >= 2 and got[RevealKind.MASK_SECRET_KEY] >= 2


@pytest.mark.parametrize("what", ["model", "participants"])
def test_clients_shown_different_models_or_participant_lists_cannot_share_keys(what: str) -> None:
    fed = federation_of(4)
    nodes = sorted(fed.identities)
    config = MaskingConfig(threshold=3, scale=SCALE)
    clients = {u: fed.client(config, u) for u in nodes}
    if what == "model":  # the server sent node 0 a different global model (Pasquini et al., CCS 2022)
        clients[nodes[0]] = fed.client(config, nodes[0], model_digest=bytes(32))
        server, req = fed.start(config, nodes, 4, 1)
    else:  # node 0 is told the round has one participant fewer
        server, req = fed.start(config, nodes, 4, 1)
        _, narrow = fed.start(config, nodes[:3], 4, 1)
        req[nodes[0]] = narrow[nodes[0]]
    adv = {u: masking.advertise_keys(clients[u], req[u]) for u in nodes}
    forwarded = masking.server_collect_advertisements(server, adv)
    assert nodes[0] not in server.bundles and "does not verify" in server.rejected[nodes[0]]  # the honest server
    # The deviating server forwards node 0's bundle anyway: every peer refuses it.
    for u in nodes[1:]:
        env = wire.unpack(forwarded[u], kind=Kind.SHARE_KEYS_REQUEST, run_id=server.run_id, round_number=1, recipient=u)
        bundles = wire.decode_share_keys_request(env.payload)
        bundles[nodes[0]] = wire.decode_key_bundle(_payload(adv[nodes[0]]))
        tampered = _pack(server, Kind.SHARE_KEYS_REQUEST, u, wire.encode_share_keys_request(bundles))
        with pytest.raises(SignatureInvalid, match=f"node {nodes[0]}"):
            masking.share_keys(clients[u], tampered)


def test_consistency_signatures_bind_the_round_setup() -> None:
    """A signature on the same survivor list but another setup (model) does not count."""
    fed = federation_of(4)
    nodes = sorted(fed.identities)
    cfg = MaskingConfig(threshold=3, scale=SCALE)
    rec_clients = {u: fed.client(cfg, u) for u in nodes}
    server, req = fed.start(cfg, nodes, 3, 5)
    for stage, collect in (
        (masking.advertise_keys, masking.server_collect_advertisements),
        (masking.share_keys, masking.server_collect_shares),
    ):
        req = collect(server, {u: stage(rec_clients[u], req[u]) for u in nodes})
    masking.server_collect_masked_inputs(
        server, {u: masking.masked_input(rec_clients[u], req[u], np.zeros(3)) for u in nodes}
    )
    survivors = tuple(nodes)
    c = rec_clients[nodes[0]]
    masking.consistency_check(c, _pack(server, Kind.CONSISTENCY_REQUEST, nodes[0], wire.encode_survivors(survivors)))
    other_setup = consistency_transcript(server.run_id, 5, bytes(32), survivors)
    sigs = {u: fed.identities[u].sign(other_setup) for u in nodes}
    with pytest.raises(SignatureInvalid):
        masking.unmask(c, _pack(server, Kind.UNMASK_REQUEST, nodes[0], wire.encode_unmask_request(survivors, sigs)))


def test_the_graph_comes_from_the_provisioned_seed_over_the_roster() -> None:
    """The server cannot choose neighbourhoods: a client computes them from the provisioned seed over the whole
    roster, and a round's neighbours are a subset of those."""
    fed = federation_of(12)
    nodes = sorted(fed.identities)
    cfg = MaskingConfig(threshold=3, neighbourhood_size=4, scale=SCALE)
    roster_graph = masking.neighbour_graph(nodes, 4, fed.graph_seed)
    c = fed.client(cfg, nodes[0])
    _, req = fed.start(cfg, nodes[:9], 2, 1)
    masking.advertise_keys(c, req[nodes[0]])
    assert c.neighbours == roster_graph[nodes[0]] & frozenset(nodes[:9])


_STAGES = ("advertise", "share", "masked", "consistency", "unmask")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), k=st.sampled_from([None, 4]))
def test_random_drop_patterns_up_to_n_minus_t_give_the_exact_sum_or_fail_loudly(
    data: st.DataObject, k: int | None
) -> None:
    n = 8
    fed = federation_of(n)
    nodes = sorted(fed.identities)
    t = security.default_threshold(n, k)
    cfg = MaskingConfig(threshold=t, neighbourhood_size=k, scale=SCALE)
    budget = data.draw(st.integers(0, n - t))
    dropped = data.draw(st.permutations(nodes))[:budget]
    drops: dict[str, set[int]] = {}
    for u in dropped:
        drops.setdefault(data.draw(st.sampled_from(_STAGES)), set()).add(u)
    ups = {u: _grid(np.random.default_rng(u), 5) for u in nodes}
    try:
        res = run_round(cfg, fed, ups, drop_before=drops)
    except SecAggError:
        assert k is not None, "on the complete graph n - t drop-outs must always be recovered"
        return
    gone_early = set().union(*(drops.get(s, set()) for s in ("advertise", "share", "masked")))
    assert set(res.survivors) == set(nodes) - gone_early
    np.testing.assert_array_equal(res.mean, np.mean([ups[u] for u in res.survivors], axis=0))


def test_secagg_plus_failure_probability_bounds_a_monte_carlo_estimate() -> None:
    n, k, t = 40, 8, security.default_threshold(40, 8)
    corrupt = set(range(6))
    c_max = security.tolerated_corruptions(t, n, k)
    bound = security.secagg_plus_failure_probability(n, k, t, len(corrupt))
    rng = np.random.default_rng(0)
    failures = 0
    trials = 300
    for _ in range(trials):
        graph = masking.neighbour_graph(list(range(n)), k, rng.bytes(32))
        if any(len(graph[v] & corrupt) > c_max for v in range(n) if v not in corrupt):
            failures += 1
    estimate = failures / trials
    assert 0 < bound < 1
    assert estimate <= bound + 3 * np.sqrt(bound * (1 - bound) / trials) + 1e-9
    assert security.secagg_plus_failure_probability(n, k, t, 0) == 0.0


def test_default_thresholds_match_the_stated_bound() -> None:
    for n in range(3, 60):
        t = security.default_threshold(n)
        assert 3 * t > 2 * n and 3 * (t - 1) <= 2 * n or t == 2
        assert security.tolerated_corruptions(t, n) >= (n - 1) // 3
    assert security.default_threshold(100, 10) == 2 * 11 // 3 + 1
    # the examples of docs/secure_aggregation.md section 3.1
    assert [(security.default_threshold(n), security.tolerated_corruptions(security.default_threshold(n), n))
            for n in (5, 10)] == [(4, 2), (7, 3)]  # fmt: skip
