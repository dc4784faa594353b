"""An in-process federated loop (FedAvg over the library's client_update), and the synthetic benchmark's features.

This is the reference loop without a network: the Flower apps (:mod:`fedmpt.apps`) run the same rounds
through messages. Experiments that compare many methods use it directly, and the tests compare the Flower
run against it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmpt.backbone.loader import Backbone
from fedmpt.errors import ConfigError
from fedmpt.feature_cache import FeatureCache
from fedmpt.methods.base import Method
from fedmpt.partition import Partition, sample_participants
from fedmpt.training import (
    ClientUpdate,
    FeatureData,
    State,
    TrainConfig,
    client_update,
    evaluate,
    extract_features,
)
from fedmpt.world.dataset import FederatedWorld, WorldDataset

if TYPE_CHECKING:
    from fedmpt.data import MultiLabelDataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorldFeatures:
    """Frozen features of every split of a :class:`FederatedWorld`."""

    clients_train: tuple[FeatureData, ...]
    clients_test: tuple[FeatureData, ...]
    test_in_distribution: FeatureData
    test_decorrelated: FeatureData


def world_dataset_features(backbone: Backbone, data: WorldDataset, cache: FeatureCache | None = None) -> FeatureData:
    """Features of one world dataset, rendered at the backbone's input size."""
    if data.output_size != backbone.image_size:
        data.output_size = backbone.image_size
    return extract_features(backbone, data, data.labels, data_id=data.fingerprint(), cache=cache)


def world_features(backbone: Backbone, world: FederatedWorld, cache_dir: Path | None = None) -> WorldFeatures:
    """Features of every split of ``world`` (cached under ``cache_dir`` when given)."""
    cache = FeatureCache(cache_dir) if cache_dir is not None else None
    return WorldFeatures(
        clients_train=tuple(world_dataset_features(backbone, c.train, cache) for c in world.clients),
        clients_test=tuple(world_dataset_features(backbone, c.test, cache) for c in world.clients),
        test_in_distribution=world_dataset_features(backbone, world.test_in_distribution, cache),
        test_decorrelated=world_dataset_features(backbone, world.test_decorrelated, cache),
    )


@dataclass(frozen=True)
class RoundResult:
    """One round of the in-process loop."""

    round: int
    participants: tuple[int, ...]
    metrics: dict[str, dict[str, float]]  # split name -> metric name -> value
    train_loss: float
    seconds: float


def run_federated(
    method: Method,
    clients: tuple[FeatureData, ...],
    eval_sets: dict[str, FeatureData],
    train: TrainConfig,
    *,
    rounds: int,
    fraction: float = 1.0,
    min_clients: int = 1,
    seed: int = 0,
    on_round: Callable[[RoundResult], None] | None = None,
) -> tuple[State, list[RoundResult]]:
    """FedAvg for ``rounds`` rounds; returns the final global state and per-round results.

    Round ``r`` samples clients with :func:`fedmpt.partition.sample_participants` and trains each with seed
    ``(seed, r, client)`` so that results do not depend on the order clients are visited.
    """
    from fedmpt.training import fedavg

    state = method.trainable_state()
    history: list[RoundResult] = []
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        chosen = sample_participants(len(clients), fraction, r, seed, min_clients=min_clients)
        updates: list[ClientUpdate] = []
        for k in chosen:
            cfg = replace(train, seed=int(np.random.SeedSequence([seed, r, k]).generate_state(1)[0]))
            updates.append(client_update(method, state, clients[k], cfg))
        state = fedavg(updates)
        metrics = {name: evaluate(method, state, data).to_dict() for name, data in eval_sets.items()}
        loss = sum(u.metrics["loss"] * u.num_examples for u in updates) / sum(u.num_examples for u in updates)
        result = RoundResult(r, tuple(chosen), metrics, float(loss), time.perf_counter() - start)
        history.append(result)
        if on_round is not None:
            on_round(result)
    return state, history


# ------------------------------------------------------------------------------------------ real datasets

PARTITIONERS = ("label-cluster", "dirichlet")


@dataclass(frozen=True)
class DatasetFederationConfig:
    """How a real multi-label dataset is spread over simulated clients.

    Attributes:
        dataset, root, train_split, test_split: what :func:`fedmpt.data.load_dataset` loads (``root`` is the
            dataset's folder; the test split is the server's global test set).
        num_clients: number of clients K the training split is partitioned among.
        partition: ``"label-cluster"`` (KMeans on label vectors fitted on the training split, the paper's
            heterogeneous benchmark) or ``"dirichlet"`` (class-wise Dirichlet label skew).
        dirichlet_alpha: concentration of the Dirichlet partition (small = strong skew).
        client_test_fraction: fraction of each client's shard held out as its own test split (seeded), so
            that every client is evaluated on data of its own distribution; in ``[0, 1)``, 0 = none.
        partial_label_rate: probability that a positive training label is hidden (partial-label benchmark).
        partial_label_mode: hidden positives become ``"unknown"`` (ignored by the loss) or ``"negative"``.
        seed: seeds the partition, the hold-out and the label masking.
        dataset_options: the loader's own keyword options (``classnames_file`` of the CSV loader, ``split_dir``
            of BigEarthNet ...), as ``(name, value)`` pairs.
    """

    dataset: str
    root: str
    train_split: str = "train"
    test_split: str = "test"
    num_clients: int = 5
    partition: str = "label-cluster"
    dirichlet_alpha: float = 0.5
    client_test_fraction: float = 0.2
    partial_label_rate: float = 0.0
    partial_label_mode: str = "unknown"
    seed: int = 0
    dataset_options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if self.partition not in PARTITIONERS:
            raise ConfigError(
                f"partition must be one of {list(PARTITIONERS)} for a real dataset, got {self.partition!r}"
            )
        if not self.root:
            raise ConfigError(f"dataset {self.dataset!r} needs the folder it lives in (data root), got none")
        if not (0.0 <= self.client_test_fraction < 1.0):
            raise ConfigError(f"client_test_fraction must be in [0, 1), got {self.client_test_fraction!r}")


@dataclass(frozen=True)
class DatasetFederation:
    """Frozen features of a real dataset split among clients, and the global test split."""

    classnames: tuple[str, ...]
    clients_train: tuple[FeatureData, ...]
    clients_test: tuple[FeatureData, ...]
    test: FeatureData
    partition: Partition

    def summary(self) -> dict[str, object]:
        """Sizes for logs and run directories."""
        return {
            "classes": len(self.classnames),
            "clients_train": [len(d) for d in self.clients_train],
            "clients_test": [len(d) for d in self.clients_test],
            "test": len(self.test),
        }


def dataset_federation(
    backbone: Backbone, config: DatasetFederationConfig, cache: FeatureCache | None = None
) -> DatasetFederation:
    """Load, encode (once, cached) and partition a real dataset for a simulated federation.

    Every process that calls this with the same config gets the same partition (it depends on the training
    labels and the seed only), so the server and each client agree on who holds what without exchanging it.

    Raises:
        ConfigError: unknown dataset or partitioner, or a partition that leaves a client without data.
        DatasetError: the dataset's files are missing or malformed (from the loader).
    """
    from fedmpt.data import check_same_classnames
    from fedmpt.partition import dirichlet_partition, fit_label_clusters

    train = _load_split(backbone, config, config.train_split)
    test = _load_split(backbone, config, config.test_split)
    check_same_classnames([train, test])  # before encoding anything
    train_features, test_features = _encode(backbone, train, cache), _encode(backbone, test, cache)
    if config.partition == "label-cluster":
        partition = fit_label_clusters(train.labels, config.num_clients, seed=config.seed).train_partition
    else:
        partition = dirichlet_partition(train.labels, config.num_clients, config.dirichlet_alpha, seed=config.seed)
    masked = _training_labels(train.labels, config)
    shares = [
        _client_shares(train_features, masked, indices, config, k) for k, indices in enumerate(partition.client_indices)
    ]
    clients_train, clients_test = [train_k for train_k, _ in shares], [test_k for _, test_k in shares]
    logger.info("dataset %s: partition %s sizes %s", config.dataset, config.partition, partition.sizes())
    return DatasetFederation(
        classnames=tuple(train.classnames),
        clients_train=tuple(clients_train),
        clients_test=tuple(clients_test),
        test=test_features,
        partition=partition,
    )


@dataclass(frozen=True)
class SiteData:
    """One site's own data in a deployment: its training features and the share it holds out for testing."""

    classnames: tuple[str, ...]
    train: FeatureData
    test: FeatureData


def site_data(
    backbone: Backbone, config: DatasetFederationConfig, site: int, cache: FeatureCache | None = None
) -> SiteData:
    """A site's local dataset (``config.root`` on that site; only ``train_split`` is read), split into its
    training share and a held-out ``client_test_fraction`` (seeded by ``config.seed`` and ``site``), with the
    partial-label masking of ``config`` applied to the training share only. Nothing is partitioned: the whole
    split belongs to the site."""
    train = _load_split(backbone, config, config.train_split)
    features = _encode(backbone, train, cache)
    masked = _training_labels(train.labels, config)
    train_share, test_share = _client_shares(features, masked, np.arange(len(train)), config, site)
    return SiteData(classnames=tuple(train.classnames), train=train_share, test=test_share)


def _load_split(backbone: Backbone, config: DatasetFederationConfig, split: str) -> MultiLabelDataset:
    """Split ``split`` of the dataset of ``config``, read with the backbone's image transform."""
    from fedmpt.data import load_dataset

    options: dict[str, Any] = dict(config.dataset_options)
    return load_dataset(config.dataset, config.root, split, transform=backbone.preprocess, **options)


def _encode(backbone: Backbone, data: MultiLabelDataset, cache: FeatureCache | None) -> FeatureData:
    """Frozen features of ``data`` (encoded once, cached by the dataset's fingerprint)."""
    return extract_features(backbone, data, data.labels, data_id=data.fingerprint(), cache=cache)


def _training_labels(labels: np.ndarray, config: DatasetFederationConfig) -> np.ndarray:
    """The training labels with the partial-label masking of ``config`` applied (unchanged at rate 0)."""
    from fedmpt.partition import mask_partial_labels

    if config.partial_label_rate <= 0:
        return np.asarray(labels)
    return mask_partial_labels(labels, config.partial_label_rate, seed=config.seed, mode=config.partial_label_mode)


def _client_shares(
    features: FeatureData, masked: np.ndarray, indices: np.ndarray, config: DatasetFederationConfig, client: int
) -> tuple[FeatureData, FeatureData]:
    """Client ``client``'s rows ``indices`` of ``features``: its training share (with the ``masked`` labels) and
    its held-out test share (original labels), split by :func:`_hold_out`."""
    held, kept = _hold_out(indices, config.client_test_fraction, config.seed, client)
    shard = features.subset(kept)
    return FeatureData(shard.global_features, shard.patch_features, masked[kept]), features.subset(held)


def _hold_out(indices: np.ndarray, fraction: float, seed: int, client: int) -> tuple[np.ndarray, np.ndarray]:
    """(held-out, kept) sorted indices: ``round(fraction * n)`` of ``indices`` drawn with seed (seed, 7, client),
    at least one of each when ``fraction > 0`` and there are two or more."""
    order = np.random.default_rng([seed, 7, client]).permutation(indices)
    n_test = int(round(fraction * len(order)))
    if fraction > 0 and len(order) >= 2:
        n_test = min(max(n_test, 1), len(order) - 1)
    return np.sort(order[:n_test]), np.sort(order[n_test:])
