"""The embedded synthetic world: a controlled spurious-correlation benchmark for federated multi-label learning.

See :mod:`fedmpt.world.scene` for the causal structure, :mod:`fedmpt.world.render` for images and
:mod:`fedmpt.world.dataset` for datasets and the federated benchmark.
"""

from fedmpt.world.dataset import (
    ClientWorld,
    FederatedWorld,
    FederatedWorldConfig,
    WorldDataset,
    make_federated_world,
)
from fedmpt.world.factors import ALL_CLASSES, CONDITION_FACTORS, TASK_CLASSES
from fedmpt.world.scene import Scene, SceneDistribution, oracle_distribution, pretraining_distribution

__all__ = [
    "ALL_CLASSES",
    "CONDITION_FACTORS",
    "TASK_CLASSES",
    "ClientWorld",
    "FederatedWorld",
    "FederatedWorldConfig",
    "Scene",
    "SceneDistribution",
    "WorldDataset",
    "make_federated_world",
    "oracle_distribution",
    "pretraining_distribution",
]
