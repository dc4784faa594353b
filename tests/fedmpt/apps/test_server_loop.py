"""The ServerApp's round loop over an in-process Grid: FedAvg oracle, failures, min-clients, resume."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedmpt.apps import task
from fedmpt.apps.client_app import build_client_app
from fedmpt.apps.config import read_app_config
from fedmpt.apps.server_app import FederationError, run_federation

# node ids deliberately not in partition order: the server must key clients by partition
NODES = {9001: 2, 17: 0, 555: 1}


@pytest.fixture
def config(tmp_path: Path, small_task: dict[str, Any]) -> Callable[..., dict[str, Any]]:
    def make(num_clients: int = 3, **extra: Any) -> dict[str, Any]:
        return {
            "runs-dir": str(tmp_path),
            "run-name": "r",
            "num-server-rounds": 3,
            "seed": 11,
            "num-clients": num_clients,
            "method": "promptfl",  # the adapter logic is what is tested here; FedMPT itself runs in tests/integration
            **small_task,
            **extra,
        }

    return make


def _lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rounds_match_fedavg_oracle(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any], fedavg_oracle: Callable[..., Any]
) -> None:
    config = config()
    grid = fake_grid(build_client_app(), NODES, run_config=config)
    run = run_federation(grid, read_app_config(config))
    final = load_file(str(run.path / "final.safetensors"))
    expected = fedavg_oracle(config, [0, 1, 2], 3, rounds=3)
    for name in expected:
        np.testing.assert_allclose(final[name], expected[name], rtol=1e-5, atol=1e-6)
    lines = _lines(run.path)
    assert [x["round"] for x in lines] == [1, 2, 3]
    assert all(x["clients_sampled"] == [0, 1, 2] and x["clients_replied"] == [0, 1, 2] for x in lines)
    assert all(x["clients_failed"] == [] and x["status"] == "ok" for x in lines)
    assert set(lines[0]["clients"]) == {"0", "1", "2"}
    # bytes: at least 4 bytes per fp32 value; 3 train + 3 evaluate messages down, 3 replies up
    record_bytes = sum(4 * a.size for a in expected.values())
    assert lines[0]["bytes_down"] >= 6 * record_bytes and lines[0]["bytes_up"] >= 3 * record_bytes
    task_config = read_app_config(config).task
    global_test = task.load_global_test(task_config, 11)
    expected_map = task.evaluate(expected, global_test, task_config, run_seed=11)["mAP"]
    assert lines[-1]["global"]["mAP"] == pytest.approx(expected_map, abs=1e-6)
    assert lines[-1]["epsilon"] is None


def test_dead_and_failing_clients_are_recorded(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any], fedavg_oracle: Callable[..., Any]
) -> None:
    nodes = {10: 0, 20: 1, 30: 2, 40: 3}
    config = config(4, **{"num-server-rounds": 1, "min-clients": 2, "round-timeout-s": 0.5})
    grid = fake_grid(
        build_client_app(), nodes, run_config=config, dead={20}, failing={40}, fail_on={"train", "evaluate"}
    )
    run = run_federation(grid, read_app_config(config))
    (line,) = _lines(run.path)
    assert line["clients_sampled"] == [0, 1, 2, 3]
    assert line["clients_replied"] == [0, 2]
    assert line["clients_failed"] == [
        {"node_id": 20, "client_id": 1, "reason": "no reply within 0.5 s"},
        {"node_id": 40, "client_id": 3, "reason": "error 1: boom"},
    ]
    expected = fedavg_oracle(config, [0, 2], 4, rounds=1)
    final = load_file(str(run.path / "final.safetensors"))
    for name in expected:
        np.testing.assert_allclose(final[name], expected[name], rtol=1e-5, atol=1e-6)


def test_nodes_that_do_not_say_their_partition_are_recorded(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]
) -> None:
    nodes = {10: 0, 20: 1, 30: 2, 40: 3}
    config = config(4, **{"num-server-rounds": 2, "round-timeout-s": 0.25})
    grid = fake_grid(build_client_app(), nodes, run_config=config, dead={20}, failing={40}, fail_on={"query"})
    run = run_federation(grid, read_app_config(config))
    lines = _lines(run.path)
    assert [x["clients_sampled"] for x in lines] == [[0, 2], [0, 2]]
    for line in lines:  # asked again every round, recorded every round
        assert line["clients_failed"] == [
            {"node_id": 20, "client_id": None, "reason": "no reply to the partition query within 0.25 s"},
            {"node_id": 40, "client_id": None, "reason": "partition query failed: error 1: boom"},
        ]


def test_too_few_replies_keep_the_state(config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]) -> None:
    config = config(**{"num-server-rounds": 1, "min-clients": 3})
    grid = fake_grid(build_client_app(), NODES, run_config=config, dead={17}, fail_on={"train"})
    run = run_federation(grid, read_app_config(config))
    (line,) = _lines(run.path)
    assert line["status"] == "insufficient-replies"
    assert line["clients_replied"] == [1, 2]
    initial = task.initial_arrays(read_app_config(config).task, 11)
    final = load_file(str(run.path / "final.safetensors"))
    for name in initial:
        np.testing.assert_array_equal(final[name], initial[name])


def test_too_few_nodes_is_an_error(config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]) -> None:
    config = config(**{"min-clients": 4, "wait-for-clients-s": 0.2})
    grid = fake_grid(build_client_app(), NODES, run_config=config)
    with pytest.raises(FederationError, match="only 3 node"):
        run_federation(grid, read_app_config(config))


def test_duplicate_partitions_are_an_error(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]
) -> None:
    config = config()
    grid = fake_grid(build_client_app(), {1: 0, 2: 0, 3: 1}, run_config=config)
    with pytest.raises(FederationError, match="both serve partition-id 0"):
        run_federation(grid, read_app_config(config))


def test_partial_participation_sample_size(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]
) -> None:
    nodes = {100 + k: k for k in range(6)}
    config = config(6, **{"fraction-train": 0.5, "min-clients": 2, "num-server-rounds": 4})
    run = run_federation(fake_grid(build_client_app(), nodes, run_config=config), read_app_config(config))
    lines = _lines(run.path)
    assert all(len(x["clients_sampled"]) == 3 and x["clients_replied"] == x["clients_sampled"] for x in lines)
    assert len({tuple(x["clients_sampled"]) for x in lines}) > 1  # independent draws per round


def test_resume_equals_uninterrupted_run(
    tmp_path: Path, config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]
) -> None:
    """Crash in round 3 of 4, restart (new node ids) with resume: same final state and metrics."""
    base = {"num-server-rounds": 4, "fraction-train": 0.7, "min-clients": 2}
    nodes = {10 + k: k for k in range(5)}
    full_cfg = config(5, **base, **{"run-name": "full"})
    full = run_federation(fake_grid(build_client_app(), nodes, run_config=full_cfg), read_app_config(full_cfg))

    cut_cfg = config(5, **base, **{"run-name": "cut"})
    # calls: query, then (train, evaluate) per round; call 6 is round 3's train
    crashing = fake_grid(build_client_app(), nodes, run_config=cut_cfg, crash_at_call=6)
    with pytest.raises(RuntimeError, match="simulated server crash"):
        run_federation(crashing, read_app_config(cut_cfg))
    assert [x["round"] for x in _lines(tmp_path / "cut")] == [1, 2]
    assert not (tmp_path / "cut" / "final.safetensors").exists()

    resume_cfg = {**cut_cfg, "resume": True}
    new_nodes = {900 - k: k for k in range(5)}  # a restarted federation: new node ids
    resumed = run_federation(
        fake_grid(build_client_app(), new_nodes, run_config=resume_cfg), read_app_config(resume_cfg)
    )
    assert resumed.path == tmp_path / "cut"
    a = load_file(str(full.path / "final.safetensors"))
    b = load_file(str(resumed.path / "final.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])

    def strip(line: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in line.items() if k not in {"wall_time_s", "clients_failed"}}

    assert [strip(x) for x in _lines(full.path)] == [strip(x) for x in _lines(resumed.path)]
    assert (
        json.loads((full.path / "config.json").read_text())["config_sha256"]
        == json.loads((resumed.path / "config.json").read_text())["config_sha256"]
    )


def test_finished_run_is_not_rerun(
    tmp_path: Path, config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]
) -> None:
    config = config(**{"num-server-rounds": 1})
    run_federation(fake_grid(build_client_app(), NODES, run_config=config), read_app_config(config))
    again = {**config, "resume": True}
    grid = fake_grid(build_client_app(), NODES, run_config=again)
    run_federation(grid, read_app_config(again))
    assert grid.calls == 0
    assert len(_lines(tmp_path / "r")) == 1


def test_fraction_evaluate_samples_ceil_of_the_clients(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]
) -> None:
    nodes = {100 + k: k for k in range(5)}
    config = config(5, **{"fraction-evaluate": 0.5, "num-server-rounds": 3})
    run = run_federation(fake_grid(build_client_app(), nodes, run_config=config), read_app_config(config))
    lines = _lines(run.path)
    assert all(len(x["clients"]) == 3 for x in lines)  # ceil(0.5 * 5)
    assert all(x["clients_replied"] == [0, 1, 2, 3, 4] for x in lines)  # training is unaffected
