"""Run config of the Flower apps: pyproject defaults, unknown keys, ranges, node config, overrides parsing."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmpt.apps.config import (
    DEFAULTS,
    KNOWN_KEYS,
    parse_run_config_overrides,
    read_app_config,
)
from fedmpt.apps.node_config import read_node_config
from fedmpt.errors import ConfigError

PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"


def _pyproject() -> dict[str, Any]:
    with PYPROJECT.open("rb") as handle:
        return tomllib.load(handle)


def test_pyproject_defaults_equal_the_dataclass_defaults() -> None:
    assert _pyproject()["tool"]["flwr"]["app"]["config"] == DEFAULTS


def test_pyproject_components_point_at_the_apps() -> None:
    components = _pyproject()["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "fedmpt.apps.server_app:app",
        "clientapp": "fedmpt.apps.client_app:app",
    }


def test_empty_run_config_gives_defaults() -> None:
    config = read_app_config({})
    assert config.federation.num_server_rounds == 10
    assert config.federation.fraction_train == 1.0
    assert config.task.local_epochs == 1 and config.task.method == "fedmpt" and config.task.num_clients == 5
    assert dict(config.resolved) == DEFAULTS
    assert "run-name" not in config.identity() and "resume" not in config.identity()


def test_unknown_key_lists_known_keys() -> None:
    with pytest.raises(ConfigError) as err:
        read_app_config({"num-rounds": 3})
    message = str(err.value)
    assert "['num-rounds']" in message
    assert all(key in message for key in KNOWN_KEYS)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num-server-rounds", 0),
        ("num-server-rounds", 2.5),
        ("num-server-rounds", True),
        ("fraction-train", 0.0),
        ("fraction-train", 1.5),
        ("fraction-evaluate", -0.1),
        ("min-clients", 0),
        ("round-timeout-s", 0),
        ("round-timeout-s", float("inf")),
        ("seed", -1),
        ("run-name", "../escape"),
        ("runs-dir", ""),
        ("resume", "yes"),
        ("local-epochs", 0),
        ("learning-rate", 0.0),
        ("num-clients", 0),
        ("spurious-strength", 1.5),
        ("momentum", 1.0),
        ("method", "fedavg-magic"),
        ("dataset", "imagenet"),
    ],
)
def test_out_of_range_value_named(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key if key != "run-name" else "run name"):
        read_app_config({key: value})


def test_integer_accepted_for_float_keys() -> None:
    config = read_app_config({"fraction-train": 1, "learning-rate": 2})
    assert isinstance(config.federation.fraction_train, float) and config.federation.fraction_train == 1.0
    assert isinstance(config.task.learning_rate, float) and config.task.learning_rate == 2.0


def test_resume_needs_run_name() -> None:
    with pytest.raises(ConfigError, match="resume"):
        read_app_config({"resume": True})


def test_node_config() -> None:
    node = read_node_config({"partition-id": 2, "num-partitions": 3})
    assert (node.partition_id, node.num_partitions) == (2, 3)
    with pytest.raises(ConfigError, match="partition-id"):
        read_node_config({"partition-id": 3, "num-partitions": 3})
    with pytest.raises(ConfigError, match=r"lacks \['num-partitions'\]"):
        read_node_config({"partition-id": 0})


def test_overrides_pairs_and_file(tmp_path: Path) -> None:
    parsed = parse_run_config_overrides(['num-server-rounds=2 run-name="a b" fraction-train=0.5', "resume=true"])
    assert parsed == {"num-server-rounds": 2, "run-name": "a b", "fraction-train": 0.5, "resume": True}
    conf = tmp_path / "exp.toml"
    conf.write_text('seed = 3\nlearning-rate = 0.25\n[group]\nkey = "x"\n')
    assert parse_run_config_overrides([str(conf)]) == {"seed": 3, "learning-rate": 0.25, "group.key": "x"}


@pytest.mark.parametrize("bad", ["no-equals-sign", "a=", "x=[unclosed", "k=v junk"])
def test_malformed_overrides_rejected(bad: str) -> None:
    with pytest.raises(ConfigError, match="run-config"):
        parse_run_config_overrides([bad])


def test_missing_override_file() -> None:
    with pytest.raises(ConfigError, match="cannot read run-config file"):
        parse_run_config_overrides(["/nonexistent/conf.toml"])


@given(st.integers(min_value=1, max_value=10_000), st.floats(min_value=1e-6, max_value=1.0))
def test_valid_values_round_trip(rounds: int, fraction: float) -> None:
    parsed = parse_run_config_overrides([f"num-server-rounds={rounds} fraction-train={fraction!r}"])
    config = read_app_config(parsed)
    assert config.federation.num_server_rounds == rounds
    assert config.federation.fraction_train == fraction


def test_fedmpt_run_rejects_a_bad_config_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    from fedmpt.cli import main

    assert main(["run", "--run-config", "num-rounds=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown run config key(s) ['num-rounds']" in err and "num-server-rounds" in err


def test_every_override_file_in_experiments_conf_is_a_valid_run_config() -> None:
    files = sorted((PYPROJECT.parent / "experiments" / "conf").glob("*.toml"))
    assert files, "experiments/conf holds no override files"
    for path in files:
        config = read_app_config(parse_run_config_overrides([str(path)]))
        with path.open("rb") as handle:
            for key, value in tomllib.load(handle).items():
                assert config.resolved[key] == value, (path.name, key)
