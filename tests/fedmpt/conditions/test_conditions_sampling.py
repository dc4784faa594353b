"""Tests of class-combination sampling: budget, distinctness, weights, and the sampling distribution."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedmpt.conditions import sampling
from fedmpt.conditions.sampling import (
    SamplingConfig,
    combination_weights,
    cooccurrence_counts,
    load_cooccurrence,
    sample_class_combinations,
)
from fedmpt.errors import ConditionsError, ConfigError

CLASSES = tuple(f"c{i}" for i in range(12))


def test_budget_sizes_distinct_and_class_order() -> None:
    combos = sample_class_combinations(CLASSES, SamplingConfig(budget=40), np.random.default_rng(0))
    assert len(combos) == 40
    assert len(set(combos)) == 40
    assert [len(c) for c in combos] == [2] * 20 + [3] * 20  # budget split evenly, grouped by size
    for combo in combos:
        assert list(combo) == sorted(combo, key=CLASSES.index)


def test_deterministic_given_seed() -> None:
    cfg = SamplingConfig(budget=30)
    first = sample_class_combinations(CLASSES, cfg, np.random.default_rng(5))
    assert first == sample_class_combinations(CLASSES, cfg, np.random.default_rng(5))
    assert first != sample_class_combinations(CLASSES, cfg, np.random.default_rng(6))


def test_budget_above_capacity_takes_everything() -> None:
    names = ("a", "b", "c", "d", "e")
    combos = sample_class_combinations(names, SamplingConfig(budget=100), np.random.default_rng(0))
    expected = set(itertools.combinations(names, 2)) | set(itertools.combinations(names, 3))
    assert set(combos) == expected and len(combos) == len(expected) == 20


def test_small_size_passes_leftover_budget_on() -> None:
    names = ("a", "b", "c", "d")  # 6 pairs, 4 triples
    combos = sample_class_combinations(names, SamplingConfig(budget=9), np.random.default_rng(0))
    assert sorted(len(c) for c in combos).count(3) == 4
    assert sorted(len(c) for c in combos).count(2) == 5


def test_sizes_larger_than_class_count() -> None:
    with pytest.raises(ConfigError, match="no combination size"):
        sample_class_combinations(("a", "b"), SamplingConfig(sizes=(3,)), np.random.default_rng(0))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 500), st.lists(st.integers(0, 200), min_size=1, max_size=5))
def test_allocation_properties(budget: int, capacities: list[int]) -> None:
    alloc = sampling._allocate(budget, capacities)
    assert sum(alloc) == min(budget, sum(capacities))
    assert all(0 <= a <= c for a, c in zip(alloc, capacities, strict=True))
    # Even split: a group below its capacity gets at least as much as any other group, minus one.
    for i, (a, c) in enumerate(zip(alloc, capacities, strict=True)):
        if a < c:
            assert all(a >= other - 1 for j, other in enumerate(alloc) if j != i)


def test_cooccurrence_counts_match_loop() -> None:
    rng = np.random.default_rng(3)
    labels = (rng.random((50, 6)) < 0.4).astype(np.int8)
    expected = np.zeros((6, 6), dtype=np.int64)
    for row in labels:
        for i in range(6):
            for j in range(6):
                expected[i, j] += int(row[i] and row[j])
    np.testing.assert_array_equal(cooccurrence_counts(labels), expected)
    with pytest.raises(ConfigError, match="binary"):
        cooccurrence_counts(labels * 2)
    with pytest.raises(ConfigError, match="2-D"):
        cooccurrence_counts(labels[0])


def test_triple_weight_is_min_pair_count() -> None:
    rng = np.random.default_rng(1)
    upper = np.triu(rng.integers(0, 9, size=(5, 5)), 1)
    counts = (upper + upper.T).astype(float)
    combos = np.array(list(itertools.combinations(range(5), 3)), dtype=np.int64)
    weights = combination_weights(combos, counts, smoothing=0.5)
    for (i, j, k), w in zip(combos.tolist(), weights, strict=True):
        assert w == min(counts[i, j], counts[i, k], counts[j, k]) + 0.5


def test_zero_weight_combinations_are_never_sampled() -> None:
    counts = np.zeros((6, 6))
    counts[0, 1] = counts[1, 0] = 4
    counts[2, 3] = counts[3, 2] = 1
    names = tuple("abcdef")
    combos = sample_class_combinations(names, SamplingConfig(budget=50), np.random.default_rng(0), counts)
    assert sorted(combos) == [("a", "b"), ("c", "d")]  # no triple has all three pairs co-occurring
    smoothed = sample_class_combinations(
        names, SamplingConfig(budget=50, smoothing=1.0), np.random.default_rng(0), counts
    )
    assert len(smoothed) == math.comb(6, 2) + math.comb(6, 3)


@pytest.mark.statistical
def test_weighted_draws_follow_successive_sampling() -> None:
    """The ordered first two draws follow P(i, j) = p_i * p_j / (1 - p_i), p = w / sum(w).

    Chi-square goodness of fit over the 30 ordered pairs, 6000 independent trials, rejected at p < 1e-3:
    the false-positive rate of this test is 0.1 %.
    """
    names = ("a", "b", "c", "d")
    counts = np.array([[0, 1, 2, 3], [1, 0, 4, 5], [2, 4, 0, 6], [3, 5, 6, 0]], dtype=float)
    pairs = list(itertools.combinations(names, 2))
    weights = np.array([counts[names.index(x), names.index(y)] for x, y in pairs])
    p = weights / weights.sum()
    cfg = SamplingConfig(budget=2, sizes=(2,))
    observed = np.zeros((6, 6))
    trials = 6000
    seeds = np.random.SeedSequence(2026).spawn(trials)
    for seed in seeds:
        first, second = sample_class_combinations(names, cfg, np.random.default_rng(seed), counts)
        observed[pairs.index(first), pairs.index(second)] += 1
    expected = np.array([[p[i] * p[j] / (1 - p[i]) if i != j else 0.0 for j in range(6)] for i in range(6)])
    mask = ~np.eye(6, dtype=bool)
    _, p_value = stats.chisquare(observed[mask], trials * expected[mask])
    assert p_value > 1e-3


@pytest.mark.statistical
def test_uniform_without_counts() -> None:
    """Without counts every pair is equally likely first: chi-square over 10 pairs, 5000 trials, FPR 0.1 %."""
    names = tuple("abcde")
    pairs = list(itertools.combinations(names, 2))
    cfg = SamplingConfig(budget=1, sizes=(2,))
    observed = np.zeros(len(pairs))
    for seed in np.random.SeedSequence(7).spawn(5000):
        (combo,) = sample_class_combinations(names, cfg, np.random.default_rng(seed))
        observed[pairs.index(combo)] += 1
    _, p_value = stats.chisquare(observed)
    assert p_value > 1e-3


def test_rejection_path_for_huge_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sampling, "MAX_ENUMERATED_COMBINATIONS", 0)
    combos = sample_class_combinations(CLASSES, SamplingConfig(budget=30), np.random.default_rng(0))
    assert len(combos) == len(set(combos)) == 30
    with pytest.raises(ConfigError, match="weighted sampling"):
        sample_class_combinations(CLASSES, SamplingConfig(), np.random.default_rng(0), np.ones((12, 12)))


@pytest.mark.parametrize(
    "kwargs", [{"budget": 0}, {"sizes": (1,)}, {"sizes": ()}, {"sizes": (2, 2)}, {"smoothing": -1.0}]
)
def test_bad_sampling_config(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        SamplingConfig(**kwargs)  # type: ignore[arg-type]


def test_load_cooccurrence(tmp_path: Path) -> None:
    path = tmp_path / "counts.json"
    counts = [[3, 1, 0], [1, 2, 2], [0, 2, 5]]
    path.write_text(json.dumps({"classnames": ["a", "b", "c"], "counts": counts}), encoding="utf-8")
    np.testing.assert_array_equal(load_cooccurrence(path, ["a", "b", "c"]), np.array(counts, dtype=float))
    with pytest.raises(ConditionsError, match="class list differs"):
        load_cooccurrence(path, ["a", "c", "b"])
    path.write_text(json.dumps({"classnames": ["a", "b"], "counts": [[1, 2], [0, 1]]}), encoding="utf-8")
    with pytest.raises(ConditionsError, match="not symmetric"):
        load_cooccurrence(path, ["a", "b"])
    path.write_text(json.dumps({"classnames": ["a", "b"], "counts": [[1, -2], [-2, 1]]}), encoding="utf-8")
    with pytest.raises(ConditionsError, match=">= 0"):
        load_cooccurrence(path, ["a", "b"])
    path.write_text(json.dumps({"classnames": ["a", "b"], "counts": [[1, 2]]}), encoding="utf-8")
    with pytest.raises(ConditionsError, match="shape"):
        load_cooccurrence(path, ["a", "b"])
