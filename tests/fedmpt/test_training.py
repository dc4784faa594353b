"""The framework-agnostic training loop: FedAvg arithmetic, determinism, unknown labels, evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmpt.backbone.loader import Backbone, load_backbone
from fedmpt.errors import ConfigError
from fedmpt.methods import build_method
from fedmpt.metrics import mean_average_precision
from fedmpt.training import ClientUpdate, FeatureData, TrainConfig, client_update, evaluate, fedavg, predict

CLASSES = ("star", "tree", "house")


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    torch.manual_seed(0)
    return load_backbone(random_init=True)


def _data(n: int = 40, seed: int = 0) -> FeatureData:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, len(CLASSES), generator=g) < 0.4).to(torch.int8).numpy()
    return FeatureData(torch.randn(n, 128, generator=g), torch.randn(n, 64, 128, generator=g), labels)


def test_fedavg_is_the_example_weighted_mean() -> None:
    a = ClientUpdate({"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.0)}, 1)
    b = ClientUpdate({"w": torch.tensor([4.0, 8.0]), "b": torch.tensor(3.0)}, 3)
    out = fedavg([a, b])
    torch.testing.assert_close(out["w"], torch.tensor([(1 + 12) / 4, (2 + 24) / 4]))
    torch.testing.assert_close(out["b"], torch.tensor(9 / 4))
    with pytest.raises(ConfigError, match="disagree"):
        fedavg([a, ClientUpdate({"w": torch.tensor([1.0, 2.0])}, 1)])
    with pytest.raises(ConfigError, match="at least one"):
        fedavg([])


def test_client_update_is_deterministic_and_changes_the_state(backbone: Backbone) -> None:
    method = build_method("fedmpt", backbone, CLASSES, ("background", "lighting"))
    start = method.trainable_state()
    cfg = TrainConfig(lr=0.05, batch_size=8, seed=3)
    u1 = client_update(method, start, _data(), cfg)
    u2 = client_update(method, start, _data(), cfg)
    assert u1.num_examples == 40 and u1.metrics["steps"] == 5
    for name in start:
        torch.testing.assert_close(u1.state[name], u2.state[name])
    assert any(not torch.equal(u1.state[n], start[n]) for n in start)


def test_unknown_labels_contribute_no_gradient(backbone: Backbone) -> None:
    method = build_method("promptfl", backbone, CLASSES, ())
    start = method.trainable_state()
    data = _data()
    unknown = FeatureData(data.global_features, data.patch_features, np.full_like(data.labels, -1))
    update = client_update(method, start, unknown, TrainConfig(lr=0.5, momentum=0.0, weight_decay=0.0))
    for name in start:
        torch.testing.assert_close(update.state[name], start[name])


def test_evaluate_matches_metrics_on_predictions(backbone: Backbone) -> None:
    method = build_method("dualcoop", backbone, CLASSES, ())
    data = _data(60, seed=1)
    scores = predict(method, None, data)
    assert scores.shape == (60, 3) and ((scores > 0) & (scores < 1)).all()
    assert evaluate(method, None, data).mAP == pytest.approx(mean_average_precision(scores, data.labels))


def test_bad_train_config_and_mismatched_features_are_rejected() -> None:
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=0.0)
    with pytest.raises(ConfigError, match="momentum"):
        TrainConfig(momentum=1.0)
    with pytest.raises(ConfigError, match="disagree"):
        FeatureData(torch.zeros(3, 4), torch.zeros(2, 5, 4), np.zeros((3, 2), dtype=np.int8))
