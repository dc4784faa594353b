"""A short federated run of FedMPT on the synthetic world beats zero-shot CLIP (bundled tiny CLIP)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedmpt.backbone.loader import load_backbone
from fedmpt.conditions import load_conditions
from fedmpt.federated import run_federated, world_features
from fedmpt.methods import build_method
from fedmpt.training import TrainConfig, evaluate
from fedmpt.world.dataset import FederatedWorldConfig, make_federated_world

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_fedmpt_training_beats_zero_shot_on_the_decorrelated_split(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    backbone = load_backbone()
    world = make_federated_world(
        FederatedWorldConfig(num_clients=3, train_per_client=200, test_per_client=20, global_test_size=400, seed=1)
    )
    conditions = load_conditions("synthetic", world.classnames).conditions
    feats = world_features(backbone, world, tmp_path / "cache")
    zero_shot = evaluate(build_method("zeroshot", backbone, world.classnames), None, feats.test_decorrelated).mAP
    method = build_method("fedmpt", backbone, world.classnames, conditions, init_seed=1)
    _, history = run_federated(
        method,
        feats.clients_train,
        {"decorrelated": feats.test_decorrelated},
        TrainConfig(lr=0.01, local_epochs=2, seed=1),
        rounds=6,
        seed=1,
    )
    trained = history[-1].metrics["decorrelated"]["mAP"]
    # Measured here: zero-shot 0.483; FedMPT 0.365, 0.412, 0.462, 0.505, 0.531, 0.545 after rounds 1-6 (random
    # prompt initialisation starts below zero-shot). Asked: at least 4 mAP points above zero-shot.
    assert trained > zero_shot + 0.04, (zero_shot, [r.metrics["decorrelated"]["mAP"] for r in history])
