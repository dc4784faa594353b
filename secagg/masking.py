"""Secure aggregation by double masking (Bonawitz et al. 2017), optionally on the SecAgg+ graph (Bell et al.).

The protocol runs as five named stages. Client functions take the
:class:`ClientState` and the server's request bytes and return reply bytes; server functions take the
:class:`ServerState` and the replies that arrived before the stage timeout (missing nodes have dropped) and
return the next requests.

====================  ==========================================  ===========================================
stage                 client (node u)                              server
====================  ==========================================  ===========================================
0 start               --                                           :func:`server_start_round`: participants,
                                                                    graph seed, d -> ADVERTISE_REQUEST
1 advertise keys      :func:`advertise_keys`: fresh X25519 c/s     :func:`server_collect_advertisements`: U1,
                      pairs, Ed25519-signed                        route neighbours' bundles
2 share keys          :func:`share_keys`: verify bundles against   :func:`server_collect_shares`: U2, route
                      the roster; draw b_u; Shamir-share b_u and   ciphertexts to their recipients
                      s_sk_u (t of |N(u)|); AEAD-encrypt per peer
3 masked input        :func:`masked_input`: decrypt shares;        :func:`server_collect_masked_inputs`: U3,
                      y_u = e_u + PRG(b_u) + sum_v +-PRG(s_uv)     running modular sum; survivor list
3b consistency        :func:`consistency_check`: check U3 against  :func:`server_collect_consistency`: >= t
   check              its own U2, sign U3 with the identity key    signatures, sent with U3 to the signers
4 unmask              :func:`unmask`: b_v shares for survivors,    :func:`server_unmask`: reconstruct b_v
                      s_sk_v shares for dropouts, never both       (v in U3) and s_sk_v (v in U2 \\ U3),
                                                                    remove masks, decode the weighted mean
====================  ==========================================  ===========================================

Sign convention: u adds +PRG(s_uv) if u < v and -PRG(s_uv) otherwise, so pairwise masks of two survivors
cancel. The self mask PRG(b_u) hides y_u even if u's pairwise masks are later revealed because it was
(wrongly) declared dropped.

Threat model: an actively malicious server colluding with a bounded number of provisioned clients (the bound is
:func:`secagg.security.tolerated_corruptions`). What the server cannot change comes from provisioning, never from
its messages: the roster, the run id, t, k, the modulus and the SecAgg+ graph seed. Every honest client checks the
nested sets of Bonawitz et al. (section 6) from its own view:

* U1 (peers whose signed keys it got) must hold >= t - 1 graph neighbours; every bundle is signed over the signer's
  digest of the round setup (global model, participants, d, t, k, modulus), verified against the client's own;
* U2(u) (peers whose share ciphertexts it received and masked with) must give >= t share holders;
* U3 (survivors) must list u, no neighbour of u outside U2(u), and >= t members of U2(u); u signs U3;
* U4 (signers) must be >= t roster-valid signatures on exactly the U3 that u signed; then u reveals self-mask
  shares for U3 and mask-key shares only for U2(u) minus U3, never both for one peer.

A client takes part in at most one protocol instance per round (``last_round``); the app keeps that counter on the
node's disk. See docs/secure_aggregation.md section 3 for the guarantee and the test of each clause.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedmpt.errors import ConfigError
from secagg import wire
from secagg.config import MaskingConfig
from secagg.encoding import check_capacity, decode_sum, encode, quantization_error_bound
from secagg.errors import MessageRejected, ProtocolError, ThresholdNotMet
from secagg.keys import (
    RUN_ID_BYTES,
    SERVER_ID,
    SETUP_DIGEST_BYTES,
    Identity,
    Roster,
    RoundKeyPair,
    advertise_transcript,
    check_node_id,
    consistency_transcript,
    pairwise_seed,
    public_bytes,
    round_context,
    share_encryption_keys,
    x25519_from_private_bytes,
    x25519_private_bytes,
)
from secagg.prg import Purpose, add_mask, fresh_seed
from secagg.shamir import Share, decode_share, encode_share, reconstruct, split
from secagg.wire import Kind, RevealKind

logger = logging.getLogger(__name__)

_ZERO_NONCE = bytes(12)
#: Largest model vector accepted from a server request (2**31 coordinates).
MAX_VECTOR_LENGTH = 2**31


# --------------------------------------------------------------------------------------------------- graph


def neighbour_graph(
    participants: Sequence[int], neighbourhood_size: int | None, graph_seed: bytes
) -> dict[int, frozenset[int]]:
    """SecAgg+ communication graph: each node's neighbours (never itself).

    ``neighbourhood_size`` None, or k >= n-1, gives the complete graph of SecAgg. Otherwise the nodes are
    placed on a ring in the order of SHA-256(graph_seed || node id) (a permutation every client can
    recompute from the seed, so all views agree) and each node is joined to the k/2 nearest ring positions
    on each side: the k-regular Harary graph H_{k,n} of Bell et al. 2020.
    """
    nodes = sorted(participants)
    n = len(nodes)
    if neighbourhood_size is None or neighbourhood_size >= n - 1:
        everyone = frozenset(nodes)
        return {u: everyone - {u} for u in nodes}
    ring = sorted(nodes, key=lambda u: hashlib.sha256(graph_seed + struct.pack("<Q", u)).digest())
    half = neighbourhood_size // 2
    graph: dict[int, set[int]] = {u: set() for u in nodes}
    for i, u in enumerate(ring):
        for step in range(1, half + 1):
            v = ring[(i + step) % n]
            graph[u].add(v)
            graph[v].add(u)
    return {u: frozenset(vs) for u, vs in graph.items()}


def round_neighbours(
    roster_graph: Mapping[int, frozenset[int]], participants: Sequence[int]
) -> dict[int, frozenset[int]]:
    """Each participant's neighbours in this round: its provisioned (roster) neighbours that take part."""
    present = frozenset(participants)
    return {u: roster_graph[u] & present for u in sorted(present)}


def setup_digest(model_digest: bytes, participants: Sequence[int], vector_length: int, config: MaskingConfig) -> bytes:
    """SHA-256 of the round setup one client saw: the global model's digest, the sorted participants, d, t, k and
    the modulus. Signed inside every key advertisement and consistency signature."""
    if len(model_digest) != SETUP_DIGEST_BYTES:
        raise ConfigError(f"model digest must be {SETUP_DIGEST_BYTES} bytes, got {len(model_digest)}")
    ids = sorted(participants)
    h = hashlib.sha256(b"fedmpt-secagg/v1/round-setup|")
    h.update(model_digest)
    h.update(struct.pack("<I", len(ids)) + b"".join(struct.pack("<Q", u) for u in ids))
    k = 0 if config.neighbourhood_size is None else config.neighbourhood_size
    h.update(struct.pack("<QIIB", vector_length, config.threshold, k, config.modulus_bits))
    return h.digest()


def _add_pair_mask(acc: np.ndarray, own: int, peer: int, seed: bytes, context: bytes, *, undo: bool = False) -> None:
    """In place: node ``own``'s share of the pairwise mask with ``peer``, +PRG(s_uv) if own < peer and -PRG(s_uv)
    otherwise (``undo`` applies the opposite, to remove it)."""
    add_mask(acc, seed, Purpose.PAIRWISE_MASK, context, subtract=(own < peer) == undo)


def _add_self_mask(acc: np.ndarray, seed: bytes, context: bytes, node: int, *, undo: bool = False) -> None:
    """In place: ``acc += PRG(b_u)`` (``-=`` with ``undo``)."""
    add_mask(acc, seed, Purpose.SELF_MASK, context + struct.pack("<Q", node), subtract=undo)


def _aad(run_id: bytes, round_number: int, sender: int, recipient: int) -> bytes:
    return b"fedmpt-secagg/v1/share|" + round_context(run_id, round_number) + struct.pack("<QQ", sender, recipient)


# --------------------------------------------------------------------------------------------------- client


class ClientStage(enum.Enum):
    """Where a client is in the round; each client function requires one stage and moves to the next."""

    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    CHECKED = "checked"
    DONE = "done"


@dataclass
class ClientState:
    """Everything one client keeps between the stages of one round. ``repr`` shows no secret.

    Build one per round with :meth:`create` from what provisioning fixed (config, identity, roster, run id, graph
    seed), the digest of the global model the client received and ``last_round``, the last round this client took
    part in (kept by the caller across rounds and restarts): a round number <= ``last_round`` is refused, so a
    recorded or re-run round cannot be replayed to it.
    """

    config: MaskingConfig
    identity: Identity = field(repr=False)
    roster: Roster = field(repr=False)
    pinned_run_id: bytes = b""
    graph_seed: bytes = field(default=b"", repr=False)
    model_digest: bytes = b""
    last_round: int | None = None
    stage: ClientStage = ClientStage.NEW
    run_id: bytes = b""
    round_number: int = -1
    participants: tuple[int, ...] = ()
    neighbours: frozenset[int] = frozenset()
    vector_length: int = 0
    setup: bytes = b""
    c_keys: RoundKeyPair | None = field(default=None, repr=False)
    s_keys: RoundKeyPair | None = field(default=None, repr=False)
    self_mask_seed: bytes = field(default=b"", repr=False)
    peer_bundles: dict[int, wire.KeyBundle] = field(default_factory=dict, repr=False)
    held_shares: dict[int, tuple[Share, Share]] = field(default_factory=dict, repr=False)
    receive_keys: dict[int, bytes] = field(default_factory=dict, repr=False)
    signed_survivors: tuple[int, ...] | None = None
    revealed: dict[int, RevealKind] = field(default_factory=dict)
    guard: wire.ReplayGuard = field(default_factory=wire.ReplayGuard, repr=False)

    @classmethod
    def create(
        cls,
        config: MaskingConfig,
        identity: Identity,
        roster: Roster,
        *,
        run_id: bytes,
        graph_seed: bytes,
        model_digest: bytes,
        last_round: int | None = None,
    ) -> ClientState:
        """State for one new round of the client ``identity.node_id``; the roster must list that node."""
        if identity.node_id not in roster:
            raise ConfigError(f"node {identity.node_id} is not in the roster it was given")
        if public_key_of(roster, identity.node_id) != identity.public:
            raise ConfigError(f"roster key of node {identity.node_id} does not match its identity key")
        if len(run_id) != RUN_ID_BYTES or len(graph_seed) != 32 or len(model_digest) != SETUP_DIGEST_BYTES:
            raise ConfigError(
                f"pinned run id, graph seed and model digest must be 16, 32 and 32 bytes, got {len(run_id)}, "
                f"{len(graph_seed)} and {len(model_digest)}"
            )
        return cls(
            config,
            identity,
            roster,
            pinned_run_id=bytes(run_id),
            graph_seed=bytes(graph_seed),
            model_digest=bytes(model_digest),
            last_round=last_round,
        )

    @property
    def masked_with(self) -> frozenset[int]:
        """U2 as this client saw it: the peers whose share ciphertexts it received (and masked with)."""
        return frozenset(self.held_shares) - {self.node_id}

    @property
    def node_id(self) -> int:
        """This client's node id."""
        return self.identity.node_id

    def _require(self, stage: ClientStage, action: str) -> None:
        if self.stage is not stage:
            raise ProtocolError(
                f"node {self.node_id}: {action} needs stage {stage.value}, client is at {self.stage.value}"
            )

    def _open(self, data: bytes, kind: Kind) -> wire.Envelope:
        env = wire.unpack(
            data,
            kind=kind,
            run_id=self.run_id,
            round_number=self.round_number,
            recipient=self.node_id,
            sender=SERVER_ID,
        )
        self.guard.accept(env)
        return env

    def _pack(self, kind: Kind, payload: bytes) -> bytes:
        return wire.pack(kind, self.run_id, self.round_number, self.node_id, SERVER_ID, payload)


def public_key_of(roster: Roster, node_id: int) -> bytes:
    """Raw Ed25519 public key the roster holds for ``node_id``."""
    return public_bytes(roster[node_id])


def advertise_keys(state: ClientState, request: bytes) -> bytes:
    """Stage 1 (client): check the round setup, draw fresh X25519 pairs (c, s) and return them signed.

    The client refuses a setup for another run than its pinned one, for a round <= ``last_round``, whose threshold,
    neighbourhood size, modulus or graph seed differ from what provisioning fixed (a server cannot lower t or pick
    the SecAgg+ graph), which does not list it, lists fewer than t nodes or nodes outside the roster, or would
    overflow the modulus. The bundle is signed over (run, round, setup digest, node, c_pk, s_pk).
    """
    state._require(ClientStage.NEW, "advertise_keys")
    env = wire.unpack(
        request,
        kind=Kind.ADVERTISE_REQUEST,
        run_id=None,
        round_number=None,
        recipient=state.node_id,
        sender=SERVER_ID,
    )
    cfg = state.config
    if env.run_id != state.pinned_run_id:
        raise MessageRejected(
            f"ADVERTISE_REQUEST for run {env.run_id.hex()}, node {state.node_id} is pinned to run "
            f"{state.pinned_run_id.hex()}"
        )
    if state.last_round is not None and env.round_number <= state.last_round:
        raise MessageRejected(
            f"ADVERTISE_REQUEST for round {env.round_number}, node {state.node_id} already took part in round "
            f"{state.last_round} (replayed or re-run round)"
        )
    req = wire.decode_advertise_request(env.payload)
    want_k = 0 if cfg.neighbourhood_size is None else cfg.neighbourhood_size
    got = (req.threshold, req.neighbourhood_size, req.modulus_bits, req.consistency_check)
    want = (cfg.threshold, want_k, cfg.modulus_bits, True)
    if got != want:
        raise MessageRejected(
            f"ADVERTISE_REQUEST parameters (t, k, bits, consistency check) = {got} differ from this node's "
            f"provisioned {want}"
        )
    if req.graph_seed != state.graph_seed:
        raise MessageRejected("ADVERTISE_REQUEST graph seed differs from the provisioned SecAgg+ graph seed")
    if state.node_id not in req.participants:
        raise MessageRejected(f"ADVERTISE_REQUEST does not list node {state.node_id} as a participant")
    strangers = sorted(set(req.participants) - set(state.roster))
    if strangers:
        raise MessageRejected(f"ADVERTISE_REQUEST lists nodes {strangers} that are not in the provisioned roster")
    if len(req.participants) < cfg.threshold:
        raise ThresholdNotMet(f"{len(req.participants)} participants, threshold is {cfg.threshold}")
    if not 0 < req.vector_length <= MAX_VECTOR_LENGTH:
        raise MessageRejected(f"ADVERTISE_REQUEST vector length {req.vector_length} outside [1, {MAX_VECTOR_LENGTH}]")
    check_capacity(cfg, len(req.participants))
    state.run_id, state.round_number = env.run_id, env.round_number
    state.last_round = env.round_number  # one protocol instance per round, whatever happens next
    state.guard.accept(env)
    state.participants = req.participants
    state.vector_length = req.vector_length
    roster_graph = neighbour_graph(list(state.roster), cfg.neighbourhood_size, state.graph_seed)
    state.neighbours = roster_graph[state.node_id] & frozenset(req.participants)
    state.setup = setup_digest(state.model_digest, req.participants, req.vector_length, cfg)
    state.c_keys, state.s_keys = RoundKeyPair.generate(), RoundKeyPair.generate()
    transcript = advertise_transcript(
        state.run_id, state.round_number, state.node_id, state.c_keys.public, state.s_keys.public, state.setup
    )
    bundle = wire.KeyBundle(state.c_keys.public, state.s_keys.public, state.identity.sign(transcript))
    state.stage = ClientStage.ADVERTISED
    return state._pack(Kind.ADVERTISE_KEYS, wire.encode_key_bundle(bundle))


def share_keys(state: ClientState, request: bytes) -> bytes:
    """Stage 2 (client): verify neighbours' signed keys, Shamir-share b_u and s_sk_u, encrypt one share per
    peer.

    Every forwarded bundle must come from a graph neighbour and carry a valid Ed25519 signature by the
    roster key of that node over (run id, round, node id, c_pk, s_pk); otherwise
    :class:`~secagg.errors.SignatureInvalid`. Shares are encrypted with ChaCha20-Poly1305 under
    HKDF(X25519(c_sk_u, c_pk_v)) for the ordered pair (u, v), with the run, round and both ids as associated
    data.
    """
    state._require(ClientStage.ADVERTISED, "share_keys")
    env = state._open(request, Kind.SHARE_KEYS_REQUEST)
    bundles = wire.decode_share_keys_request(env.payload)
    strangers = sorted(set(bundles) - state.neighbours)
    if strangers:
        raise MessageRejected(f"SHARE_KEYS_REQUEST to node {state.node_id} lists non-neighbours {strangers}")
    for v, b in bundles.items():  # against this client's own setup digest: a peer shown another model fails
        state.roster.verify(
            v,
            advertise_transcript(state.run_id, state.round_number, v, b.c_public, b.s_public, state.setup),
            b.signature,
        )
    if len(bundles) + 1 < state.config.threshold:
        raise ThresholdNotMet(
            f"node {state.node_id}: {len(bundles)} neighbours advertised keys, so {len(bundles) + 1} share "
            f"holders; threshold is {state.config.threshold}"
        )
    assert state.c_keys is not None and state.s_keys is not None  # set by advertise_keys (internal invariant)
    state.peer_bundles = bundles
    state.self_mask_seed = fresh_seed()
    holders = sorted({*bundles, state.node_id})  # u keeps one share of its own secrets (Bonawitz et al.)
    seed_shares = split(state.self_mask_seed, state.config.threshold, holders)
    key_shares = split(x25519_private_bytes(state.s_keys.private), state.config.threshold, holders)
    state.held_shares = {state.node_id: (seed_shares[state.node_id], key_shares[state.node_id])}
    ciphertexts: dict[int, bytes] = {}
    for v in sorted(bundles):
        plaintext = struct.pack("<QQ", state.node_id, v) + encode_share(seed_shares[v]) + encode_share(key_shares[v])
        key, state.receive_keys[v] = share_encryption_keys(
            state.c_keys.private, bundles[v].c_public, state.run_id, state.round_number, state.node_id, v
        )
        ciphertexts[v] = ChaCha20Poly1305(key).encrypt(
            _ZERO_NONCE, plaintext, _aad(state.run_id, state.round_number, state.node_id, v)
        )
    state.stage = ClientStage.SHARED
    return state._pack(Kind.SHARE_KEYS, wire.encode_ciphertexts(ciphertexts))


def masked_input(state: ClientState, request: bytes, update: np.ndarray, weight: int = 1) -> bytes:
    """Stage 3 (client): store the peers' shares and return y_u = e_u + PRG(b_u) + sum_v +-PRG(s_uv) mod 2**b.

    ``update`` is the flat float vector (shape (d,)) and ``weight`` the integer sample count of this client;
    both are encoded with :func:`secagg.encoding.encode`. The pairwise masks are formed exactly with the peers
    whose shares arrived (U2 seen from u); fewer than t such peers abort the round on this client.
    """
    state._require(ClientStage.SHARED, "masked_input")
    env = state._open(request, Kind.MASKED_INPUT_REQUEST)
    cts = wire.decode_ciphertexts(env.payload, "MASKED_INPUT_REQUEST")
    x = np.asarray(update)
    if x.ndim != 1 or x.size != state.vector_length:
        raise ConfigError(
            f"node {state.node_id}: update has shape {x.shape}, the round expects ({state.vector_length},)"
        )
    assert state.c_keys is not None and state.s_keys is not None  # set by advertise_keys
    held: dict[int, tuple[Share, Share]] = dict(state.held_shares)  # own shares, kept at share_keys
    for v, ct in cts.items():
        if v not in state.peer_bundles:
            raise MessageRejected(f"MASKED_INPUT_REQUEST: node {v} sent shares but never advertised to {state.node_id}")
        key = state.receive_keys[v]  # HKDF(X25519(c_sk_u, c_pk_v)) for v -> u, derived at share_keys
        try:
            pt = ChaCha20Poly1305(key).decrypt(
                _ZERO_NONCE, ct, _aad(state.run_id, state.round_number, v, state.node_id)
            )
        except InvalidTag:
            raise MessageRejected(f"share ciphertext from node {v} to {state.node_id} fails authentication") from None
        sender, recipient = struct.unpack_from("<QQ", pt)
        if (sender, recipient) != (v, state.node_id):
            raise MessageRejected(f"share from {v} is labelled ({sender} -> {recipient})")
        seed_share = decode_share(pt[16 : 16 + wire.SHARE_BYTES], wire.SECRET_BYTES)
        key_share = decode_share(pt[16 + wire.SHARE_BYTES :], wire.SECRET_BYTES)
        if seed_share.holder != state.node_id or key_share.holder != state.node_id:
            raise MessageRejected(f"share from {v} is for holder {seed_share.holder}, not {state.node_id}")
        held[v] = (seed_share, key_share)
    if len(held) < state.config.threshold:
        raise ThresholdNotMet(
            f"node {state.node_id}: {len(held)} share holders (self included), threshold is {state.config.threshold}"
        )
    state.held_shares = held
    bits = state.config.modulus_bits
    ctx = round_context(state.run_id, state.round_number)
    y = encode(x, weight, state.config)  # (d+1,)
    _add_self_mask(y, state.self_mask_seed, ctx, state.node_id)
    for v in sorted(set(held) - {state.node_id}):
        seed = pairwise_seed(
            state.s_keys.private,
            state.peer_bundles[v].s_public,
            state.run_id,
            state.round_number,
            state.node_id,
            v,
        )
        _add_pair_mask(y, state.node_id, v, seed, ctx)
    state.stage = ClientStage.MASKED
    return state._pack(Kind.MASKED_INPUT, wire.encode_masked_input(y, bits))


def _check_survivors(state: ClientState, survivors: tuple[int, ...], what: str) -> None:
    """The nested-set rules for U3 from this client's own view (Bonawitz et al. section 6, locally on a graph).

    U3 must list this node, only participants, no neighbour whose shares this node never received (a survivor it
    did not mask with would break the sum, and listing as survivors only peers it did mask with is what the
    forwarding attack needs), and at least t members of U2(u) = the peers it masked with plus itself: so the
    server cannot declare the peers it forwarded dropped and unmask this node's input with their mask keys.
    """
    u = state.node_id
    if u not in survivors:
        raise MessageRejected(f"{what} to node {u} does not list it as a survivor")
    unknown = sorted(set(survivors) - set(state.participants))
    if unknown:
        raise MessageRejected(f"{what} lists non-participants {unknown}")
    if len(survivors) < state.config.threshold:
        raise ThresholdNotMet(f"{what}: {len(survivors)} survivors, threshold is {state.config.threshold}")
    u2 = state.masked_with | {u}
    outside = sorted((set(survivors) & state.neighbours) - u2)
    if outside:
        raise MessageRejected(
            f"{what} lists neighbours {outside} as survivors, but node {u} received no shares from them "
            "(survivor list outside U2)"
        )
    kept = len(set(survivors) & u2)
    if kept < state.config.threshold:
        raise ThresholdNotMet(
            f"{what}: only {kept} of the {len(u2)} nodes node {u} masked with (itself included) survive, threshold "
            f"is {state.config.threshold} (declaring the forwarded peers dropped would expose its input)"
        )


def consistency_check(state: ClientState, request: bytes) -> bytes:
    """Stage 3b (client): check U3 against this node's U2 and sign it (Bonawitz et al.'s ConsistencyCheck round).

    The signature, by the client's roster identity over (run id, round, setup digest, sorted U3), lets every
    survivor check in :func:`unmask` that at least t clients saw the same list and the same round setup, so the
    server cannot claim a node dropped to some clients and alive to others.
    """
    state._require(ClientStage.MASKED, "consistency_check")
    env = state._open(request, Kind.CONSISTENCY_REQUEST)
    survivors = wire.decode_survivors(env.payload, "CONSISTENCY_REQUEST")
    _check_survivors(state, survivors, "CONSISTENCY_REQUEST")
    state.signed_survivors = tuple(sorted(survivors))
    transcript = consistency_transcript(state.run_id, state.round_number, state.setup, survivors)
    signature = state.identity.sign(transcript)
    state.stage = ClientStage.CHECKED
    return state._pack(Kind.CONSISTENCY_SIGNATURE, signature)


def unmask(state: ClientState, request: bytes) -> bytes:
    """Stage 4 (client): reveal b_v shares for surviving peers and s_sk_v shares for dropped peers, never
    both.

    The survivor list must be the one this node signed in the consistency check and carry >= t valid signatures
    of survivors over it (U4 within U3, |U4| >= t). Self-mask shares go out for U3, mask-key shares for U2(u) minus
    U3, and a peer the client has already revealed one kind of share for can never get the other kind.
    """
    state._require(ClientStage.CHECKED, "unmask")
    env = state._open(request, Kind.UNMASK_REQUEST)
    survivor_list, signatures = wire.decode_unmask_request(env.payload)
    if sorted(survivor_list) != sorted(state.signed_survivors or ()):
        raise MessageRejected(
            f"UNMASK_REQUEST survivor list differs from the one node {state.node_id} signed in the "
            "consistency check (server equivocation)"
        )
    _check_survivors(state, survivor_list, "UNMASK_REQUEST")
    survivors = frozenset(survivor_list)
    strangers = sorted(set(signatures) - survivors)
    if strangers:
        raise MessageRejected(f"UNMASK_REQUEST carries consistency signatures of non-survivors {strangers}")
    transcript = consistency_transcript(state.run_id, state.round_number, state.setup, survivor_list)
    for signer, signature in signatures.items():
        state.roster.verify(signer, transcript, signature)
    if len(signatures) < state.config.threshold:
        raise ThresholdNotMet(f"{len(signatures)} consistency signatures, threshold is {state.config.threshold}")
    entries: list[tuple[int, RevealKind, bytes]] = []
    for v in sorted(state.held_shares):
        kind = RevealKind.SELF_MASK_SEED if v in survivors else RevealKind.MASK_SECRET_KEY
        previous = state.revealed.get(v)
        if previous is not None and previous is not kind:
            raise ProtocolError(f"node {state.node_id} refuses to reveal both shares of node {v}")
        state.revealed[v] = kind
        seed_share, key_share = state.held_shares[v]
        entries.append((v, kind, encode_share(seed_share if kind is RevealKind.SELF_MASK_SEED else key_share)))
    state.stage = ClientStage.DONE
    return state._pack(Kind.UNMASK, wire.encode_unmask(entries))


# --------------------------------------------------------------------------------------------------- server


class ServerStage(enum.Enum):
    """Where the server is in the round."""

    ADVERTISE = "advertise"
    SHARE_KEYS = "share-keys"
    MASKED_INPUT = "masked-input"
    CONSISTENCY = "consistency-check"
    UNMASK = "unmask"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class AggregateResult:
    """Outcome of a successful round.

    Attributes:
        mean: weighted mean sum_u w_u x_u / sum_u w_u over the survivors, shape (d,).
        total_weight: sum_u w_u over the survivors.
        survivors: U3, the nodes whose inputs are in the sum.
        dropped: nodes that joined (advertised keys) but are not in the sum.
        error_bound: worst-case |mean - exact weighted mean of the clipped inputs| per coordinate.
    """

    mean: np.ndarray
    total_weight: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    error_bound: float


@dataclass
class ServerState:
    """The server's view of one round. Holds only public keys, ciphertexts it cannot open and masked
    vectors."""

    config: MaskingConfig
    run_id: bytes
    round_number: int
    participants: tuple[int, ...]
    graph: dict[int, frozenset[int]]
    vector_length: int
    roster: Roster = field(repr=False)
    setup: bytes = b""
    stage: ServerStage = ServerStage.ADVERTISE
    bundles: dict[int, wire.KeyBundle] = field(default_factory=dict, repr=False)
    ciphertexts: dict[int, dict[int, bytes]] = field(default_factory=dict, repr=False)
    partners: dict[int, frozenset[int]] = field(default_factory=dict, repr=False)
    total: np.ndarray | None = field(default=None, repr=False)
    survivors: tuple[int, ...] = ()
    unmaskers: frozenset[int] = frozenset()
    rejected: dict[int, str] = field(default_factory=dict)
    failure: str | None = None
    guard: wire.ReplayGuard = field(default_factory=wire.ReplayGuard, repr=False)

    def _require(self, stage: ServerStage, action: str) -> None:
        if self.stage is ServerStage.FAILED:
            raise ProtocolError(f"round {self.round_number} already failed ({self.failure}); {action} refused")
        if self.stage is not stage:
            raise ProtocolError(f"{action} needs server stage {stage.value}, server is at {self.stage.value}")

    def _fail(self, reason: str) -> ThresholdNotMet:
        self.stage, self.failure = ServerStage.FAILED, reason
        logger.error("secure aggregation round %d failed, nothing is applied: %s", self.round_number, reason)
        return ThresholdNotMet(f"round {self.round_number}: {reason}")

    def _receive(self, node: int, data: bytes, kind: Kind, allowed: set[int] | frozenset[int]) -> wire.Envelope | None:
        """Open one reply; a bad or unexpected one is recorded in ``rejected`` and its sender treated as
        dropped."""
        try:
            if node not in allowed:
                raise MessageRejected(f"{kind.name} from node {node}, which is not expected at this stage")
            env = wire.unpack(
                data,
                kind=kind,
                run_id=self.run_id,
                round_number=self.round_number,
                recipient=SERVER_ID,
                sender=node,
            )
            self.guard.accept(env)
        except MessageRejected as err:
            self.rejected[node] = str(err)
            logger.warning("rejected a %s reply from node %d: %s", kind.name, node, err)
            return None
        return env

    def _pack(self, kind: Kind, recipient: int, payload: bytes) -> bytes:
        return wire.pack(kind, self.run_id, self.round_number, SERVER_ID, recipient, payload)


def server_start_round(
    config: MaskingConfig,
    participants: Sequence[int],
    vector_length: int,
    round_number: int,
    *,
    run_id: bytes,
    graph_seed: bytes,
    model_digest: bytes,
    roster: Roster,
) -> tuple[ServerState, dict[int, bytes]]:
    """Stage 0 (server): fix the participants and send ADVERTISE_REQUEST to each.

    ``vector_length`` is d, the number of model coordinates (one weight coordinate is added on the wire). The run
    id, graph seed, t, k and modulus are the provisioned ones (clients refuse any other); ``model_digest`` is the
    digest of the global model sent with the request, which every client signs as it received it. The roster lets
    an honest server drop clients whose signatures do not verify (clients check anyway).
    """
    nodes = tuple(sorted(participants))
    for u in nodes:
        check_node_id(u)
    if len(set(nodes)) != len(nodes):
        raise ConfigError(f"participants must be distinct, got {list(participants)}")
    strangers = sorted(set(nodes) - set(roster))
    if strangers:
        raise ConfigError(f"participants {strangers} are not in the roster")
    if len(nodes) < config.threshold:
        raise ThresholdNotMet(f"{len(nodes)} participants, threshold is {config.threshold}")
    if not 0 < vector_length <= MAX_VECTOR_LENGTH:
        raise ConfigError(f"vector_length must be in [1, {MAX_VECTOR_LENGTH}], got {vector_length}")
    if round_number < 0:
        raise ConfigError(f"round_number must be >= 0, got {round_number}")
    check_capacity(config, len(nodes))
    k = config.neighbourhood_size
    graph = round_neighbours(neighbour_graph(list(roster), k, graph_seed), nodes)
    setup = setup_digest(model_digest, nodes, vector_length, config)
    state = ServerState(config, run_id, round_number, nodes, graph, vector_length, roster=roster, setup=setup)
    req = wire.AdvertiseRequest(
        nodes, graph_seed, vector_length, config.threshold, 0 if k is None else k, config.modulus_bits, True
    )
    payload = wire.encode_advertise_request(req)
    return state, {u: state._pack(Kind.ADVERTISE_REQUEST, u, payload) for u in nodes}


def _prune(active: set[int], links: Mapping[int, frozenset[int] | set[int]], threshold: int) -> set[int]:
    """Drop nodes with fewer than ``threshold`` active partners until none is left with too few."""
    active = set(active)
    changed = True
    while changed:
        changed = False
        for u in sorted(active):
            if len(set(links[u]) & active) < threshold:
                active.discard(u)
                changed = True
    return active


def server_collect_advertisements(state: ServerState, replies: Mapping[int, bytes]) -> dict[int, bytes]:
    """Stage 1 (server): accept signed key bundles (U1) and send each node its neighbours' bundles."""
    state._require(ServerStage.ADVERTISE, "server_collect_advertisements")
    for node, data in replies.items():
        env = state._receive(node, data, Kind.ADVERTISE_KEYS, set(state.participants))
        if env is None:
            continue
        try:
            bundle = wire.decode_key_bundle(env.payload)
            transcript = advertise_transcript(
                state.run_id, state.round_number, node, bundle.c_public, bundle.s_public, state.setup
            )
            state.roster.verify(node, transcript, bundle.signature)
        except MessageRejected as err:
            state.rejected[node] = str(err)
            continue
        state.bundles[node] = bundle
    # Each node's secrets are shared among itself and its live neighbours: it needs >= t - 1 of them.
    u1 = _prune(set(state.bundles), state.graph, state.config.threshold - 1)
    state.bundles = {u: state.bundles[u] for u in sorted(u1)}
    if len(u1) < state.config.threshold:
        raise state._fail(
            f"{len(u1)} clients advertised keys with >= t live neighbours, threshold is {state.config.threshold}"
        )
    state.stage = ServerStage.SHARE_KEYS
    out = {}
    for u in sorted(u1):
        peers = {v: state.bundles[v] for v in state.graph[u] & u1}
        out[u] = state._pack(Kind.SHARE_KEYS_REQUEST, u, wire.encode_share_keys_request(peers))
    return out


def server_collect_shares(state: ServerState, replies: Mapping[int, bytes]) -> dict[int, bytes]:
    """Stage 2 (server): accept each node's encrypted shares (U2) and forward them to their recipients."""
    state._require(ServerStage.SHARE_KEYS, "server_collect_shares")
    u1 = set(state.bundles)
    for node, data in replies.items():
        env = state._receive(node, data, Kind.SHARE_KEYS, u1)
        if env is None:
            continue
        try:
            cts = wire.decode_ciphertexts(env.payload, "SHARE_KEYS")
            expected = set(state.graph[node] & u1)
            if set(cts) != expected:
                raise MessageRejected(f"SHARE_KEYS from {node} addresses {sorted(cts)}, expected {sorted(expected)}")
        except MessageRejected as err:
            state.rejected[node] = str(err)
            continue
        state.ciphertexts[node] = cts
    links = {u: frozenset(v for v in state.ciphertexts if u in state.ciphertexts[v]) for u in state.ciphertexts}
    u2 = _prune(set(state.ciphertexts), links, state.config.threshold - 1)
    if len(u2) < state.config.threshold:
        raise state._fail(f"{len(u2)} clients shared keys, threshold is {state.config.threshold}")
    state.ciphertexts = {u: state.ciphertexts[u] for u in sorted(u2)}
    state.partners = {u: frozenset(links[u] & u2) for u in sorted(u2)}
    state.stage = ServerStage.MASKED_INPUT
    out = {}
    for u in sorted(u2):
        incoming = {v: state.ciphertexts[v][u] for v in state.partners[u]}
        out[u] = state._pack(Kind.MASKED_INPUT_REQUEST, u, wire.encode_ciphertexts(incoming))
    return out


def server_collect_masked_inputs(state: ServerState, replies: Mapping[int, bytes]) -> dict[int, bytes]:
    """Stage 3 (server): add the masked vectors (U3) modulo 2**b and send every survivor the survivor list.

    The list goes out as CONSISTENCY_REQUEST: every survivor checks and signs it before anything is unmasked.
    """
    state._require(ServerStage.MASKED_INPUT, "server_collect_masked_inputs")
    bits, length = state.config.modulus_bits, state.vector_length + 1
    total: np.ndarray = np.zeros(length, dtype=np.uint32 if bits == 32 else np.uint64)
    survivors: list[int] = []
    for node in sorted(replies):
        env = state._receive(node, replies[node], Kind.MASKED_INPUT, set(state.partners))
        if env is None:
            continue
        try:
            y = wire.decode_masked_input(env.payload, length, bits)
        except MessageRejected as err:
            state.rejected[node] = str(err)
            continue
        total += y
        survivors.append(node)
    if len(survivors) < state.config.threshold:
        raise state._fail(f"{len(survivors)} masked inputs arrived, threshold is {state.config.threshold}")
    state.total, state.survivors = total, tuple(survivors)
    state.stage = ServerStage.CONSISTENCY
    payload = wire.encode_survivors(state.survivors)
    return {u: state._pack(Kind.CONSISTENCY_REQUEST, u, payload) for u in state.survivors}


def server_collect_consistency(state: ServerState, replies: Mapping[int, bytes]) -> dict[int, bytes]:
    """Stage 3b (server): gather survivors' signatures on U3 and send them, with U3, to the signers.

    Needs at least t signatures valid under the roster; only signers are asked to unmask, each sent t of the
    signatures (enough for its check, and O(t) rather than O(n) verifications per client).
    """
    state._require(ServerStage.CONSISTENCY, "server_collect_consistency")
    transcript = consistency_transcript(state.run_id, state.round_number, state.setup, state.survivors)
    signatures: dict[int, bytes] = {}
    for node in sorted(replies):
        env = state._receive(node, replies[node], Kind.CONSISTENCY_SIGNATURE, set(state.survivors))
        if env is None:
            continue
        try:
            signature = wire.decode_signature(env.payload, "CONSISTENCY_SIGNATURE")
            state.roster.verify(node, transcript, signature)
        except MessageRejected as err:
            state.rejected[node] = str(err)
            continue
        signatures[node] = signature
    if len(signatures) < state.config.threshold:
        raise state._fail(f"{len(signatures)} consistency signatures, threshold is {state.config.threshold}")
    state.stage, state.unmaskers = ServerStage.UNMASK, frozenset(signatures)
    # t signatures are what a client needs (any t of U4); sending all |U4| would make every client verify O(n).
    proof = {u: signatures[u] for u in sorted(signatures)[: state.config.threshold]}
    payload = wire.encode_unmask_request(state.survivors, proof)
    return {u: state._pack(Kind.UNMASK_REQUEST, u, payload) for u in sorted(signatures)}


def server_unmask(state: ServerState, replies: Mapping[int, bytes]) -> AggregateResult:
    """Stage 4 (server): reconstruct the secrets, strip every mask and decode the survivors' weighted mean.

    For a survivor v the server rebuilds b_v and subtracts PRG(b_v); for a node v that shared keys but sent no
    masked input it rebuilds s_sk_v (checked against the advertised s_pk_v) and removes the pairwise masks the
    survivors formed with v. Each secret needs t consistent shares, else the round fails (ThresholdNotMet) and
    nothing is returned.
    """
    state._require(ServerStage.UNMASK, "server_unmask")
    assert state.total is not None  # set by server_collect_masked_inputs
    survivors = set(state.survivors)
    dropped = set(state.partners) - survivors
    shares: dict[tuple[int, RevealKind], list[Share]] = {}
    for node in sorted(replies):
        env = state._receive(node, replies[node], Kind.UNMASK, state.unmaskers)
        if env is None:
            continue
        try:
            entries = wire.decode_unmask(env.payload)
            parsed = []
            for owner, kind, raw in entries:
                if owner != node and owner not in state.partners[node]:
                    raise MessageRejected(f"UNMASK from {node} has a share of {owner}, which it does not hold")
                want = RevealKind.SELF_MASK_SEED if owner in survivors else RevealKind.MASK_SECRET_KEY
                if kind is not want:
                    raise MessageRejected(f"UNMASK from {node} reveals {kind.name} of {owner}, expected {want.name}")
                share = decode_share(raw, wire.SECRET_BYTES)
                if share.holder != node:
                    raise MessageRejected(f"UNMASK from {node} carries a share held by {share.holder}")
                parsed.append((owner, kind, share))
        except MessageRejected as err:
            state.rejected[node] = str(err)
            continue
        for owner, kind, share in parsed:
            shares.setdefault((owner, kind), []).append(share)
    t = state.config.threshold
    ctx = round_context(state.run_id, state.round_number)
    total: np.ndarray = state.total  # unmasked in place: a failure below ends the round (stage FAILED)
    try:
        for v in sorted(survivors):
            seed = reconstruct(shares.get((v, RevealKind.SELF_MASK_SEED), []), t, wire.SECRET_BYTES)
            _add_self_mask(total, seed, ctx, v, undo=True)
        for v in sorted(dropped):
            raw_key = reconstruct(shares.get((v, RevealKind.MASK_SECRET_KEY), []), t, wire.SECRET_BYTES)
            private = x25519_from_private_bytes(raw_key)
            if public_bytes(private.public_key()) != state.bundles[v].s_public:
                raise MessageRejected(f"reconstructed mask key of dropped node {v} does not match its s_pk")
            for u in sorted(state.partners[v] & survivors):
                seed = pairwise_seed(private, state.bundles[u].s_public, state.run_id, state.round_number, v, u)
                _add_pair_mask(total, u, v, seed, ctx, undo=True)
    except ThresholdNotMet as err:
        raise state._fail(f"cannot unmask: {err}") from None
    except MessageRejected as err:
        state.stage, state.failure = ServerStage.FAILED, str(err)
        logger.error("secure aggregation round %d failed, nothing is applied: %s", state.round_number, err)
        raise
    mean, total_weight = decode_sum(total, state.config, len(survivors))
    state.stage = ServerStage.DONE
    all_joined = set(state.bundles)
    return AggregateResult(
        mean=mean,
        total_weight=total_weight,
        survivors=state.survivors,
        dropped=tuple(sorted(all_joined - survivors)),
        error_bound=quantization_error_bound(state.config, len(survivors), total_weight),
    )
