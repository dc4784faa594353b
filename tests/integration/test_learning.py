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
    zero_shot = evaluate(build_method("zeroshot", backbone, world.classnames), None, feats.test_decorrelated)
    method = build_method("fedmpt", backbone, world.classnames, conditions, init_seed=1)
    _, history = run_federated(
        method,
        feats.clients_train,
        {"decorrelated": feats.test_decorrelated},
        TrainConfig(lr=0.01, local_epochs=2, seed=1),
        rounds=3,
        seed=1,
    )
    trained = history[-1].metrics["decorrelated"]
    trace = (zero_shot.to_dict(), [r.metrics["decorrelated"] for r in history])
    # Measured here (bundled tiny CLIP, zero-shot mAP 0.895, CF1 0.688 at threshold 0.5): after rounds 1-3 FedMPT
    # has mAP 0.903, 0.904, 0.904 and CF1 0.899, 0.903, 0.898. The pretrained model already ranks classes well,
    # so the ranking gain is small but must be positive; zero-shot scores are not calibrated for a multi-label
    # threshold, which training must fix: asked, CF1 and OF1 at least 10 points above zero-shot.
    assert trained["mAP"] > zero_shot.mAP, trace
    assert trained["CF1"] > zero_shot.CF1 + 0.10, trace
    assert trained["OF1"] > zero_shot.OF1 + 0.10, trace
