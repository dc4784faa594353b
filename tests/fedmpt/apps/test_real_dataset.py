"""The Flower apps on a real (file-based) dataset: run-config selection, partitions, a short federated run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedmpt.apps import task
from fedmpt.apps.client_app import build_client_app
from fedmpt.apps.config import read_app_config
from fedmpt.apps.server_app import run_federation
from fedmpt.errors import ConfigError


def _run_config(root: Path, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "runs-dir": str(tmp_path / "runs"),
        "run-name": "csv",
        "num-server-rounds": 2,
        "num-clients": 3,
        "method": "promptfl",
        "dataset": "csv",
        "data-root": str(root),
        "dataset-options": "classnames_file=classes.txt",
        "batch-size": 8,
        "cache-dir": str(tmp_path / "cache"),
        **extra,
    }


@pytest.mark.parametrize(("partition", "method"), [("label-cluster", "promptfl"), ("dirichlet", "fedmpt")])
def test_a_federated_run_on_a_csv_dataset_writes_its_metrics(
    csv_dataset: Path, tmp_path: Path, fake_grid: Callable[..., Any], partition: str, method: str
) -> None:
    # fedmpt on a dataset without packaged conditions runs with the paper's five abstract conditions
    config = _run_config(csv_dataset, tmp_path, partition=partition, method=method, **{"dirichlet-alpha": 2.0})
    grid = fake_grid(build_client_app(), {5: 0, 6: 1, 7: 2}, run_config=config)
    run = run_federation(grid, read_app_config(config))
    lines = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    assert all(x["clients_replied"] == [0, 1, 2] for x in lines)
    glob = lines[-1]["global"]
    assert 0.0 <= glob["mAP"] <= 1.0 and "iid-mAP" not in glob  # one test split: no in-distribution twin
    assert glob["num_examples"] == 20
    resolved = json.loads((run.path / "config.json").read_text())
    assert json.dumps(resolved).count("csv") >= 1


def test_run_config_selects_and_validates_a_real_dataset(csv_dataset: Path, tmp_path: Path) -> None:
    config = task.task_config_from(
        {"dataset": "csv", "data-root": str(csv_dataset), "dataset-options": "classnames_file=classes.txt"}
    )
    assert config.dataset_config(0).partition == "label-cluster"
    assert config.dataset_config(0).dataset_options == (("classnames_file", "classes.txt"),)
    with pytest.raises(ConfigError, match="data-root"):
        task.task_config_from({"dataset": "voc2007"})
    with pytest.raises(ConfigError, match="dataset"):
        task.task_config_from({"dataset": "imagenet", "data-root": "/x"})
    with pytest.raises(ConfigError, match="partition"):
        task.task_config_from({"dataset": "csv", "data-root": "/x", "partition": "spurious"})
    with pytest.raises(ConfigError, match="partition"):
        task.task_config_from({"partition": "dirichlet"})  # the synthetic world has its own partition
    with pytest.raises(ConfigError, match="dataset-options"):
        task.task_config_from({"dataset": "csv", "data-root": "/x", "dataset-options": "oops"})
    assert task.parse_dataset_options("split_seed=3, ratio=0.5,name=a") == (
        ("split_seed", 3),
        ("ratio", 0.5),
        ("name", "a"),
    )


def test_masked_aggregation_on_a_real_dataset_bounds_weights_by_the_largest_partition(
    csv_dataset: Path, tmp_path: Path, fake_grid: Callable[..., Any]
) -> None:
    # Real partitions are uneven; secure aggregation must provision for the largest one, not train-per-client.
    config = _run_config(csv_dataset, tmp_path, **{"secure-aggregation": "masking", "num-server-rounds": 1})
    config["train-per-client"] = 1  # irrelevant for a real dataset; a bound taken from it would break the round
    app = read_app_config(config)
    sizes = [len(task.load_client_data(app.task, k, 3, app.federation.seed).train) for k in range(3)]
    assert task.max_client_examples(app.task, app.federation.seed) == max(sizes) > 1
    run = run_federation(fake_grid(build_client_app(), {5: 0, 6: 1, 7: 2}, run_config=config), app)
    (line,) = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert line["status"] == "ok" and line["clients_replied"] == [0, 1, 2]
    assert line["secure_aggregation"] == "masking"
