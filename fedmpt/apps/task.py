"""The ML behind the Flower apps: fedmpt's model, data, training and aggregation behind one small interface.

Everything the ServerApp and ClientApp need from the learning side goes through the functions below, so that
the adapters stay thin:

* :class:`TaskConfig` / :data:`TASK_DEFAULTS` / :func:`task_config_from` - the task's run-config keys;
* :func:`initial_arrays` - the trainable state at round 0 (server side);
* :func:`load_client_data` - a client's own train/test features from its partition id (client side);
* :func:`load_global_test` - the global test splits (server side);
* :func:`client_update` - local training from the global state (:func:`fedmpt.training.client_update`);
* :func:`evaluate` - metrics of a state on a split (``mAP``, ``CF1``, ``OF1`` ...);
* :func:`aggregate` - FedAvg of the client updates (:func:`fedmpt.training.fedavg`).

The expensive objects (the frozen backbone, the method module, the encoded features) are built once per process
and kept (``functools.lru_cache`` keyed by the frozen config), because Flower rebuilds the apps for every
message; encoded features are also cached on disk (:mod:`fedmpt.feature_cache`).

Data. ``dataset = "synthetic"`` (the default): the synthetic federated benchmark (:mod:`fedmpt.world`),
client k = partition k, with ``num-clients`` partitions; the server evaluates on the decorrelated global test
split (reported as ``mAP``, ``CF1``, ``OF1``) and on the in-distribution one (``iid-mAP`` ...). Any other
registered dataset (``voc2007``, ``coco2014``, ``csv`` ...) is loaded from ``data-root``: its ``train-split`` is
partitioned among the clients by ``partition`` (``label-cluster`` or ``dirichlet``), each client holds out
``client-test-fraction`` of its shard as its own test split, and the server evaluates on ``test-split``
(:func:`fedmpt.federated.dataset_federation`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from fedmpt.apps.run_config import from_run_config, run_config_defaults, run_config_key
from fedmpt.backbone.loader import TINY_CLIP, Backbone, load_backbone
from fedmpt.conditions import builtin_condition_names, load_conditions
from fedmpt.conditions.defaults_build import NATURAL_IMAGE_CONDITIONS
from fedmpt.errors import ConfigError, check_int
from fedmpt.feature_cache import FeatureCache
from fedmpt.federated import (
    PARTITIONERS,
    DatasetFederation,
    DatasetFederationConfig,
    SiteData,
    dataset_federation,
    site_data,
    world_dataset_features,
)
from fedmpt.methods import METHODS, Method, build_method
from fedmpt.methods.base import MethodConfig
from fedmpt.training import ClientUpdate, FeatureData, TrainConfig, fedavg
from fedmpt.training import client_update as library_client_update
from fedmpt.training import evaluate as library_evaluate
from fedmpt.world.dataset import FederatedWorld, FederatedWorldConfig, make_federated_world

logger = logging.getLogger(__name__)

Arrays = dict[str, NDArray[np.float32]]

# The cached method module holds the parameters being trained; handlers that run in threads of one process (an
# in-process grid) must not interleave on it.
_METHOD_LOCK = threading.RLock()


@dataclass(frozen=True)
class TaskConfig:
    """Run-config keys of the task (kebab-case in the run config: ``learning-rate``, ``num-clients`` ...)."""

    method: str = "fedmpt"
    dataset: str = "synthetic"
    backbone: str = TINY_CLIP
    backbone_checkpoint: str = ""
    conditions: str = ""
    num_clients: int = 5
    learning_rate: float = 0.01
    local_epochs: int = 1
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 1e-5
    train_per_client: int = 400
    test_per_client: int = 200
    global_test_size: int = 1000
    spurious_strength: float = 0.9
    context_strength: float = 0.75
    background_concentration: float = 0.5
    cache_dir: str = ""
    data_root: str = ""
    train_split: str = "train"
    test_split: str = "test"
    partition: str = ""
    dirichlet_alpha: float = 0.5
    client_test_fraction: float = 0.2
    partial_label_rate: float = 0.0
    partial_label_mode: str = "unknown"
    dataset_options: str = ""
    method_options: str = ""

    def __post_init__(self) -> None:
        import fedmpt.methods  # noqa: F401 - registers the built-in methods
        from fedmpt.data import DATASETS

        if self.method not in METHODS:
            raise ConfigError(f"run config 'method' must be one of {sorted(METHODS)}, got {self.method!r}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"run config 'dataset' must be one of {sorted(DATASETS)}, got {self.dataset!r}")
        if self.synthetic:
            if self.partition not in ("", "spurious"):
                raise ConfigError(
                    f"run config 'partition': the synthetic benchmark has its own per-client spurious partition "
                    f"('spurious'); got {self.partition!r}"
                )
        else:
            if not self.data_root and _builtin_classnames(self.dataset) is None:
                raise ConfigError(
                    f"run config 'data-root' is required for dataset {self.dataset!r}: it has no built-in class "
                    "list, so the server must read the dataset (sites may still bring their own, node config "
                    "'data-root')"
                )
            if self.partition not in ("", *PARTITIONERS):
                raise ConfigError(
                    f"run config 'partition' must be one of {list(PARTITIONERS)} for dataset {self.dataset!r}, "
                    f"got {self.partition!r}"
                )
        for key in ("train_split", "test_split"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"run config {run_config_key(key)!r} must be a non-empty string, got {value!r}")
        if self.partial_label_mode not in ("unknown", "negative"):
            raise ConfigError(
                f"run config 'partial-label-mode' must be 'unknown' or 'negative', got {self.partial_label_mode!r}"
            )
        parse_dataset_options(self.dataset_options)
        method_config(self.method_options)
        _check_float("dirichlet-alpha", self.dirichlet_alpha, 0.0, strict_low=True)
        _check_float("client-test-fraction", self.client_test_fraction, 0.0, strict_low=False, high=1.0)
        _check_float("partial-label-rate", self.partial_label_rate, 0.0, strict_low=False, high=1.0)
        for key in ("num_clients", "local_epochs", "batch_size", "train_per_client", "test_per_client"):
            check_int(run_config_key(key), getattr(self, key), 1)
        check_int("global-test-size", self.global_test_size, 1)
        _check_float("learning-rate", self.learning_rate, 0.0, strict_low=True)
        _check_float("momentum", self.momentum, 0.0, strict_low=False, high=1.0)
        _check_float("weight-decay", self.weight_decay, 0.0, strict_low=False)
        _check_float("spurious-strength", self.spurious_strength, 0.0, strict_low=False, high=1.0, high_ok=True)
        _check_float("context-strength", self.context_strength, 0.0, strict_low=False, high=1.0, high_ok=True)
        _check_float("background-concentration", self.background_concentration, 0.0, strict_low=True)

    @property
    def synthetic(self) -> bool:
        return self.dataset == "synthetic"

    def dataset_config(self, seed: int, root: str = "") -> DatasetFederationConfig:
        """The real-dataset federation this task runs on (``dataset`` other than ``synthetic``), at ``root``
        (default: the run config's ``data-root``)."""
        return DatasetFederationConfig(
            dataset=self.dataset,
            root=root or self.data_root,
            train_split=self.train_split,
            test_split=self.test_split,
            num_clients=self.num_clients,
            partition=self.partition or "label-cluster",
            dirichlet_alpha=self.dirichlet_alpha,
            client_test_fraction=self.client_test_fraction,
            partial_label_rate=self.partial_label_rate,
            partial_label_mode=self.partial_label_mode,
            seed=seed,
            dataset_options=parse_dataset_options(self.dataset_options),
        )

    def world_config(self, seed: int) -> FederatedWorldConfig:
        """The synthetic benchmark this task runs on."""
        return FederatedWorldConfig(
            num_clients=self.num_clients,
            train_per_client=self.train_per_client,
            test_per_client=self.test_per_client,
            global_test_size=self.global_test_size,
            spurious_strength=self.spurious_strength,
            context_strength=self.context_strength,
            background_concentration=self.background_concentration,
            seed=seed,
        )


def _parse_options(text: str, key: str) -> tuple[tuple[str, object], ...]:
    """``"name=value,name=value"`` -> ((name, value), ...): values that read as integers or floats become
    numbers, others stay strings. ``key`` names the run-config key in errors."""
    if not isinstance(text, str):
        raise ConfigError(f"run config {key!r} must be a string 'name=value,...', got {text!r}")
    options: list[tuple[str, object]] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, raw = item.partition("=")
        if not sep or not name.strip().isidentifier():
            raise ConfigError(f"run config {key!r}: {item!r} is not name=value (in {text!r})")
        value: object = raw.strip()
        for kind in (int, float):
            try:
                value = kind(raw.strip())
                break
            except ValueError:
                continue
        options.append((name.strip(), value))
    return tuple(options)


def parse_dataset_options(text: str) -> tuple[tuple[str, object], ...]:
    """The run config's ``dataset-options``: ``"name=value,name=value"`` -> loader keyword options.

    Values that read as integers or floats become numbers (``split_seed=3``), others stay strings
    (``classnames_file=classes.txt``).
    """
    return _parse_options(text, "dataset-options")


#: MethodConfig fields the run config may not set (the seed comes from the run's ``seed``).
_FIXED_METHOD_FIELDS = frozenset({"init_seed"})


def method_config(text: str) -> MethodConfig:
    """The run config's ``method-options`` (``"adapter_rank=64,n_condition_context=8"``) -> a
    :class:`~fedmpt.methods.base.MethodConfig` with those fields changed (the others at their defaults).

    Names must be MethodConfig fields (``init_seed`` excepted); ``true``/``false`` set booleans. Every value
    is checked by MethodConfig itself, and the error names the run-config key.
    """
    known = {f.name: f for f in dataclasses.fields(MethodConfig) if f.name not in _FIXED_METHOD_FIELDS}
    overrides: dict[str, object] = {}
    for name, value in _parse_options(text, "method-options"):
        if name not in known:
            raise ConfigError(f"run config 'method-options': unknown option {name!r}; known: {sorted(known)}")
        if known[name].type == "bool":
            if str(value).lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"run config 'method-options': {name} must be true or false, got {value!r}")
            value = str(value).lower() in ("true", "1")
        elif known[name].type == "float" and isinstance(value, int):
            value = float(value)
        overrides[name] = value
    try:
        return MethodConfig(**overrides)  # type: ignore[arg-type]
    except ConfigError as err:
        raise ConfigError(f"run config 'method-options' ({text!r}): {err}") from None


def _builtin_classnames(dataset: str) -> tuple[str, ...] | None:
    from fedmpt.data import BUILTIN_CLASSNAMES

    key = "coco2014" if dataset == "coco2017" else dataset  # the same 80 categories
    names = BUILTIN_CLASSNAMES.get(key)
    return None if names is None else tuple(names)


def _check_float(
    key: str, value: object, low: float, *, strict_low: bool, high: float | None = None, high_ok: bool = False
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and bool(np.isfinite(value))
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = v > low if strict_low else v >= low
        if ok and high is not None:
            ok = v <= high if high_ok else v < high
    if not ok:
        bound = f"> {low}" if strict_low else f">= {low}"
        if high is not None:
            bound += f" and {'<=' if high_ok else '<'} {high}"
        raise ConfigError(f"run config {key!r} must be a finite number {bound}, got {value!r}")


TASK_DEFAULTS: dict[str, Any] = run_config_defaults(TaskConfig)


def task_config_from(values: Mapping[str, Any]) -> TaskConfig:
    """Build the :class:`TaskConfig` from the task's run-config keys (``values`` holds exactly those)."""
    return from_run_config(TaskConfig, values)


@dataclass(frozen=True)
class ClientData:
    """One client's local data: frozen features of its train split and of its own test split."""

    train: FeatureData
    test: FeatureData


@dataclass(frozen=True)
class GlobalTest:
    """The server's global test splits: the primary one (the synthetic benchmark's decorrelated split, or a real
    dataset's test split) and, for the synthetic benchmark, the in-distribution one."""

    decorrelated: FeatureData
    in_distribution: FeatureData | None = None


@functools.lru_cache(maxsize=2)
def _backbone(name: str, checkpoint: str) -> Backbone:
    if name == TINY_CLIP:
        return load_backbone(name, checkpoint=checkpoint or None)
    if not checkpoint:
        raise ConfigError(f"run config 'backbone-checkpoint' is required for backbone {name!r} (no downloads)")
    return load_backbone(name, checkpoint=checkpoint)


@functools.lru_cache(maxsize=4)
def _method_and_initial_state(config: TaskConfig, seed: int) -> tuple[Method, Arrays]:
    backbone = _backbone(config.backbone, config.backbone_checkpoint)
    classnames = _classnames(config, seed)
    conditions = _conditions(config, classnames)
    options = dataclasses.replace(method_config(config.method_options), init_seed=seed)
    method = build_method(config.method, backbone, classnames, conditions, config=options)
    # The cached module is trained in place by every update; its seeded initial state is kept apart.
    return method, to_arrays(method.trainable_state())


def _classnames(config: TaskConfig, seed: int) -> tuple[str, ...]:
    """The task's class list: the world's, the dataset's at ``data-root``, or (sites bring their own data) the
    dataset's built-in list."""
    if config.synthetic:
        return tuple(_world(config, seed).classnames)
    if config.data_root:
        return _real(config, seed).classnames
    names = _builtin_classnames(config.dataset)
    assert names is not None  # TaskConfig refuses a dataset without data-root or a built-in list
    return names


def _conditions(config: TaskConfig, classnames: Sequence[str]) -> tuple[str, ...]:
    """The ``conditions`` file, else the dataset's packaged default, else (a user dataset without either) the
    paper's five abstract conditions, which name no class."""
    if config.conditions or config.dataset in builtin_condition_names():
        return tuple(load_conditions(config.conditions or config.dataset, classnames).conditions)
    logger.warning(
        "dataset %r has no packaged conditions and run config 'conditions' is empty: using the paper's five "
        "abstract conditions %s (derive dataset-specific ones with `fedmpt conditions derive`)",
        config.dataset,
        list(NATURAL_IMAGE_CONDITIONS),
    )
    return NATURAL_IMAGE_CONDITIONS


def _method(config: TaskConfig, seed: int) -> Method:
    return _method_and_initial_state(config, seed)[0]


@functools.lru_cache(maxsize=4)
def _world(config: TaskConfig, seed: int) -> FederatedWorld:
    return make_federated_world(config.world_config(seed))


@functools.lru_cache(maxsize=2)
def _real(config: TaskConfig, seed: int) -> DatasetFederation:
    backbone = _backbone(config.backbone, config.backbone_checkpoint)
    return dataset_federation(backbone, config.dataset_config(seed), _cache(config))


@functools.lru_cache(maxsize=4)
def _site_data(config: TaskConfig, data_root: str, partition_id: int, seed: int) -> SiteData:
    backbone = _backbone(config.backbone, config.backbone_checkpoint)
    return site_data(backbone, config.dataset_config(seed, root=data_root), partition_id, _cache(config))


def _cache(config: TaskConfig) -> FeatureCache:
    root = config.cache_dir or os.environ.get("FEDMPT_CACHE") or str(Path.home() / ".cache" / "fedmpt")
    return FeatureCache(Path(root) / "features")


def to_state(arrays: Mapping[str, NDArray[Any]]) -> dict[str, torch.Tensor]:
    """Numpy arrays -> torch tensors (fp32)."""
    return {name: torch.from_numpy(np.asarray(a, dtype=np.float32).copy()) for name, a in arrays.items()}


def to_arrays(state: Mapping[str, torch.Tensor]) -> Arrays:
    """Torch tensors -> fp32 numpy arrays."""
    return {name: t.detach().cpu().to(torch.float32).numpy() for name, t in state.items()}


def initial_arrays(config: TaskConfig, seed: int) -> Arrays:
    """The method's trainable state before round 1 (its seeded initialisation)."""
    return {name: a.copy() for name, a in _method_and_initial_state(config, seed)[1].items()}


def load_client_data(
    config: TaskConfig, partition_id: int, num_partitions: int, seed: int, data_root: str = ""
) -> ClientData:
    """Client ``partition_id``'s train and test features; ``num_partitions`` must equal ``num-clients``.

    ``data_root`` (the node config's ``data-root``): the site's own copy of the dataset, used whole (its
    ``train-split``, minus the held-out ``client-test-fraction``) instead of partition ``partition_id`` of the
    run config's ``data-root``.
    """
    if data_root:
        if config.synthetic:
            raise ConfigError("node config 'data-root' names a site's own dataset; the synthetic world has none")
        site = _site_data(config, data_root, partition_id, seed)
        expected = _classnames(config, seed)
        if site.classnames != expected:
            raise ConfigError(
                f"node config 'data-root' {data_root!r}: the site's classes {list(site.classnames)} differ from "
                f"the task's {list(expected)} (same names, same order needed)"
            )
        return ClientData(train=site.train, test=site.test)
    if not config.synthetic and not config.data_root:
        raise ConfigError(
            f"client {partition_id} has no data: set node config 'data-root' (the site's own {config.dataset!r}) "
            "or run config 'data-root' (a dataset every process can read, partitioned among the clients)"
        )
    if num_partitions != config.num_clients:
        raise ConfigError(
            f"node config num-partitions={num_partitions} differs from run config num-clients={config.num_clients}"
        )
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id must be in [0, num-partitions={num_partitions}), got {partition_id}")
    return _client_data(config, partition_id, seed)


@functools.lru_cache(maxsize=64)
def _client_data(config: TaskConfig, partition_id: int, seed: int) -> ClientData:
    if not config.synthetic:
        real = _real(config, seed)
        return ClientData(train=real.clients_train[partition_id], test=real.clients_test[partition_id])
    backbone = _backbone(config.backbone, config.backbone_checkpoint)
    client = _world(config, seed).clients[partition_id]
    cache = _cache(config)
    return ClientData(
        train=world_dataset_features(backbone, client.train, cache),
        test=world_dataset_features(backbone, client.test, cache),
    )


def load_global_test(config: TaskConfig, seed: int) -> GlobalTest | None:
    """The global test features: decorrelated and in-distribution (synthetic), the test split (a real dataset
    at the run config's ``data-root``), or ``None`` when the server holds no data (sites bring their own; the
    server then reports the clients' federated evaluation)."""
    if not config.synthetic:
        return GlobalTest(decorrelated=_real(config, seed).test) if config.data_root else None
    backbone = _backbone(config.backbone, config.backbone_checkpoint)
    world, cache = _world(config, seed), _cache(config)
    return GlobalTest(
        decorrelated=world_dataset_features(backbone, world.test_decorrelated, cache),
        in_distribution=world_dataset_features(backbone, world.test_in_distribution, cache),
    )


def max_client_examples(config: TaskConfig, seed: int) -> int:
    """The largest training-example count of any client: the weight bound secure aggregation provisions for
    (``train-per-client`` on the synthetic world and for sites that bring their own data; the largest partition
    of a real dataset at the run config's ``data-root``)."""
    if config.synthetic or not config.data_root:  # sites' own data: train-per-client is the declared bound
        return config.train_per_client
    return max(len(d) for d in _real(config, seed).clients_train)


def train_config(config: TaskConfig, seed: int) -> TrainConfig:
    """The library's :class:`TrainConfig` for one local update."""
    return TrainConfig(
        lr=config.learning_rate,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        local_epochs=config.local_epochs,
        batch_size=config.batch_size,
        seed=seed,
    )


def client_seed(run_seed: int, server_round: int, partition_id: int) -> int:
    """The seed of one client's local update (shuffling): a function of (run seed, round, partition) only, so a
    resumed run draws the same batches as an uninterrupted one and results do not depend on node ids."""
    return int(np.random.SeedSequence([run_seed, server_round, partition_id]).generate_state(1)[0])


def client_update(
    arrays: Mapping[str, NDArray[Any]], data: ClientData, config: TaskConfig, *, seed: int, run_seed: int = 0
) -> tuple[Arrays, int, dict[str, float]]:
    """Local training from ``arrays``; returns (new arrays, number of training examples, training metrics)."""
    with _METHOD_LOCK:
        method = _method(config, run_seed)
        update = library_client_update(method, to_state(arrays), data.train, train_config(config, seed))
    return to_arrays(update.state), update.num_examples, {"train_loss": update.metrics["loss"]}


def evaluate(
    arrays: Mapping[str, NDArray[Any]], split: FeatureData | GlobalTest, config: TaskConfig, *, run_seed: int = 0
) -> dict[str, float]:
    """mAP, CF1, OF1 (threshold 0.5) and the example count of ``arrays`` on ``split``.

    For the :class:`GlobalTest`, the plain keys are the decorrelated split's and ``iid-*`` the in-distribution's.
    """
    state = to_state(arrays)
    if isinstance(split, GlobalTest):
        with _METHOD_LOCK:
            method = _method(config, run_seed)
            dec = library_evaluate(method, state, split.decorrelated)
            iid = None if split.in_distribution is None else library_evaluate(method, state, split.in_distribution)
        out = {"mAP": dec.mAP, "CF1": dec.CF1, "OF1": dec.OF1}
        if iid is not None:
            out.update({"iid-mAP": iid.mAP, "iid-CF1": iid.CF1, "iid-OF1": iid.OF1})
        out["num_examples"] = float(len(split.decorrelated))
        return out
    with _METHOD_LOCK:
        m = library_evaluate(_method(config, run_seed), state, split)
    return {"mAP": m.mAP, "CF1": m.CF1, "OF1": m.OF1, "num_examples": float(len(split))}


def aggregate(updates: Sequence[tuple[Mapping[str, NDArray[Any]], int]]) -> Arrays:
    """FedAvg: the example-weighted mean of the client states (:func:`fedmpt.training.fedavg`).

    Raises:
        ConfigError: no updates, non-positive weights, or updates with different array names or shapes.
    """
    if not updates:
        raise ConfigError("aggregate needs at least one client update, got none")
    for arrays, weight in updates:
        if weight <= 0:
            raise ConfigError(f"client update weights must be positive, got {weight}")
        for name, a in arrays.items():
            ref = updates[0][0].get(name)
            if ref is not None and np.shape(a) != np.shape(ref):
                raise ConfigError(f"client updates disagree on the shape of {name!r}: {np.shape(a)} vs {np.shape(ref)}")
    state = fedavg([ClientUpdate(to_state(arrays), int(weight)) for arrays, weight in updates])
    return to_arrays(state)
