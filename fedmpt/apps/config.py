"""The run config of the Flower apps, read once into frozen, validated dataclasses.

Flower hands both apps ``context.run_config``: the ``[tool.flwr.app.config]`` defaults of ``pyproject.toml``
fused with the ``--run-config`` overrides (flat keys, values bool/int/float/str). :func:`read_app_config`
turns it into an :class:`AppConfig` once per app start: unknown keys are rejected listing the known ones,
missing keys take the defaults below (which a test keeps equal to the pyproject defaults), and every value
is range-checked with the key and the value in the message. Key names follow Flower's conventions where one
exists (``num-server-rounds``, ``fraction-train``, ``fraction-evaluate``); the task's own keys come from
:data:`fedmpt.apps.task.TASK_DEFAULTS`.

The node config (``--node-config`` of a SuperNode, or the simulation's virtual nodes) carries the partition:
``partition-id`` and ``num-partitions``, read by :func:`read_node_config`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmpt.apps.privacy_hooks import PRIVACY_DEFAULTS, PrivacyRunConfig, planned_event, privacy_config_from
from fedmpt.apps.run_config import from_run_config, run_config_defaults
from fedmpt.apps.secagg_config import SECAGG_DEFAULTS, SecureAggregationConfig, secure_aggregation_config_from
from fedmpt.apps.task import TASK_DEFAULTS, TaskConfig, task_config_from
from fedmpt.errors import ConfigError, check_int
from fedmpt.rundir import check_run_name


@dataclass(frozen=True)
class FederationConfig:
    """Server-side settings of the federated run (Flower's key names where they exist).

    A round samples ``max(min_clients, floor(fraction_train * n))`` of the n available clients and proceeds
    when at least ``min_clients`` of them reply within ``round_timeout_s``; the others are recorded as failed.
    """

    num_server_rounds: int = 10
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_clients: int = 2
    round_timeout_s: float = 120.0
    wait_for_clients_s: float = 60.0
    seed: int = 0
    run_name: str = ""
    runs_dir: str = "runs"
    resume: bool = False

    def __post_init__(self) -> None:
        check_int("num-server-rounds", self.num_server_rounds, 1)
        _fraction("fraction-train", self.fraction_train)
        _fraction("fraction-evaluate", self.fraction_evaluate)
        check_int("min-clients", self.min_clients, 1)
        _positive("round-timeout-s", self.round_timeout_s)
        _positive("wait-for-clients-s", self.wait_for_clients_s)
        check_int("seed", self.seed, 0)
        if not isinstance(self.run_name, str):
            raise ConfigError(f"run config 'run-name' must be a string, got {self.run_name!r}")
        if self.run_name:
            check_run_name(self.run_name)
        if not isinstance(self.runs_dir, str) or not self.runs_dir:
            raise ConfigError(f"run config 'runs-dir' must be a non-empty path, got {self.runs_dir!r}")
        if not isinstance(self.resume, bool):
            raise ConfigError(f"run config 'resume' must be true or false, got {self.resume!r}")
        if self.resume and not self.run_name:
            raise ConfigError("run config 'resume' = true needs 'run-name' (the run directory to continue)")

    @property
    def runs_path(self) -> Path:
        return Path(self.runs_dir).expanduser()


@dataclass(frozen=True)
class AppConfig:
    """Everything the apps read from the run config: the federation and the task settings."""

    federation: FederationConfig
    task: TaskConfig
    resolved: Mapping[str, Any]  # the full flat run config with defaults filled in (written to config.json)
    privacy: PrivacyRunConfig = PrivacyRunConfig()  # DP keys (fedmpt.apps.privacy_hooks)
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()  # fedmpt.apps.secure_aggregation

    def identity(self) -> dict[str, Any]:
        """The resolved config minus keys that do not change the result (run name, directory, resume)."""
        return {k: v for k, v in self.resolved.items() if k not in _BOOKKEEPING_KEYS}


FEDERATION_DEFAULTS: dict[str, Any] = run_config_defaults(FederationConfig)
DEFAULTS: dict[str, Any] = {**FEDERATION_DEFAULTS, **TASK_DEFAULTS, **PRIVACY_DEFAULTS, **SECAGG_DEFAULTS}
KNOWN_KEYS: tuple[str, ...] = tuple(sorted(DEFAULTS))
_BOOKKEEPING_KEYS = frozenset({"run-name", "runs-dir", "resume"})


def _fraction(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value <= 1.0:
        raise ConfigError(f"run config {key!r} must be a number in (0, 1], got {value!r}")


def _positive(key: str, value: object) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ConfigError(f"run config {key!r} must be a finite number > 0, got {value!r}")


def read_app_config(run_config: Mapping[str, Any]) -> AppConfig:
    """Validate Flower's flat run config into an :class:`AppConfig` (missing keys take :data:`DEFAULTS`).

    Raises:
        ConfigError: an unknown key (the message lists the known ones) or a value of the wrong type or range.
    """
    unknown = sorted(set(run_config) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown run config key(s) {unknown}; known keys: {', '.join(KNOWN_KEYS)}")
    resolved = {**DEFAULTS, **dict(run_config)}
    federation = from_run_config(FederationConfig, resolved)
    task = task_config_from({k: resolved[k] for k in TASK_DEFAULTS})
    privacy = privacy_config_from({k: resolved[k] for k in PRIVACY_DEFAULTS})
    secure = secure_aggregation_config_from({k: resolved[k] for k in SECAGG_DEFAULTS})
    if privacy.dp:  # the public per-round release; a bad delta / dp-dataset-size / batch size fails here
        if "train_groups" not in task.method_options:  # dp-train: what DP trains, unless method-options says
            options = ",".join(x for x in (task.method_options, f"train_groups={privacy.dp_train}") if x)
            task = dataclasses.replace(task, method_options=options)
        planned_event(privacy, task, federation.num_server_rounds)
    return AppConfig(federation=federation, task=task, resolved=resolved, privacy=privacy, secure_aggregation=secure)


_PAIR = re.compile(r"""(\S+?)=('[^']*'|"[^"]*"|\S+)""")


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def parse_run_config_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``--run-config`` arguments the way ``flwr run`` does: ``"k1=v1 k2=v2"`` pairs or one ``.toml`` file.

    Values are TOML (``5``, ``0.5``, ``true``, ``"text"``); a TOML file's nested tables become dotted keys.
    Later items override earlier ones. Keys are not checked here; :func:`read_app_config` does that.

    Raises:
        ConfigError: an unreadable or malformed file, a malformed pair, or text that is not ``key=value``.
    """
    overrides: dict[str, Any] = {}
    for item in items:
        if item.endswith(".toml"):
            path = Path(item).expanduser()
            try:
                with path.open("rb") as handle:
                    overrides.update(_flatten(tomllib.load(handle)))
            except OSError as err:
                raise ConfigError(f"cannot read run-config file {path}: {err}") from err
            except tomllib.TOMLDecodeError as err:
                raise ConfigError(f"run-config file {path} is not valid TOML: {err}") from err
            continue
        pairs = _PAIR.findall(item)
        leftover = _PAIR.sub("", item).strip()
        if leftover or not pairs:
            raise ConfigError(f"--run-config expects 'key=value key2=value2', got {item!r}")
        for key, raw in pairs:
            try:
                overrides[key] = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError as err:
                raise ConfigError(
                    f'--run-config value of {key!r} must be TOML (5, 0.5, true, "text"), got {raw!r}'
                ) from err
    return overrides
