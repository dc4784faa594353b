"""Fixed-point encoding: exact decode of representable inputs, stated error bound, unbiasedness, overflow
check."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedmpt.errors import ConfigError
from secagg.config import MaskingConfig
from secagg.encoding import (
    check_capacity,
    clip_range_from_dp,
    decode_sum,
    encode,
    quantization_error_bound,
    scale_for_error,
    to_signed,
)
from secagg.errors import OverflowRisk, ProtocolError


def _sum(words: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(words[0])
    for w in words:
        total += w
    return total


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([32, 64]),
    n=st.integers(1, 8),
    d=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_decoded_weighted_mean_within_bound(bits: int, n: int, d: int, seed: int) -> None:
    cfg = MaskingConfig(threshold=2, modulus_bits=bits, clip_range=2.0, scale=2.0**12, max_weight=50)
    rng = np.random.default_rng(seed)
    xs = rng.uniform(-3, 3, size=(n, d))
    ws = rng.integers(1, 51, size=n)
    total = _sum([encode(xs[i], int(ws[i]), cfg) for i in range(n)])
    mean, weight = decode_sum(total, cfg, n)
    clipped = np.clip(xs, -2.0, 2.0)
    exact = (ws[:, None] * clipped).sum(axis=0) / ws.sum()
    assert weight == int(ws.sum())
    bound = quantization_error_bound(cfg, n, weight)
    assert bound == pytest.approx(n / (2.0**12 * ws.sum()))
    assert np.max(np.abs(mean - exact)) < bound


def test_representable_inputs_are_exact_and_negative_values_wrap() -> None:
    cfg = MaskingConfig(threshold=2, modulus_bits=32, clip_range=1.0, scale=8.0)
    x = np.array([-1.0, -0.125, 0.0, 0.5])
    e = encode(x, 1, cfg)
    assert e.tolist() == [2**32 - 8, 2**32 - 1, 0, 4, 1]
    assert to_signed(e, 32).tolist() == [-8, -1, 0, 4, 1]


@pytest.mark.statistical
def test_stochastic_rounding_is_unbiased() -> None:
    """Mean rounding error of 20000 encodings of 0.3/s is 0 (t-test, false-positive rate 1e-6)."""
    cfg = MaskingConfig(threshold=2, scale=1.0, clip_range=10.0)
    x = np.full(20_000, 0.3)
    e = to_signed(encode(x, 1, cfg)[:-1], 32)
    assert set(np.unique(e).tolist()) == {0, 1}
    assert stats.ttest_1samp(e - 0.3, 0.0).pvalue > 1e-6


def test_rounding_seed_makes_encoding_reproducible() -> None:
    cfg = MaskingConfig(threshold=2, scale=3.0)
    x = np.linspace(-1, 1, 17)
    assert np.array_equal(encode(x, 1, cfg, bytes(32)), encode(x, 1, cfg, bytes(32)))


def test_capacity_matches_independent_formula_and_overflow_really_wraps() -> None:
    cfg = MaskingConfig(threshold=2, modulus_bits=32, clip_range=1.0, scale=2.0**20, max_weight=4)
    per_client = 4 * 2**20
    assert cfg.max_clients() == (2**31 - 1) // per_client == 511
    check_capacity(cfg, 511)
    with pytest.raises(OverflowRisk, match="512 clients"):
        check_capacity(cfg, 512)
    # Without the check, 512 clients at the extreme value would wrap to a negative sum.
    e = encode(np.ones(1), 4, cfg)
    total = _sum([e] * 512)
    assert to_signed(total, 32)[0] < 0


def test_decode_rejects_corrupted_weight() -> None:
    cfg = MaskingConfig(threshold=2)
    with pytest.raises(ProtocolError, match="total weight"):
        decode_sum(np.array([5, 12345], dtype=np.uint32), cfg, 2)


def test_clip_range_from_dp_matches_normal_quantile() -> None:
    c = clip_range_from_dp(1.0, 0.5, clip_probability=1e-6)
    assert c == pytest.approx(1.0 + stats.norm.isf(0.5e-6) * 0.5, rel=1e-9)
    assert clip_range_from_dp(2.0, 0.0) == 2.0
    assert scale_for_error(1e-3) == 1024.0 and 1 / scale_for_error(1e-3) <= 1e-3
    with pytest.raises(ConfigError, match="clip_norm"):
        clip_range_from_dp(-1.0, 1.0)


def test_encode_rejects_bad_input() -> None:
    cfg = MaskingConfig(threshold=2, max_weight=3)
    with pytest.raises(ConfigError, match="non-finite"):
        encode(np.array([1.0, math.nan]), 1, cfg)
    with pytest.raises(ConfigError, match="flat"):
        encode(np.zeros((2, 2)), 1, cfg)
    with pytest.raises(ConfigError, match="weight"):
        encode(np.zeros(2), 4, cfg)


def test_config_validation_names_the_bad_value() -> None:
    with pytest.raises(ConfigError, match="threshold"):
        MaskingConfig(threshold=1)
    with pytest.raises(ConfigError, match="neighbourhood_size"):
        MaskingConfig(threshold=2, neighbourhood_size=3)
    with pytest.raises(ConfigError, match="below threshold"):
        MaskingConfig(threshold=5, neighbourhood_size=4)
    with pytest.raises(ConfigError, match="modulus_bits"):
        MaskingConfig(threshold=2, modulus_bits=16)
    with pytest.raises(ConfigError, match="2\\*\\*53"):
        MaskingConfig(threshold=2, modulus_bits=64, scale=2.0**60)
    with pytest.raises(ConfigError, match="clients fit"):
        MaskingConfig(threshold=4, modulus_bits=32, scale=2.0**30)


def test_configs_from_run_config_mappings() -> None:
    from secagg.config import CkksConfig, ckks_config_from_mapping, masking_config_from_mapping

    cfg = masking_config_from_mapping({"threshold": 3, "neighbourhood_size": 4, "modulus_bits": 64})
    assert cfg == MaskingConfig(threshold=3, neighbourhood_size=4, modulus_bits=64)
    with pytest.raises(ConfigError, match="unknown MaskingConfig keys \\['thresh'\\]"):
        masking_config_from_mapping({"thresh": 3})
    assert ckks_config_from_mapping({"coeff_mod_bit_sizes": [60, 40, 60]}) == CkksConfig(
        coeff_mod_bit_sizes=(60, 40, 60)
    )
