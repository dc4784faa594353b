"""Fixtures shared across test folders."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pytest

# Small synthetic-world sizes that keep Flower-level tests fast (run-config keys of fedmpt.apps.task).
SMALL_TASK: dict[str, Any] = {
    "train-per-client": 16,
    "test-per-client": 8,
    "global-test-size": 24,
    "batch-size": 8,
}


@pytest.fixture
def small_task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run-config entries for a small, fast task whose feature cache lives in a temporary folder."""
    return {**SMALL_TASK, "cache-dir": str(tmp_path_factory.mktemp("feature-cache"))}


@pytest.fixture
def fedavg_oracle() -> Callable[..., dict[str, np.ndarray]]:
    """FedAvg computed without Flower: ``oracle(run_config, partitions, num_partitions, rounds) -> arrays``.

    Every listed partition trains each round with the seed the ClientApp would use; the states are averaged
    with ``numpy.average`` weighted by example counts (independently of ``fedmpt.training.fedavg``).
    """
    from fedmpt.apps import task
    from fedmpt.apps.config import read_app_config

    def oracle(
        config: Mapping[str, Any], partitions: Iterable[int], num_partitions: int, rounds: int
    ) -> dict[str, np.ndarray]:
        app = read_app_config(dict(config))
        seed = app.federation.seed
        arrays = task.initial_arrays(app.task, seed)
        for r in range(1, rounds + 1):
            updates = [
                task.client_update(
                    arrays,
                    task.load_client_data(app.task, k, num_partitions, seed),
                    app.task,
                    seed=task.client_seed(seed, r, k),
                    run_seed=seed,
                )
                for k in partitions
            ]
            weights = np.array([n for _, n, _ in updates], dtype=np.float64)
            arrays = {
                name: np.average(np.stack([u[name].astype(np.float64) for u, _, _ in updates]), axis=0, weights=weights)
                for name in arrays
            }
        return arrays

    return oracle
