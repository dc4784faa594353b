"""Randomness of DP-SGD: Gaussian noise and Poisson sampling from the operating system's CSPRNG by default.

Two sources, recorded in every ledger entry (``noise_source``):

* ``os-urandom`` (default): every random bit comes from :func:`os.urandom` (the kernel's CSPRNG). Uniforms have
  53 random bits, in ``(0, 1]``; Gaussians come from the Box-Muller transform in float64, and each released
  Gaussian is the normalised sum of two of them, ``(g1 + g2) / sqrt(2)`` (the mitigation Opacus's ``secure_mode``
  applies, which makes the low-order bits of one Box-Muller sample harder to exploit). An observer of the
  released values cannot predict or replay the noise, whatever it learns about earlier outputs.
* ``torch-seeded``: ``torch``'s Mersenne Twister from an integer seed. Reproducible, hence predictable to anyone
  who knows the seed: tests and experiments only.

What is *not* covered: the floating-point attacks on the Gaussian mechanism (Mironov 2012 for Laplace; Jin et al.
2022 for Gaussians) exploit the set of doubles a sampler can produce. The two-sample sum narrows that gap but does
not close it the way a discrete Gaussian over a fixed grid would.
"""

from __future__ import annotations

import math
import os
from enum import StrEnum

import numpy as np
import torch
from torch import Tensor

from privacy.errors import PrivacyParameterError

__all__ = ["NoiseSource", "csprng_normal", "csprng_uniform", "gaussian", "poisson_mask"]

_TWO_POW_53 = float(2**53)


class NoiseSource(StrEnum):
    """Where DP-SGD's random numbers come from (recorded in the ledger)."""

    OS_URANDOM = "os-urandom"
    TORCH_SEEDED = "torch-seeded"


def csprng_uniform(count: int) -> np.ndarray:
    """``count`` float64 uniforms in ``(0, 1]`` with 53 bits each, from :func:`os.urandom`."""
    if count < 0:
        raise PrivacyParameterError(f"count must be >= 0, got {count}")
    words = np.frombuffer(os.urandom(8 * count), dtype=np.uint64) >> np.uint64(11)
    return (words.astype(np.float64) + 1.0) / _TWO_POW_53


def csprng_normal(count: int) -> np.ndarray:
    """``count`` standard normals: the mean-preserving sum ``(g1 + g2) / sqrt(2)`` of two Box-Muller normals."""
    u1, u2 = csprng_uniform(count), csprng_uniform(count)  # count Box-Muller pairs: 2 * count normals
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * math.pi * u2
    return (radius * np.cos(angle) + radius * np.sin(angle)) / math.sqrt(2.0)


def gaussian(shape: torch.Size | tuple[int, ...], std: float, generator: torch.Generator | None) -> Tensor:
    """A float32 tensor of ``N(0, std^2)`` noise: from the CSPRNG when ``generator`` is None, else from it."""
    if not (math.isfinite(std) and std >= 0):
        raise PrivacyParameterError(f"noise std must be finite and >= 0, got {std!r}")
    if generator is not None:
        return torch.normal(0.0, std, size=tuple(shape), generator=generator)
    count = math.prod(shape)
    return torch.from_numpy(csprng_normal(count) * std).to(torch.float32).reshape(tuple(shape))


def poisson_mask(num_records: int, sample_rate: float, generator: torch.Generator | None) -> Tensor:
    """Indices of the records in one Poisson batch: each independently with probability ``sample_rate``."""
    if generator is not None:
        draws = torch.rand(num_records, generator=generator)
        return torch.nonzero(draws < sample_rate, as_tuple=False).flatten()
    draws_np = csprng_uniform(num_records)
    return torch.from_numpy(np.flatnonzero(draws_np <= sample_rate)).to(torch.long)
