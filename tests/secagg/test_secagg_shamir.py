"""Shamir t-of-n: every t-subset reconstructs, t-1 shares reveal nothing (exact count and randomized
check)."""

from __future__ import annotations

import itertools
import secrets as pysecrets

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedmpt.errors import ConfigError
from secagg.errors import MessageRejected, ThresholdNotMet
from secagg.shamir import P521, Share, decode_share, encode_share, reconstruct, share_size, split


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 6),
    data=st.data(),
    secret=st.binary(min_size=0, max_size=100),
)
def test_every_threshold_subset_reconstructs(n: int, data: st.DataObject, secret: bytes) -> None:
    t = data.draw(st.integers(1, n))
    holders = data.draw(st.lists(st.integers(0, 2**64 - 2), min_size=n, max_size=n, unique=True))
    shares = split(secret, t, holders)
    for subset in itertools.combinations(holders, t):
        assert reconstruct([shares[h] for h in subset], t, len(secret)) == secret
    if t > 1:
        with pytest.raises(ThresholdNotMet):
            reconstruct([shares[h] for h in holders[: t - 1]], t, len(secret))


def test_extra_shares_must_be_consistent() -> None:
    shares = split(b"k" * 32, 3, [1, 2, 3, 4])
    bad = Share(4, ((shares[4].values[0] + 1) % P521,))
    with pytest.raises(MessageRejected, match="inconsistent"):
        reconstruct([shares[1], shares[2], shares[3], bad], 3, 32)


def test_t_minus_one_shares_fit_every_secret_exactly_once() -> None:
    """Over GF(257), t=2: for a fixed share (x=1, y) each secret has exactly one polynomial a0 + a1 x."""
    p = 257
    counts = np.zeros((p, p), dtype=np.int64)  # (share value y, secret a0)
    a0, a1 = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    y = (a0 + a1 * 1) % p
    np.add.at(counts, (y.ravel(), a0.ravel()), 1)
    assert np.all(counts == 1)


@pytest.mark.statistical
def test_t_minus_one_shares_are_uniform_whatever_the_secret() -> None:
    """GF(257), t=3, shares of holders 0 and 1 for secrets 0 and 200.

    Each holder's value is uniform (chi-square, 257 cells) and the two secrets give the same distribution of a
    linear combination of the two visible shares (chi-square homogeneity). Each of the 3 tests has a
    false-positive rate of 1e-6.
    """
    p, draws = 257, 12_000
    seen = {}
    for secret in (0, 200):
        pairs = np.array(
            [[s.values[0] for s in split(bytes([secret]), 3, [0, 1, 2, 3], prime=p).values()][:2] for _ in range(draws)]
        )
        seen[secret] = pairs
        assert stats.chisquare(np.bincount(pairs[:, 0], minlength=p)).pvalue > 1e-6
    combo = {s: np.bincount((v[:, 0] + 5 * v[:, 1]) % p, minlength=p) for s, v in seen.items()}
    table = np.stack([combo[0], combo[200]])
    assert stats.chi2_contingency(table).pvalue > 1e-6


def test_share_bytes_round_trip_and_rejects() -> None:
    secret = pysecrets.token_bytes(32)
    shares = split(secret, 2, [5, 9])
    raw = encode_share(shares[5])
    assert len(raw) == share_size(32) == 8 + 66
    assert decode_share(raw, 32) == shares[5]
    with pytest.raises(MessageRejected, match="bytes"):
        decode_share(raw[:-1], 32)
    too_big = raw[:8] + (P521).to_bytes(66, "big")
    with pytest.raises(MessageRejected, match="field element"):
        decode_share(too_big, 32)
    assert "values" in repr(shares[5]) and str(shares[5].values[0]) not in repr(shares[5])


def test_bad_parameters() -> None:
    with pytest.raises(ConfigError, match="threshold"):
        split(b"x", 3, [1, 2])
    with pytest.raises(ConfigError, match="distinct"):
        split(b"x", 1, [1, 1])
