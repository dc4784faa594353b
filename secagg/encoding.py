"""Fixed-point encoding of real update vectors into Z_(2**b) for masked summation, and its error bound.

Client u with update x_u (shape (d,)) and integer weight w_u in [1, W_max] sends, modulo M = 2**b:

    e_u[i] = SR(w_u * clip(x_u[i], -c, c) * s)   for i < d,        e_u[d] = w_u,

where SR is stochastic rounding, SR(v) = floor(v + U) with U uniform on [0, 1) drawn from an AES-CTR stream
keyed by a fresh OS-random seed (unbiased: E[SR(v)] = v, and |SR(v) - v| < 1). Negative values are stored in
two's complement. The server decodes the signed sum S = sum_u e_u (mod M) as

    mean[i] = S[i] / (s * S[d]) = sum_u w_u x_u[i] / sum_u w_u  + error,

which is exact modulo the rounding as long as the true signed sum cannot wrap: n * max|e_u| < 2**(b-1)
(:meth:`secagg.config.MaskingConfig.max_clients`). Worst-case error of the decoded weighted mean per
coordinate: |error| < n / (s * sum_u w_u) (<= 1/s with unit weights); its standard deviation is at most
sqrt(n) / (2 s sum_u w_u). Clipping to [-c, c] is a separate, deliberate bias; choose c with
:func:`clip_range_from_dp` so it almost never binds.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from fedmpt.errors import ConfigError
from secagg.config import MaskingConfig
from secagg.errors import OverflowRisk, ProtocolError
from secagg.prg import add_uniform, fresh_seed


def clip_range_from_dp(clip_norm: float, noise_std: float, clip_probability: float = 1e-9) -> float:
    """Per-coordinate clip range c for a DP update: c = C + z * sigma with P(|N(0,1)| > z) = clip_probability.

    Assumption: the client update is L2-clipped to ``clip_norm`` (so every coordinate is within +-C) and then
    receives Gaussian noise of std ``noise_std`` per coordinate; a coordinate is then clipped by the encoder
    with probability at most ``clip_probability``. With ``noise_std == 0`` (no DP) c = C.
    """
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ConfigError(f"clip_norm must be finite and > 0, got {clip_norm!r}")
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ConfigError(f"noise_std must be finite and >= 0, got {noise_std!r}")
    if not 0 < clip_probability < 1:
        raise ConfigError(f"clip_probability must be in (0, 1), got {clip_probability!r}")
    z = NormalDist().inv_cdf(1 - clip_probability / 2)
    return clip_norm + z * noise_std


def scale_for_error(max_abs_error: float) -> float:
    """Smallest power-of-two scale s with 1/s <= max_abs_error (the worst-case error of a unit-weight
    mean)."""
    if not (math.isfinite(max_abs_error) and max_abs_error > 0):
        raise ConfigError(f"max_abs_error must be finite and > 0, got {max_abs_error!r}")
    return float(2.0 ** math.ceil(math.log2(1.0 / max_abs_error)))


def quantization_error_bound(config: MaskingConfig, n_clients: int, total_weight: float) -> float:
    """Worst-case |decoded weighted mean - exact weighted mean of the clipped inputs| per coordinate.

    Each client's stochastic rounding errs by less than one unit of 1/s in the weighted domain, so the sum
    errs by less than n/s and the mean, divided by the total weight, by less than n / (s * total_weight).
    """
    if n_clients < 1 or total_weight <= 0:
        raise ConfigError(f"need n_clients >= 1 and total_weight > 0, got {n_clients}, {total_weight}")
    return n_clients / (config.scale * total_weight)


def _dtype(config: MaskingConfig) -> np.dtype:
    return np.dtype(np.uint32) if config.modulus_bits == 32 else np.dtype(np.uint64)


def encode(update: np.ndarray, weight: int, config: MaskingConfig, rounding_seed: bytes | None = None) -> np.ndarray:
    """Encode a float update and its weight into a vector of d+1 words modulo 2**modulus_bits, shape (d+1,).

    ``rounding_seed`` (32 bytes) fixes the stochastic-rounding stream for tests; by default a fresh seed comes
    from the OS CSPRNG. Raises ConfigError on a non-1-D or non-finite update or a weight outside [1,
    max_weight].
    """
    x = np.asarray(update)
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    if x.ndim != 1:
        raise ConfigError(f"update must be a flat vector, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ConfigError(f"update has {int(np.sum(~np.isfinite(x)))} non-finite values")
    if isinstance(weight, bool) or not isinstance(weight, int | np.integer) or not 1 <= weight <= config.max_weight:
        raise ConfigError(f"weight must be an int in [1, max_weight={config.max_weight}], got {weight!r}")
    seed = fresh_seed() if rounding_seed is None else rounding_seed
    v = np.empty(x.size, dtype=np.float64)  # (d,), every step below works in place on it
    np.copyto(v, x)  # to float64 before clipping, so the bound is the float64 clip range
    np.clip(v, -config.clip_range, config.clip_range, out=v)
    v *= float(weight) * config.scale
    add_uniform(v, seed, b"encode")
    np.floor(v, out=v)
    out = np.empty(x.size + 1, dtype=_dtype(config))  # (d+1,)
    rounded = v.view(np.int64)
    np.copyto(rounded, v, casting="unsafe")  # in place; integral and |v| < 2**(b-1) (check_capacity): exact
    out[:-1] = rounded  # two's complement modulo 2**b
    out[-1] = weight
    return out


def to_signed(total: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Map words modulo 2**b to the signed representatives in [-2**(b-1), 2**(b-1)): a two's-complement view
    (int32 or int64) of ``total``, no copy."""
    if modulus_bits == 64:
        return np.asarray(total, dtype=np.uint64).view(np.int64)
    return np.asarray(total, dtype=np.uint32).view(np.int32)


def check_capacity(config: MaskingConfig, n_clients: int) -> None:
    """Raise OverflowRisk unless n_clients * max|encoded word| < 2**(modulus_bits - 1)."""
    if n_clients > config.max_clients():
        raise OverflowRisk(
            f"{n_clients} clients could overflow the {config.modulus_bits}-bit modulus with clip_range="
            f"{config.clip_range}, scale={config.scale}, max_weight={config.max_weight}; at most "
            f"{config.max_clients()} fit"
        )


def decode_sum(total: np.ndarray, config: MaskingConfig, n_clients: int) -> tuple[np.ndarray, int]:
    """Decode the modular sum of ``n_clients`` encodings into (weighted mean, shape (d,); total weight).

    Raises ProtocolError when the summed weight is outside [n, n * max_weight], which means the inputs or the
    unmasking were corrupted (a wrong mask leaves a uniformly random weight word).
    """
    signed = to_signed(total, config.modulus_bits)
    total_weight = int(signed[-1])
    if not n_clients <= total_weight <= n_clients * config.max_weight:
        raise ProtocolError(
            f"decoded total weight {total_weight} is outside [{n_clients}, {n_clients * config.max_weight}] "
            "for "
            f"{n_clients} clients: the masked sum is corrupted"
        )
    mean = np.divide(signed[:-1], config.scale * total_weight, dtype=np.float64)  # (d,)
    return mean, total_weight
