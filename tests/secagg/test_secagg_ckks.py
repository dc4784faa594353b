"""CKKS mode: the server holds no secret key, the verified sum matches the plaintext mean, sizes, rejections,
and the decryption-oracle attacks of a key-less server are refused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts

from fedmpt.errors import ConfigError
from secagg import ckks
from secagg.config import CkksConfig
from secagg.errors import CkksError, MessageRejected, ProtocolError, SignatureInvalid, ThresholdNotMet
from secagg.keys import Identity, Roster

RUN = os.urandom(16)
KEY = ckks.new_key_id()
FLOAT = CkksConfig(max_clients=8, max_weight=5)
PACKED = CkksConfig(
    coeff_mod_bit_sizes=(60, 40, 60), pack=2, lane_bits=23, packed_scale_bits=25, max_clients=8, max_weight=5
)
IDS = {u: Identity.generate(u) for u in range(1, 11)}
ROSTER = Roster.from_identities(IDS)


@pytest.fixture(scope="module")
def contexts() -> dict[str, tuple[ts.Context, ts.Context]]:
    out = {}
    for name, cfg in (("float", FLOAT), ("packed", PACKED)):
        secret = ckks.create_secret_context(cfg)
        out[name] = (secret, ckks.load_server_context(ckks.server_context_bytes(secret), cfg))
    return out


def _round(
    cfg: CkksConfig, secret: ts.Context, server: ts.Context, ups: dict[int, np.ndarray], ws: dict[int, int]
) -> tuple[ckks.CkksAggregate, dict[int, bytes], bytes]:
    """One honest round: signed uploads, the server's aggregate, and the verified decryption (threshold 2)."""
    msgs = {
        u: ckks.encrypt_update(secret, cfg, ups[u], ws[u], run_id=RUN, round_number=2, sender=u, key_id=KEY)
        for u in ups
    }
    agg = ckks.aggregate(server, cfg, msgs, run_id=RUN, round_number=2, key_id=KEY)
    signed = {u: ckks.sign_upload(IDS[u], m) for u, m in msgs.items()}
    return _verify(secret, cfg, signed), msgs, agg


def _verify(
    secret: ts.Context, cfg: CkksConfig, signed: dict[int, bytes], *, threshold: int = 2, rnd: int = 2
) -> ckks.CkksAggregate:
    return ckks.decrypt_verified(
        secret, cfg, signed, ROSTER, run_id=RUN, round_number=rnd, key_id=KEY, threshold=threshold
    )


def _upload(
    secret: ts.Context, sender: int, x: np.ndarray, *, weight: int = 1, rnd: int = 2, run: bytes = RUN
) -> bytes:
    return ckks.encrypt_update(secret, FLOAT, x, weight, run_id=run, round_number=rnd, sender=sender, key_id=KEY)


def _vectors(ctx: ts.Context, cfg: CkksConfig, upload: bytes) -> tuple[int, list[ts.CKKSVector]]:
    """(d, ciphertexts) of an upload, read with the module's own codec."""
    parsed = ckks._unpack_message(upload, ckks.CkksKind.UPLOAD, RUN, 2, ckks.context_fingerprint(ctx, KEY), cfg)
    return parsed.d, [ts.ckks_vector_from(ctx, raw) for raw in parsed.ciphertexts]


def _repack(ctx: ts.Context, cfg: CkksConfig, sender: int, d: int, vectors: list[ts.CKKSVector]) -> bytes:
    """An UPLOAD-shaped message around ciphertexts someone computed (what a key-less server can build)."""
    cts = [bytes(v.serialize()) for v in vectors]
    return ckks._pack_message(ckks.CkksKind.UPLOAD, RUN, 2, sender, d, ckks.context_fingerprint(ctx, KEY), cts)


def _with_signature_of(signed: bytes, upload: bytes) -> bytes:
    """The envelope ``signed`` with its upload replaced and its signature kept."""
    return ckks.SignedUpload(upload, ckks.SignedUpload.from_bytes(signed).signature).to_bytes()


def test_server_holds_no_secret_key(contexts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    secret, server = contexts["float"]
    raw = ckks.server_context_bytes(secret)
    reloaded = ts.context_from(raw)
    assert not reloaded.is_private() and not server.is_private() and secret.is_private()
    with pytest.raises(CkksError, match="secret key"):
        ckks.load_server_context(ckks.client_context_bytes(secret), FLOAT)
    kit = ckks.provision(FLOAT, tmp_path)
    assert not ts.context_from(kit.server_context.read_bytes()).is_private()
    assert ts.context_from(kit.client_context.read_bytes()).is_private()
    server_ctx, cfg, key_id = ckks.load_kit(tmp_path / "server")
    client_ctx, _, client_key_id = ckks.load_kit(tmp_path / "client")
    assert cfg == FLOAT and key_id == client_key_id == kit.key_id
    assert not server_ctx.is_private() and client_ctx.is_private()
    (tmp_path / "server" / "server_context.tenseal").write_bytes(ckks.client_context_bytes(secret))
    with pytest.raises(CkksError, match="secret key"):
        ckks.load_kit(tmp_path / "server")
    assert (kit.client_context.stat().st_mode & 0o777) == 0o600
    # What the server ends up holding after a round: its context and ciphertexts, none of which can decrypt.
    _, msgs, agg = _round(FLOAT, secret, server, {1: np.ones(3), 2: np.zeros(3)}, {1: 1, 2: 1})
    assert not hasattr(ckks, "decrypt_aggregate")  # no public decryption of a server-made ciphertext
    signed = {u: ckks.sign_upload(IDS[u], m) for u, m in msgs.items()}
    with pytest.raises(CkksError, match="secret key"):
        ckks.decrypt_verified(server, FLOAT, signed, ROSTER, run_id=RUN, round_number=2, key_id=KEY, threshold=2)
    vec = ts.ckks_vector_from(server, agg[ckks.HEADER_BYTES + 4 :])
    with pytest.raises(ValueError, match="secret_key"):
        vec.decrypt()


@pytest.mark.parametrize("mode", ["float", "packed"])
def test_aggregate_matches_plaintext_weighted_mean(contexts, mode: str) -> None:  # type: ignore[no-untyped-def]
    cfg = FLOAT if mode == "float" else PACKED
    secret, server = contexts[mode]
    rng = np.random.default_rng(3)
    d = 2 * cfg.slots * cfg.pack + 17  # three ciphertexts, last one partial
    ups = {u: rng.normal(0, 0.3, d) for u in (4, 7, 9)}
    ws = {4: 1, 7: 5, 9: 3}
    res, _, agg = _round(cfg, secret, server, ups, ws)
    exact = sum(ws[u] * np.clip(ups[u], -1, 1) for u in ups) / sum(ws.values())
    assert (res.n_clients, res.total_weight, res.senders) == (3, 9, (4, 7, 9))
    assert np.max(np.abs(res.mean - exact)) < res.error_bound
    # Every decrypted coordinate lies on the reported grid.
    grid = res.mean / res.rounding_step
    if mode == "packed":
        assert res.error_bound == pytest.approx(3 / (cfg.quantization_scale() * 9))
        assert res.rounding_step == pytest.approx(1 / (cfg.quantization_scale() * 9))
        np.testing.assert_allclose(grid, np.rint(grid), rtol=0, atol=1e-6)
    else:
        # noise bound 3 * 2**-24 / 9; 2**10 times that is 2**-14 / 3, and the next power of two is 2**-15
        assert res.rounding_step == 2.0**-15
        assert res.error_bound == pytest.approx(3 * 2.0**-24 / 9 + 2.0**-16)
        np.testing.assert_array_equal(grid, np.rint(grid))
        assert np.unique(res.mean).size > 100  # not a degenerate grid


def test_packed_grid_values_are_exact(contexts) -> None:  # type: ignore[no-untyped-def]
    secret, server = contexts["packed"]
    s = PACKED.quantization_scale()
    rng = np.random.default_rng(4)
    ups = {u: rng.integers(-int(s), int(s) + 1, 300) / s for u in (1, 2)}
    res, _, _ = _round(PACKED, secret, server, ups, {1: 1, 2: 1})
    want = (np.round(ups[1] * s) + np.round(ups[2] * s)) / (s * 2)
    np.testing.assert_array_equal(res.mean, want)


def test_default_parameters_meet_size_target_and_128_bit_bound(contexts) -> None:  # type: ignore[no-untyped-def]
    secret, _ = contexts["float"]
    d = 3 * FLOAT.slots - 2
    msg = ckks.encrypt_update(secret, FLOAT, np.zeros(d), 1, run_id=RUN, round_number=0, sender=1, key_id=KEY)
    assert ckks.bytes_per_parameter(msg, d) <= 40
    with pytest.raises(ConfigError, match="128-bit"):
        CkksConfig(coeff_mod_bit_sizes=(60, 60, 60, 60))
    with pytest.raises(ValueError):  # SEAL itself enforces the bound (240 > 218 bits at N=8192)
        ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 60, 60, 60])


def test_bad_uploads_are_rejected(contexts) -> None:  # type: ignore[no-untyped-def]
    secret, server = contexts["float"]
    up = ckks.encrypt_update(secret, FLOAT, np.ones(10), 1, run_id=RUN, round_number=2, sender=5, key_id=KEY)

    def agg(msgs: dict[int, bytes], rnd: int = 2) -> bytes:
        return ckks.aggregate(server, FLOAT, msgs, run_id=RUN, round_number=rnd, key_id=KEY)

    with pytest.raises(MessageRejected, match="round 2, this is round 3"):
        agg({5: up}, rnd=3)
    with pytest.raises(MessageRejected, match="claims sender 5"):
        agg({6: up})
    with pytest.raises(MessageRejected, match="trailing"):
        agg({5: up + b"\x00"})
    with pytest.raises(MessageRejected, match="truncated|bad length"):
        agg({5: up[:-10]})
    with pytest.raises(MessageRejected, match="magic"):
        agg({5: b"XXXX" + up[4:]})
    other = ckks.create_secret_context(FLOAT)
    foreign = ckks.encrypt_update(
        other, FLOAT, np.ones(10), 1, run_id=RUN, round_number=2, sender=5, key_id=ckks.new_key_id()
    )
    with pytest.raises(MessageRejected, match="key set"):
        agg({5: foreign})
    garbage = up[: ckks.HEADER_BYTES] + up[ckks.HEADER_BYTES : ckks.HEADER_BYTES + 4] + os.urandom(len(up) - 64)
    with pytest.raises(MessageRejected, match="not a valid ciphertext"):
        agg({5: garbage})
    with pytest.raises(CkksError, match="secret key"):
        ckks.aggregate(secret, FLOAT, {5: up}, run_id=RUN, round_number=2, key_id=KEY)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="poly_modulus_degree"):
        CkksConfig(poly_modulus_degree=1000)
    with pytest.raises(ConfigError, match="float64"):
        CkksConfig(pack=3, lane_bits=17)
    with pytest.raises(ConfigError, match="headroom"):
        CkksConfig(max_clients=2**17, max_weight=8)
    with pytest.raises(ConfigError, match="weight"):
        ckks._slots(np.ones(3), 6, FLOAT, None)


@pytest.mark.statistical
def test_uploads_do_not_correlate_with_the_update(contexts) -> None:  # type: ignore[no-untyped-def]
    """Ciphertext bytes (as uint64 words) vs a distinctive update: |r| < 6/sqrt(L), false-positive ~2e-9."""
    secret, _ = contexts["float"]
    rng = np.random.default_rng(8)
    x = np.sign(rng.standard_normal(8000)) * 0.9
    up = ckks.encrypt_update(secret, FLOAT, x, 1, run_id=RUN, round_number=2, sender=1, key_id=KEY)
    body = up[ckks.HEADER_BYTES :]
    words = np.frombuffer(body[: (len(body) // 8) * 8], dtype="<u8").astype(np.float64)
    m = min(words.size, x.size)
    r = np.corrcoef(words[:m], x[:m])[0, 1]
    assert abs(r) < 6 / np.sqrt(m)
    assert x.astype("<f8").tobytes()[:16] not in up


# ------------------------------------------------------------------------------------------------- signed uploads


def test_signed_upload_envelope_round_trips_and_rejects_bad_bytes(contexts) -> None:  # type: ignore[no-untyped-def]
    secret, server = contexts["float"]
    up = _upload(secret, 1, np.ones(10))
    env = ckks.sign_upload(IDS[1], up)
    parsed = ckks.SignedUpload.from_bytes(env)
    assert parsed.upload == up and len(parsed.signature) == 64 and parsed.to_bytes() == env
    ROSTER.verify(1, ckks.upload_transcript(RUN, 2, 1, up), parsed.signature)  # an independent check of the signature
    assert parsed.signature.hex() not in repr(parsed) and "bytes" in repr(parsed)
    with pytest.raises(MessageRejected, match="truncated"):
        ckks.SignedUpload.from_bytes(env[:-1])
    with pytest.raises(MessageRejected, match="truncated header"):
        ckks.SignedUpload.from_bytes(env[:5])
    with pytest.raises(MessageRejected, match="trailing"):
        ckks.SignedUpload.from_bytes(env + b"\x00")
    with pytest.raises(MessageRejected, match="magic"):
        ckks.SignedUpload.from_bytes(b"FMCK" + env[4:])
    with pytest.raises(MessageRejected, match="version"):
        ckks.SignedUpload.from_bytes(env[:4] + bytes([2]) + env[5:])
    with pytest.raises(MessageRejected, match="signature length"):
        ckks.SignedUpload.from_bytes(env[:6] + (63).to_bytes(2, "little") + env[8:-1])
    with pytest.raises(ProtocolError, match="node 2 was asked to sign a CKKS UPLOAD from sender 1"):
        ckks.sign_upload(IDS[2], up)
    agg = ckks.aggregate(server, FLOAT, {1: up}, run_id=RUN, round_number=2, key_id=KEY)
    with pytest.raises(MessageRejected, match="expected a UPLOAD"):
        ckks.sign_upload(IDS[1], agg)
    # A verification failure in the envelope names the node it was keyed by.
    env2 = ckks.sign_upload(IDS[2], _upload(secret, 2, np.ones(10)))
    with pytest.raises(MessageRejected, match="keyed by node 2: signed CKKS upload: 1 trailing"):
        _verify(secret, FLOAT, {1: env, 2: env2 + b"\x00"})


def test_server_cannot_present_one_upload_as_the_aggregate(contexts) -> None:  # type: ignore[no-untyped-def]
    """Attack (a): the key-less server wants a client to decrypt a single upload."""
    secret, server = contexts["float"]
    s1 = ckks.sign_upload(IDS[1], _upload(secret, 1, np.full(10, 0.25)))
    s3 = ckks.sign_upload(IDS[3], _upload(secret, 3, np.zeros(10)))
    with pytest.raises(ThresholdNotMet, match="1 signed uploads, the threshold is 2"):
        _verify(secret, FLOAT, {1: s1})
    with pytest.raises(ThresholdNotMet, match="2 signed uploads, the threshold is 3"):
        _verify(secret, FLOAT, {1: s1, 3: s3}, threshold=3)
    with pytest.raises(ConfigError, match="threshold"):
        _verify(secret, FLOAT, {1: s1}, threshold=1)
    # Re-keying upload 1 under node 2 to pass the threshold: the signature is node 1's over sender 1.
    with pytest.raises(SignatureInvalid, match="node 2"):
        _verify(secret, FLOAT, {2: s1, 3: s3})
    # Upload 1 plus a copy relabelled as node 2's (a well-formed header naming sender 2): 2 x_1 / 2 = x_1 would
    # decrypt, but node 2 never signed it.
    d, vecs = _vectors(server, FLOAT, ckks.SignedUpload.from_bytes(s1).upload)
    copy = _repack(server, FLOAT, 2, d, vecs)
    for signature_of in (s1, s3):
        with pytest.raises(SignatureInvalid, match="node 2"):
            _verify(secret, FLOAT, {1: s1, 2: _with_signature_of(signature_of, copy)})


def test_scaled_or_combined_uploads_fail_the_signature(contexts) -> None:  # type: ignore[no-untyped-def]
    """Attack (b): a ciphertext the server derived from signed uploads, presented under a client's signature."""
    secret, server = contexts["float"]
    up1, up2 = _upload(secret, 1, np.full(10, 0.5)), _upload(secret, 2, np.full(10, -0.5))
    s1, s2 = ckks.sign_upload(IDS[1], up1), ckks.sign_upload(IDS[2], up2)
    d, v1 = _vectors(server, FLOAT, up1)
    _, v2 = _vectors(server, FLOAT, up2)
    doubled = _repack(server, FLOAT, 1, d, [a + a for a in v1])  # Enc(2 x_1) under sender 1
    combined = _repack(server, FLOAT, 1, d, [a + b for a, b in zip(v1, v2, strict=True)])
    for forged in (doubled, combined):
        with pytest.raises(SignatureInvalid, match="node 1"):
            _verify(secret, FLOAT, {1: _with_signature_of(s1, forged), 2: s2})
    # Multiplication by a plaintext scalar (needs a rescaling prime: the packed parameter set has one).
    psecret, pserver = contexts["packed"]
    pup = ckks.encrypt_update(psecret, PACKED, np.ones(10), 1, run_id=RUN, round_number=2, sender=1, key_id=KEY)
    pup2 = ckks.encrypt_update(psecret, PACKED, np.ones(10), 1, run_id=RUN, round_number=2, sender=2, key_id=KEY)
    pd, pv = _vectors(pserver, PACKED, pup)
    scaled = _repack(pserver, PACKED, 1, pd, [v * 3 for v in pv])
    with pytest.raises(SignatureInvalid, match="node 1"):
        ckks.decrypt_verified(
            psecret,
            PACKED,
            {1: _with_signature_of(ckks.sign_upload(IDS[1], pup), scaled), 2: ckks.sign_upload(IDS[2], pup2)},
            ROSTER,
            run_id=RUN,
            round_number=2,
            key_id=KEY,
            threshold=2,
        )


def test_uploads_from_another_round_or_run_are_rejected(contexts) -> None:  # type: ignore[no-untyped-def]
    """Attack (c): replaying signed uploads of another round, run or key set."""
    secret, _ = contexts["float"]
    s2 = ckks.sign_upload(IDS[2], _upload(secret, 2, np.zeros(10)))
    old_round = ckks.sign_upload(IDS[1], _upload(secret, 1, np.ones(10), rnd=1))
    other_run = ckks.sign_upload(IDS[1], _upload(secret, 1, np.ones(10), run=os.urandom(16)))
    for replay in (old_round, other_run):
        with pytest.raises(MessageRejected, match="node 1"):
            _verify(secret, FLOAT, {1: replay, 2: s2})
    # Defence in depth: even a signature over this round's transcript does not make a round-1 upload current.
    up_old = _upload(secret, 1, np.ones(10), rnd=1)
    sig = IDS[1].sign(ckks.upload_transcript(RUN, 2, 1, up_old))
    with pytest.raises(MessageRejected, match="bound to round 1, this is round 2"):
        _verify(secret, FLOAT, {1: ckks.SignedUpload(up_old, sig).to_bytes(), 2: s2})
    # The round-1 uploads verify in round 1 (the rejection above is about the binding, not the signature).
    s2_old = ckks.sign_upload(IDS[2], _upload(secret, 2, np.zeros(10), rnd=1))
    assert _verify(secret, FLOAT, {1: old_round, 2: s2_old}, rnd=1).n_clients == 2
    other = ckks.create_secret_context(FLOAT)
    foreign = ckks.encrypt_update(
        other, FLOAT, np.ones(10), 1, run_id=RUN, round_number=2, sender=1, key_id=ckks.new_key_id()
    )
    with pytest.raises(MessageRejected, match="key set"):
        _verify(secret, FLOAT, {1: ckks.sign_upload(IDS[1], foreign), 2: s2})
    # Under the same key id (a symmetric context shows no key, so the fingerprint cannot tell), the foreign
    # ciphertext decrypts to noise, and the count slot gives it away.
    mislabelled = ckks.encrypt_update(other, FLOAT, np.ones(10), 1, run_id=RUN, round_number=2, sender=1, key_id=KEY)
    with pytest.raises(CkksError, match="client count .* differs from the 2 uploads"):
        _verify(secret, FLOAT, {1: ckks.sign_upload(IDS[1], mislabelled), 2: s2})


def test_signatures_from_outside_the_roster_are_refused(contexts) -> None:  # type: ignore[no-untyped-def]
    """Attack (d): the server signs uploads with keys of its own."""
    secret, _ = contexts["float"]
    s2 = ckks.sign_upload(IDS[2], _upload(secret, 2, np.zeros(10)))
    outsider = Identity.generate(42)
    with pytest.raises(SignatureInvalid, match="node 42.*not in the provisioned roster"):
        _verify(secret, FLOAT, {42: ckks.sign_upload(outsider, _upload(secret, 42, np.ones(10))), 2: s2})
    impostor = Identity.generate(1)  # claims node 1 but holds another key than the roster's
    with pytest.raises(SignatureInvalid, match="node 1 does not verify"):
        _verify(secret, FLOAT, {1: ckks.sign_upload(impostor, _upload(secret, 1, np.ones(10))), 2: s2})


def test_inner_sender_must_match_the_key_it_is_filed_under(contexts) -> None:  # type: ignore[no-untyped-def]
    """Attack (e): one sender counted twice. Keys of a mapping are distinct by construction, so a sender can
    only be duplicated by filing an upload under another node: refused by signature or by the inner header."""
    secret, _ = contexts["float"]
    up1 = _upload(secret, 1, np.ones(10))
    s1, s2 = ckks.sign_upload(IDS[1], up1), ckks.sign_upload(IDS[2], _upload(secret, 2, np.zeros(10)))
    with pytest.raises(SignatureInvalid, match="node 3"):
        _verify(secret, FLOAT, {1: s1, 2: s2, 3: s1})  # the same upload under a second key
    # Node 3 (a real roster member) signs node 1's upload bytes as its own: the header still names sender 1.
    relabelled = ckks.SignedUpload(up1, IDS[3].sign(ckks.upload_transcript(RUN, 2, 3, up1))).to_bytes()
    with pytest.raises(MessageRejected, match="keyed by node 3 claims sender 1"):
        _verify(secret, FLOAT, {1: s1, 2: s2, 3: relabelled})


def test_count_and_weight_slots_catch_uploads_no_honest_encoder_makes(contexts) -> None:  # type: ignore[no-untyped-def]
    """A signer who bypasses encrypt_update (scaling its own upload, a bad weight, values beyond the clip range)
    is caught after decryption by the count, weight and range checks."""
    secret, _ = contexts["float"]
    s1 = ckks.sign_upload(IDS[1], _upload(secret, 1, np.zeros(10)))
    d, v3 = _vectors(secret, FLOAT, _upload(secret, 3, np.full(10, 0.1)))
    doubled = _repack(secret, FLOAT, 3, d, [a + a for a in v3])  # count slot 2
    with pytest.raises(CkksError, match="client count 3.000 differs from the 2 uploads"):
        _verify(secret, FLOAT, {1: s1, 3: ckks.sign_upload(IDS[3], doubled)})

    def crafted(slots: list[float]) -> bytes:
        vec = ts.ckks_vector(secret, slots, scale=2.0**FLOAT.scale_bits)
        return ckks.sign_upload(IDS[3], _repack(secret, FLOAT, 3, 10, [vec]))

    with pytest.raises(CkksError, match="total weight 101.000 is not an integer in \\[2, 10\\]"):
        _verify(secret, FLOAT, {1: s1, 3: crafted([0.0] * 10 + [100.0, 1.0])})
    with pytest.raises(CkksError, match="beyond clip_range"):
        _verify(secret, FLOAT, {1: s1, 3: crafted([50.0] * 10 + [1.0, 1.0])})


def test_verified_decryption_of_many_uploads_meets_a_higher_threshold(contexts) -> None:  # type: ignore[no-untyped-def]
    secret, _ = contexts["float"]
    rng = np.random.default_rng(11)
    xs = {u: rng.uniform(-1, 1, 50) for u in range(1, 9)}
    signed = {u: ckks.sign_upload(IDS[u], _upload(secret, u, xs[u])) for u in xs}
    res = _verify(secret, FLOAT, signed, threshold=8)
    exact = np.mean(np.stack(list(xs.values())), axis=0)
    assert (res.n_clients, res.total_weight) == (8, 8)
    assert np.max(np.abs(res.mean - exact)) < res.error_bound
    with pytest.raises(ConfigError, match="threshold"):
        _verify(secret, FLOAT, signed, threshold=FLOAT.max_clients + 1)


@pytest.mark.statistical
def test_noise_flooding_adds_gaussian_noise_of_the_stated_std(contexts) -> None:  # type: ignore[no-untyped-def]
    """The flooded mean minus the exact mean has sample std within 6 standard errors of flooding_std
    (relative standard error 1/sqrt(2 d) for d = 4000 Gaussian draws; false-positive rate ~2e-9), and mean
    within 6 sigma/sqrt(d) of 0. Rounding to the grid (2**-14, 64 times below sigma) adds a negligible variance."""
    secret, _ = contexts["float"]
    rng = np.random.default_rng(12)
    xs = {u: rng.uniform(-0.5, 0.5, 4000) for u in (1, 2)}
    signed = {u: ckks.sign_upload(IDS[u], _upload(secret, u, xs[u])) for u in xs}
    sigma = 2.0**-8
    res = ckks.decrypt_verified(
        secret, FLOAT, signed, ROSTER, run_id=RUN, round_number=2, key_id=KEY, threshold=2, flooding_std=sigma
    )
    err = res.mean - (xs[1] + xs[2]) / 2
    assert res.flooding_std == sigma and res.rounding_step == 2.0**-14  # 2 * 2**-24 / 2 * 2**10, exactly
    np.testing.assert_array_equal(res.mean / res.rounding_step, np.rint(res.mean / res.rounding_step))
    assert abs(err.std() / sigma - 1) < 6 / np.sqrt(2 * err.size)
    assert abs(err.mean()) < 6 * sigma / np.sqrt(err.size)
    with pytest.warns(RuntimeWarning, match="below the rounding step"):
        ckks.decrypt_verified(
            secret, FLOAT, signed, ROSTER, run_id=RUN, round_number=2, key_id=KEY, threshold=2, flooding_std=1e-9
        )
    for bad in (-1.0, float("nan")):
        with pytest.raises(ConfigError, match="flooding_std"):
            ckks.decrypt_verified(
                secret, FLOAT, signed, ROSTER, run_id=RUN, round_number=2, key_id=KEY, threshold=2, flooding_std=bad
            )
