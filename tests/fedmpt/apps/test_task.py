"""The task behind the Flower apps: FedAvg aggregation, config validation, client data, determinism."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmpt.apps import task
from fedmpt.errors import ConfigError


@pytest.fixture
def config(small_task: dict[str, Any]) -> task.TaskConfig:
    return task.task_config_from({**small_task, "method": "promptfl", "num-clients": 3})


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


def test_initial_arrays_are_the_methods_seeded_init_and_survive_training(config: task.TaskConfig) -> None:
    first = task.initial_arrays(config, 3)
    data = task.load_client_data(config, 1, 3, 3)
    new, n, metrics = task.client_update(first, data, config, seed=7, run_seed=3)
    assert n == len(data.train) == 16 and np.isfinite(metrics["train_loss"])
    assert any(not np.array_equal(new[k], first[k]) for k in first)
    again = task.initial_arrays(config, 3)  # training the cached module must not change the initial state
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])


def test_client_update_is_a_function_of_its_inputs(config: task.TaskConfig) -> None:
    start = task.initial_arrays(config, 3)
    data = task.load_client_data(config, 0, 3, 3)
    a, _, _ = task.client_update(start, data, config, seed=task.client_seed(3, 2, 0), run_seed=3)
    b, _, _ = task.client_update(start, data, config, seed=task.client_seed(3, 2, 0), run_seed=3)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert task.client_seed(3, 2, 0) != task.client_seed(3, 2, 1) != task.client_seed(3, 3, 1)


def test_client_data_follow_the_partition_and_check_the_client_count(config: task.TaskConfig) -> None:
    d0 = task.load_client_data(config, 0, 3, 3)
    d1 = task.load_client_data(config, 1, 3, 3)
    assert not np.array_equal(d0.train.labels, d1.train.labels)
    with pytest.raises(ConfigError, match="num-partitions=4 differs"):
        task.load_client_data(config, 0, 4, 3)
    with pytest.raises(ConfigError, match="partition-id"):
        task.load_client_data(config, 3, 3, 3)


def test_global_evaluation_reports_both_test_splits(config: task.TaskConfig) -> None:
    arrays = task.initial_arrays(config, 3)
    metrics = task.evaluate(arrays, task.load_global_test(config, 3), config, run_seed=3)
    assert {"mAP", "CF1", "OF1", "iid-mAP", "iid-CF1", "iid-OF1"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("mAP", "iid-mAP"))


def test_bad_task_config_is_rejected() -> None:
    with pytest.raises(ConfigError, match="method"):
        task.task_config_from({"method": "nope"})
    with pytest.raises(ConfigError, match="dataset"):
        task.task_config_from({"dataset": "imagenet"})


def test_method_options_set_the_method_hyperparameters(small_task: dict[str, Any]) -> None:
    """``method-options`` reaches the built method: adapter rank 40 instead of 32 adds 5 conditions x 8 ranks x
    (128 + 128) parameters (down and up projections)."""
    base = task.task_config_from({**small_task, "method": "fedmpt"})
    wider = task.task_config_from({**small_task, "method": "fedmpt", "method-options": "adapter_rank=40"})
    sizes = [sum(a.size for a in task.initial_arrays(c, 0).values()) for c in (base, wider)]
    assert sizes[1] - sizes[0] == 5 * 8 * 2 * 128
    assert task.method_config("adapter_rank=40, differentiable_plan=true, logit_scale=10") == task.MethodConfig(
        adapter_rank=40, differentiable_plan=True, logit_scale=10.0
    )


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("adapter_rnak=8", "unknown option 'adapter_rnak'"),
        ("init_seed=3", "unknown option 'init_seed'"),
        ("adapter_rank=0", "method-options.*adapter_rank must be >= 1"),
        ("adapter_rank=2.5", "method-options.*adapter_rank must be an integer"),
        ("differentiable_plan=maybe", "differentiable_plan must be true or false"),
        ("adapter_rank", "not name=value"),
    ],
)
def test_bad_method_options_are_named(small_task: dict[str, Any], text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        task.task_config_from({**small_task, "method-options": text})
