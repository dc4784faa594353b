"""Run-config keys of secure aggregation, as a frozen dataclass; imports neither torch nor flwr.

``secure-aggregation`` selects the :class:`~fedmpt.apps.aggregators.Aggregator` of the run: ``none`` (plain
FedAvg), ``masking`` (:mod:`fedmpt.apps.masking_app` over :mod:`secagg.masking`) or ``ckks``
(:mod:`fedmpt.apps.ckks_app` over :mod:`secagg.ckks`). The protocol parameters that matter against a deviating
server (t, the SecAgg+ degree, the run id the clients are pinned to) come from the provisioned kit
(:mod:`fedmpt.apps.kit`), not from these keys: ``secagg-threshold`` and ``secagg-neighbours`` only size a per-run
kit that the simulation provisions itself, and a run whose keys disagree with a provisioned kit stops before
round 1 naming both values.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedmpt.errors import ConfigError


class Mode(enum.StrEnum):
    """Values of the run-config key ``secure-aggregation``."""

    NONE = "none"
    MASKING = "masking"
    CKKS = "ckks"


class Stage(enum.StrEnum):
    """Values of ``secagg-stage`` in a protected ``train`` message: the protocol stage it carries."""

    ADVERTISE = "advertise"
    SHARE_KEYS = "share-keys"
    MASKED_INPUT = "masked-input"
    CONSISTENCY = "consistency-check"
    UNMASK = "unmask"
    CKKS = "ckks"  # the single CKKS train exchange: verified encrypted global state down, signed upload up


class SecAggKey(enum.StrEnum):
    """Keys the secure-aggregation stages add to the config and metric records."""

    STAGE = "secagg-stage"
    PAYLOAD = "secagg-payload"
    CKKS_RUN = "secagg-ckks-run"
    CKKS_ROUND = "secagg-ckks-round"
    CLIPPED = "secagg-clipped"


#: Run-config keys of secure aggregation and their defaults (also in ``[tool.flwr.app.config]``).
SECAGG_DEFAULTS: dict[str, Any] = {
    "secure-aggregation": "none",
    "secagg-dir": "",
    "secagg-threshold": 0,
    "secagg-neighbours": 0,
    "secagg-clip-range": 1.0,
}


@dataclass(frozen=True)
class SecureAggregationConfig:
    """The run config of secure aggregation (keys in :data:`SECAGG_DEFAULTS`).

    Attributes:
        mode: ``none``, ``masking`` or ``ckks``.
        key_dir: the provisioned kit (``fedmpt secagg provision --out``); "" = a fresh kit per run in the run
            directory (simulation only: the server writes the clients' secrets).
        threshold: t >= 2 for a per-run kit, or 0 for the default ``floor(2m/3) + 1``; with a provisioned kit it
            must be 0 or equal the kit's t.
        neighbours: even SecAgg+ degree k >= 2, or 0 for the complete graph (same rule as ``threshold``).
        clip_range: c > 0: every coordinate of a client's delta is clipped to [-c, c] before encoding.
    """

    mode: Mode = Mode.NONE
    key_dir: str = ""
    threshold: int = 0
    neighbours: int = 0
    clip_range: float = 1.0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", Mode(self.mode))
        except ValueError:
            raise ConfigError(
                f"run config 'secure-aggregation' must be one of {[m.value for m in Mode]}, got {self.mode!r}"
            ) from None
        if not isinstance(self.key_dir, str):
            raise ConfigError(f"run config 'secagg-dir' must be a string, got {self.key_dir!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, int) or t < 0 or t == 1:
            raise ConfigError(f"run config 'secagg-threshold' must be 0 (default) or an integer >= 2, got {t!r}")
        k = self.neighbours
        if isinstance(k, bool) or not isinstance(k, int) or k < 0 or k == 1 or k % 2:
            raise ConfigError(
                f"run config 'secagg-neighbours' must be 0 (complete graph) or an even int >= 2, got {k!r}"
            )
        if t and k and k < t:
            raise ConfigError(f"run config 'secagg-neighbours'={k} is below 'secagg-threshold'={t}")
        c = self.clip_range
        if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c) or c <= 0:
            raise ConfigError(f"run config 'secagg-clip-range' must be a finite number > 0, got {c!r}")
        object.__setattr__(self, "clip_range", float(c))

    @property
    def enabled(self) -> bool:
        """Whether updates are protected (any mode but ``none``)."""
        return self.mode is not Mode.NONE


def secure_aggregation_config_from(values: Mapping[str, Any]) -> SecureAggregationConfig:
    """Build the config from the run-config keys of :data:`SECAGG_DEFAULTS` (missing keys take the defaults)."""
    v = {**SECAGG_DEFAULTS, **{k: values[k] for k in SECAGG_DEFAULTS if k in values}}
    return SecureAggregationConfig(
        mode=v["secure-aggregation"],
        key_dir=v["secagg-dir"],
        threshold=v["secagg-threshold"],
        neighbours=v["secagg-neighbours"],
        clip_range=v["secagg-clip-range"],
    )
