"""The flat update vector that secure aggregation protects, and the digest that binds a round to its model.

Imports neither torch nor flwr (the stages after training run without the task).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedmpt.errors import ConfigError

Arrays = dict[str, NDArray[Any]]


def flatten(arrays: Mapping[str, NDArray[Any]]) -> NDArray[np.float64]:
    """The update vector: every array raveled in the sorted order of the names, as float64, shape (d,)."""
    return np.concatenate([np.asarray(arrays[name], dtype=np.float64).ravel() for name in sorted(arrays)])


def unflatten(vector: NDArray[Any], like: Mapping[str, NDArray[Any]]) -> Arrays:
    """Inverse of :func:`flatten` for the names and shapes of ``like`` (fp32 arrays)."""
    out: Arrays = {}
    pos = 0
    for name in sorted(like):
        shape = np.shape(like[name])
        size = int(np.prod(shape))
        out[name] = np.asarray(vector[pos : pos + size], dtype=np.float32).reshape(shape)
        pos += size
    if pos != len(vector):
        raise ConfigError(f"vector of length {len(vector)} does not match the state's {pos} values")
    return out


def model_digest(arrays: Mapping[str, NDArray[Any]]) -> bytes:
    """SHA-256 over the global state exactly as received: per array (sorted by name) its name, dtype, shape and
    little-endian bytes. Every client signs it inside its key advertisement, so clients shown different models
    cannot complete a round together."""
    h = hashlib.sha256(b"fedmpt/model-digest/v1|")
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder not in ("|", "<") else a.dtype
        raw_name, raw_dtype = name.encode(), dtype.str.encode()
        h.update(struct.pack("<I", len(raw_name)) + raw_name + struct.pack("<I", len(raw_dtype)) + raw_dtype)
        h.update(struct.pack("<I", a.ndim) + b"".join(struct.pack("<Q", s) for s in a.shape))
        h.update(a.astype(dtype, copy=False).tobytes())
    return h.digest()
