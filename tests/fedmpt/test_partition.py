"""Tests of fedmpt.partition: coverage, determinism, the clustering/Dirichlet/masking schemes, bad arguments.

Statistical checks use fixed seeds (so they are deterministic) and bounds of 6 binomial standard deviations,
a false-positive rate below 1e-8 per bound for a correct implementation under any seed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmpt.errors import ConfigError, DatasetError
from fedmpt.partition import (
    MaskMode,
    Partition,
    dirichlet_partition,
    fit_label_clusters,
    label_cluster_features,
    mask_partial_labels,
    sample_participants,
)


def random_labels(n: int, n_classes: int, seed: int, p_positive: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n, n_classes)) < p_positive).astype(np.int8)


def assert_exact_cover(partition: Partition, n: int) -> None:
    """Independent coverage check: every image index appears exactly once over all clients."""
    counts = np.zeros(n, dtype=int)
    for indices in partition.client_indices:
        for i in indices.tolist():
            counts[i] += 1
    assert counts.tolist() == [1] * n


# ------------------------------------------------------------------------------------------- Partition


def test_partition_from_assignment_round_trip() -> None:
    assignment = np.array([2, 0, 2, 1, 0])
    partition = Partition.from_assignment(assignment, 4)
    assert [ix.tolist() for ix in partition.client_indices] == [[1, 4], [3], [0, 2], []]
    assert partition.sizes() == (2, 1, 2, 0)
    np.testing.assert_array_equal(partition.assignment(), assignment)
    assert not partition.client_indices[0].flags.writeable


@pytest.mark.parametrize(
    ("indices", "n", "message"),
    [
        (([0, 1], [1, 2]), 3, "repeated"),
        (([0], [2]), 3, "missing"),
        (([0, 1], [2, 3]), 3, "out of range"),
    ],
)
def test_partition_rejects_non_partitions(indices: tuple[list[int], ...], n: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Partition(tuple(np.array(ix) for ix in indices), n)


def test_partition_summary_matches_loop() -> None:
    labels = np.array([[1, 0], [1, 1], [0, -1], [0, 1]], dtype=np.int8)
    partition = Partition((np.array([0, 2]), np.array([1, 3])), 4)
    summary = partition.summary(labels)
    assert summary.sizes == (2, 2)
    # Client 0: images 0, 2 -> class 0 positive in 1 of 2, class 1 in 0 of 2; client 1: 1 of 2, 2 of 2.
    np.testing.assert_allclose(summary.positive_frequency, [[0.5, 0.0], [0.5, 1.0]])
    assert summary.to_dict() == {"sizes": [2, 2], "positive_frequency": [[0.5, 0.0], [0.5, 1.0]]}


# ------------------------------------------------------------------------------------------- label clusters


def test_label_cluster_features_are_softmax_of_multi_hot() -> None:
    features = label_cluster_features(np.array([[1, 0, 0], [1, -1, 1]], dtype=np.int8))
    e = math.e
    np.testing.assert_allclose(features[0], [e / (e + 2), 1 / (e + 2), 1 / (e + 2)])
    np.testing.assert_allclose(features[1], [e / (2 * e + 1), 1 / (2 * e + 1), e / (2 * e + 1)])


def test_label_clusters_recover_separated_groups() -> None:
    groups = [np.array([1, 1, 0, 0, 0]), np.array([0, 0, 1, 1, 0]), np.array([0, 0, 0, 0, 1])]
    rng = np.random.default_rng(3)
    group_of = rng.integers(0, 3, size=60)
    labels = np.stack([groups[g] for g in group_of]).astype(np.int8)
    model = fit_label_clusters(labels, 3, seed=0)
    # Each client must hold exactly one group (client numbering is arbitrary).
    clients = {frozenset(group_of[ix].tolist()) for ix in model.train_partition.client_indices}
    assert clients == {frozenset({0}), frozenset({1}), frozenset({2})}


def test_label_clusters_cover_and_are_deterministic() -> None:
    labels = random_labels(200, 6, seed=1)
    first = fit_label_clusters(labels, 5, seed=7)
    assert_exact_cover(first.train_partition, 200)
    assert min(first.train_partition.sizes()) > 0
    assert fit_label_clusters(labels, 5, seed=7).train_partition == first.train_partition
    others = [fit_label_clusters(labels, 5, seed=s, n_init=1).train_partition for s in range(8, 12)]
    assert any(other != first.train_partition for other in others)


def test_label_cluster_assign_predicts_nearest_centre_not_index() -> None:
    train = random_labels(150, 5, seed=2)
    test = random_labels(40, 5, seed=3)
    model = fit_label_clusters(train, 4, seed=0)
    assigned = model.assign(test)
    assert_exact_cover(assigned, 40)
    # Independent nearest-centre rule on independently computed softmax features.
    exp = np.exp((test == 1).astype(float))
    features = exp / exp.sum(axis=1, keepdims=True)
    distances = ((features[:, None, :] - model.centers[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_array_equal(assigned.assignment(), distances.argmin(axis=1))
    # Row order of the test split must not matter (the authors' index-aligned bug would fail this).
    order = np.random.default_rng(0).permutation(40)
    np.testing.assert_array_equal(model.assign(test[order]).assignment(), assigned.assignment()[order])
    # The training split itself is routed exactly as the training partition.
    assert model.assign(train) == model.train_partition


def test_label_clusters_reject_more_clients_than_distinct_vectors() -> None:
    labels = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [1, 0]], dtype=np.int8)
    with pytest.raises(ConfigError, match="num_clients=3 exceeds the 2 distinct"):
        fit_label_clusters(labels, 3, seed=0)


@pytest.mark.parametrize("num_clients", [0, 6, True])
def test_label_clusters_reject_bad_num_clients(num_clients: int) -> None:
    with pytest.raises(ConfigError, match="num_clients"):
        fit_label_clusters(random_labels(5, 3, seed=0), num_clients, seed=0)


def test_label_clusters_reject_wrong_class_count_on_assign() -> None:
    model = fit_label_clusters(random_labels(30, 4, seed=0), 2, seed=0)
    with pytest.raises(DatasetError, match="5 classes"):
        model.assign(random_labels(3, 5, seed=1))


# ------------------------------------------------------------------------------------------- Dirichlet


@settings(max_examples=30, deadline=None)
@given(
    # Ranges where one draw succeeds with probability >= 0.35 (measured), so 100 tries never run out.
    n=st.integers(20, 80),
    n_classes=st.integers(1, 6),
    num_clients=st.integers(1, 5),
    alpha=st.sampled_from([0.5, 1.0, 10.0]),
    seed=st.integers(0, 2**32),
)
def test_dirichlet_covers_with_non_empty_clients(
    n: int, n_classes: int, num_clients: int, alpha: float, seed: int
) -> None:
    labels = random_labels(n, n_classes, seed=seed % 1000)
    partition = dirichlet_partition(labels, num_clients, alpha, seed=seed)
    assert partition.num_clients == num_clients
    assert_exact_cover(partition, n)
    assert min(partition.sizes()) >= 1
    assert dirichlet_partition(labels, num_clients, alpha, seed=seed) == partition


def test_numpy_scalars_are_accepted() -> None:
    labels = random_labels(30, 3, seed=0)
    partition = dirichlet_partition(labels, np.int64(3), np.float32(1.0), seed=np.int64(4))  # type: ignore[arg-type]
    assert partition == dirichlet_partition(labels, 3, 1.0, seed=4)
    masked = mask_partial_labels(labels, np.float64(0.5), seed=1)
    np.testing.assert_array_equal(masked, mask_partial_labels(labels, 0.5, seed=1))


def test_dirichlet_different_seeds_differ() -> None:
    labels = random_labels(100, 5, seed=0)
    first = dirichlet_partition(labels, 4, 0.5, seed=0)
    assert dirichlet_partition(labels, 4, 0.5, seed=1) != first


def test_dirichlet_small_alpha_puts_each_class_on_one_client() -> None:
    # Single-label data: class c is image i's only positive, so its primary class is c for sure.
    n_classes, n = 8, 400
    classes = np.arange(n) % n_classes
    labels = np.eye(n_classes, dtype=np.int8)[classes]
    assignment = dirichlet_partition(labels, 3, 1e-3, seed=5).assignment()
    for c in range(n_classes):
        largest_share = np.bincount(assignment[classes == c], minlength=3).max() / np.sum(classes == c)
        assert largest_share == 1.0, c


@pytest.mark.statistical
def test_dirichlet_large_alpha_is_close_to_iid() -> None:
    """Each client size ~ Binomial(n, 1/K) as alpha -> inf; 6-sd bounds, FPR < 1e-8 per client."""
    n, k = 4000, 4
    labels = random_labels(n, 5, seed=4)
    sizes = np.array(dirichlet_partition(labels, k, 1e6, seed=9).sizes())
    sd = math.sqrt(n * (1 / k) * (1 - 1 / k))
    assert np.all(np.abs(sizes - n / k) < 6 * sd), sizes


def test_dirichlet_images_without_positives_are_distributed() -> None:
    labels = np.zeros((30, 3), dtype=np.int8)
    partition = dirichlet_partition(labels, 3, 100.0, seed=0)
    assert_exact_cover(partition, 30)


def test_dirichlet_gives_up_after_max_tries() -> None:
    # Ten clients of at least one image each from ten images at alpha 0.01: essentially never.
    with pytest.raises(ConfigError, match="max_tries=5"):
        dirichlet_partition(random_labels(10, 2, seed=0), 10, 0.01, seed=0, max_tries=5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"num_clients": 0}, "num_clients"),
        ({"num_clients": 21}, "num_clients"),
        ({"min_size": 5, "num_clients": 5}, "min_size=5"),
        ({"max_tries": 0}, "max_tries"),
        ({"seed": -1}, "seed"),
    ],
)
def test_dirichlet_rejects_bad_arguments(kwargs: dict[str, float], message: str) -> None:
    arguments: dict[str, float] = {"num_clients": 2, "alpha": 1.0, "seed": 0} | kwargs
    with pytest.raises(ConfigError, match=message):
        dirichlet_partition(random_labels(20, 3, seed=0), **arguments)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- partial labels


def test_mask_changes_only_positives_and_copies() -> None:
    labels = np.array([[1, 0, -1, 1], [0, 1, 1, -1]], dtype=np.int8)
    original = labels.copy()
    masked = mask_partial_labels(labels, 0.5, seed=3)
    np.testing.assert_array_equal(labels, original)
    changed = masked != labels
    assert np.all(labels[changed] == 1) and np.all(masked[changed] == -1)
    np.testing.assert_array_equal(mask_partial_labels(labels, 0.0, seed=3), labels)


def test_mask_modes_hide_the_same_positions() -> None:
    labels = random_labels(200, 10, seed=5)
    as_unknown = mask_partial_labels(labels, 0.4, seed=11, mode="unknown")
    as_negative = mask_partial_labels(labels, 0.4, seed=11, mode=MaskMode.NEGATIVE)
    np.testing.assert_array_equal(as_unknown == -1, (labels == 1) & (as_negative == 0))
    assert not np.any(as_negative == -1)
    np.testing.assert_array_equal(mask_partial_labels(labels, 0.4, seed=11), as_unknown)
    assert not np.array_equal(mask_partial_labels(labels, 0.4, seed=12), as_unknown)


@pytest.mark.statistical
def test_mask_rate_matches_rho() -> None:
    """Hidden count ~ Binomial(#positives, rho); 6-sd bound, FPR < 1e-8."""
    labels = random_labels(2000, 50, seed=6)
    n_positive = int(np.sum(labels == 1))
    for rho in (0.1, 0.5, 0.9):
        hidden = int(np.sum(mask_partial_labels(labels, rho, seed=1) == -1))
        assert abs(hidden - rho * n_positive) < 6 * math.sqrt(n_positive * rho * (1 - rho)), rho


@pytest.mark.parametrize(
    ("rho", "mode", "message"), [(1.0, "unknown", "rho"), (-0.1, "unknown", "rho"), (0.1, "drop", "mode")]
)
def test_mask_rejects_bad_arguments(rho: float, mode: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        mask_partial_labels(random_labels(3, 3, seed=0), rho, seed=0, mode=mode)


# ------------------------------------------------------------------------------------------- participation


@pytest.mark.parametrize(
    ("num_clients", "fraction", "min_clients", "expected_count"),
    [(10, 0.3, 1, 3), (100, 0.29, 1, 29), (10, 0.05, 2, 2), (7, 1.0, 1, 7), (10, 0.1, 1, 1)],
)
def test_participant_count(num_clients: int, fraction: float, min_clients: int, expected_count: int) -> None:
    chosen = sample_participants(num_clients, fraction, 3, 42, min_clients=min_clients)
    assert len(chosen) == expected_count
    assert chosen == sorted(set(chosen)) and all(0 <= k < num_clients for k in chosen)


def test_participants_deterministic_per_seed_and_round() -> None:
    assert sample_participants(20, 0.25, 5, 1) == sample_participants(20, 0.25, 5, 1)
    rounds = {tuple(sample_participants(20, 0.25, r, 1)) for r in range(10)}
    seeds = {tuple(sample_participants(20, 0.25, 5, s)) for s in range(10)}
    assert len(rounds) > 1 and len(seeds) > 1


@pytest.mark.statistical
def test_participation_is_uniform() -> None:
    """Inclusion count of each client ~ Binomial(rounds, m/n); 6-sd bounds, FPR < 1e-7 over 10 clients."""
    n, rounds = 10, 3000
    counts = np.zeros(n)
    for r in range(rounds):
        counts[sample_participants(n, 0.3, r, 0)] += 1
    sd = math.sqrt(rounds * 0.3 * 0.7)
    assert np.all(np.abs(counts - 0.3 * rounds) < 6 * sd), counts


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 0.5, 0, 0), "num_clients"),
        ((10, 0.0, 0, 0), "fraction"),
        ((10, 1.5, 0, 0), "fraction"),
        ((10, 0.5, -1, 0), "round"),
        ((10, 0.5, 0, -3), "seed"),
    ],
)
def test_participants_reject_bad_arguments(args: tuple[int, float, int, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sample_participants(*args)


def test_participants_reject_min_clients_above_num_clients() -> None:
    with pytest.raises(ConfigError, match="min_clients"):
        sample_participants(3, 0.5, 0, 0, min_clients=4)
