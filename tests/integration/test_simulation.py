"""The Flower apps on Flower's own simulation engine (Ray), in this process: 3 clients x 2 rounds."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedmpt.apps import task
from fedmpt.apps.config import read_app_config
from fedmpt.apps.simulation import run_local_simulation
from fedmpt.errors import ConfigError

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_three_clients_two_rounds_through_flower(
    tmp_path: Path, small_task: dict[str, Any], fedavg_oracle: Callable[..., dict[str, np.ndarray]]
) -> None:
    """FedMPT itself (the default method, bundled tiny CLIP) through Flower's simulation engine."""
    ray = pytest.importorskip("ray")
    overrides = {
        "num-server-rounds": 2,
        "runs-dir": str(tmp_path),
        "run-name": "sim",
        "seed": 4,
        "num-clients": 3,
        **small_task,
    }
    path = run_local_simulation(overrides, num_supernodes=3)
    assert path == (tmp_path / "sim").resolve()
    assert not ray.is_initialized()  # the engine shut Ray down; nothing left running

    lines = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    for line in lines:
        assert line["clients_sampled"] == [0, 1, 2] and line["clients_replied"] == [0, 1, 2]
        assert line["clients_failed"] == [] and set(line["clients"]) == {"0", "1", "2"}
        assert line["bytes_down"] > 0 and line["bytes_up"] > 0

    # oracle: the same FedAvg computed without Flower
    config = read_app_config(overrides)
    arrays = fedavg_oracle(overrides, [0, 1, 2], 3, rounds=2)
    final = load_file(str(path / "final.safetensors"))
    for name in arrays:
        np.testing.assert_allclose(final[name], arrays[name], rtol=1e-5, atol=1e-6)
    expected_map = task.evaluate(arrays, task.load_global_test(config.task, 4), config.task, run_seed=4)["mAP"]
    assert lines[-1]["global"]["mAP"] == pytest.approx(expected_map, abs=1e-6)
    environment = json.loads((path / "environment.json").read_text())
    assert environment["seed"] == 4 and environment["packages"]["flwr"] == "1.41.0"


def test_bad_config_fails_before_the_engine_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="min-clients=4 exceeds num-supernodes=3"):
        run_local_simulation({"min-clients": 4, "runs-dir": str(tmp_path)}, num_supernodes=3)
    with pytest.raises(ConfigError, match="unknown run config key"):
        run_local_simulation({"rounds": 4, "runs-dir": str(tmp_path)}, num_supernodes=3)
    assert list(tmp_path.iterdir()) == []
