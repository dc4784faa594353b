"""Pseudo-random generator expanding a 32-byte seed into mask vectors: AES-256-CTR keystream.

The keystream of AES-256 in counter mode under a uniformly random key is indistinguishable from uniform bytes
(the PRP/PRF switching lemma; NIST SP 800-38A). Reading it as little-endian uint32/uint64 words gives
vectors that are uniform modulo 2**32 / 2**64, which is what one-time-pad masking needs. A seed is never
used as the AES key directly: the key is HKDF-SHA256(seed, info=purpose || context) (RFC 5869), so one seed
can feed several purposes (self mask, pairwise mask, rounding noise) without two of them ever sharing a
keystream. Because every key is used for exactly one stream, the all-zero initial counter block is safe.
"""

from __future__ import annotations

import enum
import os

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmpt.errors import ConfigError

SEED_BYTES = 32
_ZERO_COUNTER = bytes(16)
_DOMAIN = b"fedmpt-secagg/v1/prg/"


class Purpose(enum.Enum):
    """Domain-separation label of a keystream; part of the HKDF info so purposes never share a key."""

    SELF_MASK = b"self-mask"
    PAIRWISE_MASK = b"pairwise-mask"
    STOCHASTIC_ROUNDING = b"stochastic-rounding"


def derive_stream_key(seed: bytes, purpose: Purpose, context: bytes) -> bytes:
    """Derive the AES-256 key of one keystream: HKDF-SHA256(seed, salt=None,
    info=domain||purpose||context)."""
    if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
        raise ConfigError(f"PRG seed must be {SEED_BYTES} bytes, got {type(seed).__name__} of length {len(seed)}")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_DOMAIN + purpose.value + b"|" + context)
    return hkdf.derive(bytes(seed))


def keystream(seed: bytes, purpose: Purpose, context: bytes, n_bytes: int) -> bytes:
    """Return ``n_bytes`` of AES-256-CTR keystream under the key derived from (seed, purpose, context)."""
    if n_bytes < 0:
        raise ConfigError(f"keystream length must be >= 0, got {n_bytes}")
    key = derive_stream_key(seed, purpose, context)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_COUNTER)).encryptor()
    return encryptor.update(bytes(n_bytes)) + encryptor.finalize()


def mask_vector(seed: bytes, purpose: Purpose, context: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """Expand a seed into ``length`` words uniform modulo 2**modulus_bits (dtype uint32 or uint64), shape
    (length,)."""
    if modulus_bits not in (32, 64):
        raise ConfigError(f"modulus_bits must be 32 or 64, got {modulus_bits!r}")
    if length < 0:
        raise ConfigError(f"mask length must be >= 0, got {length}")
    dtype = np.dtype("<u4") if modulus_bits == 32 else np.dtype("<u8")
    raw = keystream(seed, purpose, context, length * dtype.itemsize)
    words = np.frombuffer(raw, dtype=dtype)  # read-only view of the keystream bytes
    return words if dtype.isnative else words.astype(dtype.newbyteorder("="))


def uniform_floats(seed: bytes, context: bytes, length: int) -> np.ndarray:
    """``length`` floats uniform on [0, 1) with 53 random bits each, from the STOCHASTIC_ROUNDING stream."""
    words = mask_vector(seed, Purpose.STOCHASTIC_ROUNDING, context, length, 64)
    return (words >> np.uint64(11)).astype(np.float64) * (2.0**-53)


def fresh_seed() -> bytes:
    """A new uniformly random 32-byte seed from the operating system CSPRNG."""
    return os.urandom(SEED_BYTES)
