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
    with ``numpy.average`` weighted by example counts (independently of ``fedmpt.training.fedavg``). ``start`` and
    ``first_round`` continue from a given state (e.g. the state clients actually decrypted) at a later round.
    """
    from fedmpt.apps import task
    from fedmpt.apps.config import read_app_config

    def oracle(
        config: Mapping[str, Any],
        partitions: Iterable[int],
        num_partitions: int,
        rounds: int,
        *,
        start: Mapping[str, np.ndarray] | None = None,
        first_round: int = 1,
    ) -> dict[str, np.ndarray]:
        app = read_app_config(dict(config))
        seed = app.federation.seed
        arrays = dict(start) if start is not None else task.initial_arrays(app.task, seed)
        for r in range(first_round, first_round + rounds):
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


CSV_CLASSES = ("red", "green", "blue", "yellow")
_CSV_COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 230), "yellow": (240, 220, 30)}


@pytest.fixture(scope="session")
def csv_dataset(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A small real-format dataset for the generic CSV loader: ``<root>/{train,test}.csv`` and PNG images of
    coloured squares (label = the colours present), with the class list in ``classes.txt``."""
    from PIL import Image

    root = tmp_path_factory.mktemp("csv-dataset")
    (root / "images").mkdir()
    (root / "classes.txt").write_text("\n".join(CSV_CLASSES) + "\n")
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 20)):
        rows = ["path,labels"]
        for i in range(n):
            present = [c for c in CSV_CLASSES if rng.random() < 0.4] or [CSV_CLASSES[i % 4]]
            image = np.full((48, 48, 3), 128, dtype=np.uint8)
            for c in present:
                y, x = rng.integers(0, 32, size=2)
                image[y : y + 16, x : x + 16] = _CSV_COLOURS[c]
            name = f"images/{split}_{i:03d}.png"
            Image.fromarray(image).save(root / name)
            rows.append(f"{name},{'|'.join(present)}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root
