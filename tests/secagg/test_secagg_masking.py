"""Masking protocol: exact cancellation, drop-out recovery, threshold failure, key substitution, replay and
malformed-message rejection, and an instrumented server that sees nothing correlated with one client's
update."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secagg import masking, wire
from secagg.config import MaskingConfig
from secagg.encoding import to_signed
from secagg.errors import MessageRejected, ProtocolError, SignatureInvalid, ThresholdNotMet
from secagg.keys import SERVER_ID, Identity, Roster
from secagg.wire import Kind
from tests.secagg.harness import GRAPH_SEED, MODEL, RUN_ID, Federation, RoundRecord, federation_of, run_round

FED8 = Federation.provision(8)


def _grid_updates(rng: np.random.Generator, nodes: list[int], d: int, scale: float) -> dict[int, np.ndarray]:
    """Updates on the fixed-point grid k/scale, so stochastic rounding is exact and sums can be compared
    exactly."""
    return {u: rng.integers(-int(scale), int(scale) + 1, size=d) / scale for u in nodes}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(3, 7),
    d=st.integers(1, 30),
    bits=st.sampled_from([32, 64]),
    data=st.data(),
)
def test_masks_cancel_exactly(n: int, d: int, bits: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(2, n - 1))
    k = data.draw(st.sampled_from([None, *[k for k in range(2, n, 2) if k >= t]]))
    cfg = MaskingConfig(threshold=t, neighbourhood_size=k, modulus_bits=bits, scale=2.0**10, max_weight=9)
    fed = federation_of(n)
    nodes = sorted(fed.identities)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    ups = _grid_updates(rng, nodes, d, 2.0**10)
    ws = {u: int(rng.integers(1, 10)) for u in nodes}
    rec = RoundRecord()
    res = run_round(cfg, fed, ups, ws, record=rec)
    exact_int = sum(ws[u] * np.round(ups[u] * 2**10).astype(np.int64) for u in nodes)
    assert res.survivors == tuple(nodes) and res.total_weight == sum(ws.values())
    # Exact integers on both sides: the unmasked modular sum equals the plaintext integer sum bit for bit.
    assert np.array_equal(res.mean, exact_int.astype(np.float64) / (2.0**10 * sum(ws.values())))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_dropouts_after_key_sharing_give_exact_sum_of_survivors(data: st.DataObject) -> None:
    n, t = 7, 3
    k = data.draw(st.sampled_from([None, 4]))
    cfg = MaskingConfig(threshold=t, neighbourhood_size=k, scale=2.0**8)
    fed = federation_of(n)
    nodes = sorted(fed.identities)
    n_drop = data.draw(st.integers(0, n - t if k is None else 1))
    drop = set(data.draw(st.permutations(nodes))[:n_drop])
    late = data.draw(st.sampled_from(["masked", "unmask"]))
    ups = _grid_updates(np.random.default_rng(n_drop), nodes, 12, 2.0**8)
    res = run_round(cfg, fed, ups, drop_before={late: drop})
    in_sum = [u for u in nodes if u not in drop] if late == "masked" else nodes
    assert res.survivors == tuple(in_sum)
    np.testing.assert_array_equal(res.mean, np.mean([ups[u] for u in in_sum], axis=0))


def test_full_dropout_budget_n_minus_t_complete_graph() -> None:
    cfg = MaskingConfig(threshold=4, scale=2.0**8)
    nodes = sorted(FED8.identities)
    ups = _grid_updates(np.random.default_rng(1), nodes, 9, 2.0**8)
    res = run_round(cfg, FED8, ups, drop_before={"masked": set(nodes[:4])})
    assert res.survivors == tuple(nodes[4:]) and res.dropped == tuple(nodes[:4])
    np.testing.assert_array_equal(res.mean, np.mean([ups[u] for u in nodes[4:]], axis=0))


def test_real_valued_updates_within_stated_error_bound() -> None:
    cfg = MaskingConfig(threshold=3, scale=2.0**14, clip_range=1.0)
    nodes = sorted(FED8.identities)[:5]
    rng = np.random.default_rng(5)
    ups = {u: rng.normal(0, 0.3, 200) for u in nodes}
    res = run_round(cfg, FED8, ups, drop_before={"masked": {nodes[0]}})
    exact = np.mean([np.clip(ups[u], -1, 1) for u in nodes[1:]], axis=0)
    assert res.error_bound == pytest.approx(4 / (2.0**14 * 4))
    assert np.max(np.abs(res.mean - exact)) < res.error_bound


@pytest.mark.parametrize("stage", ["advertise", "share", "masked", "unmask"])
def test_below_threshold_fails_loudly_and_is_recorded(stage: str) -> None:
    cfg = MaskingConfig(threshold=4)
    nodes = sorted(FED8.identities)[:5]
    ups = {u: np.zeros(3) for u in nodes}
    rec = RoundRecord()
    with pytest.raises(ThresholdNotMet):
        run_round(cfg, FED8, ups, drop_before={stage: set(nodes[:2])}, record=rec)
    assert rec.server is not None and rec.server.stage is masking.ServerStage.FAILED
    assert rec.server.failure and "threshold" in rec.server.failure
    with pytest.raises(ProtocolError, match="already failed"):
        masking.server_unmask(rec.server, {})


def test_neighbour_graph_is_k_regular_symmetric_and_seed_determined() -> None:
    nodes = list(range(100, 120))
    g = masking.neighbour_graph(nodes, 6, b"s" * 32)
    assert all(len(vs) == 6 and u not in vs for u, vs in g.items())
    assert all(u in g[v] for u, vs in g.items() for v in vs)
    assert g == masking.neighbour_graph(list(reversed(nodes)), 6, b"s" * 32)
    assert g != masking.neighbour_graph(nodes, 6, b"t" * 32)
    full = masking.neighbour_graph(nodes[:5], None, b"s" * 32)
    assert full[100] == frozenset(nodes[1:5])


def _setup_two_stages(cfg: MaskingConfig, nodes: list[int]):  # type: ignore[no-untyped-def]
    clients = {u: FED8.client(cfg, u) for u in nodes}
    server, req = FED8.start(cfg, nodes, 4, 9)
    adv = {u: masking.advertise_keys(clients[u], req[u]) for u in nodes}
    req2 = masking.server_collect_advertisements(server, adv)
    return clients, server, adv, req2


def test_key_substitution_by_the_server_is_caught() -> None:
    cfg = MaskingConfig(threshold=2)
    nodes = sorted(FED8.identities)[:3]
    clients, server, _, req2 = _setup_two_stages(cfg, nodes)
    victim, attacker_view = nodes[0], nodes[1]
    env = wire.unpack(
        req2[victim], kind=Kind.SHARE_KEYS_REQUEST, run_id=server.run_id, round_number=9, recipient=victim
    )
    bundles = wire.decode_share_keys_request(env.payload)
    forged = wire.KeyBundle(bytes([9]) * 32, bundles[attacker_view].s_public, bundles[attacker_view].signature)
    bundles[attacker_view] = forged
    tampered = wire.pack(
        Kind.SHARE_KEYS_REQUEST, server.run_id, 9, SERVER_ID, victim, wire.encode_share_keys_request(bundles)
    )
    with pytest.raises(SignatureInvalid, match=f"node {attacker_view}"):
        masking.share_keys(clients[victim], tampered)


def test_impostor_outside_roster_is_caught() -> None:
    cfg = MaskingConfig(threshold=2)
    nodes = sorted(FED8.identities)[:3]
    impostor = Identity.generate(nodes[1])  # same node id, key not in the roster
    fake = masking.ClientState.create(
        cfg, impostor, Roster({**{u: FED8.identities[u].public for u in FED8.roster}, nodes[1]: impostor.public}),
        run_id=RUN_ID, graph_seed=GRAPH_SEED, model_digest=MODEL,
    )  # fmt: skip
    clients = {u: FED8.client(cfg, u) for u in (nodes[0], nodes[2])}
    clients[nodes[1]] = fake
    # A server that forwards anything: the impostor's roster is only its own belief.
    server, req = FED8.start(cfg, nodes, 4, 9, roster=fake.roster)
    adv = {u: masking.advertise_keys(clients[u], req[u]) for u in nodes}
    req2 = masking.server_collect_advertisements(server, adv)
    with pytest.raises(SignatureInvalid, match="does not verify against its roster identity"):
        masking.share_keys(clients[nodes[0]], req2[nodes[0]])


def test_client_messages_replayed_wrong_round_or_truncated_are_rejected() -> None:
    cfg = MaskingConfig(threshold=2)
    nodes = sorted(FED8.identities)[:3]
    clients, server, adv, req2 = _setup_two_stages(cfg, nodes)
    u = nodes[0]
    with pytest.raises(ProtocolError, match="masked_input needs stage shared"):
        masking.masked_input(clients[u], req2[u], np.zeros(4))
    with pytest.raises(MessageRejected, match="truncated"):
        masking.share_keys(clients[u], req2[u][:-5])
    wrong_round = wire.pack(Kind.SHARE_KEYS_REQUEST, server.run_id, 8, SERVER_ID, u, req2[u][52:])
    with pytest.raises(MessageRejected, match="round 8"):
        masking.share_keys(clients[u], wrong_round)
    with pytest.raises(MessageRejected, match="addressed to"):
        masking.share_keys(clients[u], req2[nodes[1]])
    reply = masking.share_keys(clients[u], req2[u])
    assert reply[5] == Kind.SHARE_KEYS
    with pytest.raises(ProtocolError, match="needs stage advertised"):
        masking.share_keys(clients[u], req2[u])
    # The server treats a replayed, wrong-kind or malformed reply as a dropout and records why.
    replies = {v: masking.share_keys(clients[v], req2[v]) for v in nodes[1:]}
    replies[u] = adv[u]
    masking.server_collect_shares(server, replies)
    assert "expected a SHARE_KEYS message" in server.rejected[u]
    assert set(server.partners) == set(nodes[1:])


def test_server_rejects_replayed_and_mis_sized_masked_inputs() -> None:
    cfg = MaskingConfig(threshold=2)
    nodes = sorted(FED8.identities)[:4]
    ups = {u: np.ones(4) / 4 for u in nodes}
    rec = RoundRecord()
    run_round(cfg, FED8, ups, record=rec)
    old = rec.received["masked"]
    # Replaying round 3's messages into a fresh round 4 fails the round binding.
    clients, server, _, req2 = _setup_two_stages(cfg, nodes)
    shares = {u: masking.share_keys(clients[u], req2[u]) for u in nodes}
    req3 = masking.server_collect_shares(server, shares)
    fresh = {u: masking.masked_input(clients[u], req3[u], ups[u]) for u in nodes}
    replies = {
        nodes[0]: old[nodes[0]],
        nodes[1]: fresh[nodes[1]][:-4],
        nodes[2]: fresh[nodes[2]],
        nodes[3]: fresh[nodes[3]],
    }
    masking.server_collect_masked_inputs(server, replies)
    assert "bound to round 3" in server.rejected[nodes[0]]
    assert "truncated" in server.rejected[nodes[1]]
    assert server.survivors == tuple(nodes[2:])
    with pytest.raises(ProtocolError, match="needs server stage masked-input"):
        masking.server_collect_masked_inputs(server, fresh)


def test_server_cannot_lower_threshold_or_replay_an_old_round() -> None:
    nodes = sorted(FED8.identities)[:4]
    lax = MaskingConfig(threshold=2)
    strict = MaskingConfig(threshold=3)
    _, req = FED8.start(lax, nodes, 4, 5)
    client = FED8.client(strict, nodes[0])
    with pytest.raises(MessageRejected, match="differ from this node's provisioned"):
        masking.advertise_keys(client, req[nodes[0]])
    old = FED8.client(lax, nodes[0], last_round=5)
    with pytest.raises(MessageRejected, match="replayed or re-run round"):
        masking.advertise_keys(old, req[nodes[0]])
    other_run = FED8.client(lax, nodes[0], run_id=bytes(16))
    with pytest.raises(MessageRejected, match="is pinned to run"):
        masking.advertise_keys(other_run, req[nodes[0]])
    _, reseeded = FED8.start(lax, nodes, 4, 6, graph_seed=b"h" * 32)
    with pytest.raises(MessageRejected, match="graph seed"):
        masking.advertise_keys(FED8.client(lax, nodes[0]), reseeded[nodes[0]])


def _signed_unmask_request(c: masking.ClientState, survivors: tuple[int, ...], signers: list[int]) -> bytes:
    """An UNMASK_REQUEST for ``survivors`` with valid consistency signatures of ``signers`` (the server playing
    every signer, as it can with keys it holds in a test)."""
    from secagg.keys import consistency_transcript

    transcript = consistency_transcript(c.run_id, c.round_number, c.setup, survivors)
    sigs = {u: FED8.identities[u].sign(transcript) for u in signers}
    payload = wire.encode_unmask_request(survivors, sigs)
    return wire.pack(Kind.UNMASK_REQUEST, c.run_id, c.round_number, SERVER_ID, c.node_id, payload)


def test_client_never_reveals_both_shares_of_a_peer() -> None:
    cfg = MaskingConfig(threshold=2)
    nodes = sorted(FED8.identities)[:3]
    rec = RoundRecord()
    run_round(cfg, FED8, {u: np.zeros(2) for u in nodes}, record=rec)
    c = rec.clients[nodes[0]]
    assert c.revealed[nodes[1]] is wire.RevealKind.SELF_MASK_SEED
    # A second unmask request (the server now claiming nodes[1] dropped, validly signed) is refused.
    c.stage = masking.ClientStage.CHECKED
    c.signed_survivors = (nodes[0], nodes[2])
    c.guard.seen.clear()
    claim = _signed_unmask_request(c, (nodes[0], nodes[2]), [nodes[0], nodes[2]])
    with pytest.raises(ProtocolError, match="refuses to reveal both shares"):
        masking.unmask(c, claim)


def test_unmask_request_must_list_the_client_and_enough_survivors() -> None:
    cfg = MaskingConfig(threshold=3)
    nodes = sorted(FED8.identities)[:4]
    rec = RoundRecord()
    run_round(cfg, FED8, {u: np.zeros(2) for u in nodes}, record=rec)
    c = rec.clients[nodes[0]]
    for survivors, match in [
        ((nodes[1], nodes[2], nodes[3]), "does not list it"),
        ((nodes[0], nodes[1]), "threshold"),
    ]:
        c.stage = masking.ClientStage.CHECKED
        c.signed_survivors = survivors
        c.guard.seen.clear()
        c.revealed.clear()
        with pytest.raises((MessageRejected, ThresholdNotMet), match=match):
            masking.unmask(c, _signed_unmask_request(c, survivors, list(survivors)))


@pytest.mark.statistical
def test_instrumented_server_sees_nothing_correlated_with_a_client_update() -> None:
    """Every payload the server receives is compared with client 0's encoded update.

    Under independence the Pearson correlation of two length-L vectors (one uniform) is ~N(0, 1/L); the test
    flags |r| > 6/sqrt(L), false-positive rate ~2e-9 per comparison (~30 comparisons). A positive control
    shows the statistic does flag the plaintext encoding itself.
    """
    cfg = MaskingConfig(threshold=3, scale=2.0**20, clip_range=1.0)
    nodes = sorted(FED8.identities)[:5]
    d = 4096
    rng = np.random.default_rng(11)
    ups = {u: rng.uniform(-1, 1, d) for u in nodes}
    ups[nodes[0]] = np.sign(rng.standard_normal(d)) * 0.9  # a very distinctive update
    rec = RoundRecord()
    res = run_round(cfg, FED8, ups, drop_before={"masked": {nodes[4]}}, record=rec)
    assert nodes[0] in res.survivors
    target = np.round(ups[nodes[0]] * 2**20)
    limit = 6 / np.sqrt(d)
    checked = 0
    for stage, replies in rec.received.items():
        for sender, msg in replies.items():
            payload = msg[wire.HEADER_BYTES :]
            width = 4
            words = np.frombuffer(payload[: (len(payload) // width) * width], dtype="<u4")
            if stage == "masked":
                words = wire.decode_masked_input(payload, d + 1, 32)[:d]
                signed = to_signed(words, 32).astype(np.float64)
                r = np.corrcoef(signed, target)[0, 1]
                assert abs(r) < limit, (stage, sender, r)
                checked += 1
            else:
                # Key bundles, encrypted shares and Shamir shares: compare the first words with the target's
                # head.
                m = min(words.size, d)
                if m > 64:
                    r = np.corrcoef(to_signed(words[:m], 32).astype(np.float64), target[:m])[0, 1]
                    assert abs(r) < 6 / np.sqrt(m), (stage, sender, r)
                    checked += 1
                assert ups[nodes[0]].astype("<f8").tobytes()[:16] not in payload
    assert checked >= 4 + 4
    # Positive control: the unmasked encoding is perfectly correlated.
    plain = np.round(ups[nodes[0]] * 2**20)
    assert np.corrcoef(plain, target)[0, 1] > 1 - 1e-12


def test_state_reprs_hide_secrets() -> None:
    cfg = MaskingConfig(threshold=2)
    nodes = sorted(FED8.identities)[:3]
    rec = RoundRecord()
    run_round(cfg, FED8, {u: np.zeros(2) for u in nodes}, record=rec)
    c = rec.clients[nodes[0]]
    text = repr(c) + repr(c.identity) + repr(c.s_keys) + repr(rec.server)
    assert c.self_mask_seed.hex() not in text
    assert c.identity.private_bytes().hex() not in text
    assert c.s_keys is not None and "hidden" in repr(c.s_keys)
    assert "private" not in repr(c).replace("private=<hidden>", "")


def test_roster_bytes_round_trip_and_rejects() -> None:
    raw = FED8.roster.to_bytes()
    back = Roster.from_bytes(raw)
    assert back.to_bytes() == raw and sorted(back) == sorted(FED8.roster)
    from fedmpt.errors import ConfigError

    with pytest.raises(ConfigError, match="entries need"):
        Roster.from_bytes(raw[:-1])


def test_provisioned_identities_load_back(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from secagg.keys import identity_file_name, load_identity, load_roster, provision_identities

    roster = provision_identities([3, 4], tmp_path)
    loaded = load_roster(tmp_path / "roster.bin")
    ident = load_identity(tmp_path / identity_file_name(4), 4)
    assert loaded.to_bytes() == roster.to_bytes()
    assert masking.public_key_of(loaded, 4) == ident.public
    assert ((tmp_path / identity_file_name(4)).stat().st_mode & 0o777) == 0o600


def test_consistency_check_round_with_dropouts() -> None:
    cfg = MaskingConfig(threshold=3, scale=2.0**8)
    nodes = sorted(FED8.identities)[:6]
    ups = _grid_updates(np.random.default_rng(2), nodes, 7, 2.0**8)
    drops = {"masked": {nodes[0]}, "consistency": {nodes[1]}, "unmask": {nodes[2]}}
    rec = RoundRecord()
    res = run_round(cfg, FED8, ups, drop_before=drops, record=rec)
    assert res.survivors == tuple(nodes[1:])
    np.testing.assert_array_equal(res.mean, np.mean([ups[u] for u in nodes[1:]], axis=0))
    assert rec.server is not None and rec.server.unmaskers == frozenset(nodes[2:])


def _to_consistency_stage(cfg: MaskingConfig, nodes: list[int]):  # type: ignore[no-untyped-def]
    clients = {u: FED8.client(cfg, u) for u in nodes}
    server, req = FED8.start(cfg, nodes, 3, 9)
    rep = {u: masking.advertise_keys(clients[u], req[u]) for u in nodes}
    req = masking.server_collect_advertisements(server, rep)
    rep = {u: masking.share_keys(clients[u], req[u]) for u in nodes}
    req = masking.server_collect_shares(server, rep)
    rep = {u: masking.masked_input(clients[u], req[u], np.zeros(3)) for u in nodes}
    return clients, server, masking.server_collect_masked_inputs(server, rep)


def test_consistency_check_catches_server_equivocation() -> None:
    """The server tells node a that node z dropped, and everyone else that z survived."""
    cfg = MaskingConfig(threshold=3)
    nodes = sorted(FED8.identities)[:5]
    clients, server, _ = _to_consistency_stage(cfg, nodes)
    a, z = nodes[0], nodes[4]
    run, rnd = server.run_id, server.round_number

    def request(kind: Kind, to: int, payload: bytes) -> bytes:
        return wire.pack(kind, run, rnd, SERVER_ID, to, payload)

    full, short = tuple(nodes), tuple(u for u in nodes if u != z)
    sigs = {}
    for u in nodes:
        view = short if u == a else full
        reply = masking.consistency_check(clients[u], request(Kind.CONSISTENCY_REQUEST, u, wire.encode_survivors(view)))
        sigs[u] = reply[wire.HEADER_BYTES :]
    # Node a is shown the short list with the others' signatures (made over the full list): invalid; adding
    # z's signature names a node the list says dropped.
    others = {u: sigs[u] for u in nodes if u != a}
    in_short = {u: sigs[u] for u in short if u != a}
    with pytest.raises(SignatureInvalid):
        masking.unmask(clients[a], request(Kind.UNMASK_REQUEST, a, wire.encode_unmask_request(short, in_short)))
    clients[a].guard.seen.discard((int(Kind.UNMASK_REQUEST), SERVER_ID))
    with pytest.raises(MessageRejected, match="non-survivors"):
        masking.unmask(clients[a], request(Kind.UNMASK_REQUEST, a, wire.encode_unmask_request(short, others)))
    # Node a is shown the full list: it differs from the one a signed.
    clients[a].guard.seen.discard((int(Kind.UNMASK_REQUEST), SERVER_ID))
    with pytest.raises(MessageRejected, match="differs from the one node"):
        masking.unmask(clients[a], request(Kind.UNMASK_REQUEST, a, wire.encode_unmask_request(full, others)))
    # Too few signatures, and a signature by a non-survivor, are refused as well.
    b = nodes[1]
    two = {u: sigs[u] for u in nodes[1:3]}
    with pytest.raises(ThresholdNotMet, match="2 consistency signatures"):
        masking.unmask(clients[b], request(Kind.UNMASK_REQUEST, b, wire.encode_unmask_request(full, two)))


def test_a_request_without_the_consistency_check_is_refused() -> None:
    nodes = sorted(FED8.identities)[:3]
    cfg = MaskingConfig(threshold=2)
    _, req = FED8.start(cfg, nodes, 4, 1)
    env = wire.unpack(req[nodes[0]], kind=Kind.ADVERTISE_REQUEST, run_id=None, round_number=None, recipient=nodes[0])
    setup = wire.decode_advertise_request(env.payload)
    unchecked = wire.AdvertiseRequest(setup.participants, setup.graph_seed, 4, 2, 0, 32, consistency_check=False)
    bad = wire.pack(Kind.ADVERTISE_REQUEST, RUN_ID, 1, SERVER_ID, nodes[0], wire.encode_advertise_request(unchecked))
    with pytest.raises(MessageRejected, match="consistency check"):
        masking.advertise_keys(FED8.client(cfg, nodes[0]), bad)
