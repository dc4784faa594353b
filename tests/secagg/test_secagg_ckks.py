"""CKKS mode: the server holds no secret key, the aggregate matches the plaintext mean, sizes, rejections."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts

from fedmpt.errors import ConfigError
from secagg import ckks
from secagg.config import CkksConfig
from secagg.errors import CkksError, MessageRejected

RUN = os.urandom(16)
KEY = ckks.new_key_id()
FLOAT = CkksConfig(max_clients=8, max_weight=5)
PACKED = CkksConfig(
    coeff_mod_bit_sizes=(60, 40, 60), pack=2, lane_bits=23, packed_scale_bits=25, max_clients=8, max_weight=5
)


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
    msgs = {
        u: ckks.encrypt_update(secret, cfg, ups[u], ws[u], run_id=RUN, round_number=2, sender=u, key_id=KEY)
        for u in ups
    }
    agg = ckks.aggregate(server, cfg, msgs, run_id=RUN, round_number=2, key_id=KEY)
    return ckks.decrypt_aggregate(secret, cfg, agg, run_id=RUN, round_number=2, key_id=KEY), msgs, agg


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
    _, _, agg = _round(FLOAT, secret, server, {1: np.ones(3), 2: np.zeros(3)}, {1: 1, 2: 1})
    with pytest.raises(CkksError, match="secret key"):
        ckks.decrypt_aggregate(server, FLOAT, agg, run_id=RUN, round_number=2, key_id=KEY)
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
    res, _, _ = _round(cfg, secret, server, ups, ws)
    exact = sum(ws[u] * np.clip(ups[u], -1, 1) for u in ups) / sum(ws.values())
    assert (res.n_clients, res.total_weight) == (3, 9)
    assert np.max(np.abs(res.mean - exact)) < res.error_bound
    if mode == "packed":
        assert res.error_bound == pytest.approx(3 / (cfg.quantization_scale() * 9))


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
