"""AES-CTR mask PRG: known answers from an independent HKDF/AES-ECB computation, uniformity, domain
separation."""

from __future__ import annotations

import hashlib
import hmac
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

from fedmpt.errors import ConfigError
from secagg.prg import (
    Purpose,
    add_mask,
    add_uniform,
    derive_stream_key,
    keystream,
    mask_vector,
    uniform_floats,
)


def _hkdf_sha256_reference(ikm: bytes, info: bytes) -> bytes:
    """RFC 5869 with an empty salt, written from the RFC with the stdlib (independent of ``cryptography``)."""
    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def test_rfc5869_reference_matches_published_vector() -> None:
    # RFC 5869 test case 3 (SHA-256, zero-length salt and info): the reference itself is right.
    okm = _hkdf_sha256_reference(bytes([0x0B] * 22), b"")
    assert okm.hex() == "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"


def test_stream_key_is_hkdf_with_domain_separated_info() -> None:
    seed = bytes(range(32))
    want = _hkdf_sha256_reference(seed, b"fedmpt-secagg/v1/prg/self-mask|ctx")
    assert derive_stream_key(seed, Purpose.SELF_MASK, b"ctx") == want


def test_keystream_equals_aes_ecb_of_counter_blocks() -> None:
    seed = bytes(range(1, 33))
    key = _hkdf_sha256_reference(seed, b"fedmpt-secagg/v1/prg/pairwise-mask|abc")
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    counters = b"".join(i.to_bytes(16, "big") for i in range(4))
    want = ecb.update(counters) + ecb.finalize()
    assert keystream(seed, Purpose.PAIRWISE_MASK, b"abc", 64) == want
    words = mask_vector(seed, Purpose.PAIRWISE_MASK, b"abc", 16, 32)
    assert words.tolist() == [int.from_bytes(want[4 * i : 4 * i + 4], "little") for i in range(16)]
    words64 = mask_vector(seed, Purpose.PAIRWISE_MASK, b"abc", 8, 64)
    assert words64.tolist() == [int.from_bytes(want[8 * i : 8 * i + 8], "little") for i in range(8)]


def test_purposes_and_contexts_give_different_streams() -> None:
    seed = bytes(32)
    a = keystream(seed, Purpose.SELF_MASK, b"r1", 32)
    b = keystream(seed, Purpose.PAIRWISE_MASK, b"r1", 32)
    c = keystream(seed, Purpose.SELF_MASK, b"r2", 32)
    assert len({a, b, c}) == 3


@pytest.mark.statistical
def test_mask_words_are_uniform() -> None:
    """Chi-square of the top byte of 2**16 words over 256 cells; false-positive rate 1e-6."""
    words = mask_vector(bytes([7]) * 32, Purpose.SELF_MASK, b"u", 2**16, 32)
    counts = np.bincount((words >> np.uint32(24)).astype(np.int64), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-6
    u = uniform_floats(bytes([9]) * 32, b"u", 2**14)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-6


def test_bad_seed_and_bits_are_rejected() -> None:
    with pytest.raises(ConfigError, match="32 bytes"):
        mask_vector(b"short", Purpose.SELF_MASK, b"", 4, 32)
    with pytest.raises(ConfigError, match="modulus_bits"):
        mask_vector(bytes(32), Purpose.SELF_MASK, b"", 4, 16)


@pytest.mark.parametrize("bits", [32, 64])
def test_in_place_masks_equal_the_mask_vectors(bits: int) -> None:
    """add_mask / add_uniform reuse one scratch buffer; every size (growing and shrinking) gives the same words
    as the allocating mask_vector / uniform_floats."""
    dtype = np.uint32 if bits == 32 else np.uint64
    for length in (0, 1, 5, 4097, 3, 100_003, 17):
        seed = bytes([length % 251]) * 32
        acc = np.arange(length, dtype=dtype) * dtype(2**31 - 1)
        start = acc.copy()
        add_mask(acc, seed, Purpose.PAIRWISE_MASK, b"ctx")
        np.testing.assert_array_equal(acc, start + mask_vector(seed, Purpose.PAIRWISE_MASK, b"ctx", length, bits))
        add_mask(acc, seed, Purpose.PAIRWISE_MASK, b"ctx", subtract=True)
        np.testing.assert_array_equal(acc, start)
        values = np.linspace(-5.0, 5.0, length)
        shifted = values.copy()
        add_uniform(shifted, seed, b"ctx")
        np.testing.assert_array_equal(shifted, values + uniform_floats(seed, b"ctx", length))


def test_in_place_masks_are_independent_across_threads() -> None:
    seeds = [bytes([i]) * 32 for i in range(8)]

    def run(seed: bytes) -> np.ndarray:
        acc = np.zeros(50_000, dtype=np.uint32)
        for _ in range(5):
            add_mask(acc, seed, Purpose.SELF_MASK, b"t")
        return acc

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(run, seeds))
    for seed, acc in zip(seeds, got, strict=True):
        np.testing.assert_array_equal(acc, mask_vector(seed, Purpose.SELF_MASK, b"t", 50_000, 32) * np.uint32(5))


def test_in_place_mask_rejects_bad_accumulators() -> None:
    with pytest.raises(ConfigError, match="uint32/uint64"):
        add_mask(np.zeros(4, dtype=np.int64), bytes(32), Purpose.SELF_MASK, b"")
    with pytest.raises(ConfigError, match="uint32/uint64"):
        add_mask(np.zeros((2, 2), dtype=np.uint32), bytes(32), Purpose.SELF_MASK, b"")
    with pytest.raises(ConfigError, match="float64"):
        add_uniform(np.zeros(4, dtype=np.float32), bytes(32), b"")
