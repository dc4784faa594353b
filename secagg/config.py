"""Typed, validated configuration of the two secure-aggregation modes.

Both dataclasses are frozen and check their bounds on construction, so an object that exists is usable; the
bounds follow the math in :mod:`secagg.encoding` (overflow), :mod:`secagg.masking` (threshold) and
:mod:`secagg.ckks` (SEAL's 128-bit table).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedmpt.errors import ConfigError

#: HomomorphicEncryption.org 128-bit classical security bound on log2(q) per ring degree, enforced by SEAL.
SEAL_128_BIT_MAX_COEFF_BITS: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}

#: Largest magnitude that float64 represents every integer up to; encodings must stay below it.
FLOAT64_EXACT_INT = 2**53


@dataclass(frozen=True)
class MaskingConfig:
    """Parameters of pairwise-masking secure aggregation (Bonawitz et al. 2017; SecAgg+ of Bell et al. 2020).

    Attributes:
        threshold: Shamir threshold t >= 2: any t share holders reconstruct a secret, t-1 learn nothing. It is
            also the minimum number of surviving clients for a round to succeed.
        neighbourhood_size: None for the complete graph (SecAgg); an even k >= 2 for the SecAgg+ k-regular
            (Harary) graph. Must be >= threshold.
        modulus_bits: 32 or 64; every coordinate is summed modulo 2**modulus_bits.
        clip_range: c > 0; every coordinate is clipped to [-c, c] before encoding (see
            :func:`secagg.encoding.clip_range_from_dp`).
        scale: fixed-point scale s > 0: a value v is encoded as a stochastic rounding of v * s, so the
            quantization step is 1 / s.
        max_weight: largest per-client weight (sample count) allowed; weights are integers in [1, max_weight]
            and are carried as an extra masked coordinate.
        stage_timeout_s: how long the server waits for the replies of one stage (used by the transport
        adapter).
    """

    threshold: int
    neighbourhood_size: int | None = None
    modulus_bits: int = 32
    clip_range: float = 1.0
    scale: float = 2.0**16
    max_weight: int = 1
    stage_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int) or self.threshold < 2:
            raise ConfigError(f"MaskingConfig.threshold must be an int >= 2, got {self.threshold!r}")
        k = self.neighbourhood_size
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 2 or k % 2:
                raise ConfigError(f"MaskingConfig.neighbourhood_size must be None or an even int >= 2, got {k!r}")
            if k < self.threshold:
                raise ConfigError(
                    f"MaskingConfig.neighbourhood_size={k} is below threshold={self.threshold}: "
                    "a node's secrets could never be reconstructed"
                )
        if self.modulus_bits not in (32, 64):
            raise ConfigError(f"MaskingConfig.modulus_bits must be 32 or 64, got {self.modulus_bits!r}")
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ConfigError(f"MaskingConfig.clip_range must be finite and > 0, got {self.clip_range!r}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"MaskingConfig.scale must be finite and > 0, got {self.scale!r}")
        if isinstance(self.max_weight, bool) or not isinstance(self.max_weight, int) or self.max_weight < 1:
            raise ConfigError(f"MaskingConfig.max_weight must be an int >= 1, got {self.max_weight!r}")
        if not (math.isfinite(self.stage_timeout_s) and self.stage_timeout_s > 0):
            raise ConfigError(f"MaskingConfig.stage_timeout_s must be finite and > 0, got {self.stage_timeout_s!r}")
        per_client = self.max_weight * self.clip_range * self.scale + 1
        if per_client >= FLOAT64_EXACT_INT:
            raise ConfigError(
                f"max_weight*clip_range*scale = {per_client:.3g} exceeds 2**53: the fixed-point encoding "
                "would "
                "not be exact in float64; lower scale or clip_range"
            )
        if self.max_clients() < self.threshold:
            raise ConfigError(
                f"with modulus_bits={self.modulus_bits}, clip_range={self.clip_range}, scale={self.scale}, "
                f"max_weight={self.max_weight} at most {self.max_clients()} clients fit without overflow, "
                f"below threshold={self.threshold}"
            )

    @classmethod
    def sized(
        cls,
        threshold: int,
        roster_size: int,
        max_weight: int,
        clip_range: float,
        *,
        neighbourhood_size: int | None = None,
        stage_timeout_s: float = 60.0,
    ) -> MaskingConfig:
        """The config whose fixed-point ring fits ``roster_size`` clients of weight <= ``max_weight``.

        The scale is the largest power of two s with ``roster_size * ceil(max_weight * clip_range * s) <
        2**(bits - 1)`` (no wrap-around, :func:`secagg.encoding.check_capacity`) and ``max_weight * clip_range * s <
        2**53`` (float64 exactness). A 32-bit ring is used while it leaves s >= :data:`MIN_SCALE` (quantization step
        at most 2**-16), else a 64-bit ring: e.g. 50 sites of up to 10**5 records each need 64 bits. Sizing from the
        roster (every client that could ever take part), never from one round's participants, means no round the
        server can assemble can overflow.
        """
        for bits in (32, 64):
            scale = fixed_point_scale(roster_size, max_weight, clip_range, bits)
            if scale >= MIN_SCALE:
                break
        if scale < 1.0:
            raise ConfigError(
                f"{roster_size} clients x weight {max_weight} x clip range {clip_range} leave no fixed-point precision "
                "even in a 64-bit ring; lower the clip range (run config 'secagg-clip-range')"
            )
        return cls(
            threshold=threshold,
            neighbourhood_size=neighbourhood_size,
            modulus_bits=bits,
            clip_range=clip_range,
            scale=scale,
            max_weight=max_weight,
            stage_timeout_s=stage_timeout_s,
        )

    def max_encoded_magnitude(self) -> int:
        """Largest |encoded coordinate| one client can send: ceil(max_weight * clip_range * scale) (+
        weight)."""
        return max(math.ceil(self.max_weight * self.clip_range * self.scale), self.max_weight)

    def max_clients(self) -> int:
        """Largest n with n * max_encoded_magnitude < 2**(modulus_bits-1): the signed sum cannot wrap."""
        return (2 ** (self.modulus_bits - 1) - 1) // self.max_encoded_magnitude()


#: Smallest fixed-point scale :meth:`MaskingConfig.sized` accepts in a 32-bit ring before moving to 64 bits.
MIN_SCALE = 2.0**16


def fixed_point_scale(max_clients: int, max_weight: int, clip_range: float, modulus_bits: int = 32) -> float:
    """Largest power of two s with ``max_clients * ceil(max_weight * clip_range * s) < 2**(modulus_bits - 1)`` and
    ``max_weight * clip_range * s < 2**53``; a value below 1 means the ring leaves no integer precision.

    That is the no-wrap-around condition of :func:`secagg.encoding.check_capacity` for ``max_clients`` clients; a
    larger s only shrinks the quantization error ``n / (s * sum w)``.
    """
    if isinstance(max_clients, bool) or not isinstance(max_clients, int) or max_clients < 1:
        raise ConfigError(f"max_clients must be an int >= 1, got {max_clients!r}")
    if isinstance(max_weight, bool) or not isinstance(max_weight, int) or max_weight < 1:
        raise ConfigError(f"max_weight must be an int >= 1, got {max_weight!r}")
    if not (math.isfinite(clip_range) and clip_range > 0):
        raise ConfigError(f"clip_range must be finite and > 0, got {clip_range!r}")
    limit = min((2 ** (modulus_bits - 1) - 1) // max_clients, FLOAT64_EXACT_INT - 2)  # largest allowed ceil(W c s)
    exponent = math.floor(math.log2(limit / (max_weight * clip_range)))
    while exponent > -60 and math.ceil(max_weight * clip_range * 2.0**exponent) + 1 > limit:
        exponent -= 1
    return float(2.0**exponent)


@dataclass(frozen=True)
class CkksConfig:
    """Parameters of CKKS (TenSEAL) aggregation.

    Attributes:
        poly_modulus_degree: ring degree N (a power of two in SEAL's table); N/2 slots per ciphertext.
        coeff_mod_bit_sizes: bit sizes of the coefficient-modulus primes; the last is SEAL's special prime,
            the others form the ciphertext modulus. Their sum must stay within the 128-bit bound for N.
        scale_bits: log2 of the CKKS scale for unpacked (float) encoding.
        pack: values per CKKS slot. 1 encrypts floats directly; k >= 2 quantizes each value to a
            ``lane_bits``-bit lane and packs k lanes into one integer per slot (see :mod:`secagg.ckks`).
        lane_bits: width of one packed lane, including the log2(n) headroom for the sum over clients.
        clip_range: values are clipped to [-clip_range, clip_range] before encoding, bounding the sum within
            the CKKS headroom (float mode) or the lane range (packed mode).
        packed_scale_bits: log2 of the CKKS scale in packed mode (integers need only ~2**20 of precision).
        max_clients: most clients one aggregate may sum; sizes the headroom so the sum cannot overflow.
        max_weight: largest integer client weight (sample count); updates are multiplied by it before
        encryption. symmetric: encrypt with the (shared) secret key, which is ~2x faster than public-key
        encryption and
            gives ciphertexts of the same size; the server then holds no key at all.
        n_threads: threads used to encrypt/serialize the ciphertexts of one vector in parallel.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60)
    scale_bits: int = 40
    pack: int = 1
    lane_bits: int = 17
    clip_range: float = 1.0
    packed_scale_bits: int = 22
    max_clients: int = 64
    max_weight: int = 1
    symmetric: bool = True
    n_threads: int = 2

    def __post_init__(self) -> None:
        for name in ("max_clients", "max_weight", "n_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"CkksConfig.{name} must be an int >= 1, got {value!r}")
        n = self.poly_modulus_degree
        if n not in SEAL_128_BIT_MAX_COEFF_BITS:
            raise ConfigError(
                f"CkksConfig.poly_modulus_degree must be one of {sorted(SEAL_128_BIT_MAX_COEFF_BITS)}, got {n!r}"
            )
        chain = tuple(self.coeff_mod_bit_sizes)
        object.__setattr__(self, "coeff_mod_bit_sizes", chain)
        if len(chain) < 2 or any((not isinstance(b, int)) or b < 20 or b > 60 for b in chain):
            raise ConfigError(
                f"CkksConfig.coeff_mod_bit_sizes must hold >= 2 ints in [20, 60], got {self.coeff_mod_bit_sizes!r}"
            )
        if sum(chain) > SEAL_128_BIT_MAX_COEFF_BITS[n]:
            raise ConfigError(
                f"CkksConfig.coeff_mod_bit_sizes sum to {sum(chain)} bits, above the 128-bit security bound "
                f"{SEAL_128_BIT_MAX_COEFF_BITS[n]} for poly_modulus_degree={n}"
            )
        data_bits = sum(chain[:-1])
        if not (10 <= self.scale_bits < data_bits):
            raise ConfigError(
                f"CkksConfig.scale_bits must be in [10, {data_bits}) (the ciphertext modulus), got {self.scale_bits!r}"
            )
        if isinstance(self.pack, bool) or not isinstance(self.pack, int) or self.pack < 1:
            raise ConfigError(f"CkksConfig.pack must be an int >= 1, got {self.pack!r}")
        if not (isinstance(self.lane_bits, int) and 4 <= self.lane_bits <= 52):
            raise ConfigError(f"CkksConfig.lane_bits must be an int in [4, 52], got {self.lane_bits!r}")
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ConfigError(f"CkksConfig.clip_range must be finite and > 0, got {self.clip_range!r}")
        if self.pack > 1:
            slot_bits = self.pack * self.lane_bits
            # Exact integers in the decoded double need slot_bits < 53 with margin for CKKS noise (~2**-10).
            if slot_bits > 46:
                raise ConfigError(
                    f"CkksConfig: pack*lane_bits = {slot_bits} > 46 bits: float64 decoding could not "
                    "recover the "
                    "packed integers exactly"
                )
            if slot_bits + self.packed_scale_bits >= data_bits - 1:
                raise ConfigError(
                    f"CkksConfig: pack*lane_bits + packed_scale_bits = {slot_bits + self.packed_scale_bits} "
                    "must be "
                    f"below the ciphertext modulus bits - 1 = {data_bits - 1}"
                )

        if self.pack == 1:
            headroom_bits = data_bits - self.scale_bits - 2
            if self.max_clients * self.max_weight * self.clip_range >= 2.0**headroom_bits:
                raise ConfigError(
                    f"CkksConfig: max_clients*max_weight*clip_range = "
                    f"{self.max_clients * self.max_weight * self.clip_range:g} does not fit the "
                    f"2**{headroom_bits} "
                    "headroom of the ciphertext modulus above the scale"
                )
        elif self.lane_half_range() < 1:
            raise ConfigError(
                f"CkksConfig: lane_bits={self.lane_bits} leaves no room for {self.max_clients} clients "
                "(need 2 * max_clients < 2**lane_bits)"
            )

    def lane_half_range(self) -> int:
        """Packed mode: Q = floor((2**lane_bits - 1) / (2 * max_clients)); one client's lane lies in [0,
        2Q]."""
        return (2**self.lane_bits - 1) // (2 * self.max_clients)

    def quantization_scale(self) -> float:
        """Packed mode: fixed-point scale s = Q / (max_weight * clip_range), so |w * x * s| <= Q."""
        return self.lane_half_range() / (self.max_weight * self.clip_range)

    @property
    def slots(self) -> int:
        """Number of CKKS slots per ciphertext (N/2)."""
        return self.poly_modulus_degree // 2


def masking_config_from_mapping(values: Mapping[str, Any]) -> MaskingConfig:
    """Build a :class:`MaskingConfig` from a flat mapping (a run config), rejecting unknown keys."""
    return _from_mapping(MaskingConfig, values)


def ckks_config_from_mapping(values: Mapping[str, Any]) -> CkksConfig:
    """Build a :class:`CkksConfig` from a flat mapping (a run config), rejecting unknown keys."""
    values = dict(values)
    if "coeff_mod_bit_sizes" in values:
        values["coeff_mod_bit_sizes"] = tuple(values["coeff_mod_bit_sizes"])
    return _from_mapping(CkksConfig, values)


def _from_mapping(cls: Any, values: Mapping[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}; known keys are {sorted(known)}")
    return cls(**values)
