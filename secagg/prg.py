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
import threading
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmpt.errors import ConfigError

SEED_BYTES = 32
_ZERO_COUNTER = bytes(16)
_DOMAIN = b"fedmpt-secagg/v1/prg/"
#: Scratch buffers up to this size stay with their thread between masks (64 MiB: 1.6e7 uint32 words).
_SCRATCH_KEEP_BYTES = 64 * 2**20
_LOCAL = threading.local()
_ZEROS = b""


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


def _encryptor(seed: bytes, purpose: Purpose, context: bytes) -> Any:
    key = derive_stream_key(seed, purpose, context)
    return Cipher(algorithms.AES(key), modes.CTR(_ZERO_COUNTER)).encryptor()


def _zeros(n_bytes: int) -> memoryview:
    """A read-only view of ``n_bytes`` zero bytes (the CTR plaintext), from one buffer that only ever grows."""
    global _ZEROS
    if len(_ZEROS) < n_bytes:
        _ZEROS = bytes(max(n_bytes, 2 * len(_ZEROS)))
    return memoryview(_ZEROS)[:n_bytes]


def _scratch(n_bytes: int) -> bytearray:
    """This thread's reusable output buffer of at least ``n_bytes`` + 15 bytes (``update_into``'s requirement).

    Expanding masks into a buffer that is already mapped avoids a fresh allocation per mask, whose page faults
    cost several times the AES itself at 10^5-word vectors. Buffers above :data:`_SCRATCH_KEEP_BYTES` are not
    kept.
    """
    need = n_bytes + 15
    buf: bytearray | None = getattr(_LOCAL, "buf", None)
    if buf is None or len(buf) < need:
        buf = bytearray(need)
        if need <= _SCRATCH_KEEP_BYTES:
            _LOCAL.buf = buf
    return buf


def keystream(seed: bytes, purpose: Purpose, context: bytes, n_bytes: int) -> bytes:
    """Return ``n_bytes`` of AES-256-CTR keystream under the key derived from (seed, purpose, context)."""
    if n_bytes < 0:
        raise ConfigError(f"keystream length must be >= 0, got {n_bytes}")
    encryptor = _encryptor(seed, purpose, context)
    return encryptor.update(_zeros(n_bytes)) + encryptor.finalize()


def _mask_dtype(modulus_bits: int) -> np.dtype:
    if modulus_bits not in (32, 64):
        raise ConfigError(f"modulus_bits must be 32 or 64, got {modulus_bits!r}")
    return np.dtype("<u4") if modulus_bits == 32 else np.dtype("<u8")


def mask_vector(seed: bytes, purpose: Purpose, context: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """Expand a seed into ``length`` words uniform modulo 2**modulus_bits (dtype uint32 or uint64), shape
    (length,)."""
    dtype = _mask_dtype(modulus_bits)
    if length < 0:
        raise ConfigError(f"mask length must be >= 0, got {length}")
    words = np.frombuffer(keystream(seed, purpose, context, length * dtype.itemsize), dtype=dtype)
    return words if dtype.isnative else words.astype(dtype.newbyteorder("="))


def _scratch_words(seed: bytes, purpose: Purpose, context: bytes, count: int, dtype: np.dtype) -> np.ndarray:
    """``count`` keystream words of little-endian ``dtype`` as a writable native-order array, expanded into this
    thread's scratch buffer (see :func:`_scratch`); valid until the thread's next expansion."""
    n_bytes = count * dtype.itemsize
    buf = _scratch(n_bytes)
    _encryptor(seed, purpose, context).update_into(_zeros(n_bytes), buf)
    words = np.frombuffer(buf, dtype=dtype, count=count)
    return words if dtype.isnative else words.astype(dtype.newbyteorder("="))


def add_mask(acc: np.ndarray, seed: bytes, purpose: Purpose, context: bytes, *, subtract: bool = False) -> None:
    """In place: ``acc += PRG(seed)`` (or ``-=``) modulo 2**b, for ``acc`` a 1-D uint32 or uint64 array.

    Equal to adding :func:`mask_vector` of ``acc``'s length and width, without allocating the mask.
    """
    if acc.ndim != 1 or acc.dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)):
        raise ConfigError(f"mask accumulator must be a flat uint32/uint64 array, got {acc.dtype} {acc.shape}")
    words = _scratch_words(seed, purpose, context, acc.size, _mask_dtype(8 * acc.dtype.itemsize))
    if subtract:
        np.subtract(acc, words, out=acc)
    else:
        np.add(acc, words, out=acc)


def uniform_floats(seed: bytes, context: bytes, length: int) -> np.ndarray:
    """``length`` floats uniform on [0, 1) with 53 random bits each, from the STOCHASTIC_ROUNDING stream."""
    words = mask_vector(seed, Purpose.STOCHASTIC_ROUNDING, context, length, 64)
    return (words >> np.uint64(11)).astype(np.float64) * (2.0**-53)


def add_uniform(values: np.ndarray, seed: bytes, context: bytes) -> None:
    """In place: ``values += U`` for ``values`` a flat float64 array and U the :func:`uniform_floats` of the
    same seed, context and length (bit for bit), without allocating U."""
    if values.ndim != 1 or values.dtype != np.float64:
        raise ConfigError(f"values must be a flat float64 array, got {values.dtype} {values.shape}")
    words = _scratch_words(seed, Purpose.STOCHASTIC_ROUNDING, context, values.size, np.dtype("<u8"))
    np.right_shift(words, np.uint64(11), out=words)
    floats = words.view(np.float64)  # reuses the scratch in place (same positions, same width)
    np.multiply(words, 2.0**-53, out=floats)  # exact: a 53-bit integer times a power of two
    np.add(values, floats, out=values)


def fresh_seed() -> bytes:
    """A new uniformly random 32-byte seed from the operating system CSPRNG."""
    return os.urandom(SEED_BYTES)
