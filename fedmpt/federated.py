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

import numpy as np

from fedmpt.backbone.loader import Backbone
from fedmpt.feature_cache import FeatureCache
from fedmpt.methods.base import Method
from fedmpt.partition import sample_participants
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
