"""Flat run-config keys <-> frozen config dataclasses, shared by the task, federation and privacy settings.

A dataclass field ``learning_rate`` is the run-config key ``learning-rate``; missing keys take the field's
default; TOML and ``--run-config`` write ``1`` for ``1.0``, so an int given for a float field becomes a float.
Validation stays in each dataclass's ``__post_init__``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def run_config_key(field_name: str) -> str:
    """The run-config key of a dataclass field: ``learning_rate`` -> ``learning-rate``."""
    return field_name.replace("_", "-")


def run_config_defaults(cls: type[Any]) -> dict[str, Any]:
    """``{run-config key: default}`` of every field of the dataclass ``cls``."""
    return {run_config_key(f.name): f.default for f in fields(cls)}


def from_run_config(cls: type[T], values: Mapping[str, Any]) -> T:
    """Build the dataclass ``cls`` from run-config ``values`` (missing keys take the defaults)."""
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        value = values.get(run_config_key(f.name), f.default)
        if f.type == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[f.name] = value
    return cls(**kwargs)
