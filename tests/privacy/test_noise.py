"""The CSPRNG noise source of DP-SGD (privacy.noise): distribution, independence from any seed, the release."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from privacy.dpsgd import DPConfig, GaussianRelease, make_generator
from privacy.errors import PrivacyParameterError
from privacy.noise import NoiseSource, csprng_normal, csprng_uniform, gaussian, poisson_mask


@pytest.mark.statistical
def test_csprng_normals_are_standard_normal() -> None:
    """Kolmogorov-Smirnov against N(0, 1) on 200k draws; false-positive rate 1e-4 (fixed by the test level)."""
    draws = csprng_normal(200_000)
    assert stats.kstest(draws, "norm").pvalue > 1e-4
    assert abs(draws.mean()) < 5 * 1 / math.sqrt(draws.size) and abs(draws.var() - 1) < 0.02


def test_csprng_uniforms_are_in_the_half_open_unit_interval_with_53_bits() -> None:
    u = csprng_uniform(100_000)
    assert u.dtype == np.float64 and (u > 0).all() and (u <= 1).all()
    assert len(np.unique(u)) == u.size  # 53 random bits: no collisions at this size
    assert stats.kstest(u, "uniform").pvalue > 1e-4


def test_no_seed_means_fresh_noise_and_a_seed_means_reproducible_noise() -> None:
    assert not torch.equal(gaussian((64,), 1.0, None), gaussian((64,), 1.0, None))
    assert torch.equal(gaussian((64,), 1.0, make_generator(7)), gaussian((64,), 1.0, make_generator(7)))
    assert gaussian((3, 4), 0.0, None).abs().sum() == 0 and gaussian((3, 4), 2.0, None).dtype == torch.float32
    with pytest.raises(PrivacyParameterError):
        gaussian((3,), -1.0, None)
    assert DPConfig(noise_multiplier=1.0).noise_source is NoiseSource.OS_URANDOM
    assert DPConfig(noise_multiplier=1.0, seed=3).noise_source is NoiseSource.TORCH_SEEDED


@pytest.mark.statistical
def test_poisson_batches_from_the_csprng_include_each_record_with_probability_q() -> None:
    """Binomial check of the inclusion count of every record over 2000 batches (6-sigma band: ~1e-9 per record)."""
    n, q, batches = 50, 0.2, 2000
    counts = np.zeros(n)
    for _ in range(batches):
        counts[poisson_mask(n, q, None).numpy()] += 1
    sd = math.sqrt(batches * q * (1 - q))
    assert np.all(np.abs(counts - batches * q) < 6 * sd)


@pytest.mark.statistical
def test_the_release_adds_noise_of_std_z_c_over_b_from_the_csprng() -> None:
    """GaussianRelease with generator=None: mean = clipped sum / B, std = z C / B (chi-square band, ~1e-6)."""
    z, clip, batch, d = 1.5, 0.5, 4, 20_000
    release = GaussianRelease({"w": (d,)}, noise_multiplier=z, max_grad_norm=clip, expected_batch_size=batch,
                              generator=None)  # fmt: skip
    per_sample = {"w": torch.zeros(3, d)}
    out = release.release(per_sample)["w"].double()
    expected = z * clip / batch
    assert abs(float(out.std()) / expected - 1) < 6 * math.sqrt(1 / (2 * d))
    assert abs(float(out.mean())) < 6 * expected / math.sqrt(d)
    assert release.noise_std == pytest.approx(z * clip)
