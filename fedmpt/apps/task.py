"""The ML behind the Flower apps, behind one small interface; for now a STAND-IN, to be replaced.

Everything the ServerApp and ClientApp need from the learning side goes through the functions below, so
that the adapters stay thin and never change when the model does:

* :class:`TaskConfig` / :data:`TASK_DEFAULTS` / :func:`task_config_from` - the task's run-config keys;
* :func:`initial_arrays` - the trainable state at round 0 (server side);
* :func:`load_client_data` - a client's own train/test split from its partition id (client side);
* :func:`load_global_test` - the global test split (server side);
* :func:`client_update` - local training from the global state (client side);
* :func:`evaluate` - metrics of a state on a split (``mAP``, ``CF1``, ``OF1`` ...);
* :func:`aggregate` - the server's aggregation of the client updates.

STAND-IN: a multi-label logistic-regression model ``p(y_c = 1 | x) = sigmoid(x W[:, c] + b[c])`` on tiny
synthetic data. Features ``x ~ N(mu_k, I)`` with a client-specific mean ``mu_k`` (a per-client shift, the
stand-in's version of per-client spurious correlations); labels ``y_c = 1[x W*[:, c] + b*[c] + noise > 0]``
from one ground-truth model shared by all clients. Local training is full-batch gradient descent on the
binary cross-entropy; aggregation is the example-weighted mean (FedAvg). All randomness is drawn from
``numpy.random.default_rng((seed, stream, ...))``, so a run is a pure function of its config and seed.
The lead replaces this module with calls into ``fedmpt`` (model, data, training, aggregation).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedmpt.errors import ConfigError
from fedmpt.metrics import multilabel_metrics

logger = logging.getLogger(__name__)

Arrays = dict[str, NDArray[np.float32]]


class _Stream(IntEnum):
    """Independent random streams of the stand-in task."""

    TRUTH = 0
    CLIENT_DATA = 1
    GLOBAL_TEST = 2
    INIT = 3


@dataclass(frozen=True)
class TaskConfig:
    """Run-config keys of the task (stand-in: logistic regression on synthetic multi-label data)."""

    local_epochs: int = 5
    learning_rate: float = 0.5
    num_classes: int = 5
    num_features: int = 16
    samples_per_client: int = 64
    test_samples: int = 256
    client_shift: float = 1.0

    def __post_init__(self) -> None:
        _check_int("local-epochs", self.local_epochs, 1)
        _check_float("learning-rate", self.learning_rate, 0.0, strict_low=True)
        _check_int("num-classes", self.num_classes, 2)
        _check_int("num-features", self.num_features, 1)
        _check_int("samples-per-client", self.samples_per_client, 4)
        _check_int("test-samples", self.test_samples, 4)
        _check_float("client-shift", self.client_shift, 0.0, strict_low=False)


def _check_int(key: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"run config {key!r} must be an integer >= {low}, got {value!r}")


def _check_float(key: str, value: object, low: float, *, strict_low: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
    if ok:
        ok = value > low if strict_low else value >= low  # type: ignore[operator]
    if not ok:
        bound = f"> {low}" if strict_low else f">= {low}"
        raise ConfigError(f"run config {key!r} must be a finite number {bound}, got {value!r}")


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


TASK_DEFAULTS: dict[str, Any] = {_key(f.name): f.default for f in fields(TaskConfig)}


def task_config_from(values: Mapping[str, Any]) -> TaskConfig:
    """Build the :class:`TaskConfig` from the task's run-config keys (``values`` holds exactly those)."""
    kwargs = {f.name: values.get(_key(f.name), f.default) for f in fields(TaskConfig)}
    # TOML writes 1 for a float key; accept ints where a float is expected.
    for f in fields(TaskConfig):
        if f.type == "float" and isinstance(kwargs[f.name], int) and not isinstance(kwargs[f.name], bool):
            kwargs[f.name] = float(kwargs[f.name])
    return TaskConfig(**kwargs)


@dataclass(frozen=True)
class Split:
    """Features ``x`` (n, d) and labels ``y`` (n, C) in {0, 1}."""

    x: NDArray[np.float64]
    y: NDArray[np.int8]

    @property
    def num_examples(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class ClientData:
    """One client's local data: its train split and its own test split."""

    train: Split
    test: Split


def _truth(config: TaskConfig, seed: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    rng = np.random.default_rng((seed, _Stream.TRUTH))
    w = rng.standard_normal((config.num_features, config.num_classes))  # (d, C)
    b = rng.standard_normal(config.num_classes) * 0.5  # (C,)
    return w, b


def _sample(config: TaskConfig, seed: int, n: int, shift: NDArray[np.float64], rng: np.random.Generator) -> Split:
    w, b = _truth(config, seed)
    x = rng.standard_normal((n, config.num_features)) + shift  # (n, d)
    logits = x @ w + b + 0.5 * rng.standard_normal((n, config.num_classes))  # (n, C)
    return Split(x=x, y=(logits > 0).astype(np.int8))


def initial_arrays(config: TaskConfig, seed: int) -> Arrays:
    """The trainable state before round 1: small random weights ``W`` (d, C) and zero bias ``b`` (C,)."""
    rng = np.random.default_rng((seed, _Stream.INIT))
    return {
        "W": (0.01 * rng.standard_normal((config.num_features, config.num_classes))).astype(np.float32),
        "b": np.zeros(config.num_classes, dtype=np.float32),
    }


def load_client_data(config: TaskConfig, partition_id: int, num_partitions: int, seed: int) -> ClientData:
    """Client ``partition_id``'s train and test splits (its features shifted by its own mean ``mu_k``)."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id must be in [0, num-partitions={num_partitions}), got {partition_id}")
    rng = np.random.default_rng((seed, _Stream.CLIENT_DATA, partition_id))
    shift = config.client_shift * rng.standard_normal(config.num_features)  # (d,)
    n_test = max(4, config.samples_per_client // 4)
    return ClientData(
        train=_sample(config, seed, config.samples_per_client, shift, rng),
        test=_sample(config, seed, n_test, shift, rng),
    )


def load_global_test(config: TaskConfig, seed: int) -> Split:
    """The global test split (unshifted features), evaluated by the server after every round."""
    rng = np.random.default_rng((seed, _Stream.GLOBAL_TEST))
    return _sample(config, seed, config.test_samples, np.zeros(config.num_features), rng)


def _probabilities(arrays: Mapping[str, NDArray[Any]], x: NDArray[np.float64]) -> NDArray[np.float64]:
    logits = x @ arrays["W"].astype(np.float64) + arrays["b"].astype(np.float64)  # (n, C)
    return 1.0 / (1.0 + np.exp(-logits))


def client_update(
    arrays: Mapping[str, NDArray[Any]], data: ClientData, config: TaskConfig
) -> tuple[Arrays, int, dict[str, float]]:
    """``local_epochs`` full-batch gradient steps on the mean BCE from ``arrays``.

    Gradient of the mean BCE: dW = x^T (p - y) / n, db = mean(p - y). Returns (new arrays, number of training
    examples, training metrics ``{"train_loss": ...}``).
    """
    w = arrays["W"].astype(np.float64)
    b = arrays["b"].astype(np.float64)
    x, y = data.train.x, data.train.y.astype(np.float64)
    n = x.shape[0]
    for _ in range(config.local_epochs):
        p = _probabilities({"W": w, "b": b}, x)
        w -= config.learning_rate * (x.T @ (p - y)) / n
        b -= config.learning_rate * np.mean(p - y, axis=0)
    p = np.clip(_probabilities({"W": w, "b": b}, x), 1e-12, 1 - 1e-12)
    loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return {"W": w.astype(np.float32), "b": b.astype(np.float32)}, n, {"train_loss": loss}


def evaluate(arrays: Mapping[str, NDArray[Any]], split: Split) -> dict[str, float]:
    """The paper's metrics of ``arrays`` on ``split``: mAP, CF1, OF1 (threshold 0.5) and the example count."""
    metrics = multilabel_metrics(_probabilities(arrays, split.x), split.y)
    return {
        "mAP": metrics.mAP,
        "CF1": metrics.CF1,
        "OF1": metrics.OF1,
        "num_examples": float(split.num_examples),
    }


def aggregate(updates: Sequence[tuple[Mapping[str, NDArray[Any]], int]]) -> Arrays:
    """Example-weighted mean of the client states (FedAvg): sum_k n_k theta_k / sum_k n_k, per array.

    Raises:
        ConfigError: no updates, non-positive weights, or updates with different array names or shapes.
    """
    if not updates:
        raise ConfigError("aggregate needs at least one client update, got none")
    names = set(updates[0][0])
    total = 0
    for arrays, weight in updates:
        if set(arrays) != names:
            raise ConfigError(f"client updates hold different arrays: {sorted(arrays)} vs {sorted(names)}")
        if weight <= 0:
            raise ConfigError(f"client update weights must be positive, got {weight}")
        total += weight
    out: Arrays = {}
    for name in sorted(names):
        shapes = {arrays[name].shape for arrays, _ in updates}
        if len(shapes) != 1:
            raise ConfigError(f"client updates disagree on the shape of {name!r}: {sorted(shapes)}")
        acc = sum(arrays[name].astype(np.float64) * weight for arrays, weight in updates)
        out[name] = (np.asarray(acc) / total).astype(np.float32)
    return out
