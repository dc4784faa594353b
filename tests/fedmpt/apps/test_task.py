"""The stand-in task: FedAvg aggregation, gradient step, metrics, determinism of the data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score

from fedmpt.apps import task
from fedmpt.errors import ConfigError

CFG = task.TaskConfig(local_epochs=1, learning_rate=0.3, num_classes=3, num_features=4, samples_per_client=16)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=1000), min_size=1, max_size=5), st.integers(0, 2**32 - 1))
def test_aggregate_is_the_weighted_mean(weights: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    updates = [({"W": rng.standard_normal((2, 3)).astype(np.float32)}, w) for w in weights]
    expected = sum(u["W"].astype(np.float64) * w for u, w in updates) / sum(weights)
    np.testing.assert_allclose(task.aggregate(updates)["W"], expected, rtol=1e-6, atol=1e-6)


def test_aggregate_rejects_mismatches() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        task.aggregate([])
    with pytest.raises(ConfigError, match="shape"):
        task.aggregate([({"W": np.zeros(2)}, 1), ({"W": np.zeros(3)}, 1)])
    with pytest.raises(ConfigError, match="positive"):
        task.aggregate([({"W": np.zeros(2)}, 0)])


def _loss(w: np.ndarray, b: np.ndarray, data: task.ClientData) -> float:
    p = 1 / (1 + np.exp(-(data.train.x @ w + b)))
    y = data.train.y
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def test_one_local_step_follows_the_numerical_gradient() -> None:
    data = task.load_client_data(CFG, 1, 3, seed=5)
    start = task.initial_arrays(CFG, seed=5)
    new, n, metrics = task.client_update(start, data, CFG)
    assert n == 16
    w, b, eps = start["W"].astype(np.float64), start["b"].astype(np.float64), 1e-6
    # mean BCE over all n*C entries is the loss the code's gradient x^T(p-y)/n is of, up to the factor C
    grad_w = np.zeros_like(w)
    for idx in np.ndindex(w.shape):
        d = np.zeros_like(w)
        d[idx] = eps
        grad_w[idx] = (_loss(w + d, b, data) - _loss(w - d, b, data)) / (2 * eps) * CFG.num_classes
    np.testing.assert_allclose(new["W"], w - CFG.learning_rate * grad_w, rtol=1e-4, atol=1e-5)
    assert metrics["train_loss"] == pytest.approx(_loss(new["W"].astype(np.float64), new["b"], data), rel=1e-5)


def test_evaluate_map_matches_sklearn() -> None:
    split = task.load_global_test(CFG, seed=2)
    arrays = task.initial_arrays(CFG, seed=9)
    scores = split.x @ arrays["W"] + arrays["b"]
    expected = np.mean([average_precision_score(split.y[:, c], scores[:, c]) for c in range(3) if split.y[:, c].any()])
    assert task.evaluate(arrays, split)["mAP"] == pytest.approx(expected, abs=1e-9)


def test_client_data_is_deterministic_and_distinct() -> None:
    a = task.load_client_data(CFG, 0, 2, seed=1)
    b = task.load_client_data(CFG, 0, 2, seed=1)
    c = task.load_client_data(CFG, 1, 2, seed=1)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    assert not np.allclose(a.train.x.mean(0), c.train.x.mean(0))
    with pytest.raises(ConfigError, match="partition-id"):
        task.load_client_data(CFG, 2, 2, seed=1)
