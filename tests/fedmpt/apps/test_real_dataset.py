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
    resolved = json.loads((run.path / "config.json").read_text())["config"]  # the run records what it ran on
    assert (resolved["dataset"], resolved["data-root"], resolved["partition"]) == ("csv", str(csv_dataset), partition)


def test_run_config_selects_and_validates_a_real_dataset(csv_dataset: Path, tmp_path: Path) -> None:
    config = task.task_config_from(
        {"dataset": "csv", "data-root": str(csv_dataset), "dataset-options": "classnames_file=classes.txt"}
    )
    assert config.dataset_config(0).partition == "label-cluster"
    assert config.dataset_config(0).dataset_options == (("classnames_file", "classes.txt"),)
    with pytest.raises(ConfigError, match="data-root"):
        task.task_config_from({"dataset": "csv"})  # no built-in class list: the server must read the data
    assert task.task_config_from({"dataset": "voc2007"}).data_root == ""  # sites bring the data
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


def _sites(root: Path, tmp_path: Path, n: int) -> list[Path]:
    """Split the CSV dataset's training rows among ``n`` site folders (each its own train.csv and classes.txt)."""
    rows = (root / "train.csv").read_text().splitlines()
    sites = []
    for k in range(n):
        site = tmp_path / f"site{k}"
        site.mkdir()
        (site / "images").symlink_to(root / "images")
        (site / "classes.txt").write_text((root / "classes.txt").read_text())
        (site / "train.csv").write_text("\n".join([rows[0], *rows[1 + k :: n]]) + "\n")
        sites.append(site)
    return sites


@pytest.mark.parametrize("server_has_data", [True, False])
def test_sites_bring_their_own_data_through_the_node_config(
    csv_dataset: Path,
    tmp_path: Path,
    fake_grid: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    server_has_data: bool,
) -> None:
    from fedmpt.data import BUILTIN_CLASSNAMES

    sites = _sites(csv_dataset, tmp_path, 3)  # 20 training rows each: 16 to train, 4 held out
    config = _run_config(csv_dataset, tmp_path)
    if not server_has_data:  # a dataset with a built-in class list needs no data on the server
        monkeypatch.setitem(BUILTIN_CLASSNAMES, "csv", ("red", "green", "blue", "yellow"))
        config["data-root"] = ""
    grid = fake_grid(build_client_app(), {5: 0, 6: 1, 7: 2}, run_config=config)
    for node_id, site in zip((5, 6, 7), sites, strict=True):
        grid.contexts[node_id].node_config["data-root"] = str(site)
    run = run_federation(grid, read_app_config(config))
    lines = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert all(x["clients_replied"] == [0, 1, 2] for x in lines)
    assert all(x["train"][c]["num-examples"] == 16 for x in lines for c in ("0", "1", "2"))
    glob = lines[-1]["global"]
    if server_has_data:
        assert glob["num_examples"] == 20  # the server's own test split
    else:  # federated evaluation: the example-weighted mean over the sites' held-out shares
        assert glob["num_examples"] == 12
        per_site = lines[-1]["clients"]
        expected = sum(per_site[c]["mAP"] * per_site[c]["num_examples"] for c in per_site) / 12
        assert glob["mAP"] == pytest.approx(expected)


def test_a_site_with_other_classes_or_no_data_is_refused(csv_dataset: Path, tmp_path: Path) -> None:
    app = read_app_config(_run_config(csv_dataset, tmp_path))
    site = _sites(csv_dataset, tmp_path, 1)[0]
    (site / "classes.txt").write_text("green\nred\nblue\nyellow\n")
    with pytest.raises(ConfigError, match="differ"):
        task.load_client_data(app.task, 0, 3, 0, data_root=str(site))
    with pytest.raises(ConfigError, match="no data"):  # VOC's classes are built in, but this node has no images
        task.load_client_data(task.task_config_from({"dataset": "voc2007"}), 0, 5, 0)
