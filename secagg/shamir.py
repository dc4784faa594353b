"""t-of-n Shamir secret sharing over the prime field GF(p), p = 2**521 - 1 (a Mersenne prime).

A secret byte string is cut into chunks smaller than p; for each chunk the dealer draws a uniformly random
polynomial f of degree t-1 with f(0) = chunk and gives holder h the value f(x_h) with x_h = h + 1 (node ids
are u64, so x_h is non-zero and distinct below p). Any t values determine f by Lagrange interpolation at 0;
any t-1 values are uniformly distributed and independent of the chunk (Shamir, CACM 1979), i.e. reveal
nothing. Coefficients come from :mod:`secrets`. Shares have a fixed byte layout; there is no pickle anywhere.
"""

from __future__ import annotations

import functools
import secrets
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from fedmpt.errors import ConfigError
from secagg.errors import MessageRejected, ThresholdNotMet

#: Default field modulus: the Mersenne prime 2**521 - 1, so a 32-byte secret is one field element.
P521 = 2**521 - 1


def chunk_bytes(prime: int) -> int:
    """Bytes per secret chunk: the largest b with 256**b <= prime (so every chunk is a field element)."""
    return (prime.bit_length() - 1) // 8


def element_bytes(prime: int) -> int:
    """Bytes of one encoded field element."""
    return (prime.bit_length() + 7) // 8


@dataclass(frozen=True)
class Share:
    """The share of one holder: ``values[i]`` = f_i(holder + 1) for chunk i. ``repr`` hides the values."""

    holder: int
    values: tuple[int, ...] = field(repr=False)

    def __repr__(self) -> str:
        return f"Share(holder={self.holder}, chunks={len(self.values)}, values=<hidden>)"


def share_size(secret_length: int, prime: int = P521) -> int:
    """Encoded size of one share of a ``secret_length``-byte secret: u64 holder + chunk values."""
    return 8 + n_chunks(secret_length, prime) * element_bytes(prime)


def n_chunks(secret_length: int, prime: int = P521) -> int:
    """Number of field elements a ``secret_length``-byte secret is cut into (at least one)."""
    step = chunk_bytes(prime)
    return max(1, -(-secret_length // step))


def split(secret: bytes, threshold: int, holders: Iterable[int], prime: int = P521) -> dict[int, Share]:
    """Split ``secret`` into one share per holder; any ``threshold`` of them reconstruct it.

    Raises ConfigError if threshold < 1, there are fewer holders than threshold, or a holder id repeats.
    """
    holder_list = list(holders)
    if len(set(holder_list)) != len(holder_list):
        raise ConfigError(f"Shamir holders must be distinct, got {holder_list}")
    if threshold < 1 or threshold > len(holder_list):
        raise ConfigError(f"Shamir threshold must be in [1, {len(holder_list)}] (number of holders), got {threshold}")
    for h in holder_list:
        if not 0 <= h < prime - 1:
            raise ConfigError(f"Shamir holder id {h} out of range for the field")
    step = chunk_bytes(prime)
    chunks = [int.from_bytes(secret[i : i + step], "big") for i in range(0, max(len(secret), 1), step)]
    polys = [[c] + [secrets.randbelow(prime) for _ in range(threshold - 1)] for c in chunks]
    out: dict[int, Share] = {}
    for h in holder_list:
        x = h + 1
        out[h] = Share(h, tuple(_evaluate(poly, x, prime) for poly in polys))
    return out


def _evaluate(coefficients: Sequence[int], x: int, prime: int) -> int:
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % prime
    return acc


@functools.lru_cache(maxsize=4096)
def _lagrange_coefficients(xs: tuple[int, ...], at: int, prime: int) -> tuple[int, ...]:
    """lambda_j with f(at) = sum_j lambda_j f(x_j) for every f of degree < len(xs); cached, since every secret
    of a round is usually interpolated from the same holders."""
    coefficients = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (at - xm) % prime
                den = den * (xj - xm) % prime
        coefficients.append(num * pow(den, -1, prime) % prime)
    return tuple(coefficients)


def _lagrange_at(points: Sequence[tuple[int, int]], at: int, prime: int) -> int:
    coefficients = _lagrange_coefficients(tuple(x for x, _ in points), at, prime)
    return sum(c * y for c, (_, y) in zip(coefficients, points, strict=True)) % prime


def reconstruct(shares: Sequence[Share], threshold: int, secret_length: int, prime: int = P521) -> bytes:
    """Recover a ``secret_length``-byte secret from at least ``threshold`` shares.

    Interpolates f(0) from the first ``threshold`` shares; if more are given, every extra share must lie on
    the same polynomial, else MessageRejected (a corrupted or forged share). Fewer than ``threshold`` shares
    raise ThresholdNotMet.
    """
    by_holder: dict[int, Share] = {}
    for s in shares:
        if s.holder in by_holder and by_holder[s.holder] != s:
            raise MessageRejected(f"two different Shamir shares for holder {s.holder}")
        by_holder[s.holder] = s
    if len(by_holder) < threshold:
        raise ThresholdNotMet(f"{len(by_holder)} distinct Shamir shares given, threshold is {threshold}")
    count = n_chunks(secret_length, prime)
    ordered = [by_holder[h] for h in sorted(by_holder)]
    for s in ordered:
        if len(s.values) != count:
            raise MessageRejected(f"share of holder {s.holder} has {len(s.values)} chunks, expected {count}")
    base, extra = ordered[:threshold], ordered[threshold:]
    step = chunk_bytes(prime)
    out = bytearray()
    for i in range(count):
        points = [(s.holder + 1, s.values[i]) for s in base]
        for s in extra:
            if _lagrange_at(points, s.holder + 1, prime) != s.values[i]:
                raise MessageRejected(f"Shamir share of holder {s.holder} is inconsistent with the others")
        value = _lagrange_at(points, 0, prime)
        width = min(step, secret_length - i * step) if secret_length else 0
        if value >= 256**width:
            raise MessageRejected("reconstructed Shamir chunk does not fit the secret length (corrupted shares)")
        out += value.to_bytes(width, "big")
    return bytes(out)


def encode_share(share: Share, prime: int = P521) -> bytes:
    """Fixed layout: u64 holder || chunk values, each big-endian in element_bytes(prime) bytes."""
    width = element_bytes(prime)
    return struct.pack("<Q", share.holder) + b"".join(v.to_bytes(width, "big") for v in share.values)


def decode_share(data: bytes, secret_length: int, prime: int = P521) -> Share:
    """Parse :func:`encode_share` output for a ``secret_length``-byte secret; rejects wrong sizes and values
    >= p."""
    expected = share_size(secret_length, prime)
    if len(data) != expected:
        raise MessageRejected(f"Shamir share must be {expected} bytes, got {len(data)}")
    (holder,) = struct.unpack_from("<Q", data, 0)
    width = element_bytes(prime)
    values = []
    for i in range(n_chunks(secret_length, prime)):
        v = int.from_bytes(data[8 + i * width : 8 + (i + 1) * width], "big")
        if v >= prime:
            raise MessageRejected(f"Shamir share of holder {holder}: value is not a field element")
        values.append(v)
    return Share(holder, tuple(values))
