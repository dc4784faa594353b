"""Tests of fedmpt.rundir: layout, atomic metrics/checkpoints, resume after crashes, refusal cases."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from fedmpt.errors import ConfigError
from fedmpt.rundir import (
    ClientFailure,
    RoundRecord,
    RunDirectory,
    RunDirectoryError,
    check_run_name,
    config_sha256,
    default_run_name,
)

CONFIG = {"num-server-rounds": 3, "fraction-train": 0.5, "method": "fedmpt"}


def _record(server_round: int, value: float = 0.5) -> RoundRecord:
    return RoundRecord(
        round=server_round,
        wall_time_s=1.25,
        clients_sampled=(0, 1, 2),
        clients_replied=(0, 2),
        clients_failed=(ClientFailure(node_id=77, client_id=1, reason="timeout"),),
        bytes_down=300,
        bytes_up=200,
        global_metrics={"mAP": value, "CF1": 0.25, "OF1": 0.75},
        clients={0: {"mAP": 0.1}, 2: {"mAP": 0.2}},
    )


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4)}


def test_create_writes_config_environment_and_state(tmp_path: Path) -> None:
    run = RunDirectory.create(CONFIG, seed=7, root=tmp_path, name="r1")
    assert run.path == tmp_path / "r1"
    stored = json.loads((run.path / "config.json").read_text())
    assert stored["config"] == CONFIG
    canonical = json.dumps(CONFIG, sort_keys=True, separators=(",", ":")).encode()
    assert stored["config_sha256"] == hashlib.sha256(canonical).hexdigest()
    env = json.loads((run.path / "environment.json").read_text())
    assert env["seed"] == 7
    assert env["packages"]["numpy"] == np.__version__
    assert "hostname" not in env
    expected = {"torch", "flwr", "opacus", "tenseal", "open_clip_torch", "numpy", "fedmpt"}
    assert set(env["packages"]) == expected
    assert run.last_completed_round == 0
    assert (run.path / "metrics.jsonl").read_text() == ""


def test_default_name_is_timestamp_plus_random_suffix() -> None:
    names = {default_run_name() for _ in range(20)}
    assert len(names) == 20
    assert all(re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", n) for n in names)


@pytest.mark.parametrize("bad", ["", "..", "a/b", "../x", "-x", "x" * 129, "a b"])
def test_bad_run_names_rejected(bad: str) -> None:
    with pytest.raises(ConfigError, match="run name"):
        check_run_name(bad)


def test_existing_run_is_not_overwritten(tmp_path: Path) -> None:
    RunDirectory.create(CONFIG, seed=1, root=tmp_path, name="r")
    with pytest.raises(RunDirectoryError, match="already exists"):
        RunDirectory.create(CONFIG, seed=1, root=tmp_path, name="r")


def test_rounds_metrics_and_checkpoints_round_trip(tmp_path: Path) -> None:
    run = RunDirectory.create(CONFIG, seed=1, root=tmp_path, name="r")
    for r in (1, 2):
        run.complete_round(_record(r, value=r / 10), _arrays(r), rng_state={"counter": r})
    lines = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    assert lines[1]["global"] == {"mAP": 0.2, "CF1": 0.25, "OF1": 0.75}
    assert lines[0]["clients_failed"] == [{"node_id": 77, "client_id": 1, "reason": "timeout"}]
    assert lines[0]["clients"] == {"0": {"mAP": 0.1}, "2": {"mAP": 0.2}}
    assert lines[0]["epsilon"] is None
    ckpt = load_file(str(run.checkpoint_path(2)))
    np.testing.assert_array_equal(ckpt["w"], _arrays(2)["w"])
    point = run.resume()
    assert point.round == 2 and not point.finished
    assert point.rng_state == {"counter": 2}
    assert point.arrays is not None
    np.testing.assert_array_equal(point.arrays["b"], _arrays(2)["b"])
    final = run.finish(_arrays(2))
    assert final.name == "final.safetensors"
    assert run.resume().finished
    with pytest.raises(RunDirectoryError, match="finished"):
        run.complete_round(_record(3), _arrays(3))


def test_undefined_metric_written_as_null() -> None:
    record = RoundRecord(
        round=1,
        wall_time_s=0.0,
        clients_sampled=(0,),
        clients_replied=(0,),
        clients_failed=(),
        bytes_down=0,
        bytes_up=0,
        global_metrics={"mAP": float("nan"), "OF1": 0.5},
        clients={0: {"mAP": float("inf")}},
    )
    assert json.loads(json.dumps(record.to_json()))["global"] == {"mAP": None, "OF1": 0.5}
    assert record.to_json()["clients"] == {"0": {"mAP": None}}


def test_out_of_order_round_rejected(tmp_path: Path) -> None:
    run = RunDirectory.create(CONFIG, seed=1, root=tmp_path, name="r")
    with pytest.raises(RunDirectoryError, match="expected round 1, got round 2"):
        run.complete_round(_record(2), _arrays(2))


def test_resume_drops_metrics_of_an_uncompleted_round(tmp_path: Path) -> None:
    """A crash after the metrics line but before state.json: the line is dropped on resume."""
    run = RunDirectory.create(CONFIG, seed=1, root=tmp_path, name="r")
    run.complete_round(_record(1), _arrays(1))
    state = (run.path / "state.json").read_text()
    run.complete_round(_record(2), _arrays(2))
    (run.path / "state.json").write_text(state)  # simulate the crash: state still says round 1
    with open(run.path / "metrics.jsonl", "a") as handle:
        handle.write('{"round": 3, "trunc')  # and a torn line
    reopened = RunDirectory.open(run.path, CONFIG)
    point = reopened.resume()
    assert point.round == 1
    assert [m["round"] for m in point.metrics] == [1]
    assert [json.loads(x)["round"] for x in (run.path / "metrics.jsonl").read_text().splitlines()] == [1]
    np.testing.assert_array_equal(point.arrays["w"], _arrays(1)["w"])  # type: ignore[index]


def test_resume_refuses_another_config(tmp_path: Path) -> None:
    run = RunDirectory.create(CONFIG, seed=1, root=tmp_path, name="r")
    with pytest.raises(RunDirectoryError, match=r"differs .* \['fraction-train'\]"):
        RunDirectory.open(run.path, {**CONFIG, "fraction-train": 1.0})


def test_checkpoint_of_another_config_refused(tmp_path: Path) -> None:
    a = RunDirectory.create(CONFIG, seed=1, root=tmp_path, name="a")
    b = RunDirectory.create({**CONFIG, "method": "fedavg"}, seed=1, root=tmp_path, name="b")
    a.complete_round(_record(1), _arrays(1))
    with pytest.raises(RunDirectoryError, match="another config"):
        b.load_checkpoint(a.checkpoint_path(1))


def test_create_or_resume(tmp_path: Path) -> None:
    run = RunDirectory.create_or_resume(CONFIG, 3, root=tmp_path, name="x", resume=True)
    run.complete_round(_record(1), _arrays(1))
    again = RunDirectory.create_or_resume(CONFIG, 3, root=tmp_path, name="x", resume=True)
    assert again.resume().round == 1
    with pytest.raises(RunDirectoryError):
        RunDirectory.create_or_resume(CONFIG, 3, root=tmp_path, name="x", resume=False)


def test_record_validation() -> None:
    with pytest.raises(ConfigError, match="round"):
        _record(0)
    with pytest.raises(ConfigError, match="redefine"):
        RoundRecord(
            round=1,
            wall_time_s=0.0,
            clients_sampled=(),
            clients_replied=(),
            clients_failed=(),
            bytes_down=0,
            bytes_up=0,
            global_metrics={},
            clients={},
            extra={"global": 1},
        )


def test_non_json_config_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="JSON"):
        RunDirectory.create({"x": object()}, seed=1, root=tmp_path, name="r")


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.booleans(), st.text(max_size=5))))
def test_config_hash_ignores_key_order(config: dict[str, object]) -> None:
    reordered = dict(reversed(list(config.items())))
    expected = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert config_sha256(reordered) == expected
