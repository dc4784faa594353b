"""A real (file-based) dataset partitioned among simulated clients: coverage, determinism, hold-out, labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmpt.backbone.loader import Backbone, load_backbone
from fedmpt.data import UNKNOWN, load_dataset
from fedmpt.errors import ConfigError
from fedmpt.feature_cache import FeatureCache
from fedmpt.federated import DatasetFederationConfig, dataset_federation


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return load_backbone("fedmpt-tiny-clip")


def _config(root: Path, **extra: object) -> DatasetFederationConfig:
    options = (("classnames_file", "classes.txt"),)
    return DatasetFederationConfig(  # type: ignore[arg-type]
        dataset="csv", root=str(root), num_clients=3, seed=4, dataset_options=options, **extra
    )


@pytest.mark.parametrize("partition", ["label-cluster", "dirichlet"])
def test_every_training_image_is_with_exactly_one_client_and_the_split_is_deterministic(
    backbone: Backbone, csv_dataset: Path, tmp_path: Path, partition: str
) -> None:
    config = _config(csv_dataset, partition=partition, dirichlet_alpha=1.0)
    fed = dataset_federation(backbone, config, FeatureCache(tmp_path))
    train = load_dataset("csv", csv_dataset, "train", classnames_file="classes.txt")
    all_features = np.concatenate([d.global_features.numpy() for d in fed.clients_train + fed.clients_test], axis=0)
    assert len(all_features) == len(train) == 60
    assert np.unique(all_features, axis=0).shape[0] == 60  # no image twice
    for k, size in enumerate(fed.partition.sizes()):
        assert len(fed.clients_train[k]) + len(fed.clients_test[k]) == size
    reference = dataset_federation(backbone, config, FeatureCache(tmp_path))
    assert fed.partition == reference.partition
    for a, b in zip(
        fed.clients_train + fed.clients_test, reference.clients_train + reference.clients_test, strict=True
    ):
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.global_features.numpy(), b.global_features.numpy())
    assert fed.classnames == ("red", "green", "blue", "yellow")  # from classes.txt, in file order
    assert len(fed.test) == 20
    for train_k, test_k in zip(fed.clients_train, fed.clients_test, strict=True):
        assert len(train_k) >= 1 and len(test_k) >= 1  # 20% held out, at least one of each


def test_partial_labels_hide_training_positives_only(backbone: Backbone, csv_dataset: Path, tmp_path: Path) -> None:
    plain = dataset_federation(backbone, _config(csv_dataset), FeatureCache(tmp_path))
    partial = dataset_federation(backbone, _config(csv_dataset, partial_label_rate=0.5), FeatureCache(tmp_path))
    hidden = sum(int((d.labels == UNKNOWN).sum()) for d in partial.clients_train)
    assert hidden > 0 and all(int((d.labels == UNKNOWN).sum()) == 0 for d in plain.clients_train)
    for a, b in zip(plain.clients_test, partial.clients_test, strict=True):
        np.testing.assert_array_equal(a.labels, b.labels)  # each client's own test labels are never masked
    np.testing.assert_array_equal(plain.test.labels, partial.test.labels)


def test_bad_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="partition"):
        DatasetFederationConfig(dataset="csv", root="/x", partition="kmeans")
    with pytest.raises(ConfigError, match="root"):
        DatasetFederationConfig(dataset="csv", root="")
    with pytest.raises(ConfigError, match="client_test_fraction"):
        DatasetFederationConfig(dataset="csv", root="/x", client_test_fraction=1.0)
